"""The ``attnzoo`` command: list the registry, explain one mechanism, benchmark them all.

    attnzoo list [--family F] [--markdown]   mechanisms, their catalog ids, patterns, backends
    attnzoo list --write-readme [PATH]         refresh the README's table (between its markers)
    attnzoo info NAME                          formula, cost, paper, parameters, backends
    attnzoo bench [--lengths ...] [...]        forward time of every mechanism x backend

Everything shown is read from the registry, so a newly registered mechanism appears here (and
in the README table, which is ``attnzoo list --markdown``) without extra code. This module and
:mod:`attnzoo.bench` are the only places that print; they do it through rich.
"""

from __future__ import annotations

import argparse
import ast
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import torch
from rich.console import Console
from rich.panel import Panel
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from . import __version__
from .bench.efficiency import BASELINE, DTYPES, Case, EfficiencyConfig, Row, plan_cases, run_efficiency
from .bench.machine import machine_info
from .bench.overhead import dispatch_overhead
from .errors import AttnZooError, ParameterError
from .registry import PATTERNS, Mechanism, get, list_mechanisms

__all__ = [
    "main",
    "build_parser",
    "mechanism_table_markdown",
    "catalog_ids_covered",
    "pattern_marks",
    "readme_table",
    "with_readme_table",
]

#: Two-letter marks for CAB's four patterns, in :data:`PATTERNS` order.
PATTERN_MARKS = {"noncausal_self": "ns", "causal_self": "cs", "noncausal_cross": "nc", "causal_cross": "cc"}
PATTERN_LEGEND = (
    "Patterns (CAB): ns noncausal self, cs causal self, nc noncausal cross, cc causal cross; -- not supported."
)
EXIT_USAGE = 2


# --------------------------------------------------------------------------------------------
# list
# --------------------------------------------------------------------------------------------
def pattern_marks(mech: Mechanism) -> str:
    """The four CAB patterns as marks, ``--`` where the mechanism lacks one: ``ns cs -- --``."""
    return " ".join(PATTERN_MARKS[p] if p in mech.patterns else "--" for p in PATTERNS)


def _catalog_sort_key(cat_id: str) -> tuple[str, int, str]:
    match = re.fullmatch(r"([A-Za-z]+)(\d+)(.*)", cat_id)
    if match is None:
        return (cat_id, 0, "")
    return (match.group(1), int(match.group(2)), match.group(3))


def catalog_ids_covered(mechs: Iterable[Mechanism]) -> list[str]:
    """The distinct catalog ids the mechanisms implement, sorted by letter then number."""
    return sorted({c for m in mechs for c in m.catalog}, key=_catalog_sort_key)


def coverage_line(mechs: Iterable[Mechanism]) -> str:
    """``catalog ids covered: D1 D2 (2)``."""
    ids = catalog_ids_covered(mechs)
    return f"catalog ids covered: {' '.join(ids)} ({len(ids)})"


def _mechanism_cells(mech: Mechanism) -> list[str]:
    return [
        mech.name,
        mech.family,
        " ".join(mech.catalog),
        pattern_marks(mech),
        ", ".join(mech.backends),
        "exact" if mech.exact else "approximate",
        "yes" if mech.decoder is not None else "no",
        mech.summary,
    ]


LIST_COLUMNS = ("name", "family", "catalog", "patterns", "backends", "exact", "decoding", "summary")


def _markdown_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def mechanism_table_markdown(mechs: Optional[Sequence[Mechanism]] = None) -> str:
    """The mechanism table as GitHub Markdown (the README's table), with legend and coverage.

    Deterministic plain text: the same registry gives the same bytes.
    """
    mechs = list_mechanisms() if mechs is None else list(mechs)
    lines = ["| " + " | ".join(LIST_COLUMNS) + " |", "|" + "---|" * len(LIST_COLUMNS)]
    for mech in mechs:
        cells = _mechanism_cells(mech)
        cells[0] = f"`{cells[0]}`"
        lines.append("| " + " | ".join(_markdown_cell(c) for c in cells) + " |")
    return "\n".join(lines + ["", PATTERN_LEGEND, "", coverage_line(mechs)]) + "\n"


WIDE_CONSOLE = 120


