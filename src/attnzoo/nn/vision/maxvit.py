"""MaxViT's multi-axis attention: block (local) and grid (dilated global) attention (catalog M2).

Tu et al., "MaxViT: Multi-Axis Vision Transformer", ECCV 2022, Sec. 3.1. Both partitions run
relative attention (Sec. 3, Eq. 1)::

    RelAttention(Q, K, V) = softmax(Q K^T / sqrt(d) + B) V

within groups of P x P tokens, B read from a learned (2P - 1) x (2P - 1) table per head (the
position offsets are counted inside the group). Block attention groups a window of P x P
neighbours, the map reshaped to (H/P x W/P, P x P, C); grid attention lays a fixed G x G grid,
the map reshaped to (G x G, H/G x W/G, C) and attended along the G x G axis, so a group holds
G x G tokens spaced (H/G, W/G) apart. MaxViT applies block then grid attention, each in its own
pre-norm residual block with an MLP; these modules are the attention parts (timm's
``PartitionAttentionCl._partition_attn``).
"""

from __future__ import annotations

import copy
from typing import Any, Optional

import torch
from torch import Tensor, nn

from ...errors import ParameterError, ShapeError
from ...functional import softmax_attention
from .._checks import positive_int
from .._registry import ModuleExample, register_module
from ._grid_ops import IntOr2, check_grid, pair, relative_position_index, unwindows, windows

__all__ = ["MaxViTBlockAttention", "MaxViTGridAttention"]


