"""The approximation-error benchmark (catalog B6): how far each mechanism is from softmax attention.

What is measured, per (mechanism, parameters, source of q/k/v, layer or length):

* ``rel_error`` = ||O - O*||_F / ||O*||_F over the real query rows, where O is the mechanism's
  output (the backend automatic dispatch picks, in the benchmark dtype) and O* is exact softmax
  attention softmax(q k^T / sqrt(D)) v computed in float64 by ``softmax``'s reference backend;
* ``kl`` = mean over real query rows of KL(p* || p), p* the exact softmax row and p the
  mechanism's attention row, where the mechanism has rows (see below); ``kl_reverse`` = mean
  KL(p || p*), which stays finite for sparse patterns whose rows drop keys (KL(p* || p) = inf there);
* the mechanism's time on the same inputs (median and IQR of :func:`~attnzoo.bench.timing.time_call`)
  and softmax's (``softmax_ms``, automatic dispatch), so the report can plot error against speed.

Which mechanisms: every registered mechanism with the ``noncausal_self`` pattern and the token
layout (BERT is bidirectional self-attention over a token sequence). A mechanism whose registry
entry says ``exact=False`` approximates its own formula (e.g. random features); one with
``exact=True`` but another formula than softmax (a feature map, a window, agents) is exact
against its own reference and still an approximation *of softmax attention*: B6 measures the
latter for every mechanism other than softmax, and records ``exact`` and ``family`` in the metrics so
a report can separate them. ``softmax`` itself is measured too (its float32 error against the
float64 reference is the floor of the table). Parameters are the mechanism's own
``example_params(problem, "noncausal_self")`` (seeded, so learnable parts drawn at random are
the same in every run), plus, for a mechanism that has a parameter named in
:attr:`ErrorConfig.variants` (by default ``feature_map``), one case per listed value: the
feature maps of the linear family side by side, with no per-mechanism code.

Attention rows: a mechanism whose output is linear in v, O = A v, has rows A; they are read by
probing with one-hot values (v = I, so the output is A), for any mechanism and without access to its
internals, then checked: A v must reproduce the output (else the output is not linear in v and
no row is defined), and each row must be a distribution (entries >= 0 and summing to 1 within
rounding; a normalized feature map with negative features, e.g. the identity, gives signed rows:
no KL). The probe feeds the identity a value-width of columns at a time (Nk / Dv calls of the ordinary
shape), so it runs up to :attr:`ErrorConfig.kl_max_len` keys.

Sources: ``random`` (q, k, v with i.i.d. N(0, 1) entries at each of ``lengths``, the usual
synthetic setting) and ``minilm`` (the q, k, v each layer of all-MiniLM-L6-v2 computes on
:data:`~attnzoo.bench.minilm.SENTENCES`, padded into one batch; see :mod:`attnzoo.bench.minilm`).
Padding is honoured: errors and KL are over real query rows only; a mechanism with a
``key_padding_mask`` parameter runs on the padded batch with the mask, any other runs each sentence
alone on its real tokens. Published comparisons of approximations (e.g. the Performer paper's
output-error plots, Choromanski et al., 2021) use synthetic inputs or one model; none of the
anchor benchmarks (Zoology, CAB) reports this error.

The runner returns rows and never prints; it writes each case to a
:class:`~attnzoo.bench.results.ResultStore` (kind ``"error"``) when given one.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import torch
from torch import Tensor

from ..errors import AttnZooError
from ..registry import Mechanism, Problem, get, list_mechanisms
from .machine import machine_info
from .results import Result, ResultStore, case_key
from .timing import Timing, time_call

__all__ = [
    "BASELINE",
    "PATTERN",
    "SOURCES",
    "ErrorConfig",
    "ErrorRow",
    "Sample",
    "applicable",
    "attention_rows",
    "mean_kl",
    "measure",
    "relative_error",
    "run_error",
    "table",
    "random_samples",
    "minilm_samples",
]

#: The exact mechanism every output is compared with.
BASELINE = "softmax"
#: BERT's pattern, and the one every mechanism here is run in.
PATTERN = "noncausal_self"
SOURCES = ("random", "minilm")
#: A row is a distribution when its entries are >= -ROW_TOL and its sum within ROW_TOL of 1.
ROW_TOL = 1e-4
#: A v must reproduce the output to this relative error for the rows A to count as the mechanism's.
LINEARITY_TOL = 1e-3


@dataclass(frozen=True)
class ErrorConfig:
    """What to measure: sources, random shapes, MiniLM sentences, mechanisms, variants, timing."""

    sources: tuple[str, ...] = SOURCES
    lengths: tuple[int, ...] = (128, 512, 2048)  # random inputs: N (self-attention, Nq = Nk)
    batch: int = 1
    heads: int = 4
    head_dim: int = 64
    seed: int = 0
    mechanisms: Optional[tuple[str, ...]] = None  # None: every applicable registered mechanism
    # a parameter name and values: one extra case per value for each mechanism that has the parameter
    variants: tuple[tuple[str, tuple[Any, ...]], ...] = (("feature_map", ("elu", "relu", "softmax_kernel", "taylor")),)
    sentences: Optional[tuple[str, ...]] = None  # None: minilm.SENTENCES
    layers: Optional[tuple[int, ...]] = None  # None: every layer of the model
    # attention rows are probed up to this many keys (the probe costs ~ Nk / Dv ordinary calls)
    kl_max_len: int = 512
    probe_budget_s: float = 10.0  # ... and only when ~Nk / Dv calls fit in this (slow mechanisms skip KL)
    dtype: torch.dtype = torch.float32
    device: str = "cpu"
    budget_s: float = 0.2
    max_repeats: int = 20


@dataclass
class Sample:
    """One set of inputs: q, k, v (B, H, N, D), ``padding`` (B, N) True = padding token."""

    source: str
    q: Tensor
    k: Tensor
    v: Tensor
    padding: Tensor
    layer: Optional[int] = None

    @property
    def n_tokens(self) -> int:
        """Real tokens (= real query rows per head)."""
        return int((~self.padding).sum())

    @property
    def length(self) -> int:
        return self.q.shape[2]

    @property
    def label(self) -> str:
        return f"{self.source} layer {self.layer}" if self.layer is not None else f"{self.source} N={self.length}"

    def segments(self) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        """Each batch entry alone on its real tokens: (1, H, n_i, D) views."""
        for i, n in enumerate((~self.padding).sum(-1).tolist()):
            yield self.q[i : i + 1, :, :n], self.k[i : i + 1, :, :n], self.v[i : i + 1, :, :n]


@dataclass
class ErrorRow:
    """The outcome of one case; ``note`` says why a measurement is missing."""

    mechanism: str
    variant: str
    source: str
    layer: Optional[int]
    length: int
    n_tokens: int
    backend: Optional[str] = None
    params: dict[str, Any] = field(default_factory=dict)
    rel_error: Optional[float] = None
    kl: Optional[float] = None
    kl_reverse: Optional[float] = None
    timing: Optional[Timing] = None
    softmax_ms: Optional[float] = None
    note: str = ""


# --------------------------------------------------------------------------------------------
# the measures
# --------------------------------------------------------------------------------------------
def relative_error(outputs: Sequence[Tensor], exact: Sequence[Tensor]) -> float:
    """||O - O*||_F / ||O*||_F over all the pieces together (float64 arithmetic)."""
    num = sum(float((o.double() - e.double()).pow(2).sum()) for o, e in zip(outputs, exact))
    den = sum(float(e.double().pow(2).sum()) for e in exact)
    return math.sqrt(num / den) if den > 0 else float("nan")


def _kl_terms(p: Tensor, q: Tensor) -> Tensor:
    """Per-row KL(p || q) = sum_j p_j (log p_j - log q_j); 0 log 0 = 0, p_j > 0 = q_j gives inf."""
    p, q = p.double(), q.double().clamp_min(0.0)
    terms = torch.where(p > 0, p * (torch.log(p) - torch.log(q)), torch.zeros_like(p))
    return terms.sum(-1)


def mean_kl(p_rows: Sequence[Tensor], q_rows: Sequence[Tensor]) -> float:
    """Mean over every row of every piece of KL(p || q) (inf if some q drops mass p keeps)."""
    total = sum(float(_kl_terms(p, q).sum()) for p, q in zip(p_rows, q_rows))
    count = sum(p.shape[:-1].numel() for p in p_rows)
    return total / count


def attention_rows(
    call: Callable[[Tensor, Tensor, Tensor], Tensor], q: Tensor, k: Tensor, v: Tensor, out: Tensor, *, columns: Optional[int] = None
) -> tuple[Optional[Tensor], str]:
    """The rows A (B, H, Nq, Nk) with ``call(q, k, v) = A v``, read by probing with v = I.

    The identity is fed ``columns`` key columns at a time (default: v's width), so each probe
    call has the shape of an ordinary call: a mechanism whose cost grows with the value width
    (an FFT per value channel, a per-channel state) is not asked for an N-wide value at once.
    Returns ``(A, "")``, or ``(None, why)`` when the output is not A v (not linear in v) or the
    rows are not probability distributions (KL is then undefined).
    """
    nk = k.shape[2]
    width = columns or v.shape[-1]
    eye = torch.eye(nk, dtype=v.dtype, device=v.device).expand(v.shape[0], v.shape[1], nk, nk)
    try:
        parts = [call(q, k, eye[..., start : start + width]) for start in range(0, nk, width)]
    except (AttnZooError, RuntimeError) as err:
        return None, f"no rows: one-hot values refused ({_first_line(err)})"
    rows = torch.cat([p[0] if isinstance(p, tuple) else p for p in parts], dim=-1)
    group = q.shape[1] // v.shape[1]
    rebuilt = rows.double() @ v.double().repeat_interleave(group, dim=1)
    mismatch = relative_error([rebuilt], [out])
    if not mismatch <= LINEARITY_TOL:
        return None, f"no rows: output is not A v (mismatch {mismatch:.1e})"
    low, sums = float(rows.min()), rows.double().sum(-1)
    if low < -ROW_TOL or float((sums - 1).abs().max()) > ROW_TOL:
        return None, f"no KL: rows are not distributions (min {low:.2g}, sums {float(sums.min()):.3g}..{float(sums.max()):.3g})"
    return rows, ""


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"


# --------------------------------------------------------------------------------------------
# which mechanisms and parameters
# --------------------------------------------------------------------------------------------
def applicable(mech: Mechanism) -> bool:
    """Runs bidirectional self-attention over a token sequence (what B6 compares)."""
    return PATTERN in mech.patterns and 1 in mech.spatial_dims


def _selected(config: ErrorConfig) -> list[Mechanism]:
    mechs = list_mechanisms() if config.mechanisms is None else [get(n) for n in config.mechanisms]
    return [m for m in mechs if applicable(m)]


def _example_params(mech: Mechanism, problem: Problem, seed: int) -> dict[str, Any]:
    """The mechanism's plain parameters for the pattern; random parts seeded (repeatable)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return mech.example_params(problem, PATTERN)


def _variants(mech: Mechanism, config: ErrorConfig) -> list[tuple[str, dict[str, Any]]]:
    """``(label, overrides)``: the example parameters, then one case per listed value of each
    variant parameter the mechanism has and accepts (a value equal to its own choice is not
    repeated; a value it refuses, e.g. a feature map it does not offer, is left out)."""
    probe = _dummy_problem(config)
    base = _example_params(mech, probe, config.seed)
    defaults = {p.name: p.default for p in mech.params}
    out: list[tuple[str, dict[str, Any]]] = [("default", {})]
    for name, values in config.variants:
        if name not in defaults:
            continue
        current = base.get(name, defaults[name])
        for value in values:
            if not (isinstance(current, str) and current == value) and _accepts(mech, probe, {**base, name: value}):
                out.append((f"{name}={value}", {name: value}))
    return out


def _accepts(mech: Mechanism, problem: Problem, params: Mapping[str, Any]) -> bool:
    try:
        mech.bind(problem, params)
    except AttnZooError:
        return False
    return True


def _dummy_problem(config: ErrorConfig) -> Problem:
    x = torch.empty(1, config.heads, 16, config.head_dim, dtype=config.dtype, device=config.device)
    return get(BASELINE).describe(x, x, x)


# --------------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------------
def random_samples(config: ErrorConfig) -> Iterator[Sample]:
    """q, k, v with i.i.d. N(0, 1) entries, one sample per length (seeded by seed and length)."""
    for n in config.lengths:
        gen = torch.Generator().manual_seed(config.seed * 1_000_003 + n)
        shape = (config.batch, config.heads, n, config.head_dim)
        q, k, v = (torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(3))
        padding = torch.zeros(config.batch, n, dtype=torch.bool)
        yield Sample("random", q, k, v, padding)


def minilm_samples(config: ErrorConfig) -> Iterator[Sample]:
    """The q, k, v of each layer of all-MiniLM-L6-v2 (exact softmax) on the configured sentences."""
    from . import minilm

    sentences = config.sentences if config.sentences is not None else minilm.SENTENCES
    for layer, captured in enumerate(minilm.load().capture_qkv(sentences)):
        if config.layers is None or layer in config.layers:
            q, k, v = (t.double() for t in captured[:3])
            yield Sample("minilm", q, k, v, captured.padding, layer)


def _samples(config: ErrorConfig) -> Iterator[Sample]:
    for source in config.sources:
        if source == "random":
            yield from random_samples(config)
        elif source == "minilm":
            yield from minilm_samples(config)
        else:
            raise ValueError(f"unknown source {source!r}; choose from {', '.join(SOURCES)}")


def _planned_samples(config: ErrorConfig) -> int:
    count = 0
    for source in config.sources:
        if source == "random":
            count += len(config.lengths)
        elif source == "minilm":
            count += len(config.layers) if config.layers is not None else _minilm_layers()
    return count


def _minilm_layers() -> int:
    """The model's layer count from its config.json (6 for all-MiniLM-L6 when it cannot be read)."""
    from . import minilm

    try:
        return minilm.BertConfig.read(minilm.model_dir()).layers
    except (ImportError, OSError):
        return 6


# --------------------------------------------------------------------------------------------
# one case
# --------------------------------------------------------------------------------------------
@dataclass
class _Exact:
    """Softmax on one sample: float64 outputs and rows per real segment, and its time."""

    outputs: list[Tensor]
    rows: Optional[list[Tensor]]
    timing: Optional[Timing]


class _Runner:
    """Runs one mechanism on one sample the way the padding allows, in the benchmark dtype."""

    def __init__(self, mech: Mechanism, overrides: Mapping[str, Any], sample: Sample, config: ErrorConfig):
        self.mech, self.overrides, self.sample, self.config = mech, dict(overrides), sample, config
        self.masks_keys = any(p.name == "key_padding_mask" for p in mech.params)
        self.batched = self.masks_keys or not bool(sample.padding.any())

    def _cast(self, *ts: Tensor) -> tuple[Tensor, ...]:
        return tuple(t.to(device=self.config.device, dtype=self.config.dtype) for t in ts)

    def params(self, q: Tensor, k: Tensor, v: Tensor, padding: Optional[Tensor] = None) -> dict[str, Any]:
        params = _example_params(self.mech, self.mech.describe(q, k, v), self.config.seed)
        params.update(self.overrides)
        if padding is not None and self.masks_keys and bool(padding.any()):
            params["key_padding_mask"] = padding.to(self.config.device)
        return params

    def pieces(self) -> list[tuple[Tensor, Tensor, Tensor, Optional[Tensor]]]:
        """(q, k, v, padding) per call: the whole batch, or each sentence alone."""
        if self.batched:
            s = self.sample
            return [(*self._cast(s.q, s.k, s.v), s.padding)]
        return [(*self._cast(*seg), None) for seg in self.sample.segments()]

    def backend(self) -> str:
        q, k, v, padding = self.pieces()[0]
        problem, bound = self.mech.prepare(q, k, v, self.params(q, k, v, padding))
        return self.mech.select(problem, bound).name

    def outputs(self) -> list[Tensor]:
        """The real query rows of each piece's output, (1|B, H, n, Dv) per sentence."""
        outs = []
        for q, k, v, padding in self.pieces():
            out = self.mech(q, k, v, **self.params(q, k, v, padding))
            outs.append(out[0] if isinstance(out, tuple) else out)
        return _real_rows(outs, self.sample) if self.batched else outs

    def forward(self) -> Callable[[], Any]:
        """The timed call: every piece, parameters prepared beforehand."""
        calls = [(q, k, v, self.params(q, k, v, padding)) for q, k, v, padding in self.pieces()]
        return lambda: [self.mech(q, k, v, **p) for q, k, v, p in calls]

    def rows(self, outputs: Sequence[Tensor]) -> tuple[Optional[list[Tensor]], str]:
        """The attention rows of each sentence's real queries, or why there are none."""
        if self.sample.length > self.config.kl_max_len:
            return None, f"no KL: more than kl_max_len = {self.config.kl_max_len} keys"
        found = []
        for (q, k, v), out in zip(self.sample.segments(), outputs):
            q, k, v = self._cast(q, k, v)
            params = self.params(q, k, v)
            rows, why = attention_rows(lambda a, b, c, p=params: self.mech(a, b, c, **p), q, k, v, out)
            if rows is None:
                return None, why
            found.append(rows)
        return found, ""


def _real_rows(outs: list[Tensor], sample: Sample) -> list[Tensor]:
    """Split batched outputs into each sentence's real query rows (padding rows dropped)."""
    out = outs[0]
    return [out[i : i + 1, :, :n] for i, n in enumerate((~sample.padding).sum(-1).tolist())]


def _exact(sample: Sample, config: ErrorConfig) -> _Exact:
    """Softmax in float64 (reference backend) per sentence, its rows, and its time in the benchmark dtype."""
    softmax = get(BASELINE)
    outputs, rows = [], []
    for q, k, v in sample.segments():
        outputs.append(softmax(q, k, v, backend="reference"))
        if sample.length <= config.kl_max_len:
            scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
            rows.append(torch.softmax(scores, dim=-1))
    runner = _Runner(softmax, {}, sample, config)
    with torch.inference_mode():
        timing = time_call(runner.forward(), budget_s=config.budget_s, max_repeats=config.max_repeats, device=config.device)
    return _Exact(outputs, rows if rows else None, timing)


def _measure(mech: Mechanism, variant: tuple[str, dict[str, Any]], sample: Sample, exact: _Exact, config: ErrorConfig) -> ErrorRow:
    label, overrides = variant
    row = ErrorRow(mech.name, label, sample.source, sample.layer, sample.length, sample.n_tokens, softmax_ms=_ms(exact.timing))
    runner = _Runner(mech, overrides, sample, config)
    try:
        q, k, v, padding = runner.pieces()[0]
        row.params = runner.params(q, k, v, padding)
        row.backend = runner.backend()
        with torch.inference_mode():
            started = time.perf_counter()
            outputs = runner.outputs()
            first_ms = (time.perf_counter() - started) * 1e3
            row.rel_error = relative_error(outputs, exact.outputs)
            row.kl, row.kl_reverse, row.note = _kls(runner, outputs, exact, first_ms)
            row.timing = _timing(runner, first_ms, config)
    except Exception as err:  # noqa: BLE001 - one failing mechanism must not end the benchmark
        row.note = ("refused: " if isinstance(err, AttnZooError) else "error: ") + _first_line(err)
    row.params.pop("key_padding_mask", None)
    return row


def _timing(runner: _Runner, first_ms: float, config: ErrorConfig) -> Timing:
    """The timed calls; a mechanism whose first call alone took 10 budgets is not called again:
    that call's time is reported as one repeat (cold, so an upper bound)."""
    if first_ms > 10e3 * config.budget_s:
        return Timing(first_ms, first_ms, first_ms, 1)
    return time_call(runner.forward(), budget_s=config.budget_s, max_repeats=config.max_repeats, device=config.device)


def _kls(runner: _Runner, outputs: Sequence[Tensor], exact: _Exact, first_ms: float) -> tuple[Optional[float], Optional[float], str]:
    config = runner.config
    if exact.rows is None:
        return None, None, f"no KL: more than kl_max_len = {config.kl_max_len} keys"
    probe_s = first_ms / 1e3 * math.ceil(runner.sample.length / runner.sample.v.shape[-1])
    if probe_s > config.probe_budget_s:
        return None, None, f"no KL: the probe would take ~{probe_s:.0f} s (> probe_budget_s = {config.probe_budget_s:g})"
    rows, why = runner.rows(outputs)
    if rows is None:
        return None, None, why
    return mean_kl(exact.rows, rows), mean_kl(rows, exact.rows), ""


def _ms(timing: Optional[Timing]) -> Optional[float]:
    return None if timing is None else timing.median_ms


# --------------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------------
def _sentences_digest(config: ErrorConfig) -> Optional[str]:
    if "minilm" not in config.sources:
        return None
    from . import minilm

    text = "\n".join(config.sentences if config.sentences is not None else minilm.SENTENCES)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _identity(mech: Mechanism, variant: str, sample: Sample, config: ErrorConfig) -> dict[str, Any]:
    """What names a case for ``--resume``: same mechanism, variant, inputs, dtype and device."""
    return {
        "mechanism": mech.name,
        "variant": variant,
        "source": sample.source,
        "layer": sample.layer,
        "shape": list(sample.q.shape),
        "seed": config.seed,
        "sentences": _sentences_digest(config) if sample.source == "minilm" else None,
        "dtype": str(config.dtype),
        "device": config.device,
    }


def _result(row: ErrorRow, mech: Mechanism, sample: Sample, key: str, config: ErrorConfig) -> Result:
    b, h, n, d = sample.q.shape
    timing = row.timing
    return Result(
        kind="error",
        mechanism=row.mechanism,
        case_key=key,
        backend=row.backend,
        pattern=PATTERN,
        mode="forward",
        dtype=str(config.dtype).replace("torch.", ""),
        device=config.device,
        batch=b,
        heads=h,
        kv_heads=sample.k.shape[1],
        q_len=n,
        kv_len=sample.k.shape[2],
        head_dim=d,
        params=row.params,
        median_ms=None if timing is None else timing.median_ms,
        q1_ms=None if timing is None else timing.q1_ms,
        q3_ms=None if timing is None else timing.q3_ms,
        repeats=None if timing is None else timing.repeats,
        metrics={
            "rel_error": row.rel_error,
            "kl": row.kl,
            "kl_reverse": row.kl_reverse,
            "source": row.source,
            "layer": row.layer,
            "n_tokens": row.n_tokens,
            "variant": row.variant,
            "softmax_ms": row.softmax_ms,
            "exact": mech.exact,
            "family": mech.family,
        },
        note=row.note,
    )


def measure(sample: Sample, config: ErrorConfig) -> list[ErrorRow]:
    """Every applicable mechanism x variant of ``config`` on one sample (no store, no resume)."""
    exact = _exact(sample, config)
    return [_measure(m, v, sample, exact, config) for m in _selected(config) for v in _variants(m, config)]


def run_error(
    config: ErrorConfig,
    store: Optional[ResultStore] = None,
    *,
    resume: bool = False,
    on_case: Optional[Callable[[int, int, str], None]] = None,
) -> list[ErrorRow]:
    """Measure every applicable mechanism x variant on every sample; rows in the order run.

    With ``store`` each case is written as it finishes (one transaction each) under a new run of
    kind ``"error"``; with ``resume`` cases already in the store are skipped (not returned).
    ``on_case(done, total, description)`` is called after each case (for a progress bar).
    """
    cases = [(m, v) for m in _selected(config) for v in _variants(m, config)]
    total, done = len(cases) * _planned_samples(config), 0
    run_id = store.start_run("error", _config_json(config), machine_info(config.device)) if store is not None else None
    rows: list[ErrorRow] = []
    for sample in _samples(config):
        keys = [case_key("error", _identity(m, v[0], sample, config)) for m, v in cases]
        todo = [not (resume and store is not None and store.done(key)) for key in keys]
        exact = _exact(sample, config) if any(todo) else None
        for (mech, variant), key, needed in zip(cases, keys, todo):
            done += 1
            if needed and exact is not None:
                row = _measure(mech, variant, sample, exact, config)
                rows.append(row)
                if store is not None and run_id is not None:
                    store.add(run_id, _result(row, mech, sample, key, config))
            if on_case is not None:
                on_case(done, total, f"{mech.name} {variant[0]} on {sample.label}")
    if store is not None and run_id is not None:
        store.finish_run(run_id)
    return rows


def table(rows: Sequence[ErrorRow]) -> list[dict[str, Any]]:
    """One line per (mechanism, variant) for a report: ``random`` {N: rel_error}, ``minilm``
    {layer: rel_error} and its mean over layers, the same for KL, and the first note met.

    Works on :class:`ErrorRow` objects (a run's return value); the report reads the same numbers
    from the store's ``metrics``.
    """
    lines: dict[tuple[str, str], dict[str, Any]] = {}
    for r in rows:
        line = lines.setdefault(
            (r.mechanism, r.variant),
            {"mechanism": r.mechanism, "variant": r.variant, "random": {}, "random_kl": {}, "minilm": {}, "minilm_kl": {}, "note": ""},
        )
        where = r.length if r.source == "random" else r.layer
        source = "random" if r.source == "random" else "minilm"
        line[source][where] = r.rel_error
        line[source + "_kl"][where] = r.kl
        line["note"] = line["note"] or r.note
    for line in lines.values():
        line["minilm_mean"] = _mean(line["minilm"].values())
        line["minilm_kl_mean"] = _mean(line["minilm_kl"].values())
    return list(lines.values())


def _mean(values: Any) -> Optional[float]:
    found = [v for v in values if v is not None]
    return sum(found) / len(found) if found else None


def _config_json(config: ErrorConfig) -> dict[str, Any]:
    """The configuration as stored with the run (dtype as text, the sentences by digest)."""
    out: dict[str, Any] = {name: getattr(config, name) for name in config.__dataclass_fields__}
    out["dtype"] = str(config.dtype)
    out["sentences"] = _sentences_digest(config)
    return out
