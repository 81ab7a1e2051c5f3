"""The figures of ``benchmarks/gpu_check.sh``, from its efficiency results database.

    python benchmarks/gpu_check_summary.py RESULTS.sqlite [OUT_DIR]

Writes ``summary.md`` and ``summary.json`` to OUT_DIR (default: the database's folder) and prints
the Markdown. Two checks of issue 12's GPU section, each per pattern, mode and length:

* dense: ``softmax``'s ``flex`` against its ``sdpa`` (flash) on the same inputs; the figure is
  SDPA time / flex time, the target >= 0.9;
* local: each local mechanism's fastest backend (and its ``flex``) against dense ``softmax`` /
  ``sdpa`` at the same N, B, H, D and dtype; the figure is local time / dense time, the target < 1
  (faster than dense). Where the benchmark counted each pattern's allowed (query, key) pairs, the
  useful GFLOP/s are shown too: throughput at each pattern's own density.

Ratios are the benchmark's paired ratios (each case timed interleaved with the baseline) when the
database has them, else ratios of the medians.

Rows that did not run keep their note (``declines: ...``, ``error: ...``), so a failure shows up
here too. Reads the SQLite file directly (the schema of ``attnzoo.bench.results``), standard
library only.
"""

from __future__ import annotations

import json
import sqlite3
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

DENSE = "softmax"
BASELINE = ("softmax", "sdpa")
NOT_A_BACKEND = ("auto", "F.sdpa", "-", "reference")  # dispatch and raw rows; the spec, never a fast path
DENSE_TARGET = 0.9


def _rows(db: Path) -> list[dict[str, Any]]:
    con = sqlite3.connect(db)
    con.row_factory = sqlite3.Row
    try:
        rows = [dict(r) for r in con.execute("SELECT * FROM results WHERE kind = 'efficiency' ORDER BY id")]
    finally:
        con.close()
    latest: dict[str, dict[str, Any]] = {}
    for r in rows:  # the newest measurement of each case
        r["params"] = json.loads(r.get("params") or "{}")
        r["metrics"] = json.loads(r.get("metrics") or "{}")
        latest[r["case_key"]] = r
    return list(latest.values())


def _group_key(r: dict[str, Any]) -> tuple:
    spatial = r["params"].get("spatial")
    return (r["mode"], r["pattern"], r["dtype"], r["batch"], r["heads"], r["head_dim"], r["q_len"], r["kv_len"], tuple(spatial) if spatial else None)


def _size(key: tuple) -> str:
    q_len, kv_len, spatial = key[6], key[7], key[8]
    grid = "x".join(map(str, spatial)) if spatial else ""
    n = f"{q_len}" if q_len == kv_len else f"{q_len}x{kv_len}"
    return f"{n} ({grid})" if grid else n


def _ms(value: Any) -> str:
    return "-" if value is None else f"{value:.3f}"


def _g(value: Any) -> str:
    return "-" if value is None else f"{value:.3g}"


def _ratio(a: Any, b: Any) -> Any:
    return None if a is None or b is None or b <= 0 else a / b


def _to_dense(row: Any, base_ms: Any) -> Any:
    """Time over dense SDPA's: the row's paired ratio when the benchmark timed it in pairs with the
    baseline (``metrics.ratio``, robust to drift), else the ratio of the two medians."""
    if row is None or row["median_ms"] is None:
        return None
    paired = row["metrics"].get("ratio") if row["metrics"].get("baseline_ms") is not None else None
    return paired if paired is not None else _ratio(row["median_ms"], base_ms)


def _gflops(row: Any) -> Any:
    """Useful GFLOP/s (4 D per allowed pair / time), where the benchmark counted the pairs: the
    throughput at the pattern's own density."""
    return None if row is None else row["metrics"].get("useful_gflops")


