"""Attention hooks (catalog X1): capture and edit the weights of every attnzoo call in a forward.

Every attnzoo call (``attnzoo.attention``, a mechanism's function, the ``nn`` modules, the
integrations) goes through ``Mechanism.__call__``; inside ``with attention_hooks(...)`` that call
is handed to the context, which can

* **capture** each call's weights ``w`` (B, Hq, Nq, Nk), the matrix the output is ``w @ v`` of,
  detached, in float32 (float64 for float64 inputs). They are materialized only when asked
  (``capture=True``, ``layers=``) and only within ``max_bytes`` in total: above it a call is
  skipped with a note and a warning (``on_exceed="skip"``) or refused (``"raise"``);
* **edit** the call while the forward runs (Prompt-to-Prompt's controls, Hertz et al. 2022):
  :func:`mask_keys` and any ``scores`` edit change the masked scores before the softmax,
  :func:`reweight_keys` (P2P's equalizer) and :func:`replace_maps` (inject maps recorded in another
  run) change the probabilities before ``P @ V``, :func:`ablate_heads` and any ``output`` edit
  change the call's output.

Where the weights come from. A mechanism may declare ``Mechanism.weights``; the linear family
does (``w_ij = decay_ij phi(q_i) . phi(k_j)``, divided by its row sums when the mechanism
normalizes). Otherwise the weights are read from the mechanism's reference backend, re-run with a
tap on :func:`attnzoo.kernels.reference.materialized_attention`, when that reference is exactly
one masked softmax over the call's own keys (softmax and the local family; not ``agent``, which
attends twice, nor ``varying_window``, which attends pooled keys). Score and probability edits
exist only there: the edited call's output is that reference's ``P @ V`` (differentiable), whatever
backend the call would have used. Output edits work for every mechanism.

Each record says whether its rows are a distribution (``distribution``: True for a softmax, True
for a normalized linear map with no negative weight, False otherwise, None when unknown) and,
when ``weights`` is None, why (``note``).

Layer identity: with ``model=`` each call is named by the innermost submodule running when it
was made (forward pre/post hooks held only inside the context), else ``call<i>`` by call order;
``occurrence`` counts earlier calls of the same layer, so ``(layer, occurrence)`` names the same
call in two runs (diffusion control: record in run 1, :func:`replace_maps` in run 2).

    >>> with attention_hooks(model) as hooks:                   # doctest: +SKIP
    ...     model(x)
    >>> hooks.maps()["blocks.0.attn"].shape                      # doctest: +SKIP
    >>> with attention_hooks(model, edits=[reweight_keys([3], 2.0)]):   # doctest: +SKIP
    ...     model(x)

Contexts nest: the innermost one sees the calls. Not thread-safe (one forward at a time).
Calls a mechanism's backend makes to other mechanisms are not intercepted (they are part of it).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Collection, Iterable, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor

from . import registry
from .errors import ParameterError
from .kernels import reference as _reference_kernel

__all__ = [
    "DEFAULT_MAX_BYTES",
    "AttentionRecord",
    "Edit",
    "attention_hooks",
    "mask_keys",
    "reweight_keys",
    "replace_maps",
    "ablate_heads",
    "weights_of",
]

#: The default budget of captured weights, all calls together (256 MiB).
DEFAULT_MAX_BYTES = 256 * 2**20

Layers = Union[None, str, Collection[str], Callable[["AttentionRecord"], bool]]
Heads = Union[None, int, Sequence[int]]


# --------------------------------------------------------------------------------------------
# records and edits
# --------------------------------------------------------------------------------------------
@dataclass
class AttentionRecord:
    """One intercepted call: who made it, and its weights when captured.

    ``weights`` (B, Hq, Nq, Nk) with the spatial axes of a local mechanism flattened row-major,
    or None (not asked for, over the memory budget, or not materializable: ``note`` says which).
    """

    index: int  # call order within the context
    layer: str  # the submodule that made the call, or "call<index>"
    occurrence: int  # earlier calls of the same layer in this context
    mechanism: str
    params: Mapping[str, Any]  # the call's parameters, defaults filled in
    q_shape: tuple[int, ...]  # (B, Hq, *spatial, D)
    kv_shape: tuple[int, ...]  # (B, Hkv, *spatial, Dv) of v
    weights: Optional[Tensor] = None
    distribution: Optional[bool] = None  # rows sum to 1 with no negative entry
    note: str = ""

    @property
    def key(self) -> tuple[str, int]:
        """``(layer, occurrence)``: the same call in another run of the same model."""
        return (self.layer, self.occurrence)

    @property
    def name(self) -> str:
        """``layer``, with ``#occurrence`` after the first call of that layer."""
        return self.layer if self.occurrence == 0 else f"{self.layer}#{self.occurrence}"


