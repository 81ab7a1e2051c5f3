"""Efficient channel attention (Wang et al., "ECA-Net: Efficient Channel Attention for Deep
Convolutional Neural Networks", CVPR 2020, Sec. 3.2).

    y = GAP(X) in R^C,   w = sigmoid(C1D_k(y)),   Y = w (.) X                 (Eq. 7)
    k = psi(C) = | log2(C) / gamma + b / gamma |_odd,   gamma = 2, b = 1       (Eq. 12)

``|t|_odd`` is computed as the authors' released code does (and timm): ``t = int(|(log2 C + b) / gamma|)``,
then ``t + 1`` if ``t`` is even. timm's ``EcaModule`` then clamps ``k >= 3``; the paper does not, so the
two differ for C < 8 (paper k = 1, timm k = 3). :meth:`EfficientChannelAttention.from_timm` copies
timm's kernel size, so it matches timm at any C.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import Tensor, nn

from ...errors import ParameterError
from .._checks import check_image, odd_kernel, positive_int
from .._registry import ModuleExample, register_module

__all__ = ["EfficientChannelAttention", "eca_kernel_size"]


def eca_kernel_size(channels: int, gamma: float = 2.0, b: float = 1.0) -> int:
    """The paper's adaptive kernel size psi(C) (Eq. 12): the odd number from ``|(log2 C + b) / gamma|``.

    Examples: C = 4 -> 1, 16 -> 3, 64 -> 3, 256 -> 5, 2048 -> 7 (timm clamps the first to 3).
    """
    positive_int("eca_kernel_size", "channels", channels)
    if gamma <= 0:
        raise ParameterError(f"eca_kernel_size: gamma: expected > 0, got {gamma!r}", argument="gamma")
    t = int(abs((math.log2(channels) + b) / gamma))
    return t if t % 2 else t + 1


@register_module(
    "C1",
    paper="ECA-Net (Wang et al., CVPR 2020)",
    layout="(B, C, H, W)",
    example=ModuleExample(dict(channels=64), inputs=[(1, 64, 56, 56)], test_inputs=[(2, 16, 8, 8)], test_kwargs=dict(channels=16)),
)
class EfficientChannelAttention(nn.Module):
    """Efficient channel attention: a k-tap 1D convolution across the pooled channels gates each channel.

    ``w = sigmoid(C1D_k(GAP(X)))``, ``Y = w (.) X`` (Eq. 7), with the adaptive ``k = |log2(C)/gamma + b/gamma|_odd``
    (Eq. 12) unless ``kernel_size`` is given. The convolution has no bias and zero padding (k parameters).

    Cost: O(N C) for N = H W pixels (the pooling and the gate), plus O(k C); k parameters.
    Layout: (B, C, H, W). Paper: ECA-Net (Wang et al., CVPR 2020). timm counterpart: ``timm.layers.EcaModule``
    (clamps k >= 3; :meth:`from_timm` copies its kernel).

    Args:
        channels: C. kernel_size: an odd k (default: the paper's psi(C)). gamma, b: psi's constants.

    Example::

        >>> eca = EfficientChannelAttention(256)   # k = 5
        >>> y = eca(torch.randn(2, 256, 14, 14))
    """

    def __init__(self, channels: int, kernel_size: Optional[int] = None, *, gamma: float = 2.0, b: float = 1.0):
        super().__init__()
        self.channels = positive_int(type(self).__name__, "channels", channels)
        k = odd_kernel(type(self).__name__, kernel_size)
        self.kernel_size = k if k is not None else eca_kernel_size(channels, gamma, b)
        self.conv = nn.Conv1d(1, 1, self.kernel_size, padding=(self.kernel_size - 1) // 2, bias=False)

    def gate(self, x: Tensor) -> Tensor:
        """The channel weights w (B, C) in (0, 1)."""
        y = x.mean(dim=(2, 3)).unsqueeze(1)  # (B, 1, C): channels are the conv's length axis
        return torch.sigmoid(self.conv(y)).squeeze(1)

    def forward(self, x: Tensor) -> Tensor:
        check_image(type(self).__name__, x, self.channels)
        return x * self.gate(x)[:, :, None, None]

    @classmethod
    def from_timm(cls, module: Any, channels: int) -> "EfficientChannelAttention":
        """A copy of ``timm.layers.EcaModule`` (its kernel size, timm's k >= 3 clamp included, and its weight).

        Only the paper's form is accepted: no ``use_mlp`` and a sigmoid gate. ``channels`` is C (timm's
        module does not store it; it is used to check inputs).
        """
        name = f"{cls.__name__}.from_timm"
        if getattr(module, "conv2", None) is not None:
            raise ParameterError(f"{name}: module: timm's use_mlp=True is not ECA", argument="module")
        if type(module.gate).__name__ != "Sigmoid":  # nn.Sigmoid or timm.layers.activations.Sigmoid
            raise ParameterError(f"{name}: module: expected a sigmoid gate, got {module.gate}", argument="module")
        layer = cls(channels, kernel_size=module.conv.kernel_size[0])
        layer.conv.weight.data.copy_(module.conv.weight.data)
        return layer

    def extra_repr(self) -> str:
        return f"channels={self.channels}, kernel_size={self.kernel_size}"
