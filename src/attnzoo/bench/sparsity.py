"""Error against density for the content-sparse mechanisms (issue 13's sweep; catalog B6 extended).

For every registered mechanism with a ``sparsity_params`` hook (the S family: top-k, MoBA,
XAttention, ...) and each requested share of keys, on random q, k, v and on the q, k, v each layer
of all-MiniLM-L6-v2 computes:

* ``density``: the (query, key) pairs the mechanism's selection kept, over the pairs exact attention
  uses (the causal triangle for causal-only mechanisms), real tokens only;
* ``mass``: the mean over real query rows of the exact softmax mass on the kept keys (1 = nothing of
  the exact attention was dropped), and ``kl`` = mean -log(mass) = KL(p || p*) for a selection
  that renormalizes exact attention over its kept keys (the mechanisms here do);
* ``rel_error`` = ||O - O*||_F / ||O*||_F over the real query rows.

The selection and output are the mechanism's reference backend's in float64 (the conformance suite
holds every fast backend to it), read through the reference's tap (:data:`attnzoo.kernels.reference.TAP`):
the kept pairs are the scores the reference did not mask. No public project publishes this curve;
papers report task scores at one sparsity. ``attnzoo bench sparsity`` prints the table and can plot it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from torch import Tensor

from ..kernels import reference as _reference_kernel
from ..registry import Mechanism, get, list_mechanisms
from .error import ErrorConfig, Sample, minilm_samples, random_samples

__all__ = ["SparsityConfig", "SparsityRow", "averaged", "sparse_mechanisms", "run_sparsity", "plot_sparsity"]

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
    mechanisms: Optional[tuple[str, ...]] = None  # None: every mechanism with sparsity_params and 1D inputs
    layers: Optional[tuple[int, ...]] = None  # MiniLM layers (None: all)


@dataclass
class SparsityRow:
    mechanism: str
    source: str
    label: str
    share: float
    params: dict[str, Any] = field(default_factory=dict)
    density: Optional[float] = None
    mass: Optional[float] = None
    kl: Optional[float] = None
    rel_error: Optional[float] = None
    note: str = ""


def sparse_mechanisms(config: SparsityConfig) -> list[Mechanism]:
    """The mechanisms swept: a ``sparsity_params`` hook, 1D self-attention."""
    if config.mechanisms is not None:
        return [get(name) for name in config.mechanisms]
    return [m for m in list_mechanisms() if m.sparsity_params is not None and 1 in m.spatial_dims]


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
    problem = mech.describe(sample.q, sample.k, sample.v)
    params = dict(mech.sparsity_params(problem, share))
    if "causal" in {p.name for p in mech.params} and not _causal_only(mech):
        params["causal"] = False
    if sample.padding.any():
        params["key_padding_mask"] = sample.padding
    row = SparsityRow(mech.name, sample.source, sample.label, share, {k: v for k, v in params.items() if k != "key_padding_mask"})
    tap = _KeptTap()
    previous, _reference_kernel.TAP = _reference_kernel.TAP, tap
    try:
        with torch.no_grad():
            out = mech(sample.q, sample.k, sample.v, backend="reference", **params)
    except Exception as err:  # noqa: BLE001 - a refused case is a row with a note, not a failed sweep
        row.note = f"{type(err).__name__}: {str(err).splitlines()[0]}"
        return row
    finally:
        _reference_kernel.TAP = previous
    out = out[0] if isinstance(out, tuple) else out
    exact_out, exact_p = exact
    real = ~sample.padding  # (B, N): real query rows
    visible = _visible(sample, _causal_only(mech))
    kept = tap.kept & visible
    row.density = float(kept.expand_as(exact_p)[real[:, None, :].expand(-1, exact_p.shape[1], -1)].sum()) / float(
        visible.expand_as(exact_p)[real[:, None, :].expand(-1, exact_p.shape[1], -1)].sum()
    )
    mass = (exact_p * kept).sum(-1)[real[:, None, :].expand(-1, exact_p.shape[1], -1)]
    row.mass = float(mass.mean())
    row.kl = float((-mass.clamp_min(1e-300).log()).mean())
    diff = (out - exact_out).permute(0, 2, 1, 3)[real]
    row.rel_error = float(diff.norm() / exact_out.permute(0, 2, 1, 3)[real].norm())
    return row


def run_sparsity(config: SparsityConfig, on_case: Optional[Callable[[SparsityRow], None]] = None) -> list[SparsityRow]:
    """Every swept mechanism x sample x share; returns the rows (never prints)."""
    mechs = sparse_mechanisms(config)
    rows = []
    for sample in _samples(config):
        exacts = {causal: _exact(sample, causal) for causal in {_causal_only(m) for m in mechs}}
        for mech in mechs:
            for share in config.shares:
                row = _measure(mech, sample, share, exacts[_causal_only(mech)])
                rows.append(row)
                if on_case is not None:
                    on_case(row)
    return rows


def averaged(rows: Sequence[SparsityRow]) -> dict[tuple[str, str], list[tuple[float, float, float]]]:
    """(mechanism, source) -> [(density, mass, rel_error)] by share, averaged over the source's
    samples (MiniLM's layers, the random lengths), sorted by density."""
    groups: dict[tuple[str, str, float], list[SparsityRow]] = {}
    for row in rows:
        if row.density is not None:
            groups.setdefault((row.mechanism, row.source, row.share), []).append(row)
    lines: dict[tuple[str, str], list[tuple[float, float, float]]] = {}
    for (mech, source, _), group in groups.items():
        mean = lambda values: sum(values) / len(values)  # noqa: E731
        lines.setdefault((mech, source), []).append(
            (mean([r.density for r in group]), mean([r.mass for r in group]), mean([r.rel_error for r in group]))
        )
    return {key: sorted(points) for key, points in lines.items()}


def plot_sparsity(rows: Sequence[SparsityRow], path: str) -> None:
    """Relative error against measured density, one line per mechanism and source (matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for (mech, source), points in sorted(averaged(rows).items()):
        style = "-" if source == "random" else "--"
        axes[0].plot([p[0] for p in points], [max(p[2], 1e-16) for p in points], style, marker="o", label=f"{mech} ({source})")
        axes[1].plot([p[0] for p in points], [p[1] for p in points], style, marker="o", label=f"{mech} ({source})")
    axes[0].set(xlabel="density (kept pairs / exact attention's pairs)", ylabel="||O - O*|| / ||O*||", yscale="log", title="output error vs density")
    axes[1].set(xlabel="density", ylabel="exact attention mass kept", title="mass kept vs density")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
