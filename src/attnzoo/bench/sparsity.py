"""Error against density for the content-sparse mechanisms (issue 13's sweep; catalog B6 extended).

For every registered mechanism with a ``sparsity_params`` hook (the S family: top-k, MoBA,
XAttention, ...) and each requested share of keys, on random q, k, v and on the q, k, v each layer
of all-MiniLM-L6-v2 computes (mechanisms on 2D/3D token grids, e.g. BiFormer's routing, run on the
random inputs laid out row-major on a grid, :func:`grid_shape`; a sequence of sentences has no grid):

* ``density``: the (query, key) pairs the mechanism's selection kept, over the pairs exact attention
  uses (the causal triangle for causal-only mechanisms), real tokens only;
* ``mass``: the mean over real query rows of the exact softmax mass on the kept keys (1 = nothing of
  the exact attention was dropped), and ``kl`` = mean -log(mass) = KL(p || p*) for a selection
  that renormalizes exact attention over its kept keys (the mechanisms here do);
* ``rel_error`` = ||O - O*||_F / ||O*||_F over the real query rows.

The selection and output are the mechanism's reference backend's in float64 (the conformance suite
holds every fast backend to it), read through the reference's tap (:data:`attnzoo.kernels.reference.TAP`):
the kept pairs are the scores the reference did not mask. No public project publishes this curve;
papers report task scores at one sparsity. ``attnzoo bench sparsity`` prints the table, stores each
case (kind ``"sparsity"``) in the results database for ``attnzoo report``, and can plot it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from torch import Tensor

from ..kernels import reference as _reference_kernel
from ..registry import Mechanism, get, list_mechanisms
from .error import ErrorConfig, Sample, minilm_samples, random_samples
from .machine import machine_info
from .results import case_key, config_json, Result, ResultStore

__all__ = ["SparsityConfig", "SparsityRow", "averaged", "grid_shape", "points", "sparse_mechanisms", "run_sparsity", "plot_sparsity"]

SHARES = (0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0)


@dataclass(frozen=True)
class SparsityConfig:
    """What to sweep: shares of keys, sources, random shapes, mechanisms."""

    shares: tuple[float, ...] = SHARES
    sources: tuple[str, ...] = ("random", "minilm")
    lengths: tuple[int, ...] = (1024,)
    batch: int = 1
    heads: int = 4
    head_dim: int = 64
    seed: int = 0
    mechanisms: Optional[tuple[str, ...]] = None  # None: every mechanism with sparsity_params
    layers: Optional[tuple[int, ...]] = None  # MiniLM layers (None: all)


@dataclass
class SparsityRow:
    mechanism: str
    source: str
    label: str
    share: float
    layer: Optional[int] = None
    params: dict[str, Any] = field(default_factory=dict)
    density: Optional[float] = None
    mass: Optional[float] = None
    kl: Optional[float] = None
    rel_error: Optional[float] = None
    note: str = ""


def sparse_mechanisms(config: SparsityConfig) -> list[Mechanism]:
    """The mechanisms swept: those with a ``sparsity_params`` hook."""
    if config.mechanisms is not None:
        return [get(name) for name in config.mechanisms]
    return [m for m in list_mechanisms() if m.sparsity_params is not None]


def grid_shape(n: int, dims: int) -> Optional[tuple[int, ...]]:
    """The most nearly cubic grid of ``dims`` axes holding exactly ``n`` tokens (largest axis
    first), or None when ``n`` has no such factorization with every axis >= 2."""
    if dims == 1:
        return (n,) if n >= 2 else None
    best: Optional[tuple[int, ...]] = None
    for first in range(2, n + 1):
        if n % first:
            continue
        rest = grid_shape(n // first, dims - 1)
        if rest is not None and first >= rest[0]:
            shape = (first, *rest)
            if best is None or max(shape) - min(shape) < max(best) - min(best):
                best = shape
    return best


def _layout(mech: Mechanism, sample: Sample) -> Optional[tuple[int, ...]]:
    """The token layout the mechanism runs the sample in: 1D when it can, else a grid (random only)."""
    if 1 in mech.spatial_dims:
        return (sample.length,)
    if sample.source != "random":
        return None
    return next((g for g in (grid_shape(sample.length, d) for d in sorted(mech.spatial_dims)) if g is not None), None)


def _samples(config: SparsityConfig) -> Iterator[Sample]:
    shapes = ErrorConfig(lengths=config.lengths, batch=config.batch, heads=config.heads, head_dim=config.head_dim, seed=config.seed, layers=config.layers)
    for source in config.sources:
        yield from (random_samples(shapes) if source == "random" else minilm_samples(shapes))


class _KeptTap:
    """The reference's masked scores: which pairs its selection kept (the tap protocol of attnzoo.hooks)."""

    def __init__(self) -> None:
        self.kept: Optional[Tensor] = None

    def scores(self, s: Tensor, k: Tensor, v: Tensor) -> Tensor:
        self.kept = s > float("-inf")
        return s

    def probs(self, p: Tensor) -> Tensor:
        return p


