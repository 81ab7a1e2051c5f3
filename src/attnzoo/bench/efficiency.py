"""The efficiency benchmark (catalog B1): time and peak memory of every mechanism x backend.

For each of CAB's four patterns (noncausal self, causal self, noncausal cross, causal cross;
Zhang et al., 2023) and each sequence length N, random q, k, v of shape (B, H, N, D) are
attended by every backend of every mechanism that declares the pattern (forced with
``backend=``; the others get an "n/a" row), and the median time is compared with the ``sdpa``
backend of ``softmax`` on the same inputs (the ``ratio`` column). Self patterns have Nq = Nk = N;
cross patterns N keys and ``queries`` queries (default N // 2: a target half the source, so the
shapes differ from self). ``mode`` is ``forward`` (under ``torch.inference_mode``) or ``train``
(forward and backward of a fixed random projection of the output).

Timing (:mod:`.timing`): a warm-up call, then repeats until a time budget or a count, median and
IQR; CUDA events and synchronization on GPU. Memory (:mod:`.memory`): one more call whose peak
extra memory is read where the allocations happen (CUDA's allocator statistics; on CPU the
resident-set high-water mark, reset per case).

A backend that cannot take the inputs is not timed; its row carries the reason (the backend's
own ``decline_reason``, or the benchmark's: compiled backends unless asked for, backends that
materialize Nq x Nk scores once that is larger than ``max_scores``). Two extra rows per length
measure the library itself: ``auto`` (dispatch picks the backend) and ``torch / F.sdpa`` (the
raw PyTorch call, no attnzoo).

With a :class:`~attnzoo.bench.results.ResultStore`, every row is written as it is measured (one
transaction each), and ``resume`` reuses the rows of identical cases already stored. The runner
returns rows and never prints; ``attnzoo bench`` renders them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

import torch

from ..errors import AttnZooError
from ..registry import PATTERNS, Backend, Mechanism, Problem, get, list_mechanisms
from .machine import machine_info
from .memory import peak_memory
from .results import Result, ResultStore, case_key
from .timing import Timing, time_call

__all__ = [
    "BASELINE",
    "CPU_LENGTHS",
    "GPU_LENGTHS",
    "EfficiencyConfig",
    "Case",
    "Row",
    "plan_cases",
    "run_efficiency",
    "quick_config",
]

#: Default grids of sequence lengths: CAB's range on this CPU in reasonable time, longer on GPU.
CPU_LENGTHS = (256, 1024, 4096, 16384)
GPU_LENGTHS = (256, 1024, 4096, 16384, 65536, 131072)

#: The mechanism and backend every row is compared with.
BASELINE = ("softmax", "sdpa")
#: The row of automatic dispatch (no ``backend=``), and the row of raw PyTorch SDPA.
AUTO = "auto"
RAW_TORCH = ("torch", "F.sdpa")

DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


@dataclass(frozen=True)
class EfficiencyConfig:
    """What to time: shapes, dtype, device, which mechanisms, and how long per case."""

    lengths: tuple[int, ...] = CPU_LENGTHS
    patterns: tuple[str, ...] = ("noncausal_self",)  # any of registry.PATTERNS
    batch: int = 1
    heads: int = 8
    kv_heads: Optional[int] = None  # None: as many as query heads; fewer: GQA/MQA
    head_dim: int = 64
    dtype: torch.dtype = torch.float32
    device: str = "cpu"
    mechanisms: Optional[tuple[str, ...]] = None  # None: every registered mechanism
    budget_s: float = 0.5
    max_repeats: int = 50
    include_compiled: bool = False
    # Nq * Nk above which score-materializing backends (the references, the O(Nq*Nk) split) are
    # skipped: at 4096^2 one reference call takes seconds and would dominate the quick run
    max_scores: int = 2048 * 2048
    mode: str = "forward"  # or "train": forward + backward
    queries: Optional[int] = None  # queries of the cross patterns; None: N // 2
    memory: bool = True  # one extra call per case measures its peak memory
    dispatch_only: bool = False  # one "auto" case per mechanism (the backend dispatch picks) instead of every backend
    # a spatial grid (e.g. (128, 128)): mechanisms with that many spatial axes get (B, H, *grid, D),
    # the others (and the SDPA baseline) its N = prod(grid) tokens flattened
    spatial: Optional[tuple[int, ...]] = None
    backends: Optional[tuple[str, ...]] = None  # None: every backend of each mechanism
    # parameter overrides (e.g. {"kernel_size": 13}), applied to the mechanisms that take them
    overrides: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        unknown = [p for p in self.patterns if p not in PATTERNS]
        if unknown or not self.patterns:
            raise ValueError(f"patterns: expected some of {', '.join(PATTERNS)}, got {self.patterns}")
        if self.mode not in ("forward", "train"):
            raise ValueError(f"mode: expected 'forward' or 'train', got {self.mode!r}")

    def q_len(self, length: int, pattern: str) -> int:
        """Queries of ``pattern`` at N = ``length``: N for self, ``queries`` (default N // 2) for cross."""
        if pattern.endswith("_self"):
            return length
        return self.queries if self.queries is not None else max(1, length // 2)


def quick_config(device: str = "cpu") -> EfficiencyConfig:
    """The README's main job (``attnzoo bench`` with no arguments): every mechanism through the
    backend dispatch picks, the four patterns, N = 256, 1024, 4096, forward, a short budget per
    case (about 3 minutes on 2 cores)."""
    return EfficiencyConfig(lengths=(256, 1024, 4096), patterns=PATTERNS, budget_s=0.05, max_repeats=10, device=device, dispatch_only=True)


@dataclass(frozen=True)
class Case:
    """One mechanism x backend x pattern x length; ``skip`` is set when it is known in advance not to run."""

    mechanism: str
    backend: str
    length: int
    pattern: str = "noncausal_self"
    skip: Optional[str] = None


@dataclass(frozen=True)
class Row:
    """The outcome of one case: a timing, its ratio to the baseline and the peak memory, or why it was skipped."""

    mechanism: str
    backend: str
    length: int
    timing: Optional[Timing] = None
    ratio: Optional[float] = None
    note: str = ""
    pattern: str = "noncausal_self"
    peak_bytes: Optional[int] = None
    memory_method: Optional[str] = None

    @property
    def skipped(self) -> bool:
        return self.timing is None


# --------------------------------------------------------------------------------------------
# which cases
# --------------------------------------------------------------------------------------------
def _selected_mechanisms(config: EfficiencyConfig) -> list[Mechanism]:
    if config.mechanisms is None:
        return list_mechanisms()
    return [get(name) for name in config.mechanisms]


#: The note of a case whose mechanism does not declare the pattern (the report shows "n/a").
NOT_DECLARED = "n/a: pattern not declared"


def _static_skip(mech: Mechanism, backend: Backend, length: int, pattern: str, config: EfficiencyConfig) -> Optional[str]:
    """A reason known before any tensor exists, or None."""
    if pattern not in mech.patterns:
        return NOT_DECLARED
    if backend.compiles and not config.include_compiled:
        return "torch.compile per shape (~20 s each on CPU): pass --include-compiled"
    if backend.materializes_scores and config.q_len(length, pattern) * length > config.max_scores:
        return f"materializes Nq x Nk scores: only up to Nq * Nk = {config.max_scores}"
    if config.mode == "train" and not backend.autograd:
        return "forward only"
    return None


def plan_cases(config: EfficiencyConfig) -> list[Case]:
    """Every pattern x length x mechanism x backend, in that order of nesting.

    A mechanism that does not declare a pattern gets one "n/a" case for it, not one per backend.
    """
    mechs = _selected_mechanisms(config)
    cases = []
    for pattern in config.patterns:
        for n in config.lengths:
            for m in mechs:
                if pattern not in m.patterns:
                    cases.append(Case(m.name, "-", n, pattern, NOT_DECLARED))
                    continue
                if config.dispatch_only:
                    cases += [Case(m.name, BASELINE[1], n, pattern)] if m.name == BASELINE[0] else []
                    cases.append(Case(m.name, AUTO, n, pattern))
                    continue
                chosen = [b for b in m.backends.values() if config.backends is None or b.name in config.backends]
                cases += [Case(m.name, b.name, n, pattern, _static_skip(m, b, n, pattern, config)) for b in chosen]
                if m.name == BASELINE[0]:
                    cases += [Case(m.name, AUTO, n, pattern), Case(*RAW_TORCH, n, pattern)]
    return cases


# --------------------------------------------------------------------------------------------
# running them
# --------------------------------------------------------------------------------------------
def _inputs(config: EfficiencyConfig, length: int, pattern: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(length)
    tokens = config.spatial if config.spatial is not None else (length,)
    kv_shape = (config.batch, config.kv_heads or config.heads, *tokens, config.head_dim)
    q_tokens = tokens if pattern.endswith("_self") else (config.q_len(length, pattern),)
    q_shape = (config.batch, config.heads, *q_tokens, config.head_dim)
    q, k, v = (torch.randn(s, generator=gen, dtype=torch.float32) for s in (q_shape, kv_shape, kv_shape))
    train = config.mode == "train"
    return tuple(t.to(device=config.device, dtype=config.dtype).requires_grad_(train) for t in (q, k, v))  # type: ignore[return-value]


def _runner(forward: Callable[[], Any], config: EfficiencyConfig, qkv: tuple[torch.Tensor, ...]) -> Callable[[], Any]:
    """What one timed repeat does: the forward, or the forward and the backward."""
    if config.mode != "train":
        return forward
    grads: list[torch.Tensor] = []  # drawn once: drawing 4M normals took ~60 ms a step on the 2-core CPU

    def train_step() -> Any:
        out = forward()
        out = out[0] if isinstance(out, tuple) else out
        if not grads:
            grads.append(torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float32).to(out))
        return torch.autograd.grad(out, qkv, grads[0])

    return train_step


@dataclass(frozen=True)
class _Measured:
    """What one case measured: its timing, its peak extra memory and how that was read."""

    timing: Timing
    peak_bytes: Optional[int] = None
    memory_method: Optional[str] = None


def _measured(forward: Callable[[], Any], config: EfficiencyConfig, qkv: tuple[torch.Tensor, ...]) -> _Measured:
    step = _runner(forward, config, qkv)
    context = torch.enable_grad() if config.mode == "train" else torch.inference_mode()
    with context:
        timing = time_call(step, budget_s=config.budget_s, max_repeats=config.max_repeats, device=config.device)
        if not config.memory:
            return _Measured(timing)
        peak, method = peak_memory(step, config.device)
    return _Measured(timing, peak, method)


def _params(mech: Mechanism, problem: Problem, pattern: str, config: EfficiencyConfig) -> dict[str, Any]:
    """The mechanism's plain, repeatable parameters for the timed pattern (no random options),
    with the config's overrides of the parameters it has."""
    params = mech.example_params(problem, pattern)
    names = {p.name for p in mech.params}
    params.update({name: value for name, value in config.overrides if name in names})
    return params


def _dispatch_note(mech: Mechanism, backend: Backend, problem: Problem, bound: Mapping[str, Any]) -> str:
    """'dispatch default' for the backend automatic dispatch picks, else why it passes it over."""
    try:
        if mech.select(problem, bound).name == backend.name:
            return "dispatch default"
    except AttnZooError:
        return ""
    return backend.skip_reason(problem, bound) or ""


def _laid_out(qkv: tuple[torch.Tensor, ...], config: EfficiencyConfig, mech: Optional[Mechanism] = None) -> tuple[torch.Tensor, ...]:
    """The inputs as the mechanism takes them: on its grid, or flattened to tokens (views)."""
    if config.spatial is None or (mech is not None and len(config.spatial) in mech.spatial_dims):
        return qkv
    return tuple(x.flatten(2, -2) for x in qkv)


Outcome = tuple[Optional[_Measured], str]


def _time_case(mech: Mechanism, backend: Backend, qkv: tuple[torch.Tensor, ...], pattern: str, config: EfficiencyConfig) -> Outcome:
    """Time one backend on the inputs: ``(measured, note)`` or ``(None, why it did not run)``."""
    q, k, v = _laid_out(qkv, config, mech)
    try:
        problem = mech.describe(q, k, v)
        params = _params(mech, problem, pattern, config)
        bound = mech.bind(problem, params)
    except AttnZooError as err:
        return None, f"inputs refused: {err}"
    reason = backend.decline_reason(problem, bound)
    if reason is not None:
        return None, f"declines: {reason}"
    note = _dispatch_note(mech, backend, problem, bound)
    return _guarded(lambda: mech(q, k, v, backend=backend.name, **params), config, qkv, note)


def _guarded(forward: Callable[[], Any], config: EfficiencyConfig, qkv: tuple[torch.Tensor, ...], note: str) -> Outcome:
    try:
        return _measured(forward, config, qkv), note
    except Exception as err:  # noqa: BLE001 - one failing backend must not end the benchmark
        return None, f"error: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"


def _time_auto(mech: Mechanism, qkv: tuple[torch.Tensor, ...], pattern: str, config: EfficiencyConfig) -> Outcome:
    """The mechanism with no backend named: dispatch picks, its cost (validation, selection) included."""
    q, k, v = _laid_out(qkv, config, mech)
    try:
        problem = mech.describe(q, k, v)
        params = _params(mech, problem, pattern, config)
        chosen = mech.select(problem, mech.bind(problem, params)).name
    except AttnZooError as err:
        return None, f"inputs refused: {err}"
    if mech.backends[chosen].compiles and not config.include_compiled:
        return None, f"dispatch picks {chosen}, which compiles per shape: pass --include-compiled"
    return _guarded(lambda: mech(q, k, v, **params), config, qkv, f"dispatch picks {chosen}")


def _time_raw_torch(qkv: tuple[torch.Tensor, ...], pattern: str, config: EfficiencyConfig) -> Outcome:
    """torch.nn.functional.scaled_dot_product_attention called directly: no attnzoo at all."""
    q, k, v = _laid_out(qkv, config)
    causal = pattern.startswith("causal")
    if causal and q.shape[2] != k.shape[2]:
        return None, "raw SDPA's is_causal is top-left aligned; attnzoo's default is bottom-right"
    gqa = q.shape[1] != k.shape[1]
    return _guarded(
        lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa), config, qkv, "no attnzoo"
    )


def _baseline(qkv: tuple[torch.Tensor, ...], pattern: str, config: EfficiencyConfig) -> Outcome:
    mech_name, backend_name = BASELINE
    mech = get(mech_name)
    return _time_case(mech, mech.backends[backend_name], qkv, pattern, config)


def run_efficiency(
    config: EfficiencyConfig,
    on_case: Optional[Callable[[Case], None]] = None,
    on_start: Optional[Callable[[Case], None]] = None,
    *,
    store: Optional[ResultStore] = None,
    resume: bool = False,
) -> list[Row]:
    """Run every case of :func:`plan_cases`; ``on_start``/``on_case`` are called before/after each.

    The baseline is timed once per pattern and length, first, and reused as its own row (ratio
    1). With ``store``, each row is written as soon as it is measured; with ``resume`` too, a
    case already stored (same case, same machine and commit) is read back, not run again.
    """
    cases = plan_cases(config)
    recorder = _Recorder(store, config) if store is not None else None
    rows: list[Row] = []
    try:
        for pattern in config.patterns:
            for length in config.lengths:
                rows += _run_group(config, pattern, length, [c for c in cases if c.pattern == pattern and c.length == length], recorder, resume, on_start, on_case)
    finally:
        if recorder is not None:
            recorder.finish()
    return rows


def _run_group(config, pattern, length, cases, recorder, resume, on_start, on_case) -> list[Row]:
    """The cases of one pattern and length: inputs made (and the baseline timed) only if one runs."""
    rows, qkv, base = [], None, None
    for case in cases:
        if on_start is not None:
            on_start(case)
        row = recorder.stored(case) if recorder is not None and resume else None
        if row is None:
            if qkv is None and case.skip is None:
                qkv = _inputs(config, length, pattern)
                base = _baseline(qkv, pattern, config)
            row = _run_case(case, qkv, base, config)
            if recorder is not None:
                recorder.add(case, row)
        rows.append(row)
        if on_case is not None:
            on_case(case)
    return rows


def _run_case(case: Case, qkv: Optional[tuple[torch.Tensor, ...]], base: Optional[Outcome], config: EfficiencyConfig) -> Row:
    if case.skip is not None or qkv is None or base is None:
        return Row(case.mechanism, case.backend, case.length, note=case.skip or "", pattern=case.pattern)
    if (case.mechanism, case.backend) == BASELINE:
        measured, note = base
    elif case.backend == AUTO:
        measured, note = _time_auto(get(case.mechanism), qkv, case.pattern, config)
    elif (case.mechanism, case.backend) == RAW_TORCH:
        measured, note = _time_raw_torch(qkv, case.pattern, config)
    else:
        mech = get(case.mechanism)
        measured, note = _time_case(mech, mech.backends[case.backend], qkv, case.pattern, config)
    if measured is None:
        return Row(case.mechanism, case.backend, case.length, note=note, pattern=case.pattern)
    ratio = _ratio(measured.timing, base[0].timing if base[0] is not None else None)
    return Row(case.mechanism, case.backend, case.length, measured.timing, ratio, note, case.pattern, measured.peak_bytes, measured.memory_method)


def _ratio(timing: Optional[Timing], base: Optional[Timing]) -> Optional[float]:
    if timing is None or base is None or base.median_ms <= 0:
        return None
    return timing.median_ms / base.median_ms


# --------------------------------------------------------------------------------------------
# the results store
# --------------------------------------------------------------------------------------------
def _config_record(config: EfficiencyConfig) -> dict[str, Any]:
    record = dataclasses.asdict(config)
    record["dtype"] = str(config.dtype).replace("torch.", "")
    return record


class _Recorder:
    """Writes rows to the store under one run, and finds rows of identical cases for ``resume``."""

    def __init__(self, store: ResultStore, config: EfficiencyConfig):
        self.store, self.config = store, config
        self.machine = machine_info(config.device)
        self.run_id = store.start_run("efficiency", _config_record(config), self.machine)
        # what makes two measurements of a case the same: not the load, not the time
        self.where = {k: self.machine.get(k) for k in ("cpu", "cores", "threads", "torch", "attnzoo", "git", "device", "gpu")}

    def _shapes(self, case: Case) -> dict[str, Any]:
        c = self.config
        return dict(
            batch=c.batch, heads=c.heads, kv_heads=c.kv_heads or c.heads, q_len=c.q_len(case.length, case.pattern), kv_len=case.length,
            head_dim=c.head_dim, dtype=str(c.dtype).replace("torch.", ""), device=c.device, mode=c.mode, pattern=case.pattern,
        )

    def key(self, case: Case) -> str:
        c = self.config
        identity = dict(
            self._shapes(case), mechanism=case.mechanism, backend=case.backend, spatial=c.spatial, overrides=c.overrides,
            budget_s=c.budget_s, max_repeats=c.max_repeats, max_scores=c.max_scores, include_compiled=c.include_compiled, where=self.where,
        )
        return case_key("efficiency", identity)

    def add(self, case: Case, row: Row) -> None:
        t = row.timing
        result = Result(
            kind="efficiency", mechanism=row.mechanism, case_key=self.key(case), backend=row.backend,
            params={"spatial": self.config.spatial, **dict(self.config.overrides)},
            median_ms=t.median_ms if t else None, q1_ms=t.q1_ms if t else None, q3_ms=t.q3_ms if t else None, repeats=t.repeats if t else None,
            peak_bytes=row.peak_bytes, memory_method=row.memory_method, metrics={"ratio": row.ratio}, note=row.note, **self._shapes(case),
        )
        self.store.add(self.run_id, result)

    def stored(self, case: Case) -> Optional[Row]:
        r = self.store.find(self.key(case))
        if r is None:
            return None
        timing = Timing(r["median_ms"], r["q1_ms"], r["q3_ms"], r["repeats"]) if r["median_ms"] is not None else None
        return Row(case.mechanism, case.backend, case.length, timing, r["metrics"].get("ratio"), r["note"], case.pattern, r["peak_bytes"], r["memory_method"])

    def finish(self) -> None:
        self.store.finish_run(self.run_id)
