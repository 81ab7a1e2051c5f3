"""Blocked local self-attention with halos (Vaswani et al., "Scaling Local Self-Attention for
Parameter Efficient Visual Backbones", CVPR 2021, Sec. 2.2 "Blocked local self-attention" and
Fig. 2; the HaloNet layer).

The map is cut into non-overlapping b x b query blocks; each block attends to the (b + 2h)^2
window around it (its own pixels plus a halo of h pixels), with a relative position embedding
split into a height and a width part (Sec. 2.1: ``y_ij = sum_ab softmax_ab(q_ij^T k_ab +
q_ij^T r_{a-i, b-j}) v_ab``)::

    y_p = sum_{m in win(block(p))} softmax_m(q_p . k_m / sqrt(d) + q_p . (r^h_{dy} + r^w_{dx})) v_m

At the image border part of the halo lies outside the image; the layer pads there, and by default
those padded pixels are masked out of the softmax (``mask_padding=True``: a query attends only to
real pixels, the reading of the paper followed here and by halonet-pytorch). timm's ``HaloAttn`` (which calls itself a work in progress without an
official reference) does not mask them: the zero keys there still take softmax mass (logit
``q . r`` from the position term only) and their zero values dilute the border outputs.
``mask_padding=False`` reproduces that, and :meth:`HaloAttention.from_timm` sets it.

Position embedding, as timm indexes it: per axis a table of 2 (b + 2h) - 1 vectors, entry
``delta + h + (b + 2h) - 1`` for the key-minus-query offset delta in pixels (the 2h lowest entries
are never used; timm's layout is kept so its weights load unchanged). With ``stride=2`` the
queries come from a strided 1x1 conv and index the table by their position in the downsampled
block, as timm does; ``avg_down`` (or an odd block) average-pools the output instead.
"""

from __future__ import annotations

import copy
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...errors import ParameterError, ShapeError
from ...functional.dense import softmax_attention
from .._checks import positive_int
from .._registry import ModuleExample, register_module

__all__ = ["HaloAttention"]


