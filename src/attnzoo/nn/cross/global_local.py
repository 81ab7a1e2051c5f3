"""Global-local and pair-wise cross-attention (catalog X5; Zhu et al., "Dual Cross-Attention Learning
for Fine-Grained Visual Categorization and Object Re-Identification", CVPR 2022, Sec. 3.2-3.3).

* :class:`GlobalLocalCrossAttention` (GLCA, Sec. 3.2): the attention rollout (Abnar & Zuidema 2020)
  of the earlier layers, ``S^_i = S'_i (x) S'_{i-1} ... S'_1`` with ``S' = 0.5 S + 0.5 E`` (head-averaged
  attention plus identity, Eq. 2), scores each patch token by the CLS row; the R tokens with the
  highest scores become the local queries, which cross-attend to all (global) keys and values::

      f_GLCA(Q^l, K^g, V^g) = softmax(Q^l K^g^T / sqrt(d)) V^g          (Eq. 3)

  R = ``top_ratio`` of the patch tokens (10% for FGVC in the paper), at least 1; the CLS query is kept
  in front (``keep_cls``) and the selected tokens keep their order in the sequence. ``rollout`` (B, N, N)
  is passed in (:func:`attention_rollout` of the earlier layers' attention); without it the layer uses
  its own head-averaged attention, ``0.5 S + 0.5 E`` (a one-layer rollout; only the CLS row is computed,
  O(N C)). Output (B, keep_cls + R, C). Cost O(R N C) for the cross-attention.

* :class:`PairwiseCrossAttention` (PWCA, Sec. 3.3): the queries of image 1 attend to the keys and values
  of both images of a pair, concatenated (a distractor that regularizes training; removed at inference)::

      f_PWCA(Q_1, K_c, V_c) = softmax(Q_1 K_c^T / sqrt(d)) V_c,   K_c = [K_1; K_2],  V_c = [V_1; V_2]   (Eq. 4)

  Output (B, N_1, C); cost O(N_1 (N_1 + N_2) C). With ``x2 = x1`` it equals self-attention (each key
  is counted twice in numerator and denominator alike).

Both share the projection layout of a ViT attention block (one qkv Linear and an output projection),
so in DCAL they share weights with the self-attention branch (copy ``qkv``/``proj`` from it). The
attention is one :func:`attnzoo.softmax_attention` call (no N x N held). Layout (B, N, C), CLS first.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from ...errors import ParameterError, ShapeError
from ...functional.dense import softmax_attention
from .._checks import check_tokens, merge_heads, positive_int, split_heads
from .._registry import ModuleExample, register_module

__all__ = ["GlobalLocalCrossAttention", "PairwiseCrossAttention", "attention_rollout"]


def attention_rollout(attentions: Sequence[Tensor]) -> Tensor:
    """``S^ = S'_L ... S'_1`` with ``S'_l = 0.5 mean_heads(S_l) + 0.5 E`` (DCAL Eq. 2), (B, N, N) from (B, H, N, N) maps, first layer first."""
    if not attentions:
        raise ParameterError("attention_rollout: attentions: expected at least one (B, H, N, N) map", argument="attentions")
    out = None
    for a in attentions:
        if not isinstance(a, Tensor) or a.dim() != 4 or a.shape[-1] != a.shape[-2]:
            shown = tuple(a.shape) if isinstance(a, Tensor) else type(a).__name__
            raise ShapeError(f"attention_rollout: attentions: expected (B, H, N, N) maps, got shape {shown}", argument="attentions")
        eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
        step = 0.5 * a.mean(dim=1) + 0.5 * eye
        out = step if out is None else step @ out
    return out


def _check_heads(owner: str, dim: int, num_heads: int) -> None:
    positive_int(owner, "dim", dim)
    if positive_int(owner, "num_heads", num_heads) and dim % num_heads:
        raise ParameterError(f"{owner}: num_heads: expected a divisor of dim={dim}, got {num_heads}", argument="num_heads")


def local_count(num_tokens: int, top_ratio: float, cls_token: bool = True) -> int:
    """R: ``max(1, floor(top_ratio * patches))`` with patches = N - 1 when the first token is a CLS."""
    patches = num_tokens - 1 if cls_token else num_tokens
    return max(1, min(patches, int(math.floor(top_ratio * patches))))


