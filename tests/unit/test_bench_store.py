"""The benchmark's results store (SQLite) and its peak-memory measurement."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import textwrap

import pytest
import torch

from attnzoo.bench.memory import cpu_method_available, peak_memory
from attnzoo.bench.results import Result, ResultStore, case_key, default_db_path, to_json


def test_results_round_trip_with_json_columns_and_latest(tmp_path):
    with ResultStore(tmp_path / "r.sqlite") as store:
        run = store.start_run("mqar", {"lr": [1e-3]}, {"cpu": "x"})
        key = case_key("mqar", {"mechanism": "linear", "d_model": 64})
        store.add(run, Result("mqar", "linear", key, params={"feature_map": "elu", "proj": torch.zeros(2, 3)}, metrics={"accuracy": 0.5}))
        store.add(run, Result("mqar", "linear", key, metrics={"accuracy": 0.75}))
        store.add(run, Result("mqar", "softmax", case_key("mqar", {"mechanism": "softmax"}), metrics={"accuracy": 1.0}))
        store.finish_run(run)
        rows = store.results(kind="mqar")
        assert [r["metrics"]["accuracy"] for r in rows] == [0.5, 0.75, 1.0]
        assert rows[0]["params"] == {"feature_map": "elu", "proj": "tensor(2, 3)"}
        assert [r["metrics"]["accuracy"] for r in store.results(kind="mqar", latest=True)] == [0.75, 1.0]
        assert store.done(key) and not store.done("nope") and store.find(key)["metrics"]["accuracy"] == 0.75
        assert store.results(kind="efficiency") == [] and store.runs()[0]["config"] == {"lr": [0.001]}


def test_a_killed_run_keeps_every_case_it_finished(tmp_path):
    """Each add() commits: a process killed after two adds leaves two rows (and an unfinished run)."""
    db = tmp_path / "r.sqlite"
    script = textwrap.dedent(
        f"""
        import os
        from attnzoo.bench.results import Result, ResultStore
        store = ResultStore({str(db)!r})
        run = store.start_run("efficiency", {{}}, {{}})
        for i in range(2):
            store.add(run, Result("efficiency", "softmax", f"case{{i}}", median_ms=float(i)))
        os._exit(9)  # no close, no finish_run
        """
    )
    assert subprocess.run([sys.executable, "-c", script]).returncode == 9
    with ResultStore(db) as store:
        assert [r["case_key"] for r in store.results()] == ["case0", "case1"]
        assert store.runs()[0]["finished"] is None


def test_store_refuses_a_database_of_another_schema_version(tmp_path):
    db = tmp_path / "r.sqlite"
    sqlite3.connect(db).execute("PRAGMA user_version = 99").connection.commit()
    with pytest.raises(RuntimeError, match="schema version 99"):
        ResultStore(db)


def test_default_path_follows_attnzoo_db_then_the_cache_directory(monkeypatch, tmp_path):
    monkeypatch.setenv("ATTNZOO_DB", str(tmp_path / "x.sqlite"))
    assert default_db_path() == tmp_path / "x.sqlite"
    monkeypatch.delenv("ATTNZOO_DB")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_db_path() == tmp_path / "attnzoo" / "results.sqlite"


def test_case_keys_are_stable_and_tell_cases_apart():
    a = case_key("efficiency", {"n": 256, "mechanism": "softmax", "dtype": torch.float32})
    assert a == case_key("efficiency", {"dtype": torch.float32, "mechanism": "softmax", "n": 256})  # order-free
    assert a != case_key("efficiency", {"n": 512, "mechanism": "softmax", "dtype": torch.float32})
    assert a != case_key("error", {"n": 256, "mechanism": "softmax", "dtype": torch.float32})
    assert to_json({"f": torch.sigmoid}) == '{"f": "sigmoid"}'


@pytest.mark.skipif(not cpu_method_available(), reason="needs /proc/self/clear_refs (Linux) and glibc")
def test_cpu_peak_memory_sees_the_temporaries_of_the_call_and_not_what_existed_before():
    existing = torch.ones(64 << 20 >> 2)  # 64 MiB allocated before: not counted
    extra, method = peak_memory(lambda: torch.ones(32 << 20 >> 2).sum() + existing.sum())
    assert method == "rss-hwm"
    # RSS moves by a few hundred KiB on its own (the interpreter's own pages): 1 MiB of slack
    assert 31 << 20 <= extra < 40 << 20, extra / 2**20

    def two_temporaries():
        a = torch.ones(16 << 20 >> 2)
        b = torch.ones(16 << 20 >> 2)  # both alive: the peak holds 32 MiB
        return (a + b).sum()  # and their sum: 48 MiB

    extra, _ = peak_memory(two_temporaries)
    assert 47 << 20 <= extra < 56 << 20, extra / 2**20
    extra, _ = peak_memory(lambda: None)
    assert extra < 4 << 20
