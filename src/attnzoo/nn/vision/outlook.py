"""VOLO's outlook attention (catalog M4).

Yuan et al., "VOLO: Vision Outlooker for Visual Recognition", TPAMI 2022 (arXiv 2106.13112),
Sec. 3.1 "Outlook attention". Around each location (i, j) of a K x K neighbourhood, the
attention weights are not dot products but read off the centre token by a linear layer::

    A_ij     = Linear(X_ij) in R^{K^2 x K^2}  (per head)              outlook weights
    V_D(i,j) = { V[i + p - K//2, j + q - K//2] : 0 <= p, q < K }      the value window
    Y_D(i,j) = Softmax(A_ij) V_D(i,j)                                  K^2 outputs per window
    Y_ij     = sum of Y_D(i',j') over every window (i', j') that covers (i, j)   (dense aggregation, "fold")

With ``stride`` s > 1 the weights are predicted from s x s average-pooled tokens and the windows
sit every s pixels (the official code's and timm's reading; VOLO's first stage uses K = 3, s = 2).
"""

from __future__ import annotations

import copy
import math
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...errors import ParameterError, ShapeError
from .._checks import heads_divide, positive_int
from .._registry import ModuleExample, register_module
from ._grid_ops import check_grid

__all__ = ["OutlookAttention"]


@register_module(
    "M4",
    paper="VOLO: Vision Outlooker for Visual Recognition (Yuan et al., TPAMI 2022)",
    layout="(B, H, W, C)",
    example=ModuleExample(
        dict(dim=192, num_heads=6, kernel_size=3, stride=2),
        inputs=[(1, 28, 28, 192)],
        test_inputs=[(2, 7, 6, 16)],
        test_kwargs=dict(dim=16, num_heads=2),
    ),
)
class OutlookAttention(nn.Module):
    """VOLO outlook attention over (B, H, W, C): each location weighs its K x K neighbourhood by
    weights a linear layer reads off the location itself, and the windows' outputs are summed back.

    For the window at (i, j) (every ``stride`` pixels), per head of d = C / heads channels::

        Y_D(i, j) = Softmax(A_ij * d^-1/2) V_D(i, j),   A_ij = attn(AvgPool_s(X)_ij) reshaped (K^2, K^2)

    with V = ``v``(X) and V_D(i, j) its K x K window (zeros beyond the border, ``padding`` each side);
    every output pixel sums the rows of the windows that cover it (fold), then ``proj``. The
    scale d^-1/2 on the linear logits follows the official code and timm.

    Cost: for N = H * W tokens and L = N / s^2 windows, O(L * K^4 * C) for the weighted sums,
    O(L * C * K^4 * heads) for the weight projection and O(N * C^2) for ``v``/``proj``: linear
    in N, no N x N map.

    Args:
        dim: channels C. num_heads: heads (dividing C). kernel_size: K. padding: zero padding of
            the value windows (default K // 2). stride: s. qkv_bias: bias of the value projection.

    ``forward(x)``: x (B, H, W, C) -> (B, H, W, C). The window count per axis,
    ``(H + 2 padding - K) // stride + 1``, must equal ``ceil(H / stride)`` (true for K = 2 padding + 1).

    Example::

        >>> layer = OutlookAttention(192, num_heads=6, kernel_size=3, stride=2)
        >>> y = layer(torch.randn(2, 28, 28, 192))
    """

    def __init__(self, dim: int, num_heads: int, kernel_size: int = 3, padding: Optional[int] = None, stride: int = 1, *, qkv_bias: bool = False):
        super().__init__()
        name = type(self).__name__
        self.dim = positive_int(name, "dim", dim)
        heads_divide(name, dim, num_heads)
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.kernel_size = positive_int(name, "kernel_size", kernel_size)
        self.stride = positive_int(name, "stride", stride)
        padding = kernel_size // 2 if padding is None else padding
        if isinstance(padding, bool) or not isinstance(padding, int) or not 0 <= padding < kernel_size:
            raise ParameterError(f"{name}: padding: expected an int in [0, kernel_size={kernel_size}), got {padding!r}", argument="padding")
        self.padding = padding
        self.scale = self.head_dim**-0.5
        self.v = nn.Linear(dim, dim, bias=qkv_bias)
        self.attn = nn.Linear(dim, kernel_size**4 * num_heads)
        self.proj = nn.Linear(dim, dim)

    def outlook_weights(self, x: Tensor) -> Tensor:
        """Softmax(A * scale): (B, heads, L, K^2, K^2) for the L windows, rows = output position, columns = value position."""
        b = x.shape[0]
        kk = self.kernel_size**2
        if self.stride > 1:  # average over s x s cells (partial cells at the far borders average what they hold)
            x = F.avg_pool2d(x.permute(0, 3, 1, 2), self.stride, self.stride, ceil_mode=True).permute(0, 2, 3, 1)
        logits = self.attn(x).view(b, -1, self.num_heads, kk, kk).transpose(1, 2)
        return torch.softmax(logits * self.scale, dim=-1)

    def forward(self, x: Tensor) -> Tensor:
        name = type(self).__name__
        check_grid(name, x, self.dim)
        b, h, w, c = x.shape
        k, p, s = self.kernel_size, self.padding, self.stride
        for axis, size in (("H", h), ("W", w)):
            if size + 2 * p < k or (size + 2 * p - k) // s + 1 != math.ceil(size / s):
                raise ShapeError(
                    f"{name}: x: expected {axis} with (size + 2*padding - kernel_size) // stride + 1 == ceil(size / stride) "
                    f"(kernel_size={k}, padding={p}, stride={s}), got shape {tuple(x.shape)}",
                    argument="x",
                )
        # value windows: unfold gives (B, C * K^2, L) with channel-major rows
        vw = F.unfold(self.v(x).permute(0, 3, 1, 2), k, padding=p, stride=s)
        vw = vw.view(b, self.num_heads, self.head_dim, k * k, -1)  # (B, heads, d, K^2, L)
        weights = self.outlook_weights(x)  # (B, heads, L, K^2, K^2)
        yw = torch.einsum("bhlmn,bhdnl->bhdml", weights, vw).reshape(b, c * k * k, -1)
        y = F.fold(yw, (h, w), k, padding=p, stride=s)  # each pixel sums the windows over it
        return self.proj(y.permute(0, 2, 3, 1))

    @classmethod
    def from_timm(cls, module: Any) -> "OutlookAttention":
        """A copy of ``timm.models.volo.OutlookAttention`` (weights, kernel, padding, stride; dropout not carried)."""
        if not all(hasattr(module, a) for a in ("v", "attn", "proj", "kernel_size", "padding", "stride", "num_heads")):
            raise ParameterError(f"{cls.__name__}.from_timm: module: expected timm's OutlookAttention, got {type(module).__name__}", argument="module")
        layer = cls(
            module.v.in_features, module.num_heads, module.kernel_size, module.padding, module.stride, qkv_bias=module.v.bias is not None
        )
        layer.v, layer.attn, layer.proj = copy.deepcopy(module.v), copy.deepcopy(module.attn), copy.deepcopy(module.proj)
        layer.scale = module.scale
        return layer

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, kernel_size={self.kernel_size}, padding={self.padding}, stride={self.stride}"
