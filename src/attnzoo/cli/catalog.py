"""``attnzoo list`` and ``attnzoo info``: the registry as tables, and the README's table.

Everything shown is read from the registry, so a newly registered mechanism appears here (and
in the README table, which is ``attnzoo list --markdown``) without extra code.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Iterable, Optional, Sequence

from rich.console import Console
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from .. import __version__
from .._markers import marked_block, replace_marked_block
from ..errors import ParameterError
from ..nn import ModuleEntry, list_modules
from ..registry import PATTERNS, Mechanism, get, list_mechanisms

__all__ = [
    "PATTERN_MARKS",
    "PATTERN_LEGEND",
    "pattern_marks",
    "catalog_ids_covered",
    "coverage_line",
    "mechanism_table_markdown",
    "mechanism_table",
    "module_table_markdown",
    "module_table",
    "readme_table",
    "with_readme_table",
    "cmd_list",
    "cmd_info",
]

#: Two-letter marks for CAB's four patterns, in :data:`PATTERNS` order.
PATTERN_MARKS = {"noncausal_self": "ns", "causal_self": "cs", "noncausal_cross": "nc", "causal_cross": "cc"}
PATTERN_LEGEND = (
    "Patterns (CAB): ns noncausal self, cs causal self, nc noncausal cross, cc causal cross; -- not supported."
)


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


def catalog_ids_covered(mechs: Iterable[Mechanism], modules: Iterable[ModuleEntry] = (), features: Iterable[str] = ()) -> list[str]:
    """The distinct catalog ids the mechanisms, modules and features implement, sorted by letter then number."""
    ids = {c for m in mechs for c in m.catalog} | {c for e in modules for c in e.catalog} | set(features)
    return sorted(ids, key=_catalog_sort_key)


def coverage_line(mechs: Iterable[Mechanism], modules: Iterable[ModuleEntry] = (), features: Iterable[str] = ()) -> str:
    """``catalog ids covered: D1 D2 (2)``, by the registered mechanisms, modules and features together."""
    ids = catalog_ids_covered(mechs, modules, features)
    return f"catalog ids covered: {' '.join(ids)} ({len(ids)})"


WIDE_CONSOLE = 120

#: Catalog entries that are neither a mechanism nor a layer: tools, caches, analyses, benchmarks.
#: id -> (where it lives, what it is). ``tests/unit/test_cli.py`` imports every path.
FEATURES: dict[str, tuple[str, str]] = {
    "K1": ("attnzoo.registry.Mechanism.init_state", "decoding for every causal mechanism (a state or a KV cache), or a documented refusal"),
    "K2": ("attnzoo.cache.policies.streaming_llm", "sinks + recent window; StreamingLLMCache in generate()"),
    "K3": ("attnzoo.cache.policies.h2o", "heavy hitters + recent; H2OCache in generate()"),
    "K4": ("attnzoo.cache.policies.snapkv", "observation-window votes, pooled; SnapKVCache in generate()"),
    "K5": ("attnzoo.cache.quantized.mixed_precision_kv", "salient tokens in more bits (ZipCache); ZipCacheCache in generate()"),
    "K6": ("attnzoo.cache.policies.pyramid_budgets", "budgets per layer (PyramidKV, LongGen) and per head (MoA spans)"),
    "X1": ("attnzoo.hooks.attention_hooks", "capture and edit attention maps during a forward"),
    "X2": ("attnzoo.masks_epipolar.epipolar_mask", "epipolar mask_mod from two cameras"),
    "V9": ("attnzoo.hooks_calibration.calibrate_sinks", "post-softmax calibration edits (ACT sinks, VAR, per-head modulation)"),
    "A1": ("attnzoo.analysis.rollout", "attention rollout, per-head entropy"),
    "A2": ("attnzoo.analysis.first_token_mass", "sink mass, extreme tokens, value-norm drains"),
    "A3": ("attnzoo.analysis.retrieval_score", "retrieval-head score, head ablation importance"),
    "A4": ("attnzoo.analysis.attention_distance", "attention distance per head, head clustering"),
    "B1": ("attnzoo.bench.efficiency.run_efficiency", "attnzoo bench efficiency: time and memory, four patterns"),
    "B2": ("attnzoo.bench.mqar.run_mqar", "attnzoo bench mqar: multi-query associative recall"),
    "B4": ("attnzoo.bench.mqar.EXTRAPOLATION", "attnzoo bench mqar --preset extrapolation: train at 64, test to 1024"),
    "B5": ("attnzoo.bench.cache_recall.run_cache", "attnzoo bench cache: needle recall at a fixed KV budget"),
    "B6": ("attnzoo.bench.error.run_error", "attnzoo bench error / sparsity: error against exact softmax"),
    "P1": ("attnzoo.distributed.ring_attention", "ring (context-parallel), Ulysses (head-parallel), linear state passing, halo exchange over torch.distributed"),
}


def resolve(path: str):
    """The object a dotted ``module.attribute`` path names (ImportError / AttributeError if none)."""
    import importlib

    parts = path.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for name in parts[cut:]:
            obj = getattr(obj, name)
        return obj
    raise ImportError(path)


def features_table_markdown() -> str:
    """Catalog entries that are tools rather than mechanisms or layers, as Markdown."""
    lines = ["| catalog | where | what |", "|---|---|---|"]
    for cat_id in sorted(FEATURES, key=_catalog_sort_key):
        path, what = FEATURES[cat_id]
        lines.append(f"| {cat_id} | `{path}` | {_markdown_cell(what)} |")
    return "\n".join(lines) + "\n"


MODULE_COLUMNS = ("module", "family", "catalog", "layout", "from_timm", "paper", "summary")


def _module_cells(entry: ModuleEntry) -> list[str]:
    return [
        entry.name,
        entry.family,
        " ".join(entry.catalog),
        entry.layout,
        "yes" if entry.has_from_timm else "-",
        entry.paper,
        entry.summary,
    ]


def module_table_markdown(modules: Optional[Sequence[ModuleEntry]] = None) -> str:
    """The registered modules as GitHub Markdown (the README's second table)."""
    modules = list_modules() if modules is None else list(modules)
    lines = ["| " + " | ".join(MODULE_COLUMNS) + " |", "|" + "---|" * len(MODULE_COLUMNS)]
    for entry in modules:
        cells = _module_cells(entry)
        cells[0] = f"`nn.{cells[0]}`"
        lines.append("| " + " | ".join(_markdown_cell(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def module_table(modules: Sequence[ModuleEntry], width: int = WIDE_CONSOLE) -> Table:
    """The registered modules for a terminal (paper and summary only when it is wide)."""
    columns = MODULE_COLUMNS if width >= WIDE_CONSOLE else MODULE_COLUMNS[:5]
    table = Table(title=f"attnzoo {__version__}: registered modules (attnzoo.nn)")
    for col in columns:
        table.add_column(col, overflow="fold", no_wrap=col in ("module", "family", "from_timm"))
    for entry in modules:
        table.add_row(*[Text(c) for c in _module_cells(entry)[: len(columns)]])
    return table


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
    return "\n".join(lines + ["", PATTERN_LEGEND]) + "\n"


def readme_tables_markdown() -> str:
    """The README's block: the mechanism table, the module table, and the coverage of both."""
    mechs, modules = list_mechanisms(), list_modules()
    return "\n".join(
        [mechanism_table_markdown(mechs), module_table_markdown(modules), features_table_markdown(), coverage_line(mechs, modules, FEATURES) + "\n"]
    )


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
    try:
        return marked_block(readme_text, README_START, README_END)
    except ValueError as err:
        raise ValueError(f"README: {err}") from None


def with_readme_table(readme_text: str, table: str) -> str:
    """``readme_text`` with the block between the mechanism markers replaced by ``table``."""
    readme_table(readme_text)
    return replace_marked_block(readme_text, README_START, README_END, table)


def _write_readme(path: Path, console: Console) -> int:
    """Replace the mechanism table of the README at ``path`` (between its markers)."""
    try:
        path.write_text(with_readme_table(path.read_text(), readme_tables_markdown()))
    except (OSError, ValueError) as err:
        raise ParameterError(f"--write-readme: {err}", argument="write_readme") from None
    console.print(
        Text(f"wrote the tables of {len(list_mechanisms())} mechanisms and {len(list_modules())} modules into {path}")
    )
    return 0


def cmd_list(args: argparse.Namespace, console: Console) -> int:
    if args.write_readme:
        return _write_readme(Path(args.write_readme), console)
    mechs = [] if args.modules else list_mechanisms(args.family)
    modules = list_modules(args.family)
    if args.markdown:
        text = readme_tables_markdown() if args.family is None and not args.modules else (
            (mechanism_table_markdown(mechs) + "\n" if mechs else "") + module_table_markdown(modules)
        )
        console.out(text, end="", highlight=False)
        return 0
    if mechs:
        console.print(mechanism_table(mechs, console.width))
    if modules:
        console.print(module_table(modules, console.width))
    console.print(Text(coverage_line(mechs, modules, FEATURES if args.family is None and not args.modules else ())))
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


def cmd_info(args: argparse.Namespace, console: Console) -> int:
    mech = get(args.name)
    console.print(Panel(_facts_table(mech), title=f"[bold]{mech.name}[/]", title_align="left"))
    console.print(_params_table(mech) if mech.params else Text("parameters: none"))
    console.print(_backends_table(mech))
    return 0