def mechanism_table(mechs: Sequence[Mechanism], width: int = WIDE_CONSOLE) -> Table:
    """The mechanism table for a terminal ``width`` columns wide.

    Below :data:`WIDE_CONSOLE` columns each summary goes under its name instead of in a column
    of its own, so no column is squeezed to nothing.
    """
    wide = width >= WIDE_CONSOLE
    columns = LIST_COLUMNS if wide else LIST_COLUMNS[:-1]
    table = Table(title=f"attnzoo {__version__}: registered mechanisms", caption=PATTERN_LEGEND)
    longest_name = max((len(m.name) for m in mechs), default=4)
    for col in columns:
        grows = col == ("summary" if wide else "name")
        table.add_column(
            col,
            no_wrap=not grows and col != "catalog",
            overflow="fold",
            ratio=1 if grows else None,
            min_width=longest_name if col == "name" else None,  # a name never breaks
        )
    for mech in mechs:
        cells = [Text(c) for c in _mechanism_cells(mech)]
        cells[4] = Text("\n".join(mech.backends))  # one backend a line keeps the column narrow
        if not wide:
            cells[0] = Text.assemble((mech.name, "bold"), "\n", (mech.summary, "dim"))
            cells.pop()
        table.add_row(*cells)
    return table


README_START, README_END = "<!-- mechanisms:start -->", "<!-- mechanisms:end -->"


def readme_table(readme_text: str) -> str:
    """The text between the README's mechanism markers (the lines after the start marker)."""
    start, end = readme_text.find(README_START), readme_text.find(README_END)
    if start < 0 or end < start:
        raise ValueError(f"README: no {README_START} ... {README_END} block")
    return readme_text[start + len(README_START) : end].lstrip("\n")


def with_readme_table(readme_text: str, table: str) -> str:
    """``readme_text`` with the block between the mechanism markers replaced by ``table``."""
    readme_table(readme_text)  # the markers must be there
    head, rest = readme_text.split(README_START, 1)
    tail = rest.split(README_END, 1)[1]
    return f"{head}{README_START}\n{table}{README_END}{tail}"


def _write_readme(path: Path, console: Console) -> int:
    """Replace the mechanism table of the README at ``path`` (between its markers)."""
    mechs = list_mechanisms()
    try:
        path.write_text(with_readme_table(path.read_text(), mechanism_table_markdown(mechs)))
    except (OSError, ValueError) as err:
        raise ParameterError(f"--write-readme: {err}", argument="write_readme") from None
    console.print(Text(f"wrote the table of {len(mechs)} mechanisms into {path}"))
    return 0


def _cmd_list(args: argparse.Namespace, console: Console) -> int:
    mechs = list_mechanisms(args.family)
    if args.write_readme:
        return _write_readme(Path(args.write_readme), console)
    if args.markdown:
        console.out(mechanism_table_markdown(mechs), end="", highlight=False)
        return 0
    console.print(mechanism_table(mechs, console.width))
    console.print(Text(coverage_line(mechs)))
    return 0


# --------------------------------------------------------------------------------------------
# info
# --------------------------------------------------------------------------------------------
def _facts_table(mech: Mechanism) -> Table:
    info = mech.info()
    facts = Table.grid(padding=(0, 2))
    facts.add_column(style="bold", no_wrap=True)
    facts.add_column(overflow="fold")
    function = mech.function
    rows = [
        ("summary", info["summary"]),
        ("family", info["family"]),
        ("catalog", info["catalog"]),
        ("formula", info["formula"]),
        ("cost", info["cost"]),
        ("paper", info["paper"]),
        ("patterns", info["patterns"]),
        ("exact", "yes" if info["exact"] else "no (approximation)"),
        ("decoding", "yes (init_state / step)" if info["decoding"] else "no"),
        ("spatial dims", ", ".join(str(d) for d in mech.spatial_dims)),
        ("GQA/MQA", "yes" if mech.gqa else "no"),
        ("function", f"{function.__module__}.{function.__name__}" if function is not None else "-"),
    ]
    for key, value in rows:
        facts.add_row(key, Text(str(value)))
    return facts


def _params_table(mech: Mechanism) -> Table:
    table = Table(title="parameters", title_justify="left")
    for col in ("name", "type", "default", "doc"):
        table.add_column(col, no_wrap=col in ("name", "default"), overflow="fold")
    for name, type_name, default, doc in mech.info()["params"]:
        table.add_row(Text(name), Text(type_name or "-"), Text(default), Text(doc))
    return table


