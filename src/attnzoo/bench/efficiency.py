"""The efficiency benchmark (catalog B1): time and peak memory of every mechanism x backend.

For each of CAB's four patterns (noncausal self, causal self, noncausal cross, causal cross;
Zhang et al., 2023) and each sequence length N, random q, k, v of shape (B, H, N, D) are
attended by every backend of every mechanism that declares the pattern (forced with
``backend=``; the others get an "n/a" row), and the time is compared with the ``sdpa``
backend of ``softmax`` on the same inputs (the ``ratio`` column: the median of paired ratios,
below). Self patterns have Nq = Nk = N;
cross patterns N keys and ``queries`` queries (default N // 2: a target half the source, so the
shapes differ from self). ``mode`` is ``forward`` (under ``torch.inference_mode``) or ``train``
(forward and backward of a fixed random projection of the output).

Timing (:mod:`.timing`): a warm-up call, then repeats until a time budget or a count, median and
IQR; CUDA events and synchronization on GPU. Every case but the baseline itself is timed in
adjacent pairs with the baseline (:func:`~.timing.time_paired`: case, baseline, baseline, case,
...), and its ratio is the median of the per-pair ratios, so a machine whose load drifts during
the run (a shared CPU) does not turn into a speed difference; the budget and repeat cap count
pairs and include the baseline's calls. A row whose IQR exceeds its median (of the times, or of
the paired ratios) is flagged ``unstable``.

Memory (:mod:`.memory`): one more call whose peak
extra memory is read where the allocations happen (CUDA's allocator statistics; on CPU the
resident-set high-water mark, reset per case).

Useful FLOP/s: ``4 * D * pairs`` FLOPs per forward (``2 D`` for ``q . k`` and ``2 D`` for
``p * v`` per attended (query, key) pair; ``pairs`` summed over batch and heads, so
``4 * B * H * Nq * Nk * D`` for dense attention), times 3.5 in ``train`` mode (forward plus a
backward counted as 2.5 forwards: FlashAttention's benchmark convention), divided by the
median time. The pairs are the ones the pattern allows, not the ones a backend computes (tile
waste is not useful): ``Nq * Nk`` for dense softmax, ``sum_i clamp(i + offset + 1, 0, Nk)`` for
causal (``Nq (Nq + 1) / 2`` for causal self); a mechanism's ``Mechanism.allowed_pairs`` hook
where it declares one; else the entries of its reference's masked scores that the mask did not
set to -inf, where that reference is one softmax over the call's own keys (checked once per
mechanism and pattern on short inputs, then counted once per length, stopping at the masked
scores, and only up to Nq * Nk = :data:`PAIR_COUNT_MAX_SCORES`). Elsewhere (the linear family,
whose work is not per pair; ``agent``; ``varying_window``; longer inputs) the column is blank.

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
import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

import torch

from ..errors import AttnZooError
from ..kernels import reference as _reference_kernel
from ..masks import causal_offset
from ..registry import PATTERNS, Backend, Mechanism, Problem, get, list_mechanisms
from .machine import machine_info
from .memory import peak_memory
from .results import Result, ResultStore, case_key
from .timing import PairedTiming, Timing, time_call, time_paired, unstable

__all__ = [
    "BASELINE",
    "CPU_LENGTHS",
    "PAIR_COUNT_MAX_SCORES",
    "TRAIN_FLOPS_FACTOR",
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

#: Inputs up to this many Nq x Nk scores have their allowed pairs counted from the reference's
#: masked scores (one materialized call per mechanism, pattern and length); longer ones are not.
PAIR_COUNT_MAX_SCORES = 4096 * 4096
#: Useful FLOPs of a train step (forward + backward) over those of the forward alone: the backward
#: counts as 2.5 forwards (five matmuls against two), FlashAttention's benchmark convention.
TRAIN_FLOPS_FACTOR = 3.5

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
    """The outcome of one case: a timing, its ratio to the baseline and the peak memory, or why it was skipped.

    ``ratio`` is the median of the ratios of pairs of adjacent calls (case / baseline), with
    quartiles ``ratio_q1``/``ratio_q3`` (None for the baseline itself, ratio 1, and for rows stored
    before paired timing); ``baseline_ms`` the baseline's median within those pairs;
    ``useful_flops`` the FLOPs of one timed call over the pairs the pattern allows (None: unknown).
    """

    mechanism: str
    backend: str
    length: int
    timing: Optional[Timing] = None
    ratio: Optional[float] = None
    note: str = ""
    pattern: str = "noncausal_self"
    peak_bytes: Optional[int] = None
    memory_method: Optional[str] = None
    ratio_q1: Optional[float] = None
    ratio_q3: Optional[float] = None
    baseline_ms: Optional[float] = None
    useful_flops: Optional[float] = None

    @property
    def skipped(self) -> bool:
        return self.timing is None

    @property
    def unstable(self) -> bool:
        """The IQR exceeds the median: of the times, or of the paired ratios."""
        t = self.timing
        if t is None:
            return False
        return unstable(t.median_ms, t.q1_ms, t.q3_ms) or unstable(self.ratio, self.ratio_q1, self.ratio_q3)

    @property
    def gflops(self) -> Optional[float]:
        """Useful GFLOP/s: :attr:`useful_flops` over the median time (None where either is unknown)."""
        return useful_gflops(self.useful_flops, self.timing.median_ms if self.timing else None)


def useful_gflops(flops: Optional[float], median_ms: Optional[float]) -> Optional[float]:
    """``flops`` per call over ``median_ms`` per call, in GFLOP/s (None where either is unknown)."""
    if flops is None or median_ms is None or median_ms <= 0:
        return None
    return flops / (median_ms * 1e-3) / 1e9


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
    """What one case measured: its timing, its peak extra memory and how that was read, and its
    pairs with the baseline (None where it was timed alone)."""

    timing: Timing
    peak_bytes: Optional[int] = None
    memory_method: Optional[str] = None
    paired: Optional[PairedTiming] = None


def _measured(
    forward: Callable[[], Any], config: EfficiencyConfig, qkv: tuple[torch.Tensor, ...], baseline: Optional[Callable[[], Any]] = None
) -> _Measured:
    """Time ``forward`` (paired with ``baseline`` when given), then measure its peak memory."""
    step = _runner(forward, config, qkv)
    context = torch.enable_grad() if config.mode == "train" else torch.inference_mode()
    paired = None
    with context:
        if baseline is None:
            timing = time_call(step, budget_s=config.budget_s, max_repeats=config.max_repeats, device=config.device)
        else:
            base_step = _runner(baseline, config, qkv)
            paired = time_paired(step, base_step, budget_s=config.budget_s, max_repeats=config.max_repeats, device=config.device)
            timing = paired.case
        if not config.memory:
            return _Measured(timing, paired=paired)
        peak, method = peak_memory(step, config.device)
    return _Measured(timing, peak, method, paired)


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
Forward = Optional[Callable[[], Any]]  # the baseline's forward a case is paired with (None: timed alone)


def _time_case(
    mech: Mechanism, backend: Backend, qkv: tuple[torch.Tensor, ...], pattern: str, config: EfficiencyConfig, baseline: Forward = None
) -> Outcome:
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
    return _guarded(lambda: mech(q, k, v, backend=backend.name, **params), config, qkv, note, baseline)


def _guarded(forward: Callable[[], Any], config: EfficiencyConfig, qkv: tuple[torch.Tensor, ...], note: str, baseline: Forward = None) -> Outcome:
    try:
        return _measured(forward, config, qkv, baseline), note
    except Exception as err:  # noqa: BLE001 - one failing backend must not end the benchmark
        return None, f"error: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"


def _time_auto(mech: Mechanism, qkv: tuple[torch.Tensor, ...], pattern: str, config: EfficiencyConfig, baseline: Forward = None) -> Outcome:
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
    return _guarded(lambda: mech(q, k, v, **params), config, qkv, f"dispatch picks {chosen}", baseline)


def _time_raw_torch(qkv: tuple[torch.Tensor, ...], pattern: str, config: EfficiencyConfig, baseline: Forward = None) -> Outcome:
    """torch.nn.functional.scaled_dot_product_attention called directly: no attnzoo at all."""
    q, k, v = _laid_out(qkv, config)
    causal = pattern.startswith("causal")
    if causal and q.shape[2] != k.shape[2]:
        return None, "raw SDPA's is_causal is top-left aligned; attnzoo's default is bottom-right"
    gqa = q.shape[1] != k.shape[1]
    return _guarded(
        lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa), config, qkv, "no attnzoo", baseline
    )


@dataclass(frozen=True)
class _Baseline:
    """The baseline of one pattern and length: its own row's outcome (timed alone) and the
    forward every other case is paired with (None where the baseline did not run)."""

    outcome: Outcome
    forward: Forward


def _baseline(qkv: tuple[torch.Tensor, ...], pattern: str, config: EfficiencyConfig) -> _Baseline:
    mech_name, backend_name = BASELINE
    mech = get(mech_name)
    outcome = _time_case(mech, mech.backends[backend_name], qkv, pattern, config)
    if outcome[0] is None:
        return _Baseline(outcome, None)
    q, k, v = _laid_out(qkv, config, mech)
    params = _params(mech, mech.describe(q, k, v), pattern, config)
    return _Baseline(outcome, lambda: mech(q, k, v, backend=backend_name, **params))


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
    pairs = _PairCounts(config)
    rows: list[Row] = []
    try:
        for pattern in config.patterns:
            for length in config.lengths:
                rows += _run_group(config, pattern, length, [c for c in cases if c.pattern == pattern and c.length == length], recorder, resume, on_start, on_case, pairs)
    finally:
        if recorder is not None:
            recorder.finish()
    return rows


def _run_group(config, pattern, length, cases, recorder, resume, on_start, on_case, pairs) -> list[Row]:
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
            row = _run_case(case, qkv, base, config, pairs)
            if recorder is not None:
                recorder.add(case, row)
        rows.append(row)
        if on_case is not None:
            on_case(case)
    return rows


def _run_case(
    case: Case, qkv: Optional[tuple[torch.Tensor, ...]], base: Optional[_Baseline], config: EfficiencyConfig, pairs: Optional[_PairCounts] = None
) -> Row:
    if case.skip is not None or qkv is None or base is None:
        return Row(case.mechanism, case.backend, case.length, note=case.skip or "", pattern=case.pattern)
    paired_with = base.forward
    if (case.mechanism, case.backend) == BASELINE:
        measured, note = base.outcome
    elif case.backend == AUTO:
        measured, note = _time_auto(get(case.mechanism), qkv, case.pattern, config, paired_with)
    elif (case.mechanism, case.backend) == RAW_TORCH:
        measured, note = _time_raw_torch(qkv, case.pattern, config, paired_with)
    else:
        mech = get(case.mechanism)
        measured, note = _time_case(mech, mech.backends[case.backend], qkv, case.pattern, config, paired_with)
    if measured is None:
        return Row(case.mechanism, case.backend, case.length, note=note, pattern=case.pattern)
    count = pairs if pairs is not None else _PairCounts(config)
    flops = _useful_flops(count(case.mechanism, qkv, case.pattern, case.length), qkv, config)
    p = measured.paired
    if p is not None:
        ratio, q1, q3, base_ms = p.ratio, p.ratio_q1, p.ratio_q3, p.baseline.median_ms
    else:  # the baseline itself (ratio 1 by definition), or a case with no baseline to pair with
        base_measured = base.outcome[0]
        ratio = _ratio(measured.timing, base_measured.timing if base_measured is not None else None)
        q1 = q3 = None
        base_ms = base_measured.timing.median_ms if base_measured is not None else None
    return Row(
        case.mechanism, case.backend, case.length, measured.timing, ratio, note, case.pattern, measured.peak_bytes, measured.memory_method,
        q1, q3, base_ms, flops,
    )  # fmt: skip


def _ratio(timing: Optional[Timing], base: Optional[Timing]) -> Optional[float]:
    if timing is None or base is None or base.median_ms <= 0:
        return None
    return timing.median_ms / base.median_ms


# --------------------------------------------------------------------------------------------
# useful FLOPs: the (query, key) pairs the pattern allows
# --------------------------------------------------------------------------------------------
def causal_pairs(q_len: int, kv_len: int, offset: int) -> int:
    """Pairs of a causal pattern where query ``i`` sees keys ``j <= i + offset``:
    ``sum_i clamp(i + offset + 1, 0, Nk)`` (``Nq (Nq + 1) / 2`` for self, ``offset = 0``)."""
    total = 0
    # the rows split into three runs: none visible, a growing prefix, all Nk visible
    first = max(0, -offset)  # first row with a visible key
    full = max(first, min(q_len, kv_len - offset - 1))  # first row seeing all Nk keys
    if full > first:
        a, b = first + offset + 1, full - 1 + offset + 1  # visible keys in the first and last growing rows
        total += (a + b) * (full - first) // 2
    total += max(0, q_len - max(full, first)) * kv_len
    return total


def _dense_softmax_pairs(problem: Problem, bound: Mapping[str, Any]) -> Optional[int]:
    """Allowed pairs of a plain softmax call (no mask_mod, padding or bias), else None."""
    if any(bound.get(name) is not None for name in ("mask_mod", "key_padding_mask", "bias")):
        return None
    per_head = problem.q_len * problem.kv_len
    if bound.get("causal"):
        offset = causal_offset(problem.q_len, problem.kv_len, bound.get("causal_alignment", "bottom_right"))
        per_head = causal_pairs(problem.q_len, problem.kv_len, offset)
    return problem.batch * problem.q_heads * per_head


class _Counted(Exception):
    """Raised by the tap once it has counted: the rest of the reference (softmax, p @ v) is not needed."""


class _PairCounter:
    """A tap on the reference's materialized softmax (the protocol of ``attnzoo.hooks``): counts
    the masked scores of the softmax over the call's own keys that are not -inf, and how many softmaxes ran.
    With ``stop``, it raises :class:`_Counted` as soon as it has counted."""

    def __init__(self, q_len: int, k: torch.Tensor, v: torch.Tensor, stop: bool = False):
        self.q_len, self.k, self.v, self.stop = q_len, k.flatten(2, -2), v.flatten(2, -2), stop
        self.calls = self.own = 0
        self.pairs = 0

    def scores(self, s: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if s.shape[-2:] == (self.q_len, self.k.shape[2]) and k.shape == self.k.shape and v.shape == self.v.shape and torch.equal(k, self.k) and torch.equal(v, self.v):
            self.own += 1
            self.pairs = s.numel() - int(torch.count_nonzero(s == float("-inf")))  # the mask's -inf: the pairs not allowed
            if self.stop:
                raise _Counted
        return s

    def probs(self, p: torch.Tensor) -> torch.Tensor:
        return p


def _tapped(mech: Mechanism, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bound: Mapping[str, Any], stop: bool) -> Optional[_PairCounter]:
    """The reference run under a :class:`_PairCounter` (None where it cannot run or the tap is taken)."""
    if "reference" not in mech.backends or _reference_kernel.TAP is not None:
        return None
    counter = _PairCounter(math.prod(q.shape[2:-1]), k, v, stop)
    _reference_kernel.TAP = counter
    try:
        with torch.no_grad():
            mech.reference.fn(q, k, v, **bound)
    except _Counted:
        pass
    except Exception:  # noqa: BLE001 - no count is a blank cell, not a failed benchmark
        return None
    finally:
        _reference_kernel.TAP = None
    return counter


#: The length of the inputs on which a mechanism's reference is first run whole, to see whether it
#: is one softmax over the call's own keys (its structure, not its size), before the real count.
PROBE_LENGTH = 64


class _PairCounts:
    """Allowed pairs of each mechanism, pattern and length of one run, each found once.

    The reference of a mechanism with no ``allowed_pairs`` (and not plain softmax) is first run
    whole on short inputs (:data:`PROBE_LENGTH`; the spatial grid itself with ``spatial``): only
    if that is exactly one softmax over the call's own keys is it run on the benchmark's inputs,
    and there it stops once the masked scores are counted (no softmax, no ``p @ v``).
    """

    def __init__(self, config: EfficiencyConfig):
        self.config = config
        self.counted: dict[tuple[str, str, int], Optional[int]] = {}
        self.probed: dict[tuple[str, str], bool] = {}

    def __call__(self, mechanism: str, qkv: tuple[torch.Tensor, ...], pattern: str, length: int) -> Optional[int]:
        key = (mechanism, pattern, length)
        if key not in self.counted:
            self.counted[key] = self._count(mechanism, qkv, pattern)
        return self.counted[key]

    def _bound(self, mech: Mechanism, qkv: tuple[torch.Tensor, ...], pattern: str) -> Optional[tuple[tuple[torch.Tensor, ...], Problem, dict[str, Any]]]:
        q, k, v = _laid_out(qkv, self.config, mech)
        try:
            problem = mech.describe(q, k, v)
            return (q, k, v), problem, mech.bind(problem, _params(mech, problem, pattern, self.config))
        except AttnZooError:
            return None

    def _count(self, mechanism: str, qkv: tuple[torch.Tensor, ...], pattern: str) -> Optional[int]:
        if mechanism == RAW_TORCH[0]:
            mechanism = BASELINE[0]  # the raw call is the baseline's (self causal: top-left = bottom-right)
        mech = get(mechanism)
        found = self._bound(mech, qkv, pattern)
        if found is None:
            return None
        (q, k, v), problem, bound = found
        if mech.allowed_pairs is not None:
            return int(mech.allowed_pairs(problem, bound))
        if mech.name == BASELINE[0]:
            return _dense_softmax_pairs(problem, bound)
        if problem.q_len * problem.kv_len > PAIR_COUNT_MAX_SCORES or not self._one_softmax(mech, pattern):
            return None
        counter = _tapped(mech, q, k, v, bound, stop=True)
        return counter.pairs if counter is not None and counter.own == 1 else None

    def _one_softmax(self, mech: Mechanism, pattern: str) -> bool:
        """Whether the mechanism's reference is one softmax over its own keys (probed once per pattern)."""
        key = (mech.name, pattern)
        if key not in self.probed:
            short = self.config if self.config.spatial is not None else dataclasses.replace(self.config, queries=None)
            found = self._bound(mech, _inputs(short, PROBE_LENGTH, pattern), pattern)
            counter = _tapped(mech, *found[0], found[2], stop=False) if found is not None else None
            self.probed[key] = counter is not None and counter.calls == 1 and counter.own == 1
        return self.probed[key]


