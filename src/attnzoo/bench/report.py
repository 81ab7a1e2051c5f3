"""``attnzoo report``: the results database as Markdown, PNG plots and one self-contained HTML page.

What it shows, from the newest result of every case (or of one run; where several runs measured
the same table cell, e.g. a quick and a full run, the newest):

* the machines the runs were measured on (CPU, threads, device, torch, attnzoo, git sha);
* efficiency, per setting (CAB pattern, mode, dtype, device, shapes): a table of every
  mechanism x backend against the length N (median ms and the ratio to ``softmax``/``sdpa`` at the
  same N: the stored median of paired ratios where the run paired its calls with the baseline's,
  else the quotient of the medians; "n/a" with the reason where a case did not run or the
  mechanism does not declare the pattern; a trailing "!" where the case's IQR exceeds its median,
  with a legend), the same for peak memory and for useful GFLOP/s (where the pairs were counted), and CAB's efficiency length against vanilla attention for
  time and for memory (:mod:`attnzoo.bench.fits`; "vanilla" is ``softmax``/``sdpa`` here);
  plots of time and memory against N, log-log, one line per mechanism (its ``auto`` row, else its
  fastest backend), with the ideal O(N) and O(N^2) lines anchored at the shortest length;
* MQAR (Zoology): the best accuracy over the learning-rate sweep, against d_model and against
  the mechanism's state size;
* approximation error: relative error of the output (and KL of attention rows) against exact
  softmax, and error against time;
* content-sparse attention (``attnzoo bench sparsity``): output error and exact attention mass kept
  against the density each mechanism's selection kept, per input source.

The report is built once as a list of blocks (headings, paragraphs, tables, figures) and rendered
twice, as Markdown (figures as links to the PNG files) and as HTML (figures embedded as base64
data URIs, no external asset). :func:`readme_section` renders the short form the README carries:
time tables with ``softmax``/``sdpa`` and one backend per mechanism, efficiency lengths, MQAR and
error tables, and links to the plots.
Nothing here prints; an empty database gives a report that says so (``ReportPaths.notice``).
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import math
import os
import re
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Union

from .._markers import replace_marked_block
from .efficiency import AUTO, BASELINE, RAW_TORCH, useful_gflops
from .fits import efficiency_length
from .results import ResultStore, to_json
from .timing import unstable

__all__ = [
    "FORMATS",
    "README_MARKERS",
    "ReportData",
    "ReportPaths",
    "collect",
    "readme_section",
    "render_figures",
    "report_blocks",
    "with_readme_section",
    "write_report",
]

#: What :func:`write_report` can write.
FORMATS = ("md", "png", "html")
# BASELINE (softmax/sdpa) is what ratios and efficiency lengths are measured against; the AUTO
# row (dispatch's pick: what a user gets without backend=) is preferred in the plots; the
# RAW_TORCH row (no attnzoo) is in the tables, not in the plots (it would hide softmax).
#: The README lines between which ``attnzoo report --readme`` puts :func:`readme_section`.
README_MARKERS = ("<!-- bench:start -->", "<!-- bench:end -->")
MIB = 2**20

StoreLike = Union[ResultStore, str, "os.PathLike[str]"]


# ---------------------------------------------------------------------------------------------
# the data
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ReportData:
    """The results a report shows, by kind, and the runs that produced them."""

    efficiency: list[dict[str, Any]]
    mqar: list[dict[str, Any]]
    error: list[dict[str, Any]]
    runs: list[dict[str, Any]]
    db: str = ""
    sparsity: list[dict[str, Any]] = field(default_factory=list)
    modules: list[dict[str, Any]] = field(default_factory=list)
    cache: list[dict[str, Any]] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (self.efficiency or self.mqar or self.error or self.sparsity or self.modules or self.cache)


def collect(store_or_path: StoreLike, run: Optional[int] = None) -> ReportData:
    """Read the newest result of every case (``run`` given: only that run's results)."""
    if isinstance(store_or_path, ResultStore):
        return _collect(store_or_path, run)
    with ResultStore(store_or_path) as store:
        return _collect(store, run)


def _collect(store: ResultStore, run: Optional[int]) -> ReportData:
    by_kind = {kind: store.results(kind=kind, run_id=run, latest=True) for kind in ("efficiency", "mqar", "error", "sparsity", "modules", "cache")}
    configs = {r["id"]: r["config"] for r in store.runs()}
    by_kind["efficiency"] = _newest_per_cell(_with_queries(by_kind["efficiency"], configs))
    used = {r["run_id"] for rows in by_kind.values() for r in rows}
    runs = [r for r in store.runs() if r["id"] in used]
    return ReportData(by_kind["efficiency"], by_kind["mqar"], by_kind["error"], runs, str(store.path), by_kind["sparsity"], by_kind["modules"], by_kind["cache"])


def _with_queries(rows: list[dict[str, Any]], configs: Mapping[int, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Each row with its run's ``queries`` setting: cross runs with a fixed Nq and with Nq
    derived from N are different tables even where one of their Nq happens to coincide."""
    return [dict(r, run_queries=configs.get(r["run_id"], {}).get("queries")) for r in rows]


def _newest_per_cell(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The newest row of each table cell (setting, mechanism, backend, parameters, N).

    Case keys also hold the repeat budget and the machine, so a quick run and a full one both
    stay "latest"; the report shows the newest of them (its run is listed under Machine).
    """
    newest = {(_setting(r), r["mechanism"], r.get("backend"), to_json(r["params"]), _length_of(r)): r for r in rows}
    return sorted(newest.values(), key=lambda r: r["id"])


# ---------------------------------------------------------------------------------------------
# the document: blocks rendered as Markdown and as HTML
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Heading:
    text: str
    level: int


@dataclass(frozen=True)
class Para:
    text: str  # Markdown inline syntax limited to `code` (the HTML renderer knows it)


@dataclass(frozen=True)
class Table:
    headers: list[str]
    rows: list[list[str]]


@dataclass(frozen=True)
class Figure:
    name: str  # the PNG's stem
    caption: str
    draw: Callable[[], Any] = field(compare=False, repr=False)  # returns a matplotlib Figure


Block = Union[Heading, Para, Table, Figure]


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _markdown(blocks: Sequence[Block], image_dir: Optional[str]) -> str:
    """Markdown; figures become ``![caption](image_dir/name.png)``, or nothing without images."""
    out: list[str] = []
    for block in blocks:
        if isinstance(block, Heading):
            out.append(f"{'#' * block.level} {block.text}\n")
        elif isinstance(block, Para):
            out.append(block.text + "\n")
        elif isinstance(block, Table):
            lines = ["| " + " | ".join(_md_cell(h) for h in block.headers) + " |", "|" + "---|" * len(block.headers)]
            lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in block.rows]
            out.append("\n".join(lines) + "\n")
        elif image_dir is not None:
            prefix = f"{image_dir.rstrip('/')}/" if image_dir else ""
            out.append(f"![{block.caption}]({prefix}{block.name}.png)\n")
    return "\n".join(out)


def _html_inline(text: str) -> str:
    escaped = html.escape(text)
    return re.sub(r"`([^`]*)`", r"<code>\1</code>", escaped)


_CSS = (
    "body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}"
    "table{border-collapse:collapse;margin:1em 0;font-size:13px}"
    "th,td{border:1px solid #ccc;padding:3px 6px;text-align:right}"
    "th:first-child,td:first-child,th:nth-child(2),td:nth-child(2){text-align:left}"
    "th{background:#f3f3f3}figure{margin:1em 0}img{max-width:100%}figcaption{font-size:13px;color:#555}"
    ".wrap{overflow-x:auto}"
)


def _html(blocks: Sequence[Block], images: Mapping[str, bytes], title: str) -> str:
    """One HTML page with everything inside it: CSS inline, images as data URIs."""
    body: list[str] = []
    for block in blocks:
        if isinstance(block, Heading):
            body.append(f"<h{block.level}>{html.escape(block.text)}</h{block.level}>")
        elif isinstance(block, Para):
            body.append(f"<p>{_html_inline(block.text)}</p>")
        elif isinstance(block, Table):
            head = "".join(f"<th>{html.escape(h)}</th>" for h in block.headers)
            rows = "".join("<tr>" + "".join(f"<td>{_html_inline(c)}</td>" for c in row) + "</tr>" for row in block.rows)
            body.append(f'<div class="wrap"><table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table></div>')
        elif block.name in images:
            data = base64.b64encode(images[block.name]).decode("ascii")
            body.append(
                f'<figure><img alt="{html.escape(block.caption)}" src="data:image/png;base64,{data}">'
                f"<figcaption>{html.escape(block.caption)}</figcaption></figure>"
            )
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{_CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )


# ---------------------------------------------------------------------------------------------
# formatting
# ---------------------------------------------------------------------------------------------
def _ms(value: float) -> str:
    return f"{value:.3g}" if value < 100 else f"{value:.0f}"


def _mib(nbytes: float) -> str:
    mib = nbytes / MIB
    return f"{mib:.3g}" if mib < 1000 else f"{mib:.0f}"


def _length(value: Optional[float]) -> str:
    """An efficiency length as a cell: an integer, 'never', '0 (always)' or '-' (too few points)."""
    if value is None:
        return "-"
    if math.isinf(value):
        return "never"
    return "0 (always)" if value == 0 else f"{round(value):d}"


def _params_text(params: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(params.items()))


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


def _variant_labels(
    rows: Sequence[dict[str, Any]], slot: Callable[[dict[str, Any]], tuple], base: Callable[[dict[str, Any]], str]
) -> dict[int, str]:
    """A label per row id: ``base(row)`` plus the parameters that tell variants apart.

    A parameter names a variant when rows filling the same slot (same mechanism and backend at
    the same length, say) differ in it; a parameter that only changes with the slot (a window
    the mechanism derives from N) is left out of the label.
    """
    by_slot: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        by_slot[(base(row), slot(row))].append(row)
    varying: dict[str, set[str]] = defaultdict(set)
    for (name, _), members in by_slot.items():
        keys = {k for r in members for k in r["params"]}
        for key in keys:
            if len({to_json(r["params"].get(key)) for r in members}) > 1:
                varying[name].add(key)
    labels = {}
    for row in rows:
        name = base(row)
        # a parameter a variant leaves unset takes the mechanism's default: say so, not "None"
        shown = {k: "default" if row["params"].get(k) is None else row["params"].get(k) for k in sorted(varying[name])}
        labels[row["id"]] = f"{name} ({_params_text(shown)})" if shown else name
    return labels


# ---------------------------------------------------------------------------------------------
# efficiency: settings, series, tables, fits
# ---------------------------------------------------------------------------------------------
_SETTING_FIELDS = ("pattern", "mode", "dtype", "device", "batch", "heads", "kv_heads", "head_dim", "queries")


def _setting(row: dict[str, Any]) -> tuple:
    """What must match for two rows to share a table: everything but mechanism, backend and N.

    Nq is not compared (self patterns grow it with N, cross ones may too); for cross patterns
    the run's ``queries`` setting is (None: Nq derived from N, else the fixed Nq).
    """
    cross = not (row.get("pattern") or "").endswith("_self")
    return tuple(row.get(f) for f in _SETTING_FIELDS[:-1]) + (row.get("run_queries") if cross else None,)


def _setting_title(setting: tuple, rows: Sequence[dict[str, Any]] = ()) -> str:
    pattern, mode, dtype, device, batch, heads, kv_heads, head_dim, _ = setting
    shape = f"B={batch} H={heads}" + (f" Hkv={kv_heads}" if kv_heads and kv_heads != heads else "") + f" D={head_dim}"
    return f"{pattern or '?'} · {mode or '?'} · {dtype or '?'} · {device or '?'} · {shape}{_queries_text(pattern, rows)}"


def _queries_text(pattern: Optional[str], rows: Sequence[dict[str, Any]]) -> str:
    """', Nq=1' for a cross table with one Nq, ', Nq=128..2048' when Nq follows N; '' for self."""
    q_lens = sorted({r["q_len"] for r in rows if r.get("q_len") is not None})
    if (pattern or "").endswith("_self") or not q_lens:
        return ""
    return f", Nq={q_lens[0]}" if len(q_lens) == 1 else f", Nq={q_lens[0]}..{q_lens[-1]}"


def _setting_slugs(settings: Sequence[tuple]) -> dict[tuple, str]:
    """File-name stems: pattern and mode, plus whatever else tells the settings apart."""
    varying = [i for i in range(2, len(_SETTING_FIELDS)) if len({s[i] for s in settings}) > 1]
    named = lambda s, i: f"{_SETTING_FIELDS[i]}{s[i]}" if i > 3 else str(s[i])  # noqa: E731 - "heads4", not "4"
    return {s: _slug("_".join(named(s, i) for i in [0, 1, *varying])) for s in settings}


def _length_of(row: dict[str, Any]) -> int:
    return int(row.get("kv_len") or row.get("q_len") or 0)


@dataclass
class Series:
    """One table row: a mechanism x backend (x variant) and its result at each length."""

    mechanism: str
    backend: str
    label: str
    cells: dict[int, dict[str, Any]] = field(default_factory=dict)

    def times(self) -> list[tuple[int, float]]:
        return [(n, r["median_ms"]) for n, r in sorted(self.cells.items()) if r.get("median_ms") is not None]

    def memory(self) -> list[tuple[int, float]]:
        return [
            (n, float(r["peak_bytes"]))
            for n, r in sorted(self.cells.items())
            if r.get("median_ms") is not None and r.get("peak_bytes") is not None
        ]

    def notes(self) -> str:
        """The cells' notes, each kind once: notes differing only in numbers (``got 256``, ``got
        512``) are one kind, shown as at the longest N; the N it applies to unless that is all."""
        kinds: dict[str, list[tuple[int, str]]] = {}
        for n, r in sorted(self.cells.items()):
            if r.get("note"):
                kinds.setdefault(re.sub(r"\d+", "#", r["note"]), []).append((n, r["note"]))
        shown = []
        for members in kinds.values():
            n_last, text = members[-1]
            if len(members) < len(self.cells):
                text += f" (N={','.join(str(n) for n, _ in members)})"
            elif len({t for _, t in members}) > 1:
                text += f" (at N={n_last})"
            shown.append(text)
        return "; ".join(shown)


def _series(rows: Sequence[dict[str, Any]]) -> list[Series]:
    """The rows of one setting as series, the baseline first, then by mechanism and backend."""
    labels = _variant_labels(rows, _length_of, lambda r: f"{r['mechanism']}/{r.get('backend') or '-'}")
    series: dict[str, Series] = {}
    for row in rows:
        label = labels[row["id"]]
        s = series.setdefault(label, Series(row["mechanism"], row.get("backend") or "-", label))
        s.cells[_length_of(row)] = row
    order = lambda s: ((s.mechanism, s.backend) != BASELINE, s.mechanism != BASELINE[0], s.mechanism, s.backend, s.label)  # noqa: E731
    return sorted(series.values(), key=order)


def _baseline(series: Sequence[Series]) -> Optional[Series]:
    """The ``softmax``/``sdpa`` series (its plain variant when there are several)."""
    candidates = [s for s in series if (s.mechanism, s.backend) == BASELINE]
    plain = [s for s in candidates if s.label == "/".join(BASELINE)]
    return (plain or candidates or [None])[0]


def _undeclared(series: Sequence[Series], pattern: Optional[str]) -> list[str]:
    """Registered mechanisms absent from the setting because they do not declare its pattern."""
    if not pattern:
        return []
    try:
        from ..registry import list_mechanisms
    except ImportError:  # pragma: no cover - the report still works from a bare database
        return []
    present = {s.mechanism for s in series}
    return [m.name for m in list_mechanisms() if m.name not in present and pattern not in m.patterns]


#: The mark of an unstable cell, and its legend (one line under a table that shows one).
UNSTABLE_MARK = "!"
UNSTABLE_LEGEND = f"{UNSTABLE_MARK}: unstable, the IQR exceeds the median (of the times, or of the paired ratios): noise rather than a measurement."


def _unstable(row: dict[str, Any]) -> bool:
    """The stored row's IQR exceeds its median: of the times, or of the paired ratios."""
    if row.get("median_ms") is None:
        return False
    m = row.get("metrics") or {}
    return unstable(row["median_ms"], row.get("q1_ms"), row.get("q3_ms")) or unstable(m.get("ratio"), m.get("ratio_q1"), m.get("ratio_q3"))


def _time_cell(row: Optional[dict[str, Any]], base: Optional[dict[str, Any]]) -> str:
    if row is None:
        return ""
    if row.get("median_ms") is None:
        return "n/a"
    cell = f"{_ms(row['median_ms'])} ms"
    ratio = (row.get("metrics") or {}).get("ratio")  # paired against the baseline of its own run
    if ratio is None and base is not None and base.get("median_ms"):
        ratio = row["median_ms"] / base["median_ms"]  # older rows, or no baseline in the run
    if ratio is not None:
        cell += f" ({ratio:.2f}x)"
    return cell + (f" {UNSTABLE_MARK}" if _unstable(row) else "")


def _gflops_cell(row: Optional[dict[str, Any]]) -> str:
    if row is None:
        return ""
    if row.get("median_ms") is None:
        return "n/a"
    gflops = useful_gflops((row.get("metrics") or {}).get("useful_flops"), row["median_ms"])
    if gflops is None:
        return "-"
    return f"{gflops:.3g}" if gflops < 1000 else f"{gflops:.0f}"


def _memory_cell(row: Optional[dict[str, Any]]) -> str:
    if row is None:
        return ""
    if row.get("median_ms") is None:
        return "n/a"
    return _mib(row["peak_bytes"]) if row.get("peak_bytes") is not None else "-"


def _grid_table(
    series: Sequence[Series], lengths: Sequence[int], cell: Callable[[Series, int], str], undeclared: Sequence[str], pattern: str
) -> Table:
    headers = ["mechanism", "backend", *[f"N={n}" for n in lengths], "notes"]
    rows = [[s.label.split("/", 1)[0], s.label.split("/", 1)[1], *[cell(s, n) for n in lengths], s.notes()] for s in series]
    rows += [[name, "-", *["n/a"] * len(lengths), f"no {pattern} pattern"] for name in undeclared]
    return Table(headers, rows)


def _efficiency_lengths(series: Sequence[Series], base: Optional[Series]) -> Optional[Table]:
    """CAB's efficiency length of every series against the baseline, for time and memory."""
    if base is None:
        return None
    rows = []
    for s in series:
        if s.mechanism in (BASELINE[0], RAW_TORCH[0]) or not s.times():
            continue  # vanilla attention itself: quadratic by design, a line fit means nothing
        by_time = efficiency_length(base.times(), s.times())
        by_memory = efficiency_length(base.memory(), s.memory())
        rows.append([s.label.split("/", 1)[0], s.label.split("/", 1)[1], _length(by_time), _length(by_memory)])
    return Table(["mechanism", "backend", "efficiency length (time)", "efficiency length (memory)"], rows) if rows else None


def _points(s: Series, what: str) -> list[tuple[int, float]]:
    """The series' (N, value) to plot: time in ms, or peak memory in MiB."""
    return s.times() if what == "time" else [(n, b / MIB) for n, b in s.memory()]


def _plotted(series: Sequence[Series], what: str = "time") -> list[Series]:
    """One series per mechanism (variant) for the plots: ``auto`` if measured, else the fastest.

    The fastest is the backend covering the most lengths, then with the smallest summed log time
    (for memory: the smallest summed log peak, among the backends whose memory was measured).
    """
    groups: dict[str, list[Series]] = defaultdict(list)
    for s in series:
        if (s.mechanism, s.backend) == RAW_TORCH or not _points(s, what):
            continue
        groups[f"{s.mechanism} ({_variant(s)}" if _variant(s) else s.mechanism].append(s)
    chosen = []
    for name, members in groups.items():
        auto = [s for s in members if s.backend == AUTO]
        best = (
            auto[0]
            if auto
            else min(members, key=lambda s: (-len(_points(s, what)), sum(math.log(max(v, 1e-9)) for _, v in _points(s, what))))
        )
        chosen.append((name, best))
    return [best for _, best in sorted(chosen, key=lambda item: (item[0] != BASELINE[0], item[0]))]


def _one_per_mechanism(series: Sequence[Series], plotted: Sequence[Series], base: Optional[Series]) -> list[Series]:
    """The README's short table: the baseline, then each mechanism (variant) as plotted, or its
    first row where nothing of it ran (so every mechanism still appears, with its reason)."""
    chosen = [base] if base is not None else []
    for s in series:
        if s in chosen or (s.mechanism, s.backend) == RAW_TORCH:
            continue
        mine = [p for p in plotted if p.mechanism == s.mechanism and _variant(p) == _variant(s)]
        pick = mine[0] if mine else s
        if pick not in chosen:
            chosen.append(pick)
    return chosen


def _variant(s: Series) -> str:
    return s.label.split(" (", 1)[1] if " (" in s.label else ""


def _efficiency_blocks(rows: Sequence[dict[str, Any]], level: int, full: bool) -> list[Block]:
    if not rows:
        return []
    blocks: list[Block] = [Heading("Efficiency", level)]
    by_setting: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        by_setting[_setting(row)].append(row)
    slugs = _setting_slugs(list(by_setting))
    for setting in sorted(by_setting, key=lambda s: tuple(str(x) for x in s)):
        blocks += _setting_blocks(setting, by_setting[setting], slugs[setting], level + 1, full)
    return blocks


def _setting_blocks(setting: tuple, rows: Sequence[dict[str, Any]], slug: str, level: int, full: bool) -> list[Block]:
    series = _series(rows)
    lengths = sorted({n for s in series for n in s.cells})
    base = _baseline(series)
    pattern = setting[0]
    undeclared = _undeclared(series, pattern)
    base_row = lambda n: base.cells.get(n) if base else None  # noqa: E731
    plotted = _plotted(series)
    shown = series if full else _one_per_mechanism(series, plotted, base)
    one = "one backend per mechanism (`auto` where measured, else the fastest)"
    which = f"every backend; the plots show {one}" if full else f"`softmax`/`sdpa` and {one}, in the tables and the plots"
    time_table = _grid_table(
        shown,
        lengths,
        lambda s, n: _time_cell(s.cells.get(n), base_row(n)),
        undeclared,
        pattern,
    )
    flagged = any(cell.endswith(f" {UNSTABLE_MARK}") for line in time_table.rows for cell in line)
    blocks: list[Block] = [
        Heading(_setting_title(setting, rows), level),
        Para(
            f"Median time per call (ms) and its ratio to `softmax`/`sdpa` at the same N (the median of paired ratios, "
            f"each call next to one of `softmax`/`sdpa`, where the run paired them), for {which}; n/a: not run (the notes say why)."
        ),
        time_table,
    ]
    if flagged:
        blocks.append(Para(UNSTABLE_LEGEND))
    if plotted:
        blocks.append(
            Figure(f"time_{slug}", f"time against N, {_setting_title(setting, rows)}", lambda: _length_plot(plotted, base, "time"))
        )
    has_memory = any(s.memory() for s in series)
    if has_memory:
        methods = sorted({r["memory_method"] for r in rows if r.get("memory_method")})
        if full:
            blocks += [
                Para(f"Peak memory per call (MiB), measured by {', '.join(methods) or 'an unnamed method'}; -: not measured."),
                _grid_table(series, lengths, lambda s, n: _memory_cell(s.cells.get(n)), undeclared, pattern),
            ]
        blocks.append(
            Figure(
                f"memory_{slug}",
                f"peak memory against N, {_setting_title(setting, rows)}",
                lambda: _length_plot(_plotted(series, "memory"), base, "memory"),
            )
        )
    if full and any((r.get("metrics") or {}).get("useful_flops") is not None for r in rows):
        train = setting[1] == "train"
        blocks += [
            Para(
                "Useful GFLOP/s: 4 D FLOPs per (query, key) pair the pattern allows, summed over batch and heads"
                + (", x3.5 for forward + backward (the backward counted as 2.5 forwards)" if train else "")
                + ", over the median time; tile or padding work a backend does beyond those pairs is not counted. "
                "-: pairs not counted (mechanisms that are not one softmax over a pattern of pairs, or N too long to count)."
            ),
            _grid_table(series, lengths, lambda s, n: _gflops_cell(s.cells.get(n)), undeclared, pattern),
        ]
    fits = _efficiency_lengths(shown, base)
    if fits is not None:
        blocks += [
            Para(
                "Efficiency length as CAB defines it: the N where a quadratic fit of vanilla attention's cost "
                "(here `softmax`/`sdpa`) crosses a linear fit of the mechanism's; beyond it the mechanism is cheaper. "
                "never: the fits do not cross for good (expected for memory where vanilla's own memory grows linearly, "
                "as with a fused SDPA kernel); 0 (always): cheaper at every N; -: too few points. "
                "Lengths outside the measured N are extrapolations of the fits."
            ),
            fits,
        ]
    return blocks


# ---------------------------------------------------------------------------------------------
# MQAR and approximation error
# ---------------------------------------------------------------------------------------------
def _metric(row: dict[str, Any], key: str) -> Any:
    return (row.get("metrics") or {}).get(key)


def _mqar_best(rows: Sequence[dict[str, Any]]) -> dict[tuple[str, Any, Any], dict[str, Any]]:
    """Best accuracy over the learning rates: ``(label, seq_len, d_model) -> row``."""
    labels = _variant_labels(rows, lambda r: (_metric(r, "seq_len"), _metric(r, "d_model"), _metric(r, "lr")), lambda r: r["mechanism"])
    best: dict[tuple[str, Any, Any], dict[str, Any]] = {}
    for row in rows:
        if _metric(row, "accuracy") is None:
            continue
        key = (labels[row["id"]], _metric(row, "seq_len"), _metric(row, "d_model"))
        if key not in best or _metric(row, "accuracy") > _metric(best[key], "accuracy"):
            best[key] = row
    return best


def _sorted_values(values: Iterable[Any]) -> list[Any]:
    return sorted(set(values), key=lambda v: (v is None, v if v is not None else 0))


def _accuracy_cell(row: Optional[dict[str, Any]]) -> str:
    if row is None:
        return ""
    lr = _metric(row, "lr")
    return f"{_metric(row, 'accuracy'):.3f}" + (f" (lr {lr:.2g})" if lr is not None else "")


def _mqar_blocks(rows: Sequence[dict[str, Any]], level: int) -> list[Block]:
    best = _mqar_best(rows)
    if not best:
        return []
    blocks: list[Block] = [
        Heading("MQAR", level),
        Para("Multi-query associative recall (Zoology): test accuracy, best over the learning-rate sweep (the lr in brackets)."),
    ]
    labels = sorted({k[0] for k in best})
    for seq_len in _sorted_values(k[1] for k in best):
        widths = _sorted_values(k[2] for k in best if k[1] == seq_len)
        table_rows = []
        for label in labels:
            cells = [_accuracy_cell(best.get((label, seq_len, d))) for d in widths]
            if any(cells):
                table_rows.append([label, *cells])
        blocks += [Para(f"sequence length {seq_len}")] if seq_len is not None else []
        blocks += [Table(["mechanism", *[f"d_model={d}" for d in widths]], table_rows)]
    blocks.append(Figure("mqar_d_model", "MQAR accuracy against d_model", lambda: _mqar_plot(best, "d_model")))
    if any(_metric(r, "state_size") is not None for r in best.values()):
        blocks.append(Figure("mqar_state_size", "MQAR accuracy against state size", lambda: _mqar_plot(best, "state_size")))
    return blocks


def _error_groups(rows: Sequence[dict[str, Any]]) -> dict[tuple[str, Any, Any], list[dict[str, Any]]]:
    """``(label, source, n_tokens) -> rows`` (one per layer for captured inputs)."""
    slot = lambda r: (_metric(r, "source"), _metric(r, "layer"), _metric(r, "n_tokens"))  # noqa: E731
    labels = _variant_labels(rows, slot, lambda r: r["mechanism"])
    groups: dict[tuple[str, Any, Any], list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        if _metric(row, "rel_error") is not None:
            groups[(labels[row["id"]], _metric(row, "source"), _metric(row, "n_tokens"))].append(row)
    return groups


def _mean(values: Iterable[Optional[float]]) -> Optional[float]:
    kept = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return statistics.fmean(kept) if kept else None


def _error_blocks(rows: Sequence[dict[str, Any]], level: int) -> list[Block]:
    groups = _error_groups(rows)
    if not groups:
        return []
    table_rows = []
    for (label, source, n_tokens), members in sorted(groups.items(), key=lambda kv: tuple(str(x) for x in kv[0])):
        rel, kl = _mean(_metric(r, "rel_error") for r in members), _mean(_metric(r, "kl") for r in members)
        ms = _mean(r.get("median_ms") for r in members)
        table_rows.append(
            [
                label,
                str(source),
                str(n_tokens),
                str(len(members)),
                f"{rel:.3g}",
                "-" if kl is None else f"{kl:.3g}",
                "-" if ms is None else _ms(ms),
            ]
        )
    return [
        Heading("Approximation error", level),
        Para(
            "Relative error ||o - o_exact|| / ||o_exact|| of the output against exact softmax attention and KL of the attention rows "
            "(where defined), mean over the cases (layers of the captured model); time of one call in ms."
        ),
        Table(["mechanism", "inputs", "tokens", "cases", "rel. error", "KL", "ms"], table_rows),
        Figure("error_speed", "relative error against time per call", lambda: _error_plot(groups)),
    ]


def _sparsity_lines(rows: Sequence[dict[str, Any]]) -> dict[tuple[str, str], list[tuple[float, float, float, float]]]:
    from .sparsity import averaged

    measured = [r for r in rows if _metric(r, "density") is not None]
    return averaged([(r["mechanism"], _metric(r, "source"), _metric(r, "share"), *(_metric(r, m) for m in ("density", "mass", "rel_error"))) for r in measured])


def _sparsity_blocks(rows: Sequence[dict[str, Any]], level: int) -> list[Block]:
    lines = _sparsity_lines(rows)
    if not lines:
        return []
    shares = _sorted_values(point[3] for line in lines.values() for point in line)
    table_rows = []
    for (mech, source), line in sorted(lines.items()):
        at = {point[3]: point for point in line}
        table_rows.append([mech, str(source), *(_sparsity_cell(at[share]) if share in at else "n/a" for share in shares)])
    return [
        Heading("Content-sparse attention: error against density", level),
        Para(
            "Each cell: measured density (the pairs the selection kept over exact attention's pairs) / exact softmax mass on the kept "
            "keys / relative output error ||o - o_exact|| / ||o_exact||, mean over the source's samples, for each share of keys asked "
            "(float64 reference backends)."
        ),
        Table(["mechanism", "inputs", *[f"share {share:g}" for share in shares]], table_rows),
        Figure("sparsity_density", "output error and mass kept against density", lambda: sparsity_figure(lines)),
    ]


def _modules_blocks(rows: Sequence[dict[str, Any]], level: int) -> list[Block]:
    if not rows:
        return []
    table_rows = []
    for r in sorted(rows, key=lambda r: (r["metrics"].get("family", ""), r["mechanism"])):
        m = r["metrics"]
        train = m.get("train_median_ms")
        table_rows.append([
            r["mechanism"], m.get("family", ""), " ".join(m.get("catalog", [])), " ".join("x".join(map(str, s)) for s in m.get("inputs", [])),
            f"{m.get('params', 0):,}", "-" if m.get("gflops") is None else f"{m['gflops']:.3g}",
            "-" if r.get("median_ms") is None else _ms(r["median_ms"]), "-" if train is None else _ms(train), r.get("note") or "",
        ])
    return [
        Heading("Modules at their standard size", level),
        Para("Every registered attnzoo.nn module at the input size it declares: parameters, forward GFLOPs (torch's FLOP counter: "
             "matmuls, convolutions, SDPA), forward time without autograd and forward + backward time, median of repeats."),
        Table(["module", "family", "catalog", "input", "params", "GFLOPs", "forward", "train", "note"], table_rows),
    ]


def _cache_blocks(rows: Sequence[dict[str, Any]], level: int) -> list[Block]:
    if not rows:
        return []
    points = [(r["mechanism"], r["metrics"]["kv_bytes"] / 1024, r["metrics"]["accuracy"]) for r in rows]
    table_rows = [
        [r["mechanism"], f"{r['metrics']['budget_fraction']:.0%}", str(r["params"].get("budget", "")), f"{r['metrics']['kv_bytes'] / 1024:.1f}",
         f"{r['metrics']['accuracy']:.3f}", "-" if r.get("median_ms") is None else _ms(r["median_ms"])]
        for r in sorted(rows, key=lambda r: (r["mechanism"] != "full", r["mechanism"], r["metrics"]["budget_fraction"]))
    ]
    return [
        Heading("KV-cache eviction: needle recall against memory", level),
        Para("A 2-layer softmax recall model trained by `attnzoo bench cache`; each policy cuts every layer's prompt cache to the budget "
             "once after the prefill, then the answers are decoded one token per step (accuracy of the answers, KV bytes kept per sequence, "
             "median time per generated token)."),
        Table(["policy", "budget", "tokens kept", "KV KiB", "accuracy", "per token"], table_rows),
        Figure("cache_recall", "needle recall accuracy against the KV cache kept", lambda: cache_figure(points)),
    ]


def _sparsity_cell(point: tuple[float, float, float, float]) -> str:
    density, mass, rel, _ = point
    return f"{density:.2f} / {mass:.2f} / {rel:.2g}"


# ---------------------------------------------------------------------------------------------
# the machines
# ---------------------------------------------------------------------------------------------
_MACHINE_KEYS = ("cpu", "cores", "threads", "device", "gpu", "torch", "attnzoo", "git", "git_sha", "python", "load")


def _machine_blocks(runs: Sequence[dict[str, Any]], level: int) -> list[Block]:
    if not runs:
        return []
    keys = [k for k in _MACHINE_KEYS if any(k in r["machine"] for r in runs)]
    keys += sorted({k for r in runs for k in r["machine"]} - set(keys))
    rows = []
    for r in runs:
        started = _dt.datetime.fromtimestamp(r["started"], _dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        rows.append([str(r["id"]), r["kind"], started, *[str(r["machine"].get(k, "")) for k in keys]])
    return [Heading("Machine", level), Table(["run", "kind", "started", *keys], rows)]


def _machine_line(runs: Sequence[dict[str, Any]]) -> str:
    """The machine in one sentence (the README's), from the newest run."""
    if not runs:
        return ""
    m = runs[-1]["machine"]
    parts = [
        m.get("gpu") or m.get("cpu", "?"),
        f"{m['threads']} threads" if "threads" in m else "",
        f"torch {m['torch']}" if "torch" in m else "",
    ]
    parts += [
        f"attnzoo {m['attnzoo']}" if "attnzoo" in m else "",
        f"git {m.get('git') or m.get('git_sha')}" if (m.get("git") or m.get("git_sha")) else "",
    ]
    return "Measured on " + ", ".join(p for p in parts if p) + "."


# ---------------------------------------------------------------------------------------------
# plots (matplotlib, Agg)
# ---------------------------------------------------------------------------------------------
_MARKERS = ("o", "s", "^", "D", "v", "P", "X")  # 7 markers x 20 colours: 140 distinct styles


def _matplotlib() -> Any:
    """matplotlib on the Agg backend (files only, no display), or an error saying how to get it."""
    try:
        import matplotlib
    except ImportError as err:
        raise ImportError("attnzoo report: the plots need matplotlib: pip install 'attnzoo[bench]' (or write formats=('md',))") from err
    matplotlib.use("Agg", force=True)
    return matplotlib


def _style(i: int) -> dict[str, Any]:
    matplotlib = _matplotlib()
    # tab20 pairs a dark and a light shade of each hue: all dark shades first, so neighbours differ
    paired = matplotlib.colormaps["tab20"].colors
    colours = paired[0::2] + paired[1::2]
    return {"color": colours[i % len(colours)], "marker": _MARKERS[i % len(_MARKERS)], "markersize": 4, "linewidth": 1.2}


def _legend_columns(entries: int) -> int:
    return 1 if entries <= 24 else 2


def _figure(panels: int, legend_entries: int) -> tuple[Any, list[Any]]:
    """A figure of ``panels`` plots side by side, widened for a legend outside on the right."""
    _matplotlib()
    from matplotlib.figure import Figure as MplFigure

    width = 6.4 * panels + 2.6 * _legend_columns(legend_entries)
    fig = MplFigure(figsize=(width, 4.6), layout="constrained")
    axes = fig.subplots(1, panels, squeeze=False)[0]
    return fig, list(axes)


def _legend_outside(fig: Any, ax: Any) -> None:
    """The legend right of the plots (with ~30 mechanisms it would cover the lines inside)."""
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside right upper", fontsize=7, frameon=False, ncol=_legend_columns(len(labels)))


def _short(n: float) -> str:
    """256, 1K, 128K: tick labels for lengths."""
    n = int(n)
    if n >= 2**20 and n % 2**20 == 0:
        return f"{n // 2**20}M"
    return f"{n // 1024}K" if n >= 1024 and n % 1024 == 0 else str(n)


def _length_ticks(ax: Any, lengths: Sequence[float]) -> None:
    """Ticks at the measured lengths (log base 2), labelled 256, 1K, ... rather than 2^8."""
    ticks = sorted({float(n) for n in lengths})
    if ticks:
        ax.set_xticks(ticks, [_short(n) for n in ticks])
        ax.minorticks_off()


def _length_plot(series: Sequence[Series], base: Optional[Series], what: str) -> Any:
    """Time or memory against N, log-log, with O(N) and O(N^2) anchored at the shortest N."""
    drawn = [(s, _points(s, what)) for s in series if _points(s, what)]
    fig, (ax,) = _figure(1, len(drawn) + 2)
    for i, (s, points) in enumerate(drawn):
        ax.plot([n for n, _ in points], [v for _, v in points], label=s.label.replace(f"/{AUTO}", " (auto)"), **_style(i))
    # the ideal lines start from softmax as plotted (its auto row), else from the baseline
    anchor = next((s for s in series if s.mechanism == BASELINE[0] and _points(s, what)), base)
    _ideal_lines(ax, drawn, _points(anchor, what) if anchor is not None else [])
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    _length_ticks(ax, [n for _, pts in drawn for n, _ in pts])
    ax.set_xlabel("N (keys)")
    ax.set_ylabel("median time per call (ms)" if what == "time" else "peak memory (MiB)")
    ax.grid(True, which="both", alpha=0.3)
    _legend_outside(fig, ax)
    return fig


def _ideal_lines(ax: Any, drawn: Sequence[tuple[Series, list[tuple[int, float]]]], base_points: list[tuple[int, float]]) -> None:
    """Dashed O(N) and O(N^2) through the baseline's (else the median) value at the shortest N."""
    lengths = sorted({n for _, pts in drawn for n, _ in pts})
    if len(lengths) < 2:
        return
    n0 = lengths[0]
    anchor = dict(base_points).get(n0)
    if anchor is None:
        anchor = statistics.median(v for _, pts in drawn for n, v in pts if n == n0)
    for power, style, name in ((1, "--", "ideal O(N)"), (2, ":", "ideal O(N²)")):
        ax.plot(lengths, [anchor * (n / n0) ** power for n in lengths], linestyle=style, color="0.35", linewidth=1.0, label=name)


def _mqar_plot(best: Mapping[tuple[str, Any, Any], dict[str, Any]], x_key: str) -> Any:
    """Accuracy against d_model or state size, one panel per sequence length."""
    seq_lens = _sorted_values(k[1] for k in best)
    labels = sorted({k[0] for k in best})
    fig, axes = _figure(len(seq_lens), len(labels))
    for ax, seq_len in zip(axes, seq_lens):
        for i, label in enumerate(labels):
            points = sorted(
                (_metric(row, x_key), _metric(row, "accuracy"))
                for (lab, sl, _), row in best.items()
                if lab == label and sl == seq_len and _metric(row, x_key) is not None
            )
            if points:
                ax.plot([x for x, _ in points], [a for _, a in points], label=label, **_style(i))
        ax.set_xscale("log", base=2)
        if x_key == "d_model":
            _length_ticks(ax, [k[2] for k in best if k[1] == seq_len and k[2] is not None])
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("d_model" if x_key == "d_model" else "state size (elements)")
        ax.set_ylabel("accuracy")
        ax.set_title(f"sequence length {seq_len}", fontsize=9)
        ax.grid(True, alpha=0.3)
    _legend_outside(fig, axes[0])
    return fig


def _error_plot(groups: Mapping[tuple[str, Any, Any], list[dict[str, Any]]]) -> Any:
    """Relative error against time per call, one panel per input source."""
    sources = _sorted_values(k[1] for k in groups)
    labels = sorted({k[0] for k in groups})
    fig, axes = _figure(len(sources), len(labels))
    for ax, source in zip(axes, sources):
        for i, label in enumerate(labels):
            points = [
                (r["median_ms"], _metric(r, "rel_error"))
                for (lab, src, _), rows in groups.items()
                if lab == label and src == source
                for r in rows
                if r.get("median_ms") and _metric(r, "rel_error")
            ]
            if points:
                style = _style(i) | {"linewidth": 0}
                ax.plot([t for t, _ in points], [e for _, e in points], label=label, **style)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("median time per call (ms)")
        ax.set_ylabel("relative error of the output")
        ax.set_title(f"inputs: {source}", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
    _legend_outside(fig, axes[0])
    return fig


def sparsity_figure(lines: Mapping[tuple[str, str], Sequence[tuple[float, float, float, float]]]) -> Any:
    """Two panels against density: relative output error (log) and exact mass kept; one line per
    mechanism, solid on random inputs, dashed on captured ones (:func:`attnzoo.bench.sparsity.averaged`)."""
    mechs = sorted({mech for mech, _ in lines})
    fig, axes = _figure(2, len(mechs))
    for (mech, source), line in sorted(lines.items()):
        style = _style(mechs.index(mech)) | {"linestyle": "-" if source == "random" else "--"}
        label = mech if source == "random" or (mech, "random") not in lines else None  # one legend entry per mechanism
        axes[0].plot([p[0] for p in line], [max(p[2], 1e-16) for p in line], label=label, **style)
        axes[1].plot([p[0] for p in line], [p[1] for p in line], **style)
    axes[0].set(xlabel="density (kept pairs / exact attention's pairs)", ylabel="||o - o*|| / ||o*||", yscale="log")
    axes[1].set(xlabel="density", ylabel="exact attention mass kept")
    axes[0].set_title("output error (solid: random q/k/v, dashed: MiniLM)", fontsize=9)
    axes[1].set_title("mass kept", fontsize=9)
    for ax in axes:
        ax.grid(True, which="both", alpha=0.3)
    _legend_outside(fig, axes[0])
    return fig


def cache_figure(points: Sequence[tuple[str, float, float]]) -> Any:
    """Accuracy against kept KV KiB, one line per policy (``(policy, kib, accuracy)`` points)."""
    policies = list(dict.fromkeys(p[0] for p in points))
    fig, axes = _figure(1, len(policies))
    ax = axes[0]
    for i, policy in enumerate(policies):
        line = sorted((kib, acc) for name, kib, acc in points if name == policy)
        style = _style(i) | ({"marker": "*", "markersize": 12} if len(line) == 1 else {})
        ax.plot([p[0] for p in line], [p[1] for p in line], label=policy, **style)
    ax.set(xlabel="KV cache kept per sequence (KiB, all layers)", ylabel="needle recall accuracy", ylim=(-0.02, 1.02))
    ax.grid(True, alpha=0.3)
    _legend_outside(fig, ax)
    return fig


def save_png(fig: Any, path: str | os.PathLike[str]) -> None:
    """Write a report figure to ``path`` (what ``--plot`` options use)."""
    Path(path).write_bytes(_png(fig))


def _png(fig: Any) -> bytes:
    buffer = io.BytesIO()
    # the constrained layout already fits the outside legend: no second "tight" draw needed
    fig.savefig(buffer, format="png", dpi=110, metadata={"Software": None})
    return buffer.getvalue()


def render_figures(blocks: Sequence[Block]) -> dict[str, bytes]:
    """Every figure of the blocks as PNG bytes, by name."""
    return {b.name: _png(b.draw()) for b in blocks if isinstance(b, Figure)}


# ---------------------------------------------------------------------------------------------
# the report
# ---------------------------------------------------------------------------------------------
def _empty_notice(data: ReportData) -> str:
    return f"No benchmark results in {data.db or 'the database'}: run `attnzoo bench` (or `attnzoo bench mqar|error|sparsity`) first."


def report_blocks(data: ReportData, *, level: int = 1, full: bool = True) -> list[Block]:
    """The report as blocks; ``full=False`` is the README's form (no run list, no memory tables)."""
    if data.empty:
        return [Heading("attnzoo benchmark", level), Para(_empty_notice(data))] if full else [Para(_empty_notice(data))]
    blocks: list[Block] = [Heading("attnzoo benchmark", level)] if full else []
    blocks.append(Para(_machine_line(data.runs)))
    if full:
        blocks += _machine_blocks(data.runs, level + 1)
    blocks += _efficiency_blocks(data.efficiency, level + 1, full)
    blocks += _mqar_blocks(data.mqar, level + 1)
    blocks += _error_blocks(data.error, level + 1)
    blocks += _sparsity_blocks(data.sparsity, level + 1)
    blocks += _modules_blocks(data.modules, level + 1)
    blocks += _cache_blocks(data.cache, level + 1)
    return blocks


@dataclass(frozen=True)
class ReportPaths:
    """What :func:`write_report` wrote; ``notice`` is set when there was nothing to report."""

    markdown: Optional[Path] = None
    html: Optional[Path] = None
    images: dict[str, Path] = field(default_factory=dict)
    notice: str = ""


def write_report(
    store_or_path: StoreLike,
    out_dir: str | os.PathLike[str],
    *,
    run: Optional[int] = None,
    formats: Sequence[str] = FORMATS,
) -> ReportPaths:
    """Write ``report.md``, ``<figure>.png`` and ``report.html`` (those in ``formats``) to ``out_dir``.

    The Markdown links the PNG files next to it (no links without ``"png"``); the HTML embeds
    them and needs nothing else. An empty database still writes the page, saying so.
    """
    unknown = set(formats) - set(FORMATS)
    if unknown:
        raise ValueError(f"write_report: unknown formats {sorted(unknown)}; choose from {FORMATS}")
    data = collect(store_or_path, run)
    blocks = report_blocks(data)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    images = render_figures(blocks) if {"png", "html"} & set(formats) else {}
    paths: dict[str, Any] = {"notice": _empty_notice(data) if data.empty else ""}
    if "png" in formats:
        paths["images"] = {name: _write(out / f"{name}.png", png) for name, png in images.items()}
    if "md" in formats:
        paths["markdown"] = _write(out / "report.md", _markdown(blocks, "" if "png" in formats else None).encode())
    if "html" in formats:
        paths["html"] = _write(out / "report.html", _html(blocks, images, "attnzoo benchmark").encode())
    return ReportPaths(**paths)


def _write(path: Path, content: bytes) -> Path:
    path.write_bytes(content)
    return path


def readme_section(results: Union[ReportData, StoreLike], image_dir: str = "docs/bench", *, level: int = 3) -> str:
    """The README's benchmark section: machine, time tables, efficiency lengths, MQAR and error
    tables, and links to the plots in ``image_dir`` (relative to the README; write them with
    ``write_report(db, image_dir, formats=("png",))``). Headings start at ``level``."""
    data = results if isinstance(results, ReportData) else collect(results)
    return _markdown(report_blocks(data, level=level - 1, full=False), image_dir)


def with_readme_section(readme_text: str, section: str) -> str:
    """``readme_text`` with ``section`` between the :data:`README_MARKERS` lines (which must exist)."""
    try:
        return replace_marked_block(readme_text, *README_MARKERS, section.rstrip("\n") + "\n")
    except ValueError as err:
        raise ValueError(f"README has {err}") from None
