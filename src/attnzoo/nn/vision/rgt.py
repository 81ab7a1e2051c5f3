"""RGT's recursive-generalization self-attention (Chen et al., "Recursive Generalization Transformer for Image
Super-Resolution", ICLR 2024: RG-SA), catalog M15.

Every query attends to a handful of representative tokens: the image is shrunk by a depth-wise
4x4 stride-4 convolution applied T times with shared weights (the recursion), then a depth-wise
3x3 and a point-wise conv to ``C_r = c_ratio * C`` channels, LayerNorm and GELU give the
representative map; queries (from the full image, ``C_r`` channels) cross-attend to it, and the
values get a convolutional position encoding. The arithmetic follows the official ``RG_SA`` of
``basicsr/archs/rgt_arch.py`` (zhengchen1999/RGT; read here through a verbatim third-party copy, as
the repository itself is not in the code index).
"""

from __future__ import annotations

from typing import Optional

import torch.nn.functional as F
from torch import Tensor, nn

from ...errors import ParameterError, ShapeError
from ...functional import softmax_attention
from .._checks import heads_divide, merge_heads, positive_int, split_heads
from .._registry import ModuleExample, register_module
from ._grid_ops import check_grid

__all__ = ["RecursiveGeneralizationAttention"]


def _floor_log4(n: int) -> int:
    """The largest t with 4^t <= n (n >= 1): ``int(math.log(n, 4))`` without its rounding slips."""
    t = 0
    while 4 ** (t + 1) <= n:
        t += 1
    return t


