"""The registry: mechanisms and backends with their capabilities declared as data.

A :class:`Mechanism` is what the user names (``"softmax"``, ``"neighborhood"``): its paper,
formula, cost, the CAB patterns it supports, its parameters (each with a validator) and its
backends. A :class:`Backend` is one implementation of it (``reference``, ``sdpa``, ``tiled``...)
with the devices, dtypes, autograd support and limits it declares, plus an optional predicate on
the actual inputs. Dispatch validates the inputs once, then takes the highest-priority backend
that accepts them; when none does, :class:`~attnzoo.errors.NoBackendError` lists each backend
with the reason it declined.

Because every mechanism is here, the conformance suite, the benchmark and the docs table
iterate the registry and cover each new mechanism without extra code.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import random
from dataclasses import dataclass, field
from typing import Any, Callable, Collection, Iterable, Iterator, Mapping, Protocol, Sequence

import torch

from ._validate import FLOAT_DTYPES, Problem, check_finite_inputs, describe
from .errors import NoBackendError, ParameterError, UnknownMechanismError

__all__ = [
    "PATTERNS",
    "Param",
    "Backend",
    "Decoder",
    "DecodingState",
    "Mechanism",
    "register",
    "get",
    "list_mechanisms",
    "set_checks",
    "checks",
    "Problem",
]

#: CAB's four attention patterns (Comprehensive Attention Benchmark).
PATTERNS = ("noncausal_self", "causal_self", "noncausal_cross", "causal_cross")
ALL_DEVICES = frozenset({"cpu", "cuda"})


# --------------------------------------------------------------------------------------------
# parameters
# --------------------------------------------------------------------------------------------
Check = Callable[[Any, Problem], "str | None"]


@dataclass(frozen=True)
class Param:
    """One keyword parameter of a mechanism.

    ``check(value, problem)`` returns ``None`` when the value is fine, else what was expected
    (``"a bool"``); the registry turns it into a :class:`ParameterError` naming the parameter.
    ``invalid`` lists values the conformance suite feeds to prove the check refuses them.
    """

    name: str
    default: Any
    doc: str
    check: Check | None = None
    invalid: tuple[Any, ...] = ()
    type_name: str = ""

    def validate(self, value: Any, problem: Problem, mechanism: str) -> None:
        if self.check is None:
            return
        expected = self.check(value, problem)
        if expected is not None:
            shown = _short_repr(value)
            raise ParameterError(f"{mechanism}: {self.name}: expected {expected}, got {shown}", argument=self.name)


def _first_line(doc: str | None) -> str:
    """The first paragraph of a docstring, on one line."""
    return " ".join((doc or "").strip().split("\n\n")[0].split())


def _short_repr(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)} on {value.device}"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def flag(name: str, default: bool, doc: str) -> Param:
    """A boolean parameter."""
    return Param(name, default, doc, lambda v, p: None if isinstance(v, bool) else "a bool", ("yes", 1), "bool")


def choice(name: str, options: Sequence[str], default: str, doc: str) -> Param:
    """A parameter taking one of a few strings."""
    opts = tuple(options)
    return Param(
        name,
        default,
        doc,
        lambda v, p: None if v in opts else "one of " + ", ".join(repr(o) for o in opts),
        ("__not_an_option__",),
        " | ".join(repr(o) for o in opts),
    )


def positive_number(name: str, doc: str, *, optional: bool = True) -> Param:
    """A finite positive float (``None`` allowed when optional: the mechanism's default)."""

    def check(v: Any, p: Problem) -> str | None:
        if v is None and optional:
            return None
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (0 < float(v) < float("inf")):
            return "a finite positive number" + (" or None" if optional else "")
        return None

    return Param(name, None, doc, check, (0.0, -1.0, float("nan"), "1"), "float | None" if optional else "float")


# --------------------------------------------------------------------------------------------
# backends
# --------------------------------------------------------------------------------------------
Predicate = Callable[[Problem, Mapping[str, Any]], "str | None"]


@dataclass
class Backend:
    """One implementation of a mechanism, with what it can do declared as data.

    ``fn(q, k, v, **params)`` receives every parameter of the mechanism, defaults filled in.
    ``accepts(problem, params)`` returns ``None`` or the reason it cannot take these inputs
    (a capability: forcing the backend is refused too). ``prefers(problem, params)`` returns
    ``None`` or the reason dispatch should not pick it on its own (a preference: the backend is
    correct there, just not the best, and ``backend=`` still forces it). Higher ``priority``
    wins; ``device_priority`` overrides it per device type.
    """

    name: str
    fn: Callable[..., Any]
    doc: str = ""
    devices: frozenset[str] = ALL_DEVICES
    dtypes: frozenset[torch.dtype] = frozenset(FLOAT_DTYPES)
    autograd: bool = True
    max_head_dim: int | None = None
    max_q_len: int | None = None
    accepts: Predicate | None = None
    prefers: Predicate | None = None
    priority: int = 0
    device_priority: Mapping[str, int] = field(default_factory=dict)
    compiles: bool = False  # first call per shape pays a torch.compile; tests use fixed shapes
    materializes_scores: bool = False  # holds an Nq x Nk tensor: O(Nq * Nk) memory
    # torch.compile can trace it whole (no value-dependent Python, no opaque C++ call); while
    # compiling, dispatch passes the others over so fullgraph=True compiles
    traceable: bool = True

    def __repr__(self) -> str:
        return f"Backend({self.name!r})"

    def rank(self, problem: Problem) -> int:
        return self.device_priority.get(problem.device_type, self.priority)

    def decline_reason(self, problem: Problem, params: Mapping[str, Any]) -> str | None:
        """``None`` when this backend takes the inputs, else one line saying what to change."""
        if problem.device_type not in self.devices:
            return f"runs on {'/'.join(sorted(self.devices))}, not {problem.device_type}"
        if problem.dtype not in self.dtypes:
            names = ", ".join(sorted(str(d).replace("torch.", "") for d in self.dtypes))
            return f"takes {names}, not {str(problem.dtype).replace('torch.', '')}"
        if problem.requires_grad and not self.autograd:
            return "forward only: call under torch.no_grad() or inputs without requires_grad"
        if self.max_head_dim is not None and max(problem.head_dim, problem.value_dim) > self.max_head_dim:
            return f"head dim at most {self.max_head_dim}, got {max(problem.head_dim, problem.value_dim)}"
        if self.max_q_len is not None and problem.q_len > self.max_q_len:
            return f"at most {self.max_q_len} queries, got {problem.q_len}"
        if self.accepts is not None:
            return self.accepts(problem, params)
        return None

    def skip_reason(self, problem: Problem, params: Mapping[str, Any]) -> str | None:
        """Why automatic dispatch passes this backend over (a refusal or a preference), or None."""
        if not self.traceable and torch.compiler.is_compiling():
            # first: its accepts may itself be untraceable (loading a C++ kernel)
            return "not preferred: torch.compile cannot trace it (a graph break); compiled code takes a traceable backend"
        reason = self.decline_reason(problem, params)
        if reason is None and self.prefers is not None:
            reason = self.prefers(problem, params)
            if reason is not None:
                reason = "not preferred: " + reason
        return reason

    def capabilities(self) -> dict[str, str]:
        """What the backend declares, as text (for ``attnzoo info`` and the docs)."""
        return {
            "devices": ", ".join(sorted(self.devices)),
            "dtypes": ", ".join(str(d).replace("torch.", "") for d in FLOAT_DTYPES if d in self.dtypes),
            "autograd": "yes" if self.autograd else "no",
            "limits": ", ".join(
                s
                for s in (
                    f"head dim <= {self.max_head_dim}" if self.max_head_dim else "",
                    f"Nq <= {self.max_q_len}" if self.max_q_len else "",
                )
                if s
            )
            or "-",
            "priority": str(self.priority)
            + "".join(f", {d}: {p}" for d, p in sorted(self.device_priority.items())),
            "compiles": "yes (torch.compile on the first call per shape)" if self.compiles else "no",
            "memory": "O(Nq * Nk): materializes the scores" if self.materializes_scores else "O(N)",
            "preference": _first_line(self.prefers.__doc__) if self.prefers is not None else "-",
            "torch.compile": "traced" if self.traceable else "passed over while compiling (graph break)",
        }


# --------------------------------------------------------------------------------------------
# decoding
# --------------------------------------------------------------------------------------------
@dataclass
class DecodingState:
    """Base of every decoding state: a value, never updated in place once a step returned it.

    ``params`` are the mechanism's parameters bound at ``init_state`` (all but the decoder's
    ``per_step`` ones), ``mechanism`` the name of the mechanism that made it; both are set by
    :meth:`Mechanism.init_state` and carried to every later state (subclasses make new states
    with ``dataclasses.replace``). :meth:`tensors` is the state's content, :meth:`clone` a copy
    that shares no storage, :attr:`nbytes` the memory it keeps alive.
    """

    params: Mapping[str, Any] = field(default_factory=dict, kw_only=True, repr=False, compare=False)
    mechanism: str = field(default="", kw_only=True, repr=False, compare=False)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensors the state holds, by field name (what a step reads from it)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if isinstance(getattr(self, f.name), torch.Tensor)}

    def clone(self) -> "DecodingState":
        """A copy whose tensors share no storage with this state's (the bound parameters are shared: never written)."""
        return dataclasses.replace(self, **{name: t.clone() for name, t in self.tensors().items()})

    @property
    def nbytes(self) -> int:
        """Bytes of tensor storage the state keeps alive, each storage counted once (a buffer with
        room to grow counts whole; storage shared with another state or with the inputs counts too)."""
        storages = {}
        for t in self.tensors().values():
            storage = t.untyped_storage()
            storages[(t.device, storage.data_ptr())] = storage.nbytes()
        return sum(storages.values())


