"""Native Sparse Attention as a layer, with the paper's learned parts (catalog S2; Yuan et al., DeepSeek,
arXiv 2502.11089, Sec. 3.3).

:func:`attnzoo.nsa_attention` computes the three branches from q, k, v; this module adds what the
paper learns around them:

* the compressor phi of Eq. 7: ``K_cmp = { phi(k[i d : i d + l]) : 0 <= i <= (t - l) / d }``, "a
  learnable MLP with intra-block position encoding". Here: a position embedding (l, D) is added
  to the l keys of a block, the block is flattened to l * D features and mapped to one key by
  ``Linear(l D, hidden) -> GELU -> Linear(hidden, D)``; the values have their own phi. The paper
  does not say whether phi is shared by the heads; it is shared here (one MLP per k and v, as the
  compression acts on each head's keys alike), so its size does not grow with the heads.
* the gates of Eq. 5: ``g_c = sigmoid(MLP(x_t))`` per head and branch; a linear map of the layer
  input to 3 H logits (the smallest MLP the text allows).

Cost: the functional form's O(N^2 D / d + N n l' D + N w D), plus O(N / d * l D * hidden) for phi.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from ...errors import ParameterError
from ...functional.sparse import nsa_attention
from ...functional.sparse.nsa import compressed_count
from .._checks import check_tokens, merge_heads, positive_int, split_heads
from .._registry import ModuleExample, register_module

__all__ = ["NativeSparseAttention", "BlockCompressor"]


class BlockCompressor(nn.Module):
    """phi of NSA's Eq. 7: each block of ``block`` tokens every ``stride`` (B, H, N, D) -> one token (B, H, n_cmp, D).

    ``phi(block) = W2 GELU(W1 flatten(block + P) + b1) + b2`` with a learned intra-block position
    embedding P (block, D). Only complete blocks are compressed: ``n_cmp = (N - block) // stride + 1``.
    """

    def __init__(self, head_dim: int, block: int, stride: int, hidden: Optional[int] = None):
        super().__init__()
        name = type(self).__name__
        self.head_dim, self.block, self.stride = positive_int(name, "head_dim", head_dim), positive_int(name, "block", block), positive_int(name, "stride", stride)
        hidden = positive_int(name, "hidden", hidden) if hidden is not None else 4 * head_dim
        self.position = nn.Parameter(torch.randn(block, head_dim) * 0.02)
        self.mlp = nn.Sequential(nn.Linear(block * head_dim, hidden), nn.GELU(), nn.Linear(hidden, head_dim))

    def forward(self, x: Tensor) -> Tensor:
        count = compressed_count(x.shape[2], self.block, self.stride)
        windows = x.unfold(2, self.block, self.stride)[:, :, :count].transpose(-1, -2)  # (B, H, n_cmp, block, D)
        return self.mlp((windows + self.position).flatten(-2))

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, block={self.block}, stride={self.stride}"


@register_module(
    "S2",
    paper="Native Sparse Attention: Hardware-Aligned and Natively Trainable Sparse Attention (Yuan et al., 2025)",
    layout="(B, N, C)",
    # bench: the paper's l', l, d, n, w (64, 32, 16, 16, 512) with GQA 8:2
    example=ModuleExample(
        dict(d_model=512, num_heads=8, num_kv_heads=2), inputs=[(1, 1024, 512)], test_inputs=[(2, 17, 32)],
        test_kwargs=dict(d_model=32, num_heads=2, num_kv_heads=1, block_size=4, compress_block=4, compress_stride=2, top_n=2, window=4),
    ),
)
class NativeSparseAttention(nn.Module):
    """Causal NSA layer: projections, learned compressor phi, per-head sigmoid gates, the three branches, output projection.

    Args:
        d_model: channels C of the input (B, N, C). num_heads: query heads H.
        num_kv_heads: key/value heads (a divisor of H; GQA groups share one block selection, as the paper's
            kernel does); default H. head_dim: default C // H.
        block_size, compress_block, compress_stride, top_n, window: the paper's l', l, d, n, w
            (Sec. 4.1: 64, 32, 16, 16, 512).
        compress_hidden: phi's hidden width (default 4 * head_dim). backend: passed to the functional form.

    Example::

        >>> layer = NativeSparseAttention(256, num_heads=8, num_kv_heads=2, top_n=8, window=128)
        >>> y = layer(torch.randn(2, 1024, 256))  # (B, N, C)
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        num_kv_heads: Optional[int] = None,
        head_dim: Optional[int] = None,
        *,
        block_size: int = 64,
        compress_block: int = 32,
        compress_stride: int = 16,
        top_n: int = 16,
        window: int = 512,
        compress_hidden: Optional[int] = None,
        backend: Optional[str] = None,
    ):
        super().__init__()
        name = type(self).__name__
        self.d_model, self.num_heads = positive_int(name, "d_model", d_model), positive_int(name, "num_heads", num_heads)
        self.num_kv_heads = positive_int(name, "num_kv_heads", num_kv_heads if num_kv_heads is not None else num_heads)
        if num_heads % self.num_kv_heads:
            raise ParameterError(f"{name}: num_kv_heads: expected a divisor of num_heads={num_heads}, got {self.num_kv_heads}", argument="num_kv_heads")
        if head_dim is None and d_model % num_heads:
            raise ParameterError(f"{name}: num_heads: expected a divisor of d_model={d_model} (or pass head_dim), got {num_heads}", argument="num_heads")
        self.head_dim = positive_int(name, "head_dim", head_dim) if head_dim is not None else d_model // num_heads
        self.sparsity = {
            "block_size": positive_int(name, "block_size", block_size),
            "compress_block": positive_int(name, "compress_block", compress_block),
            "compress_stride": positive_int(name, "compress_stride", compress_stride),
            "top_n": positive_int(name, "top_n", top_n),
            "window": positive_int(name, "window", window),
        }
        self.backend = backend
        inner, kv_inner = num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(d_model, inner), nn.Linear(d_model, kv_inner), nn.Linear(d_model, kv_inner)
        self.k_compressor = BlockCompressor(self.head_dim, compress_block, compress_stride, compress_hidden)
        self.v_compressor = BlockCompressor(self.head_dim, compress_block, compress_stride, compress_hidden)
        self.gate = nn.Linear(d_model, 3 * num_heads)
        self.out_proj = nn.Linear(inner, d_model)

    def gates(self, x: Tensor) -> Tensor:
        """(B, N, C) -> (B, H, N, 3): sigmoid gates of the compression, selection and window branches."""
        b, n, _ = x.shape
        return torch.sigmoid(self.gate(x)).view(b, n, self.num_heads, 3).transpose(1, 2)

    def forward(self, x: Tensor, key_padding_mask: Optional[Tensor] = None) -> Tensor:
        """``x`` (B, N, C) -> (B, N, C); ``key_padding_mask`` (B, N) True = pad, right padding only."""
        check_tokens(type(self).__name__, x, self.d_model)
        q = split_heads(self.q_proj(x), self.num_heads)
        k, v = split_heads(self.k_proj(x), self.num_kv_heads), split_heads(self.v_proj(x), self.num_kv_heads)
        compressed = (self.k_compressor(k), self.v_compressor(v))
        out = nsa_attention(q, k, v, gates=self.gates(x), compressed_kv=compressed, key_padding_mask=key_padding_mask, backend=self.backend, **self.sparsity)
        return self.out_proj(merge_heads(out))

    def extra_repr(self) -> str:
        options = ", ".join(f"{k}={v}" for k, v in self.sparsity.items())
        return f"d_model={self.d_model}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, {options}"