def _causal_only(mech: Mechanism) -> bool:
    return "noncausal_self" not in mech.patterns


def _visible(sample: Sample, causal: bool) -> Tensor:
    """(B, 1, N, N) bool: the pairs exact attention uses (real keys; causal: the past)."""
    n = sample.length
    visible = (~sample.padding)[:, None, None, :].expand(-1, 1, n, -1)
    if causal:
        visible = visible & torch.ones(n, n, dtype=torch.bool).tril()
    return visible


def _exact(sample: Sample, causal: bool) -> tuple[Tensor, Tensor]:
    """float64 exact attention (out, probabilities) of the padded batch."""
    s = (sample.q @ sample.k.transpose(-1, -2)) * sample.q.shape[-1] ** -0.5
    p = torch.softmax(s.masked_fill(~_visible(sample, causal), float("-inf")), dim=-1)
    return p @ sample.v, p


def _measure(mech: Mechanism, sample: Sample, share: float, exact: tuple[Tensor, Tensor]) -> SparsityRow:
    row = SparsityRow(mech.name, sample.source, sample.label, share, sample.layer)
    layout = _layout(mech, sample)
    if layout is None:
        row.note = f"runs on {'/'.join(f'{d}D' for d in mech.spatial_dims)} token grids: measured on random inputs only"
        return row
    b, h, n, _ = sample.q.shape
    q, k, v = (t.reshape(b, t.shape[1], *layout, t.shape[-1]) for t in (sample.q, sample.k, sample.v))
    params = dict(mech.sparsity_params(mech.describe(q, k, v), share))
    if "causal" in {p.name for p in mech.params} and not _causal_only(mech):
        params["causal"] = False
    if sample.padding.any():
        params["key_padding_mask"] = sample.padding
    row.params = {k: v for k, v in params.items() if not isinstance(v, Tensor)}  # (tensors: the padding, a learned predictor)
    tap = _KeptTap()
    previous, _reference_kernel.TAP = _reference_kernel.TAP, tap
    try:
        with torch.no_grad():
            out = mech(q, k, v, backend="reference", **params)
    except Exception as err:  # noqa: BLE001 - a refused case is a row with a note, not a failed sweep
        row.note = f"{type(err).__name__}: {str(err).splitlines()[0]}"
        return row
    finally:
        _reference_kernel.TAP = previous
    out = (out[0] if isinstance(out, tuple) else out).reshape(b, h, n, -1)
    exact_out, exact_p = exact
    real = ~sample.padding  # (B, N): real query rows
    diff = (out - exact_out).permute(0, 2, 1, 3)[real]
    row.rel_error = float(diff.norm() / exact_out.permute(0, 2, 1, 3)[real].norm())
    if tap.kept is None or tap.kept.numel() != b * h * n * n:
        row.note = "its reference has no softmax over exactly the input's keys (none, or pooled / extra keys): density and mass cannot be read"
        return row
    tap.kept = tap.kept.reshape(tap.kept.shape[0], tap.kept.shape[1], n, n)
    visible = _visible(sample, _causal_only(mech))
    kept = tap.kept & visible
    row.density = float(kept.expand_as(exact_p)[real[:, None, :].expand(-1, exact_p.shape[1], -1)].sum()) / float(
        visible.expand_as(exact_p)[real[:, None, :].expand(-1, exact_p.shape[1], -1)].sum()
    )
    mass = (exact_p * kept).sum(-1)[real[:, None, :].expand(-1, exact_p.shape[1], -1)]
    row.mass = float(mass.mean())
    row.kl = float((-mass.clamp_min(1e-300).log()).mean())
    return row


