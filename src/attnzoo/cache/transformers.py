"""KV-cache eviction policies as transformers 5.x caches, for ``model.generate(..., cache=...)``.

::

    from attnzoo.cache import SnapKVCache, StreamingLLMCache

    out = model.generate(ids, cache=SnapKVCache(model, budget=256), max_new_tokens=64)
    out = model.generate(ids, cache=StreamingLLMCache(budget=256, n_sink=4), max_new_tokens=64)

``ZipCacheCache(model, high_fraction=0.2)`` (K5) evicts nothing: it stores the prompt in 4 and 2
bits (ZipCache's split by saliency) and returns it dequantized at each step.

(``past_key_values=`` works too; transformers 5.24+ names the argument ``cache`` and warns on
the old name.) Each cache is a transformers ``Cache`` whose layers subclass ``CacheLayerMixin``;
the eviction rules are the pure functions of :mod:`attnzoo.cache.policies`.

**Position policy: original positions are kept.** ``get_seq_length()`` reports the tokens seen
(as transformers' own sliding-window layer does), so the next query gets its true position
(generate also passes ``position_ids``), while the layer stores at most ``budget`` keys. The keys
transformers hands the cache are already rotated (post-RoPE), so a kept key keeps the position it
was rotated with. ``get_mask_sizes(q)`` returns ``(stored + q, seen - stored)``: exactly the keys
``update`` returns, the new ones last, so the mask's causal part among the new queries is right
and every kept key is visible. Re-assigning positions inside the cache (StreamingLLM's paper with
pre-RoPE keys, transformers' removed ``SinkCache``) would need the model's rotary function to
re-rotate every kept key at each step, which is model-specific (rope types, scaling); keeping
positions is model-agnostic and is what kvpress and H2O's real-drop code do. The price: positions
grow past the cache length, so the rule does not extend a model's context window.

**When eviction happens.** ``update`` appends the step's keys and returns all of them, so the
step's attention always sees the stored keys plus its own (the prompt's prefill runs on the full
prompt, as in every paper and in kvpress); the eviction then brings the layer back to ``budget``
before the next step. StreamingLLM and key-norm evict inside ``update``; H2O, SnapKV and TOVA
score with attention probabilities and evict right after the step's attention call.

**How the attention-scored policies get the queries.** ``update`` sees keys and values only, and
the attention probabilities exist only inside the attention function (sdpa never materializes
them). Building a cache with the model (``H2OCache(model, ...)``: required for these three,
optional for the others) binds it: it wraps the model's attention implementation: the model is switched to ``"attnzoo-cache:<implementation>"``, which calls the
original attention function unchanged (same mask function too, so the outputs are identical) and
then hands the layer's post-RoPE queries to the cache, which recomputes only the probability rows
its rule needs (all queries' column sums for H2O, the last ``window`` queries for SnapKV, the last
query for TOVA), in blocks of 256 queries, with no eager attention. transformers guarantees these
queries for every model that uses its attention interface, with no per-model code (kvpress instead
re-projects queries from hidden states with per-model special cases). The cache checks that the
keys the attention received are those its ``update`` returned, and a layer still waiting for its
queries at the next step raises :class:`CacheStateError` (a cache built without the model, or
another cache built with the model since). :func:`unbind` restores the original implementation.

**Budgets.** ``budget`` is a token count per layer and kv head; ``compression_ratio`` (kvpress's
convention: the fraction removed) is turned into a count once, from the prompt length at the
first ``update``: ``int(L * (1 - compression_ratio))``. SnapKV compresses once (after the prompt)
and then keeps every generated token; the other policies hold the layer at ``budget`` after every
step. Every layer gets the same budget (transformers sizes one mask for all layers from layer 0).
``memory_bytes()`` reports the bytes a cache holds (keys, values, kept positions, scores),
``kv_bytes()`` the keys and values alone, ``stored_length(i)`` the keys a layer stores.

Refused with an error: padded batches (ParameterError naming ``attention_mask``: each row would
keep different tokens and transformers' 2D padding mask indexes keys by column, so it would no
longer line up with the kept keys; batches of equal-length rows work, each row keeping its own
tokens), models with sliding-window layers, and ``crop`` (assisted decoding). Beam search
reorders every per-token state with the keys but is not tested.
"""

