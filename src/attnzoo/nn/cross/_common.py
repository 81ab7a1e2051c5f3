"""What the heads share: the checked mechanism and its padding argument."""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from ...errors import ParameterError, ShapeError
from ...registry import Mechanism, get

CROSS = "noncausal_cross"


def cross_mechanism(owner: str, name: Any, params: dict[str, Any], reserved: tuple[str, ...]) -> Mechanism:
    """The registered mechanism ``name``, refused naming ``mechanism`` when it has no
    ``noncausal_cross`` pattern (the heads' queries are not the tokens), naming the parameter when
    ``params`` holds a name it lacks or one the head sets itself (``reserved``)."""
    if not isinstance(name, str):
        raise ParameterError(f"{owner}: mechanism: expected a registered name (str), got {name!r}", argument="mechanism")
    mech = get(name)
    if CROSS not in mech.patterns:
        supported = ", ".join(sorted(mech.patterns)) or "none"
        raise ParameterError(f"{owner}: mechanism {name!r} does not support the {CROSS} pattern (it supports: {supported})", argument="mechanism")
    accepted = {p.name for p in mech.params}
    for n in params:
        if n not in accepted:
            raise ParameterError(f"{owner}: {name}: unknown parameter {n!r}; it accepts: {', '.join(sorted(accepted)) or 'none'}", argument=n)
        if n in reserved:
            raise ParameterError(f"{owner}: {n}: set by the head itself (pass masks to forward())", argument=n)
    return mech


def takes(mech: Mechanism, name: str) -> bool:
    return any(p.name == name for p in mech.params)


def padding_param(owner: str, mech: Mechanism, key_padding_mask: Optional[Tensor], batch: int, n: int) -> dict[str, Tensor]:
    """``{"key_padding_mask": mask}`` for the mechanism call (empty for None), checked: (B, N) bool."""
    if key_padding_mask is None:
        return {}
    if not isinstance(key_padding_mask, Tensor) or key_padding_mask.dtype != torch.bool or tuple(key_padding_mask.shape) != (batch, n):
        shown = f"{key_padding_mask.dtype} {tuple(key_padding_mask.shape)}" if isinstance(key_padding_mask, Tensor) else type(key_padding_mask).__name__
        raise ShapeError(f"{owner}: key_padding_mask: expected a bool tensor (B, N) = ({batch}, {n}), True = ignore, got {shown}", argument="key_padding_mask")
    if not takes(mech, "key_padding_mask"):
        raise ParameterError(f"{owner}: key_padding_mask: mechanism {mech.name!r} takes no key padding mask", argument="key_padding_mask")
    return {"key_padding_mask": key_padding_mask}
