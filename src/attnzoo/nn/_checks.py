"""Argument checks and head reshapes shared by the modules of :mod:`attnzoo.nn`."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from ..errors import ParameterError, ShapeError

__all__ = ["positive_int", "odd_kernel", "spatial_dims_1_or_2", "check_tokens", "heads_divide", "check_image", "check_sequence", "split_heads", "merge_heads"]


def positive_int(owner: str, name: str, value: Any) -> int:
    """``value`` if it is a positive int (not a bool), else a ParameterError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ParameterError(f"{owner}: {name}: expected a positive int, got {value!r}", argument=name)
    return value


def odd_kernel(owner: str, value: Any, *, optional: bool = True) -> Any:
    """``value`` if it is an odd positive int (or None when ``optional``): a centred convolution's kernel."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1 or value % 2 == 0:
        expected = "None or an odd positive int" if optional else "an odd positive int"
        raise ParameterError(f"{owner}: kernel_size: expected {expected}, got {value!r}", argument="kernel_size")
    return value


def spatial_dims_1_or_2(owner: str, value: Any) -> int:
    """1 for (B, N, C) token sequences or 2 for (B, H, W, C) grids."""
    if isinstance(value, bool) or value not in (1, 2):
        raise ParameterError(
            f"{owner}: spatial_dims: expected 1 ((B, N, C) tokens) or 2 ((B, H, W, C) grids), got {value!r}", argument="spatial_dims"
        )
    return value


def check_tokens(owner: str, x: Tensor, d_model: int) -> None:
    """``x`` must be tokens (B, N, C) with C = ``d_model``."""
    if x.dim() != 3 or x.shape[-1] != d_model:
        raise ShapeError(f"{owner}: x: expected (B, N, C={d_model}), got shape {tuple(x.shape)}", argument="x")


def check_image(owner: str, x: Tensor, channels: int, name: str = "x") -> None:
    """``x`` must be a feature map (B, C, H, W) with C = ``channels``."""
    if x.dim() != 4 or x.shape[1] != channels:
        raise ShapeError(f"{owner}: {name}: expected (B, C={channels}, H, W), got shape {tuple(x.shape)}", argument=name)


def check_sequence(owner: str, x: Tensor, channels: int, name: str = "x") -> None:
    """``x`` must be a feature sequence (B, C, T) with C = ``channels`` (speech frames, as ECAPA-TDNN holds them)."""
    if x.dim() != 3 or x.shape[1] != channels:
        raise ShapeError(f"{owner}: {name}: expected (B, C={channels}, T), got shape {tuple(x.shape)}", argument=name)


def heads_divide(owner: str, dim: int, num_heads: int) -> int:
    """The head width ``dim // num_heads``; a ParameterError unless ``num_heads`` divides ``dim``."""
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1 or dim % num_heads:
        raise ParameterError(f"{owner}: num_heads: expected a divisor of dim={dim}, got {num_heads!r}", argument="num_heads")
    return dim // num_heads


#: The official Swin code's (and timm's) additive mask between sub-windows of a shifted window.
SHIFT_MASK_VALUE = -100.0


def split_heads(x: Tensor, heads: int) -> Tensor:
    """(B, N, H * d) -> (B, H, N, d)."""
    b, n, _ = x.shape
    return x.view(b, n, heads, -1).transpose(1, 2)


def merge_heads(x: Tensor) -> Tensor:
    """(B, H, N, d) -> (B, N, H * d)."""
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], -1)
