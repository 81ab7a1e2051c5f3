"""Input checks shared by the CNN attention blocks of :mod:`attnzoo.nn.cnn`."""

from __future__ import annotations

from torch import Tensor

from ...errors import ShapeError

__all__ = ["check_image", "check_sequence"]


def check_image(owner: str, x: Tensor, channels: int, name: str = "x") -> None:
    """``x`` must be a feature map (B, C, H, W) with C = ``channels``."""
    if x.dim() != 4 or x.shape[1] != channels:
        raise ShapeError(f"{owner}: {name}: expected (B, C={channels}, H, W), got shape {tuple(x.shape)}", argument=name)


def check_sequence(owner: str, x: Tensor, channels: int, name: str = "x") -> None:
    """``x`` must be a feature sequence (B, C, T) with C = ``channels`` (speech frames, as ECAPA-TDNN holds them)."""
    if x.dim() != 3 or x.shape[1] != channels:
        raise ShapeError(f"{owner}: {name}: expected (B, C={channels}, T), got shape {tuple(x.shape)}", argument=name)
