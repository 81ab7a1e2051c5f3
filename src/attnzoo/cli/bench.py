"""``attnzoo bench`` and ``attnzoo report``: run the benchmarks, render their results.

The runners of :mod:`attnzoo.bench` return data and write the results store; this module is
where they meet the terminal (rich tables and progress bars).
"""

from __future__ import annotations

import argparse
import ast
import math
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from ..bench.efficiency import (
    BASELINE,
    CPU_LENGTHS,
    DTYPES,
    GPU_LENGTHS,
    Case,
    EfficiencyConfig,
    Row,
    plan_cases,
    quick_config,
    run_efficiency,
)
from ..bench.error import SOURCES, ErrorConfig, ErrorRow, run_error, table as error_table
from ..bench.distributed import add_distributed_parser
from ..bench.cache_recall import POLICIES, CacheConfig, CacheRow, plot_cache, run_cache
from ..bench.modules import ModuleRow, ModulesConfig, run_modules
from ..bench.sparsity import SHARES, SparsityConfig, SparsityRow, plot_sparsity, run_sparsity
from ..bench.machine import machine_info
from ..bench.mqar import PRESETS as MQAR_PRESETS
from ..bench.mqar import best_over_lr, run_mqar
from ..bench.mqar import preset as mqar_preset
from ..bench.overhead import dispatch_overhead
from ..bench.report import FORMATS, collect, readme_section, with_readme_section, write_report
from ..bench.results import ResultStore, default_db_path
from ..registry import PATTERNS, get

__all__ = ["add_bench_parser", "add_report_parser", "bench_table", "BENCH_KINDS", "DEFAULT_REPORT_DIR"]

#: Where ``attnzoo report`` (and the quick ``attnzoo bench``) write, relative to the working directory.
DEFAULT_REPORT_DIR = "attnzoo-report"

#: The subcommands of ``attnzoo bench``; options without one mean ``efficiency``.
BENCH_KINDS = ("efficiency", "mqar", "error", "sparsity", "modules", "cache", "distributed")
PATTERN_ALIASES = {"all": PATTERNS, "self": ("noncausal_self", "causal_self"), "cross": ("noncausal_cross", "causal_cross")}


