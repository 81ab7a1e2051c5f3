"""Differential attention as a layer (Ye et al., "Differential Transformer", ICLR 2025, Sec. 2.1-2.2).

    lambda = exp(lq1 . lk1) - exp(lq2 . lk2) + lambda_init,   lambda_init = 0.8 - 0.6 exp(-0.3 depth)   (Eq. 2)
    head   = RMSNorm((softmax(q1 k1^T / sqrt(d)) - lambda softmax(q2 k2^T / sqrt(d))) v) * (1 - lambda_init)   (Eq. 3)

A qkv projection of the (B, N, C) tokens gives per head q, k of 2 d = C / H features (q1, q2 the
halves) and v of 2 d; the heads are concatenated and projected. The attention step is
:func:`attnzoo.differential_attention`. :meth:`DifferentialAttention.from_timm` copies a
``timm.layers.DiffAttention`` (same arithmetic, including its optional ``dual_lambda``
parameterization ``exp(a) - exp(b) + lambda_init``, qk-norm and scale-norm).
"""

from __future__ import annotations

import copy
import math
from typing import Any, Optional

import torch
from torch import Tensor, nn

from ...errors import ParameterError
from ...functional.variants import differential_attention
from .._checks import check_tokens, positive_int
from .._registry import ModuleExample, register_module

__all__ = ["DifferentialAttention"]


@register_module(
    paper="Differential Transformer (Ye et al., ICLR 2025)",
    layout="(B, N, C)",
    example=ModuleExample(dict(dim=512, num_heads=8), inputs=[(1, 1024, 512)], test_inputs=[(2, 17, 32)],
                          test_kwargs=dict(dim=32, num_heads=2)),
)
class DifferentialAttention(nn.Module):
    """Multi-head differential attention over tokens (B, N, C).

    Args:
        dim: channels C (a multiple of 2 * num_heads). num_heads: H. qkv_bias: bias of the qkv projection.
        depth: the layer's index l - 1 (sets lambda_init, Eq. 2). dual_lambda: lambda = exp(a) - exp(b) + lambda_init
            (timm's two-scalar form) instead of the paper's vectors.
        backend: passed to the functional form.

    ``forward(x, key_padding_mask=None, causal=False)``; ``key_padding_mask`` (B, N) bool, True = pad.

    Example::

        >>> layer = DifferentialAttention(64, num_heads=4, depth=3)
        >>> y = layer(torch.randn(2, 50, 64), causal=True)
    """

    def __init__(self, dim: int, num_heads: int = 8, *, qkv_bias: bool = False, depth: int = 0, dual_lambda: bool = False, backend: Optional[str] = None):
        super().__init__()
        name = type(self).__name__
        positive_int(name, "dim", dim)
        if positive_int(name, "num_heads", num_heads) and dim % (2 * num_heads):
            raise ParameterError(f"{name}: num_heads: expected 2 * num_heads to divide dim={dim}, got {num_heads}", argument="num_heads")
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads // 2
        self.backend = backend
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.q_norm: nn.Module = nn.Identity()
        self.k_norm: nn.Module = nn.Identity()
        self.sub_norm = nn.RMSNorm(2 * self.head_dim, eps=1e-5)
        self.norm: nn.Module = nn.Identity()
        self.proj = nn.Linear(dim, dim)
        self.lambda_init = 0.8 - 0.6 * math.exp(-0.3 * depth)
        if dual_lambda:
            self.lambda_a, self.lambda_b = nn.Parameter(torch.zeros(())), nn.Parameter(torch.zeros(()))
        else:
            self.lambda_q1, self.lambda_k1, self.lambda_q2, self.lambda_k2 = (nn.Parameter(torch.randn(self.head_dim) * 0.1) for _ in range(4))
        self.dual_lambda = dual_lambda

    def lam(self) -> Tensor:
        """lambda (Eq. 2), a scalar tensor."""
        if self.dual_lambda:
            return torch.exp(self.lambda_a) - torch.exp(self.lambda_b) + self.lambda_init
        return torch.exp((self.lambda_q1 * self.lambda_k1).sum()) - torch.exp((self.lambda_q2 * self.lambda_k2).sum()) + self.lambda_init

    def forward(self, x: Tensor, key_padding_mask: Optional[Tensor] = None, causal: bool = False) -> Tensor:
        check_tokens(type(self).__name__, x, self.dim)
        b, n, c = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        # per head: q = [q1, q2], each head_dim wide (timm's and the official layout); norms per half
        q = self.q_norm(q.reshape(b, n, 2 * self.num_heads, self.head_dim)).reshape(b, n, self.num_heads, 2 * self.head_dim).transpose(1, 2)
        k = self.k_norm(k.reshape(b, n, 2 * self.num_heads, self.head_dim)).reshape(b, n, self.num_heads, 2 * self.head_dim).transpose(1, 2)
        v = v.reshape(b, n, self.num_heads, 2 * self.head_dim).transpose(1, 2)
        lam = self.lam().to(q.dtype).expand(self.num_heads)
        out = differential_attention(q, k, v, lam=lam, causal=causal, key_padding_mask=key_padding_mask, backend=self.backend)
        out = self.sub_norm(out) * (1 - self.lambda_init)
        return self.proj(self.norm(out.transpose(1, 2).reshape(b, n, c)))

    @classmethod
    def from_timm(cls, module: Any) -> "DifferentialAttention":
        """A copy of ``timm.layers.DiffAttention`` (its weights, norms and lambda; dropout is not carried)."""
        dim = module.qkv.in_features
        layer = cls(dim, module.num_heads, qkv_bias=module.qkv.bias is not None, dual_lambda=module.dual_lambda)
        layer.lambda_init = module.lambda_init
        layer.qkv, layer.proj = copy.deepcopy(module.qkv), copy.deepcopy(module.proj)
        layer.q_norm, layer.k_norm, layer.norm = copy.deepcopy(module.q_norm), copy.deepcopy(module.k_norm), copy.deepcopy(module.norm)
        layer.sub_norm.weight.data.copy_(module.sub_norm.weight.data)
        layer.sub_norm.eps = module.sub_norm.eps
        names = ("lambda_a", "lambda_b") if module.dual_lambda else ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2")
        for name in names:
            getattr(layer, name).data.copy_(getattr(module, name).data)
        return layer

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, lambda_init={self.lambda_init:.3f}, dual_lambda={self.dual_lambda}"