class Decoder(Protocol):
    """Incremental decoding of a causal mechanism.

    ``init_state(problem, **params)`` makes an empty :class:`DecodingState` for inputs shaped
    like ``problem``; ``step(q_t, k_t, v_t, state, **params)`` appends ``T >= 1`` new tokens and
    returns their outputs (causal, bottom-right aligned against everything seen) and a *new*
    state. Feeding a sequence through ``step`` in any split equals the full causal forward.

    ``step`` never changes its input state (nor any tensor it holds), so a state can branch:
    stepping the same state twice gives two independent continuations (beam search, rollback,
    speculative decoding). Recurrent states are replaced, not updated in place; a KV cache
    appends in place only into the part of its buffer no other state sees (copy-on-write).

    ``per_step`` names the parameters a step may change (data about the step's own tokens,
    tiling choices that change only the rounding) or that decoding does not read; every other
    parameter is bound at ``init_state``: :meth:`Mechanism.step` fills it from the state when
    omitted and refuses a different value (:class:`~attnzoo.errors.ParameterError`).
    """

    per_step: frozenset[str]

    def init_state(self, problem: Problem, **params: Any) -> DecodingState: ...

    def step(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: Any, **params: Any) -> tuple[Any, Any]: ...


def _same(a: Any, b: Any) -> bool:
    """Whether a parameter given at a step is the one bound at init_state (tensors by value)."""
    if a is b:
        return True
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
            and a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and bool(torch.equal(a, b))
        )
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):  # (3, 0) and [3, 0] are one window
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    try:
        return bool(a == b)
    except (TypeError, ValueError, RuntimeError):  # objects with no equality of their own
        return False