def _backend_details(backend) -> Text:
    caps = backend.capabilities()
    text = Text(backend.doc or "-")
    text.append(f"\ndevices: {caps['devices']}; dtypes: {caps['dtypes']}", style="dim")
    text.append(f"\nautograd: {caps['autograd']}; limits: {caps['limits']}", style="dim")
    text.append(f"; priority: {caps['priority']}; compiles: {caps['compiles']}", style="dim")
    text.append(f"\nmemory: {caps['memory']}", style="dim")
    if caps["preference"] != "-":
        text.append(f"\npreference: {caps['preference']}", style="dim")
    return text


def _backends_table(mech: Mechanism) -> Table:
    table = Table(
        title="backends, by priority (dispatch takes the first that accepts the inputs)", title_justify="left"
    )
    table.add_column("backend", no_wrap=True, style="bold")
    table.add_column("what it is, and what it declares", overflow="fold")
    for backend in mech.dispatch_order():
        table.add_row(Text(backend.name), _backend_details(backend))
    return table


def _cmd_info(args: argparse.Namespace, console: Console) -> int:
    mech = get(args.name)
    console.print(Panel(_facts_table(mech), title=f"[bold]{mech.name}[/]", title_align="left"))
    console.print(_params_table(mech) if mech.params else Text("parameters: none"))
    console.print(_backends_table(mech))
    return 0


# --------------------------------------------------------------------------------------------
# bench
# --------------------------------------------------------------------------------------------
def _machine_text(m: dict[str, str]) -> Text:
    parts = [
        f"machine: {m['cpu']}, {m['cores']} cores, load {m['load']}",
        f"torch {m['torch']} ({m['threads']} threads)",
        f"attnzoo {m['attnzoo']}",
        f"python {m['python']}",
        f"device {m['device']}" + (f" ({m['gpu']})" if "gpu" in m else ""),
    ]
    return Text(" | ".join(parts))


def _busy_machine_warning(m: dict[str, str]) -> Optional[Text]:
    """A warning when other work keeps the CPUs busy (CPU timings are then noisy), else None."""
    try:
        load, cores = float(m["load"]), int(m["cores"])
    except ValueError:
        return None
    if load < 0.5 * cores:
        return None
    return Text(
        f"note: load average {load:.2f} on {cores} cores: other work is running, timings will be noisy", "yellow"
    )


def _bench_title(config: EfficiencyConfig) -> str:
    dtype = str(config.dtype).replace("torch.", "")
    pattern = config.pattern.replace("_", " ")
    heads = f"H={config.heads}" if config.kv_heads in (None, config.heads) else f"Hq={config.heads} Hkv={config.kv_heads}"
    shape = f"B={config.batch} {heads} D={config.head_dim} {dtype} on {config.device}"
    if config.queries is not None:
        shape = f"Nq={config.queries} over N keys, " + shape
    if config.spatial is not None:
        shape = "grid " + "x".join(map(str, config.spatial)) + " (flattened for 1D mechanisms), " + shape
    what = "forward + backward time (train)" if config.mode == "train" else "forward time (inference)"
    return f"{what}, {pattern} attention, {shape}"


def bench_table(rows: Sequence[Row], config: EfficiencyConfig) -> Table:
    """The efficiency table: one section per length, ratio against the baseline at that length."""
    table = Table(
        title=_bench_title(config),
        caption=f"ratio = median / median of {BASELINE[0]} {BASELINE[1]} at the same N{_baseline_times(rows)}; IQR = q3 - q1",
    )
    for col, justify in (("N", "right"), ("mechanism", "left"), ("backend", "left"), ("median ms", "right")):
        table.add_column(col, justify=justify, no_wrap=True)  # type: ignore[arg-type]
    for col in ("IQR ms", "ratio", "reps"):
        table.add_column(col, justify="right", no_wrap=True)
    table.add_column("note", overflow="fold")
    previous = None
    for row in rows:
        if previous is not None and row.length != previous:
            table.add_section()
        previous = row.length
        table.add_row(*_bench_cells(row))
    return table


def _baseline_times(rows: Sequence[Row]) -> str:
    """The baseline's median per length (ratios are relative to it, even when its row is not shown)."""
    base: dict[int, float] = {}
    for row in rows:
        if row.timing is not None and row.ratio and row.length not in base:
            base[row.length] = row.timing.median_ms / row.ratio
    return " (" + ", ".join(f"{t:.1f} ms at N={n}" for n, t in base.items()) + ")" if base else ""