from __future__ import annotations

import sys
import weakref
from functools import partial
from typing import Any, Optional

import torch
from torch import Tensor

from ..integrations._torchvision import ensure_importable

ensure_importable()  # transformers may import torchvision: see integrations/_torchvision.py

from transformers import AttentionInterface  # noqa: E402
from transformers.cache_utils import Cache, CacheLayerMixin  # noqa: E402
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface  # noqa: E402
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS  # noqa: E402

from ..errors import AttnZooError, ParameterError  # noqa: E402
from . import policies  # noqa: E402
from .quantized import MixedPrecisionKV, mixed_precision_kv, normalized_attention_saliency  # noqa: E402

__all__ = [
    "CacheStateError",
    "PolicyCache",
    "StreamingLLMCache",
    "KeyNormCache",
    "H2OCache",
    "SnapKVCache",
    "TOVACache",
    "ZipCacheCache",
    "PyramidKVCache",
    "unbind",
]

_PREFIX = "attnzoo-cache:"


class CacheStateError(AttnZooError, RuntimeError):
    """A policy cache cannot go on: it missed the queries it needs, or was asked for what it cannot do."""


# --------------------------------------------------------------------------------------------
# layers
# --------------------------------------------------------------------------------------------
class _PolicyLayer(CacheLayerMixin):
    """One layer's keys/values under an eviction rule; positions kept (see the module docstring).

    State per (batch, kv head): ``keys``/``values`` ``(B, Hkv, stored, D)``, ``positions``
    ``(B, Hkv, stored)`` (the original position of each kept token) and the policy's per-token
    state (``_state_names``), all gathered together on eviction.
    """

    is_sliding = False
    is_croppable = False
    is_compileable = False
    supports_early_init = False
    _state_names: tuple[str, ...] = ("keys", "values", "positions")

    def __init__(self, *, budget: Optional[int] = None, compression_ratio: Optional[float] = None, **_: Any):
        super().__init__()
        self._budget_arg, self._ratio = budget, compression_ratio
        self.budget: Optional[int] = None  # tokens kept, resolved at the first update
        self.seen = 0
        self.positions: Optional[Tensor] = None
        self._returned: Optional[Tensor] = None  # the keys the last update returned
        self._pending = False  # waiting for this step's queries

    # -- the CacheLayerMixin contract ----------------------------------------------------------
    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        b, h, _, d = key_states.shape
        self.device = key_states.device
        self.keys = key_states.new_empty(b, h, 0, d)
        self.values = value_states.new_empty(b, h, 0, value_states.shape[-1])
        self.positions = torch.empty(b, h, 0, dtype=torch.long, device=self.device)
        self.is_initialized = True

    def update(self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        if self._pending:
            raise CacheStateError(
                f"{type(self).__name__}: the previous step's queries never reached this cache, so it could not evict; "
                "build the cache with the model that runs it (e.g. H2OCache(model, budget=...)), and build a new one "
                "per generate() call: the model feeds the cache built last"
            )
        _refuse_padding_from_positions(kwargs)
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        q = key_states.shape[-2]
        if self.budget is None:
            self.budget = policies.resolve_budget(q, budget=self._budget_arg, compression_ratio=self._ratio)
            self._configure()
        b, h = key_states.shape[:2]
        new_positions = torch.arange(self.seen, self.seen + q, device=self.device).expand(b, h, q)
        keys = torch.cat([self.keys, key_states], dim=-2)
        values = torch.cat([self.values, value_states], dim=-2)
        self.keys, self.values = keys, values
        self.positions = torch.cat([self.positions, new_positions], dim=-1)
        self.seen += q
        self._returned = keys
        self._after_append(q)
        return keys, values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        stored = self.stored_length()
        return stored + query_length, self.seen - stored

    def get_seq_length(self) -> int:
        """The tokens seen (not the tokens stored): the next token's position."""
        return self.seen

    def get_max_length(self) -> int:
        return -1

    # -- what a policy fills in ----------------------------------------------------------------
    def _configure(self) -> None:
        """Check the policy's parameters against the resolved budget."""

    def _after_append(self, q: int) -> None:
        """Evict now (rules without scores) or set ``_pending`` to wait for the queries."""

    def _evict_with_queries(self, queries: Tensor, scale: float) -> None:
        raise NotImplementedError

    # -- helpers --------------------------------------------------------------------------------
    def stored_length(self) -> int:
        return 0 if self.keys is None else self.keys.shape[-2]

    def _keep(self, kept: Tensor) -> None:
        for name in self._state_names:
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, policies.gather_kept(value, kept))

    def observe(self, queries: Tensor, keys: Tensor, attention_mask: Optional[Tensor], scale: float) -> None:
        """The step's queries, from the attention function (after the attention ran)."""
        if keys is not self._returned:
            return
        _refuse_padding_from_mask(attention_mask)
        if not self._pending:
            return
        self._pending = False
        self._evict_with_queries(queries, scale)

    def memory_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (getattr(self, n) for n in self._state_names) if t is not None)

    # -- batch bookkeeping generate() may ask for -----------------------------------------------
    def _map(self, fn) -> None:
        for name in self._state_names:
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, fn(value))

    def reset(self) -> None:
        for name in self._state_names:
            setattr(self, name, None)
        self.is_initialized, self.seen, self.budget, self._pending, self._returned = False, 0, None, False, None

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: Tensor) -> None:
        self._map(lambda t: t[indices, ...])

    def crop(self, tokens_to_remove: int) -> None:
        raise CacheStateError(f"{type(self).__name__}: crop is not supported (evicted tokens cannot be rolled back)")


