"""Transformer in Transformer: nested inner/outer attention (Han et al., "Transformer in
Transformer", NeurIPS 2021, Sec. 2.2 "Transformer in Transformer").

Each image patch is itself a sequence of m "pixel" (sub-patch) embeddings of width c. An inner
transformer block mixes the pixels within each patch; their result is flattened, projected and
added to the patch embedding; an outer transformer block then mixes the patches (and the class
token)::

    Y'_i = Y_i + MSA(LN(Y_i)),            Y_i <- Y'_i + MLP(LN(Y'_i))          inner, per patch i (m tokens)
    Z_i  = Z_i + FC(Vec(Y_i))                                                   pixel -> patch
    Z'   = Z + MSA(LN(Z)),                Z <- Z' + MLP(LN(Z'))                 outer, over the 1 + N patches

The projection follows timm's ``tnt.Block``: by default LN over the flattened m c features, a
bias-free FC, then LN (timm's current TNT weights); ``legacy=True`` is the original code's LN per
pixel and an FC with bias. The attention of both blocks projects q, k to the block's width and v
separately (the official code's ``qk`` and ``v`` layers).
"""

from __future__ import annotations

import copy
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...errors import ParameterError, ShapeError
from ...functional.dense import softmax_attention
from .._checks import check_tokens, merge_heads, positive_int, split_heads
from .._registry import ModuleExample, register_module

__all__ = ["TNTBlock"]


