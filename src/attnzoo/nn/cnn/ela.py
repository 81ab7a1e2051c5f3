"""Efficient local attention (Xu & Wan, "ELA: Efficient Local Attention for Deep Convolutional Neural
Networks", arXiv 2403.01123, Sec. 3).

Strip pooling along each axis, then ONE 1D convolution and ONE GroupNorm shared by both strips:

    z_h = mean_W X  (B, C, H),   z_w = mean_H X  (B, C, W)                         (strip pooling)
    y_h = sigmoid(GN_n(F_h(z_h))),   y_w = sigmoid(GN_n(F_w(z_w))),   F_h = F_w    (shared conv + GN)
    Y   = X (.) y_h (.) y_w

The paper's four versions (kernel k, conv groups, GroupNorm groups n):
T = (5, C, 32), B = (7, C, 16), S = (5, C/8, 16), L = (7, C/8, 16); the conv has no bias. No official code
was released; the widely used copies agree with this table.

timm's ``EfficientLocalAttn`` (``create_attn('ela')``) is a variant, not this: it has separate convs and
norms for the two axes, GroupNorm with one group and an extra SiLU before the gate.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from ...errors import ParameterError
from .._checks import check_image, odd_kernel, positive_int
from .._registry import ModuleExample, register_module

__all__ = ["EfficientLocalAttention"]

# version -> (kernel size, conv groups as a function of C, GroupNorm groups)
_VERSIONS = {
    "T": (5, lambda c: c, 32),
    "B": (7, lambda c: c, 16),
    "S": (5, lambda c: c // 8, 16),
    "L": (7, lambda c: c // 8, 16),
}


@register_module(
    "C2",
    paper="ELA: Efficient Local Attention (Xu & Wan, arXiv 2403.01123)",
    layout="(B, C, H, W)",
    example=ModuleExample(dict(channels=64), inputs=[(1, 64, 56, 56)], test_inputs=[(2, 16, 8, 8)], test_kwargs=dict(channels=16)),
)
class EfficientLocalAttention(nn.Module):
    """Efficient local attention: strip-pooled rows and columns through one shared 1D conv + GroupNorm + sigmoid.

    ``y_h = sigmoid(GN(F(mean_W X)))`` (B, C, H, 1), ``y_w = sigmoid(GN(F(mean_H X)))`` (B, C, 1, W) with the
    same conv F and the same GroupNorm for both, ``Y = X * y_h * y_w`` (Sec. 3). No channel reduction.

    Cost: O(N C) for N = H W (pooling and gating) plus O((H + W) C k C / groups); (C^2 / groups) k + 2C parameters.
    Layout: (B, C, H, W). Paper: ELA (Xu & Wan, 2024). Not timm's ``EfficientLocalAttn`` (separate per-axis
    convs and norms, GroupNorm(1), SiLU).

    Args:
        channels: C. version: ``"T"``, ``"B"`` (default), ``"S"`` or ``"L"`` (kernel, conv groups, GN groups as the
            paper's table). kernel_size, groups, num_groups: override the version's values.

    Example::

        >>> ela = EfficientLocalAttention(64, version="S")
        >>> y = ela(torch.randn(2, 64, 28, 28))
    """

    def __init__(self, channels: int, version: str = "B", *, kernel_size: Optional[int] = None,
                 groups: Optional[int] = None, num_groups: Optional[int] = None):
        super().__init__()
        name = type(self).__name__
        self.channels = positive_int(name, "channels", channels)
        if version not in _VERSIONS:
            raise ParameterError(f"{name}: version: expected one of {tuple(_VERSIONS)}, got {version!r}", argument="version")
        k, groups_of, n = _VERSIONS[version]
        k = odd_kernel(name, kernel_size) or k
        groups = positive_int(name, "groups", groups) if groups is not None else max(groups_of(channels), 1)
        n = positive_int(name, "num_groups", num_groups) if num_groups is not None else n
        for arg, value in (("groups", groups), ("num_groups", n)):
            if channels % value:
                raise ParameterError(f"{name}: {arg}: expected a divisor of channels={channels}, got {value} (version {version!r}; pass {arg}=)", argument=arg)
        self.version, self.kernel_size = version, k
        self.conv = nn.Conv1d(channels, channels, k, padding=k // 2, groups=groups, bias=False)
        self.norm = nn.GroupNorm(n, channels)

    def strip_gate(self, z: Tensor) -> Tensor:
        """sigmoid(GN(F(z))) for one strip z (B, C, L)."""
        return torch.sigmoid(self.norm(self.conv(z)))

    def forward(self, x: Tensor) -> Tensor:
        check_image(type(self).__name__, x, self.channels)
        y_h = self.strip_gate(x.mean(dim=3)).unsqueeze(-1)  # (B, C, H, 1)
        y_w = self.strip_gate(x.mean(dim=2)).unsqueeze(-2)  # (B, C, 1, W)
        return x * y_h * y_w

    def extra_repr(self) -> str:
        return f"channels={self.channels}, version={self.version!r}, kernel_size={self.kernel_size}"
