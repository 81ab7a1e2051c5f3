"""Attention read as a graph (catalog V10): GIN aggregation over the attention matrix; token-aware pooling and ADL.

* :class:`GINAttention` (Buehler, "Graph-Aware Isomorphic Attention for Adaptive Dynamics in
  Transformers", 2025): each head's attention matrix ``A = softmax(q k^T / sqrt(d))`` is the
  adjacency of a graph over the tokens, and the head aggregates its values as a Graph Isomorphism
  Network layer (Xu et al., ICLR 2019, Eq. 4.1) instead of ``A v``::

      h_i = MLP((1 + eps_h) v_i + sum_j A_ij v_j)          (per head h; eps_h learned, 0 at init)

  with one MLP (d -> hidden -> d, GELU) shared by the heads, then the heads are concatenated and
  projected. ``threshold=tau`` keeps only the edges with ``A_ij > tau`` (the paper's sparse GIN
  variant, our reading: entries at or below tau set to 0, no renormalization). ``sum_j A_ij v_j``
  is one :func:`attnzoo.softmax_attention` call (no N x N held) when no threshold is set; with one
  the matrix is materialized. Cost O(N^2 C) time plus O(N C hidden) for the MLP. Layout (B, N, C);
  the self-loop is the residual ``(1 + eps) v_i`` (a self-attention without the residual is eps = -1
  and MLP = identity).

* :class:`TokenAwarePooling` and :class:`TokenAwareAttention` (TAP; Guo, Stutz, Schiele,
  "Robustifying Token Attention for Vision Transformers", ICCV 2023, Sec. 4.1): before attention,
  each token is replaced by a per-token mixture of dilated 3 x 3 average poolings of its
  neighbourhood, so the attention relies less on a few (over-focused) tokens::

      TAP(x)_p = sum_k w_k(p) AvgPool_{3x3, dilation k}(x)_p     (k = 0: the token itself)
      w(p) = softmax_k(Conv3x3(BN(Conv3x3(x)))_p / T)            (the "dilation predictor")

  following the official code (``DilatedAvgPooling``: zero padding, the mean of all 9 taps;
  ``DilationPredictor``: two bias-free 3x3 convs with BatchNorm between). Cost O(N C K) for the
  pooling and O(N C K) for the predictor. Layout (B, H, W, C).
  :func:`attention_diversification_loss` (ADL, Sec. 4.2) penalizes the cosine similarity between
  each token's attention vector and the average attention vector (both with entries below
  ``threshold / N`` set to 0, head-averaged), as the official ``AttentionDiversificationLoss``::

      L_ADL = mean_layers mean_{b, i} cos(A~_i, a~),   A = mean_heads attention,  a = mean_i A_i,
      A~ = A 1[A > tau],  a~ = a 1[a > tau],  tau = threshold / N

  :class:`TokenAwareAttention` (TAP, then multi-head attention) returns its attention on request
  (``forward(x, return_attention=True)``) for the loss.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...errors import ParameterError, ShapeError
from ...functional.dense import softmax_attention
from .._checks import check_tokens, merge_heads, positive_int, split_heads
from .._registry import ModuleExample, register_module

__all__ = ["GINAttention", "TokenAwarePooling", "TokenAwareAttention", "attention_diversification_loss"]


def _check_heads(owner: str, dim: int, num_heads: int) -> None:
    positive_int(owner, "dim", dim)
    if positive_int(owner, "num_heads", num_heads) and dim % num_heads:
        raise ParameterError(f"{owner}: num_heads: expected a divisor of dim={dim}, got {num_heads}", argument="num_heads")


@register_module(
    "V10",
    paper="Graph-Aware Isomorphic Attention for Adaptive Dynamics in Transformers (Buehler, 2025)",
    layout="(B, N, C)",
    example=ModuleExample(dict(dim=512, num_heads=8), inputs=[(1, 1024, 512)], test_inputs=[(2, 17, 32)], test_kwargs=dict(dim=32, num_heads=4)),
)
class GINAttention(nn.Module):
    """GIN-attention over tokens (B, N, C): each head aggregates ``MLP((1 + eps) v_i + sum_j A_ij v_j)``.

    Args:
        dim: channels C. num_heads: H. mlp_ratio: hidden width of the shared MLP, as a multiple of the head dim.
        threshold: None, or tau in [0, 1): edges with A_ij <= tau are dropped (sparse GIN).
        qkv_bias: bias of the qkv projection. backend: of :func:`attnzoo.softmax_attention` (no threshold).

    ``forward(x, key_padding_mask=None, causal=False)``. Formula, cost, paper: the module docstring.

    Example::

        >>> layer = GINAttention(64, num_heads=4)
        >>> y = layer(torch.randn(2, 50, 64))
    """

    def __init__(self, dim: int, num_heads: int = 8, *, mlp_ratio: float = 2.0, threshold: Optional[float] = None, qkv_bias: bool = False,
                 backend: Optional[str] = None):
        super().__init__()
        name = type(self).__name__
        _check_heads(name, dim, num_heads)
        if isinstance(mlp_ratio, bool) or not isinstance(mlp_ratio, (int, float)) or not mlp_ratio > 0:
            raise ParameterError(f"{name}: mlp_ratio: expected a positive number, got {mlp_ratio!r}", argument="mlp_ratio")
        if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 <= threshold < 1):
            raise ParameterError(f"{name}: threshold: expected None or a number in [0, 1), got {threshold!r}", argument="threshold")
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.threshold, self.backend = threshold, backend
        hidden = max(1, int(round(self.head_dim * mlp_ratio)))
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.eps = nn.Parameter(torch.zeros(num_heads))
        self.mlp = nn.Sequential(nn.Linear(self.head_dim, hidden), nn.GELU(), nn.Linear(hidden, self.head_dim))
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, key_padding_mask: Optional[Tensor] = None, causal: bool = False) -> Tensor:
        check_tokens(type(self).__name__, x, self.dim)
        q, k, v = (split_heads(t, self.num_heads) for t in self.qkv(x).chunk(3, dim=-1))
        if self.threshold is None:
            agg = softmax_attention(q, k, v, causal=causal, key_padding_mask=key_padding_mask, backend=self.backend)
        else:
            n = x.shape[1]
            s = q @ k.transpose(-1, -2) * self.head_dim**-0.5
            if causal:
                s = s.masked_fill(torch.ones(n, n, dtype=torch.bool, device=x.device).triu(1), float("-inf"))
            if key_padding_mask is not None:
                s = s.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
            a = torch.nan_to_num(torch.softmax(s, dim=-1))
            agg = (a * (a > self.threshold)) @ v
        h = self.mlp((1 + self.eps.view(1, -1, 1, 1)) * v + agg)
        return self.proj(merge_heads(h))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, threshold={self.threshold}"


def _check_grid(owner: str, x: Tensor, dim: int) -> None:
    if x.dim() != 4 or x.shape[-1] != dim:
        raise ShapeError(f"{owner}: x: expected (B, H, W, C={dim}), got shape {tuple(x.shape)}", argument="x")


@register_module(
    "V10",
    paper="Robustifying Token Attention for Vision Transformers (Guo, Stutz, Schiele, ICCV 2023)",
    layout="(B, H, W, C)",
    example=ModuleExample(dict(dim=96, num_scales=3), inputs=[(1, 56, 56, 96)], test_inputs=[(2, 8, 8, 16)], test_kwargs=dict(dim=16)),
)
class TokenAwarePooling(nn.Module):
    """Token-aware average pooling (TAP) of a token grid (B, H, W, C): a per-token mixture of dilated 3x3 average pools.

    Args:
        dim: channels C. num_scales: K branches, dilations 0 (identity), 1, ..., K - 1. temperature: T of the softmax.

    Formula, cost, paper: the module docstring.

    Example::

        >>> tap = TokenAwarePooling(96, num_scales=3)
        >>> y = tap(torch.randn(2, 14, 14, 96))
    """

    def __init__(self, dim: int, num_scales: int = 3, *, temperature: float = 1.0):
        super().__init__()
        name = type(self).__name__
        self.dim = positive_int(name, "dim", dim)
        self.num_scales = positive_int(name, "num_scales", num_scales)
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
            raise ParameterError(f"{name}: temperature: expected a positive number, got {temperature!r}", argument="temperature")
        self.temperature = float(temperature)
        self.predictor = nn.Sequential(
            nn.Conv2d(dim, num_scales, 3, padding=1, bias=False), nn.BatchNorm2d(num_scales), nn.Conv2d(num_scales, num_scales, 3, padding=1, bias=False)
        )

    def scale_weights(self, x: Tensor) -> Tensor:
        """(B, H, W, K): the per-token mixture weights (softmax over the K dilations)."""
        _check_grid(type(self).__name__, x, self.dim)
        logits = self.predictor(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return torch.softmax(logits / self.temperature, dim=-1)

    def forward(self, x: Tensor) -> Tensor:
        w = self.scale_weights(x)
        grid = x.permute(0, 3, 1, 2)
        c = grid.shape[1]
        out = w[..., 0:1].permute(0, 3, 1, 2) * grid
        box = torch.full((c, 1, 3, 3), 1.0 / 9.0, dtype=x.dtype, device=x.device)
        for d in range(1, self.num_scales):
            pooled = F.conv2d(grid, box, padding=d, dilation=d, groups=c)  # zero padding, mean of the 9 taps
            out = out + w[..., d : d + 1].permute(0, 3, 1, 2) * pooled
        return out.permute(0, 2, 3, 1)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_scales={self.num_scales}, temperature={self.temperature}"


@register_module(
    "V10",
    paper="Robustifying Token Attention for Vision Transformers (Guo, Stutz, Schiele, ICCV 2023)",
    layout="(B, H, W, C)",
    example=ModuleExample(dict(dim=96, num_heads=3), inputs=[(1, 56, 56, 96)], test_inputs=[(2, 8, 8, 16)], test_kwargs=dict(dim=16, num_heads=2)),
)
class TokenAwareAttention(nn.Module):
    """TAP then multi-head self-attention over a token grid (B, H, W, C); the attention feeds the ADL loss.

    ``forward(x, return_attention=False)``: with ``return_attention`` also the (B, heads, N, N) attention
    (materialized; otherwise :func:`attnzoo.softmax_attention` runs without it). The official block puts a
    LayerNorm between TAP and attention and adds the residual to the un-pooled x; this module is the token
    mixer (TAP, attention, projection) and leaves norm and residual to the block.

    Example::

        >>> layer = TokenAwareAttention(96, num_heads=3)
        >>> y, attn = layer(torch.randn(2, 14, 14, 96), return_attention=True)
        >>> loss = attention_diversification_loss([attn])
    """

    def __init__(self, dim: int, num_heads: int = 8, *, num_scales: int = 3, qkv_bias: bool = True, backend: Optional[str] = None):
        super().__init__()
        name = type(self).__name__
        _check_heads(name, dim, num_heads)
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.backend = backend
        self.tap = TokenAwarePooling(dim, num_scales)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, return_attention: bool = False) -> Union[Tensor, tuple[Tensor, Tensor]]:
        _check_grid(type(self).__name__, x, self.dim)
        b, h, w, c = x.shape
        tokens = self.tap(x).reshape(b, h * w, c)
        q, k, v = (split_heads(t, self.num_heads) for t in self.qkv(tokens).chunk(3, dim=-1))
        if return_attention:
            attn = torch.softmax(q @ k.transpose(-1, -2) * self.head_dim**-0.5, dim=-1)
            out = attn @ v
        else:
            out = softmax_attention(q, k, v, backend=self.backend)
        y = self.proj(merge_heads(out)).reshape(b, h, w, c)
        return (y, attn) if return_attention else y


def attention_diversification_loss(attentions: Union[Tensor, Sequence[Tensor]], threshold: float = 2.0) -> Tensor:
    """ADL: the mean cosine similarity of each token's attention with the average attention (lower = more diverse).

    Args:
        attentions: one (B, H, N, N) attention or a sequence of them (one per layer; N may differ).
        threshold: th; entries at or below th / N are set to 0 before the cosines (the official default 2).

    Returns a scalar (differentiable), the mean over layers of the mean over batch and tokens.
    """
    if isinstance(attentions, Tensor):
        attentions = [attentions]
    if not attentions:
        raise ParameterError("attention_diversification_loss: attentions: expected at least one (B, H, N, N) tensor", argument="attentions")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or threshold < 0:
        raise ParameterError(f"attention_diversification_loss: threshold: expected a number >= 0, got {threshold!r}", argument="threshold")
    total = None
    for a in attentions:
        if not isinstance(a, Tensor) or a.dim() != 4 or a.shape[-1] != a.shape[-2]:
            shown = tuple(a.shape) if isinstance(a, Tensor) else type(a).__name__
            raise ShapeError(f"attention_diversification_loss: attentions: expected (B, H, N, N) tensors, got shape {shown}", argument="attentions")
        per_token = a.mean(dim=1)  # (B, N, N)
        tau = threshold / per_token.shape[-1]
        average = per_token.mean(dim=1, keepdim=True)  # (B, 1, N)
        sim = F.cosine_similarity(average * (average > tau), per_token * (per_token > tau), dim=-1).mean()
        total = sim if total is None else total + sim
    return total / len(attentions)
