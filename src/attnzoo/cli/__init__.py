"""The ``attnzoo`` command: list the registry, explain one mechanism, benchmark them all.

    attnzoo list [--family F] [--markdown]   mechanisms, their catalog ids, patterns, backends; modules
    attnzoo list --modules                     the registered modules (attnzoo.nn), layout, timm counterpart
    attnzoo list --write-readme [PATH]         refresh the README's table (between its markers)
    attnzoo info NAME                          formula, cost, paper, parameters, backends
    attnzoo bench                              the quick efficiency run over every mechanism, then its report
    attnzoo bench efficiency [...]             time and peak memory, CAB's four patterns, into the results database
    attnzoo report [--db] [--out] [--readme]   the database as Markdown, PNG plots and one HTML page
    attnzoo analyze [SENTENCE ...] [--out]     attention analyses on MiniLM: report.md, heatmaps

Everything shown is read from the registry, so a newly registered mechanism appears here (and
in the README table, which is ``attnzoo list --markdown``) without extra code. This package is
the only place that prints (through rich): :mod:`.catalog` for list and info, :mod:`.bench`
for the benchmarks and the report.
"""


from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

from rich.console import Console
from rich.text import Text

from .. import __version__
from ..errors import AttnZooError
from .analyze import add_analyze_parser
from .bench import add_bench_parser, add_report_parser, normalize_bench_argv
from .catalog import (
    catalog_ids_covered,
    cmd_info,
    cmd_list,
    mechanism_table_markdown,
    pattern_marks,
    readme_table,
    with_readme_table,
)

__all__ = [
    "main",
    "build_parser",
    "mechanism_table_markdown",
    "catalog_ids_covered",
    "pattern_marks",
    "readme_table",
    "with_readme_table",
]

EXIT_USAGE = 2


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``attnzoo``."""
    parser = argparse.ArgumentParser(prog="attnzoo", description="Attention mechanisms behind one interface.")
    parser.add_argument("--version", action="version", version=f"attnzoo {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    lister = sub.add_parser("list", help="the registered mechanisms")
    lister.add_argument("--family", help="only this family")
    lister.add_argument("--markdown", action="store_true", help="a GitHub Markdown table (the README's)")
    lister.add_argument("--modules", action="store_true", help="only the registered modules (attnzoo.nn)")
    lister.add_argument(
        "--write-readme", nargs="?", const="README.md", metavar="PATH", help="rewrite the table in PATH (README.md)"
    )
    lister.set_defaults(handler=cmd_list)
    info = sub.add_parser("info", help="one mechanism: formula, cost, paper, parameters, backends")
    info.add_argument("name", help="a registered mechanism (see attnzoo list)")
    info.set_defaults(handler=cmd_info)
    add_bench_parser(sub)
    add_report_parser(sub)
    add_analyze_parser(sub)
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
    argv = normalize_bench_argv(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    errors = console or Console(stderr=True)
    console = console or _stdout_console()
    try:
        return args.handler(args, console)
    except AttnZooError as err:
        errors.print(Text(f"attnzoo: {err}", style="red"))
        return EXIT_USAGE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
