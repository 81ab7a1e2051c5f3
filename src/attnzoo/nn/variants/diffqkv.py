"""DiffQKV attention (catalog D4): different head counts and head dims for K and for V, augmented Q.

Sigma (Lin et al., "Sigma: Differential Rescaling of Query, Key and Value for Efficient Language
Models", 2025, Sec. 3) finds the model less sensitive to compressing K than V, so it gives K fewer
heads (and a smaller head dim) than V, and widens the query head ("augmented Q")::

    q_t = h_t W_Q  (Hq heads of d_q),   k_t = h_t W_K  (Hk heads of d_k),   v_t = h_t W_V  (Hv heads of d_v)
    q'_{t,i} = q_{t,i} W_aug,i          (d_q -> d_k, per head; absent when d_q = d_k)
    o_{t,i} = sum_s softmax_s(q'_{t,i} . k_{s, i // (Hq/Hk)} / sqrt(d_k)) v_{s, i // (Hq/Hv)}
    y_t = [o_{t,1}; ...; o_{t,Hq}] W_O

Query head ``i`` reads K head ``i // (Hq / Hk)`` and V head ``i // (Hq / Hv)``: GQA with two group
sizes (Hk, Hv divide Hq and the smaller divides the larger). The KV cache holds Hk d_k + Hv d_v
numbers per token instead of 2 H d.

Augmented Q: the paper widens the Q head beyond the K head dim; a dot product needs equal dims,
and the text we could read does not pin down the map back to d_k. We follow the reading that
keeps the query computation per head: a learned per-head ``d_q x d_k`` matrix after the Q
projection (with ``aug_activation="silu"``, SiLU before it, a small per-head MLP that makes the
widening more than a factorized W_Q). With ``q_head_dim=None`` (d_q = d_k) it is absent.

Computation: K (or V, whichever has fewer heads) is repeated to the other's head count, then one
call of :func:`attnzoo.softmax_attention` with GQA (``Hq / max(Hk, Hv)`` queries per KV head),
so the repeated copy costs O(N max(Hk, Hv) d_k) memory (no N x N held by the fast backends).
Cost O(N^2 Hq (d_k + d_v)) time, O(N C (Hq d_q + Hk d_k + Hv d_v)) for the projections.
Layout (B, N, C).

Example::

    >>> layer = DiffQKVAttention(512, num_heads=16, num_k_heads=2, num_v_heads=8, k_head_dim=32, v_head_dim=64, q_head_dim=64)
    >>> y = layer(torch.randn(2, 100, 512), causal=True)
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...errors import ParameterError
from ...functional.dense import softmax_attention
from .._checks import check_tokens, merge_heads, positive_int, split_heads
from .._registry import ModuleExample, register_module

__all__ = ["DiffQKVAttention"]


@register_module(
    "D4",
    paper="Sigma: Differential Rescaling of Query, Key and Value for Efficient Language Models (Lin et al., 2025)",
    layout="(B, N, C)",
    example=ModuleExample(
        dict(dim=512, num_heads=16, num_k_heads=2, num_v_heads=8, k_head_dim=32, v_head_dim=64, q_head_dim=64),
        inputs=[(1, 1024, 512)],
        test_inputs=[(2, 17, 32)],
        test_kwargs=dict(dim=32, num_heads=4, num_k_heads=1, num_v_heads=2, k_head_dim=4, v_head_dim=8, q_head_dim=6),
    ),
)
class DiffQKVAttention(nn.Module):
    """DiffQKV attention over tokens (B, N, C): fewer/smaller K heads than V heads, wider Q heads.

    Args:
        dim: channels C. num_heads: query heads Hq. num_k_heads: Hk (divides Hq). num_v_heads: Hv (divides Hq;
            Hk and Hv divide one another). k_head_dim: d_k. v_head_dim: d_v. q_head_dim: d_q (None: d_k, no
            augmentation). aug_activation: None or ``"silu"`` before the per-head d_q -> d_k map.
        qkv_bias: bias of the Q/K/V projections. backend: passed to :func:`attnzoo.softmax_attention`.

    ``forward(x, key_padding_mask=None, causal=False)``; ``key_padding_mask`` (B, N) bool, True = pad.
    Formula, cost and paper: see the module docstring.

    Example::

        >>> layer = DiffQKVAttention(64, num_heads=8, num_k_heads=2, num_v_heads=4, k_head_dim=8, v_head_dim=16)
        >>> y = layer(torch.randn(2, 50, 64))
    """

    def __init__(self, dim: int, num_heads: int = 8, *, num_k_heads: int = 1, num_v_heads: Optional[int] = None, k_head_dim: Optional[int] = None,
                 v_head_dim: Optional[int] = None, q_head_dim: Optional[int] = None, aug_activation: Optional[str] = None, qkv_bias: bool = False,
                 backend: Optional[str] = None):
        super().__init__()
        name = type(self).__name__
        self.dim = positive_int(name, "dim", dim)
        self.num_heads = positive_int(name, "num_heads", num_heads)
        self.num_k_heads = positive_int(name, "num_k_heads", num_k_heads)
        self.num_v_heads = num_heads if num_v_heads is None else positive_int(name, "num_v_heads", num_v_heads)
        for arg, value in (("num_k_heads", self.num_k_heads), ("num_v_heads", self.num_v_heads)):
            if num_heads % value:
                raise ParameterError(f"{name}: {arg}: expected a divisor of num_heads={num_heads}, got {value}", argument=arg)
        small, large = sorted((self.num_k_heads, self.num_v_heads))
        if large % small:
            raise ParameterError(f"{name}: num_k_heads: expected num_k_heads and num_v_heads to divide one another, got {self.num_k_heads} and {self.num_v_heads}",
                                 argument="num_k_heads")
        default = max(1, dim // num_heads)
        self.k_head_dim = default if k_head_dim is None else positive_int(name, "k_head_dim", k_head_dim)
        self.v_head_dim = default if v_head_dim is None else positive_int(name, "v_head_dim", v_head_dim)
        self.q_head_dim = self.k_head_dim if q_head_dim is None else positive_int(name, "q_head_dim", q_head_dim)
        if aug_activation not in (None, "silu"):
            raise ParameterError(f"{name}: aug_activation: expected None or 'silu', got {aug_activation!r}", argument="aug_activation")
        self.aug_activation, self.backend = aug_activation, backend
        self.q_proj = nn.Linear(dim, num_heads * self.q_head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(dim, self.num_k_heads * self.k_head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(dim, self.num_v_heads * self.v_head_dim, bias=qkv_bias)
        augmented = q_head_dim is not None and (self.q_head_dim != self.k_head_dim or aug_activation is not None)
        self.q_aug = nn.Parameter(torch.randn(num_heads, self.q_head_dim, self.k_head_dim) * self.q_head_dim**-0.5) if augmented else None
        self.proj = nn.Linear(num_heads * self.v_head_dim, dim)

    def forward(self, x: Tensor, key_padding_mask: Optional[Tensor] = None, causal: bool = False) -> Tensor:
        check_tokens(type(self).__name__, x, self.dim)
        q = split_heads(self.q_proj(x), self.num_heads)  # (B, Hq, N, d_q)
        if self.q_aug is not None:
            q = torch.einsum("bhnd,hde->bhne", F.silu(q) if self.aug_activation == "silu" else q, self.q_aug)
        k = split_heads(self.k_proj(x), self.num_k_heads)
        v = split_heads(self.v_proj(x), self.num_v_heads)
        if self.num_k_heads < self.num_v_heads:
            k = k.repeat_interleave(self.num_v_heads // self.num_k_heads, dim=1)
        elif self.num_v_heads < self.num_k_heads:
            v = v.repeat_interleave(self.num_k_heads // self.num_v_heads, dim=1)
        out = softmax_attention(q, k, v, causal=causal, key_padding_mask=key_padding_mask, backend=self.backend)
        return self.proj(merge_heads(out))

    def kv_cache_numbers_per_token(self) -> int:
        """Numbers a KV cache holds per token and layer: Hk d_k + Hv d_v."""
        return self.num_k_heads * self.k_head_dim + self.num_v_heads * self.v_head_dim

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, heads q/k/v={self.num_heads}/{self.num_k_heads}/{self.num_v_heads}, "
                f"head dims q/k/v={self.q_head_dim}/{self.k_head_dim}/{self.v_head_dim}, augmented_q={self.q_aug is not None}")
