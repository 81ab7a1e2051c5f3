"""Argument checks the analysis functions share."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..errors import ParameterError


def attention_maps(value: Any, argument: str, *, square: bool = False) -> Tensor:
    """``value`` as a floating tensor (..., H, Nq, Nk); refuses anything else, naming ``argument``."""
    if not isinstance(value, Tensor) or not value.is_floating_point() or value.dim() < 3:
        raise ParameterError(f"{argument}: expected a floating tensor (..., H, Nq, Nk), got {_describe(value)}", argument=argument)
    if square and value.shape[-1] != value.shape[-2]:
        raise ParameterError(f"{argument}: expected self-attention maps (Nq = Nk), got {tuple(value.shape)}", argument=argument)
    return value


def heads_first(maps: Tensor) -> Tensor:
    """(..., H, Nq, Nk) -> (M, H, Nq, Nk): the leading axes folded into one, to be averaged."""
    return maps.reshape(-1, *maps.shape[-3:])


def _describe(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return type(value).__name__


def positive_int(value: Any, argument: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ParameterError(f"{argument}: expected a positive int, got {value!r}", argument=argument)
    return value


def as_float64(x: Tensor) -> Tensor:
    return x.detach().to(torch.float64)