TensorEdit = Callable[[Tensor, AttentionRecord], Tensor]


def _layer_filter(layers: Layers, argument: str) -> Callable[[AttentionRecord], bool]:
    if layers is None:
        return lambda rec: True
    if callable(layers):
        return layers
    if isinstance(layers, str):
        layers = (layers,)
    if not isinstance(layers, Collection) or not all(isinstance(x, str) for x in layers):
        raise ParameterError(f"{argument}: expected None, a layer name, a collection of names or a predicate, got {layers!r}", argument=argument)
    names = frozenset(layers)
    return lambda rec: rec.layer in names or rec.name in names


@dataclass(frozen=True)
class Edit:
    """Changes to the calls ``layers`` selects (None: every call), each ``f(tensor, record) -> tensor``.

    ``scores``: the masked scores (B, Hq, Nq, Nk) before the softmax (-inf = hidden);
    ``probs``: the probabilities before ``P @ V``; ``output``: the call's output (B, Hq, *spatial, Dv).
    ``scores`` and ``probs`` need a softmax-type mechanism (see the module docstring).
    """

    scores: Optional[TensorEdit] = None
    probs: Optional[TensorEdit] = None
    output: Optional[TensorEdit] = None
    layers: Layers = None

    def __post_init__(self) -> None:
        for name in ("scores", "probs", "output"):
            if getattr(self, name) is not None and not callable(getattr(self, name)):
                raise ParameterError(f"{name}: expected None or a callable (tensor, record) -> tensor", argument=name)
        object.__setattr__(self, "_selects", _layer_filter(self.layers, "layers"))

    def applies(self, record: AttentionRecord) -> bool:
        return self._selects(record)

    @property
    def inside(self) -> bool:
        """Whether it changes the weights (needs the materialized reference)."""
        return self.scores is not None or self.probs is not None


def _heads_index(heads: Heads) -> Optional[list[int]]:
    """The chosen heads as a list (None: all), checked for type here and for range by :func:`_head_mask`."""
    if heads is None:
        return None
    if isinstance(heads, int) and not isinstance(heads, bool):
        return [heads]
    if isinstance(heads, Sequence) and all(isinstance(h, int) and not isinstance(h, bool) for h in heads):
        return list(heads)
    raise ParameterError(f"heads: expected None, an int or a sequence of ints, got {heads!r}", argument="heads")


def _head_mask(heads: Optional[list[int]], x: Tensor, record: AttentionRecord) -> Tensor:
    """(1, H, 1, 1) bool: True for the chosen heads of ``x`` (B, H, ...)."""
    n = x.shape[1]
    chosen = torch.ones(n, dtype=torch.bool, device=x.device)
    if heads is not None:
        if any(not -n <= h < n for h in heads):
            raise ParameterError(f"heads: {record.name} ({record.mechanism}) has {n} heads, got {heads}", argument="heads")
        chosen = torch.zeros_like(chosen)
        chosen[heads] = True
    return chosen.view(1, n, *([1] * (x.dim() - 2)))


def _keys_index(keys: Any, n_keys: int, like: Tensor) -> Tensor:
    """(B|1, 1, 1, Nk) bool of the chosen keys from indices (Nk,), or a (Nk,) / (B, Nk) bool mask."""
    if isinstance(keys, Tensor) and keys.dtype == torch.bool:
        if keys.shape[-1] != n_keys or keys.dim() > 2:
            raise ParameterError(f"keys: a bool mask must be (Nk,) or (B, Nk) with Nk = {n_keys}, got {tuple(keys.shape)}", argument="keys")
        chosen = keys.to(like.device)
    else:
        index = torch.as_tensor(keys, dtype=torch.long, device=like.device).reshape(-1)
        if index.numel() and (index.min() < -n_keys or index.max() >= n_keys):
            raise ParameterError(f"keys: indices must lie in [-{n_keys}, {n_keys}), got {keys!r}", argument="keys")
        chosen = torch.zeros(n_keys, dtype=torch.bool, device=like.device)
        chosen[index] = True
    return chosen.view(-1, 1, 1, n_keys) if chosen.dim() == 2 else chosen.view(1, 1, 1, n_keys)