def _useful_flops(pairs: Optional[int], qkv: tuple[torch.Tensor, ...], config: EfficiencyConfig) -> Optional[float]:
    """``2 (D + Dv)`` FLOPs per allowed pair (``q . k``, then ``p * v``), x3.5 for a train step."""
    if pairs is None:
        return None
    q, _, v = qkv
    flops = 2.0 * (q.shape[-1] + v.shape[-1]) * pairs
    return flops * TRAIN_FLOPS_FACTOR if config.mode == "train" else flops


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
            peak_bytes=row.peak_bytes, memory_method=row.memory_method, metrics=_metrics(row), note=row.note, **self._shapes(case),
        )
        self.store.add(self.run_id, result)

    def stored(self, case: Case) -> Optional[Row]:
        r = self.store.find(self.key(case))
        if r is None:
            return None
        timing = Timing(r["median_ms"], r["q1_ms"], r["q3_ms"], r["repeats"]) if r["median_ms"] is not None else None
        m = r["metrics"]  # rows stored before paired timing have "ratio" alone: the others read None
        return Row(
            case.mechanism, case.backend, case.length, timing, m.get("ratio"), r["note"], case.pattern, r["peak_bytes"], r["memory_method"],
            m.get("ratio_q1"), m.get("ratio_q3"), m.get("baseline_ms"), m.get("useful_flops"),
        )  # fmt: skip

    def finish(self) -> None:
        self.store.finish_run(self.run_id)


def _metrics(row: Row) -> dict[str, Any]:
    """What a row stores beside time and memory: ``ratio`` (as before paired timing) and, added
    with it, the paired ratio's quartiles, the baseline's median, the useful FLOPs and GFLOP/s."""
    return {
        "ratio": row.ratio,
        "ratio_q1": row.ratio_q1,
        "ratio_q3": row.ratio_q3,
        "paired": row.ratio_q1 is not None,
        "baseline_ms": row.baseline_ms,
        "useful_flops": row.useful_flops,
        "useful_gflops": row.gflops,
        "unstable": row.unstable,
    }
