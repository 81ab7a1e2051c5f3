"""Low-rank factorized multi-head self-attention (Mehta, Rangwala and Ramakrishnan, "Low Rank
Factorization for Compact Multi-Head Self-Attention", arXiv 1912.00835, 2019: LAMA; catalog H4).

The paper's two savings (Sec. 3): the affinity of a token with a query is a bilinear form whose matrix
is factorized, ``f(h_i, c) = h_i^T W c`` with ``W = Q P^T`` of low rank (low-rank bilinear pooling, as
Kim et al.'s MLB), and every head queries one global context vector c (learned, as the word context
vector of hierarchical attention networks) instead of every token querying every other token. Head k
keeps its own rank-r slice of P and Q, so the h attention distributions cost one pair of projections::

    s_{i,k} = sum_{j in head k} (P^T c)_j (Q^T h_i)_j          P, Q in R^{C x h r}; W_k = Q_k P_k^T has rank r
    a_{i,k} = softmax_i(act(s_{i,k}))                           act = tanh (the paper), over the N tokens
    M_k     = sum_i a_{i,k} h_i                                  the k-th row of the sentence matrix M = A^T H

and the output is M, (B, h, C): h attention-pooled views of the sequence (the paper flattens M for the
classifier). With r = 1 this is the arithmetic of the public re-implementation
(JohnGiorgi/compact-multi-head-self-attention-pytorch, ``LAMA``, which returns A). The paper also
L2-normalises (its Eq. 3.13, which that code leaves out); the paper text was not available here to
confirm where, so it is an option, ``normalize_scores=True``, read as normalising each token's vector of
head scores s_i (over the h heads) before the activation; it is off by default.

Cost: O(N C h r) for the projections and O(N h C) for the pooling: linear in N, no N x N map;
parameters 2 C h r + C (against 4 C^2 for MHSA).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...errors import ParameterError, ShapeError
from .._checks import check_tokens, positive_int
from .._registry import ModuleExample, register_module

__all__ = ["LowRankFactorizedAttention"]


@register_module(
    "H4",
    paper="Low Rank Factorization for Compact Multi-Head Self-Attention (Mehta et al., 2019)",
    layout="(B, N, C) -> (B, h, C)",
    example=ModuleExample(
        dict(dim=512, num_heads=8, rank=4), inputs=[(1, 1024, 512)],
        test_inputs=[(2, 17, 32)], test_kwargs=dict(dim=32, rank=2),
        output=lambda shapes: (shapes[0][0], 8, shapes[0][-1]),  # h = 8 heads at both sizes
    ),
)
class LowRankFactorizedAttention(nn.Module):
    """LAMA: h attention distributions over the tokens from a low-rank bilinear form with a learned
    global context vector; returns the h attention-pooled token summaries (B, h, C).

    ``a_{:,k} = softmax_i(tanh(sum_{j in k} (P^T c)_j (Q^T h_i)_j))``, ``M_k = sum_i a_{i,k} h_i`` (Sec. 3).
    Cost: O(N C h r) + O(N h C), linear in N. Layout: (B, N, C) -> (B, h, C).

    Args:
        dim: channels C. num_heads: h. rank: r, the rank of each head's bilinear matrix (the
            re-implementation: 1). activation: ``"tanh"`` (the paper) or ``None``.
        normalize_scores: L2-normalise each token's h head scores before the activation (the
            reading of Eq. 3.13 above; off by default).

    ``forward(x, key_padding_mask=None)``: x (B, N, C); ``key_padding_mask`` (B, N) bool, True = pad.
    :meth:`attention` returns the weights A (B, h, N).

    Example::

        >>> layer = LowRankFactorizedAttention(256, num_heads=4)
        >>> m = layer(torch.randn(2, 40, 256))       # (2, 4, 256)
        >>> sentence = m.flatten(1)                  # the classifier's input, as in the paper
    """

    def __init__(self, dim: int, num_heads: int = 8, *, rank: int = 1, activation: Optional[str] = "tanh", normalize_scores: bool = False):
        super().__init__()
        name = type(self).__name__
        self.dim = positive_int(name, "dim", dim)
        self.num_heads = positive_int(name, "num_heads", num_heads)
        self.rank = positive_int(name, "rank", rank)
        if activation not in ("tanh", None):
            raise ParameterError(f"{name}: activation: expected 'tanh' or None, got {activation!r}", argument="activation")
        self.activation, self.normalize_scores = activation, bool(normalize_scores)
        self.p = nn.Parameter(nn.init.xavier_uniform_(torch.empty(dim, num_heads * rank)))
        self.q = nn.Parameter(nn.init.xavier_uniform_(torch.empty(dim, num_heads * rank)))
        self.context = nn.Parameter(nn.init.xavier_uniform_(torch.empty(dim, 1)).squeeze(1))

    def scores(self, x: Tensor) -> Tensor:
        """s (B, N, h): the low-rank bilinear affinity of each token with the context, per head."""
        b, n, _ = x.shape
        pc = (self.context @ self.p).view(self.num_heads, self.rank)  # (h, r)
        qh = (x @ self.q).view(b, n, self.num_heads, self.rank)  # (B, N, h, r)
        s = (qh * pc).sum(-1)
        if self.normalize_scores:
            s = F.normalize(s, dim=-1)
        return torch.tanh(s) if self.activation == "tanh" else s

    def attention(self, x: Tensor, key_padding_mask: Optional[Tensor] = None) -> Tensor:
        """A (B, h, N): per head, a distribution over the tokens."""
        name = type(self).__name__
        check_tokens(name, x, self.dim)
        s = self.scores(x).transpose(1, 2)
        if key_padding_mask is not None:
            if key_padding_mask.shape != x.shape[:2] or key_padding_mask.dtype != torch.bool:
                raise ShapeError(f"{name}: key_padding_mask: expected bool (B, N) = {tuple(x.shape[:2])}, got {tuple(key_padding_mask.shape)}", argument="key_padding_mask")
            s = s.masked_fill(key_padding_mask[:, None, :], float("-inf"))
        return torch.softmax(s, dim=-1)

    def forward(self, x: Tensor, key_padding_mask: Optional[Tensor] = None) -> Tensor:
        return self.attention(x, key_padding_mask) @ x

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, rank={self.rank}, activation={self.activation}, normalize_scores={self.normalize_scores}"
