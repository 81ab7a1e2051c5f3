"""Training stabilizers of attention as layers (catalog V8): QK-layernorm and sigmaReparam.

* :class:`QKNormAttention`: multi-head self-attention whose per-head queries and keys pass a
  LayerNorm over the head dim before the dot product (Dehghani et al., "Scaling Vision
  Transformers to 22 Billion Parameters", 2023, Sec. 2.1; Wortsman et al., "Small-scale proxies
  for large-scale Transformer training instabilities", 2023, Sec. 3.1: it keeps the attention
  logits from growing, the instability they reproduce at small scale):

      q_h = LN(x W_q)_h,  k_h = LN(x W_k)_h,  out = softmax(q_h k_h^T / sqrt(d_h)) v_h, heads merged, projected

  the arithmetic of ``timm.layers.Attention(qk_norm=True, norm_layer=nn.LayerNorm)``
  (:meth:`QKNormAttention.from_timm` copies one).
* :class:`SigmaReparamLinear`: sigmaReparam (Zhai et al., "Stabilizing Transformer Training by
  Preventing Attention Entropy Collapse", ICML 2023, Eq. 4): every linear weight re-parameterized as

      W_hat = (gamma / sigma(W)) W

  with sigma(W) the spectral norm, estimated by one power-iteration step per forward from a
  persistent right singular vector u (initialised by an SVD), and gamma a learned scalar
  initialised to sigma(W_0), so W_hat = W_0 at initialisation (the official ``SNLinear``; u and
  the tracked sigma are updated in training mode only; the gradient flows through sigma with the
  singular vectors held constant).

Both take tokens (B, N, C). Cost: QKNormAttention O(N^2 C) (softmax attention) plus O(N C) for
the norms; SigmaReparamLinear O(N C_in C_out) plus O(C_in C_out) per forward for the power step.
"""

from __future__ import annotations

import copy
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...errors import ParameterError
from ...functional.dense import softmax_attention
from .._checks import check_tokens, heads_divide, merge_heads, positive_int
from .._registry import ModuleExample, register_module

__all__ = ["QKNormAttention", "SigmaReparamLinear"]


@register_module(
    "V8",
    paper="Scaling Vision Transformers to 22B Parameters (Dehghani et al., 2023); Small-scale proxies for large-scale Transformer training instabilities (Wortsman et al., 2023)",
    layout="(B, N, C)",
    example=ModuleExample(dict(dim=512, num_heads=8), inputs=[(1, 1024, 512)], test_inputs=[(2, 17, 32)], test_kwargs=dict(dim=32, num_heads=4)),
)
class QKNormAttention(nn.Module):
    """Multi-head self-attention with QK-layernorm: LayerNorm on each head's queries and keys.

    ``q_h = LN(x W_q)_h``, ``k_h = LN(x W_k)_h`` (a LayerNorm over the head dim d_h, shared by the
    heads, affine), then ``softmax(q_h k_h^T / sqrt(d_h)) v_h``, heads merged, output projection
    (Dehghani et al., 2023, Sec. 2.1; Wortsman et al., 2023, Sec. 3.1). Layout (B, N, C).
    Cost O(N^2 C).

    Args:
        dim: channels C. num_heads: H (divides dim). qkv_bias: bias of the qkv projection.
        eps: the LayerNorms' epsilon (timm's nn.LayerNorm default 1e-5). backend: passed to
            :func:`attnzoo.softmax_attention`.

    ``forward(x, key_padding_mask=None, causal=False)``; ``key_padding_mask`` (B, N) bool, True = pad.

    Example::

        >>> layer = QKNormAttention(64, num_heads=4)
        >>> y = layer(torch.randn(2, 50, 64))
    """

    def __init__(self, dim: int, num_heads: int = 8, *, qkv_bias: bool = False, eps: float = 1e-5, backend: Optional[str] = None):
        super().__init__()
        name = type(self).__name__
        heads_divide(name, positive_int(name, "dim", dim), num_heads)
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.backend = backend
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.q_norm = nn.LayerNorm(self.head_dim, eps=eps)
        self.k_norm = nn.LayerNorm(self.head_dim, eps=eps)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, key_padding_mask: Optional[Tensor] = None, causal: bool = False) -> Tensor:
        check_tokens(type(self).__name__, x, self.dim)
        b, n, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        out = softmax_attention(q, k, v, causal=causal, key_padding_mask=key_padding_mask, backend=self.backend)
        return self.proj(merge_heads(out))

    @classmethod
    def from_timm(cls, module: Any) -> "QKNormAttention":
        """A copy of ``timm.layers.Attention(qk_norm=True, norm_layer=nn.LayerNorm)`` (weights, norms;
        dropout not carried). Refuses a module without LayerNorm q/k norms, a scale norm, a gate or an
        attention width other than dim."""
        name = cls.__name__
        dim = module.qkv.in_features
        if not (isinstance(module.q_norm, nn.LayerNorm) and isinstance(module.k_norm, nn.LayerNorm)):
            raise ParameterError(f"{name}: module: expected a timm Attention built with qk_norm=True and norm_layer=nn.LayerNorm", argument="module")
        if not isinstance(module.norm, nn.Identity) or getattr(module, "gate", None) is not None or module.num_heads * module.head_dim != dim:
            raise ParameterError(f"{name}: module: expected no scale_norm, no gate and num_heads * head_dim == dim", argument="module")
        if module.proj.bias is None or module.proj.out_features != dim:
            raise ParameterError(f"{name}: module: expected a projection back to dim with a bias", argument="module")
        layer = cls(dim, module.num_heads, qkv_bias=module.qkv.bias is not None, eps=module.q_norm.eps)
        layer.qkv, layer.proj = copy.deepcopy(module.qkv), copy.deepcopy(module.proj)
        layer.q_norm, layer.k_norm = copy.deepcopy(module.q_norm), copy.deepcopy(module.k_norm)
        return layer

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}"