@register_module(
    "M15",
    paper="Recursive Generalization Transformer for Image Super-Resolution (Chen et al., ICLR 2024)",
    layout="(B, H, W, C)",
    example=ModuleExample(
        dict(dim=96, num_heads=4, c_ratio=0.5),
        inputs=[(1, 64, 64, 96)],
        test_inputs=[(2, 16, 16, 16)],
        test_kwargs=dict(dim=16, num_heads=2),
    ),
)
class RecursiveGeneralizationAttention(nn.Module):
    """Recursive-generalization self-attention (RG-SA): cross-attention from every token to a recursively pooled map.

    With ``C_r = int(c_ratio C)`` and ``T`` recursions (the paper's RG-SA equations)::

        x_T = RGM(x):  x_0 = x,  x_{t+1} = DWConv_{4x4, stride 4}(x_t)   (one shared conv, T times)
                       x_T = GELU(LN(Conv1x1_{C -> C_r}(DWConv3x3(x_T))))     (N' = N / 16^T tokens)
        Q = x W_q (C -> C_r),  K = x_T W_k (C_r -> C_r),  V = x_T W_v (C_r -> C)
        V <- V + DWConv3x3(V)                       (the CPE, on the N' grid)
        y = softmax(Q K^T * s) V W_o,   s = (d c_ratio)^-1/2  with d = C / h

    ``recursions=None`` takes T from the official rule, which differs between modes: in training
    ``T = max(floor(log4(H / 4)), floor(log4(W / 4)))`` (keys about 4 x 4), in evaluation
    ``T = max(2, floor(log4(H / 16)), floor(log4(W / 16)))`` (keys about 16 x 16 smaller, never fewer
    than two recursions). An int fixes T in both modes. ``floor(log4)`` is computed exactly here
    (the official ``int(math.log(n, 4))`` can slip by one on float rounding).

    Cost: O(N (N / 16^T) C) for the attention, O(N C C_r) projections, O(N C) for the recursion.
    Layout: ``(B, H, W, C)`` in and out; H and W at least 4^T (16 in evaluation with the default rule).

    Args:
        dim: C. num_heads: h (divides C and C_r). c_ratio: C_r / C. qkv_bias: bias of W_q, W_k, W_v
        (off, as the official default). qk_scale: overrides s. recursions: a fixed T, or None (official rule).
        backend: passed to :func:`attnzoo.softmax_attention`.

    Example::

        >>> attn = RecursiveGeneralizationAttention(64, num_heads=4)
        >>> y = attn(torch.randn(2, 64, 64, 64))
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        c_ratio: float = 0.5,
        qkv_bias: bool = False,
        qk_scale: Optional[float] = None,
        recursions: Optional[int] = None,
        backend: Optional[str] = None,
    ):
        super().__init__()
        name = type(self).__name__
        positive_int(name, "dim", dim)
        head_dim = heads_divide(name, dim, num_heads)
        if isinstance(c_ratio, bool) or not isinstance(c_ratio, (int, float)) or not 0 < c_ratio:
            raise ParameterError(f"{name}: c_ratio: expected a positive float, got {c_ratio!r}", argument="c_ratio")
        reduced = int(dim * c_ratio)
        if reduced < num_heads or reduced % num_heads:
            raise ParameterError(
                f"{name}: c_ratio: expected num_heads={num_heads} to divide int(c_ratio * dim)={reduced}", argument="c_ratio"
            )
        if recursions is not None and (isinstance(recursions, bool) or not isinstance(recursions, int) or recursions < 0):
            raise ParameterError(f"{name}: recursions: expected None or an int >= 0, got {recursions!r}", argument="recursions")
        self.dim, self.num_heads, self.c_ratio, self.reduced, self.recursions = dim, num_heads, c_ratio, reduced, recursions
        self.scale = qk_scale or (head_dim * c_ratio) ** -0.5
        self.backend = backend
        self.reduction = nn.Conv2d(dim, dim, 4, stride=4, groups=dim)
        self.dwconv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.conv = nn.Conv2d(dim, reduced, 1)
        self.norm = nn.LayerNorm(reduced)
        self.q = nn.Linear(dim, reduced, bias=qkv_bias)
        self.k = nn.Linear(reduced, reduced, bias=qkv_bias)
        self.v = nn.Linear(reduced, dim, bias=qkv_bias)
        self.cpe = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.proj = nn.Linear(dim, dim)

    def recursion_count(self, h: int, w: int) -> int:
        """T for an H x W input in the current mode (see the class docstring)."""
        if self.recursions is not None:
            return self.recursions
        if self.training:
            return max(_floor_log4(max(h // 4, 1)), _floor_log4(max(w // 4, 1)))
        return max(2, _floor_log4(max(h // 16, 1)), _floor_log4(max(w // 16, 1)))

    def forward(self, x: Tensor) -> Tensor:
        """``x`` (B, H, W, C) -> (B, H, W, C)."""
        name = type(self).__name__
        check_grid(name, x, self.dim)
        b, h, w, c = x.shape
        t = self.recursion_count(h, w)
        if min(h, w) < 4 ** t:
            raise ShapeError(
                f"{name}: x: expected H and W of at least 4^T = {4 ** t} ({t} recursions in "
                f"{'training' if self.training else 'evaluation'}), got shape {tuple(x.shape)}",
                argument="x",
            )
        rep = x.permute(0, 3, 1, 2)
        for _ in range(t):
            rep = self.reduction(rep)
        hr, wr = rep.shape[-2:]
        rep = self.conv(self.dwconv(rep)).flatten(2).transpose(1, 2)  # (B, N', C_r)
        rep = F.gelu(self.norm(rep))
        q = split_heads(self.q(x.reshape(b, h * w, c)), self.num_heads)
        k = split_heads(self.k(rep), self.num_heads)
        v = self.v(rep)  # (B, N', C)
        v = v + self.cpe(v.transpose(1, 2).reshape(b, c, hr, wr)).flatten(2).transpose(1, 2)
        out = softmax_attention(q, k, split_heads(v, self.num_heads), scale=self.scale, backend=self.backend)
        return self.proj(merge_heads(out)).reshape(b, h, w, c)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, reduced={self.reduced}, recursions={self.recursions}"