def _bench_cells(row: Row) -> list[Text]:
    t = row.timing
    if t is None:
        numbers = ["-", "-", "-", "-"]
    else:
        ratio = f"{row.ratio:.2f}x" if row.ratio is not None else "-"
        numbers = [f"{t.median_ms:.3f}", f"{t.iqr_ms:.3f}", ratio, str(t.repeats)]
    cells = [str(row.length), row.mechanism, row.backend, *numbers, row.note]
    texts = [Text(c) for c in cells]
    if t is None:
        texts[-1].stylize("dim")
    return texts


def _config_from_args(args: argparse.Namespace) -> EfficiencyConfig:
    spatial = args.spatial
    return EfficiencyConfig(
        lengths=(math.prod(spatial),) if spatial else tuple(args.lengths),
        spatial=spatial,
        overrides=tuple(args.set or ()),
        backends=tuple(args.backends) if args.backends else None,
        batch=args.batch,
        heads=args.heads,
        kv_heads=args.kv_heads,
        head_dim=args.head_dim,
        dtype=DTYPES[args.dtype],
        device=args.device,
        causal=args.causal,
        mechanisms=tuple(args.mechanisms) if args.mechanisms else None,
        budget_s=args.budget,
        max_repeats=args.max_repeats,
        include_compiled=args.include_compiled,
        mode=args.mode,
        queries=args.queries,
        max_scores=args.max_scores,
    )


def _run_with_progress(config: EfficiencyConfig, console: Console) -> list[Row]:
    total = len(plan_cases(config))
    columns = (
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task("timing", total=total)

        def show(case: Case) -> None:
            progress.update(task, description=f"{case.mechanism}/{case.backend} N={case.length}")

        def advance(case: Case) -> None:
            progress.update(task, advance=1)

        return run_efficiency(config, on_case=advance, on_start=show)


def _cmd_bench(args: argparse.Namespace, console: Console) -> int:
    config = _config_from_args(args)
    for name in config.mechanisms or ():
        get(name)  # an unknown name fails before any timing
    threads = torch.get_num_threads()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        if args.overhead:
            _print_overhead(args, console)
        else:
            _print_bench(config, console)
    finally:
        torch.set_num_threads(threads)  # main() may run inside a longer-lived process
    return 0


def _print_overhead(args: argparse.Namespace, console: Console) -> None:
    console.print(_machine_text(machine_info("cpu")))
    table = Table(title="dispatch overhead: attnzoo.attention(q, k, v) against F.scaled_dot_product_attention, paired")
    for col in ("N", "raw SDPA ms", "attnzoo ms", "paired ratio (IQR)", "extra us", "dispatch alone us", "backend"):
        table.add_column(col, justify="right" if col != "backend" else "left")
    for length in args.lengths:
        o = dispatch_overhead(length, batch=args.batch, heads=args.heads, head_dim=args.head_dim)
        table.add_row(
            str(o.length), f"{o.raw_ms:.3f}", f"{o.attnzoo_ms:.3f}", f"{o.ratio:.4f} ({o.ratio_q1:.3f}-{o.ratio_q3:.3f})",
            f"{o.extra_us:.1f}", f"{o.dispatch_us:.1f}", o.backend,
        )
    console.print(table)


def _print_bench(config: EfficiencyConfig, console: Console) -> None:
    machine = machine_info(config.device)
    console.print(_machine_text(machine))
    warning = _busy_machine_warning(machine)
    if warning is not None:
        console.print(warning)
    start = time.perf_counter()
    rows = _run_with_progress(config, console)
    console.print(bench_table(rows, config))
    timed = sum(not r.skipped for r in rows)
    console.print(Text(f"{timed} timed, {len(rows) - timed} skipped, in {time.perf_counter() - start:.1f} s"))


# --------------------------------------------------------------------------------------------
# the parser
# --------------------------------------------------------------------------------------------
def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return value


def _available_device(text: str) -> str:
    """A cpu or cuda device this machine has (``cuda:1`` too)."""
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"expected cpu or cuda, got {text!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"expected cpu or cuda, got {text!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"CUDA is not available here (torch {torch.__version__})")
    return text


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _override(text: str) -> tuple[str, Any]:
    name, sep, value = text.partition("=")
    if not sep or not name.isidentifier():
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    try:
        return name, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return name, value  # a bare word: a string option such as rescale=mean


def _grid(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(part) for part in text.lower().split("x"))
    except ValueError:
        sizes = ()
    if not 1 <= len(sizes) <= 3 or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"expected 1-3 positive sizes joined by 'x' (e.g. 128x128), got {text!r}")
    return sizes


