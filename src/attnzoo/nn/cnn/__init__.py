"""Attention blocks for CNNs (catalog C) on ``(B, C, H, W)``, and :func:`create_attn`, a factory by name.

C1 :class:`EfficientChannelAttention` (ECA-Net), C2 :class:`EfficientLocalAttention` (ELA),
C3 :class:`SubspaceAttention` (ULSAM), C4 :class:`PolarizedSelfAttention`, C5 :class:`SECoordAttention`,
C6 :class:`PositionAttentionModule` / :class:`ChannelAttentionModule` (DANet), C7
:class:`AttentiveStatisticsPooling` / :class:`SERes2Block` (ECAPA-TDNN, on ``(B, C, T)``), C8
:class:`PartialChannelAttention` / :class:`PartialSpatialAttention` (PATNet), C9
:class:`SentenceAttentionBlock` (``forward(x, text)``).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional

from torch import nn

from ...errors import ParameterError
from .danet import ChannelAttentionModule, PositionAttentionModule
from .eca import EfficientChannelAttention, eca_kernel_size
from .ecapa import AttentiveStatisticsPooling, SERes2Block
from .ela import EfficientLocalAttention
from .partial import PartialChannelAttention, PartialSpatialAttention
from .polarized import PolarizedSelfAttention
from .se_coord import SECoordAttention
from .text_gating import SentenceAttentionBlock
from .ulsam import SubspaceAttention

__all__ = [
    "EfficientChannelAttention",
    "eca_kernel_size",
    "EfficientLocalAttention",
    "SubspaceAttention",
    "PolarizedSelfAttention",
    "SECoordAttention",
    "PositionAttentionModule",
    "ChannelAttentionModule",
    "AttentiveStatisticsPooling",
    "SERes2Block",
    "PartialChannelAttention",
    "PartialSpatialAttention",
    "SentenceAttentionBlock",
    "create_attn",
    "ATTN_NAMES",
]

#: create_attn's names -> constructors taking the channel count first (timm's create_attn convention).
_FACTORIES: dict[str, Callable[..., nn.Module]] = {
    "eca": EfficientChannelAttention,
    "ela": EfficientLocalAttention,
    "ulsam": SubspaceAttention,
    "psa_p": functools.partial(PolarizedSelfAttention, mode="parallel"),
    "psa_s": functools.partial(PolarizedSelfAttention, mode="sequential"),
    "se_coord": SECoordAttention,
    "pam": PositionAttentionModule,
    "cam": ChannelAttentionModule,
    "asp": AttentiveStatisticsPooling,
    "se_res2": SERes2Block,
    "pat_ch": PartialChannelAttention,
    "pat_sp": PartialSpatialAttention,
    "sentence": SentenceAttentionBlock,
}

ATTN_NAMES: tuple[str, ...] = tuple(_FACTORIES)


def create_attn(name: Optional[str], channels: int, **kwargs: Any) -> Optional[nn.Module]:
    """A CNN attention block by name, built for ``channels`` (timm's ``create_attn`` convention).

    ``name`` is case-insensitive: ``"eca"``, ``"ela"``, ``"ulsam"``, ``"psa_p"`` / ``"psa_s"`` (polarized,
    parallel / sequential), ``"se_coord"``, ``"pam"``, ``"cam"``, ``"asp"`` and ``"se_res2"`` (on (B, C, T)),
    ``"pat_ch"``, ``"pat_sp"``, ``"sentence"`` (needs ``text_dim=``). ``kwargs`` go to the constructor. As timm's,
    ``None`` or ``""`` gives ``None`` (no attention); an unknown name raises a ParameterError listing the names.

    Example::

        >>> attn = create_attn("eca", 256)
        >>> y = attn(torch.randn(2, 256, 14, 14))
    """
    if name is None or name == "":
        return None
    if not isinstance(name, str) or name.lower() not in _FACTORIES:
        raise ParameterError(f"create_attn: name: expected one of {', '.join(ATTN_NAMES)}, got {name!r}", argument="name")
    return _FACTORIES[name.lower()](channels, **kwargs)
