"""FcaFormer's forward cross attention (Zhang et al., "FcaFormer: Forward Cross Attention in Hybrid Vision
Transformer", ICCV 2023), catalog M15.

A block attends to its own tokens and, in the same softmax, to "cross tokens" carried forward from
the earlier blocks of its stage: each earlier block's output was shrunk by a 7x7 stride-4
depth-wise conv (the token merge and enhancement, TME), and here those tokens are rescaled by
learnable per-token scale factors (LSFs) and layer-normalised before the block's own qkv
projection. The arithmetic follows the official ``image_classification/models/fcaformer.py``
(``FcaBlock``'s token mixer; its pre-norm, layer scale, local conv and MLP belong to the block).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from ...errors import ParameterError, ShapeError
from ...functional import softmax_attention
from .._checks import heads_divide, merge_heads, positive_int, split_heads
from .._registry import ModuleExample, register_module
from ._grid_ops import check_grid

__all__ = ["ForwardCrossAttention"]


def _abs_offset_index(h: int, w: int) -> Tensor:
    """LeViT's (N, N) index of |dy| W + |dx|: the official table's first-seen order of (|dy|, |dx|)."""
    ys = torch.arange(h).repeat_interleave(w)
    xs = torch.arange(w).repeat(h)
    return (ys[:, None] - ys[None, :]).abs() * w + (xs[:, None] - xs[None, :]).abs()


@register_module(
    "M15",
    paper="FcaFormer: Forward Cross Attention in Hybrid Vision Transformer (Zhang et al., ICCV 2023)",
    layout="(B, H, W, C)",
    example=ModuleExample(
        dict(dim=192, num_heads=12, resolution=(14, 14), cross_tokens=2 * 16),
        inputs=[(1, 14, 14, 192), (1, 32, 192)],
        test_inputs=[(2, 8, 8, 16), (2, 8, 16)],
        test_kwargs=dict(dim=16, num_heads=2, resolution=(8, 8), cross_tokens=8),
    ),
)
class ForwardCrossAttention(nn.Module):
    """Forward cross attention: self-attention whose keys also include cross tokens from earlier blocks.

    With cross tokens ``s`` (M of them: ``ceil(H/4) ceil(W/4)`` per earlier block, at most
    ``cab_max_d`` blocks) and ``[q, k, v] = x W_qkv`` (the paper's Fca equations; the official
    ``FcaBlock``)::

        s~ = LN_s(s * lambda)                       lambda: one learnable scale per cross token (LSF), init 1
        [., k_s, v_s] = s~ W_qkv                    the block's own qkv projection
        logits = [q k^T / sqrt(d) + B_x[|dy|, |dx|],  q k_s^T / sqrt(d) + b_s]    one softmax over N + M keys
        y = softmax(logits) [v; v_s] W_proj

    ``B_x`` is LeViT's per-head bias over absolute offsets (table of H W entries, zero init) and
    ``b_s`` a per-head, per-cross-token bias (zero init). With no cross tokens (``cross_tokens=0``,
    the first block of a stage) the layer is that biased self-attention alone.
    :meth:`merge_tokens` is the TME that turns this block's output into the next blocks' cross
    tokens (a bias-free 7x7 stride-4 depth-wise conv; built when ``emit_tokens=True``).

    Cost: O(N (N + M) C) for the attention, O((N + M) C^2) for the projections.
    Layout: ``x`` (B, H, W, C) at the fixed ``resolution`` (the bias table's), ``cross`` (B, M, C);
    the output is (B, H, W, C).

    Args:
        dim: C. num_heads: h. resolution: (H, W). cross_tokens: M (0 for none).
        qkv_bias: bias of the qkv projection. qk_scale: overrides d^-1/2. emit_tokens: build the TME conv.
        backend: passed to :func:`attnzoo.softmax_attention`.

    Example::

        >>> fca = ForwardCrossAttention(192, num_heads=12, resolution=(14, 14), cross_tokens=32)
        >>> y = fca(torch.randn(2, 14, 14, 192), torch.randn(2, 32, 192))
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        resolution: tuple[int, int],
        cross_tokens: int = 0,
        qkv_bias: bool = True,
        qk_scale: Optional[float] = None,
        emit_tokens: bool = False,
        backend: Optional[str] = None,
    ):
        super().__init__()
        name = type(self).__name__
        positive_int(name, "dim", dim)
        head_dim = heads_divide(name, dim, num_heads)
        if not (isinstance(resolution, (tuple, list)) and len(resolution) == 2):
            raise ParameterError(f"{name}: resolution: expected (H, W), got {resolution!r}", argument="resolution")
        h, w = (positive_int(name, "resolution", r) for r in resolution)
        if isinstance(cross_tokens, bool) or not isinstance(cross_tokens, int) or cross_tokens < 0:
            raise ParameterError(f"{name}: cross_tokens: expected an int >= 0, got {cross_tokens!r}", argument="cross_tokens")
        self.dim, self.num_heads, self.resolution, self.cross_tokens = dim, num_heads, (h, w), cross_tokens
        self.scale = qk_scale or head_dim ** -0.5
        self.backend = backend
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, h * w))
        self.register_buffer("attention_bias_idxs", _abs_offset_index(h, w), persistent=False)
        if cross_tokens:
            self.s_scale_factors = nn.Parameter(torch.ones(1, cross_tokens, 1))
            self.s_norm = nn.LayerNorm(dim)
            self.s_token_bias = nn.Parameter(torch.zeros(1, num_heads, 1, cross_tokens))
        self.dw_conv = nn.Conv2d(dim, dim, 7, stride=4, padding=3, groups=dim, bias=False) if emit_tokens else None

    @property
    def tokens_per_block(self) -> int:
        """Cross tokens one block emits: ceil(H / 4) ceil(W / 4)."""
        return math.ceil(self.resolution[0] / 4) * math.ceil(self.resolution[1] / 4)

    def merge_tokens(self, y: Tensor) -> Tensor:
        """The TME: this block's output (B, H, W, C) -> its cross tokens (B, ceil(H/4) ceil(W/4), C)."""
        if self.dw_conv is None:
            raise ParameterError(f"{type(self).__name__}: merge_tokens: build the layer with emit_tokens=True", argument="emit_tokens")
        check_grid(type(self).__name__, y, self.dim)
        return self.dw_conv(y.permute(0, 3, 1, 2)).flatten(2).transpose(1, 2)

    def forward(self, x: Tensor, cross: Optional[Tensor] = None) -> Tensor:
        """``x`` (B, H, W, C) and ``cross`` (B, M, C) (None when ``cross_tokens == 0``) -> (B, H, W, C)."""
        name = type(self).__name__
        check_grid(name, x, self.dim)
        b, h, w, c = x.shape
        if (h, w) != self.resolution:
            raise ShapeError(f"{name}: x: expected (B, {self.resolution[0]}, {self.resolution[1]}, C), got shape {tuple(x.shape)}", argument="x")
        n = h * w
        q, k, v = (split_heads(t, self.num_heads) for t in self.qkv(x.reshape(b, n, c)).chunk(3, dim=-1))
        bias = self.attention_biases[:, self.attention_bias_idxs].unsqueeze(0)  # (1, h, N, N)
        if self.cross_tokens:
            if cross is None or cross.dim() != 3 or cross.shape != (b, self.cross_tokens, c):
                got = None if cross is None else tuple(cross.shape)
                raise ShapeError(f"{name}: cross: expected (B={b}, M={self.cross_tokens}, C={c}), got shape {got}", argument="cross")
            s = self.s_norm(cross * self.s_scale_factors)
            _, k_s, v_s = (split_heads(t, self.num_heads) for t in self.qkv(s).chunk(3, dim=-1))
            k, v = torch.cat([k, k_s], dim=2), torch.cat([v, v_s], dim=2)
            bias = torch.cat([bias, self.s_token_bias.expand(1, -1, n, -1)], dim=-1)
        elif cross is not None:
            raise ShapeError(f"{name}: cross: expected None (built with cross_tokens=0), got shape {tuple(cross.shape)}", argument="cross")
        out = softmax_attention(q, k, v, bias=bias.to(q.dtype), scale=self.scale, backend=self.backend)
        return self.proj(merge_heads(out)).reshape(b, h, w, c)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, resolution={self.resolution}, cross_tokens={self.cross_tokens}"

