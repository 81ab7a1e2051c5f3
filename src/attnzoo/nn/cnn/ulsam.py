"""Subspace attention (Saini et al., "ULSAM: Ultra-Lightweight Subspace Attention Module for Compact
Convolutional Neural Networks", WACV 2020, Sec. 3).

The C channels are split into g subspaces F_1 .. F_g of C/g channels; each gets one spatial attention map:

    A_n  = softmax_HW( PW^1( maxpool^{3x3, s=1}( DW^{1x1}(F_n) ) ) )     (Eq. 1; PW^1: C/g -> 1 channel)
    F^_n = (A_n (x) F_n) (+) F_n                                        (Eq. 2; the map is shared by F_n's channels)
    F^   = concat(F^_1, .., F^_g)                                        (Eq. 3)

The official code (Nandan91/ULSAM, ``ulsam.py``) adds BatchNorm + ReLU after DW and after PW, not in the
paper's formula; ``norm_act=True`` gives that (with the code's BatchNorm ``momentum=0.9``). The default follows
the paper. Biases that a softmax or a BatchNorm would cancel are dropped (they get no gradient): PW has none,
and DW has none under ``norm_act``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...errors import ParameterError
from .._checks import check_image, positive_int
from .._registry import ModuleExample, register_module

__all__ = ["SubspaceAttention"]


def max_pool3x3(x: Tensor) -> Tensor:
    """``F.max_pool2d(x, 3, stride=1, padding=1)`` as a separable max of shifted views: the same values, about
    50x faster on CPU (torch's NCHW max-pool kernel is slow at stride 1). At exact ties the gradient is shared
    between the tied inputs (another valid subgradient) instead of going to one of them."""
    h, w = x.shape[-2:]
    p = F.pad(x, (1, 1, 1, 1), value=float("-inf"))
    rows = torch.maximum(torch.maximum(p[..., 0:h, :], p[..., 1 : h + 1, :]), p[..., 2 : h + 2, :])
    return torch.maximum(torch.maximum(rows[..., 0:w], rows[..., 1 : w + 1]), rows[..., 2 : w + 2])


@register_module(
    "C3",
    paper="ULSAM (Saini et al., WACV 2020)",
    layout="(B, C, H, W)",
    example=ModuleExample(dict(channels=64, num_splits=4), inputs=[(1, 64, 56, 56)], test_inputs=[(2, 16, 8, 8)],
                          test_kwargs=dict(channels=16)),
)
class SubspaceAttention(nn.Module):
    """Subspace attention: one softmax spatial map per channel group, applied as ``F * A + F``.

    Per subspace n of C/g channels: ``A_n = softmax_HW(PW(maxpool3x3(DW1x1(F_n))))`` (Eq. 1), a single map
    summing to 1 over the H W pixels; ``F^_n = A_n * F_n + F_n`` (Eq. 2); the subspaces are concatenated (Eq. 3).
    DW1x1 is a per-channel scale and bias; PW maps a subspace's C/g channels to one.

    Cost: O(N C) time and memory for N = H W (9 N C for the max-pool); 3C parameters (2C with ``norm_act``).
    Layout: (B, C, H, W). Paper: ULSAM (Saini et al., WACV 2020).

    Args:
        channels: C. num_splits: g (divides C). norm_act: the official code's BatchNorm + ReLU after DW and PW.

    Example::

        >>> ulsam = SubspaceAttention(64, num_splits=4)
        >>> y = ulsam(torch.randn(2, 64, 28, 28))
    """

    def __init__(self, channels: int, num_splits: int = 4, *, norm_act: bool = False):
        super().__init__()
        name = type(self).__name__
        self.channels = positive_int(name, "channels", channels)
        self.num_splits = positive_int(name, "num_splits", num_splits)
        if channels % num_splits:
            raise ParameterError(f"{name}: num_splits: expected a divisor of channels={channels}, got {num_splits}", argument="num_splits")
        self.norm_act = norm_act
        self.depthwise = nn.Conv2d(channels, channels, 1, groups=channels, bias=not norm_act)
        self.pointwise = nn.Conv2d(channels, num_splits, 1, groups=num_splits, bias=False)
        if norm_act:
            self.dw_post: nn.Module = nn.Sequential(nn.BatchNorm2d(channels, momentum=0.9), nn.ReLU())
            self.pw_post: nn.Module = nn.Sequential(nn.BatchNorm2d(num_splits, momentum=0.9), nn.ReLU())
        else:
            self.dw_post = self.pw_post = nn.Identity()

    def maps(self, x: Tensor) -> Tensor:
        """The attention maps A (B, g, H, W), each summing to 1 over H W (Eq. 1)."""
        b, _, h, w = x.shape
        s = self.pw_post(self.pointwise(max_pool3x3(self.dw_post(self.depthwise(x)))))
        return torch.softmax(s.flatten(2), dim=-1).view(b, self.num_splits, h, w)

    def forward(self, x: Tensor) -> Tensor:
        check_image(type(self).__name__, x, self.channels)
        b, c, h, w = x.shape
        a = self.maps(x).unsqueeze(2)  # (B, g, 1, H, W), shared by the subspace's channels
        f = x.view(b, self.num_splits, c // self.num_splits, h, w)
        return (f * a + f).view(b, c, h, w)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, num_splits={self.num_splits}, norm_act={self.norm_act}"
