"""Benchmark results in SQLite: one row per run (what, where, when), one row per measured case.

Every runner (``efficiency``, ``mqar``, ``error``, ``sparsity``) writes here and ``attnzoo report`` reads from
here, so a table or plot can always be traced to the machine, versions and git commit that
produced it. Each case is committed in its own transaction: a run killed midway keeps every
case it finished, and ``--resume`` skips them (:meth:`ResultStore.done`).

Schema (``PRAGMA user_version`` = :data:`SCHEMA_VERSION`)::

    runs(id, kind, started, finished, config JSON, machine JSON)
    results(id, run_id, kind, case_key, mechanism, backend, pattern, mode, dtype, device,
            batch, heads, kv_heads, q_len, kv_len, head_dim, params JSON,
            median_ms, q1_ms, q3_ms, repeats, peak_bytes, memory_method, metrics JSON, note, created)

``metrics`` holds what a kind measures beyond time and memory (MQAR accuracy and d_model,
approximation errors...). The default file lives in the user cache directory
(``$XDG_CACHE_HOME/attnzoo/results.sqlite``, else ``~/.cache/attnzoo/results.sqlite``);
``ATTNZOO_DB`` or every command's ``--db`` changes it.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional

__all__ = ["SCHEMA_VERSION", "Result", "ResultStore", "default_db_path", "case_key", "config_json", "to_json"]

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,
    started REAL NOT NULL,
    finished REAL,
    config TEXT NOT NULL,
    machine TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS results (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id INTEGER NOT NULL REFERENCES runs(id),
    kind TEXT NOT NULL,
    case_key TEXT NOT NULL,
    mechanism TEXT NOT NULL,
    backend TEXT,
    pattern TEXT,
    mode TEXT,
    dtype TEXT,
    device TEXT,
    batch INTEGER,
    heads INTEGER,
    kv_heads INTEGER,
    q_len INTEGER,
    kv_len INTEGER,
    head_dim INTEGER,
    params TEXT NOT NULL DEFAULT '{}',
    median_ms REAL,
    q1_ms REAL,
    q3_ms REAL,
    repeats INTEGER,
    peak_bytes INTEGER,
    memory_method TEXT,
    metrics TEXT NOT NULL DEFAULT '{}',
    note TEXT NOT NULL DEFAULT '',
    created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS results_case ON results(case_key);
CREATE INDEX IF NOT EXISTS results_run ON results(run_id);
"""


def default_db_path() -> Path:
    """``$ATTNZOO_DB``, else ``results.sqlite`` in the user cache directory."""
    if os.environ.get("ATTNZOO_DB"):
        return Path(os.environ["ATTNZOO_DB"])
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "attnzoo" / "results.sqlite"


