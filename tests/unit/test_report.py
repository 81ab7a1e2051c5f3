"""attnzoo.bench.report: Markdown, PNG and self-contained HTML from a synthetic results database."""

from __future__ import annotations

import re

import pytest

from attnzoo.bench.fits import efficiency_length
from attnzoo.bench.report import (
    README_MARKERS,
    collect,
    readme_section,
    with_readme_section,
    write_report,
)
from attnzoo.bench.results import Result, ResultStore, case_key

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
LENGTHS = (256, 512, 1024, 2048)
MACHINE = {"cpu": "Synthetic CPU 9000", "threads": "2", "torch": "2.13.0", "attnzoo": "0.1.0", "git": "abc1234", "device": "cpu"}


def softmax_ms(n: int) -> float:
    return 1e-6 * n * n + 1e-4 * n + 0.05  # quadratic


def linear_ms(n: int) -> float:
    return 2e-4 * n + 0.3  # linear, dearer at short N


def efficiency_row(mechanism, backend, pattern, n, ms, peak=None, note="", params=None):
    identity = {"m": mechanism, "b": backend, "p": pattern, "n": n, "params": params or {}}
    return Result(
        "efficiency", mechanism, case_key("efficiency", identity), backend=backend, pattern=pattern, mode="forward",
        dtype="float32", device="cpu", batch=1, heads=8, head_dim=64, q_len=n, kv_len=n, params=params or {},
        median_ms=ms, q1_ms=None if ms is None else ms * 0.9, q3_ms=None if ms is None else ms * 1.1,
        peak_bytes=peak, memory_method="tracemalloc-like" if peak else None, note=note,
    )  # fmt: skip


def efficiency_results() -> list[Result]:
    """Two patterns; memory measured for the noncausal one only."""
    rows = []
    for pattern in ("noncausal_self", "causal_self"):
        measured = pattern == "noncausal_self"
        for n in LENGTHS:
            rows.append(efficiency_row("softmax", "sdpa", pattern, n, softmax_ms(n), peak=n * n * 64 if measured else None))
            rows.append(efficiency_row("softmax", "auto", pattern, n, softmax_ms(n) * 1.01, note="dispatch picks sdpa"))
            rows.append(efficiency_row("linear", "chunked", pattern, n, linear_ms(n), peak=n * 4096 + 2**20 if measured else None))
            too_long = n > 1024
            rows.append(
                efficiency_row(
                    "linear", "reference", pattern, n, None if too_long else linear_ms(n) * 3, note="too big" if too_long else ""
                )
            )
    return rows


def mqar_results() -> list[Result]:
    rows = []
    for mech, params, accuracy in (
        ("softmax", {}, 0.99),
        ("linear", {"feature_map": "elu"}, 0.6),
        ("linear", {"feature_map": "taylor"}, 0.8),
    ):
        for d_model in (32, 64):
            for lr in (1e-3, 1e-2):
                acc = accuracy * (0.5 if lr == 1e-3 else 1.0) * (d_model / 64)
                metrics = {"accuracy": acc, "d_model": d_model, "lr": lr, "state_size": d_model * 64, "seq_len": 128}
                key = case_key("mqar", {"m": mech, "p": params, "d": d_model, "lr": lr})
                rows.append(Result("mqar", mech, key, params=params, metrics=metrics))
    return rows


def error_results() -> list[Result]:
    rows = []
    for fmap, err in (("elu", 0.4), ("performer", 0.1)):
        for source, layers in (("random", [None]), ("minilm", [0, 1])):
            for layer in layers:
                metrics = {
                    "rel_error": err * (2 if source == "minilm" else 1),
                    "kl": err / 10,
                    "source": source,
                    "layer": layer,
                    "n_tokens": 128,
                }
                key = case_key("error", {"f": fmap, "s": source, "l": layer})
                rows.append(
                    Result("error", "linear", key, params={"feature_map": fmap}, metrics=metrics, median_ms=0.5 if fmap == "elu" else 2.0)
                )
    return rows