def _add_bench_parser(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser("bench", help="time every mechanism x backend against softmax/sdpa")
    bench.add_argument("--lengths", type=_positive_int, nargs="+", default=[256, 1024, 4096], help="sequence lengths N")
    bench.add_argument("--batch", type=_positive_int, default=1, help="batch size B (default 1)")
    bench.add_argument("--heads", type=_positive_int, default=8, help="heads H (default 8)")
    bench.add_argument("--kv-heads", type=_positive_int, help="key/value heads (default: --heads; fewer: GQA/MQA)")
    bench.add_argument("--head-dim", type=_positive_int, default=64, help="head dim D (default 64)")
    bench.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="default float32")
    bench.add_argument(
        "--device", type=_available_device, default=_default_device(), help="cpu or cuda (default: cuda when available)"
    )
    bench.add_argument("--mechanisms", nargs="+", metavar="NAME", help="only these mechanisms (default: all)")
    bench.add_argument("--backends", nargs="+", metavar="NAME", help="only these backends of each mechanism (default: all; the baseline rows stay)")
    bench.add_argument("--budget", type=_positive_float, default=0.5, help="seconds of timed repeats per case")
    bench.add_argument("--max-repeats", type=_positive_int, default=50, help="repeat cap per case (default 50)")
    bench.add_argument("--threads", type=_positive_int, help="torch intra-op threads (default: torch's choice)")
    bench.add_argument("--causal", action="store_true", help="causal self-attention instead of noncausal")
    bench.add_argument("--mode", choices=("forward", "train"), default="forward", help="forward (inference) or train (forward + backward)")
    bench.add_argument("--queries", type=_positive_int, help="fixed number of queries over N keys (decoding shape; cross pattern)")
    bench.add_argument(
        "--set", type=_override, nargs="+", metavar="NAME=VALUE",
        help="override a parameter of the mechanisms that take it, e.g. kernel_size=13 window='(512, 0)' (Python literals)",
    )
    bench.add_argument(
        "--spatial", type=_grid,
        help="a 2D/3D token grid such as 128x128 or 16x32x32 (replaces --lengths): spatial mechanisms get the grid, others its N tokens",
    )
    bench.add_argument(
        "--max-scores", type=_positive_int, default=2048 * 2048,
        help="skip backends that materialize Nq x Nk scores (the references) above this many (default 2048^2)",
    )
    bench.add_argument("--overhead", action="store_true", help="measure dispatch overhead over raw SDPA at each length (paired calls)")
    bench.add_argument(
        "--include-compiled", action="store_true", help="also time torch.compile'd backends (~20 s per shape on CPU)"
    )
    bench.set_defaults(run=_cmd_bench)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``attnzoo``."""
    parser = argparse.ArgumentParser(prog="attnzoo", description="Attention mechanisms behind one interface.")
    parser.add_argument("--version", action="version", version=f"attnzoo {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    lister = sub.add_parser("list", help="the registered mechanisms")
    lister.add_argument("--family", help="only this family")
    lister.add_argument("--markdown", action="store_true", help="a GitHub Markdown table (the README's)")
    lister.add_argument(
        "--write-readme", nargs="?", const="README.md", metavar="PATH", help="rewrite the table in PATH (README.md)"
    )
    lister.set_defaults(run=_cmd_list)
    info = sub.add_parser("info", help="one mechanism: formula, cost, paper, parameters, backends")
    info.add_argument("name", help="a registered mechanism (see attnzoo list)")
    info.set_defaults(run=_cmd_info)
    _add_bench_parser(sub)
    return parser


#: Width used when stdout is not a terminal (a CI log, a pipe, a file): rich would fall back to
#: 80 columns and fold the benchmark's notes into slivers; COLUMNS still overrides it.
PIPE_WIDTH = 160


def _stdout_console() -> Console:
    if sys.stdout.isatty() or os.environ.get("COLUMNS"):
        return Console()
    return Console(width=PIPE_WIDTH)


def main(argv: Optional[Sequence[str]] = None, console: Optional[Console] = None) -> int:
    """Run the command line; returns the exit status (2 for an unknown name or bad usage).

    Output goes to ``console`` (default: stdout); errors to stderr, or to ``console`` if given.
    """
    args = build_parser().parse_args(argv)
    errors = console or Console(stderr=True)
    console = console or _stdout_console()
    try:
        return args.run(args, console)
    except AttnZooError as err:
        errors.print(Text(f"attnzoo: {err}", style="red"))
        return EXIT_USAGE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