@register_module(
    "X5",
    paper="Dual Cross-Attention Learning for Fine-Grained Visual Categorization and Object Re-Identification (Zhu et al., CVPR 2022)",
    layout="(B, N, C)",
    example=ModuleExample(dict(dim=768, num_heads=12, top_ratio=0.1), inputs=[(1, 785, 768)], test_inputs=[(2, 17, 32)],
                          test_kwargs=dict(dim=32, num_heads=4),
                          output=lambda shapes: (shapes[0][0], 1 + local_count(shapes[0][1], 0.1), shapes[0][2])),
)
class GlobalLocalCrossAttention(nn.Module):
    """Global-local cross-attention (GLCA): the R highest-rollout tokens' queries attend to every token, (B, N, C) -> (B, 1 + R, C).

    Args:
        dim: channels C. num_heads: H. top_ratio: R / patches in (0, 1]. keep_cls: the CLS query (token 0) goes first
            in the output (False: the first token is a patch like the others and is also eligible). qkv_bias: of qkv.
        backend: of :func:`attnzoo.softmax_attention`.

    ``forward(x, rollout=None, return_indices=False)``: ``rollout`` (B, N, N) accumulated attention of the earlier
    layers (:func:`attention_rollout`); ``return_indices`` also returns the selected token indices (B, R).

    Example::

        >>> glca = GlobalLocalCrossAttention(384, num_heads=6, top_ratio=0.1)
        >>> local = glca(torch.randn(2, 197, 384))          # (2, 1 + 19, 384)
    """

    def __init__(self, dim: int, num_heads: int = 8, *, top_ratio: float = 0.1, keep_cls: bool = True, qkv_bias: bool = True,
                 backend: Optional[str] = None):
        super().__init__()
        name = type(self).__name__
        _check_heads(name, dim, num_heads)
        if isinstance(top_ratio, bool) or not isinstance(top_ratio, (int, float)) or not 0 < top_ratio <= 1:
            raise ParameterError(f"{name}: top_ratio: expected a number in (0, 1], got {top_ratio!r}", argument="top_ratio")
        if not isinstance(keep_cls, bool):
            raise ParameterError(f"{name}: keep_cls: expected a bool, got {keep_cls!r}", argument="keep_cls")
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.top_ratio, self.keep_cls, self.backend = float(top_ratio), keep_cls, backend
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, rollout: Optional[Tensor] = None, return_indices: bool = False):
        name = type(self).__name__
        check_tokens(name, x, self.dim)
        b, n, _ = x.shape
        if n < 2:
            raise ShapeError(f"{name}: x: expected at least 2 tokens (a CLS and a patch), got shape {tuple(x.shape)}", argument="x")
        q, k, v = (split_heads(t, self.num_heads) for t in self.qkv(x).chunk(3, dim=-1))
        if rollout is None:
            with torch.no_grad():  # the selection is discrete: no gradient through the scores
                cls_attn = torch.softmax(q[:, :, :1] @ k.transpose(-1, -2) * self.head_dim**-0.5, dim=-1).mean(1)[:, 0]  # (B, N)
                scores = 0.5 * cls_attn + 0.5 * torch.nn.functional.one_hot(torch.zeros(b, dtype=torch.long, device=x.device), n).to(x.dtype)
        else:
            if not isinstance(rollout, Tensor) or tuple(rollout.shape) != (b, n, n):
                shown = tuple(rollout.shape) if isinstance(rollout, Tensor) else type(rollout).__name__
                raise ShapeError(f"{name}: rollout: expected shape (B, N, N) = ({b}, {n}, {n}), got {shown}", argument="rollout")
            scores = rollout[:, 0].detach()
        r = local_count(n, self.top_ratio, self.keep_cls)
        first = 1 if self.keep_cls else 0
        chosen = scores[:, first:].topk(r, dim=-1).indices.sort(dim=-1).values + first  # (B, R), in sequence order
        if self.keep_cls:
            rows = torch.cat([torch.zeros(b, 1, dtype=torch.long, device=x.device), chosen], dim=1)
        else:
            rows = chosen
        q_local = torch.gather(q, 2, rows[:, None, :, None].expand(b, self.num_heads, rows.shape[1], self.head_dim))
        out = self.proj(merge_heads(softmax_attention(q_local, k, v, backend=self.backend)))
        return (out, chosen) if return_indices else out

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, top_ratio={self.top_ratio}, keep_cls={self.keep_cls}"


@register_module(
    "X5",
    paper="Dual Cross-Attention Learning for Fine-Grained Visual Categorization and Object Re-Identification (Zhu et al., CVPR 2022)",
    layout="(B, N, C)",
    example=ModuleExample(dict(dim=768, num_heads=12), inputs=[(1, 785, 768), (1, 785, 768)], test_inputs=[(2, 17, 32), (2, 13, 32)],
                          test_kwargs=dict(dim=32, num_heads=4)),
)
class PairwiseCrossAttention(nn.Module):
    """Pair-wise cross-attention (PWCA): image 1's queries attend to both images' keys and values, (B, N1, C), (B, N2, C) -> (B, N1, C).

    Args:
        dim: channels C. num_heads: H. qkv_bias: of qkv. backend: of :func:`attnzoo.softmax_attention`.

    ``forward(x1, x2, key_padding_mask=None)``: ``key_padding_mask`` (B, N1 + N2) bool, True = ignore the token.

    Example::

        >>> pwca = PairwiseCrossAttention(384, num_heads=6)
        >>> y = pwca(torch.randn(2, 197, 384), torch.randn(2, 197, 384)[torch.randperm(2)])
    """

    def __init__(self, dim: int, num_heads: int = 8, *, qkv_bias: bool = True, backend: Optional[str] = None):
        super().__init__()
        _check_heads(type(self).__name__, dim, num_heads)
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.backend = backend
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x1: Tensor, x2: Tensor, key_padding_mask: Optional[Tensor] = None) -> Tensor:
        name = type(self).__name__
        check_tokens(name, x1, self.dim)
        if x2.dim() != 3 or x2.shape[-1] != self.dim or x2.shape[0] != x1.shape[0]:
            raise ShapeError(f"{name}: x2: expected (B={x1.shape[0]}, N2, C={self.dim}), got shape {tuple(x2.shape)}", argument="x2")
        q1, k1, v1 = (split_heads(t, self.num_heads) for t in self.qkv(x1).chunk(3, dim=-1))
        _, k2, v2 = (split_heads(t, self.num_heads) for t in self.qkv(x2).chunk(3, dim=-1))
        out = softmax_attention(q1, torch.cat([k1, k2], dim=2), torch.cat([v1, v2], dim=2), key_padding_mask=key_padding_mask, backend=self.backend)
        return self.proj(merge_heads(out))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}"