def to_json(value: Any) -> str:
    """Stable JSON (sorted keys); tensors, dtypes and other objects by their ``repr``-like text."""

    def plain(x: Any) -> Any:
        if isinstance(x, (str, int, float, bool)) or x is None:
            return x
        if isinstance(x, Mapping):
            return {str(k): plain(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [plain(v) for v in x]
        shape = getattr(x, "shape", None)
        if shape is not None and hasattr(x, "dtype"):  # a tensor: its kind, not its numbers
            return f"tensor{tuple(shape)}"
        return getattr(x, "__name__", None) or str(x)

    return json.dumps(plain(value), sort_keys=True)


def case_key(kind: str, identity: Mapping[str, Any]) -> str:
    """A hash naming one case: same kind, same identity (mechanism, shapes, params, machine...)."""
    return hashlib.sha256(f"{kind}:{to_json(identity)}".encode()).hexdigest()[:32]


@dataclass
class Result:
    """One measured case. Unset fields stay NULL; ``metrics`` is free-form per kind."""

    kind: str
    mechanism: str
    case_key: str
    backend: Optional[str] = None
    pattern: Optional[str] = None
    mode: Optional[str] = None
    dtype: Optional[str] = None
    device: Optional[str] = None
    batch: Optional[int] = None
    heads: Optional[int] = None
    kv_heads: Optional[int] = None
    q_len: Optional[int] = None
    kv_len: Optional[int] = None
    head_dim: Optional[int] = None
    params: dict[str, Any] = field(default_factory=dict)
    median_ms: Optional[float] = None
    q1_ms: Optional[float] = None
    q3_ms: Optional[float] = None
    repeats: Optional[int] = None
    peak_bytes: Optional[int] = None
    memory_method: Optional[str] = None
    metrics: dict[str, Any] = field(default_factory=dict)
    note: str = ""


_JSON_COLUMNS = ("params", "metrics")


class ResultStore:
    """A results database; ``with ResultStore(path) as store:`` closes it.

    Example::

        >>> store = ResultStore("/tmp/r.sqlite")
        >>> run = store.start_run("efficiency", {"lengths": [256]}, {"cpu": "..."})
        >>> _ = store.add(run, Result("efficiency", "softmax", case_key("efficiency", {"n": 256}), median_ms=1.0))
        >>> store.finish_run(run); [r["median_ms"] for r in store.results(kind="efficiency")]
        [1.0]
    """

    def __init__(self, path: str | os.PathLike[str] | None = None):
        self.path = Path(path) if path is not None else default_db_path()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path)
        self._db.row_factory = sqlite3.Row
        self._db.executescript(_SCHEMA)
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version not in (0, SCHEMA_VERSION):
            raise RuntimeError(f"{self.path}: results schema version {version}, this attnzoo reads {SCHEMA_VERSION}: use another --db")
        self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        self._db.commit()

    def __enter__(self) -> "ResultStore":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self._db.close()

    # -- writing ------------------------------------------------------------------------------
    def start_run(self, kind: str, config: Mapping[str, Any], machine: Mapping[str, Any]) -> int:
        with self._db:
            cursor = self._db.execute(
                "INSERT INTO runs (kind, started, config, machine) VALUES (?, ?, ?, ?)",
                (kind, time.time(), to_json(config), to_json(machine)),
            )
        return int(cursor.lastrowid)

    def finish_run(self, run_id: int) -> None:
        with self._db:
            self._db.execute("UPDATE runs SET finished = ? WHERE id = ?", (time.time(), run_id))

    def add(self, run_id: int, result: Result) -> int:
        """Insert one result in its own transaction (committed when this returns)."""
        row = asdict(result)
        for name in _JSON_COLUMNS:
            row[name] = to_json(row[name])
        row.update(run_id=run_id, created=time.time())
        columns = ", ".join(row)
        with self._db:
            cursor = self._db.execute(f"INSERT INTO results ({columns}) VALUES ({', '.join('?' * len(row))})", tuple(row.values()))
        return int(cursor.lastrowid)

    # -- reading ------------------------------------------------------------------------------
    def done(self, key: str) -> bool:
        """Whether a case with this key is already stored (``--resume`` skips it)."""
        return self._db.execute("SELECT 1 FROM results WHERE case_key = ? LIMIT 1", (key,)).fetchone() is not None

    def find(self, key: str) -> Optional[dict[str, Any]]:
        """The newest stored result with this case key, or None."""
        row = self._db.execute("SELECT * FROM results WHERE case_key = ? ORDER BY id DESC LIMIT 1", (key,)).fetchone()
        return None if row is None else self._decoded(row, _JSON_COLUMNS)

    def runs(self, kind: Optional[str] = None) -> list[dict[str, Any]]:
        query, args = "SELECT * FROM runs", ()
        if kind is not None:
            query, args = query + " WHERE kind = ?", (kind,)
        return [self._decoded(r, ("config", "machine")) for r in self._db.execute(query + " ORDER BY id", args)]

    def results(self, kind: Optional[str] = None, run_id: Optional[int] = None, latest: bool = False) -> list[dict[str, Any]]:
        """Stored results, oldest first; ``latest`` keeps the newest row of each case key."""
        clauses, args = [], []
        for column, value in (("kind", kind), ("run_id", run_id)):
            if value is not None:
                clauses.append(f"{column} = ?")
                args.append(value)
        where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
        rows = [self._decoded(r, _JSON_COLUMNS) for r in self._db.execute(f"SELECT * FROM results{where} ORDER BY id", args)]
        if latest:
            newest = {r["case_key"]: r for r in rows}
            rows = sorted(newest.values(), key=lambda r: r["id"])
        return rows

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.results())

    @staticmethod
    def _decoded(row: sqlite3.Row, json_columns: tuple[str, ...]) -> dict[str, Any]:
        out = dict(row)
        for name in json_columns:
            out[name] = json.loads(out[name]) if out.get(name) else {}
        return out


def config_json(config: Any) -> dict[str, Any]:
    """A benchmark's dataclass config as stored with its run: tuples as lists, fields by name."""
    return {name: list(value) if isinstance(value, tuple) else value for name, value in vars(config).items()}
