"""Squeeze-excitation and coordinate attention fused by a learnable weight (the "balanced multi-task
attention" of "Balanced Multi-Task Attention for Satellite Image Classification", arXiv 2025; official code
``models/balanced_12layer.py``, ``BalancedMultiTaskAttention``).

    CA(X) = X (.) sigmoid(W_h a_h) (.) sigmoid(W_w a_w),   [a_h; a_w] = ReLU(BN(W_1 [mean_W X; mean_H X]))
            (coordinate attention, Hou et al. CVPR 2021, Eq. 4-8, with ReLU and reduction 8 as the official code)
    SE(X) = X (.) sigmoid(W_2 ReLU(W_1' GAP(X)))          (squeeze-excitation, Hu et al. CVPR 2018, Eq. 2-4; reduction 16)
    Y     = sigma(alpha) CA(X) + (1 - sigma(alpha)) SE(X),   alpha initialised to 0.5 (raw)

The paper reports "alpha ~ 0.57" after training: that is sigma(alpha) (the code's ``get_attention_weights``).
All convolutions are bias-free, as in the official code. The coordinate branch is timm's ``CoordAttn`` arithmetic
(``rd_channels=C//8, bias=False, act_layer=nn.ReLU``, BatchNorm, sigmoid) and the SE branch timm's ``SEModule``
(``rd_channels=C//16, bias=False``): :meth:`SECoordAttention.from_timm` copies a pair of them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ...errors import ParameterError
from .._checks import check_image, positive_int
from .._registry import ModuleExample, register_module

__all__ = ["SECoordAttention"]


class _CoordinateGate(nn.Module):
    """Coordinate attention's two gates (B, C, H, 1) and (B, C, 1, W) (Hou et al., Eq. 4-7)."""

    def __init__(self, channels: int, hidden: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, hidden, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(hidden)
        self.act = nn.ReLU()
        self.conv_h = nn.Conv2d(hidden, channels, 1, bias=False)
        self.conv_w = nn.Conv2d(hidden, channels, 1, bias=False)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h, w = x.shape[-2:]
        # both strips through one shared conv + BN: concatenate along the spatial axis (H + W positions)
        pooled = torch.cat([x.mean(dim=3, keepdim=True), x.mean(dim=2, keepdim=True).transpose(2, 3)], dim=2)
        y = self.act(self.bn1(self.conv1(pooled)))
        y_h, y_w = torch.split(y, [h, w], dim=2)
        return torch.sigmoid(self.conv_h(y_h)), torch.sigmoid(self.conv_w(y_w.transpose(2, 3)))


class _SqueezeExcitationGate(nn.Module):
    """Squeeze-excitation's channel gate (B, C, 1, 1) (Hu et al., Eq. 2-3), 1x1 convs without bias."""

    def __init__(self, channels: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, hidden, 1, bias=False)
        self.act = nn.ReLU()
        self.fc2 = nn.Conv2d(hidden, channels, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return torch.sigmoid(self.fc2(self.act(self.fc1(x.mean(dim=(2, 3), keepdim=True)))))


@register_module(
    "C5",
    paper="Balanced Multi-Task Attention for Satellite Image Classification (arXiv 2025)",
    layout="(B, C, H, W)",
    example=ModuleExample(dict(channels=64), inputs=[(1, 64, 56, 56)], test_inputs=[(2, 16, 8, 8)], test_kwargs=dict(channels=16)),
)
class SECoordAttention(nn.Module):
    """Coordinate attention and squeeze-excitation mixed by a learned weight: ``s CA(X) + (1 - s) SE(X)``, s = sigmoid(alpha).

    The coordinate branch pools rows and columns, mixes them with one shared 1x1 conv (C -> C/8) + BatchNorm +
    ReLU and gates X with ``sigmoid(W_h .) (B, C, H, 1)`` and ``sigmoid(W_w .) (B, C, 1, W)``; the SE branch gates
    X with ``sigmoid(W_2 ReLU(W_1 GAP(X)))`` (C -> C/16 -> C). ``alpha`` is a raw scalar, initialised to 0.5.

    Cost: O(N C) for N = H W plus O((H + W) C^2 / 8); about C^2 (3/8 + 1/8) parameters.
    Layout: (B, C, H, W). Paper: Balanced Multi-Task Attention (2025), after Coordinate Attention (Hou et al.,
    CVPR 2021) and SE (Hu et al., CVPR 2018). :meth:`from_timm` copies ``timm.layers.CoordAttn`` + ``SEModule``.

    Args:
        channels: C. ca_reduction: the coordinate branch's C / hidden (8). se_reduction: the SE branch's (16).
        alpha_init: the raw fusion weight's initial value (0.5, as the code).

    Example::

        >>> att = SECoordAttention(64)
        >>> y = att(torch.randn(2, 64, 32, 32))
        >>> share = att.fusion_weight()   # sigma(0.5) = 0.62 at init
    """

    def __init__(self, channels: int, ca_reduction: int = 8, se_reduction: int = 16, *, alpha_init: float = 0.5):
        super().__init__()
        name = type(self).__name__
        self.channels = positive_int(name, "channels", channels)
        positive_int(name, "ca_reduction", ca_reduction)
        positive_int(name, "se_reduction", se_reduction)
        self.coord = _CoordinateGate(channels, max(channels // ca_reduction, 1))
        self.se = _SqueezeExcitationGate(channels, max(channels // se_reduction, 1))
        self.alpha = nn.Parameter(torch.tensor(float(alpha_init)))

    def fusion_weight(self) -> Tensor:
        """sigma(alpha): the coordinate branch's share (the paper's reported "alpha")."""
        return torch.sigmoid(self.alpha)

    def coordinate_branch(self, x: Tensor) -> Tensor:
        a_h, a_w = self.coord(x)
        return x * a_h * a_w

    def se_branch(self, x: Tensor) -> Tensor:
        return x * self.se(x)

    def forward(self, x: Tensor) -> Tensor:
        check_image(type(self).__name__, x, self.channels)
        s = self.fusion_weight().to(x.dtype)
        return s * self.coordinate_branch(x) + (1 - s) * self.se_branch(x)

    @classmethod
    def from_timm(cls, coord: Any, se: Any, *, alpha: float = 0.5) -> "SECoordAttention":
        """Built from ``timm.layers.CoordAttn`` (ReLU act, BatchNorm, sigmoid, no bias, no skip) and
        ``timm.layers.SEModule`` (no bias, no norm, no max-pool, sigmoid); weights and BN state are copied."""
        name = f"{cls.__name__}.from_timm"
        if not isinstance(coord.act, nn.ReLU) or not isinstance(coord.bn1, nn.BatchNorm2d) or coord.conv1.bias is not None or coord.has_skip:
            raise ParameterError(f"{name}: coord: expected CoordAttn(act_layer=nn.ReLU, BatchNorm2d, bias=False, has_skip=False)", argument="coord")
        if se.fc1.bias is not None or se.add_maxpool or not isinstance(se.bn, nn.Identity):
            raise ParameterError(f"{name}: se: expected SEModule(bias=False) without norm or max-pool", argument="se")
        for gate, arg in ((coord.gate, "coord"), (se.gate, "se")):
            if type(gate).__name__ != "Sigmoid":  # nn.Sigmoid or timm's own Sigmoid
                raise ParameterError(f"{name}: {arg}: expected a sigmoid gate, got {gate}", argument=arg)
        channels, c_hidden, s_hidden = coord.conv1.in_channels, coord.conv1.out_channels, se.fc1.out_channels
        if se.fc1.in_channels != channels:
            raise ParameterError(f"{name}: se: expected {channels} channels as coord, got {se.fc1.in_channels}", argument="se")
        layer = cls(channels, alpha_init=alpha)
        layer.coord = _CoordinateGate(channels, c_hidden)
        layer.se = _SqueezeExcitationGate(channels, s_hidden)
        for mine, theirs in ((layer.coord.conv1, coord.conv1), (layer.coord.conv_h, coord.conv_h), (layer.coord.conv_w, coord.conv_w),
                             (layer.se.fc1, se.fc1), (layer.se.fc2, se.fc2)):
            mine.weight.data.copy_(theirs.weight.data)
        layer.coord.bn1.load_state_dict(coord.bn1.state_dict())
        layer.coord.bn1.eps, layer.coord.bn1.momentum = coord.bn1.eps, coord.bn1.momentum
        return layer.to(coord.conv1.weight.dtype)

    def extra_repr(self) -> str:
        return f"channels={self.channels}"