def _with_bound(name: str, state: DecodingState, params: Mapping[str, Any]) -> dict[str, Any]:
    """The step's parameters: the bound ones filled in from ``state``, a different one refused."""
    merged = dict(params)
    for key, value in state.params.items():
        if key not in merged:
            merged[key] = value
        elif not _same(merged[key], value):
            bound, given = _short_repr(value), _short_repr(merged[key])
            if given == bound:  # tensors (or long reprs) alike in what the message shows
                given += " with other values"
            raise ParameterError(
                f"{name}: {key}: bound at init_state to {bound}, got {given} (omit it at step, or start a new state)", argument=key
            )
    return merged


# --------------------------------------------------------------------------------------------
# mechanisms
# --------------------------------------------------------------------------------------------
@dataclass
class _Checks:
    finite: bool = True


_CHECKS = _Checks()

#: Call interceptors, set only by :mod:`attnzoo.hooks` while a capture/edit context is open
#: (the registry never imports it). ``Mechanism.__call__`` tests this tuple once: empty, the
#: default, a call does no other work. The last one takes the call as
#: ``interceptor(mechanism, q, k, v, backend, params)`` and returns its result.
_INTERCEPTORS: tuple[Callable[..., Any], ...] = ()


def set_checks(*, finite: bool | None = None) -> dict[str, bool]:
    """Turn optional input checks on or off globally; returns the previous settings.

    ``finite`` (default on): when an output holds NaN/inf, find the input that carried it and
    raise :class:`~attnzoo.errors.NonFiniteError` naming it. It costs one pass over the output
    (and a host sync on CUDA); turn it off in tight training loops once inputs are trusted.
    """
    previous = {"finite": _CHECKS.finite}
    if finite is not None:
        _CHECKS.finite = bool(finite)
    return previous


