"""The attnzoo command line: list, info, bench (tiny shapes), error exit codes."""

from __future__ import annotations

import io
import re
import subprocess
import sys

import pytest
import torch
from rich.console import Console

import attnzoo
from attnzoo.bench.efficiency import AUTO, BASELINE, NOT_DECLARED, RAW_TORCH, EfficiencyConfig, plan_cases, quick_config, run_efficiency
from attnzoo.bench.results import ResultStore
from attnzoo.cli import catalog_ids_covered, main, mechanism_table_markdown, pattern_marks
from attnzoo.cli.catalog import FEATURES, module_table_markdown, readme_tables_markdown, resolve
from attnzoo.registry import PATTERNS

TINY_BENCH = ["bench", "--lengths", "16", "32", "--budget", "0.01", "--max-repeats", "3", "--device", "cpu", "--patterns", "noncausal_self"]


def run_cli(*argv: str, width: int = 200) -> tuple[int, str]:
    """Exit status and everything printed (output and errors) by ``attnzoo *argv``."""
    buffer = io.StringIO()
    status = main(list(argv), console=Console(file=buffer, width=width, color_system=None))
    return status, buffer.getvalue()


def all_mechanisms():
    return attnzoo.list_mechanisms()


# --------------------------------------------------------------------------------------------
# list
# --------------------------------------------------------------------------------------------
def test_list_table_shows_every_mechanism_and_the_coverage_line():
    status, out = run_cli("list")
    assert status == 0
    for mech in all_mechanisms():
        assert mech.name in out
        assert pattern_marks(mech) in out
        for backend in mech.backends:
            assert backend in out
    for entry in attnzoo.nn.list_modules():
        assert entry.name in out
    ids = catalog_ids_covered(all_mechanisms(), attnzoo.nn.list_modules(), FEATURES)
    coverage = " ".join(out[out.rindex("catalog ids covered:") :].split())  # the line wraps at the console's width
    assert coverage == f"catalog ids covered: {' '.join(ids)} ({len(ids)})"


def test_coverage_counts_module_catalog_ids():
    toy = attnzoo.nn.ModuleEntry(name="Toy", cls=object, catalog=("M99",), family="vision", paper="-", layout="-")
    assert catalog_ids_covered([], [toy]) == ["M99"]
    assert catalog_ids_covered([attnzoo.get("softmax")], [toy])[-1] == "M99"


def test_list_modules_only():
    status, out = run_cli("list", "--modules", "--markdown")
    assert status == 0
    assert out == module_table_markdown()
    rows = [line for line in out.splitlines() if line.startswith("| `nn.")]
    assert len(rows) == len(attnzoo.nn.list_modules()) > 0


def test_list_narrow_terminal_keeps_summaries():
    status, out = run_cli("list", width=80)
    assert status == 0
    assert max(len(line) for line in out.splitlines()) <= 80
    flat = re.sub(r"[\s│]+", " ", out)
    for mech in all_mechanisms():
        assert mech.summary.split()[0] in flat


def test_list_markdown_is_the_rendered_table_one_row_per_mechanism():
    status, out = run_cli("list", "--markdown")
    assert status == 0
    assert out == readme_tables_markdown()
    assert out.startswith(mechanism_table_markdown())
    assert "\x1b[" not in out  # plain text, no terminal codes
    lines = out.splitlines()
    assert lines[0] == "| name | family | catalog | patterns | backends | exact | decoding | summary |"
    assert lines[1] == "|---|---|---|---|---|---|---|---|"
    rows = [line for line in lines[2:] if line.startswith("| `") and not line.startswith("| `nn.")]
    assert [row.split(" | ")[0] for row in rows] == [f"| `{m.name}`" for m in all_mechanisms()]
    softmax = next(row for row in rows if row.startswith("| `softmax`"))
    assert "| dense | D1 D2 D3 L9 | ns cs nc cc |" in softmax
    assert lines[-1].startswith("catalog ids covered: ") and "D1" in lines[-1]


