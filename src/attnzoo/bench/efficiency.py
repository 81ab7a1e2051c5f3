"""The efficiency benchmark: time of every registered mechanism x backend.

For each sequence length N, random q, k, v of shape (B, H, N, D) are attended by every
backend of every mechanism (forced with ``backend=``), and the median time is compared with
the ``sdpa`` backend of ``softmax`` at the same N (the ``ratio`` column). ``mode`` is
``forward`` (under ``torch.inference_mode``) or ``train`` (forward and backward of a fixed
random projection of the output). With ``queries`` set, Nq is that and N is the number of
keys (the decoding shape, a cross pattern). A backend that cannot take the inputs is not
timed; its row carries the reason (the backend's own ``decline_reason``, or the benchmark's:
compiled backends unless asked for, backends that materialize Nq x Nk scores once that is
larger than ``max_scores``). Two extra rows per length measure the library itself: ``auto``
(dispatch picks the backend) and ``torch / F.sdpa`` (the raw PyTorch call, no attnzoo).

The runner returns rows and never prints; ``attnzoo bench`` renders them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

import torch

from ..errors import AttnZooError
from ..registry import Backend, Mechanism, Problem, get, list_mechanisms
from .timing import Timing, time_call

__all__ = ["BASELINE", "EfficiencyConfig", "Case", "Row", "plan_cases", "run_efficiency"]

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

    lengths: tuple[int, ...] = (256, 1024, 4096)
    batch: int = 1
    heads: int = 8
    kv_heads: Optional[int] = None  # None: as many as query heads; fewer: GQA/MQA
    head_dim: int = 64
    dtype: torch.dtype = torch.float32
    device: str = "cpu"
    causal: bool = False
    mechanisms: Optional[tuple[str, ...]] = None  # None: every registered mechanism
    budget_s: float = 0.5
    max_repeats: int = 50
    include_compiled: bool = False
    # Nq * Nk above which score-materializing backends (the references, the O(Nq*Nk) split) are
    # skipped: at 4096^2 one reference call takes seconds and would dominate the quick run
    max_scores: int = 2048 * 2048
    mode: str = "forward"  # or "train": forward + backward
    queries: Optional[int] = None  # None: Nq = N (self); else Nq fixed, N keys (cross)
    # a spatial grid (e.g. (128, 128)): mechanisms with that many spatial axes get (B, H, *grid, D),
    # the others (and the SDPA baseline) its N = prod(grid) tokens flattened
    spatial: Optional[tuple[int, ...]] = None
    backends: Optional[tuple[str, ...]] = None  # None: every backend of each mechanism
    # parameter overrides (e.g. {"kernel_size": 13}), applied to the mechanisms that take them
    overrides: tuple[tuple[str, Any], ...] = ()

    @property
    def pattern(self) -> str:
        """The CAB pattern timed: causal or not, self or (with ``queries``) cross."""
        return ("causal" if self.causal else "noncausal") + ("_self" if self.queries is None else "_cross")

    def q_len(self, length: int) -> int:
        return length if self.queries is None else self.queries


@dataclass(frozen=True)
class Case:
    """One mechanism x backend x length; ``skip`` is set when it is known in advance not to run."""

    mechanism: str
    backend: str
    length: int
    skip: Optional[str] = None


@dataclass(frozen=True)
class Row:
    """The outcome of one case: a timing and its ratio to the baseline, or why it was skipped."""

    mechanism: str
    backend: str
    length: int
    timing: Optional[Timing] = None
    ratio: Optional[float] = None
    note: str = ""

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


def _static_skip(mech: Mechanism, backend: Backend, length: int, config: EfficiencyConfig) -> Optional[str]:
    """A reason known before any tensor exists, or None."""
    if config.pattern not in mech.patterns:
        return f"no {config.pattern} pattern"
    if backend.compiles and not config.include_compiled:
        return "torch.compile per shape (~20 s each on CPU): pass --include-compiled"
    if backend.materializes_scores and config.q_len(length) * length > config.max_scores:
        return f"materializes Nq x Nk scores: only up to Nq * Nk = {config.max_scores}"
    if config.mode == "train" and not backend.autograd:
        return "forward only"
    return None


def plan_cases(config: EfficiencyConfig) -> list[Case]:
    """Every mechanism x backend x length, ordered by length, then mechanism, then backend."""
    mechs = _selected_mechanisms(config)
    cases = []
    for n in config.lengths:
        for m in mechs:
            chosen = [b for b in m.backends.values() if config.backends is None or b.name in config.backends]
            cases += [Case(m.name, b.name, n, _static_skip(m, b, n, config)) for b in chosen]
            if m.name == BASELINE[0]:
                cases += [Case(m.name, AUTO, n), Case(*RAW_TORCH, n)]
    return cases


# --------------------------------------------------------------------------------------------
# running them
# --------------------------------------------------------------------------------------------
def _inputs(config: EfficiencyConfig, length: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(length)
    tokens = config.spatial if config.spatial is not None else (length,)
    kv_shape = (config.batch, config.kv_heads or config.heads, *tokens, config.head_dim)
    q_shape = (config.batch, config.heads, *(tokens if config.queries is None else (config.queries,)), config.head_dim)
    q, k, v = (torch.randn(s, generator=gen, dtype=torch.float32) for s in (q_shape, kv_shape, kv_shape))
    train = config.mode == "train"
    return tuple(t.to(device=config.device, dtype=config.dtype).requires_grad_(train) for t in (q, k, v))  # type: ignore[return-value]


def _runner(forward: Callable[[], Any], config: EfficiencyConfig, qkv: tuple[torch.Tensor, ...]) -> Callable[[], Any]:
    """What one timed repeat does: the forward, or the forward and the backward."""
    if config.mode != "train":
        return forward
    gen = torch.Generator().manual_seed(1)

    def train_step() -> Any:
        out = forward()
        out = out[0] if isinstance(out, tuple) else out
        grad = torch.randn(out.shape, generator=gen, dtype=torch.float32).to(out)
        return torch.autograd.grad(out, qkv, grad)

    return train_step


def _timed(forward: Callable[[], Any], config: EfficiencyConfig, qkv: tuple[torch.Tensor, ...]) -> Timing:
    step = _runner(forward, config, qkv)
    context = torch.enable_grad() if config.mode == "train" else torch.inference_mode()
    with context:
        return time_call(step, budget_s=config.budget_s, max_repeats=config.max_repeats, device=config.device)


def _params(mech: Mechanism, problem: Problem, config: EfficiencyConfig) -> dict[str, Any]:
    """The mechanism's plain, repeatable parameters for the timed pattern (no random options),
    with the config's overrides of the parameters it has."""
    params = mech.example_params(problem, config.pattern)
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


