"""Strip self-attention (Xu et al., "S2AFormer: Strip Self-Attention for Efficient Vision Transformer",
IEEE TIP 2025, arXiv 2505.22195), catalog M12.

Self-attention made cheap on two axes at once: the keys and values are spatially reduced (a
depth-wise convolution with stride r, so N / r^2 of them), and the queries and keys are
compressed along channels (a thin ``d_qk``-wide projection per head, the "strips"), while the
values keep their full width. No official code was released (the paper is the only spec; none is
in the code index); the layer below is the paper's description made concrete, and the docstring
says which choices are ours.
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from ...errors import ParameterError
from ...functional import softmax_attention
from .._checks import heads_divide, merge_heads, positive_int, split_heads
from .._registry import ModuleExample, register_module
from ._grid_ops import check_divisible, check_grid

__all__ = ["StripSelfAttention"]


@register_module(
    "M12",
    paper="S2AFormer: Strip Self-Attention for Efficient Vision Transformer (Xu et al., IEEE TIP 2025)",
    layout="(B, H, W, C)",
    example=ModuleExample(
        dict(dim=96, num_heads=2, sr_ratio=4, qk_reduction=4),
        inputs=[(1, 56, 56, 96)],
        test_inputs=[(2, 8, 8, 16)],
        test_kwargs=dict(dim=16, num_heads=2, sr_ratio=2, qk_reduction=2),
    ),
)
class StripSelfAttention(nn.Module):
    """Strip self-attention: K, V spatially reduced by a strided depth-wise conv; Q, K channel-compressed.

    With ``x_r = LN(DWConv_{r x r, stride r}(x))`` (N / r^2 tokens), ``h`` heads, value width
    ``d = C / h`` and query/key width ``d_qk = C / (h * qk_reduction)`` per head (the paper's SSA description)::

        Q = x W_q          (C -> h d_qk)       the compressed queries
        K = x_r W_k        (C -> h d_qk)       reduced and compressed keys
        V = x_r W_v        (C -> C)            reduced values, full width
        y = softmax(Q K^T / sqrt(d_qk)) V W_o

    Our choices where the paper's text leaves them open (no code exists): the spatial reduction is
    a depth-wise r x r conv with stride r and bias followed by a LayerNorm (``reduce_norm``), as
    the "convolution-based spatial reduction" the paper ablates; the channel compression is a
    linear projection to ``C / qk_reduction`` channels shared across heads; biases on q/k/v follow
    ``qkv_bias``.

    Cost: O(N (N / r^2) C (1 + 1 / qk_reduction)) for the attention, against O(2 N^2 C) for
    plain attention; O(N C^2 (2 + 2 / qk_reduction)) for the projections; O(N C) for the reduction.
    Layout: ``(B, H, W, C)`` in and out; H and W multiples of ``sr_ratio``.

    Args:
        dim: C. num_heads: h. sr_ratio: r (1 keeps every key). qk_reduction: C / (query/key width).
        qkv_bias: bias of the q/k/v projections. reduce_norm: the LayerNorm after the reduction.
        backend: passed to :func:`attnzoo.softmax_attention`.

    Example::

        >>> ssa = StripSelfAttention(64, num_heads=2, sr_ratio=4, qk_reduction=4)
        >>> y = ssa(torch.randn(2, 32, 32, 64))
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 1,
        sr_ratio: int = 4,
        qk_reduction: int = 4,
        qkv_bias: bool = True,
        reduce_norm: bool = True,
        backend: Optional[str] = None,
    ):
        super().__init__()
        name = type(self).__name__
        positive_int(name, "dim", dim)
        heads_divide(name, dim, num_heads)
        positive_int(name, "sr_ratio", sr_ratio)
        positive_int(name, "qk_reduction", qk_reduction)
        if dim % (qk_reduction * num_heads):
            raise ParameterError(
                f"{name}: qk_reduction: expected qk_reduction * num_heads to divide dim={dim}, got {qk_reduction}",
                argument="qk_reduction",
            )
        self.dim, self.num_heads, self.sr_ratio, self.qk_reduction = dim, num_heads, sr_ratio, qk_reduction
        self.qk_dim = dim // qk_reduction
        self.backend = backend
        self.q = nn.Linear(dim, self.qk_dim, bias=qkv_bias)
        self.k = nn.Linear(dim, self.qk_dim, bias=qkv_bias)
        self.v = nn.Linear(dim, dim, bias=qkv_bias)
        self.reduce = nn.Conv2d(dim, dim, sr_ratio, stride=sr_ratio, groups=dim) if sr_ratio > 1 else None
        self.norm = nn.LayerNorm(dim) if reduce_norm and sr_ratio > 1 else None
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        """``x`` (B, H, W, C) -> (B, H, W, C)."""
        name = type(self).__name__
        check_grid(name, x, self.dim)
        check_divisible(name, x, self.sr_ratio, "sr_ratio")
        b, h, w, c = x.shape
        tokens = x.reshape(b, h * w, c)
        if self.reduce is not None:
            reduced = self.reduce(x.permute(0, 3, 1, 2)).flatten(2).transpose(1, 2)  # (B, N / r^2, C)
            if self.norm is not None:
                reduced = self.norm(reduced)
        else:
            reduced = tokens
        q = split_heads(self.q(tokens), self.num_heads)
        k = split_heads(self.k(reduced), self.num_heads)
        v = split_heads(self.v(reduced), self.num_heads)
        out = softmax_attention(q, k, v, backend=self.backend)  # scale d_qk ** -0.5
        return self.proj(merge_heads(out)).reshape(b, h, w, c)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, sr_ratio={self.sr_ratio}, qk_dim={self.qk_dim}"

