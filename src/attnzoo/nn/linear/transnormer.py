"""The TransNormer attention layer (Qin et al., EMNLP 2022; catalog F7).

:class:`TransNormerAttention` is one token mixer of the paper's model, as the official layers
build it (OpenNLPLab/fairseq-evo, ``NormLinearAttention`` and ``NormLocalAttention``)::

    q, k, v = x W_q, x W_k, x W_v                  (per head)
    o = NormAttention(q, k, v)                      kind="norm": phi(q) (phi(k)^T v), no denominator
      | DiagAttention(q, k, v)                      kind="diag": attention inside diagonal blocks
    y = XNorm(o) W_out                              LayerNorm / RMSNorm over the merged heads

The norm's gain and bias are this module's parameters (``norm_weight``/``norm_bias``, (H, Dv)
= the official ``LayerNorm(embed_dim)`` weights viewed per head); NormAttention takes them in
its functional call, DiagAttention's output goes through the same
:func:`~attnzoo.functional.linear.transnormer.normalize_output`. The paper stacks DiagAttention
layers in the lower half of the model and NormAttention layers in the upper half (Sec. 4).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor, nn

from ...errors import ParameterError
from ...functional.linear.transnormer import normalize_output, transnormer_attention, transnormer_diag_attention
from .._registry import ModuleExample, register_module
from .attention import _TokenMixer

__all__ = ["TransNormerAttention"]

KINDS = ("norm", "diag")


@register_module(
    "F7",
    paper="The Devil in Linear Transformer (TransNormer; Qin et al., EMNLP 2022)",
    layout="(B, N, C)",
    example=ModuleExample(
        dict(dim=512, num_heads=8), inputs=[(1, 1024, 512)], test_inputs=[(2, 17, 32)], test_kwargs=dict(dim=32, num_heads=2)
    ),
)
class TransNormerAttention(_TokenMixer):
    """TransNormer's attention over (B, N, C) tokens: qkv projection, NormAttention or
    DiagAttention, XNorm over the merged heads (the official layer), output projection.

    Args:
        dim: channels C. num_heads: heads (a divisor of C).
        kind: ``"norm"`` (NormAttention) or ``"diag"`` (DiagAttention), the paper's two attentions.
        causal: causal attention (NormAttention: over the prefix; DiagAttention: inside blocks).
        feature_map: NormAttention's phi (``"elu"`` = elu + 1, ``"relu"``, ``"identity"``, a callable).
        norm: ``"layer"`` or ``"rms"``; ``norm_scope``: ``"token"`` (the official: the merged
            heads) or ``"head"``. The norm has a learnable gain (and a bias for LayerNorm).
        block_size, kernel: DiagAttention's block and in-block weights (``"softmax"``/``"relu"``).
        chunk_size, backend: passed to the functional call.

    Example::

        >>> lower = TransNormerAttention(dim=512, num_heads=8, kind="diag", causal=True)
        >>> upper = TransNormerAttention(dim=512, num_heads=8, kind="norm", causal=True)
        >>> y = upper(lower(torch.randn(2, 4096, 512)))
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        kind: str = "norm",
        causal: bool = False,
        feature_map: Any = "elu",
        norm: str = "layer",
        norm_scope: str = "token",
        norm_eps: Optional[float] = None,
        block_size: int = 64,
        kernel: str = "softmax",
        qkv_bias: bool = True,
        proj_bias: bool = True,
        chunk_size: int = 64,
        backend: Optional[str] = None,
    ):
        super().__init__(dim, num_heads, qkv_bias, proj_bias)
        name = type(self).__name__
        if kind not in KINDS:
            raise ParameterError(f"{name}: kind: expected 'norm' or 'diag', got {kind!r}", argument="kind")
        if norm not in ("layer", "rms"):
            raise ParameterError(f"{name}: norm: expected 'layer' or 'rms', got {norm!r}", argument="norm")
        if norm_scope not in ("token", "head"):
            raise ParameterError(f"{name}: norm_scope: expected 'token' or 'head', got {norm_scope!r}", argument="norm_scope")
        self.kind, self.causal, self.feature_map = kind, causal, feature_map
        self.norm, self.norm_scope, self.norm_eps = norm, norm_scope, norm_eps
        self.block_size, self.kernel, self.chunk_size, self.backend = block_size, kernel, chunk_size, backend
        head_dim = dim // num_heads
        self.norm_weight = nn.Parameter(torch.ones(num_heads, head_dim))
        self.norm_bias = nn.Parameter(torch.zeros(num_heads, head_dim)) if norm == "layer" else None

    def attend(self, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor] = None) -> Tensor:
        """(B, H, N, D) heads -> the normalized attention output (B, H, N, D); pads (True) ignored as keys."""
        norm = {"norm": self.norm, "norm_scope": self.norm_scope, "norm_eps": self.norm_eps}
        pad = {"key_padding_mask": key_padding_mask}
        if self.kind == "norm":
            weights = {"norm_weight": self.norm_weight, "norm_bias": self.norm_bias}
            return transnormer_attention(
                q, k, v, causal=self.causal, feature_map=self.feature_map, chunk_size=self.chunk_size, backend=self.backend, **norm, **weights, **pad
            )
        out = transnormer_diag_attention(q, k, v, block_size=self.block_size, causal=self.causal, kernel=self.kernel, backend=self.backend, **pad)
        return normalize_output(out, norm=self.norm, scope=self.norm_scope, weight=self.norm_weight, bias=self.norm_bias, eps=self.norm_eps)

    def forward(self, x: Tensor, key_padding_mask: Optional[Tensor] = None) -> Tensor:
        """(B, N, C) -> (B, N, C); ``key_padding_mask`` (B, N) bool, True = a padded token (ignored as a
        key; kind="diag" takes padding on the right only)."""
        q, k, v = self.heads(x)
        return self.proj(self.merge(self.attend(q, k, v, key_padding_mask)))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, kind={self.kind!r}, causal={self.causal}, norm={self.norm!r}, norm_scope={self.norm_scope!r}"