def grid_groups(x: Tensor, grid: tuple[int, int]) -> Tensor:
    """(B, H, W, C) -> (B, H/G * W/G, G * G, C): group (i, j) holds the tokens (a * H/G + i, b * W/G + j)."""
    b, h, w, c = x.shape
    gh, gw = grid
    x = x.view(b, gh, h // gh, gw, w // gw, c).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // gh) * (w // gw), gh * gw, c)


def ungrid_groups(x: Tensor, grid: tuple[int, int], height: int, width: int) -> Tensor:
    """The inverse of :func:`grid_groups`."""
    b, _, _, c = x.shape
    gh, gw = grid
    x = x.view(b, height // gh, width // gw, gh, gw, c).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, height, width, c)


class _PartitionAttention(nn.Module):
    """Relative attention within the groups of one partition of a (B, H, W, C) map (MaxViT)."""

    partition = ""

    def __init__(self, dim: int, dim_head: int = 32, partition_size: IntOr2 = 7, *, bias: bool = True, head_first: bool = True, backend: Optional[str] = None):
        super().__init__()
        name = type(self).__name__
        self.dim = positive_int(name, "dim", dim)
        if positive_int(name, "dim_head", dim_head) and dim % dim_head:
            raise ParameterError(f"{name}: dim_head: expected a divisor of dim={dim}, got {dim_head}", argument="dim_head")
        self.dim_head, self.num_heads = dim_head, dim // dim_head
        self.partition_size = pair(name, "partition_size", partition_size)
        self.head_first = bool(head_first)
        self.backend = backend
        ph, pw = self.partition_size
        self.qkv = nn.Linear(dim, 3 * dim, bias=bias)
        self.proj = nn.Linear(dim, dim, bias=bias)
        self.relative_position_bias_table = nn.Parameter(torch.empty((2 * ph - 1) * (2 * pw - 1), self.num_heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.register_buffer("relative_position_index", relative_position_index(ph, pw), persistent=False)

    def relative_position_bias(self) -> Tensor:
        """B of Eq. 1 as (num_heads, N, N) over the N = P_h * P_w tokens of a group."""
        n = self.partition_size[0] * self.partition_size[1]
        return self.relative_position_bias_table[self.relative_position_index.reshape(-1)].view(n, n, -1).permute(2, 0, 1)

    def _split(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def _merge(self, x: Tensor, height: int, width: int) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        name = type(self).__name__
        check_grid(name, x, self.dim)
        b, h, w, c = x.shape
        ph, pw = self.partition_size
        if h % ph or w % pw:
            raise ShapeError(f"{name}: x: expected H, W multiples of partition_size={self.partition_size}, got shape {tuple(x.shape)}", argument="x")
        groups = self._split(x)  # (B, G, N, C)
        g, n = groups.shape[1], groups.shape[2]
        heads, d = self.num_heads, self.dim_head
        qkv = self.qkv(groups.reshape(b * g, n, c))
        if self.head_first:  # timm's default: per head [q | k | v] of d channels each
            q, k, v = qkv.view(b * g, n, heads, 3 * d).transpose(1, 2).split(d, dim=-1)
        else:
            q, k, v = qkv.view(b * g, n, 3, heads, d).permute(2, 0, 3, 1, 4)
        out = softmax_attention(q, k, v, bias=self.relative_position_bias().unsqueeze(0), scale=d**-0.5, backend=self.backend)
        out = self.proj(out.transpose(1, 2).reshape(b, g, n, c))
        return self._merge(out, h, w)

    @classmethod
    def from_timm(cls, module: Any) -> "_PartitionAttention":
        """A copy of ``timm.models.maxxvit.PartitionAttentionCl``'s attention part (its ``attn`` with
        ``rel_pos_type='bias'``; the norms, MLP and layer scale are not carried, nor dropout)."""
        attn = getattr(module, "attn", None)
        rel = getattr(attn, "rel_pos", None)
        if attn is None or not hasattr(module, "partition_block") or not hasattr(attn, "qkv"):
            raise ParameterError(f"{cls.__name__}.from_timm: module: expected timm's PartitionAttentionCl, got {type(module).__name__}", argument="module")
        if type(rel).__name__ != "RelPosBias" or getattr(rel, "prefix_tokens", 0):
            raise ParameterError(
                f"{cls.__name__}.from_timm: module: expected rel_pos_type='bias' (RelPosBias), got {type(rel).__name__}", argument="module"
            )
        target = MaxViTBlockAttention if module.partition_block else MaxViTGridAttention
        if cls is not _PartitionAttention and cls is not target:
            raise ParameterError(f"{cls.__name__}.from_timm: module: a {target.partition} partition; use {target.__name__}.from_timm", argument="module")
        dim = attn.qkv.in_features
        if attn.num_heads * attn.dim_head != dim or attn.proj.out_features != dim:
            raise ParameterError(f"{cls.__name__}.from_timm: module: expected attention width = dim = {dim} (no expansion)", argument="module")
        layer = target(dim, attn.dim_head, tuple(module.partition_size), bias=attn.qkv.bias is not None, head_first=attn.head_first)
        layer.qkv, layer.proj = copy.deepcopy(attn.qkv), copy.deepcopy(attn.proj)
        layer.relative_position_bias_table.data.copy_(rel.relative_position_bias_table.data)
        return layer.to(attn.qkv.weight.dtype)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, dim_head={self.dim_head}, partition_size={self.partition_size}, head_first={self.head_first}"


@register_module(
    "M2",
    paper="MaxViT: Multi-Axis Vision Transformer (Tu et al., ECCV 2022)",
    layout="(B, H, W, C)",
    example=ModuleExample(
        dict(dim=64, dim_head=32, partition_size=7), inputs=[(1, 56, 56, 64)], test_inputs=[(2, 8, 12, 16)], test_kwargs=dict(dim=16, dim_head=8, partition_size=4)
    ),
)
class MaxViTBlockAttention(_PartitionAttention):
    """MaxViT block attention over (B, H, W, C): relative attention inside non-overlapping P x P windows.

    The map is cut into (H/P x W/P) windows of P x P neighbours (local attention).

    Per group of N = P_h x P_w tokens (MaxViT, Sec. 3.1, Eq. 1)::

        out = softmax(Q K^T / sqrt(d) + B) V,   B_ij = B_hat[r_i - r_j + P_h - 1, c_i - c_j + P_w - 1]

    with (r, c) a token's row and column inside its group, one bias table per head, d = ``dim_head``
    (MaxViT: 32), heads = dim / dim_head, one ``qkv`` linear, heads concatenated and projected by
    ``proj``. H and W must be multiples of the partition (MaxViT's sizes are; timm asserts it).

    Cost: O(N * P_h * P_w * C) time for N = H * W tokens (linear in N) plus O(N * C^2) projections.

    Args:
        dim: channels C. dim_head: channels per head. partition_size: P, the window, an int or a pair.
        bias: biases of ``qkv`` and ``proj``. head_first: the qkv output holds [q | k | v] per head
            (timm's default layout); False: [q | k | v] each over all heads.
        backend: passed to :func:`attnzoo.softmax_attention`.

    ``forward(x)``: x (B, H, W, C) -> (B, H, W, C).

    Example::

        >>> layer = MaxViTBlockAttention(64, dim_head=32, partition_size=7)
        >>> y = layer(torch.randn(2, 56, 56, 64))
    """

    partition = "block"

    def _split(self, x: Tensor) -> Tensor:
        return windows(x, self.partition_size)

    def _merge(self, x: Tensor, height: int, width: int) -> Tensor:
        return unwindows(x, self.partition_size, height, width)


@register_module(
    "M2",
    paper="MaxViT: Multi-Axis Vision Transformer (Tu et al., ECCV 2022)",
    layout="(B, H, W, C)",
    example=ModuleExample(
        dict(dim=64, dim_head=32, partition_size=7), inputs=[(1, 56, 56, 64)], test_inputs=[(2, 8, 12, 16)], test_kwargs=dict(dim=16, dim_head=8, partition_size=4)
    ),
)
class MaxViTGridAttention(_PartitionAttention):
    """MaxViT grid attention over (B, H, W, C): relative attention among G x G tokens spaced (H/G, W/G) apart.

    A fixed G x G grid (``partition_size`` = G) groups the tokens (a * H/G + i, b * W/G + j),
    a, b < G, for each offset (i, j): sparse, dilated global attention; the bias is indexed by
    the grid offsets (a, b), i.e. (r, c) below.

    Per group of N = P_h x P_w tokens (MaxViT, Sec. 3.1, Eq. 1)::

        out = softmax(Q K^T / sqrt(d) + B) V,   B_ij = B_hat[r_i - r_j + P_h - 1, c_i - c_j + P_w - 1]

    with (r, c) a token's row and column inside its group, one bias table per head, d = ``dim_head``
    (MaxViT: 32), heads = dim / dim_head, one ``qkv`` linear, heads concatenated and projected by
    ``proj``. H and W must be multiples of the partition (MaxViT's sizes are; timm asserts it).

    Cost: O(N * P_h * P_w * C) time for N = H * W tokens (linear in N) plus O(N * C^2) projections.

    Args:
        dim: channels C. dim_head: channels per head. partition_size: G, the grid, an int or a pair.
        bias: biases of ``qkv`` and ``proj``. head_first: the qkv output holds [q | k | v] per head
            (timm's default layout); False: [q | k | v] each over all heads.
        backend: passed to :func:`attnzoo.softmax_attention`.

    ``forward(x)``: x (B, H, W, C) -> (B, H, W, C).

    Example::

        >>> layer = MaxViTGridAttention(64, dim_head=32, partition_size=7)
        >>> y = layer(torch.randn(2, 56, 56, 64))  # 7 x 7 tokens per group, 8 apart
    """

    partition = "grid"

    def _split(self, x: Tensor) -> Tensor:
        return grid_groups(x, self.partition_size)

    def _merge(self, x: Tensor, height: int, width: int) -> Tensor:
        return ungrid_groups(x, self.partition_size, height, width)