def _column_scale(keys: Any, factor: Union[float, Tensor], p: Tensor) -> Tensor:
    """(Nk,): ``factor`` at the chosen keys (in the order given), 1 elsewhere."""
    nk = p.shape[-1]
    scale = torch.ones(nk, dtype=p.dtype, device=p.device)
    if isinstance(keys, Tensor) and keys.dtype == torch.bool:
        if tuple(keys.shape) != (nk,):
            raise ParameterError(f"keys: reweight_keys takes key indices or an (Nk,) bool mask, Nk = {nk}, got {tuple(keys.shape)}", argument="keys")
        index = keys.to(p.device).nonzero().view(-1)
    else:
        _keys_index(keys, nk, p)  # range check
        index = torch.as_tensor(keys, dtype=torch.long, device=p.device).reshape(-1)
    value = torch.as_tensor(factor, dtype=p.dtype, device=p.device)
    if value.dim() > 0 and value.numel() != index.numel():
        raise ParameterError(f"factor: expected a number or one per chosen key ({index.numel()}), got {value.numel()}", argument="factor")
    scale[index] = value
    return scale


def mask_keys(keys: Any, *, heads: Heads = None, layers: Layers = None) -> Edit:
    """Hide ``keys`` from every query (their score set to -inf before the softmax).

    ``keys``: key indices, or a bool mask (Nk,) or (B, Nk), True = hide. Equals the same call with
    those keys in ``key_padding_mask``.
    """
    head_index = _heads_index(heads)

    def scores(s: Tensor, record: AttentionRecord) -> Tensor:
        hide = _keys_index(keys, s.shape[-1], s)
        return s.masked_fill(hide & _head_mask(head_index, s, record), float("-inf"))

    return Edit(scores=scores, layers=layers)


def reweight_keys(keys: Any, factor: Union[float, Tensor], *, heads: Heads = None, layers: Layers = None, renormalize: bool = False) -> Edit:
    """Prompt-to-Prompt's equalizer (Hertz et al. 2022): scale the probability columns of ``keys``.

    ``P[..., j] *= factor`` for the chosen keys, after the softmax; P2P does not renormalize the
    rows (``renormalize=True`` divides each row by its new sum). ``factor``: a number, or one per
    chosen key (a tensor of their count).
    """
    head_index = _heads_index(heads)

    def probs(p: Tensor, record: AttentionRecord) -> Tensor:
        scale = _column_scale(keys, factor, p)
        out = torch.where(_head_mask(head_index, p, record), p * scale, p)
        if renormalize:
            total = out.sum(-1, keepdim=True)
            out = out / torch.where(total == 0, torch.ones_like(total), total)
        return out

    return Edit(probs=probs, layers=layers)


def replace_maps(source: Union["attention_hooks", Iterable[AttentionRecord], Mapping[tuple[str, int], Tensor]], *, heads: Heads = None, layers: Layers = None) -> Edit:
    """Use the probabilities recorded in another run (diffusion control, P2P's ``replace``).

    ``source``: the hooks (or records) of run 1, or ``{(layer, occurrence): weights}``. A call of
    run 2 whose ``(layer, occurrence)`` has a recorded map attends with it instead of its own
    (the chosen ``heads`` only); its output is then ``P_run1 @ V_run2``. Calls with no recorded
    map are left alone; a map of another shape is an error. ``layers`` may be a predicate on the
    record: ``lambda rec: rec.occurrence < 20`` replaces during the first 20 denoising steps
    only (P2P's ``n_cross_replace``), when each step calls every layer once.
    """
    if isinstance(source, attention_hooks):
        source = source.records
    if not isinstance(source, Mapping):
        source = {rec.key: rec.weights for rec in source if rec.weights is not None}
    stored = dict(source)
    head_index = _heads_index(heads)
    wanted = _layer_filter(layers, "layers")

    def probs(p: Tensor, record: AttentionRecord) -> Tensor:
        recorded = stored.get(record.key)
        if recorded is None:
            return p
        if tuple(recorded.shape) != tuple(p.shape):
            raise ParameterError(
                f"source: the map recorded for {record.name} is {tuple(recorded.shape)}, this call's is {tuple(p.shape)}", argument="source"
            )
        return torch.where(_head_mask(head_index, p, record), recorded.to(p.device, p.dtype), p)

    return Edit(probs=probs, layers=lambda rec: wanted(rec) and rec.key in stored)