@register_module(
    "M13",
    paper="Scaling Local Self-Attention for Parameter Efficient Visual Backbones (Vaswani et al., CVPR 2021)",
    layout="(B, C, H, W)",
    example=ModuleExample(
        dict(dim=64, num_heads=4, block_size=8, halo_size=3), inputs=[(1, 64, 56, 56)],
        test_inputs=[(2, 16, 8, 8)], test_kwargs=dict(dim=16, num_heads=2, block_size=4, halo_size=1),
    ),
)
class HaloAttention(nn.Module):
    """HaloNet attention on a (B, C, H, W) map: b x b query blocks over (b + 2h)^2 haloed windows.

    q comes from a 1x1 conv of the map, k and v from another (``kv``, per head [k | v]); per head
    and query pixel p in block B::

        y_p = sum_{m in window(B), m inside the image} softmax_m(q_p . k_m / sqrt(d) + q_p . (r^h_{m_y - p_y} + r^w_{m_x - p_x})) v_m

    (``scale_pos_embed=True`` scales the position term by 1/sqrt(d) too.) H and W must be
    multiples of ``block_size``.

    Cost: O(H W (b + 2h)^2 (d_qk + d_v)) time: linear in the pixels; the windows are gathered with
    ``unfold``, (1 + 2h / b)^2 times the keys' memory.

    Args:
        dim: input channels C. dim_out: output channels (default dim; a multiple of num_heads).
        num_heads: heads. dim_head: q/k width per head (default dim_out / num_heads); v has
            dim_out / num_heads. block_size: b. halo_size: h. qkv_bias: biases of the two convs.
        stride: 1 or 2 (output H / stride, W / stride). avg_down: downsample by 2 x 2 average
            pooling of the output instead of strided queries.
        scale_pos_embed: scale the position logits as well. mask_padding: mask the halo pixels
            outside the image (the paper; default) or let them take part as zeros (timm).
        backend: passed to :func:`attnzoo.softmax_attention`.

    Example::

        >>> layer = HaloAttention(64, num_heads=4, block_size=8, halo_size=3)
        >>> y = layer(torch.randn(2, 64, 56, 56))
    """

    def __init__(
        self,
        dim: int,
        dim_out: Optional[int] = None,
        num_heads: int = 8,
        dim_head: Optional[int] = None,
        block_size: int = 8,
        halo_size: int = 3,
        *,
        qkv_bias: bool = False,
        stride: int = 1,
        avg_down: bool = False,
        scale_pos_embed: bool = False,
        mask_padding: bool = True,
        backend: Optional[str] = None,
    ):
        super().__init__()
        name = type(self).__name__
        positive_int(name, "dim", dim)
        dim_out = positive_int(name, "dim_out", dim_out) if dim_out is not None else dim
        if positive_int(name, "num_heads", num_heads) and dim_out % num_heads:
            raise ParameterError(f"{name}: num_heads: expected a divisor of dim_out={dim_out}, got {num_heads}", argument="num_heads")
        positive_int(name, "block_size", block_size)
        if isinstance(halo_size, bool) or not isinstance(halo_size, int) or halo_size < 0:
            raise ParameterError(f"{name}: halo_size: expected a non-negative int, got {halo_size!r}", argument="halo_size")
        if stride not in (1, 2):
            raise ParameterError(f"{name}: stride: expected 1 or 2, got {stride!r}", argument="stride")
        self.dim, self.dim_out, self.num_heads = dim, dim_out, num_heads
        self.dim_head_qk = positive_int(name, "dim_head", dim_head) if dim_head is not None else dim_out // num_heads
        self.dim_head_v = dim_out // num_heads
        self.block_size, self.halo_size, self.win_size = block_size, halo_size, block_size + 2 * halo_size
        self.stride, self.scale_pos_embed, self.mask_padding = stride, scale_pos_embed, mask_padding
        self.scale = self.dim_head_qk**-0.5
        self.backend = backend
        use_pool = stride > 1 and (avg_down or block_size % stride != 0)
        self.block_stride = stride if stride > 1 and not use_pool else 1
        self.block_size_q = block_size // self.block_stride
        self.q = nn.Conv2d(dim, num_heads * self.dim_head_qk, 1, stride=self.block_stride, bias=qkv_bias)
        self.kv = nn.Conv2d(dim, num_heads * (self.dim_head_qk + self.dim_head_v), 1, bias=qkv_bias)
        rel = 2 * self.win_size - 1
        self.height_rel = nn.Parameter(torch.randn(rel, self.dim_head_qk) * self.scale)
        self.width_rel = nn.Parameter(torch.randn(rel, self.dim_head_qk) * self.scale)
        self.pool: nn.Module = nn.AvgPool2d(2, 2) if use_pool else nn.Identity()

    def _position_logits(self, q: Tensor) -> Tensor:
        """q (..., bq * bq, d) -> (..., bq * bq, win * win): q . (r^h + r^w) at each key of the window."""
        bq, win = self.block_size_q, self.win_size
        pos = torch.arange(bq, device=q.device)
        idx = torch.arange(win, device=q.device)[None, :] - pos[:, None] + win - 1  # (bq, win): table entry of (query, key)
        lead = q.shape[:-2]
        q = q.reshape(*lead, bq, bq, -1)
        rh = q @ self.height_rel.to(q.dtype).T  # (..., bq, bq, 2 win - 1)
        rw = q @ self.width_rel.to(q.dtype).T
        rows, cols = pos[:, None, None], pos[None, :, None]
        rel_h = rh[..., rows, cols, idx[:, None, :]]  # (..., bq, bq, win): key row
        rel_w = rw[..., rows, cols, idx[None, :, :]]  # (..., bq, bq, win): key column
        return (rel_h[..., :, None] + rel_w[..., None, :]).reshape(*lead, bq * bq, win * win)

    def _valid_keys(self, nh: int, nw: int, height: int, width: int, device: torch.device) -> Tensor:
        """(nh * nw, win * win) bool: True where the window's pixel lies inside the image."""
        b, h, win = self.block_size, self.halo_size, self.win_size
        offs = torch.arange(win, device=device) - h
        ys = (torch.arange(nh, device=device)[:, None] * b + offs).unsqueeze(1)  # (nh, 1, win)
        xs = (torch.arange(nw, device=device)[:, None] * b + offs).unsqueeze(0)  # (1, nw, win)
        vy, vx = (ys >= 0) & (ys < height), (xs >= 0) & (xs < width)
        return (vy[..., :, None] & vx[..., None, :]).reshape(nh * nw, win * win)

    def forward(self, x: Tensor) -> Tensor:
        name = type(self).__name__
        if x.dim() != 4 or x.shape[1] != self.dim:
            raise ShapeError(f"{name}: x: expected (B, C={self.dim}, H, W), got shape {tuple(x.shape)}", argument="x")
        bsz, _, height, width = x.shape
        b, bq, win, heads = self.block_size, self.block_size_q, self.win_size, self.num_heads
        if height % b or width % b:
            raise ShapeError(f"{name}: x: expected H and W multiples of block_size={b}, got shape {tuple(x.shape)}", argument="x")
        nh, nw = height // b, width // b
        nb, dqk, dv = nh * nw, self.dim_head_qk, self.dim_head_v
        # queries: (B * blocks, heads, bq * bq, dqk)
        q = self.q(x).view(bsz, heads, dqk, nh, bq, nw, bq).permute(0, 3, 5, 1, 4, 6, 2).reshape(bsz * nb, heads, bq * bq, dqk)
        # keys/values: the haloed window of each block, (B * blocks, heads, win * win, d)
        kv = F.pad(self.kv(x), [self.halo_size] * 4)
        kv = kv.unfold(2, win, b).unfold(3, win, b)  # (B, heads * (dqk + dv), nh, nw, win, win)
        kv = kv.reshape(bsz, heads, dqk + dv, nb, win * win).permute(0, 3, 1, 4, 2).reshape(bsz * nb, heads, win * win, dqk + dv)
        k, v = kv.split([dqk, dv], dim=-1)
        pos = self._position_logits(q)
        if self.scale_pos_embed:
            pos = pos * self.scale
        if self.mask_padding and self.halo_size:
            # padded keys get -inf (folded into the position bias: one tensor, no separate mask pass);
            # a block's own pixels are always inside, so no row is empty
            pad = ~self._valid_keys(nh, nw, height, width, x.device)  # (blocks, win * win), True = padded
            pos = pos.view(bsz, nb, heads, bq * bq, win * win).masked_fill(pad[:, None, None, :], float("-inf"))
            pos = pos.view(bsz * nb, heads, bq * bq, win * win)
        out = softmax_attention(q, k, v, bias=pos, scale=self.scale, backend=self.backend)
        out = out.view(bsz, nh, nw, heads, bq, bq, dv).permute(0, 3, 6, 1, 4, 2, 5)
        out = out.reshape(bsz, heads * dv, nh * bq, nw * bq)
        return self.pool(out)

    @classmethod
    def from_timm(cls, module: Any) -> "HaloAttention":
        """A copy of ``timm.layers.halo_attn.HaloAttn``, with its unmasked halo (``mask_padding=False``)."""
        stride = 2 if (module.block_stride > 1 or not isinstance(module.pool, nn.Identity)) else 1
        layer = cls(
            module.q.in_channels,
            module.dim_out_v,
            module.num_heads,
            module.dim_head_qk,
            module.block_size,
            module.halo_size,
            qkv_bias=module.q.bias is not None,
            stride=stride,
            avg_down=stride > 1 and module.block_stride == 1,
            scale_pos_embed=module.scale_pos_embed,
            mask_padding=False,
        )
        layer.q, layer.kv = copy.deepcopy(module.q), copy.deepcopy(module.kv)
        with torch.no_grad():
            layer.height_rel.copy_(module.pos_embed.height_rel)
            layer.width_rel.copy_(module.pos_embed.width_rel)
        return layer

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, dim_out={self.dim_out}, num_heads={self.num_heads}, block_size={self.block_size}, "
            f"halo_size={self.halo_size}, stride={self.stride}, mask_padding={self.mask_padding}"
        )