@register_module(
    "V8",
    paper="Stabilizing Transformer Training by Preventing Attention Entropy Collapse (Zhai et al., ICML 2023)",
    layout="(B, N, C)",
    example=ModuleExample(dict(in_features=512, out_features=512), inputs=[(1, 1024, 512)], test_inputs=[(2, 17, 32)],
                          test_kwargs=dict(in_features=32, out_features=24), output=lambda shapes: (*shapes[0][:-1], 24)),
)
class SigmaReparamLinear(nn.Module):
    """sigmaReparam linear layer: ``y = x W_hat^T + b`` with ``W_hat = (gamma / sigma(W)) W``.

    sigma(W) is the spectral norm of W, estimated by one power-iteration step per forward from a
    persistent right singular vector ``u`` (a buffer, initialised by an SVD of W)::

        v = normalize(W u),  u' = normalize(W^T v),  sigma = v^T W u'

    with ``u, v`` held constant for the gradient; ``u`` is stored back only in training mode, so
    evaluation is deterministic. ``gamma`` is a learned scalar initialised to sigma(W_0), so the
    layer equals its initial plain linear layer (Zhai et al., ICML 2023, Eq. 4; the official
    ``SNLinear``, whose weights start from a truncated normal of std 0.02 * init_multiplier, as here).
    Layout (B, N, C_in) -> (B, N, C_out). Cost O(N C_in C_out) + O(C_in C_out) per forward.

    Args:
        in_features, out_features: C_in, C_out. bias: an additive bias (not re-parameterized).
        init_multiplier: the weights' init std is 0.02 times it (official default 1.0).

    Attributes:
        spectral_norm: the last sigma(W) estimated in training mode (a buffer, for tracking).

    Example::

        >>> layer = SigmaReparamLinear(64, 128)
        >>> y = layer(torch.randn(2, 50, 64))
    """

    def __init__(self, in_features: int, out_features: int, *, bias: bool = True, init_multiplier: float = 1.0):
        super().__init__()
        name = type(self).__name__
        self.in_features = positive_int(name, "in_features", in_features)
        self.out_features = positive_int(name, "out_features", out_features)
        if isinstance(init_multiplier, bool) or not isinstance(init_multiplier, (int, float)) or not init_multiplier > 0:
            raise ParameterError(f"{name}: init_multiplier: expected a positive number, got {init_multiplier!r}", argument="init_multiplier")
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        nn.init.trunc_normal_(self.weight, std=0.02 * init_multiplier)
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        with torch.no_grad():
            _, s, vh = torch.linalg.svd(self.weight, full_matrices=False)
        self.register_buffer("u", vh[0].clone())
        self.register_buffer("spectral_norm", s[0].clone())
        self.gamma = nn.Parameter(s[0].clone())

    def sigma(self) -> Tensor:
        """sigma(W) by one power step from ``u`` (differentiable in W; stores ``u`` in training mode)."""
        with torch.no_grad():
            v = F.normalize(self.weight.mv(self.u), dim=0)
            u = F.normalize(self.weight.t().mv(v), dim=0)
            if self.training:
                self.u.copy_(u)
        sigma = torch.einsum("o,oi,i->", v, self.weight, u)
        if self.training:
            self.spectral_norm.copy_(sigma.detach())
        return sigma

    def reparameterized_weight(self) -> Tensor:
        """W_hat = (gamma / sigma(W)) W."""
        return self.weight * (self.gamma / self.sigma())

    def forward(self, x: Tensor) -> Tensor:
        check_tokens(type(self).__name__, x, self.in_features)
        return F.linear(x, self.reparameterized_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