def run_sparsity(
    config: SparsityConfig, store: Optional[ResultStore] = None, on_case: Optional[Callable[[SparsityRow], None]] = None
) -> list[SparsityRow]:
    """Every swept mechanism x sample x share; returns the rows (never prints). With ``store``
    each case is written as it finishes, under a new run of kind ``"sparsity"``."""
    mechs = sparse_mechanisms(config)
    run_id = store.start_run("sparsity", config_json(config), machine_info("cpu")) if store is not None else None
    rows = []
    for sample in _samples(config):
        exacts = {causal: _exact(sample, causal) for causal in {_causal_only(m) for m in mechs}}
        for mech in mechs:
            for share in config.shares:
                row = _measure(mech, sample, share, exacts[_causal_only(mech)])
                rows.append(row)
                if store is not None and run_id is not None:
                    store.add(run_id, _result(row, sample, config))
                if on_case is not None:
                    on_case(row)
    if store is not None and run_id is not None:
        store.finish_run(run_id)
    return rows


def _result(row: SparsityRow, sample: Sample, config: SparsityConfig) -> Result:
    """One case as a stored result: the identity (mechanism, share, inputs) and the four measures."""
    b, h, n, d = sample.q.shape
    identity = {"mechanism": row.mechanism, "share": row.share, "source": row.source, "layer": row.layer, "shape": [b, h, n, d], "seed": config.seed}
    return Result(
        kind="sparsity",
        mechanism=row.mechanism,
        case_key=case_key("sparsity", identity),
        backend="reference",
        pattern="causal_self" if _causal_only(get(row.mechanism)) else "noncausal_self",
        mode="forward",
        dtype="float64",
        device="cpu",
        batch=b,
        heads=h,
        kv_heads=sample.k.shape[1],
        q_len=n,
        kv_len=sample.k.shape[2],
        head_dim=d,
        params={k: v for k, v in row.params.items() if not isinstance(v, Tensor)},
        metrics={"share": row.share, "source": row.source, "layer": row.layer, "density": row.density, "mass": row.mass, "kl": row.kl, "rel_error": row.rel_error},
        note=row.note,
    )


Point = tuple[str, str, float, float, float, float]  # (mechanism, source, share, density, mass, rel_error)


def averaged(points: Sequence[Point]) -> dict[tuple[str, str], list[tuple[float, float, float, float]]]:
    """(mechanism, source) -> [(density, mass, rel_error, share)] one per share, averaged over the
    source's samples (MiniLM's layers, the random lengths), sorted by density."""
    groups: dict[tuple[str, str, float], list[Point]] = {}
    for point in points:
        groups.setdefault(point[:3], []).append(point)
    lines: dict[tuple[str, str], list[tuple[float, float, float, float]]] = {}
    for (mech, source, share), group in groups.items():
        density, mass, rel_error = (sum(p[i] for p in group) / len(group) for i in (3, 4, 5))
        lines.setdefault((mech, source), []).append((density, mass, rel_error, share))
    return {key: sorted(line) for key, line in lines.items()}


def points(rows: Sequence[SparsityRow]) -> list[Point]:
    """The measured rows (refused cases left out) as :data:`Point` tuples."""
    return [(r.mechanism, r.source, r.share, r.density, r.mass, r.rel_error) for r in rows if r.density is not None]


def plot_sparsity(rows: Sequence[SparsityRow], path: str) -> None:
    """Relative error and mass kept against measured density, one line per mechanism and source
    (the report's figure, :func:`attnzoo.bench.report.sparsity_figure`)."""
    from .report import save_png, sparsity_figure

    save_png(sparsity_figure(averaged(points(rows))), path)
