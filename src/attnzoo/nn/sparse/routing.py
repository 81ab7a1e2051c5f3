"""BiFormer's bi-level routing attention block (catalog S3) around :func:`attnzoo.bilevel_routing_attention`.

Zhu et al., "BiFormer: Vision Transformer with Bi-Level Routing Attention" (CVPR 2023), Sec. 3.2: a
qkv projection, region-to-region routing and token attention over the routed regions (the
functional form), plus the local context enhancement ``LCE(V)``, a depthwise convolution of V
added to the attention output (Eq. 5), then the output projection. Tokens are channels-last,
``(B, H, W, C)``.

Differences from the official ``BiLevelRoutingAttention`` (said, not hidden): the scale is per head
(``head_dim ** -0.5``) unless ``biformer_scale=True`` (its ``qk_dim ** -0.5`` over all heads);
maps whose sides are not multiples of ``n_win`` are zero-padded like its ``auto_pad``, but the pad
tokens are *masked* (excluded from the region means and from attention) where BiFormer attends
them; routing ties go to the lowest region index (BiFormer: ``torch.topk``'s order).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from ...errors import ShapeError
from ...functional.sparse import bilevel_routing_attention
from .._checks import heads_divide, odd_kernel, positive_int
from .._registry import ModuleExample, register_module

__all__ = ["BiLevelRoutingAttention"]


@register_module(
    "S3",
    "M13",
    paper="BiFormer: Vision Transformer with Bi-Level Routing Attention (Zhu et al., CVPR 2023)",
    layout="(B, H, W, C)",
    # bench: BiFormer-T's first stage (64 channels, 2 heads, 7 x 7 regions of a 56 x 56 map); topk 4 (its second stage's)
    example=ModuleExample(
        dict(dim=64, num_heads=2, n_win=7, topk=4), inputs=[(1, 56, 56, 64)], test_inputs=[(2, 8, 8, 16)],
        test_kwargs=dict(dim=16, num_heads=2, n_win=2, topk=2, side_dwconv=3),
    ),
)
class BiLevelRoutingAttention(nn.Module):
    """qkv projection, bi-level routing attention per head, ``+ LCE(V)``, output projection.

    Args:
        dim: channels C. num_heads: heads (a divisor of C). n_win: regions per side (BiFormer: 7).
        topk: routed regions per region (BiFormer's stages: 1, 4, 16, ...).
        side_dwconv: the LCE's depthwise kernel (odd; BiFormer's models use 5; None: no LCE).
        biformer_scale: BiFormer's ``dim ** -0.5`` instead of the per-head ``head_dim ** -0.5``.
        backend: passed to the functional form.

    Example::

        >>> block = BiLevelRoutingAttention(dim=64, num_heads=4, n_win=7, topk=4)
        >>> y = block(torch.randn(2, 56, 56, 64))  # (B, H, W, C)
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        n_win: int = 7,
        topk: int = 4,
        side_dwconv: Optional[int] = 5,
        qkv_bias: bool = True,
        biformer_scale: bool = False,
        backend: Optional[str] = None,
    ):
        super().__init__()
        name = type(self).__name__
        heads_divide(name, positive_int(name, "dim", dim), num_heads)
        self.dim, self.num_heads = dim, num_heads
        self.n_win, self.topk = positive_int(name, "n_win", n_win), positive_int(name, "topk", topk)
        self.scale = dim**-0.5 if biformer_scale else None
        self.backend = backend
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        kernel = odd_kernel(name, side_dwconv)
        self.lce = None if kernel is None else nn.Conv2d(dim, dim, kernel, padding=kernel // 2, groups=dim)

    def forward(self, x: Tensor) -> Tensor:
        """``x`` (B, H, W, C) -> (B, H, W, C)."""
        if x.dim() != 4 or x.shape[-1] != self.dim:
            raise ShapeError(f"{type(self).__name__}: x: expected (B, H, W, C={self.dim}), got shape {tuple(x.shape)}", argument="x")
        b, h, w, _ = x.shape
        ph, pw = -h % self.n_win, -w % self.n_win
        padded = torch.nn.functional.pad(x, (0, 0, 0, pw, 0, ph)) if ph or pw else x
        hp, wp = h + ph, w + pw
        pad_mask = None
        if ph or pw:  # the padding BiFormer's auto_pad adds, masked here
            pad_mask = torch.ones(b, hp, wp, dtype=torch.bool, device=x.device)
            pad_mask[:, :h, :w] = False
        head_dim = self.dim // self.num_heads
        q, k, v = self.qkv(padded).reshape(b, hp, wp, 3, self.num_heads, head_dim).permute(3, 0, 4, 1, 2, 5)  # (B, heads, H, W, hd) each
        out = bilevel_routing_attention(q, k, v, n_win=self.n_win, top_k=min(self.topk, self.n_win**2), key_padding_mask=pad_mask, scale=self.scale, backend=self.backend)
        out = out.permute(0, 2, 3, 1, 4).reshape(b, hp, wp, self.dim)
        if self.lce is not None:  # Eq. 5: LCE(V), a depthwise conv of V over the (padded) map
            out = out + self.lce(v.permute(0, 1, 4, 2, 3).reshape(b, self.dim, hp, wp)).permute(0, 2, 3, 1)
        return self.proj(out[:, :h, :w])

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, n_win={self.n_win}, topk={self.topk}, biformer_scale={self.scale is not None}"
