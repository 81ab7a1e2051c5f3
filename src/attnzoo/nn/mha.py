"""Multi-head attention over any registered mechanism, with torch's conventions; a causal short convolution.

* :class:`MultiheadAttention`: ``torch.nn.MultiheadAttention``'s interface (its constructor
  arguments, ``forward(query, key, value, key_padding_mask, need_weights, attn_mask,
  average_attn_weights, is_causal) -> (output, weights)``, its layouts and mask conventions;
  :meth:`MultiheadAttention.from_torch` copies a torch module's weights) with ``mechanism=``
  choosing the token mixer among the registered mechanisms: q, k, v projections around
  ``attnzoo.attention(q, k, v, mechanism, **params)`` and an output projection, timm's
  ``Attention`` shape. With ``example_params=True`` every parameter the caller did not give is
  taken from the mechanism's own ``example_params(problem, pattern)`` for the actual input shape
  (cached per shape), so a benchmark can put every mechanism in the same model.
* :class:`ShortConvolution`: a causal depthwise convolution over the sequence (kernel 4 by
  default, as in Based), the "short convolution" of Zoology's and Based's recall models.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ParameterError, ShapeError
from ..kernels.reference import stable_softmax_lse
from ..masks import causal_offset
from ..registry import Mechanism, Problem, get
from ._checks import check_tokens, merge_heads, positive_int, split_heads
from ._registry import ModuleExample, register_module

__all__ = ["MultiheadAttention", "ShortConvolution", "self_pattern", "cross_pattern"]

_OWNER = "MultiheadAttention"


def self_pattern(causal: bool) -> str:
    """The CAB pattern of a self-attention layer: ``causal_self`` or ``noncausal_self``."""
    return "causal_self" if causal else "noncausal_self"


def cross_pattern(causal: bool) -> str:
    """The CAB pattern of a layer whose keys are not its queries' sequence: ``causal_cross`` or ``noncausal_cross``."""
    return "causal_cross" if causal else "noncausal_cross"


def _flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ParameterError(f"{_OWNER}: {name}: expected a bool, got {value!r}", argument=name)
    return value


def _checked_mechanism(name: Any, causal: bool, params: dict[str, Any], *, cross_only: bool) -> Mechanism:
    """The registered mechanism, refused with a reason when it has none of the patterns the layer
    may need (self or cross, causal or not) or lacks a parameter name."""
    if not isinstance(name, str):
        raise ParameterError(f"{_OWNER}: mechanism: expected a registered name (str), got {name!r}", argument="mechanism")
    mech = get(name)  # UnknownMechanismError listing the registered names
    wanted = (cross_pattern(causal),) if cross_only else (self_pattern(causal), cross_pattern(causal))
    if not any(p in mech.patterns for p in wanted):
        supported = ", ".join(sorted(mech.patterns)) or "none"
        raise ParameterError(f"{_OWNER}: mechanism {name!r} does not support the {' or '.join(wanted)} pattern (it supports: {supported})", argument="mechanism")
    accepted = {p.name for p in mech.params}
    unknown = [n for n in params if n not in accepted]
    if unknown:
        raise ParameterError(f"{_OWNER}: {name}: unknown parameter {unknown[0]!r}; it accepts: {', '.join(sorted(accepted)) or 'none'}", argument=unknown[0])
    if "key_padding_mask" in params:
        raise ParameterError(f"{_OWNER}: key_padding_mask: a per-batch mask, pass it to forward()", argument="key_padding_mask")
    return mech


def _causal_bias(n_q: int, n_k: int, alignment: str, like: Tensor) -> Tensor:
    """(1, 1, L, S) additive mask: -inf where key j comes after query i (bottom_right: j > i + S - L)."""
    offset = causal_offset(n_q, n_k, alignment)
    i = torch.arange(n_q, device=like.device).view(n_q, 1)
    j = torch.arange(n_k, device=like.device).view(1, n_k)
    return torch.zeros(1, 1, n_q, n_k, dtype=like.dtype, device=like.device).masked_fill(j > i + offset, float("-inf"))


