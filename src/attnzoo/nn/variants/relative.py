"""Relative-position attention variants (catalog V7): URPE and relative convolutional MHA.

* :class:`UniversalRPEAttention` (URPE; Luo et al., "Your Transformer May Not be as Powerful as You
  Expect", NeurIPS 2022, Sec. 4, Eq. 8): the softmax attention with a relative bias ``B`` is
  multiplied elementwise by a learned Toeplitz matrix ``C`` (``C_ij = c_{j-i}``, per head)::

      Attn_URPE(X) = (softmax(X W_Q (X W_K)^T / sqrt(d) + B) . C) X W_V,   B_ij = b_{j-i},  C_ij = c_{j-i}

  ``P . C`` is no longer right-stochastic, which is the point of the paper (Theorem 2: softmax
  alone keeps RPE Transformers from being universal approximators), so the paper does not
  renormalize; ``renormalize=True`` divides each row of ``P . C`` by its sum (rows then sum to 1
  again; an option we add, not the paper's). The official code (a fairseq fork,
  ``multihead_attention.py``) applies ``C`` after the softmax and before dropout, initializes
  ``C = 1`` with ``--constant-init-ur-attn`` (then URPE starts as plain RPE attention; our
  default) and zeroes padded columns; with ``--ur-attn-unique`` it keeps one entry per offset,
  our choice (offsets clipped to +-``max_distance``). Cost O(N^2 H) time and memory: ``P . C``
  is materialized (no tiled form: the Hadamard product acts after the normalization).

* :class:`RelativeConvAttention` (RCMHA; Sugiharto et al., "RCMHA: Relative Convolutional
  Multi-Head Attention for Natural Language Modelling", 2023): the projected Q, K, V pass
  through a depthwise convolution along the sequence (kernel 3 by default, per channel, as
  Primer's multi-DConv-head attention; causal padding when ``causal=True``), then the scores
  carry Transformer-XL's relative terms (Dai et al. 2019, Sec. 3.3, terms (a)-(d), with learned
  relative embeddings as in the RMHA the paper builds on)::

      q~, k~, v~ = DWConv(x W_Q), DWConv(x W_K), DWConv(x W_V)
      s_ij = ((q~_i + u) . k~_j + (q~_i + w) . r_{i-j}) / sqrt(d),   out = softmax(s) v~

  with ``u``, ``w`` (H, d) learned biases and ``r`` a learned table of 2 ``max_distance`` + 1
  relative embeddings (H, d) (offsets clipped). The relative part ``(q~_i + w) . r_{i-j}`` is
  an additive bias (B, H, N, N) for :func:`attnzoo.softmax_attention`; cost O(N^2 H d) time,
  O(B H N^2) memory for that bias, plus O(N C k) for the convolutions.

Layout of both: tokens (B, N, C); ``forward(x, key_padding_mask=None, causal=False)``.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...errors import ParameterError, ShapeError
from ...functional.dense import softmax_attention
from .._checks import check_tokens, merge_heads, odd_kernel, positive_int, split_heads
from .._registry import ModuleExample, register_module

__all__ = ["UniversalRPEAttention", "RelativeConvAttention", "relative_index"]


def relative_index(q_len: int, kv_len: int, max_distance: int, device: Optional[torch.device] = None) -> Tensor:
    """(Nq, Nk) long: ``clip(j - i, -max_distance, max_distance) + max_distance``, an index into a table of 2 max_distance + 1."""
    i = torch.arange(q_len, device=device)[:, None]
    j = torch.arange(kv_len, device=device)[None, :]
    return (j - i).clamp(-max_distance, max_distance) + max_distance


def _check_heads(owner: str, dim: int, num_heads: int) -> None:
    positive_int(owner, "dim", dim)
    if positive_int(owner, "num_heads", num_heads) and dim % num_heads:
        raise ParameterError(f"{owner}: num_heads: expected a divisor of dim={dim}, got {num_heads}", argument="num_heads")


def _mask(owner: str, x: Tensor, key_padding_mask: Optional[Tensor], causal: bool) -> Optional[Tensor]:
    """(B|1, 1, N, N) bool, True = hidden, or None."""
    b, n, _ = x.shape
    hidden = None
    if causal:
        hidden = torch.ones(n, n, dtype=torch.bool, device=x.device).triu(1)[None, None]
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, Tensor) or key_padding_mask.dtype != torch.bool or tuple(key_padding_mask.shape) != (b, n):
            raise ShapeError(f"{owner}: key_padding_mask: expected a bool tensor of shape (B, N) = ({b}, {n})", argument="key_padding_mask")
        pad = key_padding_mask[:, None, None, :]
        hidden = pad if hidden is None else hidden | pad
    return hidden


@register_module(
    "V7",
    paper="Your Transformer May Not be as Powerful as You Expect (Luo et al., NeurIPS 2022)",
    layout="(B, N, C)",
    example=ModuleExample(dict(dim=512, num_heads=8, max_distance=128), inputs=[(1, 1024, 512)], test_inputs=[(2, 17, 32)],
                          test_kwargs=dict(dim=32, num_heads=4, max_distance=8)),
)
class UniversalRPEAttention(nn.Module):
    """Universal RPE-based attention (URPE): ``(softmax(QK^T/sqrt(d) + B) . C) V`` with Toeplitz B and C, over tokens (B, N, C).

    Args:
        dim: channels C. num_heads: H. max_distance: offsets |j - i| beyond it share the last entry of b and c.
        renormalize: divide each row of ``P . C`` by its sum (not the paper's; see the module docstring).
        qkv_bias: bias of the qkv projection.

    Formula, cost, paper: the module docstring. ``attention_matrix(x)`` returns ``P . C`` (B, H, N, N).

    Example::

        >>> layer = UniversalRPEAttention(64, num_heads=4)
        >>> y = layer(torch.randn(2, 50, 64), causal=True)
    """

    def __init__(self, dim: int, num_heads: int = 8, *, max_distance: int = 128, renormalize: bool = False, qkv_bias: bool = False):
        super().__init__()
        name = type(self).__name__
        _check_heads(name, dim, num_heads)
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.max_distance = positive_int(name, "max_distance", max_distance)
        if not isinstance(renormalize, bool):
            raise ParameterError(f"{name}: renormalize: expected a bool, got {renormalize!r}", argument="renormalize")
        self.renormalize = renormalize
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.rel_bias = nn.Parameter(torch.zeros(num_heads, 2 * max_distance + 1))  # b_{j-i}
        self.toeplitz = nn.Parameter(torch.ones(num_heads, 2 * max_distance + 1))  # c_{j-i}, C = 1 at init
        self.proj = nn.Linear(dim, dim)

    def attention_matrix(self, x: Tensor, key_padding_mask: Optional[Tensor] = None, causal: bool = False) -> Tensor:
        """``P . C`` (B, H, N, N) (row-normalized when ``renormalize``)."""
        name = type(self).__name__
        check_tokens(name, x, self.dim)
        q, k, _ = (split_heads(t, self.num_heads) for t in self.qkv(x).chunk(3, dim=-1))
        return self._weights(q, k, x, key_padding_mask, causal)

    def _weights(self, q: Tensor, k: Tensor, x: Tensor, key_padding_mask: Optional[Tensor], causal: bool) -> Tensor:
        n = x.shape[1]
        index = relative_index(n, n, self.max_distance, x.device)
        s = q @ k.transpose(-1, -2) * self.head_dim**-0.5 + self.rel_bias[:, index]
        hidden = _mask(type(self).__name__, x, key_padding_mask, causal)
        if hidden is not None:
            s = s.masked_fill(hidden, float("-inf"))
        p = torch.softmax(s, dim=-1)
        if hidden is not None:
            p = p.masked_fill(hidden, 0.0)  # a fully hidden row is 0, not NaN
        w = p * self.toeplitz[:, index]
        if self.renormalize:
            total = w.sum(-1, keepdim=True)
            w = w / torch.where(total == 0, torch.ones_like(total), total)
        return w

    def forward(self, x: Tensor, key_padding_mask: Optional[Tensor] = None, causal: bool = False) -> Tensor:
        check_tokens(type(self).__name__, x, self.dim)
        q, k, v = (split_heads(t, self.num_heads) for t in self.qkv(x).chunk(3, dim=-1))
        w = self._weights(q, k, x, key_padding_mask, causal)
        return self.proj(merge_heads(w @ v))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, max_distance={self.max_distance}, renormalize={self.renormalize}"


@register_module(
    "V7",
    paper="RCMHA: Relative Convolutional Multi-Head Attention for Natural Language Modelling (Sugiharto et al., 2023)",
    layout="(B, N, C)",
    example=ModuleExample(dict(dim=512, num_heads=8, max_distance=128), inputs=[(1, 1024, 512)], test_inputs=[(2, 17, 32)],
                          test_kwargs=dict(dim=32, num_heads=4, max_distance=8)),
)
class RelativeConvAttention(nn.Module):
    """Relative convolutional multi-head attention (RCMHA): depthwise-convolved Q/K/V and Transformer-XL relative scores, tokens (B, N, C).

    Args:
        dim: channels C. num_heads: H. kernel_size: of the depthwise convolutions (odd). max_distance: relative
            offsets clipped to +-max_distance. qkv_bias: bias of the projections. backend: of :func:`attnzoo.softmax_attention`.

    Formula, cost, paper: the module docstring.

    Example::

        >>> layer = RelativeConvAttention(64, num_heads=4)
        >>> y = layer(torch.randn(2, 50, 64), causal=True)
    """

    def __init__(self, dim: int, num_heads: int = 8, *, kernel_size: int = 3, max_distance: int = 128, qkv_bias: bool = False,
                 backend: Optional[str] = None):
        super().__init__()
        name = type(self).__name__
        _check_heads(name, dim, num_heads)
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.kernel_size = odd_kernel(name, kernel_size, optional=False)
        self.max_distance = positive_int(name, "max_distance", max_distance)
        self.backend = backend
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        # one depthwise kernel per channel of q, k and v (3 C channels), no bias
        self.dwconv = nn.Parameter(torch.randn(3 * dim, 1, kernel_size) * kernel_size**-0.5)
        self.u = nn.Parameter(torch.zeros(num_heads, self.head_dim))  # content bias
        self.w = nn.Parameter(torch.zeros(num_heads, self.head_dim))  # position bias
        self.rel = nn.Parameter(torch.randn(2 * max_distance + 1, num_heads, self.head_dim) * 0.02)  # r_{i-j}
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, key_padding_mask: Optional[Tensor] = None, causal: bool = False) -> Tensor:
        name = type(self).__name__
        check_tokens(name, x, self.dim)
        b, n, c = x.shape
        y = self.qkv(x)
        if key_padding_mask is not None:  # padded tokens must not leak into their neighbours through the convolution
            _mask(name, x, key_padding_mask, False)
            y = y.masked_fill(key_padding_mask[..., None], 0.0)
        k = self.kernel_size
        pad = (k - 1, 0) if causal else ((k - 1) // 2, (k - 1) // 2)
        y = F.conv1d(F.pad(y.transpose(1, 2), pad), self.dwconv, groups=3 * c).transpose(1, 2)
        q, kk, v = (split_heads(t, self.num_heads) for t in y.chunk(3, dim=-1))
        scale = self.head_dim**-0.5
        # (q_i + w) . r_{i-j} for every offset, then gathered: rel[m] is r at i - j = m - max_distance, so the
        # flipped table is indexed by j - i + max_distance (relative_index); O(B H N (2 max_distance + 1)) before the gather
        by_offset = torch.einsum("bhid,mhd->bhim", q + self.w[None, :, None, :], self.rel.flip(0))
        index = relative_index(n, n, self.max_distance, x.device)
        bias = torch.gather(by_offset, -1, index.expand(b, self.num_heads, n, n)) * scale
        return self.proj(merge_heads(softmax_attention(q + self.u[None, :, None, :], kk, v, bias=bias, causal=causal,
                                                       key_padding_mask=key_padding_mask, scale=scale, backend=self.backend)))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, kernel_size={self.kernel_size}, max_distance={self.max_distance}"