def ablate_heads(heads: Heads, *, layers: Layers = None) -> Edit:
    """Zero the output of ``heads`` (head-ablation importance); works for every mechanism."""
    head_index = _heads_index(heads)

    def output(o: Tensor, record: AttentionRecord) -> Tensor:
        return o.masked_fill(_head_mask(head_index, o, record), 0.0)

    return Edit(output=output, layers=layers)


# --------------------------------------------------------------------------------------------
# weights: declared, or read from the reference through the tap
# --------------------------------------------------------------------------------------------
def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _flat(x: Tensor) -> Tensor:
    return x.reshape(x.shape[0], x.shape[1], -1, x.shape[-1])


class _Tap:
    """Set as ``kernels.reference.TAP`` while a reference runs: applies the edits to, and keeps
    the probabilities of, the one materialized softmax over the call's own keys and values."""

    def __init__(self, record: AttentionRecord, k: Tensor, v: Tensor, edits: Sequence[Edit], keep: bool):
        self.record, self.edits, self.keep = record, edits, keep
        self.k, self.v = _flat(k), _flat(v)
        self.nq = math.prod(record.q_shape[2:-1])
        self.calls = 0
        self.own = False  # the current call attends the mechanism's own keys
        self.matched = 0
        self.weights: Optional[Tensor] = None

    def scores(self, s: Tensor, k: Tensor, v: Tensor) -> Tensor:
        self.calls += 1
        self.own = (
            s.shape[-2:] == (self.nq, self.k.shape[2])
            and k.shape == self.k.shape
            and v.shape == self.v.shape
            and torch.equal(k, self.k)
            and torch.equal(v, self.v)
        )
        if not self.own:
            return s
        self.matched += 1
        for edit in self.edits:
            if edit.scores is not None:
                s = edit.scores(s, self.record)
        return s

    def probs(self, p: Tensor) -> Tensor:
        if not self.own:
            return p
        for edit in self.edits:
            if edit.probs is not None:
                p = edit.probs(p, self.record)
        if self.keep:
            self.weights = p.detach()  # nothing writes into p after this
        return p

    def refusal(self, mechanism: str) -> Optional[str]:
        """Why the reference is not one softmax over the call's keys, or None."""
        if self.calls < 0:
            return f"{mechanism}: it has no reference backend"
        if self.calls == 0:
            return f"{mechanism}: its reference computes no softmax over materialized scores"
        if self.calls != 1 or self.matched != 1:
            return f"{mechanism}: its reference is not one softmax over the call's own keys ({self.calls} softmax(es), over derived keys or tokens)"
        return None


def _run_tapped(mech: registry.Mechanism, q: Tensor, k: Tensor, v: Tensor, bound: Mapping[str, Any], tap: _Tap) -> Any:
    if _reference_kernel.TAP is not None:
        raise RuntimeError("attnzoo.hooks: the reference tap is already in use (one forward at a time)")
    if "reference" not in mech.backends:
        tap.calls = -1  # refusal() says so
        return None
    _reference_kernel.TAP = tap
    try:
        return mech.reference.fn(q, k, v, **bound)
    finally:
        _reference_kernel.TAP = None


def weights_of(mech: registry.Mechanism, q: Tensor, k: Tensor, v: Tensor, **params: Any) -> tuple[Tensor, bool]:
    """The weights (B, Hq, Nq, Nk) of one call and whether its rows are a distribution.

    Raises :class:`~attnzoo.errors.ParameterError` (argument ``mechanism``) for a mechanism with
    no declared ``weights`` whose reference is not one softmax over its own keys.
    """
    problem, bound = mech.prepare(q, k, v, params)
    record = AttentionRecord(0, "call0", 0, mech.name, bound, tuple(q.shape), tuple(v.shape))
    weights, distribution, note = _materialize(mech, q, k, v, bound, record)
    if weights is None:
        raise ParameterError(note, argument="mechanism")
    return weights, bool(distribution)