class _StreamingLLMLayer(_PolicyLayer):
    def __init__(self, *, n_sink: int = 4, **kwargs: Any):
        super().__init__(**kwargs)
        self.n_sink = n_sink

    def _configure(self) -> None:
        if self.n_sink >= self.budget:
            raise ParameterError(f"n_sink: must be < the budget ({self.budget} tokens), got {self.n_sink}", argument="n_sink")

    def _after_append(self, q: int) -> None:
        self._keep(policies.streaming_llm(self.keys, budget=self.budget, n_sink=self.n_sink))


class _KeyNormLayer(_PolicyLayer):
    def _after_append(self, q: int) -> None:
        self._keep(policies.key_norm(self.keys, budget=self.budget))


class _H2OLayer(_PolicyLayer):
    _state_names = _PolicyLayer._state_names + ("scores",)

    def __init__(self, *, heavy_fraction: float = 0.5, **kwargs: Any):
        super().__init__(**kwargs)
        self.heavy_fraction = heavy_fraction
        self.scores: Optional[Tensor] = None
        self.recent = 0

    def _configure(self) -> None:
        self.recent = self.budget - int(round(self.budget * self.heavy_fraction))

    def _after_append(self, q: int) -> None:
        self._pending = True  # every step's attention accumulates, over budget or not

    def _evict_with_queries(self, queries: Tensor, scale: float) -> None:
        self.scores = policies.accumulate_attention(self.scores, queries, self.keys, scale=scale)
        self._keep(policies.h2o(self.scores, budget=self.budget, recent=self.recent))


class _SnapKVLayer(_PolicyLayer):
    def __init__(self, *, window: int = 64, kernel_size: int = 5, **kwargs: Any):
        super().__init__(**kwargs)
        self.window, self.kernel_size = window, kernel_size
        self.compressed = False  # SnapKV runs once, on the first forward (the prompt)

    def _configure(self) -> None:
        if self.budget < self.window:
            argument = "budget" if self._budget_arg is not None else "compression_ratio"
            raise ParameterError(
                f"{argument}: keeps {self.budget} tokens, fewer than the observation window ({self.window}) that SnapKV "
                "always keeps; raise the budget or lower window",
                argument=argument,
            )

    def _after_append(self, q: int) -> None:
        if not self.compressed:
            self.compressed = True
            self._pending = self.stored_length() > self.budget

    def _evict_with_queries(self, queries: Tensor, scale: float) -> None:
        window = queries[:, :, -self.window :]
        self._keep(policies.snapkv(self.keys, window, budget=self.budget, kernel_size=self.kernel_size, scale=scale))

    def reset(self) -> None:
        super().reset()
        self.compressed = False