def sparsity_results() -> list[Result]:
    """topk on random inputs (one sample) and MiniLM (two layers, averaged), moba on random only."""
    rows = []
    for mech, source, layer, share, density, mass, rel in (
        ("topk", "random", None, 0.1, 0.1, 0.4, 0.5),
        ("topk", "random", None, 1.0, 1.0, 1.0, 1e-16),
        ("topk", "minilm", 0, 0.1, 0.1, 0.8, 0.2),
        ("topk", "minilm", 1, 0.1, 0.1, 0.6, 0.4),
        ("moba", "random", None, 0.1, 0.2, 0.3, 0.9),
    ):
        metrics = {"share": share, "source": source, "layer": layer, "density": density, "mass": mass, "kl": 0.1, "rel_error": rel}
        rows.append(Result("sparsity", mech, case_key("sparsity", {"m": mech, "s": source, "l": layer, "share": share}), metrics=metrics))
    return rows


def fill(store: ResultStore) -> None:
    for kind, results in (("efficiency", efficiency_results()), ("mqar", mqar_results()), ("error", error_results()), ("sparsity", sparsity_results())):
        run = store.start_run(kind, {"synthetic": True}, MACHINE)
        for result in results:
            store.add(run, result)
        store.finish_run(run)


@pytest.fixture(scope="module")
def db(tmp_path_factory):
    path = tmp_path_factory.mktemp("db") / "results.sqlite"
    with ResultStore(path) as store:
        fill(store)
    return path


@pytest.fixture(scope="module")
def report(db, tmp_path_factory):
    return write_report(db, tmp_path_factory.mktemp("report"))


@pytest.fixture(scope="module")
def markdown(report) -> str:
    return report.markdown.read_text()


def section(text: str, heading_part: str) -> str:
    """The text from the heading containing ``heading_part`` to the next heading of any level."""
    match = re.search(rf"^#+ [^\n]*{re.escape(heading_part)}[^\n]*\n(.*?)(?=^#+ |\Z)", text, re.S | re.M)
    assert match, f"no heading with {heading_part!r}"
    return match.group(1)


def table_row(text: str, *first_cells: str) -> list[str]:
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[: len(first_cells)] == list(first_cells):
            return cells
    raise AssertionError(f"no table row starting {first_cells}")


def test_markdown_names_the_machine(markdown):
    assert "Synthetic CPU 9000" in markdown and "abc1234" in markdown and "2.13.0" in markdown


def test_time_table_has_medians_and_ratios_to_softmax_sdpa(markdown):
    ns = section(markdown, "noncausal_self · forward")
    base = table_row(ns, "softmax", "sdpa")
    assert base[2] == f"{softmax_ms(256):.3g} ms (1.00x)"
    linear = table_row(ns, "linear", "chunked")
    assert linear[2 + LENGTHS.index(2048)] == f"{linear_ms(2048):.3g} ms ({linear_ms(2048) / softmax_ms(2048):.2f}x)"


def test_cases_that_did_not_run_are_na_with_their_reason(markdown):
    reference = table_row(section(markdown, "noncausal_self · forward"), "linear", "reference")
    assert reference[2 + LENGTHS.index(2048)] == "n/a" and reference[2] != "n/a"
    assert "too big" in reference[-1]


def test_registered_mechanisms_without_the_pattern_are_na(markdown):
    # agent declares noncausal patterns only: it has no causal_self row in the data
    agent = table_row(section(markdown, "causal_self · forward"), "agent")
    assert set(agent[2:-1]) == {"n/a"} and "no causal_self pattern" in agent[-1]


def test_memory_table_in_mib(markdown):
    ns = section(markdown, "noncausal_self · forward")
    assert "Peak memory per call (MiB), measured by tracemalloc-like" in ns
    cells = [line for line in ns.splitlines() if line.startswith("| softmax | sdpa |")]
    assert len(cells) == 2  # the time row, then the memory row
    assert f"| {1024 * 1024 * 64 / 2**20:.3g} |" in cells[1]


