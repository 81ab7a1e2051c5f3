"""Polarized self-attention (Liu et al., "Polarized Self-Attention: Towards High-quality Pixel-wise
Regression", arXiv 2107.00782, Sec. 3.1-3.2), with the arithmetic of the official code
(DeLightCMU/PSA, ``semantic-segmentation/network/PSA.py``: ``PSA_p`` and ``PSA_s``).

Channel-only branch (paper Eq. 1, Z^ch = A^ch (.)^ch X), W_q: C -> 1, W_v: C -> C/2, W_z: C/2 -> C:

    A^ch(X) = sigmoid( W_z( W_v(X) softmax_HW(W_q(X))^T ) )                      (Eq. 1)

Spatial-only branch (paper Eq. 3, Z^sp = A^sp (.)^sp X), W_q, W_v: C -> C/2:

    A^sp(X) = sigmoid( GAP(W_q(X))^T W_v(X) )   with a softmax placed as below   (Eq. 3)

Composition (Eq. 5-6): parallel ``PSA_p(X) = Z^ch + Z^sp``; sequential ``PSA_s(X) = Z^sp(Z^ch(X))``.

Where the official code departs from the paper (we follow the code; DeLightCMU/PSA issue #5):

* ``PSA_p``: W_z is one 1x1 conv (the paper's LayerNorm is absent); in the spatial branch the softmax is
  over the H W pixels *after* the product, ``sigmoid(softmax_HW(GAP(W_q X)^T W_v X))``, not over the
  channels of GAP(W_q X) before it.
* ``PSA_s``: W_z is a bottleneck ``conv(C/2 -> C/8) -> LayerNorm -> ReLU -> conv(C/8 -> C)`` (biased convs);
  in the spatial branch the softmax is over the pixels of each W_v channel, ``sigmoid(GAP(W_q X)^T softmax_HW(W_v X))``.
* The code names the branches the other way round (``spatial_pool`` computes the channel-only branch).

``arithmetic="paper"`` gives the paper's equations instead (as the External-Attention reimplementation reads
them): W_z is a 1x1 conv C/2 -> C followed by a LayerNorm over the channels in both compositions, and the
spatial branch is ``sigmoid(softmax_C(GAP(W_q X))^T W_v X)`` (the softmax over the C/2 pooled channels).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ...errors import ParameterError
from .._checks import check_image, positive_int
from .._registry import ModuleExample, register_module

__all__ = ["PolarizedSelfAttention"]

_MODES = ("parallel", "sequential")
_ARITHMETIC = ("official", "paper")


@register_module(
    "C4",
    paper="Polarized Self-Attention (Liu et al., arXiv 2107.00782; official DeLightCMU/PSA code)",
    layout="(B, C, H, W)",
    example=ModuleExample(dict(channels=64), inputs=[(1, 64, 56, 56)], test_inputs=[(2, 16, 8, 8)], test_kwargs=dict(channels=16)),
)
class PolarizedSelfAttention(nn.Module):
    """Polarized self-attention: a channel-only and a spatial-only sigmoid gate, in parallel or in sequence.

    Channel-only: ``A^ch = sigmoid(W_z(W_v X softmax_HW(W_q X)^T))`` (Eq. 1), one weight per channel.
    Spatial-only: ``A^sp = sigmoid(GAP(W_q X)^T W_v X)`` (Eq. 3) with the official code's softmax, one weight
    per pixel. ``mode="parallel"``: ``Z^ch + Z^sp`` (Eq. 5, ``PSA_p``); ``"sequential"``: ``Z^sp(Z^ch)``
    (Eq. 6, ``PSA_s``, with its bottleneck W_z). See the module docstring for where the code departs from
    the paper; this class follows the code unless ``arithmetic="paper"``. The four 1x1 convs have no bias and
    the code's Kaiming init.

    Cost: O(N C^2) time for N = H W (1x1 convs; the attention itself is O(N C)), O(N C) memory.
    Layout: (B, C, H, W). Paper: Polarized Self-Attention (Liu et al., 2021).

    Args:
        channels: C (even; a multiple of 8 for the official ``sequential``). mode: ``"parallel"`` or ``"sequential"``.
        arithmetic: ``"official"`` (DeLightCMU's ``PSA_p`` / ``PSA_s``) or ``"paper"`` (Eq. 1 and 3 as printed).

    Example::

        >>> psa = PolarizedSelfAttention(64, mode="sequential")
        >>> y = psa(torch.randn(2, 64, 32, 32))
    """

    def __init__(self, channels: int, mode: str = "parallel", *, arithmetic: str = "official"):
        super().__init__()
        name = type(self).__name__
        self.channels = positive_int(name, "channels", channels)
        if mode not in _MODES:
            raise ParameterError(f"{name}: mode: expected one of {_MODES}, got {mode!r}", argument="mode")
        if arithmetic not in _ARITHMETIC:
            raise ParameterError(f"{name}: arithmetic: expected one of {_ARITHMETIC}, got {arithmetic!r}", argument="arithmetic")
        bottleneck = mode == "sequential" and arithmetic == "official"
        if channels % 2 or (bottleneck and channels % 8):
            need = "a multiple of 8 (official sequential)" if bottleneck else "even"
            raise ParameterError(f"{name}: channels: expected {need}, got {channels}", argument="channels")
        self.mode, self.arithmetic = mode, arithmetic
        inner = channels // 2
        # channel-only branch (the code's "right" convs)
        self.ch_query = nn.Conv2d(channels, 1, 1, bias=False)
        self.ch_value = nn.Conv2d(channels, inner, 1, bias=False)
        if arithmetic == "paper":  # W_z then LayerNorm over the channels (Eq. 1)
            self.ch_out: nn.Module = nn.Sequential(nn.Conv2d(inner, channels, 1, bias=False), nn.LayerNorm([channels, 1, 1]))
        elif mode == "parallel":
            self.ch_out = nn.Conv2d(inner, channels, 1, bias=False)
        else:
            mid = inner // 4
            self.ch_out = nn.Sequential(
                nn.Conv2d(inner, mid, 1), nn.LayerNorm([mid, 1, 1]), nn.ReLU(), nn.Conv2d(mid, channels, 1)
            )
        # spatial-only branch (the code's "left" convs)
        self.sp_query = nn.Conv2d(channels, inner, 1, bias=False)
        self.sp_value = nn.Conv2d(channels, inner, 1, bias=False)
        for conv in (self.ch_query, self.ch_value, self.sp_query, self.sp_value):
            nn.init.kaiming_normal_(conv.weight, mode="fan_in", nonlinearity="relu")

    def channel_gate(self, x: Tensor) -> Tensor:
        """A^ch (B, C, 1, 1) in (0, 1)."""
        v = self.ch_value(x).flatten(2)  # (B, C/2, N)
        q = torch.softmax(self.ch_query(x).flatten(2), dim=-1)  # (B, 1, N)
        z = (v @ q.transpose(1, 2)).unsqueeze(-1)  # (B, C/2, 1, 1)
        return torch.sigmoid(self.ch_out(z))

    def spatial_gate(self, x: Tensor) -> Tensor:
        """A^sp (B, 1, H, W) in (0, 1)."""
        b, _, h, w = x.shape
        q = self.sp_query(x).mean(dim=(2, 3)).unsqueeze(1)  # (B, 1, C/2)
        v = self.sp_value(x).flatten(2)  # (B, C/2, N)
        if self.arithmetic == "paper":  # softmax over the pooled channels, then the product (Eq. 3)
            s = torch.softmax(q, dim=-1) @ v
        elif self.mode == "parallel":
            s = torch.softmax(q @ v, dim=-1)
        else:
            s = q @ torch.softmax(v, dim=-1)
        return torch.sigmoid(s).view(b, 1, h, w)

    def forward(self, x: Tensor) -> Tensor:
        check_image(type(self).__name__, x, self.channels)
        if self.mode == "parallel":
            return x * self.channel_gate(x) + x * self.spatial_gate(x)
        z = x * self.channel_gate(x)
        return z * self.spatial_gate(z)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, mode={self.mode!r}, arithmetic={self.arithmetic!r}"