def _time_case(
    mech: Mechanism, backend: Backend, qkv: tuple[torch.Tensor, ...], config: EfficiencyConfig
) -> tuple[Optional[Timing], str]:
    """Time one backend on the inputs: ``(timing, note)`` or ``(None, why it did not run)``."""
    q, k, v = _laid_out(qkv, config, mech)
    try:
        problem = mech.describe(q, k, v)
        params = _params(mech, problem, config)
        bound = mech.bind(problem, params)
    except AttnZooError as err:
        return None, f"inputs refused: {err}"
    reason = backend.decline_reason(problem, bound)
    if reason is not None:
        return None, f"declines: {reason}"
    note = _dispatch_note(mech, backend, problem, bound)
    return _guarded(lambda: mech(q, k, v, backend=backend.name, **params), config, qkv, note)


def _guarded(forward: Callable[[], Any], config: EfficiencyConfig, qkv: tuple[torch.Tensor, ...], note: str) -> tuple[Optional[Timing], str]:
    try:
        return _timed(forward, config, qkv), note
    except Exception as err:  # noqa: BLE001 - one failing backend must not end the benchmark
        return None, f"error: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"


def _time_auto(qkv: tuple[torch.Tensor, ...], config: EfficiencyConfig) -> tuple[Optional[Timing], str]:
    """``attnzoo.attention`` with no backend: the cost of validation and dispatch included."""
    mech = get(BASELINE[0])
    q, k, v = _laid_out(qkv, config, mech)
    problem = mech.describe(q, k, v)
    params = _params(mech, problem, config)
    chosen = mech.select(problem, mech.bind(problem, params)).name
    return _guarded(lambda: mech(q, k, v, **params), config, qkv, f"dispatch picks {chosen}")


def _time_raw_torch(qkv: tuple[torch.Tensor, ...], config: EfficiencyConfig) -> tuple[Optional[Timing], str]:
    """torch.nn.functional.scaled_dot_product_attention called directly: no attnzoo at all."""
    q, k, v = _laid_out(qkv, config)
    causal = config.causal
    if causal and q.shape[2] != k.shape[2]:
        return None, "raw SDPA's is_causal is top-left aligned; attnzoo's default is bottom-right"
    gqa = q.shape[1] != k.shape[1]
    return _guarded(
        lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa), config, qkv, "no attnzoo"
    )


def _baseline(qkv: tuple[torch.Tensor, ...], config: EfficiencyConfig) -> tuple[Optional[Timing], str]:
    mech_name, backend_name = BASELINE
    mech = get(mech_name)
    return _time_case(mech, mech.backends[backend_name], qkv, config)


def run_efficiency(
    config: EfficiencyConfig,
    on_case: Optional[Callable[[Case], None]] = None,
    on_start: Optional[Callable[[Case], None]] = None,
) -> list[Row]:
    """Run every case of :func:`plan_cases`; ``on_start``/``on_case`` are called before/after each.

    The baseline is timed once per length, first, and reused as its own row (ratio 1).
    """
    cases = plan_cases(config)
    rows: list[Row] = []
    for length in config.lengths:
        qkv = _inputs(config, length)
        base = _baseline(qkv, config)
        for case in (c for c in cases if c.length == length):
            if on_start is not None:
                on_start(case)
            rows.append(_run_case(case, qkv, base, config))
            if on_case is not None:
                on_case(case)
        del qkv
    return rows


def _run_case(
    case: Case, qkv: tuple[torch.Tensor, ...], base: tuple[Optional[Timing], str], config: EfficiencyConfig
) -> Row:
    if case.skip is not None:
        return Row(case.mechanism, case.backend, case.length, note=case.skip)
    if (case.mechanism, case.backend) == BASELINE:
        timing, note = base
    elif case.backend == AUTO:
        timing, note = _time_auto(qkv, config)
    elif (case.mechanism, case.backend) == RAW_TORCH:
        timing, note = _time_raw_torch(qkv, config)
    else:
        mech = get(case.mechanism)
        timing, note = _time_case(mech, mech.backends[case.backend], qkv, config)
    return Row(case.mechanism, case.backend, case.length, timing, _ratio(timing, base[0]), note)


def _ratio(timing: Optional[Timing], base: Optional[Timing]) -> Optional[float]:
    if timing is None or base is None or base.median_ms <= 0:
        return None
    return timing.median_ms / base.median_ms
