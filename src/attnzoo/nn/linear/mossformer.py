"""MossFormer's gated single-head attention block (Zhao & Ma, ICASSP 2023; catalog F10).

:class:`MossFormerAttention` is the official ``FLASH_ShareA_FFConvM`` layer (modelscope
ClearerVoice-Studio / alibabasglab MossFormer2, after lucidrains' FLASH-pytorch) around
:func:`~attnzoo.functional.linear.mossformer.joint_chunk_attention`, over (B, N, C) tokens:

    x' = token shift of x (the first half of the channels delayed by one token)
    v, u = split(FFConvM(x'))                         hidden projections, SiLU (E = C * expansion / 2 each)
    z = FFConvM_qk(x')                                the shared base, dim 128
    q, lq, k, lk = z * gamma_h + beta_h, h = 1..4     per-dim scale and offset
    q, lq, k, lk = RoPE on their first min(32, 128) dims (interleaved pairs, positions 0..N-1)
    a_v, a_u = joint_chunk_attention(q, k, [v, u], linear_q=lq, linear_k=lk)   one weight matrix for both
    y = x + FFConvM_out((a_u * v) * sigmoid(a_v * u))

FFConvM (the convolution augmentation) = norm -> Linear -> SiLU -> (h + depthwise Conv1d_k(h))
-> Dropout, with k = 17, no conv bias, 'same' padding, as the official ``ConvModule``; the norm
is ScaleNorm (``x / max(||x|| / sqrt(C), eps) * g``, the official default ``norm_type='scalenorm'``)
or LayerNorm.

What differs from the official layer, and why:
* the dropout the official code applies to the relu^2 attention weights is not applied (the
  functional form has no dropout); the FFConvM dropouts are kept, so in eval mode the two agree;
* with ``causal=True`` the depthwise convolutions are causal (left padding k - 1): the official
  code keeps them symmetric, so its "causal" layer reads k // 2 future tokens through them;
  here ``causal=True`` makes the whole layer causal;
* no key padding mask (``mask=`` of the official forward).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...errors import ParameterError, ShapeError
from ...functional.linear.mossformer import DEFAULT_GROUP_SIZE, joint_chunk_attention
from .._checks import positive_int
from .._registry import ModuleExample, register_module

__all__ = ["MossFormerAttention", "FFConvM", "ScaleNorm"]

#: the official rotary width: min(32, query_key_dim) dims rotated (partial RoPE, as GPT-J).
ROTARY_DIMS = 32




class ScaleNorm(nn.Module):
    """``x / max(||x||_2 / sqrt(C), eps) * g`` over the channels, one learnable gain g (Nguyen & Salazar, 2019)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.scale, self.eps = dim**-0.5, eps
        self.g = nn.Parameter(torch.ones(1))

    def forward(self, x: Tensor) -> Tensor:
        return x / (x.norm(dim=-1, keepdim=True) * self.scale).clamp(min=self.eps) * self.g


class FFConvM(nn.Module):
    """MossFormer's convolution-augmented projection: norm, Linear, SiLU, ``h + DWConv(h)``, Dropout.

    The depthwise convolution (``kernel_size`` taps, no bias) runs along the tokens; ``causal``
    pads on the left only, so token i reads tokens i - k + 1 .. i.
    """

    def __init__(
        self, dim_in: int, dim_out: int, *, norm: str = "scalenorm", kernel_size: int = 17, dropout: float = 0.1, causal: bool = False
    ):
        super().__init__()
        self.norm = ScaleNorm(dim_in) if norm == "scalenorm" else nn.LayerNorm(dim_in)
        self.linear = nn.Linear(dim_in, dim_out)
        self.conv = nn.Conv1d(dim_out, dim_out, kernel_size, groups=dim_out, bias=False)
        self.dropout = nn.Dropout(dropout)
        self.causal, self.kernel_size = causal, kernel_size

    def forward(self, x: Tensor) -> Tensor:
        h = F.silu(self.linear(self.norm(x)))
        k = self.kernel_size
        left = k - 1 if self.causal else (k - 1) // 2
        conv = self.conv(F.pad(h.transpose(1, 2), (left, k - 1 - left)))
        return self.dropout(h + conv.transpose(1, 2))


def rotate(x: Tensor, dims: int, theta: float = 10000.0) -> Tensor:
    """Rotary position embedding on the first ``dims`` features of (B, N, D), interleaved pairs
    (2i, 2i + 1) turned by angle ``t * theta^(-2i/dims)`` at position t = 0..N-1 (rotary-embedding-torch's
    ``rotate_queries_or_keys``); the other features pass unchanged."""
    n, dtype = x.shape[-2], torch.float64 if x.dtype == torch.float64 else torch.float32  # angles t * f lose digits in half precision
    freqs = theta ** -(torch.arange(0, dims, 2, device=x.device, dtype=dtype) / dims)
    angles = torch.arange(n, device=x.device, dtype=dtype)[:, None] * freqs  # (N, dims/2)
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    pairs = x[..., :dims].unflatten(-1, (-1, 2))
    even, odd = pairs[..., 0], pairs[..., 1]
    turned = torch.stack((even * cos - odd * sin, odd * cos + even * sin), dim=-1).flatten(-2)
    return torch.cat((turned, x[..., dims:]), dim=-1)


