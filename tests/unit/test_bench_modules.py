"""``attnzoo bench modules``: a row per registered module, stored, reported."""

from __future__ import annotations

import math

from attnzoo.bench.modules import ModulesConfig, run_modules
from attnzoo.bench.report import collect
from attnzoo.bench.results import ResultStore
from attnzoo.cli import main
from attnzoo.nn import get_module


def test_run_modules_measures_params_flops_and_both_timings(tmp_path):
    config = ModulesConfig(modules=("DifferentialAttention",), size="test", budget_s=0.01, max_repeats=2)
    with ResultStore(tmp_path / "r.sqlite") as store:
        rows = run_modules(config, store)
        stored = store.results(kind="modules")
    (row,) = rows
    module = get_module("DifferentialAttention").build("test")
    assert row.params == sum(p.numel() for p in module.parameters())
    assert row.output_shape == (2, 17, 32) and row.note == ""
    assert row.gflops is not None and row.gflops > 0
    assert row.forward.median_ms > 0 and row.train is not None and row.train.median_ms > 0
    assert stored[0]["mechanism"] == "DifferentialAttention" and stored[0]["metrics"]["params"] == row.params
    assert collect(tmp_path / "r.sqlite").modules[0]["metrics"]["output"] == [2, 17, 32]


def test_a_failing_module_is_a_row_with_its_error(tmp_path, monkeypatch):
    import attnzoo.bench.modules as bench_modules

    def broken(entry, config):
        raise RuntimeError("boom")

    monkeypatch.setattr(bench_modules, "measure", broken)
    (row,) = run_modules(ModulesConfig(modules=("DifferentialAttention",), size="test"))
    assert row.note == "RuntimeError: boom" and math.isnan(row.forward.median_ms)


def test_cli_bench_modules(tmp_path, capsys):
    status = main(["bench", "modules", "--modules", "DifferentialAttention", "--size", "test", "--budget", "0.01",
                   "--max-repeats", "2", "--no-train", "--db", str(tmp_path / "r.sqlite")])
    assert status == 0
    out = capsys.readouterr().out
    assert "DifferentialAttention" in out and "1 modules" in out