class _Attention(nn.Module):
    """softmax((x W_q)(x W_k)^T / sqrt(d)) (x W_v) W_o per head, with q, k from one ``qk`` layer."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool, backend: Optional[str]):
        super().__init__()
        self.num_heads, self.backend = num_heads, backend
        self.qk = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.v = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        q, k = (split_heads(t, self.num_heads) for t in self.qk(x).chunk(2, dim=-1))
        v = split_heads(self.v(x), self.num_heads)
        return self.proj(merge_heads(softmax_attention(q, k, v, backend=self.backend)))


class _Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


@register_module(
    "M14",
    paper="Transformer in Transformer (Han et al., NeurIPS 2021)",
    layout="patches (B, 1 + N, C), pixels (B N, m, c)",
    example=ModuleExample(
        dict(inner_dim=24, outer_dim=384, num_pixel=16, inner_heads=4, outer_heads=6),  # TNT-S: 196 patches of 4 x 4 pixels
        inputs=[(1, 197, 384), (196, 16, 24)],
        test_inputs=[(2, 5, 32), (8, 4, 8)],
        test_kwargs=dict(inner_dim=8, outer_dim=32, num_pixel=4, inner_heads=2, outer_heads=2),
    ),
)
class TNTBlock(nn.Module):
    """A TNT block: inner attention over the pixels of each patch, outer attention over the patches.

    ``forward(patch_embed, pixel_embed) -> (patch_embed, pixel_embed)``: ``patch_embed`` (B, 1 + N, C)
    with the class token first, ``pixel_embed`` (B N, m, c) the m pixel embeddings of each of the N
    patches, patch-major per image (timm's layout). The patch stream comes first in and out (it is
    the block's main output; timm's ``Block`` takes and returns them in the other order).

    Cost: inner O(B N m^2 c + B N m c^2), outer O(B N^2 C + B N C^2), projection O(B N m c C).

    Args:
        inner_dim: pixel width c. outer_dim: patch width C. num_pixel: m pixels per patch.
        inner_heads, outer_heads: heads of the two attentions (divisors of c and C).
        mlp_ratio: outer MLP width / C (the inner MLP is 4 c, as in the official code).
        qkv_bias: biases of the q/k and v projections. legacy: the original pixel->patch projection
            (LN per pixel, FC with bias, no LN after). backend: passed to :func:`attnzoo.softmax_attention`.

    Example::

        >>> block = TNTBlock(inner_dim=24, outer_dim=384, num_pixel=16, inner_heads=4, outer_heads=6)
        >>> patches, pixels = block(torch.randn(2, 197, 384), torch.randn(2 * 196, 16, 24))
    """

    def __init__(
        self,
        inner_dim: int,
        outer_dim: int,
        num_pixel: int,
        inner_heads: int = 4,
        outer_heads: int = 6,
        mlp_ratio: float = 4.0,
        *,
        qkv_bias: bool = False,
        legacy: bool = False,
        backend: Optional[str] = None,
    ):
        super().__init__()
        name = type(self).__name__
        for arg, value in (("inner_dim", inner_dim), ("outer_dim", outer_dim), ("num_pixel", num_pixel)):
            positive_int(name, arg, value)
        for arg, heads, dim in (("inner_heads", inner_heads, inner_dim), ("outer_heads", outer_heads, outer_dim)):
            if positive_int(name, arg, heads) and dim % heads:
                raise ParameterError(f"{name}: {arg}: expected a divisor of {dim}, got {heads}", argument=arg)
        if not mlp_ratio > 0:
            raise ParameterError(f"{name}: mlp_ratio: expected a positive number, got {mlp_ratio!r}", argument="mlp_ratio")
        self.inner_dim, self.outer_dim, self.num_pixel, self.legacy = inner_dim, outer_dim, num_pixel, legacy
        # inner transformer (pixels of each patch)
        self.norm_in = nn.LayerNorm(inner_dim)
        self.attn_in = _Attention(inner_dim, inner_heads, qkv_bias, backend)
        self.norm_mlp_in = nn.LayerNorm(inner_dim)
        self.mlp_in = _Mlp(inner_dim, 4 * inner_dim)
        # pixels -> patch
        if legacy:
            self.norm1_proj = nn.LayerNorm(inner_dim)
            self.proj = nn.Linear(num_pixel * inner_dim, outer_dim)
            self.norm2_proj: Optional[nn.LayerNorm] = None
        else:
            self.norm1_proj = nn.LayerNorm(num_pixel * inner_dim)
            self.proj = nn.Linear(num_pixel * inner_dim, outer_dim, bias=False)
            self.norm2_proj = nn.LayerNorm(outer_dim)
        # outer transformer (patches)
        self.norm_out = nn.LayerNorm(outer_dim)
        self.attn_out = _Attention(outer_dim, outer_heads, qkv_bias, backend)
        self.norm_mlp = nn.LayerNorm(outer_dim)
        self.mlp = _Mlp(outer_dim, int(outer_dim * mlp_ratio))

    def forward(self, patch_embed: Tensor, pixel_embed: Tensor) -> tuple[Tensor, Tensor]:
        name = type(self).__name__
        check_tokens(name, patch_embed, self.outer_dim)
        b, n1, _ = patch_embed.shape
        m, c = self.num_pixel, self.inner_dim
        if pixel_embed.dim() != 3 or tuple(pixel_embed.shape) != (b * (n1 - 1), m, c):
            raise ShapeError(
                f"{name}: pixel_embed: expected (B N = {b * (n1 - 1)}, m = {m}, c = {c}) for patch_embed {tuple(patch_embed.shape)}, "
                f"got shape {tuple(pixel_embed.shape)}",
                argument="pixel_embed",
            )
        pixel_embed = pixel_embed + self.attn_in(self.norm_in(pixel_embed))
        pixel_embed = pixel_embed + self.mlp_in(self.norm_mlp_in(pixel_embed))
        if self.norm2_proj is None:
            add = self.proj(self.norm1_proj(pixel_embed).reshape(b, n1 - 1, m * c))
        else:
            add = self.norm2_proj(self.proj(self.norm1_proj(pixel_embed.reshape(b, n1 - 1, m * c))))
        patch_embed = torch.cat([patch_embed[:, :1], patch_embed[:, 1:] + add], dim=1)
        patch_embed = patch_embed + self.attn_out(self.norm_out(patch_embed))
        patch_embed = patch_embed + self.mlp(self.norm_mlp(patch_embed))
        return patch_embed, pixel_embed

    @classmethod
    def from_timm(cls, module: Any) -> "TNTBlock":
        """A copy of ``timm.models.tnt.Block`` (GELU MLPs; drop-path and dropout are not carried)."""
        inner_dim, outer_dim = module.norm_in.normalized_shape[0], module.norm_out.normalized_shape[0]
        num_pixel = module.proj.in_features // inner_dim
        for attn in (module.attn_in, module.attn_out):
            if attn.hidden_dim != attn.v.in_features:
                raise ParameterError(f"{cls.__name__}.from_timm: expected q/k as wide as the block, got hidden_dim={attn.hidden_dim}", argument="module")
        mlp_ratio = module.mlp.fc1.out_features / outer_dim
        layer = cls(
            inner_dim, outer_dim, num_pixel, module.attn_in.num_heads, module.attn_out.num_heads, mlp_ratio,
            qkv_bias=module.attn_in.qk.bias is not None, legacy=module.legacy,
        )
        for name in ("norm_in", "norm_mlp_in", "norm1_proj", "norm2_proj", "proj", "norm_out", "norm_mlp"):
            setattr(layer, name, copy.deepcopy(getattr(module, name)))
        for name in ("attn_in", "attn_out"):
            ours, theirs = getattr(layer, name), getattr(module, name)
            ours.qk, ours.v, ours.proj = copy.deepcopy(theirs.qk), copy.deepcopy(theirs.v), copy.deepcopy(theirs.proj)
        for name in ("mlp_in", "mlp"):
            ours, theirs = getattr(layer, name), getattr(module, name)
            if not isinstance(theirs.act, nn.GELU) or theirs.act.approximate != "none":
                raise ParameterError(f"{cls.__name__}.from_timm: expected exact GELU MLPs, got {theirs.act!r}", argument="module")
            ours.fc1, ours.fc2 = copy.deepcopy(theirs.fc1), copy.deepcopy(theirs.fc2)
        return layer

    def extra_repr(self) -> str:
        return f"inner_dim={self.inner_dim}, outer_dim={self.outer_dim}, num_pixel={self.num_pixel}, legacy={self.legacy}"