@register_module(
    "F10",
    paper="MossFormer: Gated Single-Head Transformer with Convolution-Augmented Joint Self-Attentions (Zhao & Ma, ICASSP 2023)",
    layout="(B, N, C)",
    example=ModuleExample(
        dict(dim=512, group_size=256), inputs=[(1, 1024, 512)], test_inputs=[(2, 17, 32)],
        test_kwargs=dict(dim=32, group_size=8, query_key_dim=16, kernel_size=5),
    ),
)
class MossFormerAttention(nn.Module):
    """MossFormer's gated single-head block with convolution-augmented joint attention, residual included.

    Args:
        dim: channels C of the (B, N, C) tokens.
        group_size: g, tokens per group of the quadratic part (official: 256).
        query_key_dim: width of the shared base z and of q, k, lq, lk (official: 128).
        expansion_factor: hidden width C * expansion_factor, split into v and u (official: 4;
            the official output projection takes 2 C channels, i.e. expansion 4).
        causal: causal attention and causal depthwise convolutions (see the module docstring).
        dropout: of the FFConvM projections.
        rotary: rotate q, k, lq, lk with RoPE on min(32, query_key_dim) dims (official: on).
        shift_tokens: delay the first half of the channels by one token (official: on).
        norm: ``"scalenorm"`` (official) or ``"layernorm"`` in each FFConvM.
        kernel_size: of the depthwise convolutions (official: 17, odd).
        backend: passed to :func:`~attnzoo.functional.linear.mossformer.joint_chunk_attention`.

    Example::

        >>> layer = MossFormerAttention(dim=512, group_size=256)
        >>> y = layer(torch.randn(2, 1000, 512))     # (B, N, C) -> (B, N, C)
    """

    def __init__(
        self,
        dim: int,
        *,
        group_size: int = DEFAULT_GROUP_SIZE,
        query_key_dim: int = 128,
        expansion_factor: float = 4.0,
        causal: bool = False,
        dropout: float = 0.1,
        rotary: bool = True,
        shift_tokens: bool = True,
        norm: str = "scalenorm",
        kernel_size: int = 17,
        backend: Optional[str] = None,
    ):
        super().__init__()
        name = type(self).__name__
        self.dim = positive_int(name, "dim", dim)
        self.group_size = positive_int(name, "group_size", group_size)
        self.query_key_dim = positive_int(name, "query_key_dim", query_key_dim)
        hidden = int(dim * expansion_factor)
        if hidden < 2 or hidden % 2:
            raise ParameterError(
                f"{name}: expansion_factor: dim * expansion_factor must be an even int >= 2 (split into v and u), got {hidden}",
                argument="expansion_factor",
            )
        if norm not in ("scalenorm", "layernorm"):
            raise ParameterError(f"{name}: norm: expected 'scalenorm' or 'layernorm', got {norm!r}", argument="norm")
        if positive_int(name, "kernel_size", kernel_size) % 2 == 0:
            raise ParameterError(f"{name}: kernel_size: expected an odd int, got {kernel_size}", argument="kernel_size")
        self.causal, self.shift_tokens, self.backend = causal, shift_tokens, backend
        self.rotary_dims = min(ROTARY_DIMS, query_key_dim) // 2 * 2 if rotary else 0
        conv = dict(norm=norm, kernel_size=kernel_size, dropout=dropout, causal=causal)
        self.to_hidden = FFConvM(dim, hidden, **conv)
        self.to_qk = FFConvM(dim, query_key_dim, **conv)
        self.gamma = nn.Parameter(nn.init.normal_(torch.empty(4, query_key_dim), std=0.02))  # q, lq, k, lk
        self.beta = nn.Parameter(torch.zeros(4, query_key_dim))
        self.to_out = FFConvM(hidden // 2, dim, **conv)

    def shifted(self, x: Tensor) -> Tensor:
        """The first half of the channels (ceil(C/2)) delayed by one token (zeros first), the rest unchanged."""
        delayed, kept = x.chunk(2, dim=-1)
        return torch.cat((F.pad(delayed, (0, 0, 1, -1)), kept), dim=-1)

    def queries_and_keys(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(B, N, dqk) base -> q, lq, k, lk by per-dim scale and offset, rotated."""
        q, lq, k, lk = (z.unsqueeze(-2) * self.gamma + self.beta).unbind(-2)
        if self.rotary_dims:
            q, lq, k, lk = (rotate(t, self.rotary_dims) for t in (q, lq, k, lk))
        return q, lq, k, lk

    def forward(self, x: Tensor, key_padding_mask: Optional[Tensor] = None) -> Tensor:
        """(B, N, C) -> (B, N, C); ``key_padding_mask`` (B, N) bool, True = a padded token, passed to the
        joint attention (padding on the right only). The FFConvM convolutions around it still
        read the pad tokens: the last real tokens (within the kernel's reach of a pad) differ
        from an unpadded run; the attention itself does not."""
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ShapeError(f"{type(self).__name__}: x: expected (B, N, C) with C={self.dim}, got shape {tuple(x.shape)}", argument="x")
        normed = self.shifted(x) if self.shift_tokens else x
        v, u = self.to_hidden(normed).chunk(2, dim=-1)
        q, lq, k, lk = (t.unsqueeze(1) for t in self.queries_and_keys(self.to_qk(normed)))  # one head
        values = torch.cat((v, u), dim=-1).unsqueeze(1)  # one weight matrix attends both (the "shared A")
        attended = joint_chunk_attention(
            q, k, values, linear_q=lq, linear_k=lk, group_size=self.group_size, causal=self.causal, backend=self.backend,
            key_padding_mask=key_padding_mask,
        )
        att_v, att_u = attended.squeeze(1).chunk(2, dim=-1)
        return x + self.to_out((att_u * v) * torch.sigmoid(att_v * u))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, group_size={self.group_size}, query_key_dim={self.query_key_dim}, causal={self.causal}, rotary_dims={self.rotary_dims}"