class _PyramidKVLayer(_SnapKVLayer):
    """SnapKV with PyramidKV's per-layer budget: ``budget`` is the mean, the layer's own share is
    :func:`attnzoo.cache.policies.pyramid_budgets` at its index (set by :class:`PyramidKVCache`)."""

    def __init__(self, *, beta: int = 20, **kwargs: Any):
        super().__init__(**kwargs)
        self.beta = beta
        self.layer_idx, self.num_layers = 0, 1

    def _configure(self) -> None:
        super()._configure()
        self._prompt_pending = True  # the layer's share needs the prompt length: set after the append

    def _after_append(self, q: int) -> None:
        if getattr(self, "_prompt_pending", False):
            self._prompt_pending = False
            if self.budget > self.window:
                self.budget = policies.pyramid_budgets(self.budget, self.num_layers, q, window=self.window, beta=self.beta)[self.layer_idx]
        super()._after_append(q)


class _TOVALayer(_PolicyLayer):
    def _after_append(self, q: int) -> None:
        self._pending = self.stored_length() > self.budget

    def _evict_with_queries(self, queries: Tensor, scale: float) -> None:
        self._keep(policies.tova(self.keys, queries[:, :, -1:], budget=self.budget, scale=scale))


class _ZipCacheLayer(_PolicyLayer):
    """K5: the prompt's keys and values quantized once after the prefill (ZipCache's split by
    normalized attention saliency), generated tokens kept in full precision; nothing is evicted.

    ``update`` returns the dequantized prompt followed by the full-precision tokens, so every
    step attends to all tokens; the layer holds the packed codes (``quantized``) and the new
    tokens (``keys``/``values``), not a float copy of the prompt.
    """

    def __init__(self, *, high_fraction: float = 0.2, high_bits: int = 4, low_bits: int = 2, **kwargs: Any):
        super().__init__(**kwargs)
        self.high_fraction, self.high_bits, self.low_bits = high_fraction, high_bits, low_bits
        self.quantized: Optional[MixedPrecisionKV] = None

    def update(self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        keys, values = super().update(key_states, value_states, *args, **kwargs)
        if self.quantized is None:
            return keys, values
        prompt_keys, prompt_values = self.quantized.dequantize()
        keys, values = torch.cat([prompt_keys.to(keys.dtype), keys], -2), torch.cat([prompt_values.to(values.dtype), values], -2)
        self._returned = keys
        return keys, values

    def _after_append(self, q: int) -> None:
        self._pending = self.quantized is None  # quantize once, with the prompt's queries

    def _evict_with_queries(self, queries: Tensor, scale: float) -> None:
        saliency = normalized_attention_saliency(queries, self.keys, scale=scale)
        self.quantized = mixed_precision_kv(
            self.keys, self.values, saliency, high_fraction=self.high_fraction, high_bits=self.high_bits, low_bits=self.low_bits
        )
        b, h, _, d = self.keys.shape
        self.keys, self.values = self.keys.new_empty(b, h, 0, d), self.values.new_empty(b, h, 0, self.values.shape[-1])
        self.positions = self.positions[..., :0]

    def stored_length(self) -> int:
        return super().stored_length() + (0 if self.quantized is None else self.quantized.length)

    def kv_bytes(self) -> int:
        full = sum(t.numel() * t.element_size() for t in (self.keys, self.values) if t is not None)
        return full + (0 if self.quantized is None else self.quantized.nbytes)

    def memory_bytes(self) -> int:
        return super().memory_bytes() + (0 if self.quantized is None else self.quantized.nbytes)

    def _map(self, fn) -> None:
        if self.quantized is not None:
            raise CacheStateError("ZipCacheCache: reordering or selecting rows of a quantized prompt is not supported")
        super()._map(fn)

    def reset(self) -> None:
        super().reset()
        self.quantized = None


def _refuse_padding_from_positions(kwargs: dict) -> None:
    """Refuse rows whose positions differ: generate's left padding (it passes position_ids)."""
    inner = kwargs.get("kwargs") if isinstance(kwargs.get("kwargs"), dict) else kwargs
    positions = inner.get("position_ids")
    if isinstance(positions, Tensor) and positions.ndim == 2 and positions.shape[0] > 1 and not (positions == positions[:1]).all():
        _padding_error()


def _refuse_padding_from_mask(attention_mask: Optional[Tensor]) -> None:
    """Refuse a mask that hides keys from the step's last query (key padding)."""
    if not isinstance(attention_mask, Tensor) or attention_mask.ndim != 4:
        return
    last = attention_mask[..., -1, :]
    visible = last if last.dtype == torch.bool else last == 0
    if not bool(visible.all()):
        _padding_error()


def _padding_error():
    raise ParameterError(
        "attention_mask: padded batches are not supported by attnzoo's eviction caches (each row keeps different tokens, "
        "and transformers' padding mask indexes keys by column, so it would no longer line up with the kept keys); "
        "generate one sequence at a time or batch rows of equal length",
        argument="attention_mask",
    )


# --------------------------------------------------------------------------------------------
# binding a model: the queries reach the cache through a wrapped attention implementation
# --------------------------------------------------------------------------------------------
def _attention_modules(model) -> list:
    return [m for m in model.modules() if isinstance(getattr(m, "layer_idx", None), int) and type(m).__name__.endswith("Attention")]


def _observing(base: str):
    """The attention function of ``base``, unchanged, then the step's queries to the bound cache."""

    def attention(module, query, key, value, attention_mask, **kwargs):
        fn = ALL_ATTENTION_FUNCTIONS.get_interface(base, None) if base != "eager" else None
        if fn is None:  # eager: the model file's own function (not in the global mapping)
            fn = sys.modules[type(module).__module__].eager_attention_forward
        out = fn(module, query, key, value, attention_mask, **kwargs)
        ref = getattr(module, "_attnzoo_cache", None)
        cache = ref() if ref is not None else None
        if cache is not None and module.layer_idx < len(cache.layers):
            scale = kwargs.get("scaling")
            scale = getattr(module, "scaling", query.shape[-1] ** -0.5) if scale is None else scale
            cache.layers[module.layer_idx].observe(query, key, attention_mask, scale)
        return out

    return attention


def _bind(model, cache: "PolicyCache") -> None:
    config = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
    types = getattr(config, "layer_types", None) or []
    if any(t != "full_attention" for t in types) or getattr(config, "sliding_window", None) is not None:
        raise ParameterError(
            f"model: {type(model).__name__} has sliding-window or non-attention layers ({sorted(set(types))}); "
            "attnzoo's eviction caches support full-attention decoders only",
            argument="model",
        )
    modules = _attention_modules(model)
    if not modules:
        raise ParameterError(f"model: found no attention modules (with a layer_idx) in {type(model).__name__}", argument="model")
    impl = model.config._attn_implementation
    base = impl[len(_PREFIX) :] if impl.startswith(_PREFIX) else impl
    key = _PREFIX + base
    if impl != key:
        if not model._can_set_attn_implementation():
            raise ParameterError(f"model: {type(model).__name__} does not use transformers' attention interface", argument="model")
        AttentionInterface.register(key, _observing(base))
        AttentionMaskInterface.register(key, ALL_MASK_ATTENTION_FUNCTIONS[base])
        model.set_attn_implementation(key)
    for m in modules:
        m._attnzoo_cache = weakref.ref(cache)


def unbind(model) -> None:
    """Undo what building a cache with ``model`` did: the original attention implementation
    back, no cache fed."""
    for m in _attention_modules(model):
        m.__dict__.pop("_attnzoo_cache", None)
    impl = model.config._attn_implementation
    if impl.startswith(_PREFIX):
        model.set_attn_implementation(impl[len(_PREFIX) :])


def _num_layers(model) -> int:
    config = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
    return int(config.num_hidden_layers)


# --------------------------------------------------------------------------------------------
# caches
# --------------------------------------------------------------------------------------------
class PolicyCache(Cache):
    """A transformers ``Cache`` of ``_PolicyLayer`` layers, one per decoder layer.

    ``model`` is required by the policies scored by attention and optional for the others; when
    given, it is bound (see the module docstring): the layers are made up front and every step's
    attention mask is checked for padding, which also catches a padded batch run without
    ``position_ids``. Without it, padding is detected from the ``position_ids`` generate passes.
    """

    _layer_class: type = _PolicyLayer
    needs_queries = False

    def __init__(self, model=None, *, budget: Optional[int] = None, compression_ratio: Optional[float] = None, **params: Any):
        policies.check_budget_args(budget, compression_ratio)
        self._check_params(**params)
        factory = partial(self._layer_class, budget=budget, compression_ratio=compression_ratio, **params)
        if model is None:
            if self.needs_queries:
                raise ParameterError(
                    f"model: {type(self).__name__} scores tokens with attention and needs the model to reach its queries: "
                    f"{type(self).__name__}(model, budget=...)",
                    argument="model",
                )
            super().__init__(layer_class_to_replicate=factory)
        else:
            super().__init__(layers=[factory() for _ in range(_num_layers(model))])
            _bind(model, self)  # the queries (scored policies) and the attention mask (padding check) reach the cache

    def _check_params(self, **params: Any) -> None:
        if params:
            raise ParameterError(f"{type(self).__name__}: unknown parameter(s) {sorted(params)}", argument=sorted(params)[0])

    def memory_bytes(self) -> int:
        """Bytes held by every layer: kept keys and values, their positions and any per-token scores."""
        return sum(layer.memory_bytes() for layer in self.layers)

    def kv_bytes(self) -> int:
        """Bytes of the kept keys and values only (what a KV budget counts; packed codes and their
        scales for a quantized layer)."""
        total = 0
        for layer in self.layers:
            if hasattr(layer, "kv_bytes"):
                total += layer.kv_bytes()
            else:
                total += sum(t.numel() * t.element_size() for t in (layer.keys, layer.values) if t is not None)
        return total

    def stored_length(self, layer_idx: int = 0) -> int:
        """Keys stored by a layer (``get_seq_length`` reports the tokens seen instead)."""
        return 0 if layer_idx >= len(self.layers) else self.layers[layer_idx].stored_length()


class StreamingLLMCache(PolicyCache):
    """K2 StreamingLLM: ``n_sink`` first tokens + the most recent ones, ``budget`` in all
    (:func:`attnzoo.cache.policies.streaming_llm`; positions kept, not re-assigned)."""

    _layer_class = _StreamingLLMLayer

    def __init__(self, model=None, *, budget=None, compression_ratio=None, n_sink: int = 4):
        super().__init__(model, budget=budget, compression_ratio=compression_ratio, n_sink=n_sink)

    def _check_params(self, *, n_sink: int) -> None:
        policies._check_int("n_sink", n_sink, 0)


class KeyNormCache(PolicyCache):
    """Key-norm: keep the ``budget`` keys of lowest L2 norm per kv head, at every step
    (:func:`attnzoo.cache.policies.key_norm`)."""

    _layer_class = _KeyNormLayer


class H2OCache(PolicyCache):
    """K3 H2O: attention accumulated over every step, ``budget`` = heavy hitters
    (``round(heavy_fraction * budget)``) + the most recent tokens (:func:`attnzoo.cache.policies.h2o`)."""

    _layer_class = _H2OLayer
    needs_queries = True

    def __init__(self, model=None, *, budget=None, compression_ratio=None, heavy_fraction: float = 0.5):
        super().__init__(model, budget=budget, compression_ratio=compression_ratio, heavy_fraction=heavy_fraction)

    def _check_params(self, *, heavy_fraction: float) -> None:
        if isinstance(heavy_fraction, bool) or not isinstance(heavy_fraction, (int, float)) or not 0 <= heavy_fraction <= 1:
            raise ParameterError(f"heavy_fraction: expected a float in [0, 1], got {heavy_fraction!r}", argument="heavy_fraction")


class SnapKVCache(PolicyCache):
    """K4 SnapKV: once, after the prompt's prefill, the last ``window`` prompt tokens + the
    ``budget - window`` prefix tokens most attended by them (pooled, kernel ``kernel_size``);
    generated tokens are then all kept (:func:`attnzoo.cache.policies.snapkv`)."""

    _layer_class = _SnapKVLayer
    needs_queries = True

    def __init__(self, model=None, *, budget=None, compression_ratio=None, window: int = 64, kernel_size: int = 5):
        super().__init__(model, budget=budget, compression_ratio=compression_ratio, window=window, kernel_size=kernel_size)

    def _check_params(self, *, window: int, kernel_size: int) -> None:
        policies._check_int("window", window, 1)
        policies._check_int("kernel_size", kernel_size, 1)
        if kernel_size % 2 == 0:
            raise ParameterError(f"kernel_size: expected an odd int, got {kernel_size}", argument="kernel_size")


class PyramidKVCache(SnapKVCache):
    """K6 PyramidKV: SnapKV's selection with a budget per layer, decreasing from the first layer to
    the last in an arithmetic sequence whose mean is ``budget`` (:func:`attnzoo.cache.policies.pyramid_budgets`,
    ``beta`` sets the top layer's share). transformers sizes one attention mask from layer 0 for every
    layer; with ``sdpa`` (required) a one-token step without padding gets no mask, so layers holding
    different numbers of keys attend correctly; eager would add layer 0's mask to every layer."""

    _layer_class = _PyramidKVLayer

    def __init__(self, model=None, *, budget=None, compression_ratio=None, window: int = 64, kernel_size: int = 5, beta: int = 20):
        if model is None:
            raise ParameterError("model: PyramidKVCache needs the model (its queries and its number of layers): PyramidKVCache(model, budget=...)", argument="model")
        policies._check_int("beta", beta, 1)
        impl = model.config._attn_implementation
        if (impl[len(_PREFIX) :] if impl.startswith(_PREFIX) else impl) != "sdpa":
            raise ParameterError(
                f"model: PyramidKVCache needs attn_implementation='sdpa', got {impl!r}: transformers builds one mask for "
                "every layer from layer 0, and only sdpa drops it for a one-token step, so layers of other sizes fit",
                argument="model",
            )
        PolicyCache.__init__(self, model, budget=budget, compression_ratio=compression_ratio, window=window, kernel_size=kernel_size, beta=beta)
        for index, layer in enumerate(self.layers):
            layer.layer_idx, layer.num_layers = index, len(self.layers)

    def _check_params(self, *, window: int, kernel_size: int, beta: int) -> None:
        super()._check_params(window=window, kernel_size=kernel_size)


class TOVACache(PolicyCache):
    """TOVA: once over budget, keep the tokens the step's last query attends most (averaged over
    all heads) (:func:`attnzoo.cache.policies.tova`)."""

    _layer_class = _TOVALayer
    needs_queries = True


class ZipCacheCache(PolicyCache):
    """K5 ZipCache mixed precision: after the prompt, every prompt token is kept, the
    ``high_fraction`` most salient (normalized attention, scored with the prompt's own queries)
    quantized to ``high_bits`` and the rest to ``low_bits``, keys per channel and values per token
    (:mod:`attnzoo.cache.quantized`); generated tokens stay in full precision. Needs the model
    (the saliency reads the queries). ``budget``/``compression_ratio`` are not used: memory is set
    by the bits, read it with ``kv_bytes()``.
    """

    _layer_class = _ZipCacheLayer
    needs_queries = True

    def __init__(self, model=None, *, high_fraction: float = 0.2, high_bits: int = 4, low_bits: int = 2):
        from .quantized import _check_bits

        if isinstance(high_fraction, bool) or not isinstance(high_fraction, (int, float)) or not 0 < high_fraction <= 1:
            raise ParameterError(f"high_fraction: expected a float in (0, 1], got {high_fraction!r}", argument="high_fraction")
        _check_bits("high_bits", high_bits)
        _check_bits("low_bits", low_bits)
        super().__init__(model, compression_ratio=0.0, high_fraction=high_fraction, high_bits=high_bits, low_bits=low_bits)

    def _check_params(self, **params: Any) -> None:
        pass  # checked in __init__