def test_markdown_escapes_pipes_and_pattern_marks_show_gaps():
    mech = attnzoo.get("softmax")
    assert pattern_marks(mech) == "ns cs nc cc"
    causal_only = type(mech)(
        name="toy|pipe",
        family="toy",
        catalog=("Z9", "Z10"),
        paper="-",
        formula="-",
        cost="-",
        summary="a | b",
        patterns=frozenset({"causal_self"}),
    )
    assert pattern_marks(causal_only) == "-- cs -- --"
    table = mechanism_table_markdown([causal_only])
    assert "| `toy\\|pipe` |" in table and "| a \\| b |" in table
    assert catalog_ids_covered([causal_only]) == ["Z9", "Z10"]  # numeric, not string, order


def test_list_write_readme_replaces_only_the_marked_block(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# title\n\n<!-- mechanisms:start -->\nold table\n<!-- mechanisms:end -->\n\nrest\n")
    status, out = run_cli("list", "--write-readme", str(readme))
    assert status == 0 and str(readme) in out
    expected = (
        "# title\n\n<!-- mechanisms:start -->\n" + readme_tables_markdown() + "<!-- mechanisms:end -->\n\nrest\n"
    )
    assert readme.read_text() == expected


def test_list_family_filter_and_unknown_family():
    status, out = run_cli("list", "--family", "dense", "--markdown")
    assert status == 0 and "`softmax`" in out
    status, out = run_cli("list", "--family", "no-such-family")
    assert status == 2
    assert "no family 'no-such-family'" in out and "dense" in out


# --------------------------------------------------------------------------------------------
# info
# --------------------------------------------------------------------------------------------
def test_info_softmax_shows_formula_paper_every_param_and_backend():
    mech = attnzoo.get("softmax")
    status, out = run_cli("info", "softmax")
    assert status == 0
    for text in (mech.formula, mech.cost, "FlashAttention-2", "noncausal_self, causal_self"):
        assert text in out
    for param in mech.params:
        assert re.search(rf"│ {param.name} +│", out), param.name
        assert param.doc.split()[0] in out
    for name, backend in mech.backends.items():
        assert re.search(rf"│ {name} +│", out), name
        assert backend.doc.split("\n")[0][:40] in out
    assert "priority: 10, cuda: 40" in out  # flex's per-device priority
    assert "compiles: yes" in out and "compiles: no" in out


def test_info_unknown_exits_2_and_names_the_registered_mechanisms():
    status, out = run_cli("info", "no_such_mechanism")
    assert status == 2
    assert "no mechanism 'no_such_mechanism'" in out
    for mech in all_mechanisms():
        assert mech.name in out


def test_python_dash_m_runs_the_cli_without_traceback_on_errors():
    result = subprocess.run(
        [sys.executable, "-m", "attnzoo", "info", "no_such_mechanism"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert "registered: " in result.stderr and "softmax" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


# --------------------------------------------------------------------------------------------
# bench
# --------------------------------------------------------------------------------------------
def expected_cases(pattern: str, lengths) -> set:
    """Every backend of the mechanisms that declare ``pattern``, one "-" row for the others."""
    return {(m.name, b, n) for n in lengths for m in all_mechanisms() for b in (m.backends if pattern in m.patterns else ("-",))}


def test_bench_rows_cover_every_mechanism_backend_and_length():
    config = EfficiencyConfig(lengths=(16, 32), budget_s=0.01, max_repeats=3, memory=False)
    rows = run_efficiency(config)
    expected = expected_cases("noncausal_self", (16, 32))
    expected |= {row for n in (16, 32) for row in ((BASELINE[0], AUTO, n), (*RAW_TORCH, n))}  # the library's own rows
    assert {(r.mechanism, r.backend, r.length) for r in rows} == expected
    assert len(rows) == len(expected)
    for row in rows:
        if row.skipped:
            assert row.note, f"{row} skipped without a reason"
            assert row.ratio is None
        else:
            assert row.timing.median_ms > 0 and row.timing.repeats >= 1
            assert row.ratio is not None and row.ratio > 0
    baseline = [r for r in rows if (r.mechanism, r.backend) == BASELINE]
    assert [r.ratio for r in baseline] == [1.0, 1.0]
    flex = [r for r in rows if (r.mechanism, r.backend) == ("softmax", "flex")]
    assert all(r.skipped and "--include-compiled" in r.note for r in flex)


def test_bench_skips_score_materializing_backends_on_long_inputs_and_reports_declines():
    cases = plan_cases(EfficiencyConfig(lengths=(8192,), mechanisms=("softmax",)))
    for name in ("reference", "split_kv"):  # both hold Nq x Nk scores
        case = next(c for c in cases if c.backend == name)
        assert case.skip is not None and "Nq x Nk" in case.skip
    sdpa = next(c for c in cases if c.backend == "sdpa")
    assert sdpa.skip is None
    # one query over 64k keys is a small score matrix: the decoding shape runs them all
    decode = plan_cases(EfficiencyConfig(lengths=(65536,), mechanisms=("softmax",), queries=1, patterns=("noncausal_cross",)))
    assert all(c.skip is None for c in decode if c.backend in ("reference", "split_kv"))
    assert EfficiencyConfig(queries=1).q_len(65536, "causal_cross") == 1 and EfficiencyConfig().q_len(64, "noncausal_cross") == 32
    assert EfficiencyConfig().q_len(64, "causal_self") == 64
    # flex takes no float64: with compiled backends included it is skipped for that reason
    config = EfficiencyConfig(
        lengths=(16,), dtype=torch.float64, mechanisms=("softmax",), include_compiled=True, budget_s=0.01, max_repeats=2
    )
    flex = next(r for r in run_efficiency(config) if r.backend == "flex")
    assert flex.skipped and flex.note.startswith("declines: ") and "float64" in flex.note


@pytest.mark.parametrize("pattern", PATTERNS)
def test_bench_gives_one_na_case_to_mechanisms_without_the_pattern(pattern):
    cases = plan_cases(EfficiencyConfig(patterns=(pattern,), lengths=(64,)))
    assert {c.pattern for c in cases} == {pattern}
    for mech in all_mechanisms():
        mine = [c for c in cases if c.mechanism == mech.name]
        if pattern in mech.patterns:
            assert {c.backend for c in mine} >= set(mech.backends) and all(c.skip != NOT_DECLARED for c in mine)
        else:
            assert [(c.backend, c.skip) for c in mine] == [("-", NOT_DECLARED)]


def test_bench_config_rejects_unknown_patterns_and_quick_config_covers_all_four():
    with pytest.raises(ValueError, match="patterns"):
        EfficiencyConfig(patterns=("sideways",))
    quick = quick_config()
    assert quick.patterns == PATTERNS and quick.mechanisms is None and max(quick.lengths) <= 4096 and quick.dispatch_only
    cases = plan_cases(quick)
    for mech in all_mechanisms():
        for pattern in PATTERNS:
            mine = {c.backend for c in cases if c.mechanism == mech.name and c.pattern == pattern and c.length == 256}
            want = ({"auto", "sdpa"} if mech.name == "softmax" else {"auto"}) if pattern in mech.patterns else {"-"}
            assert mine == want, (mech.name, pattern)


def test_dispatch_only_times_the_backend_dispatch_picks():
    config = EfficiencyConfig(lengths=(32,), mechanisms=("softmax", "linear"), patterns=("causal_self",), dispatch_only=True, budget_s=0.01, max_repeats=2)
    rows = {(r.mechanism, r.backend): r for r in run_efficiency(config)}
    assert set(rows) == {("softmax", "sdpa"), ("softmax", "auto"), ("linear", "auto")}
    assert rows[("linear", "auto")].note == "dispatch picks chunked" and rows[("linear", "auto")].timing is not None


def test_bench_writes_every_row_to_the_store_and_resume_reads_them_back(tmp_path):
    config = EfficiencyConfig(lengths=(16,), mechanisms=("softmax", "linear"), patterns=("noncausal_self", "causal_cross"), budget_s=0.01, max_repeats=2)
    with ResultStore(tmp_path / "r.sqlite") as store:
        rows = run_efficiency(config, store=store)
        stored = store.results(kind="efficiency")
        assert len(stored) == len(rows) and len(store.runs("efficiency")) == 1
        by_case = {(r["mechanism"], r["backend"], r["pattern"]): r for r in stored}
        sdpa = by_case[("softmax", "sdpa", "causal_cross")]
        assert sdpa["q_len"] == 8 and sdpa["kv_len"] == 16 and sdpa["median_ms"] > 0 and sdpa["metrics"]["ratio"] == 1.0
        assert sdpa["memory_method"] in ("rss-hwm", "unavailable") and store.runs()[0]["machine"]["torch"] == torch.__version__
        assert store.runs()[0]["finished"] is not None
        started = []
        again = run_efficiency(config, store=store, resume=True, on_start=started.append)
        assert [(r.mechanism, r.backend, r.pattern, r.timing) for r in again] == [(r.mechanism, r.backend, r.pattern, r.timing) for r in rows]
        assert len(started) == len(rows) and len(store.results(kind="efficiency")) == len(rows)  # nothing run or written twice


def test_bench_cli_prints_machine_and_a_row_per_case():
    status, out = run_cli(*TINY_BENCH)
    assert status == 0
    assert out.startswith("machine: ") and f"torch {torch.__version__}" in out and "attnzoo " in out
    table_rows = [line for line in out.splitlines() if re.match(r"│ +(16|32) │", line)]
    n_cases = len(expected_cases("noncausal_self", (16, 32))) + 4  # + the auto and raw torch rows
    assert len(table_rows) == n_cases
    header = next(line for line in out.splitlines() if "median ms" in line)
    assert [c.strip() for c in header.strip("│┃").split("┃")] == ["N", "mechanism", "backend", "median ms", "IQR ms", "ratio", "reps", "peak MiB", "GFLOP/s", "note"]
    for line in table_rows:
        cells = [c.strip() for c in line.strip("│").split("│")]
        ratio, peak, gflops, note = cells[5], cells[7], cells[8], cells[9]
        assert re.fullmatch(r"\d+\.\d\dx", ratio) or (ratio == "-" and note), line
        assert re.fullmatch(r"\d+\.\d", peak) or peak == "-", line
        assert re.fullmatch(r"[\d.]+(e[+-]\d+)?", gflops) or gflops in ("", "-"), line
        if cells[1] == "softmax" and cells[2] == "sdpa":
            assert gflops, "dense softmax always has its pairs"
    assert "paired ratios" in out and "! unstable: IQR > median" in out  # the caption and its legend
    assert re.search(r"\d+ timed, \d+ skipped, in [\d.]+ s", out)


def test_bench_table_flags_unstable_rows_and_shows_useful_gflops():
    from attnzoo.bench.efficiency import Row
    from attnzoo.bench.timing import Timing
    from attnzoo.cli.bench import bench_table

    rows = [
        Row("softmax", "sdpa", 256, Timing(1.0, 0.95, 1.05, 9), 1.0, useful_flops=2e9),
        Row("softmax", "auto", 256, Timing(0.6, 0.5, 9.5, 9), 1.01, "dispatch picks sdpa", ratio_q1=0.99, ratio_q3=1.03, baseline_ms=1.0),
        Row("linear", "chunked", 256, Timing(2.0, 1.9, 2.1, 9), 2.0, ratio_q1=0.5, ratio_q3=3.0, baseline_ms=1.0),
    ]
    buffer = io.StringIO()
    Console(file=buffer, width=250, color_system=None).print(bench_table(rows, EfficiencyConfig(), "noncausal_self"))
    lines = {c[1] + "/" + c[2]: c for c in ([x.strip() for x in line.strip("│").split("│")] for line in buffer.getvalue().splitlines() if line.startswith("│"))}
    assert lines["softmax/sdpa"][8] == "2000" and lines["softmax/sdpa"][9] == ""  # 2e9 FLOPs in 1 ms
    assert lines["softmax/auto"][9] == "! unstable; dispatch picks sdpa" and lines["softmax/auto"][8] == ""  # time IQR 9 ms > 0.6 ms
    assert lines["linear/chunked"][9] == "! unstable"  # paired ratios 0.5..3.0 around 2.0
    assert "1.0 ms at N=256" in buffer.getvalue() and "! unstable: IQR > median" in buffer.getvalue()


def test_bench_cli_causal_and_patterns_options_choose_the_tables(tmp_path):
    db = str(tmp_path / "r.sqlite")
    status, out = run_cli("bench", "--lengths", "16", "--budget", "0.01", "--max-repeats", "1", "--mechanisms", "softmax", "--causal", "--db", db)
    assert status == 0 and "causal self attention" in out and "noncausal" not in out and f"results in {db}" in out
    status, out = run_cli("bench", "efficiency", "--lengths", "16", "--budget", "0.01", "--max-repeats", "1", "--mechanisms", "linear", "--patterns", "cross", "--no-memory", "--db", db)
    assert status == 0 and "noncausal cross attention" in out and "causal cross attention" in out and " self " not in out
    with ResultStore(db) as store:
        assert {r["pattern"] for r in store.results()} == {"causal_self", "noncausal_cross", "causal_cross"}


def test_bench_cli_threads_option_applies_during_the_run_only():
    before = torch.get_num_threads()
    status, out = run_cli(*TINY_BENCH, "--threads", "1", "--mechanisms", "softmax")
    assert status == 0
    assert "(1 threads)" in out
    assert torch.get_num_threads() == before


def test_bench_cli_unknown_mechanism_exits_2_before_timing():
    status, out = run_cli("bench", "--mechanisms", "no_such_mechanism", "--lengths", "16")
    assert status == 2
    assert "no mechanism 'no_such_mechanism'" in out and "machine:" not in out


def test_bench_spatial_grid_runs_spatial_mechanisms_on_the_grid_with_overrides():
    config = EfficiencyConfig(lengths=(64,), spatial=(8, 8), mechanisms=("neighborhood", "softmax"), budget_s=0.01, max_repeats=1, overrides=(("kernel_size", 3), ("stride", 3)))
    rows = run_efficiency(config)
    nbr = {r.backend: r for r in rows if r.mechanism == "neighborhood"}
    assert nbr["gathered"].timing is not None or "declines" in nbr["gathered"].note
    assert nbr["reference"].timing is not None and nbr["tiled"].timing is not None
    assert any(r.mechanism == "softmax" and r.timing is not None for r in rows)  # softmax on the 64 flattened tokens
    status, out = run_cli(
        "bench", "--spatial", "8x8", "--patterns", "noncausal_self", "--mechanisms", "neighborhood", "--backends", "reference", "--set", "kernel_size=(3, 5)", "--budget", "0.01", "--max-repeats", "1"
    )
    assert status == 0 and "grid 8x8" in out and re.search(r"│ +64 │ neighborhood +│ reference", out)
    assert not re.search(r"neighborhood +│ tiled", out)  # --backends keeps only the named ones


@pytest.mark.parametrize(
    "bad",
    [["--lengths", "0"], ["--budget", "-1"], ["--dtype", "int8"], ["--device", "xyz"], ["--device", "meta"], ["--spatial", "8x0"], ["--spatial", "axb"], ["--set", "kernel_size"], ["--patterns", "sideways"]],
)
def test_bench_cli_rejects_bad_options(bad):
    with pytest.raises(SystemExit) as exc:
        main(["bench", *bad], console=Console(file=io.StringIO()))
    assert exc.value.code == 2


def test_piped_output_is_wide_enough_for_the_bench_notes(capsys, monkeypatch):
    """Not a terminal (CI logs, pipes): rows stay on one line instead of folding at 80 columns."""
    monkeypatch.delenv("COLUMNS", raising=False)
    assert main(["bench", "--lengths", "16", "--budget", "0.01", "--max-repeats", "2", "--mechanisms", "softmax", "--device", "cpu", "--patterns", "noncausal_self"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if "split_kv" in line]
    assert len(rows) == 1 and "not preferred" in rows[0] and len(rows[0]) > 80


# --------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------
def test_report_cli_without_a_database_says_so(tmp_path):
    status, out = run_cli("report", "--db", str(tmp_path / "none.sqlite"), "--out", str(tmp_path / "out"))
    assert status == 1 and "run `attnzoo bench` first" in out


def test_report_cli_writes_the_files_and_the_readme_section(tmp_path):
    db = str(tmp_path / "r.sqlite")
    assert run_cli("bench", "--lengths", "16", "32", "64", "--budget", "0.01", "--max-repeats", "1", "--mechanisms", "softmax", "linear", "--patterns", "causal_self", "--db", db)[0] == 0
    status, out = run_cli("report", "--db", db, "--out", str(tmp_path / "out"), "--format", "md", "html")
    assert status == 0 and "report: " in out
    md = (tmp_path / "out" / "report.md").read_text()
    assert "causal_self" in md and "| linear | chunked |" in md and (tmp_path / "out" / "report.html").is_file()
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\n<!-- bench:start -->\nold\n<!-- bench:end -->\ntail\n")
    status, out = run_cli("report", "--db", db, "--out", str(tmp_path / "out"), "--format", "md", "--readme", str(readme))
    text = readme.read_text()
    assert status == 0 and "old" not in text and "linear" in text and text.endswith("<!-- bench:end -->\ntail\n")
    assert any((tmp_path / "docs" / "bench").glob("*.png"))


def test_bench_error_cli_prints_the_error_table_and_stores_it(tmp_path):
    db = str(tmp_path / "r.sqlite")
    status, out = run_cli("bench", "error", "--source", "random", "--lengths", "32", "--mechanisms", "linear", "--vary", "feature_map=relu,taylor", "--budget", "0.01", "--max-repeats", "1", "--db", db)
    assert status == 0 and "approximation error" in out
    assert re.search(r"│ linear +│ feature_map=taylor +│ +\d\.\d+ │", out), out
    with ResultStore(db) as store:
        rows = store.results(kind="error")
        assert {r["metrics"]["variant"] for r in rows} >= {"feature_map=relu", "feature_map=taylor"} and all(r["metrics"]["rel_error"] > 0 for r in rows)


def test_bench_mqar_cli_trains_stores_and_tabulates(tmp_path):
    db = str(tmp_path / "r.sqlite")
    argv = ["bench", "mqar", "--mechanisms", "linear", "agent", "--d-models", "16", "--lrs", "0.01", "--epochs", "1", "--max-steps", "2", "--threads", "1", "--db", db]
    status, out = run_cli(*argv)
    assert status == 0 and re.search(r"│ linear +│ +16 │ +\d\.\d{3} │ +0\.01 │ +\d+ │", out) and "not run: agent" in out
    with ResultStore(db) as store:
        assert {r["mechanism"] for r in store.results(kind="mqar")} == {"linear", "agent"}


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["bench"], ["bench", "efficiency", "--quick"]),
        (["bench", "--db", "x.sqlite", "--threads", "1"], ["bench", "efficiency", "--quick", "--db", "x.sqlite", "--threads", "1"]),
        (["bench", "--lengths", "16"], ["bench", "efficiency", "--lengths", "16"]),
        (["bench", "mqar", "--epochs", "1"], ["bench", "mqar", "--epochs", "1"]),
        (["list"], ["list"]),
    ],
)
def test_bench_alone_is_the_quick_run_and_options_mean_efficiency(argv, expected):
    from attnzoo.cli.bench import normalize_bench_argv

    assert normalize_bench_argv(argv) == expected


def test_every_feature_path_resolves_and_its_id_is_not_a_registered_one():
    registered = set(catalog_ids_covered(all_mechanisms(), attnzoo.nn.list_modules()))
    for cat_id, (path, what) in FEATURES.items():
        assert resolve(path) is not None, path
        assert what and cat_id not in registered, cat_id
