"""A generic multi-head attention layer over any registered mechanism, and a causal short convolution.

* :class:`MultiheadAttention`: q, k, v and output projections around
  ``attnzoo.attention(q, k, v, mechanism, **params)`` over (B, N, C) tokens (timm's ``Attention``
  shape: projections, the functional call, an output projection; nothing else). Any mechanism
  that declares the self pattern asked for (``causal_self`` or ``noncausal_self``) fits; the
  layer holds no per-mechanism code. With ``example_params=True`` every parameter the caller did
  not give is taken from the mechanism's own ``example_params(problem, pattern)`` for the actual
  input shape (cached per shape), so a benchmark can put every mechanism in the same model.
* :class:`ShortConvolution`: a causal depthwise convolution over the sequence (kernel 4 by
  default, as in Based), the "short convolution" of Zoology's and Based's recall models.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._checks import check_tokens, positive_int
from ..errors import ParameterError
from ..registry import Mechanism, Problem, get

__all__ = ["MultiheadAttention", "ShortConvolution", "self_pattern"]


def self_pattern(causal: bool) -> str:
    """The CAB pattern of a self-attention layer: ``causal_self`` or ``noncausal_self``."""
    return "causal_self" if causal else "noncausal_self"






def _checked_mechanism(name: Any, pattern: str, params: dict[str, Any]) -> Mechanism:
    """The registered mechanism, refused with a reason when it lacks the pattern or a parameter name."""
    if not isinstance(name, str):
        raise ParameterError(f"MultiheadAttention: mechanism: expected a registered name (str), got {name!r}", argument="mechanism")
    mech = get(name)  # UnknownMechanismError listing the registered names
    if pattern not in mech.patterns:
        supported = ", ".join(sorted(mech.patterns)) or "none"
        raise ParameterError(f"MultiheadAttention: mechanism {name!r} does not support the {pattern} pattern (it supports: {supported})", argument="mechanism")
    accepted = {p.name for p in mech.params}
    unknown = [n for n in params if n not in accepted]
    if unknown:
        raise ParameterError(f"MultiheadAttention: {name}: unknown parameter {unknown[0]!r}; it accepts: {', '.join(sorted(accepted)) or 'none'}", argument=unknown[0])
    return mech


class MultiheadAttention(nn.Module):
    """Multi-head self-attention with any registered mechanism as the token mixer.

    ``y = W_o · concat_h attention(W_q x, W_k x, W_v x)_h`` over (B, N, C) tokens, heads of
    ``C / num_heads`` channels, computed by ``attnzoo.attention(q, k, v, mechanism, **params)``.
    ``causal`` picks the pattern (``causal_self`` or ``noncausal_self``) and is passed as the
    mechanism's ``causal`` parameter when it has one. ``mechanism_params`` are the mechanism's
    own keyword parameters (checked by name here, by value at the first call); with
    ``example_params=True`` the missing ones come from ``Mechanism.example_params(problem,
    pattern)`` for each input shape (the plain, repeatable parameters the benchmarks use;
    parameters that are tensors sized by the sequence, like ``kernelized_rpe``'s ``rpe``, are
    rebuilt per length). ``backend`` forces one of the mechanism's backends.

    Cost: four C x C projections (O(N C^2)) plus the mechanism's own cost.

    Example::

        >>> layer = MultiheadAttention(64, 4, "linear", causal=True, feature_map="elu")
        >>> y = layer(torch.randn(2, 128, 64))          # (2, 128, 64)
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        mechanism: str = "softmax",
        causal: bool = True,
        *,
        backend: Optional[str] = None,
        example_params: bool = False,
        bias: bool = True,
        **mechanism_params: Any,
    ):
        super().__init__()
        self.d_model = positive_int("MultiheadAttention", "d_model", d_model)
        self.num_heads = positive_int("MultiheadAttention", "num_heads", num_heads)
        if d_model % num_heads:
            raise ParameterError(f"MultiheadAttention: num_heads: expected a divisor of d_model={d_model}, got {num_heads}", argument="num_heads")
        if not isinstance(causal, bool):
            raise ParameterError(f"MultiheadAttention: causal: expected a bool, got {causal!r}", argument="causal")
        self.causal, self.pattern = causal, self_pattern(causal)
        self.mechanism = _checked_mechanism(mechanism, self.pattern, mechanism_params)
        self.backend, self.example_params = backend, example_params
        self.mechanism_params = dict(mechanism_params)
        self.head_dim = d_model // num_heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(d_model, d_model, bias=bias) for _ in range(4))
        self._examples: dict[tuple[Any, ...], dict[str, Any]] = {}
        self._last_example: dict[str, Any] = {}

    def heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(B, N, C) -> q, k, v of shape (B, H, N, C / H)."""
        b, n, _ = x.shape
        return tuple(p(x).view(b, n, self.num_heads, self.head_dim).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))  # type: ignore[return-value]

    def params_for(self, problem: Problem) -> dict[str, Any]:
        """The mechanism parameters used on inputs shaped like ``problem``: causal, then the
        mechanism's example parameters (when asked for), then the caller's."""
        params: dict[str, Any] = {}
        if any(p.name == "causal" for p in self.mechanism.params):
            params["causal"] = self.causal
        if self.example_params:
            params.update(self._example(problem))
        params.update(self.mechanism_params)
        return params

    def _example(self, problem: Problem) -> dict[str, Any]:
        key = (problem.q_heads, problem.kv_heads, problem.q_shape, problem.kv_shape, problem.head_dim, problem.dtype, str(problem.device))
        if key not in self._examples:
            self._examples[key] = self.mechanism.example_params(problem, self.pattern)
        self._last_example = self._examples[key]
        return self._examples[key]

    def forward(self, x: Tensor) -> Tensor:
        check_tokens("MultiheadAttention", x, self.d_model)
        q, k, v = self.heads(x)
        params = self.params_for(self.mechanism.describe(q, k, v))
        out = self.mechanism(q, k, v, backend=self.backend, **params)
        out = out[0] if isinstance(out, tuple) else out  # backends that also return an LSE
        return self.out_proj(out.transpose(1, 2).reshape(x.shape))

    def used_params(self) -> dict[str, Any]:
        """The mechanism parameters of the last forward (example ones filled in), for the record."""
        causal = {"causal": self.causal} if any(p.name == "causal" for p in self.mechanism.params) else {}
        return {**causal, **self._last_example, **self.mechanism_params}

    def state_size(self) -> Optional[int]:
        """Elements of the decoding state per sequence (all heads of this layer), or None when
        the mechanism keeps a KV cache that grows with the sequence (no ``state_size``).

        With ``example_params`` the parameters are those of the last forward (e.g. Based's
        ``feature_dim``); run one forward first."""
        if self.mechanism.state_size is None:
            return None
        params = {**self._last_example, **self.mechanism_params}
        params = {k: v for k, v in params.items() if not isinstance(v, Tensor)}
        return self.num_heads * int(self.mechanism.state_size(self.head_dim, self.head_dim, **params))

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, num_heads={self.num_heads}, mechanism={self.mechanism.name!r}, causal={self.causal}"


class ShortConvolution(nn.Module):
    """Causal depthwise convolution over the sequence: ``y_t = sum_{s<K} w_s ⊙ x_{t-s} + b``.

    Each channel has its own K taps; the input is left-padded by K - 1 so y_t sees only
    x_t, ..., x_{t-K+1} (causal). It lets a token read its predecessors, which recall models need
    to bind a value to the key before it (Zoology's BaseConv, Based's short convolutions, both
    Arora et al.). Cost O(N C K).

    Example::

        >>> conv = ShortConvolution(64, kernel_size=4)
        >>> y = conv(torch.randn(2, 128, 64))           # (2, 128, 64)
    """

    def __init__(self, d_model: int, kernel_size: int = 4, bias: bool = True):
        super().__init__()
        self.d_model = positive_int("ShortConvolution", "d_model", d_model)
        self.kernel_size = positive_int("ShortConvolution", "kernel_size", kernel_size)
        # weight[s] multiplies x_{t-K+1+s}: the layout of a left-padded Conv1d's taps
        self.weight = nn.Parameter(torch.empty(kernel_size, d_model))
        self.bias = nn.Parameter(torch.zeros(d_model)) if bias else None
        nn.init.uniform_(self.weight, -kernel_size**-0.5, kernel_size**-0.5)  # Conv1d's default bound for fan_in = K

    def forward(self, x: Tensor) -> Tensor:
        check_tokens("ShortConvolution", x, self.d_model)
        # K shifted multiply-adds over (B, N, C): on CPU a few times faster than a depthwise
        # Conv1d (which also needs two transposes) for the K <= 8 of short convolutions
        n, k = x.shape[1], self.kernel_size
        padded = F.pad(x, (0, 0, k - 1, 0))
        out = padded[:, 0:n] * self.weight[0]
        for s in range(1, k):
            out = out + padded[:, s : s + n] * self.weight[s]
        return out if self.bias is None else out + self.bias

    def state_size(self) -> int:
        """The last K - 1 inputs per channel (what decoding would keep)."""
        return (self.kernel_size - 1) * self.d_model

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, kernel_size={self.kernel_size}"