def test_efficiency_lengths_for_time_and_memory(markdown):
    expected_time = efficiency_length([(n, softmax_ms(n)) for n in LENGTHS], [(n, linear_ms(n)) for n in LENGTHS])
    expected_memory = efficiency_length([(n, n * n * 64) for n in LENGTHS], [(n, n * 4096 + 2**20) for n in LENGTHS])
    assert expected_time is not None and 200 < expected_time < 1000  # the synthetic curves do cross
    fits = section(markdown, "noncausal_self · forward").split("Efficiency length as CAB defines it")[1]
    assert table_row(fits, "linear", "chunked")[2:] == [str(round(expected_time)), str(round(expected_memory))]
    assert table_row(fits, "linear", "reference")[2:] == [str(round(efficiency_length(
        [(n, softmax_ms(n)) for n in LENGTHS], [(n, linear_ms(n) * 3) for n in LENGTHS[:3]]))), "-"]  # fmt: skip
    assert "| softmax |" not in fits  # vanilla attention is not fitted against itself
    causal_fits = section(markdown, "causal_self · forward").split("Efficiency length as CAB defines it")[1]
    assert table_row(causal_fits, "linear", "chunked")[3] == "-"  # memory not measured: nothing to fit


def test_mqar_table_has_best_accuracy_over_lr_per_variant(markdown):
    mqar = markdown[markdown.index("## MQAR") : markdown.index("## Approximation error")]
    assert "sequence length 128" in mqar
    assert table_row(mqar, "linear (feature_map=taylor)")[1:3] == ["0.400 (lr 0.01)", "0.800 (lr 0.01)"]
    assert table_row(mqar, "linear (feature_map=elu)")[1:3] == ["0.300 (lr 0.01)", "0.600 (lr 0.01)"]
    assert table_row(mqar, "softmax")[1:3] == ["0.495 (lr 0.01)", "0.990 (lr 0.01)"]


def test_error_table_means_over_layers(markdown):
    errors = markdown[markdown.index("## Approximation error") :]
    elu_minilm = table_row(errors, "linear (feature_map=elu)", "minilm")
    assert elu_minilm[2:7] == ["128", "2", "0.8", "0.04", "0.5"]


def test_sparsity_table_means_over_layers_per_share(markdown):
    sparsity = section(markdown, "error against density")
    assert table_row(sparsity, "topk", "minilm")[2:] == ["0.10 / 0.70 / 0.3", "n/a"]
    assert table_row(sparsity, "topk", "random")[2:] == ["0.10 / 0.40 / 0.5", "1.00 / 1.00 / 1e-16"]
    assert table_row(sparsity, "moba", "random")[2:] == ["0.20 / 0.30 / 0.9", "n/a"]


def test_pngs_are_valid_and_not_trivial(report):
    expected = {
        "time_noncausal_self_forward",
        "time_causal_self_forward",
        "memory_noncausal_self_forward",
        "mqar_d_model",
        "mqar_state_size",
        "error_speed",
        "sparsity_density",
    }  # fmt: skip  (no memory plot where no memory was measured)
    assert set(report.images) == expected
    for path in report.images.values():
        data = path.read_bytes()
        assert data[:8] == PNG_MAGIC
        assert len(data) > 10_000, f"{path.name} is suspiciously small"


def test_markdown_links_the_pngs_beside_it(report, markdown):
    for name, path in report.images.items():
        assert f"]({name}.png)" in markdown
        assert path.parent == report.markdown.parent


def test_html_is_self_contained(report):
    page = report.html.read_text()
    assert page.startswith("<!DOCTYPE html>")
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//)""", page)
    assert "<link" not in page and "<script" not in page
    images = re.findall(r'<img [^>]*src="([^"]*)"', page)
    assert len(images) == len(report.images)
    assert all(src.startswith("data:image/png;base64,") for src in images)
    assert "<table>" in page and "<td>n/a</td>" in page
    assert "Synthetic CPU 9000" in page


