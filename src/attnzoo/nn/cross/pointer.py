"""A pointer head (catalog X4): attention over the input positions as the output distribution."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor, nn

from ...errors import ParameterError, ShapeError
from .._checks import positive_int
from .._registry import ModuleExample, register_module
from ..mha import _open_empty_rows
from ._common import cross_mechanism, padding_param, takes

__all__ = ["PointerHead"]

_OWNER = "PointerHead"


@dataclass(frozen=True)
class _TanhClip:
    """score_mod ``cap * tanh(s / cap)`` that keeps -inf: the bias that masks a position comes
    before score_mod in softmax's formula, and a plain softcap would turn its -inf into -cap."""

    cap: float

    def __call__(self, score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return torch.where(score == float("-inf"), score, self.cap * torch.tanh(score / self.cap))


@register_module(
    "X4",
    paper="Pointer Networks (Vinyals et al., NeurIPS 2015); Attention, Learn to Solve Routing Problems! (Kool et al., ICLR 2019)",
    layout="decoder (B, M, C), encoder (B, N, C) -> log p (B, M, N)",
    # bench: TSP-100 (Kool et al.: 128 channels, tanh clipping C = 10), 100 decoder states at once
    example=ModuleExample(
        dict(embed_dim=128, clip=10.0), inputs=[(64, 100, 128), (64, 100, 128)], test_inputs=[(2, 5, 16), (2, 7, 16)],
        test_kwargs=dict(embed_dim=16), output=lambda shapes: (shapes[0][0], shapes[0][1], shapes[1][1]),
    ),
)
class PointerHead(nn.Module):
    """Log-probabilities over the N input positions for each of M decoder states: a pointer.

    Pointer Networks answer with a position of the input, so their output vocabulary is the input
    itself: the attention weights of decoder state ``d_i`` over the encoder states ``e_j`` are the
    distribution ``p(y_i = j)``. Here the scores are scaled dot products of projections (the
    transformer pointer of Kool et al. 2019; Vinyals et al. score additively,
    ``v . tanh(W1 e_j + W2 d_i)``, which no registered mechanism computes)::

        u_ij = (W_q d_i) . (W_k e_j) / sqrt(D)          (clip: u_ij <- C tanh(u_ij), Kool et al.'s C = 10)
        p_ij = softmax_j(u_ij) over the valid positions, 0 at invalid ones
        returns log p_ij (B, M, N), -inf at invalid positions

    Invalid positions: ``key_padding_mask`` (B, N) bool, True = the position does not exist
    (padding; any mechanism that declares ``key_padding_mask``), and ``mask`` (B, M, N) or (M, N)
    bool, True = decoder state i may not point at j (e.g. a city already visited; softmax only: it
    is an additive bias). A state with no valid position gets 0 probability everywhere (log -inf).

    Through attnzoo: ``p`` is the output of one mechanism call whose values are the one-hot
    position vectors, ``attention(q, k, I_N)``: the weighted sum of position indicators is the
    distribution over positions, so every mechanism and backend with the ``noncausal_cross``
    pattern can point, its masking included (softmax by default; with another mechanism the rows
    are that mechanism's weights, a distribution only where they are non-negative and normalized).
    ``log p`` is taken from ``p``, so a probability below the dtype's smallest (a score more than
    ~87 below its row's maximum in float32, ~708 in float64) reads -inf; ``clip`` bounds the scores
    to [-C, C] so this cannot happen.

    Cost: O(M N D) for the scores and O(M N^2) for the product with the one-hot values (the
    output itself is M x N): meant for pointer problems of tens to a few thousand positions.

    Paper: Vinyals, Fortunato and Jaitly, "Pointer Networks" (2015); clipping from Kool, van Hoof
    and Welling, "Attention, Learn to Solve Routing Problems!" (2019).

    Example::

        >>> head = PointerHead(128)
        >>> log_p = head(torch.randn(4, 10, 128), torch.randn(4, 50, 128))    # (4, 10, 50)
        >>> loss = torch.nn.functional.nll_loss(log_p.flatten(0, 1), targets.flatten())   # doctest: +SKIP
    """

    def __init__(
        self,
        embed_dim: int,
        kdim: Optional[int] = None,
        *,
        head_dim: Optional[int] = None,
        clip: Optional[float] = None,
        bias: bool = False,
        mechanism: str = "softmax",
        backend: Optional[str] = None,
        **mechanism_params: Any,
    ):
        super().__init__()
        self.embed_dim = positive_int(_OWNER, "embed_dim", embed_dim)
        self.kdim = embed_dim if kdim is None else positive_int(_OWNER, "kdim", kdim)
        self.head_dim = embed_dim if head_dim is None else positive_int(_OWNER, "head_dim", head_dim)
        if not isinstance(bias, bool):
            raise ParameterError(f"{_OWNER}: bias: expected a bool, got {bias!r}", argument="bias")
        self.mechanism = cross_mechanism(_OWNER, mechanism, mechanism_params, reserved=("key_padding_mask", "bias", "score_mod"))
        self.clip = self._checked_clip(clip, mechanism_params)
        self.mechanism_params, self.backend = dict(mechanism_params), backend
        if self.clip is not None:
            # C tanh(q.k / sqrt(D)) as a softcap: cap * tanh(s / cap) with s = (C / sqrt(D)) q.k
            self.mechanism_params.update(scale=self.clip / math.sqrt(self.head_dim), score_mod=_TanhClip(self.clip))
        self.q_proj = nn.Linear(embed_dim, self.head_dim, bias=bias)
        self.k_proj = nn.Linear(self.kdim, self.head_dim, bias=bias)

    def _checked_clip(self, clip: Any, params: dict[str, Any]) -> Optional[float]:
        if clip is None:
            return None
        if isinstance(clip, bool) or not isinstance(clip, (int, float)) or not 0 < clip < math.inf:
            raise ParameterError(f"{_OWNER}: clip: expected None or a finite positive number, got {clip!r}", argument="clip")
        if not (takes(self.mechanism, "score_mod") and takes(self.mechanism, "scale")):
            raise ParameterError(f"{_OWNER}: clip: needs a mechanism with score_mod and scale parameters (softmax), got {self.mechanism.name!r}", argument="clip")
        if "scale" in params:
            raise ParameterError(f"{_OWNER}: scale: clip sets the scale itself (C tanh(q.k / sqrt(D)))", argument="scale")
        return float(clip)

    def forward(self, decoder: Tensor, encoder: Tensor, key_padding_mask: Optional[Tensor] = None, mask: Optional[Tensor] = None) -> Tensor:
        """Decoder states (B, M, embed_dim) and encoder states (B, N, kdim) -> log p (B, M, N)."""
        b, m, n = self._check_states(decoder, encoder)
        q = self.q_proj(decoder).unsqueeze(1)  # one head: (B, 1, M, D)
        k = self.k_proj(encoder).unsqueeze(1)
        positions = torch.eye(n, dtype=q.dtype, device=q.device).expand(b, 1, n, n)  # value j = the indicator of j
        params = {**self.mechanism_params, **padding_param(_OWNER, self.mechanism, key_padding_mask, b, n)}
        empty = None
        if mask is not None:
            bias = self._mask_bias(mask, b, m, n, q)
            bias, empty = _open_empty_rows(bias, params.get("key_padding_mask"))  # a state with no valid position: p = 0
            params["bias"] = bias
        p = self.mechanism(q, k, positions, backend=self.backend, **params)
        p = p[0] if isinstance(p, tuple) else p  # backends that also return an LSE
        if empty is not None:
            p = p.masked_fill(empty, 0.0)
        p = p.squeeze(1)
        # log of the exact zeros is -inf with a zero gradient (log's own would be 0 * inf = NaN)
        valid = p > 0
        return torch.where(valid, p, torch.ones_like(p)).log().masked_fill(~valid, float("-inf"))

    def _check_states(self, decoder: Any, encoder: Any) -> tuple[int, int, int]:
        for name, t, width in (("decoder", decoder, self.embed_dim), ("encoder", encoder, self.kdim)):
            if not isinstance(t, Tensor) or t.dim() != 3 or t.shape[-1] != width:
                shown = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
                raise ShapeError(f"{_OWNER}: {name}: expected (B, length, {width}), got {shown}", argument=name)
        if decoder.shape[0] != encoder.shape[0]:
            raise ShapeError(f"{_OWNER}: encoder: expected batch {decoder.shape[0]} like decoder, got {tuple(encoder.shape)}", argument="encoder")
        return decoder.shape[0], decoder.shape[1], encoder.shape[1]

    def _mask_bias(self, mask: Any, b: int, m: int, n: int, like: Tensor) -> Tensor:
        """(B, M, N) or (M, N) bool, True = may not point there -> additive (B|1, 1, M, N)."""
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool or tuple(mask.shape) not in ((b, m, n), (m, n)):
            shown = f"{mask.dtype} {tuple(mask.shape)}" if isinstance(mask, Tensor) else type(mask).__name__
            raise ShapeError(f"{_OWNER}: mask: expected a bool tensor (B, M, N) = ({b}, {m}, {n}) or (M, N), True = invalid, got {shown}", argument="mask")
        if not takes(self.mechanism, "bias"):
            raise ParameterError(f"{_OWNER}: mask: a per-state mask is an additive bias; mechanism {self.mechanism.name!r} takes none", argument="mask")
        blocked = mask.reshape(-1, 1, m, n)
        return torch.zeros(blocked.shape, dtype=like.dtype, device=like.device).masked_fill(blocked, float("-inf"))

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, kdim={self.kdim}, head_dim={self.head_dim}, clip={self.clip}, mechanism={self.mechanism.name!r}"