def _one_more_key(padding: Optional[Tensor], bias: Optional[Tensor]) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """Masks widened by one key column that every query may see (add_bias_kv, add_zero_attn)."""
    if padding is not None:
        padding = torch.cat([padding, padding.new_zeros(padding.shape[0], 1)], dim=1)
    if bias is not None:
        bias = F.pad(bias, (0, 1))
    return padding, bias


def _open_empty_rows(bias: Tensor, padding: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """``bias`` with the rows that mask every key set to 0, and those rows (B|1, H|1, L, 1).

    A query with no key to see would give NaN (torch's MultiheadAttention returns NaN there); the
    rows are opened so every backend stays finite, and the caller zeros their output: attnzoo's
    rule, a query that sees no key outputs 0."""
    blocked = bias == float("-inf")
    if padding is not None:
        blocked = blocked | padding[:, None, None, :]
    empty = blocked.all(dim=-1, keepdim=True)
    return torch.where(empty, torch.zeros((), dtype=bias.dtype, device=bias.device), bias), empty


@register_module(
    "D1",
    paper="Attention Is All You Need (Vaswani et al., NeurIPS 2017); FlashAttention-2 (Dao, ICLR 2024)",
    layout="(B, N, C) with batch_first=True; torch's (L, B, E) by default",
    example=ModuleExample(
        dict(embed_dim=512, num_heads=8, batch_first=True), inputs=[(1, 1024, 512)], test_inputs=[(2, 17, 32)],
        test_kwargs=dict(embed_dim=32, num_heads=2),
    ),
)
class MultiheadAttention(nn.Module):
    """``torch.nn.MultiheadAttention`` with any registered mechanism as the token mixer.

    ``y = W_o · concat_h attention(W_q x_q, W_k x_k, W_v x_v)_h`` with ``num_heads`` heads of
    ``embed_dim / num_heads`` channels, computed by ``attnzoo.attention(q, k, v, mechanism,
    **params)``. With ``mechanism="softmax"`` (the default) it computes what torch's module
    computes, and :meth:`from_torch` builds one from a torch module's weights.

    torch's conventions, kept:

    * layout: (L, B, E) tokens, or (B, L, E) with ``batch_first=True``; unbatched (L, E) too.
      ``forward(query, key, value)`` is cross-attention (``kdim``/``vdim`` set the key and value
      widths); ``key`` and ``value`` default to ``query`` (self-attention, an attnzoo extension);
    * ``key_padding_mask`` (B, S): bool, **True = ignore the key**, or float, added to the scores;
      every mechanism that declares ``key_padding_mask`` takes the bool form (padded batches),
      the others are refused naming it;
    * ``attn_mask`` (L, S) or (B * num_heads, L, S): bool, **True = NOT allowed** (torch's
      convention, the opposite of a ``mask_mod``), or float, added to the scores. It is an
      additive score bias, so only mechanisms with a ``bias`` parameter (softmax) take it;
    * ``dropout`` on the attention weights in training (softmax: the weights are materialized
      for it, torch does the same when it drops);
    * returns ``(output, weights)``; ``weights`` is None unless ``need_weights=True`` (softmax
      only: (B, L, S) averaged over heads, (B, H, L, S) with ``average_attn_weights=False``,
      after dropout, as torch returns them). With ``need_weights`` or dropout the layer computes
      ``P @ V`` itself instead of calling the mechanism (``backend`` does not apply, and
      ``attnzoo.hooks`` sees no call: capture with ``need_weights=False`` in eval mode);
    * ``add_bias_kv`` (a learned key and value appended to the sequence) and ``add_zero_attn``
      (a zero key and value appended per head), for non-causal layers and mechanisms with a
      cross pattern (the keys then outnumber the queries).

    Departures, each deliberate: ``need_weights`` defaults to False (torch: True, which
    materializes L x S weights per head on every call); ``forward``'s ``is_causal`` applies the
    causal pattern for that call and needs no ``attn_mask`` (torch treats it as a hint about
    ``attn_mask``); a query whose keys are all masked outputs 0 (torch: NaN); the q, k, v
    projections are three ``nn.Linear`` (``q_proj``, ``k_proj``, ``v_proj``; torch stacks them in
    ``in_proj_weight``) with nn.Linear's initialization (torch: Xavier-uniform), so copy a torch
    module's weights with :meth:`from_torch` rather than ``load_state_dict``.

    attnzoo's arguments, keyword-only: ``mechanism`` (a registered name) and its parameters as
    keywords (checked by name here, by value at the first call), ``causal`` (default False: the
    ``causal_self``/``causal_cross`` pattern, passed as the mechanism's ``causal`` parameter when
    it has one), ``backend`` (force one of the mechanism's backends), ``example_params`` (the
    missing parameters come from ``Mechanism.example_params(problem, pattern)`` per input shape;
    parameters that are tensors sized by the sequence, like ``kernelized_rpe``'s ``rpe``, are
    rebuilt per length). Renamed from the layer this one replaces: ``d_model`` is
    ``embed_dim`` (``self.d_model`` still reads it); ``mechanism`` and ``causal`` are no longer
    positional (the third positional argument is torch's ``dropout``) and ``causal`` defaults
    to False; ``forward(x)`` returns ``(y, None)`` and takes (L, B, E) unless ``batch_first``.

    Cost: the projections, O((L + S) E^2), plus the mechanism's own cost; L x S per head more
    memory when the weights are materialized (``need_weights`` or dropout).

    Example::

        >>> layer = MultiheadAttention(64, 4, batch_first=True, mechanism="linear", causal=True, feature_map="elu")
        >>> y, _ = layer(torch.randn(2, 128, 64))            # (2, 128, 64)
        >>> mha = MultiheadAttention.from_torch(torch.nn.MultiheadAttention(64, 4))
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        dropout: float = 0.0,
        bias: bool = True,
        add_bias_kv: bool = False,
        add_zero_attn: bool = False,
        kdim: Optional[int] = None,
        vdim: Optional[int] = None,
        batch_first: bool = False,
        device: Any = None,
        dtype: Optional[torch.dtype] = None,
        *,
        mechanism: str = "softmax",
        causal: bool = False,
        backend: Optional[str] = None,
        example_params: bool = False,
        **mechanism_params: Any,
    ):
        super().__init__()
        if isinstance(dropout, str):
            raise ParameterError(
                f"{_OWNER}: got {dropout!r} as the third argument, which is torch's dropout; the mechanism is keyword-only: "
                f"MultiheadAttention(embed_dim, num_heads, mechanism={dropout!r})",
                argument="mechanism",
            )
        self.embed_dim = positive_int(_OWNER, "embed_dim", embed_dim)
        self.num_heads = positive_int(_OWNER, "num_heads", num_heads)
        if embed_dim % num_heads:
            raise ParameterError(f"{_OWNER}: num_heads: expected a divisor of embed_dim={embed_dim}, got {num_heads}", argument="num_heads")
        self.kdim = embed_dim if kdim is None else positive_int(_OWNER, "kdim", kdim)
        self.vdim = embed_dim if vdim is None else positive_int(_OWNER, "vdim", vdim)
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ParameterError(f"{_OWNER}: dropout: expected a probability in [0, 1), got {dropout!r}", argument="dropout")
        for name, value in (("bias", bias), ("add_bias_kv", add_bias_kv), ("add_zero_attn", add_zero_attn)):
            _flag(name, value)
        self.batch_first, self.causal = _flag("batch_first", batch_first), _flag("causal", causal)
        self.example_params = _flag("example_params", example_params)
        self.add_zero_attn, self.dropout = add_zero_attn, float(dropout)
        if causal and (add_bias_kv or add_zero_attn):
            self._refuse_extra_keys_with_causal("causal")
        self.pattern = self_pattern(causal)
        self.mechanism = _checked_mechanism(mechanism, causal, mechanism_params, cross_only=add_bias_kv or add_zero_attn)
        if self.dropout > 0 and self.mechanism.name != "softmax":
            raise ParameterError(
                f"{_OWNER}: dropout: drops attention weights, which this layer materializes for softmax only; got mechanism {self.mechanism.name!r}",
                argument="dropout",
            )
        self.backend = backend
        self.mechanism_params = dict(mechanism_params)
        self.head_dim = embed_dim // num_heads
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.k_proj = nn.Linear(self.kdim, embed_dim, bias=bias, **factory)
        self.v_proj = nn.Linear(self.vdim, embed_dim, bias=bias, **factory)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.bias_k: Optional[nn.Parameter] = None
        self.bias_v: Optional[nn.Parameter] = None
        if add_bias_kv:
            self.bias_k = nn.Parameter(nn.init.xavier_normal_(torch.empty(1, 1, embed_dim, **factory)))
            self.bias_v = nn.Parameter(nn.init.xavier_normal_(torch.empty(1, 1, embed_dim, **factory)))
        self._examples: dict[tuple[Any, ...], dict[str, Any]] = {}
        self._last_example: dict[str, Any] = {}

    @property
    def d_model(self) -> int:
        """``embed_dim``, under the name the layer had before it took torch's conventions."""
        return self.embed_dim

    def _refuse_extra_keys_with_causal(self, argument: str) -> None:
        raise ParameterError(
            f"{_OWNER}: {argument}: add_bias_kv/add_zero_attn append keys after the sequence, which a causal pattern aligned to the "
            "last key would let every query see one key ahead; use a non-causal layer with a causal attn_mask",
            argument=argument,
        )

    # ---- torch interop -----------------------------------------------------------------
    @classmethod
    def from_torch(cls, module: nn.MultiheadAttention, **kwargs: Any) -> "MultiheadAttention":
        """This layer with ``module``'s configuration and a copy of its weights (and its train/eval
        mode); ``kwargs`` are attnzoo's keyword arguments (``mechanism``, ``causal``, ``backend``,
        mechanism parameters)."""
        if not isinstance(module, nn.MultiheadAttention):
            raise ParameterError(f"{_OWNER}.from_torch: module: expected a torch.nn.MultiheadAttention, got {type(module).__name__}", argument="module")
        like = module.out_proj.weight
        layer = cls(
            module.embed_dim, module.num_heads, module.dropout, module.in_proj_bias is not None, module.bias_k is not None,
            module.add_zero_attn, module.kdim, module.vdim, module.batch_first, device=like.device, dtype=like.dtype, **kwargs,
        )
        layer.copy_torch_weights(module)
        return layer.train(module.training)

    @torch.no_grad()
    def copy_torch_weights(self, module: nn.MultiheadAttention) -> None:
        """Copy a torch module's projections (stacked ``in_proj_weight`` or separate ``q/k/v_proj_weight``),
        biases, ``out_proj`` and ``bias_k``/``bias_v`` into this layer (shapes must match)."""
        if module._qkv_same_embed_dim:
            weights = tuple(module.in_proj_weight.chunk(3))
        else:
            weights = (module.q_proj_weight, module.k_proj_weight, module.v_proj_weight)
        biases = tuple(module.in_proj_bias.chunk(3)) if module.in_proj_bias is not None else (None, None, None)
        for proj, weight, b in zip((self.q_proj, self.k_proj, self.v_proj), weights, biases):
            proj.weight.copy_(weight)
            if b is not None:
                proj.bias.copy_(b)
        self.out_proj.weight.copy_(module.out_proj.weight)
        if module.out_proj.bias is not None:
            self.out_proj.bias.copy_(module.out_proj.bias)
        if module.bias_k is not None:
            self.bias_k.copy_(module.bias_k)  # type: ignore[union-attr]
            self.bias_v.copy_(module.bias_v)  # type: ignore[union-attr]

    # ---- parameters of a call ----------------------------------------------------------
    def heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Batch-first (B, N, E) self-attention tokens -> q, k, v of shape (B, H, N, E / H)."""
        return tuple(split_heads(p(x), self.num_heads) for p in (self.q_proj, self.k_proj, self.v_proj))  # type: ignore[return-value]

    def params_for(self, problem: Problem, pattern: Optional[str] = None) -> dict[str, Any]:
        """The mechanism parameters used on inputs shaped like ``problem`` for ``pattern`` (default:
        the layer's self pattern): causal, then the mechanism's example parameters (when asked
        for), then the caller's."""
        pattern = pattern or self.pattern
        params: dict[str, Any] = {}
        if self._takes("causal"):
            params["causal"] = pattern.startswith("causal")
        if self.example_params:
            params.update(self._example(problem, pattern))
        params.update(self.mechanism_params)
        return params

    def _takes(self, name: str) -> bool:
        return any(p.name == name for p in self.mechanism.params)

    def _example(self, problem: Problem, pattern: str) -> dict[str, Any]:
        key = (pattern, problem.q_heads, problem.kv_heads, problem.q_shape, problem.kv_shape, problem.head_dim, problem.dtype, str(problem.device))
        if key not in self._examples:
            example = self.mechanism.example_params(problem, pattern)
            example.pop("key_padding_mask", None)  # padding is the caller's, per batch
            self._examples[key] = example
        self._last_example = self._examples[key]
        return self._examples[key]

    def _pattern(self, n_q: int, n_k: int, causal: bool) -> str:
        """self when the keys are as many as the queries, else cross; refused when the mechanism lacks it."""
        pattern = self_pattern(causal) if n_q == n_k else cross_pattern(causal)
        if pattern not in self.mechanism.patterns:
            supported = ", ".join(sorted(self.mechanism.patterns))
            raise ParameterError(
                f"{_OWNER}: mechanism {self.mechanism.name!r} does not support the {pattern} pattern of this call "
                f"({n_q} queries, {n_k} keys; it supports: {supported})",
                argument="mechanism",
            )
        return pattern

    # ---- forward -----------------------------------------------------------------------
    def forward(
        self,
        query: Tensor,
        key: Optional[Tensor] = None,
        value: Optional[Tensor] = None,
        key_padding_mask: Optional[Tensor] = None,
        need_weights: bool = False,
        attn_mask: Optional[Tensor] = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Optional[Tensor]]:
        """``(output, weights)``: output like ``query`` with ``embed_dim`` channels; weights None
        unless ``need_weights``. Layouts and masks as in the class docstring."""
        key = query if key is None else key
        value = key if value is None else value
        unbatched = self._check_inputs(query, key, value)
        causal = self._call_causal(_flag("is_causal", is_causal))
        _flag("need_weights", need_weights)
        if unbatched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None and key_padding_mask.dim() == 1:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        out, weights = self._attend(query, key, value, key_padding_mask, attn_mask, need_weights, average_attn_weights, causal)
        if unbatched:
            return out.squeeze(0), None if weights is None else weights.squeeze(0)
        return (out if self.batch_first else out.transpose(0, 1)), weights

    def _call_causal(self, is_causal: bool) -> bool:
        if not is_causal or self.causal:
            return self.causal
        if self.bias_k is not None or self.add_zero_attn:
            self._refuse_extra_keys_with_causal("is_causal")
        if not self._takes("causal"):
            raise ParameterError(f"{_OWNER}: is_causal: mechanism {self.mechanism.name!r} has no causal parameter", argument="is_causal")
        return True

    def _check_inputs(self, query: Any, key: Any, value: Any) -> bool:
        """Shapes against torch's layouts; True for unbatched (L, E) inputs."""
        layout = "(B, L, E)" if self.batch_first else "(L, B, E)"
        for name, t, width in (("query", query, self.embed_dim), ("key", key, self.kdim), ("value", value, self.vdim)):
            if not isinstance(t, Tensor):
                raise ShapeError(f"{_OWNER}: {name}: expected a tensor, got {type(t).__name__}", argument=name)
            if t.dim() not in (2, 3) or t.shape[-1] != width or t.dim() != query.dim():
                raise ShapeError(
                    f"{_OWNER}: {name}: expected {layout} or unbatched (L, E) like query with {width} channels, got shape {tuple(t.shape)}", argument=name
                )
        batch_axis = 0 if self.batch_first or query.dim() == 2 else 1
        if query.dim() == 3 and not (query.shape[batch_axis] == key.shape[batch_axis] == value.shape[batch_axis]):
            name = "key" if key.shape[batch_axis] != query.shape[batch_axis] else "value"
            raise ShapeError(f"{_OWNER}: {name}: batch sizes differ ({layout}): query {tuple(query.shape)}, key {tuple(key.shape)}, value {tuple(value.shape)}", argument=name)
        seq_axis = 1 - batch_axis if query.dim() == 3 else 0
        if key.shape[seq_axis] != value.shape[seq_axis]:
            raise ShapeError(f"{_OWNER}: value: expected the {key.shape[seq_axis]} positions of key, got shape {tuple(value.shape)}", argument="value")
        return query.dim() == 2

    def _masks(self, key_padding_mask: Any, attn_mask: Any, b: int, n_q: int, n_k: int, like: Tensor) -> tuple[Optional[Tensor], Optional[Tensor]]:
        """torch's masks as attnzoo's: bool key padding (B, S) and an additive bias (B|1, H|1, L, S)."""
        padding = bias = None
        if key_padding_mask is not None:
            if not isinstance(key_padding_mask, Tensor) or tuple(key_padding_mask.shape) != (b, n_k):
                shown = tuple(key_padding_mask.shape) if isinstance(key_padding_mask, Tensor) else type(key_padding_mask).__name__
                raise ShapeError(f"{_OWNER}: key_padding_mask: expected (B, S) = ({b}, {n_k}), got {shown}", argument="key_padding_mask")
            if key_padding_mask.dtype == torch.bool:
                self._require("key_padding_mask", "key_padding_mask", "a key padding mask (padded batches)")
                padding = key_padding_mask
            elif key_padding_mask.is_floating_point():
                self._require("bias", "key_padding_mask", "an additive score bias (a float key_padding_mask; pass a bool one)")
                bias = key_padding_mask.to(like.dtype).view(b, 1, 1, n_k)
            else:
                raise ParameterError(f"{_OWNER}: key_padding_mask: expected a bool (True = ignore the key) or float (additive) tensor, got {key_padding_mask.dtype}", argument="key_padding_mask")
        if attn_mask is not None:
            bias = self._attn_bias(attn_mask, b, n_q, n_k, like) + (0.0 if bias is None else bias)
        return padding, bias

    def _attn_bias(self, attn_mask: Any, b: int, n_q: int, n_k: int, like: Tensor) -> Tensor:
        shapes = {(n_q, n_k): (1, 1, n_q, n_k), (b * self.num_heads, n_q, n_k): (b, self.num_heads, n_q, n_k)}
        shape = tuple(attn_mask.shape) if isinstance(attn_mask, Tensor) else None
        if shape not in shapes:
            raise ShapeError(
                f"{_OWNER}: attn_mask: expected (L, S) = ({n_q}, {n_k}) or (B * num_heads, L, S) = ({b * self.num_heads}, {n_q}, {n_k}), got {shape or type(attn_mask).__name__}",
                argument="attn_mask",
            )
        self._require("bias", "attn_mask", "an additive score bias")
        mask = attn_mask.view(shapes[shape])
        if mask.dtype == torch.bool:  # True = NOT allowed, as in torch
            return torch.zeros(mask.shape, dtype=like.dtype, device=like.device).masked_fill(mask, float("-inf"))
        if not mask.is_floating_point():
            raise ParameterError(f"{_OWNER}: attn_mask: expected a bool (True = not allowed) or float (additive) tensor, got {mask.dtype}", argument="attn_mask")
        return mask.to(like.dtype)

    def _require(self, param: str, argument: str, what: str) -> None:
        if not self._takes(param):
            raise ParameterError(
                f"{_OWNER}: {argument}: mechanism {self.mechanism.name!r} takes no {param} parameter, so it cannot apply {what}",
                argument=argument,
            )

    def _attend(self, q_in, k_in, v_in, key_padding_mask, attn_mask, need_weights, average, causal) -> tuple[Tensor, Optional[Tensor]]:
        """Batch-first inputs (B, L, E), (B, S, kdim), (B, S, vdim) -> (B, L, E) and the weights."""
        b, n_q, n_k = q_in.shape[0], q_in.shape[1], k_in.shape[1]
        q, k, v = self.q_proj(q_in), self.k_proj(k_in), self.v_proj(v_in)
        padding, bias = self._masks(key_padding_mask, attn_mask, b, n_q, n_k, q)
        if self.bias_k is not None and self.bias_v is not None:
            k = torch.cat([k, self.bias_k.expand(b, 1, -1)], dim=1)
            v = torch.cat([v, self.bias_v.expand(b, 1, -1)], dim=1)
            padding, bias = _one_more_key(padding, bias)
        q, k, v = (split_heads(t, self.num_heads) for t in (q, k, v))
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros(b, self.num_heads, 1, self.head_dim)], dim=2)
            v = torch.cat([v, v.new_zeros(b, self.num_heads, 1, self.head_dim)], dim=2)
            padding, bias = _one_more_key(padding, bias)
        pattern = self._pattern(q.shape[2], k.shape[2], causal)
        params = self.params_for(self.mechanism.describe(q, k, v), pattern)
        weights = None
        if need_weights or (self.training and self.dropout > 0):
            out, weights = self._materialized(q, k, v, padding, bias, params)
            if average:
                weights = weights.mean(dim=1)
        else:
            out = self._mechanism_call(q, k, v, padding, bias, params)
        return self.out_proj(merge_heads(out)), weights

    def _mechanism_call(self, q: Tensor, k: Tensor, v: Tensor, padding: Optional[Tensor], bias: Optional[Tensor], params: dict[str, Any]) -> Tensor:
        if padding is not None:
            params["key_padding_mask"] = padding
        empty = None
        if bias is not None:
            if params.get("causal"):  # fold it into the bias so empty rows are found whatever masks them
                bias = bias + _causal_bias(q.shape[2], k.shape[2], params.get("causal_alignment", "bottom_right"), bias)
                params["causal"] = False
            bias, empty = _open_empty_rows(bias, padding)
            params["bias"] = bias if params.get("bias") is None else params["bias"] + bias
        out = self.mechanism(q, k, v, backend=self.backend, **params)
        out = out[0] if isinstance(out, tuple) else out  # backends that also return an LSE
        return out if empty is None else out.masked_fill(empty, 0.0)

    def _materialized(self, q: Tensor, k: Tensor, v: Tensor, padding: Optional[Tensor], bias: Optional[Tensor], params: dict[str, Any]) -> tuple[Tensor, Tensor]:
        """softmax's weights (B, H, L, S), dropped in training, and their ``P @ V``: torch's path when
        it returns or drops the weights."""
        if self.mechanism.name != "softmax":
            raise ParameterError(
                f"{_OWNER}: need_weights: the weights are computed for mechanism 'softmax' only, not {self.mechanism.name!r} "
                "(attnzoo.hooks captures the weights of any mechanism that defines them)",
                argument="need_weights",
            )
        for name in ("mask_mod", "score_mod"):
            if params.get(name) is not None:
                raise ParameterError(f"{_OWNER}: {name}: the materialized weights (need_weights, dropout) take attn_mask, key_padding_mask, causal, bias and scale only", argument=name)
        scale = params.get("scale") or self.head_dim**-0.5
        s = torch.matmul(q, k.transpose(-1, -2)) * scale
        for extra in (params.get("bias"), bias):
            if extra is not None:
                s = s + extra
        if params.get("causal"):
            s = s + _causal_bias(q.shape[2], k.shape[2], params.get("causal_alignment", "bottom_right"), s)
        if padding is not None:
            s = s.masked_fill(padding[:, None, None, :], float("-inf"))
        p, _ = stable_softmax_lse(s)  # a row with no key: weights 0, never NaN
        p = F.dropout(p, self.dropout, training=self.training)
        return torch.matmul(p, v), p

    # ---- records -----------------------------------------------------------------------
    def used_params(self) -> dict[str, Any]:
        """The mechanism parameters of the last forward (example ones filled in), for the record."""
        causal = {"causal": self.causal} if self._takes("causal") else {}
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
        return (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, mechanism={self.mechanism.name!r}, causal={self.causal}, "
            f"batch_first={self.batch_first}, dropout={self.dropout}"
        )


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

