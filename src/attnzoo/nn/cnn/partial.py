"""Partial channel and spatial attention (Partial Visual ATtention, PAT: "Partial Convolution Meets Visual
Attention", arXiv 2024, renamed "Partial Channel Network: Compute Fewer, Perform Better"; official code
``haiduo/PartialNet``, ``models/partialnet.py``).

PATConv splits the channels: a part goes through a cheap operator, the rest through attention, and the parts
are concatenated (no channel is left untouched, unlike FasterNet's PConv).

PAT_ch (``Partial_conv3(channel_type='se')``), split C = C_p + C_u with C_p = C / n_div:

    Y_p = Conv3x3(X_p)
    g   = hardsigmoid( W [mean_HW X_u ; std_HW X_u] )       ("enhanced Gaussian channel attention": a (1, 2)
                                                             conv over each channel's mean and std, C_u -> C_u)
    Y_u = BN(g (.) X_u),   Y = [Y_p ; Y_u]

PAT_sp (``partial_spatial_attn_layer_reverse``, the last layer of the MLP), split C = C_a + C_c, C_c = partial C:

    Y_a = BN(X_a (.) hardsigmoid(W_s X_a))                    (W_s: 1x1 conv C_a -> 1, one spatial map)
    Y_c = W_c BN(X_c),   Y = [Y_a ; Y_c]                       (W_c: 1x1 conv)

Implemented: PAT_ch and PAT_sp. Not implemented: PAT_sf (self-attention with iRPE on the untouched part, the
last stage's block) and DPConv (learned split ratios). The std is the unbiased one (``torch.std``), as the code;
the (1, 2) conv mixes all C_u channels (the code's ``nn.Conv2d(c, c, (1, 2))``, not SRM's per-channel form).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...errors import ParameterError
from .._checks import check_image, positive_int
from .._registry import ModuleExample, register_module

__all__ = ["PartialChannelAttention", "PartialSpatialAttention"]

_PAPER = "Partial Convolution Meets Visual Attention (PATNet / PartialNet, arXiv 2024)"


@register_module(
    "C8",
    paper=_PAPER,
    layout="(B, C, H, W)",
    example=ModuleExample(dict(channels=64), inputs=[(1, 64, 56, 56)], test_inputs=[(2, 16, 8, 8)], test_kwargs=dict(channels=16)),
)
class PartialChannelAttention(nn.Module):
    """PAT_ch: a 3x3 conv on C / n_div channels, a mean+std channel gate and BatchNorm on the rest.

    ``Y = [Conv3x3(X_p) ; BN(hardsigmoid(W [mean X_u ; std X_u]) * X_u)]`` with W a (1, 2) conv over the
    per-channel (mean, std) pair that mixes the C_u channels (the official ``Partial_conv3`` with ``'se'``).

    Cost: O(N C_p^2 9) + O(N C_u) + O(C_u^2) for N = H W; 9 C_p^2 + 2 C_u^2 + 2 C_u parameters.
    Layout: (B, C, H, W). Paper: PATNet (Partial Convolution Meets Visual Attention, 2024).

    Args:
        channels: C. n_div: C_p = C // n_div channels get the 3x3 conv (4, the PartialNet default).

    Example::

        >>> pat = PartialChannelAttention(64)
        >>> y = pat(torch.randn(2, 64, 28, 28))
    """

    def __init__(self, channels: int, n_div: int = 4):
        super().__init__()
        name = type(self).__name__
        self.channels = positive_int(name, "channels", channels)
        positive_int(name, "n_div", n_div)
        self.conv_channels = channels // n_div
        self.gate_channels = channels - self.conv_channels
        if self.conv_channels < 1 or self.gate_channels < 1:
            raise ParameterError(f"{name}: n_div: expected 1 < n_div <= channels={channels}, got {n_div}", argument="n_div")
        self.conv = nn.Conv2d(self.conv_channels, self.conv_channels, 3, padding=1, bias=False)
        self.stats = nn.Conv2d(self.gate_channels, self.gate_channels, (1, 2), bias=False)
        self.norm = nn.BatchNorm2d(self.gate_channels)

    def channel_gate(self, xu: Tensor) -> Tensor:
        """g (B, C_u, 1, 1) in [0, 1]: hardsigmoid of the (1, 2) conv over (mean, std)."""
        flat = xu.flatten(2)
        u = torch.stack([flat.mean(dim=-1), flat.std(dim=-1)], dim=-1).unsqueeze(2)  # (B, C_u, 1, 2)
        return F.hardsigmoid(self.stats(u))

    def forward(self, x: Tensor) -> Tensor:
        check_image(type(self).__name__, x, self.channels)
        xp, xu = torch.split(x, [self.conv_channels, self.gate_channels], dim=1)
        return torch.cat([self.conv(xp), self.norm(xu * self.channel_gate(xu))], dim=1)


@register_module(
    "C8",
    paper=_PAPER,
    layout="(B, C, H, W)",
    example=ModuleExample(dict(channels=64), inputs=[(1, 64, 56, 56)], test_inputs=[(2, 16, 8, 8)], test_kwargs=dict(channels=16)),
)
class PartialSpatialAttention(nn.Module):
    """PAT_sp: a hard-sigmoid spatial map gates part of the channels; a 1x1 conv mixes the rest.

    ``Y = [BN(X_a * hardsigmoid(W_s X_a)) ; W_c BN(X_c)]`` with W_s a 1x1 conv to one map and W_c a 1x1 conv
    on the last ``partial * C`` channels (the official ``partial_spatial_attn_layer_reverse(dim, 1)``, which
    PATNet puts at the end of its MLP).

    Cost: O(N C) + O(N C_c^2) for N = H W; C_a + C_c^2 + 2 C parameters.
    Layout: (B, C, H, W). Paper: PATNet (Partial Convolution Meets Visual Attention, 2024).

    Args:
        channels: C. partial: the share of channels that get the 1x1 conv (0.5).

    Example::

        >>> pat = PartialSpatialAttention(64)
        >>> y = pat(torch.randn(2, 64, 28, 28))
    """

    def __init__(self, channels: int, partial: float = 0.5):
        super().__init__()
        name = type(self).__name__
        self.channels = positive_int(name, "channels", channels)
        self.conv_channels = int(partial * channels)
        self.attn_channels = channels - self.conv_channels
        if not 0 < partial < 1 or self.conv_channels < 1 or self.attn_channels < 1:
            raise ParameterError(f"{name}: partial: expected a share in (0, 1) leaving both parts non-empty, got {partial!r}", argument="partial")
        self.attn = nn.Conv2d(self.attn_channels, 1, 1, bias=False)
        self.norm_attn = nn.BatchNorm2d(self.attn_channels)
        self.norm_conv = nn.BatchNorm2d(self.conv_channels)
        self.conv = nn.Conv2d(self.conv_channels, self.conv_channels, 1, bias=False)

    def spatial_gate(self, xa: Tensor) -> Tensor:
        """The map (B, 1, H, W) in [0, 1]."""
        return F.hardsigmoid(self.attn(xa))

    def forward(self, x: Tensor) -> Tensor:
        check_image(type(self).__name__, x, self.channels)
        xa, xc = torch.split(x, [self.attn_channels, self.conv_channels], dim=1)
        return torch.cat([self.norm_attn(xa * self.spatial_gate(xa)), self.conv(self.norm_conv(xc))], dim=1)