def _materialize(mech: registry.Mechanism, q: Tensor, k: Tensor, v: Tensor, bound: Mapping[str, Any], record: AttentionRecord) -> tuple[Optional[Tensor], Optional[bool], str]:
    with torch.no_grad():
        if mech.weights is not None:
            w, distribution = mech.weights(q, k, v, **bound)
            note = "" if distribution else f"{mech.name}: its rows are not a probability distribution (unnormalized or signed weights)"
            return w.detach(), bool(distribution), note
        tap = _Tap(record, k, v, (), keep=True)
        _run_tapped(mech, q, k, v, bound, tap)
    reason = tap.refusal(mech.name)
    if reason is not None:
        return None, None, reason + "; it declares no Mechanism.weights"
    return tap.weights, True, ""


# --------------------------------------------------------------------------------------------
# the context
# --------------------------------------------------------------------------------------------
class attention_hooks:
    """``with attention_hooks(model, capture=True, edits=[...]) as hooks:`` intercepts every attnzoo call.

    Args:
        model: an ``nn.Module`` whose submodule names label the calls (optional).
        capture: materialize and keep each selected call's weights in ``hooks.records``.
        edits: :class:`Edit` s applied, in order, to the calls they select.
        layers: which calls to capture (names, a predicate; None: all). Every call gets a record.
        max_bytes: budget of the captured weights, all calls together; also the largest map an
            edited call may materialize.
        on_exceed: ``"skip"`` (the record says so, one warning per context) or ``"raise"``.

    Cost: nothing outside the context (one empty-tuple test per call). Inside, a captured call
    runs its reference besides its backend (O(Nq Nk) memory); an edited call runs the reference
    instead of its backend.
    """

    def __init__(
        self,
        model: Optional[torch.nn.Module] = None,
        *,
        capture: bool = True,
        edits: Sequence[Edit] = (),
        layers: Layers = None,
        max_bytes: int = DEFAULT_MAX_BYTES,
        on_exceed: str = "skip",
    ):
        if model is not None and not isinstance(model, torch.nn.Module):
            raise ParameterError(f"model: expected None or a torch.nn.Module, got {type(model).__name__}", argument="model")
        if not isinstance(max_bytes, int) or isinstance(max_bytes, bool) or max_bytes < 0:
            raise ParameterError(f"max_bytes: expected a non-negative int, got {max_bytes!r}", argument="max_bytes")
        if on_exceed not in ("skip", "raise"):
            raise ParameterError(f"on_exceed: expected 'skip' or 'raise', got {on_exceed!r}", argument="on_exceed")
        if not all(isinstance(e, Edit) for e in edits):
            raise ParameterError("edits: expected a sequence of attnzoo.hooks.Edit", argument="edits")
        self.model, self.capture, self.edits = model, bool(capture), tuple(edits)
        self.selected = _layer_filter(layers, "layers")
        self.max_bytes, self.on_exceed = max_bytes, on_exceed
        self.records: list[AttentionRecord] = []
        self.held_bytes = 0
        self._stack: list[str] = []
        self._handles: list[Any] = []
        self._counts: dict[str, int] = {}
        self._warned = False

    # ---- entering and leaving ----------------------------------------------------------
    def __enter__(self) -> "attention_hooks":
        if self.model is not None:
            for name, module in self.model.named_modules():
                self._handles.append(module.register_forward_pre_hook(self._pre_hook(name or type(module).__name__)))
                self._handles.append(module.register_forward_hook(self._post_hook, always_call=True))
        registry._INTERCEPTORS = registry._INTERCEPTORS + (self._intercept,)
        return self

    def __exit__(self, *exc: Any) -> None:
        registry._INTERCEPTORS = tuple(i for i in registry._INTERCEPTORS if i != self._intercept)
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._stack.clear()

    def _pre_hook(self, name: str) -> Callable[..., None]:
        def hook(module: Any, args: Any) -> None:
            self._stack.append(name)

        return hook

    def _post_hook(self, module: Any, args: Any, output: Any) -> None:
        if self._stack:
            self._stack.pop()

    # ---- results -----------------------------------------------------------------------
    def maps(self) -> dict[str, Tensor]:
        """``{record.name: weights}`` of the captured calls, in call order."""
        return {rec.name: rec.weights for rec in self.records if rec.weights is not None}

    # ---- one call ----------------------------------------------------------------------
    def _intercept(self, mech: registry.Mechanism, q: Any, k: Any, v: Any, backend: Optional[str], params: dict) -> Any:
        saved = registry._INTERCEPTORS
        registry._INTERCEPTORS = ()  # what runs below (the call itself, references) is not intercepted
        try:
            return self._handle(mech, q, k, v, backend, params)
        finally:
            registry._INTERCEPTORS = saved

    def _record(self, mech: registry.Mechanism, q: Tensor, v: Tensor, bound: Mapping[str, Any]) -> AttentionRecord:
        index = len(self.records)
        layer = self._stack[-1] if self._stack else f"call{index}"
        occurrence = self._counts.get(layer, 0)
        self._counts[layer] = occurrence + 1
        record = AttentionRecord(index, layer, occurrence, mech.name, bound, tuple(q.shape), tuple(v.shape))
        self.records.append(record)
        return record

    def _map_bytes(self, q: Tensor, v: Tensor) -> int:
        b, h = q.shape[:2]
        nq, nk = math.prod(q.shape[2:-1]), math.prod(v.shape[2:-1])
        return b * h * nq * nk * _compute_dtype(q.dtype).itemsize

    def _handle(self, mech: registry.Mechanism, q: Any, k: Any, v: Any, backend: Optional[str], params: dict) -> Any:
        _, bound = mech.prepare(q, k, v, params)
        record = self._record(mech, q, v, bound)
        edits = [e for e in self.edits if e.applies(record)]
        keep = self.capture and self.selected(record) and self._within_budget(record, q, v)
        if any(e.inside for e in edits):
            result = self._edited(mech, q, k, v, bound, record, [e for e in edits if e.inside], keep)
        else:
            result = mech(q, k, v, backend=backend, **params)
            if keep:
                record.weights, record.distribution, record.note = _materialize(mech, q, k, v, bound, record)
        if record.weights is not None:
            self.held_bytes += record.weights.numel() * record.weights.element_size()
        for edit in edits:
            if edit.output is not None:
                result = _edit_output(result, edit.output, record)
        return result

    def _within_budget(self, record: AttentionRecord, q: Tensor, v: Tensor) -> bool:
        need = self._map_bytes(q, v)
        if self.held_bytes + need <= self.max_bytes:
            return True
        message = (
            f"attention_hooks: {record.name} ({record.mechanism}) not captured: its weights need {need} bytes and "
            f"{self.held_bytes} are held, over max_bytes={self.max_bytes}"
        )
        if self.on_exceed == "raise":
            raise ParameterError(message, argument="max_bytes")
        record.note = "skipped: " + message
        if not self._warned:
            warnings.warn(message + " (further skips are only noted in the records)", stacklevel=4)
            self._warned = True
        return False

    def _edited(self, mech: registry.Mechanism, q: Tensor, k: Tensor, v: Tensor, bound: Mapping[str, Any], record: AttentionRecord, edits: list[Edit], keep: bool) -> Any:
        if mech.weights is not None:
            raise ParameterError(
                f"{mech.name}: its weights are not a softmax over scores, so score and probability edits have no meaning "
                "here (output edits such as ablate_heads work)",
                argument="edits",
            )
        need = self._map_bytes(q, v)
        if need > self.max_bytes:
            raise ParameterError(f"attention_hooks: editing {record.name} materializes {need} bytes, over max_bytes={self.max_bytes}", argument="max_bytes")
        tap = _Tap(record, k, v, edits, keep)
        result = _run_tapped(mech, q, k, v, bound, tap)
        reason = tap.refusal(mech.name)
        if reason is not None:
            raise ParameterError(reason + ": score and probability edits need one (output edits work)", argument="edits")
        if keep:
            record.weights, record.distribution = tap.weights, all(e.probs is None for e in edits)
            if not record.distribution:
                record.note = "probabilities edited: rows may not sum to 1"
        return result


def _edit_output(result: Any, edit: TensorEdit, record: AttentionRecord) -> Any:
    if isinstance(result, tuple):  # (out, lse)
        return (edit(result[0], record),) + tuple(result[1:])
    return edit(result, record)