def _machine_text(m: dict[str, str]) -> Text:
    parts = [
        f"machine: {m['cpu']}, {m['cores']} cores, load {m['load']}",
        f"torch {m['torch']} ({m['threads']} threads)",
        f"attnzoo {m['attnzoo']} ({m.get('git', 'unknown')[:12]})",
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


def _bench_title(config: EfficiencyConfig, pattern: str) -> str:
    dtype = str(config.dtype).replace("torch.", "")
    heads = f"H={config.heads}" if config.kv_heads in (None, config.heads) else f"Hq={config.heads} Hkv={config.kv_heads}"
    shape = f"B={config.batch} {heads} D={config.head_dim} {dtype} on {config.device}"
    if pattern.endswith("_cross"):
        shape = ("Nq=N/2" if config.queries is None else f"Nq={config.queries}") + " over N keys, " + shape
    if config.spatial is not None:
        shape = "grid " + "x".join(map(str, config.spatial)) + " (flattened for 1D mechanisms), " + shape
    what = "forward + backward (train)" if config.mode == "train" else "forward (inference)"
    return f"{pattern.replace('_', ' ')} attention, {what}, {shape}"


#: The mark of an unstable row (its IQR exceeds its median), and the legend that explains it.
UNSTABLE_MARK = "!"
UNSTABLE_LEGEND = f"{UNSTABLE_MARK} unstable: IQR > median (of the times, or of the paired ratios): noise, not a measurement; rerun on a quieter machine or with a larger --budget"


def bench_table(rows: Sequence[Row], config: EfficiencyConfig, pattern: str) -> Table:
    """The efficiency table of one pattern: a section per length, ratio against the baseline at that length."""
    rows = [r for r in rows if r.pattern == pattern]
    flops = "4 D x allowed (query, key) pairs" + (" x 3.5 (forward + backward)" if config.mode == "train" else "")
    table = Table(
        title=_bench_title(config, pattern),
        caption=f"ratio = median of paired ratios against {BASELINE[0]} {BASELINE[1]} at the same N{_baseline_times(rows)} "
        "(each case's calls interleaved with the baseline's); IQR = q3 - q1; "
        f"GFLOP/s = useful FLOPs ({flops}) / median, blank where the pairs are unknown; peak = extra memory at the call's peak\n"
        + UNSTABLE_LEGEND,
    )
    for col, justify in (("N", "right"), ("mechanism", "left"), ("backend", "left"), ("median ms", "right")):
        table.add_column(col, justify=justify, no_wrap=True)  # type: ignore[arg-type]
    for col in ("IQR ms", "ratio", "reps", "peak MiB", "GFLOP/s"):
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
    """The baseline's median per length (ratios are relative to it, even when its row is not shown):
    its own row's, else its median within the first paired row's pairs."""
    base: dict[int, float] = {}
    for row in rows:
        if (row.mechanism, row.backend) == BASELINE and row.timing is not None:
            base[row.length] = row.timing.median_ms
    for row in rows:
        if row.length not in base and row.timing is not None and row.ratio:
            # rows stored before paired timing have no baseline_ms: their ratio is of the medians
            base[row.length] = row.baseline_ms if row.baseline_ms is not None else row.timing.median_ms / row.ratio
    return " (" + ", ".join(f"{t:.1f} ms at N={n}" for n, t in sorted(base.items())) + ")" if base else ""


def _gflops_cell(gflops: Optional[float]) -> str:
    """Useful GFLOP/s, three significant digits; blank where the pairs are unknown."""
    if gflops is None:
        return ""
    return f"{gflops:.3g}" if gflops < 1000 else f"{gflops:.0f}"


def _bench_cells(row: Row) -> list[Text]:
    t = row.timing
    if t is None:
        numbers = ["-"] * 6
    else:
        ratio = f"{row.ratio:.2f}x" if row.ratio is not None else "-"
        peak = f"{row.peak_bytes / 2**20:.1f}" if row.peak_bytes is not None else "-"
        numbers = [f"{t.median_ms:.3f}", f"{t.iqr_ms:.3f}", ratio, str(t.repeats), peak, _gflops_cell(row.gflops)]
    note = f"{UNSTABLE_MARK} unstable" + (f"; {row.note}" if row.note else "") if row.unstable else row.note
    cells = [str(row.length), row.mechanism, row.backend, *numbers, note]
    texts = [Text(c) for c in cells]
    if t is None:
        texts[-1].stylize("dim")
    elif row.unstable:
        for i in (4, 5):  # the IQR and the ratio: the numbers the flag is about
            texts[i].stylize("yellow")
        texts[-1].stylize("bold yellow", 0, len(UNSTABLE_MARK) + len(" unstable"))
    return texts


def _patterns(args: argparse.Namespace) -> tuple[str, ...]:
    """--patterns, or what --causal / --queries ask for, or all four."""
    if args.patterns:
        chosen: list[str] = []
        for name in args.patterns:
            chosen += [p for p in PATTERN_ALIASES.get(name, (name,)) if p not in chosen]
        return tuple(chosen)
    if args.causal or args.queries is not None:
        return ("causal" if args.causal else "noncausal") + ("_cross" if args.queries is not None else "_self"),
    return PATTERNS


def _config_from_args(args: argparse.Namespace) -> EfficiencyConfig:
    spatial = args.spatial
    default_lengths = GPU_LENGTHS if torch.device(args.device).type == "cuda" else CPU_LENGTHS
    return EfficiencyConfig(
        lengths=(math.prod(spatial),) if spatial else tuple(args.lengths or default_lengths),
        patterns=_patterns(args),
        spatial=spatial,
        overrides=tuple(args.set or ()),
        backends=tuple(args.backends) if args.backends else None,
        batch=args.batch,
        heads=args.heads,
        kv_heads=args.kv_heads,
        head_dim=args.head_dim,
        dtype=DTYPES[args.dtype],
        device=args.device,
        mechanisms=tuple(args.mechanisms) if args.mechanisms else None,
        budget_s=args.budget,
        max_repeats=args.max_repeats,
        include_compiled=args.include_compiled,
        mode=args.mode,
        queries=args.queries,
        max_scores=args.max_scores,
        memory=not args.no_memory,
        dispatch_only=args.dispatch_only,
    )


def _progress(console: Console) -> Progress:
    """The benchmarks' progress bar: what runs, how many of how many, time so far; gone when done."""
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    return Progress(*columns, console=console, transient=True)


@contextmanager
def _counted_progress(console: Console, label: str) -> Iterator[Callable[[int, int, str], None]]:
    """A progress bar driven by a runner's ``on_case(done, total, description)`` callback."""
    with _progress(console) as progress:
        task = progress.add_task(label, total=None)
        yield lambda done, total, what: progress.update(task, completed=done, total=total, description=what)


def _run_with_progress(config: EfficiencyConfig, console: Console, store: Optional[ResultStore], resume: bool) -> list[Row]:
    total = len(plan_cases(config))
    with _progress(console) as progress:
        task = progress.add_task("timing", total=total)

        def show(case: Case) -> None:
            progress.update(task, description=f"{case.pattern} {case.mechanism}/{case.backend} N={case.length}")

        def advance(case: Case) -> None:
            progress.update(task, advance=1)

        return run_efficiency(config, on_case=advance, on_start=show, store=store, resume=resume)


def _with_threads(threads: Optional[int], run: Any) -> Any:
    """``run()`` with torch's intra-op threads set to ``threads``, restored after (main() may run in a longer-lived process)."""
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return run()
    finally:
        torch.set_num_threads(before)


def _cmd_efficiency(args: argparse.Namespace, console: Console) -> int:
    config = quick_config(args.device) if args.quick else _config_from_args(args)
    for name in config.mechanisms or ():
        get(name)  # an unknown name fails before any timing
    if args.overhead:
        return _with_threads(args.threads, lambda: _print_overhead(args, console))
    with ResultStore(args.db) as store:
        _with_threads(args.threads, lambda: _print_bench(config, console, store, args.resume))
    console.print(Text(f"results in {args.db}"))
    if args.quick:  # the README's main job: the run, then its report
        _print_report_paths(write_report(args.db, DEFAULT_REPORT_DIR), console)
    return 0


def _print_report_paths(paths: Any, console: Console) -> None:
    if paths.notice:
        console.print(Text(paths.notice, "yellow"))
    written = [p for p in (paths.markdown, paths.html) if p is not None] + list(paths.images.values())
    if written:
        console.print(Text(f"report: {paths.markdown or paths.html} ({len(paths.images)} plots, {len(written)} files)"))


def _cmd_report(args: argparse.Namespace, console: Console) -> int:
    """``attnzoo report``: the database as Markdown, PNG and HTML; ``--readme``: the README's section too."""
    if not args.db.exists():
        console.print(Text(f"no results database at {args.db}: run `attnzoo bench` first (or pass --db)", "yellow"))
        return 1
    _print_report_paths(write_report(args.db, args.out, run=args.run, formats=args.format), console)
    if args.readme:
        readme = Path(args.readme)
        images = readme.parent / args.images
        write_report(args.db, images, run=args.run, formats=("png",))
        section = readme_section(collect(args.db, run=args.run), image_dir=args.images)
        readme.write_text(with_readme_section(readme.read_text(), section))
        console.print(Text(f"wrote the benchmark section of {readme} (plots in {images})"))
    return 0


def _print_overhead(args: argparse.Namespace, console: Console) -> int:
    console.print(_machine_text(machine_info("cpu")))
    table = Table(title="dispatch overhead: attnzoo.attention(q, k, v) against F.scaled_dot_product_attention, paired")
    for col in ("N", "raw SDPA ms", "attnzoo ms", "paired ratio (IQR)", "extra us", "dispatch alone us", "backend"):
        table.add_column(col, justify="right" if col != "backend" else "left")
    for length in args.lengths or (256, 1024, 4096):
        o = dispatch_overhead(length, batch=args.batch, heads=args.heads, head_dim=args.head_dim)
        table.add_row(
            str(o.length), f"{o.raw_ms:.3f}", f"{o.attnzoo_ms:.3f}", f"{o.ratio:.4f} ({o.ratio_q1:.3f}-{o.ratio_q3:.3f})",
            f"{o.extra_us:.1f}", f"{o.dispatch_us:.1f}", o.backend,
        )
    console.print(table)
    return 0


def _print_bench(config: EfficiencyConfig, console: Console, store: Optional[ResultStore], resume: bool) -> None:
    machine = machine_info(config.device)
    console.print(_machine_text(machine))
    warning = _busy_machine_warning(machine)
    if warning is not None:
        console.print(warning)
    start = time.perf_counter()
    rows = _run_with_progress(config, console, store, resume)
    for pattern in config.patterns:
        console.print(bench_table(rows, config, pattern))
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


def _add_efficiency_options(bench: argparse.ArgumentParser) -> None:
    bench.add_argument("--lengths", type=_positive_int, nargs="+", help="sequence lengths N (default 256 1024 4096 16384; on CUDA up to 131072)")
    bench.add_argument(
        "--patterns", nargs="+", choices=(*PATTERNS, *PATTERN_ALIASES), metavar="PATTERN",
        help="CAB patterns: " + ", ".join(PATTERNS) + ", or all/self/cross (default: all four)",
    )
    bench.add_argument("--causal", action="store_true", help="shorthand for --patterns causal_self (causal_cross with --queries)")
    bench.add_argument("--queries", type=_positive_int, help="queries of the cross patterns (default N/2); alone: the noncausal cross pattern")
    bench.add_argument("--batch", type=_positive_int, default=1, help="batch size B (default 1)")
    bench.add_argument("--heads", type=_positive_int, default=8, help="heads H (default 8)")
    bench.add_argument("--kv-heads", type=_positive_int, help="key/value heads (default: --heads; fewer: GQA/MQA)")
    bench.add_argument("--head-dim", type=_positive_int, default=64, help="head dim D (default 64)")
    bench.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="default float32")
    bench.add_argument("--device", type=_available_device, default=_default_device(), help="cpu or cuda (default: cuda when available)")
    bench.add_argument("--mechanisms", nargs="+", metavar="NAME", help="only these mechanisms (default: all)")
    bench.add_argument("--backends", nargs="+", metavar="NAME", help="only these backends of each mechanism (default: all; the baseline rows stay)")
    bench.add_argument(
        "--budget", type=_positive_float, default=0.5,
        help="seconds of timed repeats per case (default 0.5; a case timed in pairs with the baseline counts both calls)",
    )
    bench.add_argument("--max-repeats", type=_positive_int, default=50, help="repeat cap per case, in pairs with the baseline (default 50)")
    bench.add_argument("--threads", type=_positive_int, help="torch intra-op threads (default: torch's choice)")
    bench.add_argument("--mode", choices=("forward", "train"), default="forward", help="forward (inference) or train (forward + backward)")
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
    bench.add_argument("--dispatch-only", action="store_true", help="time each mechanism through the backend dispatch picks (one 'auto' row) instead of every backend")
    bench.add_argument("--quick", action="store_true", help="the quick run (what `attnzoo bench` alone does): every mechanism through dispatch, the four patterns, N up to 4096, then the report")
    bench.add_argument("--no-memory", action="store_true", help="skip the extra call per case that measures peak memory")
    bench.add_argument("--overhead", action="store_true", help="measure dispatch overhead over raw SDPA at each length (paired calls)")
    bench.add_argument("--include-compiled", action="store_true", help="also time torch.compile'd backends (~20 s per shape on CPU)")
    _add_store_options(bench)
    bench.set_defaults(handler=_cmd_efficiency)