def test_empty_store_says_so_instead_of_crashing(tmp_path):
    paths = write_report(tmp_path / "empty.sqlite", tmp_path / "out")
    assert "No benchmark results" in paths.notice
    assert "No benchmark results" in paths.markdown.read_text()
    assert "No benchmark results" in paths.html.read_text()
    assert paths.images == {}
    assert "No benchmark results" in readme_section(tmp_path / "empty.sqlite")


def test_run_selects_one_run(db, tmp_path):
    with ResultStore(db) as store:
        mqar_run = next(r["id"] for r in store.runs() if r["kind"] == "mqar")
    data = collect(db, run=mqar_run)
    assert data.mqar and not data.efficiency and not data.error
    assert [r["id"] for r in data.runs] == [mqar_run]


def test_unknown_format_is_refused(db, tmp_path):
    with pytest.raises(ValueError, match="unknown formats"):
        write_report(db, tmp_path, formats=("pdf",))


def test_markdown_without_pngs_has_no_broken_links(db, tmp_path):
    paths = write_report(db, tmp_path, formats=("md",))
    assert paths.images == {} and paths.html is None
    assert ".png)" not in paths.markdown.read_text()


def test_readme_section_links_docs_bench_and_round_trips(db):
    text = readme_section(db)
    assert "(docs/bench/time_noncausal_self_forward.png)" in text
    assert "(docs/bench/mqar_d_model.png)" in text
    assert text.startswith("Measured on Synthetic CPU 9000")
    assert "### Efficiency" in text and "#### noncausal_self · forward" in text
    assert "Peak memory per call" not in text  # the README keeps the time tables only
    ns = section(text, "noncausal_self · forward")
    assert table_row(ns, "softmax", "auto") and table_row(ns, "linear", "chunked")  # the plotted backends
    assert "| linear | reference |" not in ns  # one backend per mechanism in the README
    start, end = README_MARKERS
    readme = f"# x\n\n{start}\nold\n{end}\nrest\n"
    updated = with_readme_section(readme, text)
    assert updated.startswith(f"# x\n\n{start}\n") and updated.endswith(f"{end}\nrest\n") and "old" not in updated
    assert with_readme_section(updated, text) == updated
    with pytest.raises(ValueError, match="no <!-- bench:start -->"):
        with_readme_section("# no markers\n", text)


def cross_row(n: int, q_len: int, ms: float, note: str = "") -> Result:
    return Result(
        "efficiency", "softmax", case_key("efficiency", {"n": n, "q": q_len, "ms": ms}), backend="sdpa", pattern="noncausal_cross",
        mode="forward", dtype="float32", device="cpu", batch=1, heads=8, head_dim=64, q_len=q_len, kv_len=n, median_ms=ms, note=note,
    )  # fmt: skip