def summarize(db: Path) -> dict[str, Any]:
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for r in _rows(db):
        groups[_group_key(r)].append(r)
    dense, local, problems = [], [], []
    for key in sorted(groups, key=lambda k: tuple("" if x is None else str(x).zfill(12) for x in k)):
        rows = groups[key]
        by = {(r["mechanism"], r["backend"]): r for r in rows}
        base = by.get(BASELINE)
        base_ms = base["median_ms"] if base else None
        mode, pattern = key[0], key[1]
        flex = by.get((DENSE, "flex"))
        if flex is not None or base is not None:
            flex_ms = flex["median_ms"] if flex else None
            slower = _to_dense(flex, base_ms)
            speed = None if not slower else 1.0 / slower
            dense.append(dict(mode=mode, pattern=pattern, size=_size(key), dtype=key[2], sdpa_ms=base_ms, flex_ms=flex_ms,
                              sdpa_over_flex=speed, ok=None if speed is None else speed >= DENSE_TARGET,
                              sdpa_gflops=_gflops(base), flex_gflops=_gflops(flex),
                              note="" if flex is None or flex_ms is not None else flex["note"]))
        for mech in sorted({r["mechanism"] for r in rows} - {DENSE, "torch"}):
            mine = [r for r in rows if r["mechanism"] == mech and r["backend"] not in NOT_A_BACKEND]
            timed = [r for r in mine if r["median_ms"] is not None]
            if not mine:
                continue
            # fastest by the figure itself (the paired ratio where there is one), then by the median
            best = min(timed, key=lambda r: (_to_dense(r, base_ms) or float("inf"), r["median_ms"])) if timed else None
            mflex = next((r for r in mine if r["backend"] == "flex"), None)
            best_ratio = _to_dense(best, base_ms)
            local.append(dict(
                mode=mode, pattern=pattern, size=_size(key), dtype=key[2], mechanism=mech, dense_sdpa_ms=base_ms,
                fastest=best["backend"] if best else None, fastest_ms=best["median_ms"] if best else None, fastest_over_dense=best_ratio,
                flex_ms=mflex["median_ms"] if mflex else None, flex_over_dense=_to_dense(mflex, base_ms),
                fastest_gflops=_gflops(best), flex_gflops=_gflops(mflex), dense_gflops=_gflops(base),
                ok=None if best_ratio is None else best_ratio < 1.0,
                note="" if mflex is None or mflex["median_ms"] is not None else mflex["note"],
            ))
        problems += [dict(mechanism=r["mechanism"], backend=r["backend"], pattern=pattern, mode=mode, size=_size(key), note=r["note"])
                     for r in rows if r["median_ms"] is None and r["note"].startswith("error")]
    return dict(database=str(db), dense=dense, local=local, errors=problems)


def markdown(summary: dict[str, Any]) -> str:
    def yes(ok: Any) -> str:
        return "-" if ok is None else ("yes" if ok else "NO")

    out = ["# gpu_check figures", "", f"database: `{summary['database']}`", "",
           f"## Dense: softmax `flex` vs `sdpa` (flash); target SDPA time / flex time >= {DENSE_TARGET}", "",
           "| mode | pattern | N | dtype | sdpa ms | flex ms | sdpa/flex | >= 0.9 | sdpa GFLOP/s | flex GFLOP/s | note |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for d in summary["dense"]:
        speed = "-" if d["sdpa_over_flex"] is None else f"{d['sdpa_over_flex']:.2f}x"
        out.append(f"| {d['mode']} | {d['pattern']} | {d['size']} | {d['dtype']} | {_ms(d['sdpa_ms'])} | {_ms(d['flex_ms'])} | {speed} | {yes(d['ok'])} | "
                   f"{_g(d['sdpa_gflops'])} | {_g(d['flex_gflops'])} | {d['note']} |")
    out += ["", "## Local vs dense softmax `sdpa` at the same N, B, H, D; target local / dense < 1", "",
            "| mode | pattern | N | mechanism | fastest backend | ms | / dense | flex ms | flex / dense | faster | GFLOP/s fastest, flex, dense | flex note |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in summary["local"]:
        fr = "-" if r["fastest_over_dense"] is None else f"{r['fastest_over_dense']:.3f}"
        xr = "-" if r["flex_over_dense"] is None else f"{r['flex_over_dense']:.3f}"
        out.append(f"| {r['mode']} | {r['pattern']} | {r['size']} | {r['mechanism']} | {r['fastest'] or '-'} | {_ms(r['fastest_ms'])} | {fr} | "
                   f"{_ms(r['flex_ms'])} | {xr} | {yes(r['ok'])} | {_g(r['fastest_gflops'])}, {_g(r['flex_gflops'])}, {_g(r['dense_gflops'])} | {r['note']} |")
    if summary["errors"]:
        out += ["", "## Errors", ""] + [f"- {e['mechanism']}/{e['backend']} {e['pattern']} {e['mode']} N={e['size']}: {e['note']}" for e in summary["errors"]]
    return "\n".join(out) + "\n"


def main(argv: list[str]) -> int:
    if not argv or not Path(argv[0]).exists():
        print(f"usage: gpu_check_summary.py RESULTS.sqlite [OUT_DIR] (no database at {argv[0] if argv else '-'})", file=sys.stderr)
        return 2
    db = Path(argv[0])
    out_dir = Path(argv[1]) if len(argv) > 1 else db.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = summarize(db)
    text = markdown(summary)
    (out_dir / "summary.md").write_text(text)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