def _add_db_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--db", type=Path, default=default_db_path(), help=f"the results database (default {default_db_path()}; env ATTNZOO_DB)")


def _add_store_options(parser: argparse.ArgumentParser) -> None:
    _add_db_option(parser)
    parser.add_argument("--resume", action="store_true", help="reuse the stored results of identical cases (same machine and commit)")


def add_bench_parser(sub: argparse._SubParsersAction) -> None:
    """``attnzoo bench [efficiency] ...``: with no arguments at all, the quick run of every mechanism."""
    bench = sub.add_parser(
        "bench", help="benchmarks: efficiency (time, memory) of every mechanism x backend; no arguments: the quick run",
        description="attnzoo bench                 the quick efficiency run over every mechanism (the README's main job)\n"
        "attnzoo bench efficiency ...  time and memory, CAB's four patterns (options without a subcommand mean this)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    kinds = bench.add_subparsers(dest="bench_kind", required=True)  # normalize_bench_argv supplies "efficiency"
    _add_efficiency_options(kinds.add_parser("efficiency", help="time and peak memory of every mechanism x backend x pattern x length"))
    _add_mqar_options(kinds.add_parser("mqar", help="multi-query associative recall (Zoology): accuracy against d_model and state size (B2)"))
    _add_error_options(kinds.add_parser("error", help="approximation error against softmax on random and MiniLM q/k/v (B6)"))
    _add_sparsity_options(kinds.add_parser("sparsity", help="content-sparse mechanisms: error and mass kept against density, random and MiniLM q/k/v"))
    _add_cache_options(kinds.add_parser("cache", help="KV-cache eviction policies: needle recall of a model trained here, against KV memory (B5)"))
    add_distributed_parser(kinds)
    _add_modules_options(kinds.add_parser("modules", help="every registered attnzoo.nn module at its standard size: params, GFLOPs, forward and train time"))


# --------------------------------------------------------------------------------------------
# bench mqar (B2)
# --------------------------------------------------------------------------------------------
def _mqar_config(args: argparse.Namespace) -> Any:
    changes: dict[str, Any] = {"device": args.device}
    for name in ("epochs", "max_steps", "batch_size", "seed", "num_heads", "vocab_size"):
        if getattr(args, name) is not None:
            changes[name] = getattr(args, name)
    if args.mechanisms:
        changes["mechanisms"] = tuple(args.mechanisms)
    if args.d_models:
        changes["d_models"] = tuple(args.d_models)
    if args.lrs:
        changes["learning_rates"] = tuple(args.lrs)
    if args.no_short_conv:
        changes["conv_kernel"] = None
    if args.positional:
        changes["positional"] = True
    if args.set:
        changes["overrides"] = tuple(args.set)
    return mqar_preset(args.preset, **changes)


def mqar_table(rows: Sequence[dict[str, Any]]) -> Table:
    """Zoology's view: per mechanism and d_model the best accuracy over the learning rates, and the state."""
    table = Table(title="MQAR: best test accuracy over the learning rates (Zoology's multi-query associative recall)")
    for col, justify in (("mechanism", "left"), ("d_model", "right"), ("accuracy", "right"), ("lr", "right"), ("state size", "right"), ("KV cache", "right")):
        table.add_column(col, justify=justify, no_wrap=True)  # type: ignore[arg-type]
    for r in best_over_lr(rows):
        table.add_row(
            r["mechanism"], str(r["d_model"]), f"{r['accuracy']:.3f}", f"{r['lr']:g}",
            "-" if r.get("state_size") is None else str(r["state_size"]), "-" if r.get("kv_cache_size") is None else str(r["kv_cache_size"]),
        )
    return table


def mqar_length_table(rows: Sequence[dict[str, Any]], config: Any) -> Table:
    """Accuracy per test segment (length) of the best learning rate: B4's extrapolation view."""
    trained = {s.seq_len for s in config.train}
    table = Table(title="MQAR accuracy by test length (* = a length trained on)")
    table.add_column("mechanism")
    table.add_column("d_model", justify="right")
    for segment in config.test:
        table.add_column(f"L={segment.seq_len}{'*' if segment.seq_len in trained else ''}", justify="right")
    for r in best_over_lr(rows):
        cells = [r["by_segment"].get(s.name) for s in config.test]
        table.add_row(r["mechanism"], str(r["d_model"]), *("-" if c is None else f"{c:.3f}" for c in cells))
    return table


def _cmd_mqar(args: argparse.Namespace, console: Console) -> int:
    config = _mqar_config(args)
    for name in config.mechanisms or ():
        get(name)
    machine = machine_info(config.device)
    console.print(_machine_text(machine))
    with ResultStore(args.db) as store, _counted_progress(console, "mqar") as advance:
        results = _with_threads(args.threads, lambda: run_mqar(config, store, machine=machine, resume=args.resume, on_case=advance))
        rows = [r for r in store.results(kind="mqar", latest=True) if r["mechanism"] in {x.mechanism for x in results}]
    console.print(mqar_table(rows))
    if len(config.test) > 1:
        console.print(mqar_length_table(rows, config))
    skipped = sorted({r.mechanism for r in results if r.metrics.get("accuracy") is None})
    if skipped:
        console.print(Text("not run: " + ", ".join(skipped) + " (no causal self pattern, or the note in the database)", "dim"))
    console.print(Text(f"{len(results)} cases; results in {args.db}"))
    return 0


def _add_mqar_options(mqar: argparse.ArgumentParser) -> None:
    mqar.add_argument("--preset", choices=sorted(MQAR_PRESETS), default="cpu", help="cpu (minutes per mechanism on 2 cores, the default), zoology (the paper's) or extrapolation (B4: train at 64, test to 1024)")
    mqar.add_argument("--mechanisms", nargs="+", metavar="NAME", help="only these (default: every mechanism with the causal self pattern)")
    mqar.add_argument("--d-models", type=_positive_int, nargs="+", help="model widths (default: the preset's)")
    mqar.add_argument("--lrs", type=_positive_float, nargs="+", help="learning rates of the sweep (default: the preset's)")
    mqar.add_argument("--epochs", type=_positive_int)
    mqar.add_argument("--max-steps", type=_positive_int, help="cap on optimizer steps")
    mqar.add_argument("--batch-size", type=_positive_int)
    mqar.add_argument("--vocab-size", type=_positive_int)
    mqar.add_argument("--num-heads", type=_positive_int)
    mqar.add_argument("--seed", type=int)
    mqar.add_argument("--no-short-conv", action="store_true", help="the mechanism alone, without the Based recipe's short convolution")
    mqar.add_argument("--positional", action="store_true", help="learned absolute positions")
    mqar.add_argument("--set", type=_override, nargs="+", metavar="NAME=VALUE", help="mechanism parameter overrides, e.g. window='(256, 0)'")
    mqar.add_argument("--device", type=_available_device, default=_default_device())
    mqar.add_argument("--threads", type=_positive_int, help="torch intra-op threads")
    _add_store_options(mqar)
    mqar.set_defaults(handler=_cmd_mqar)


# --------------------------------------------------------------------------------------------
# bench error (B6)
# --------------------------------------------------------------------------------------------
def _error_config(args: argparse.Namespace) -> ErrorConfig:
    variants: tuple = () if args.no_variants else ErrorConfig.variants
    if args.vary:
        variants = tuple(args.vary)
    return ErrorConfig(
        sources=tuple(args.source or SOURCES),
        lengths=tuple(args.lengths),
        batch=args.batch,
        heads=args.heads,
        head_dim=args.head_dim,
        seed=args.seed,
        mechanisms=tuple(args.mechanisms) if args.mechanisms else None,
        variants=variants,
        layers=tuple(args.layers) if args.layers else None,
        kl_max_len=args.kl_max_len,
        dtype=DTYPES[args.dtype],
        device=args.device,
        budget_s=args.budget,
        max_repeats=args.max_repeats,
    )


def _error_cell(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.3g}"


def error_summary_table(rows: Sequence[ErrorRow], config: ErrorConfig) -> Table:
    """One line per mechanism x variant: relative error per random N, MiniLM's mean over layers, KL."""
    lines = error_table(rows)
    table = Table(title="approximation error against exact softmax attention (||O - O*|| / ||O*||; KL(softmax row || row))")
    table.add_column("mechanism", no_wrap=True)
    table.add_column("variant", no_wrap=True)
    randoms = sorted({n for line in lines for n in line["random"]})
    for n in randoms:
        table.add_column(f"random N={n}", justify="right")
    if "minilm" in config.sources:
        table.add_column("MiniLM mean", justify="right")
        table.add_column("KL MiniLM", justify="right")
    table.add_column("note", overflow="fold")
    for line in lines:
        cells = [line["mechanism"], line["variant"] or "-", *(_error_cell(line["random"].get(n)) for n in randoms)]
        if "minilm" in config.sources:
            cells += [_error_cell(line["minilm_mean"]), _error_cell(line["minilm_kl_mean"])]
        table.add_row(*cells, Text(line["note"], "dim"))
    return table


def _cmd_error(args: argparse.Namespace, console: Console) -> int:
    config = _error_config(args)
    for name in config.mechanisms or ():
        get(name)
    console.print(_machine_text(machine_info(config.device)))
    with ResultStore(args.db) as store, _counted_progress(console, "error") as advance:
        try:
            rows = _with_threads(args.threads, lambda: run_error(config, store, resume=args.resume, on_case=advance))
        except ImportError as err:
            console.print(Text(f"attnzoo bench error: {err} (or measure random inputs only: --source random)", "red"))
            return 1
    console.print(error_summary_table(rows, config))
    console.print(Text(f"{len(rows)} cases; results in {args.db}"))
    return 0


def _variant(text: str) -> tuple[str, tuple[Any, ...]]:
    name, sep, values = text.partition("=")
    if not sep or not name.isidentifier() or not values:
        raise argparse.ArgumentTypeError(f"expected NAME=V1,V2,..., got {text!r}")
    return name, tuple(_override(f"{name}={v}")[1] for v in values.split(","))


def _add_error_options(error: argparse.ArgumentParser) -> None:
    error.add_argument("--source", nargs="+", choices=SOURCES, help="random inputs, q/k/v captured from all-MiniLM-L6-v2, or both (default)")
    error.add_argument("--lengths", type=_positive_int, nargs="+", default=list(ErrorConfig.lengths), help="N of the random inputs")
    error.add_argument("--batch", type=_positive_int, default=ErrorConfig.batch)
    error.add_argument("--heads", type=_positive_int, default=ErrorConfig.heads)
    error.add_argument("--head-dim", type=_positive_int, default=ErrorConfig.head_dim)
    error.add_argument("--seed", type=int, default=0)
    error.add_argument("--mechanisms", nargs="+", metavar="NAME", help="only these mechanisms (default: every one with the noncausal self pattern)")
    error.add_argument("--vary", type=_variant, nargs="+", metavar="NAME=V1,V2", help="one case per value for the mechanisms with that parameter (default feature_map=elu,relu,softmax_kernel,taylor)")
    error.add_argument("--no-variants", action="store_true", help="only each mechanism's example parameters")
    error.add_argument("--layers", type=int, nargs="+", help="MiniLM layers (default all 6)")
    error.add_argument("--kl-max-len", type=_positive_int, default=ErrorConfig.kl_max_len, help="KL of rows up to this many keys")
    error.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    error.add_argument("--device", type=_available_device, default=_default_device())
    error.add_argument("--budget", type=_positive_float, default=ErrorConfig.budget_s, help="seconds of timed repeats per case")
    error.add_argument("--max-repeats", type=_positive_int, default=ErrorConfig.max_repeats)
    error.add_argument("--threads", type=_positive_int, help="torch intra-op threads")
    _add_store_options(error)
    error.set_defaults(handler=_cmd_error)


# --------------------------------------------------------------------------------------------
# bench sparsity (issue 13's error-vs-density sweep)
# --------------------------------------------------------------------------------------------
def sparsity_table(rows: Sequence[SparsityRow]) -> Table:
    table = Table(title="content-sparse attention against exact softmax: error and exact mass kept vs density")
    for name, justify in (("mechanism", "left"), ("inputs", "left"), ("share", "right"), ("density", "right"), ("mass kept", "right"),
                          ("KL(p||p*)", "right"), ("rel. error", "right"), ("params / note", "left")):
        table.add_column(name, justify=justify, overflow="fold")
    for r in rows:
        fmt = lambda value, spec: "-" if value is None else format(value, spec)  # noqa: E731
        cells = [fmt(r.density, ".3f"), fmt(r.mass, ".3f"), fmt(r.kl, ".3g"), fmt(r.rel_error, ".3g")]
        shown = ", ".join(f"{k}={v}" for k, v in r.params.items())
        table.add_row(r.mechanism, r.label, f"{r.share:g}", *cells, Text(r.note or shown, "dim"))
    return table


def _cmd_sparsity(args: argparse.Namespace, console: Console) -> int:
    config = SparsityConfig(
        shares=tuple(args.shares), sources=tuple(args.source or SOURCES), lengths=tuple(args.lengths), heads=args.heads,
        mechanisms=tuple(args.mechanisms) if args.mechanisms else None, layers=tuple(args.layers) if args.layers else None,
    )
    for name in config.mechanisms or ():
        get(name)
    with ResultStore(args.db) as store:
        try:
            rows = _with_threads(args.threads, lambda: run_sparsity(config, store))
        except ImportError as err:
            console.print(Text(f"attnzoo bench sparsity: {err} (or measure random inputs only: --source random)", "red"))
            return 1
    console.print(sparsity_table(rows))
    console.print(Text(f"{len(rows)} cases; results in {args.db} (`attnzoo report` plots them)"))
    if args.plot:
        plot_sparsity(rows, str(args.plot))
        console.print(Text(f"plot: {args.plot}"))
    return 0


def _add_sparsity_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shares", type=_positive_float, nargs="+", default=list(SHARES), help="shares of keys asked of each mechanism (<= 1)")
    parser.add_argument("--source", nargs="+", choices=SOURCES, help="random inputs, q/k/v captured from all-MiniLM-L6-v2, or both (default)")
    parser.add_argument("--lengths", type=_positive_int, nargs="+", default=list(SparsityConfig.lengths), help="N of the random inputs")
    parser.add_argument("--heads", type=_positive_int, default=SparsityConfig.heads)
    parser.add_argument("--mechanisms", nargs="+", metavar="NAME", help="only these (default: every mechanism with a sparsity hook)")
    parser.add_argument("--layers", type=int, nargs="+", help="MiniLM layers (default all 6)")
    parser.add_argument("--plot", type=Path, help="write the error/mass vs density plot here (PNG)")
    parser.add_argument("--threads", type=_positive_int, help="torch intra-op threads")
    _add_db_option(parser)
    parser.set_defaults(handler=_cmd_sparsity)


def add_report_parser(sub: argparse._SubParsersAction) -> None:
    report = sub.add_parser("report", help="the results database as Markdown, PNG plots and one self-contained HTML page")
    _add_db_option(report)
    report.add_argument("--out", type=Path, default=Path(DEFAULT_REPORT_DIR), help=f"output directory (default ./{DEFAULT_REPORT_DIR})")
    report.add_argument("--run", type=_positive_int, help="only this run id (default: the newest result of every case)")
    report.add_argument("--format", nargs="+", choices=FORMATS, default=list(FORMATS), help="what to write (default: md png html)")
    report.add_argument("--readme", nargs="?", const="README.md", metavar="PATH", help="also rewrite the benchmark section of PATH (README.md)")
    report.add_argument("--images", default="docs/bench", help="plots for --readme, relative to the README (default docs/bench)")
    report.set_defaults(handler=_cmd_report)


#: Options that keep ``attnzoo bench`` the quick run: where it runs and stores, not what it times.
QUICK_OPTIONS = ("--db", "--resume", "--threads", "--device")


def normalize_bench_argv(argv: Sequence[str]) -> list[str]:
    """``bench --lengths 16`` means ``bench efficiency --lengths 16`` (options without a subcommand);
    ``bench`` alone, or with only :data:`QUICK_OPTIONS`, means ``bench efficiency --quick``."""
    argv = list(argv)
    if not argv or argv[0] != "bench" or (len(argv) >= 2 and argv[1] in (*BENCH_KINDS, "-h", "--help")):
        return argv
    options = [a.split("=", 1)[0] for a in argv[1:] if a.startswith("-")]
    quick = all(o in QUICK_OPTIONS for o in options)
    return [argv[0], "efficiency", *(["--quick"] if quick else []), *argv[1:]]


# --------------------------------------------------------------------------------------------
# bench modules (issue 15: a row per registered module)
# --------------------------------------------------------------------------------------------
def modules_table(rows: Sequence[ModuleRow]) -> Table:
    table = Table(title="registered modules at their standard size (forward: no_grad; train: forward + backward)")
    for name, justify in (("module", "left"), ("family", "left"), ("catalog", "left"), ("input", "left"), ("params", "right"),
                          ("GFLOPs", "right"), ("forward ms", "right"), ("train ms", "right"), ("note", "left")):
        table.add_column(name, justify=justify, overflow="fold")
    for r in rows:
        fmt = lambda value, spec: "-" if value is None or value != value else format(value, spec)  # noqa: E731
        shape = " ".join("x".join(map(str, s)) for s in r.input_shapes)
        table.add_row(
            r.module, r.family, " ".join(r.catalog), shape, f"{r.params:,}", fmt(r.gflops, ".3g"),
            fmt(r.forward.median_ms, ".3g"), fmt(None if r.train is None else r.train.median_ms, ".3g"), Text(r.note, "red"),
        )
    return table


def _cmd_modules(args: argparse.Namespace, console: Console) -> int:
    from ..nn import get_module

    for name in args.modules or ():
        get_module(name)
    config = ModulesConfig(
        modules=tuple(args.modules) if args.modules else None, families=tuple(args.family) if args.family else None,
        size=args.size, budget_s=args.budget, max_repeats=args.max_repeats, train=not args.no_train,
    )
    with ResultStore(args.db) as store:
        rows = _with_threads(args.threads, lambda: run_modules(config, store))
    console.print(modules_table(rows))
    failed = [r.module for r in rows if r.note]
    console.print(Text(f"{len(rows)} modules; results in {args.db}" + (f"; failed: {', '.join(failed)}" if failed else "")))
    return 1 if failed else 0


def _add_modules_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--modules", nargs="+", metavar="NAME", help="only these modules (`attnzoo list --modules` names them)")
    parser.add_argument("--family", nargs="+", help="only these families (vision, cnn, heads, linear, ...)")
    parser.add_argument("--size", choices=("bench", "test"), default="bench", help="the standard size (default) or the test suite's small size")
    parser.add_argument("--budget", type=_positive_float, default=ModulesConfig.budget_s, help="seconds of timed repeats per measure")
    parser.add_argument("--max-repeats", type=_positive_int, default=ModulesConfig.max_repeats)
    parser.add_argument("--no-train", action="store_true", help="forward only")
    parser.add_argument("--threads", type=_positive_int, help="torch intra-op threads")
    _add_db_option(parser)
    parser.set_defaults(handler=_cmd_modules)


# --------------------------------------------------------------------------------------------
# bench cache (issue 14: recall at a fixed KV budget)
# --------------------------------------------------------------------------------------------
def cache_table(rows: Sequence[CacheRow]) -> Table:
    table = Table(title="needle recall from a compressed KV cache (compressed once after the prompt, kvpress's protocol)")
    for name, justify in (("policy", "left"), ("budget", "right"), ("tokens kept", "right"), ("KV KiB", "right"),
                          ("accuracy", "right"), ("ms / token", "right")):
        table.add_column(name, justify=justify)
    for r in rows:
        table.add_row(r.policy, f"{r.budget_fraction:.0%}", str(r.budget_tokens), f"{r.kv_bytes / 1024:.1f}", f"{r.accuracy:.3f}", f"{r.ms_per_token:.2f}")
    return table


def _snapkv_verdict(rows: Sequence[CacheRow]) -> str:
    """Whether SnapKV beats StreamingLLM at equal budgets, budget by budget (the paper's claim)."""
    snap = {r.budget_fraction: r for r in rows if r.policy == "snapkv"}
    stream = {r.budget_fraction: r for r in rows if r.policy == "streaming_llm"}
    cells = [f"{f:.0%}: {snap[f].accuracy:.2f} vs {stream[f].accuracy:.2f}" for f in sorted(snap) if f in stream]
    if not cells:
        return ""
    wins = sum(snap[f].accuracy > stream[f].accuracy for f in snap if f in stream)
    return f"SnapKV vs StreamingLLM (accuracy at each budget): {'; '.join(cells)}; SnapKV higher at {wins} of {len(cells)}"


def _cmd_cache(args: argparse.Namespace, console: Console) -> int:
    changes: dict[str, Any] = {}
    for name in ("num_pairs", "num_questions", "d_model", "train_steps", "batch_size", "lr", "test_examples", "seed"):
        if getattr(args, name) is not None:
            changes[name] = getattr(args, name)
    if args.budgets:
        changes["budgets"] = tuple(args.budgets)
    if args.policies:
        changes["policies"] = tuple(args.policies)
    config = CacheConfig(**changes)
    log = (lambda line: console.print(Text(line, "dim"))) if args.verbose else None
    with ResultStore(args.db) as store:
        trained, rows = _with_threads(args.threads, lambda: run_cache(config, store, log=log))
    console.print(Text(f"trained {trained.steps} steps in {trained.seconds:.0f} s; full-cache accuracy {trained.accuracy:.3f} "
                       f"(prompt S = {config.prompt_length} tokens: {config.num_pairs} pairs, {config.num_questions} questions)"))
    console.print(cache_table(rows))
    verdict = _snapkv_verdict(rows)
    if verdict:
        console.print(Text(verdict))
    if args.plot:
        plot_cache(rows, str(args.plot))
        console.print(Text(f"plot: {args.plot}"))
    return 0


def _add_cache_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--policies", nargs="+", choices=POLICIES, help="eviction policies (default: all, with full as the ceiling)")
    parser.add_argument("--budgets", type=_positive_float, nargs="+", help="fractions of the prompt kept (default 0.1 0.2 0.3 0.5)")
    parser.add_argument("--num-pairs", type=_positive_int, help=f"key-value pairs in the prompt (default {CacheConfig.num_pairs})")
    parser.add_argument("--num-questions", type=_positive_int, help=f"keys asked (default {CacheConfig.num_questions})")
    parser.add_argument("--d-model", type=_positive_int)
    parser.add_argument("--train-steps", type=_positive_int, help=f"optimizer steps (default {CacheConfig.train_steps})")
    parser.add_argument("--batch-size", type=_positive_int)
    parser.add_argument("--lr", type=_positive_float)
    parser.add_argument("--test-examples", type=_positive_int)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--threads", type=_positive_int, help="torch intra-op threads")
    parser.add_argument("--plot", type=Path, help="write accuracy against KV memory to this PNG")
    parser.add_argument("--verbose", action="store_true", help="print the training loss and each case as it finishes")
    _add_db_option(parser)
    parser.set_defaults(handler=_cmd_cache)