def test_cross_runs_with_fixed_and_derived_queries_are_separate_tables(tmp_path):
    with ResultStore(tmp_path / "r.sqlite") as store:
        derived = store.start_run("efficiency", {"queries": None}, MACHINE)
        for n in LENGTHS:
            store.add(derived, cross_row(n, n // 2, 1.0, note=f"got {n // 2} queries"))
        fixed = store.start_run("efficiency", {"queries": 1}, MACHINE)
        for n in LENGTHS:
            store.add(fixed, cross_row(n, 1, 0.5))
        store.add(fixed, cross_row(256, 1, 0.25))  # measured again: the newer row wins its cell
    text = write_report(tmp_path / "r.sqlite", tmp_path / "out", formats=("md",)).markdown.read_text()
    derived_table = section(text, f"Nq={LENGTHS[0] // 2}..{LENGTHS[-1] // 2}")
    assert table_row(derived_table, "softmax", "sdpa")[-1] == f"got {LENGTHS[-1] // 2} queries (at N={LENGTHS[-1]})"
    fixed_row = table_row(section(text, "Nq=1"), "softmax", "sdpa")
    assert fixed_row[2:4] == ["0.25 ms (1.00x)", "0.5 ms (1.00x)"]


def test_a_variant_without_the_parameter_is_labelled_default_and_mqar_without_seq_len_has_no_none(tmp_path):
    db = tmp_path / "r.sqlite"
    with ResultStore(db) as store:
        run = store.start_run("error", {}, MACHINE)
        for i, params in enumerate(({}, {"feature_map": "relu"})):
            metrics = {"rel_error": 0.5 + i, "kl": None, "source": "random", "layer": None, "n_tokens": 64}
            store.add(run, Result("error", "linear", case_key("error", {"i": i}), params=params, metrics=metrics, median_ms=1.0))
        mqar = {"accuracy": 0.9, "d_model": 32, "lr": 0.01, "state_size": 100}  # what bench.mqar stores: no seq_len
        store.add(run, Result("mqar", "linear", case_key("mqar", {}), metrics=mqar))
    md = write_report(db, tmp_path / "out", formats=("md",)).markdown.read_text()
    assert "linear (feature_map=default)" in md and "linear (feature_map=relu)" in md
    assert "None" not in md


def paired_row(mechanism, backend, n, ms, q1, q3, metrics):
    return Result(
        "efficiency", mechanism, case_key("efficiency", {"m": mechanism, "b": backend, "n": n, "paired": True}), backend=backend,
        pattern="noncausal_self", mode="forward", dtype="float32", device="cpu", batch=1, heads=8, head_dim=64, q_len=n, kv_len=n,
        median_ms=ms, q1_ms=q1, q3_ms=q3, metrics=metrics,
    )  # fmt: skip


def test_paired_ratios_unstable_marks_and_useful_gflops(tmp_path):
    flops = 4 * 8 * 256 * 256 * 64
    with ResultStore(tmp_path / "r.sqlite") as store:
        run = store.start_run("efficiency", {}, MACHINE)
        store.add(run, paired_row("softmax", "sdpa", 256, 2.0, 1.9, 2.1, {"ratio": 1.0, "useful_flops": flops}))
        # its stored paired ratio (1.02x) wins over the quotient of the medians (0.3x); the time's IQR 9 ms > 0.6 ms: flagged
        store.add(run, paired_row("softmax", "auto", 256, 0.6, 0.5, 9.5, {"ratio": 1.02, "ratio_q1": 1.0, "ratio_q3": 1.05, "useful_flops": flops}))
        # a steady time but paired ratios spread wider than their median: flagged; no pairs counted: "-"
        store.add(run, paired_row("linear", "chunked", 256, 3.0, 2.9, 3.1, {"ratio": 1.5, "ratio_q1": 0.5, "ratio_q3": 2.5, "useful_flops": None}))
        store.finish_run(run)
    md = write_report(tmp_path / "r.sqlite", tmp_path / "out", formats=("md",)).markdown.read_text()
    ns = section(md, "noncausal_self · forward")
    assert table_row(ns, "softmax", "sdpa")[2] == "2 ms (1.00x)"
    assert table_row(ns, "softmax", "auto")[2] == "0.6 ms (1.02x) !"
    assert table_row(ns, "linear", "chunked")[2] == "3 ms (1.50x) !"
    assert "!: unstable, the IQR exceeds the median" in ns
    gflops = ns.split("Useful GFLOP/s")[1]
    assert table_row(gflops, "softmax", "sdpa")[2] == f"{flops / 2e-3 / 1e9:.3g}"
    assert table_row(gflops, "softmax", "auto")[2] == f"{flops / 0.6e-3 / 1e9:.0f}"
    assert table_row(gflops, "linear", "chunked")[2] == "-"


def test_stable_tables_have_no_marks_and_no_legend(markdown):
    assert " !" not in markdown and "unstable" not in markdown  # the synthetic rows' IQR is 20% of the median
    assert "Useful GFLOP/s" not in markdown  # no row counted its pairs
