"""Selective multi-head attention over decomposed experts (Yang, Lian and Li, "Union of Experts:
Adapting Hierarchical Routing to Equivalently Decomposed Transformer", arXiv 2503.02495, 2025: the
SMHA of UoE; catalog H6).

UoE decomposes multi-head attention "equivalently" into experts by the tensor-parallel partition of
its matrices: expert e is head e, with its column slices of W_q, W_k, W_v and its row slice W_o^e of
the output projection, so that ``MHA(X) = sum_e head_e(X) W_o^e`` exactly. A router then selects, per
token, k of the h experts (expert selection), and each expert attends only over the tokens that chose
it (patch-wise data selection)::

    p_t   = softmax(W_g x_t + b_g)                              router over the h heads
    S_e   = {t : e in top-k(p_t)}                               the tokens routed to head e
    head_e(t) = sum_{s in S_e} softmax_{s in S_e}(q_e(t) . k_e(s) / sqrt(d)) v_e(s),    t in S_e
    y_t   = sum_{e : t in S_e} g_{t,e} head_e(t) W_o^e + b_o

Reading of the official code (YujiaoYang-work/UoE, ``language_modeling/model/attention/SMHA_v3.py``,
``SwitchGate`` + ``preprocess`` + ``SparseSelfAttention``): k = h / 2 by default; tokens are gathered
per head in their original order (so a causal mask on the gathered sequence is the causal mask on
positions), attend within the head, are projected by W_o^e and scatter-added back. Two departures,
both documented choices:

* the official output is not weighted by the router (the gate only selects; its score normalisation
  over the batch axis, times a capacity, feeds nothing differentiable), so the router gets no gradient
  there. Here ``weighted=True`` (default) multiplies by ``g_{t,e} = k p_{t,e} / sum_{top-k} p_t``
  (1 on average; all k = h heads with a uniform router gives plain MHA); ``weighted=False`` is the
  official hard selection (g = 1);
* the official pads every head's gathered set to the largest set in the batch with unselected tokens
  (the top scores of zeros), so a head's attention there depends on the batch; here S_e is exact.

A Switch-style load-balance loss ``h sum_e f_e P_e`` (f_e the fraction of tokens routed to head e,
P_e its mean probability; = k for a uniform router) is left in ``aux_loss`` in training mode; the
official v3 gate returns none.

Cost: per head, attention over |S_e| tokens, O(sum_e |S_e|^2 d) = O(k^2 N^2 C / h^2) when balanced,
against O(N^2 C) for MHA; projections O(N C^2). This module computes the exact arithmetic with a
dense (B, h, N, N) mask (the official speed comes from the gather, not reproduced here).
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

__all__ = ["SelectiveMultiHeadAttention"]


@register_module(
    "H6",
    paper="Union of Experts: Adapting Hierarchical Routing to Equivalently Decomposed Transformer (Yang et al., 2025)",
    layout="(B, N, C)",
    example=ModuleExample(
        dict(dim=512, num_heads=8), inputs=[(1, 1024, 512)],  # k = 4 of 8 heads per token
        test_inputs=[(2, 17, 32)], test_kwargs=dict(dim=32, num_heads=4),
    ),
)
class SelectiveMultiHeadAttention(nn.Module):
    """UoE's selective multi-head attention over tokens (B, N, C): a router picks k heads per token,
    and each head attends only among the tokens that picked it.

    ``y_t = sum_{e : t in S_e} g_{t,e} head_e(t) W_o^e + b_o`` with head e's softmax restricted to S_e,
    the tokens whose top-k holds e. Cost: O(sum_e |S_e|^2 d + N C^2). Layout: (B, N, C) -> (B, N, C).

    Args:
        dim: channels C. num_heads: h heads (experts); head_dim = C / h.
        top_k: k heads per token (default h // 2, the official). weighted: weigh each head's output by
            the renormalised router probability (default; see the module notes) or not (official).
        qkv_bias: bias of the q, k, v projections. backend: passed to :func:`attnzoo.softmax_attention`.

    ``forward(x, causal=False)`` returns (B, N, C); :meth:`route` gives the selection (B, N, h) bool
    and the gates (B, N, h).

    Example::

        >>> layer = SelectiveMultiHeadAttention(512, num_heads=8, top_k=4)
        >>> y = layer(torch.randn(2, 256, 512), causal=True)
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        *,
        top_k: Optional[int] = None,
        weighted: bool = True,
        qkv_bias: bool = True,
        backend: Optional[str] = None,
    ):
        super().__init__()
        name = type(self).__name__
        self.dim = positive_int(name, "dim", dim)
        self.num_heads = positive_int(name, "num_heads", num_heads)
        if dim % num_heads:
            raise ParameterError(f"{name}: num_heads: expected a divisor of dim={dim}, got {num_heads}", argument="num_heads")
        top_k = max(1, num_heads // 2) if top_k is None else top_k
        if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= num_heads:
            raise ParameterError(f"{name}: top_k: expected an int in [1, num_heads={num_heads}], got {top_k!r}", argument="top_k")
        self.top_k, self.weighted, self.backend = top_k, bool(weighted), backend
        self.head_dim = dim // num_heads
        self.router = nn.Linear(dim, num_heads)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.aux_loss: Optional[Tensor] = None

    def route(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(selected, gates)``, both (B, N, h): the top-k heads of each token and their weights."""
        probs = F.softmax(self.router(x), dim=-1)
        idx = probs.topk(self.top_k, dim=-1).indices
        selected = torch.zeros_like(probs, dtype=torch.bool).scatter_(-1, idx, True)
        if self.training:
            frac = selected.to(probs.dtype).reshape(-1, self.num_heads).mean(0)
            self.aux_loss = self.num_heads * (frac * probs.reshape(-1, self.num_heads).mean(0)).sum()
        if self.weighted:
            kept = probs * selected
            gates = kept / kept.sum(-1, keepdim=True).clamp_min(torch.finfo(kept.dtype).eps) * self.top_k
        else:
            gates = selected.to(probs.dtype)
        return selected, gates

    def forward(self, x: Tensor, causal: bool = False) -> Tensor:
        check_tokens(type(self).__name__, x, self.dim)
        self.aux_loss = None
        selected, gates = self.route(x)
        sel = selected.transpose(1, 2)  # (B, h, N)
        n = x.shape[1]
        eye = torch.eye(n, dtype=torch.bool, device=x.device)
        # a routed query sees the routed keys; an unrouted one (gate 0) sees itself, to stay finite
        allowed = sel[:, :, None, :] | (eye & ~sel[:, :, :, None])
        bias = torch.zeros(allowed.shape, dtype=x.dtype, device=x.device).masked_fill_(~allowed, float("-inf"))
        q, k, v = (split_heads(t, self.num_heads) for t in self.qkv(x).chunk(3, dim=-1))
        heads = softmax_attention(q, k, v, bias=bias, causal=causal, backend=self.backend)
        heads = heads * gates.transpose(1, 2).unsqueeze(-1)
        return self.proj(merge_heads(heads))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, top_k={self.top_k}, weighted={self.weighted}"