@contextlib.contextmanager
def checks(*, finite: bool | None = None) -> Iterator[None]:
    """``with attnzoo.checks(finite=False): ...`` sets checks for a block, then restores them."""
    previous = set_checks(finite=finite)
    try:
        yield
    finally:
        set_checks(**previous)


@dataclass
class Mechanism:
    """A registered attention mechanism. Calling it dispatches to a backend.

    Fields are data the suite, the benchmark and the docs read: ``patterns`` (a subset of
    :data:`PATTERNS`), ``spatial_dims`` (how many spatial axes q/k/v may have), ``params``,
    ``decoder`` (incremental decoding, or ``None``), ``exact`` (every backend computes the
    mechanism's own formula to rounding; False where a backend approximates it, e.g. by sampling
    or hashing. Exact or not, ``attnzoo bench error`` measures every mechanism's distance to
    softmax attention). ``sample_params(problem, pattern, rng)`` returns valid
    parameters for one of :data:`PATTERNS`: random options when given an ``rng`` (the
    conformance suite), the plain ones when ``rng`` is None (the benchmark). ``check_params``
    checks what one parameter alone cannot (``(name, message)`` of a conflict, or None).
    """

    name: str
    family: str
    catalog: tuple[str, ...]
    paper: str
    formula: str
    cost: str
    summary: str
    patterns: frozenset[str]
    params: tuple[Param, ...] = ()
    spatial_dims: tuple[int, ...] = (1,)
    gqa: bool = False
    exact: bool = True
    decoder: Decoder | None = None
    # why a causal mechanism has no decoder (e.g. its selection reads tokens after the query): a
    # documented refusal, which init_state/step raise; every causal mechanism has one or the other
    decoder_refusal: str | None = None
    # the finite check reads q, k, v before the call, not only the output after it: for mechanisms
    # where a key is seen by few queries (one group or cluster), so that an inf key whose scores
    # all come out -inf would vanish from a finite output (a pad holding NaN then raises too)
    check_inputs: bool = False
    sample_params: Callable[[Problem, str, "random.Random | None"], dict[str, Any]] | None = None
    check_params: Callable[[dict[str, Any], Problem], "tuple[str, str] | None"] | None = None  # across params
    backends: dict[str, Backend] = field(default_factory=dict)
    function: Callable[..., Any] | None = None  # the public functional form, for its docstring
    # state_size(head_dim, value_dim=None, **params): elements of the recurrent (decoding) state per
    # batch entry and head; None when the mechanism keeps no fixed-size state (a KV cache grows)
    state_size: Callable[..., int] | None = None
    # weights(q, k, v, **bound) -> (w, is_distribution): the (B, Hq, Nq, Nk) matrix the output
    # is w @ v of (before any output normalization), for attnzoo.hooks; None: hooks derive it
    # from the reference when that is one call of kernels/reference.py's materialized softmax
    weights: Callable[..., tuple[torch.Tensor, bool]] | None = None
    # allowed_pairs(problem, bound) -> int: the (batch, head, query, key) entries a call's pattern
    # lets a query attend, summed over batch and heads (B * H * Nq * Nk for a dense pattern), for
    # the benchmark's useful FLOP/s; None: the benchmark counts them from the reference's masked
    # scores where that is one softmax over the call's own keys, else leaves the column blank
    allowed_pairs: Callable[[Problem, Mapping[str, Any]], int] | None = None
    # causal_block(bound) -> int: causal patterns whose *selection* reads whole query blocks
    # (XAttention's block estimate): a query's output may depend on the tokens up to the end of
    # its block of that many queries, never past it. None: strictly causal (each query sees only
    # its past). The conformance suite perturbs the future from the end of the cut's block.
    causal_block: Callable[[Mapping[str, Any]], int] | None = None
    # sparsity_params(problem, share) -> dict: parameters of a content-sparse mechanism that keep
    # about ``share`` (0 < share <= 1) of each query's keys; share = 1 keeps all of them (the
    # mechanism then equals softmax). ``attnzoo bench sparsity`` sweeps every mechanism that has it.
    sparsity_params: Callable[[Problem, float], dict[str, Any]] | None = None

    def __post_init__(self) -> None:
        self.patterns = frozenset(self.patterns)
        unknown = self.patterns - set(PATTERNS)
        if unknown:
            raise ValueError(f"{self.name}: unknown patterns {sorted(unknown)}; choose from {PATTERNS}")
        self._params = {p.name: p for p in self.params}

    def __repr__(self) -> str:
        return f"Mechanism({self.name!r})"

    # ---- registration of backends ------------------------------------------------------
    def add_backend(self, backend: Backend) -> Backend:
        if backend.name in self.backends:
            raise ValueError(f"{self.name}: backend {backend.name!r} registered twice")
        self.backends[backend.name] = backend
        return backend

    def example_params(self, problem: Problem, pattern: str, rng: random.Random | None = None) -> dict[str, Any]:
        """Valid parameters for ``pattern`` on inputs shaped like ``problem``.

        With ``rng`` the mechanism's ``sample_params`` switches options on at random (the test
        suite); without it the parameters are the plain, repeatable ones of the pattern (the
        benchmark): ``sample_params(problem, pattern, None)``, or ``causal`` alone.
        """
        if pattern not in self.patterns:
            raise ParameterError(f"{self.name}: does not support the {pattern} pattern", argument="pattern")
        if self.sample_params is not None:
            return self.sample_params(problem, pattern, rng)
        return {"causal": pattern.startswith("causal")} if "causal" in self._params else {}

    def implementation(self, name: str, **capabilities: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Decorator registering ``fn`` as backend ``name`` (keywords: :class:`Backend` fields)."""

        def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
            doc = capabilities.pop("doc", None) or inspect.getdoc(fn) or ""
            self.add_backend(Backend(name=name, fn=fn, doc=_first_line(doc), **capabilities))
            return fn

        return wrap

    @property
    def reference(self) -> Backend:
        return self.backends["reference"]

    @property
    def causal(self) -> bool:
        return bool(self.patterns & {"causal_self", "causal_cross"})

    # ---- validation and dispatch -------------------------------------------------------
    def describe(self, q: Any, k: Any, v: Any) -> Problem:
        cross = bool(self.patterns & {"noncausal_cross", "causal_cross"})
        return describe(q, k, v, mechanism=self.name, spatial_dims=self.spatial_dims, allow_gqa=self.gqa, allow_cross=cross)

    def bind(self, problem: Problem, params: Mapping[str, Any], validated: Collection[str] = ()) -> dict[str, Any]:
        """Fill defaults and validate every parameter; unknown names are an error. ``validated``:
        names already checked (a decoding state's bound parameters, checked at ``init_state``
        against the whole problem, not against one step's tokens); with any, ``check_params`` is
        skipped too, for the same reason."""
        unknown = [n for n in params if n not in self._params]
        if unknown:
            accepted = ", ".join(self._params) or "none"
            raise ParameterError(
                f"{self.name}: unknown parameter {unknown[0]!r}; it accepts: {accepted}", argument=unknown[0]
            )
        bound = {}
        for p in self.params:
            value = params.get(p.name, p.default)
            if p.name not in validated:
                p.validate(value, problem, self.name)
            bound[p.name] = value
        if self.check_params is not None and not validated:
            conflict = self.check_params(bound, problem)
            if conflict is not None:
                name, message = conflict
                raise ParameterError(f"{self.name}: {name}: {message}", argument=name)
        return bound

    def select(self, problem: Problem, params: Mapping[str, Any], backend: str | None = None) -> Backend:
        """The backend dispatch would use; ``backend`` forces one (and explains a refusal)."""
        if backend is not None:
            if backend not in self.backends:
                raise UnknownMechanismError(
                    f"{self.name}: no backend {backend!r}; it has: {', '.join(self.backends)}"
                )
            chosen = self.backends[backend]
            reason = chosen.decline_reason(problem, params)
            if reason is not None:
                raise NoBackendError(f"{self.name}: backend {backend!r} declines these inputs: {reason}")
            return chosen
        reasons = []
        for b in self.dispatch_order(problem):
            reason = b.skip_reason(problem, params)
            if reason is None:
                return b
            reasons.append(f"  {b.name}: {reason}")
        raise NoBackendError(f"{self.name}: no backend accepts these inputs:\n" + "\n".join(reasons))

    def explain(self, q: Any, k: Any, v: Any, **params: Any) -> list[tuple[str, str | None]]:
        """For each backend in dispatch order, ``(name, reason it declines or None)``."""
        problem, bound = self.prepare(q, k, v, params)
        return [(b.name, b.skip_reason(problem, bound)) for b in self.dispatch_order(problem)]

    def dispatch_order(self, problem: Problem | None = None) -> list[Backend]:
        """The backends in the order dispatch tries them (with ``problem``: its device's priorities)."""
        return sorted(self.backends.values(), key=lambda b: -(b.priority if problem is None else b.rank(problem)))

    def prepare(self, q: Any, k: Any, v: Any, params: Mapping[str, Any]) -> tuple[Problem, dict[str, Any]]:
        """Validate a call: its :class:`Problem` and its bound parameters (defaults filled in)."""
        problem = self.describe(q, k, v)
        bound = self.bind(problem, params)
        if not problem.requires_grad and torch.is_grad_enabled() and any(
            isinstance(t, torch.Tensor) and t.requires_grad for t in bound.values()
        ):
            problem = dataclasses.replace(problem, requires_grad=True)  # a learnable bias needs autograd too
        return problem, bound

    def __call__(self, q: Any, k: Any, v: Any, *, backend: str | None = None, **params: Any) -> Any:
        if _INTERCEPTORS:  # attnzoo.hooks capturing or editing
            return _INTERCEPTORS[-1](self, q, k, v, backend, params)
        problem, bound = self.prepare(q, k, v, params)
        chosen = self.select(problem, bound, backend)
        if self.check_inputs and _CHECKS.finite and not torch.compiler.is_compiling():
            check_finite_inputs(self.name, {"q": q, "k": k, "v": v}, "this mechanism checks its inputs (a key seen by one group could vanish)")
        result = chosen.fn(q, k, v, **bound)
        if _CHECKS.finite:
            self._check_output(result, q, k, v, bound)
        return result

    def _check_output(self, result: Any, q: Any, k: Any, v: Any, bound: Mapping[str, Any]) -> None:
        # Check the output rather than every input: a NaN a mask hid from the output is
        # harmless. Its sum is non-finite whenever an entry is (NaN and inf propagate), and costs
        # a twentieth of isfinite(out).all(), which writes a bool per entry; a sum that merely
        # overflows costs a scan of the inputs that finds nothing and raises nothing.
        if torch.compiler.is_compiling():
            # Under torch.compile the test is skipped: branching on a tensor's value is a graph
            # break (and a host sync); fullgraph=True would refuse the whole call.
            return
        out = result[0] if isinstance(result, tuple) else result
        if not isinstance(out, torch.Tensor) or not out.is_floating_point():
            return
        acc = torch.float32 if out.dtype in (torch.float16, torch.bfloat16) else out.dtype
        if not bool(torch.isfinite(out.sum(dtype=acc))):
            tensors = {"q": q, "k": k, "v": v}
            tensors.update({n: t for n, t in bound.items() if isinstance(t, torch.Tensor)})
            check_finite_inputs(self.name, tensors)

    # ---- decoding ----------------------------------------------------------------------
    def init_state(self, q: Any, k: Any, v: Any, **params: Any) -> DecodingState:
        """An empty decoding state for inputs shaped like q, k, v (their lengths are ignored).

        The parameters given here (defaults filled in) are bound to the state and to every state
        stepped from it, except the decoder's ``per_step`` ones (see :class:`Decoder`).
        """
        self._refuse_without_decoder()
        problem = self.describe(q, k, v)
        bound = self.bind(problem, params)
        state = self.decoder.init_state(problem, **bound)
        per_step = getattr(self.decoder, "per_step", frozenset())
        kept = {key: value for key, value in bound.items() if key not in per_step}
        return dataclasses.replace(state, params=kept, mechanism=self.name)

    def step(self, q: Any, k: Any, v: Any, state: Any, **params: Any) -> tuple[Any, Any]:
        """Append the tokens k, v to ``state`` and attend q to everything seen (causal).

        Returns ``(out, new state)``; ``state`` itself is left as it was, so it can be stepped
        again (branching). Parameters bound at ``init_state`` may be omitted; given, they must
        equal the bound values.
        """
        self._refuse_without_decoder()
        if not isinstance(state, DecodingState) or state.mechanism not in ("", self.name):
            made = f"{state.mechanism!r}'s" if isinstance(state, DecodingState) else type(state).__name__
            raise ParameterError(f"{self.name}: state: expected a state of {self.name}'s init_state or step, got {made}", argument="state")
        problem = self.describe(q, k, v)
        return self.decoder.step(q, k, v, state, **self.bind(problem, _with_bound(self.name, state, params), validated=state.params.keys()))

    def _refuse_without_decoder(self) -> None:
        if self.decoder is None:
            why = f": {self.decoder_refusal}" if self.decoder_refusal else ""
            raise ParameterError(f"{self.name}: does not support incremental decoding{why}", argument="mechanism")

    # ---- documentation -----------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "family": self.family,
            "catalog": ", ".join(self.catalog),
            "summary": self.summary,
            "paper": self.paper,
            "formula": self.formula,
            "cost": self.cost,
            "patterns": ", ".join(p for p in PATTERNS if p in self.patterns),
            "exact": self.exact,
            "decoding": self.decoder is not None,
            "state_size": _first_line(self.state_size.__doc__) if self.state_size is not None else "-",
            "params": [(p.name, p.type_name, repr(p.default), p.doc) for p in self.params],
            "backends": {name: (b.doc, b.capabilities()) for name, b in self.backends.items()},
        }


_REGISTRY: dict[str, Mechanism] = {}


def register(mechanism: Mechanism) -> Mechanism:
    """Add a mechanism to the registry (its name must be new)."""
    if mechanism.name in _REGISTRY:
        raise ValueError(f"mechanism {mechanism.name!r} is registered twice")
    _REGISTRY[mechanism.name] = mechanism
    return mechanism


def _load_families() -> None:
    # The families register themselves on import; importing the package does it, but a user
    # of the registry alone (tests, tools) should see every mechanism too.
    from . import functional  # noqa: F401


def get(name: str) -> Mechanism:
    """The mechanism registered as ``name``."""
    _load_families()
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY))
        raise UnknownMechanismError(f"no mechanism {name!r}; registered: {known}", argument="mechanism") from None


def list_mechanisms(family: str | None = None) -> list[Mechanism]:
    """Every registered mechanism (of one family if given), sorted by family then name."""
    _load_families()
    mechs: Iterable[Mechanism] = _REGISTRY.values()
    if family is not None:
        families = {m.family for m in _REGISTRY.values()}
        if family not in families:
            raise UnknownMechanismError(
                f"no family {family!r}; registered: {', '.join(sorted(families))}", argument="family"
            )
        mechs = [m for m in mechs if m.family == family]
    return sorted(mechs, key=lambda m: (m.family, m.name))
