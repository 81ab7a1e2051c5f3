"""``attnzoo bench distributed``: time and peak memory per rank of the distributed attentions against world size.

Each world size runs in its own spawned processes on this machine (gloo, CPU, one intra-op
thread per rank unless told otherwise): the ranks build random inputs of their share of one
sequence (global length N, local N / W) and time, with a barrier before and after each repeat,
the forward (``mode="forward"``, under no_grad) or forward + backward (``"train"``) of:

* ``ring-p2p`` / ``ring-allgather``: :func:`attnzoo.distributed.ring_attention`, causal, zigzag;
* ``ulysses``: :func:`attnzoo.distributed.ulysses_attention` around causal softmax;
* ``state-linear``: :func:`attnzoo.distributed.state_passing_attention` with causal ``linear``;
* ``halo``: :func:`attnzoo.distributed.halo_attention`, causal sliding window of ``window`` keys.

Time is the median over ``repeats`` of the slowest rank's wall time (every rank waits at the
barrier); memory is the largest per-rank peak (RSS high-water mark above the baseline,
:func:`attnzoo.bench.memory.peak_memory`). On a machine with fewer cores than ranks the
processes share cores: time then shows the cost of the algorithm on one machine, not the
speed-up on W machines; the per-rank memory is what scales out.
"""

from __future__ import annotations

import argparse
import datetime
import os
import socket
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from .memory import peak_memory
from .results import Result, ResultStore, case_key, config_json

__all__ = ["METHODS", "DistributedConfig", "DistributedRow", "run_distributed", "add_distributed_parser", "distributed_table"]

METHODS = ("ring-p2p", "ring-allgather", "ulysses", "state-linear", "halo")
MODES = ("forward", "train")


@dataclass(frozen=True)
class DistributedConfig:
    worlds: tuple[int, ...] = (1, 2, 4)
    methods: tuple[str, ...] = METHODS
    modes: tuple[str, ...] = MODES
    length: int = 4096
    batch: int = 1
    heads: int = 8
    kv_heads: Optional[int] = None
    head_dim: int = 64
    window: int = 256
    repeats: int = 5
    threads: int = 1


@dataclass
class DistributedRow:
    method: str
    mode: str
    world: int
    length: int
    local_length: int
    batch: int
    heads: int
    head_dim: int
    median_ms: Optional[float] = None
    q1_ms: Optional[float] = None
    q3_ms: Optional[float] = None
    per_rank_ms: list[float] = field(default_factory=list)
    peak_bytes: Optional[int] = None
    memory_method: str = ""
    note: str = ""


def _why_not(method: str, world: int, config: DistributedConfig) -> str:
    kv = config.kv_heads or config.heads
    if config.length % (2 * world):
        return f"length {config.length} not divisible by 2 * world = {2 * world}"
    if method == "ulysses" and (config.heads % world or kv % world):
        return f"heads {config.heads}/{kv} not divisible by world {world}"
    if method == "halo" and config.window > config.length // world and world > 1:
        return f"window {config.window} wider than a rank's {config.length // world} tokens"
    return ""


def _call(method: str, config: DistributedConfig) -> Callable[..., Any]:
    from .. import distributed as D

    if method.startswith("ring-"):
        comm = method.split("-", 1)[1]
        return lambda q, k, v: D.ring_attention(q, k, v, causal=True, layout="zigzag", comm=comm)
    if method == "ulysses":
        return lambda q, k, v: D.ulysses_attention(q, k, v, "softmax", causal=True)
    if method == "state-linear":
        return lambda q, k, v: D.state_passing_attention(q, k, v, "linear")
    if method == "halo":
        return lambda q, k, v: D.halo_attention(q, k, v, window=(config.window, 0), causal=True)
    raise ValueError(f"run_distributed: methods: unknown {method!r}; expected some of {METHODS}")


def _worker(rank: int, world: int, port: int, config: DistributedConfig, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(config.threads)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(minutes=10))
    rows = []
    try:
        n = config.length // world
        kv = config.kv_heads or config.heads
        gen = torch.Generator().manual_seed(1000 + rank)
        for method in config.methods:
            if _why_not(method, world, config):
                continue
            fn = _call(method, config)
            for mode in config.modes:
                train = mode == "train"
                q = torch.randn(config.batch, config.heads, n, config.head_dim, generator=gen, requires_grad=train)
                k = torch.randn(config.batch, kv, n, config.head_dim, generator=gen, requires_grad=train)
                v = torch.randn(config.batch, kv, n, config.head_dim, generator=gen, requires_grad=train)

                samples, peak, how = _measure(fn, q, k, v, train, config.repeats)
                rows.append({"method": method, "mode": mode, "samples": samples, "peak": peak, "how": how})
    finally:
        torch.save(rows, Path(out_dir) / f"rank{rank}.pt")
        dist.destroy_process_group()


def _step(fn: Callable[..., Any], q: Any, k: Any, v: Any, train: bool) -> None:
    if train:
        fn(q, k, v).sum().backward()
    else:
        with torch.no_grad():
            fn(q, k, v)


def _measure(fn: Callable[..., Any], q: Any, k: Any, v: Any, train: bool, repeats: int) -> tuple[list[float], Optional[int], str]:
    """Per-repeat wall times (ms; a barrier before and after each, so every rank's repeat lasts
    until the slowest finishes) and the peak memory of one more call."""
    import torch.distributed as dist

    _step(fn, q, k, v, train)  # warm-up
    samples = []
    for _ in range(repeats):
        dist.barrier()
        t0 = time.perf_counter()
        _step(fn, q, k, v, train)
        dist.barrier()
        samples.append((time.perf_counter() - t0) * 1e3)
    dist.barrier()
    peak, how = peak_memory(lambda: _step(fn, q, k, v, train))
    return samples, peak, how


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(world: int, config: DistributedConfig) -> list[list[dict]]:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="attnzoo-dist-") as tmp:
        mp.start_processes(_worker, args=(world, _free_port(), config, tmp), nprocs=world, join=True, start_method="spawn")
        return [torch.load(Path(tmp) / f"rank{r}.pt") for r in range(world)]


def run_distributed(config: DistributedConfig = DistributedConfig(), store: Optional[ResultStore] = None,
                    on_row: Optional[Callable[[DistributedRow], None]] = None) -> list[DistributedRow]:
    """Measure every method x mode at every world size of ``config``; one row each (a note when skipped)."""
    for m in config.methods:
        if m not in METHODS:
            raise ValueError(f"run_distributed: methods: unknown {m!r}; expected some of {METHODS}")
    run_id = None
    if store is not None:
        from .machine import machine_info

        run_id = store.start_run("distributed", config_json(config), machine_info("cpu"))
    rows: list[DistributedRow] = []
    for world in config.worlds:
        ranks = _spawn(world, config) if any(not _why_not(m, world, config) for m in config.methods) else [[]]
        measured = {(r["method"], r["mode"]): [rank_rows[i] for rank_rows in ranks] for i, r in enumerate(ranks[0])}
        for method in config.methods:
            for mode in config.modes:
                row = DistributedRow(method, mode, world, config.length, config.length // world, config.batch, config.heads, config.head_dim)
                per_rank = measured.get((method, mode))
                if per_rank is None:
                    row.note = _why_not(method, world, config) or "not measured"
                else:
                    slowest = [max(s) for s in zip(*(r["samples"] for r in per_rank))]
                    qs = statistics.quantiles(slowest, n=4) if len(slowest) > 1 else [slowest[0]] * 3
                    row.median_ms, row.q1_ms, row.q3_ms = statistics.median(slowest), qs[0], qs[2]
                    row.per_rank_ms = [statistics.median(r["samples"]) for r in per_rank]
                    peaks = [r["peak"] for r in per_rank if r["peak"] is not None]
                    row.peak_bytes = max(peaks) if peaks else None
                    row.memory_method = per_rank[0]["how"]
                rows.append(row)
                if on_row is not None:
                    on_row(row)
                if store is not None and run_id is not None:
                    store.add(run_id, _result(row, config))
    if store is not None and run_id is not None:
        store.finish_run(run_id)
    return rows


def _result(row: DistributedRow, config: DistributedConfig) -> Result:
    identity = {"method": row.method, "mode": row.mode, "world": row.world, "length": row.length, "batch": row.batch,
                "heads": row.heads, "head_dim": row.head_dim, "window": config.window, "threads": config.threads}
    return Result(
        kind="distributed", mechanism=row.method, case_key=case_key("distributed", identity), mode=row.mode,
        dtype="float32", device="cpu", batch=row.batch, heads=row.heads, kv_heads=config.kv_heads or config.heads,
        q_len=row.length, kv_len=row.length, head_dim=row.head_dim, params={"world": row.world, "window": config.window},
        median_ms=row.median_ms, q1_ms=row.q1_ms, q3_ms=row.q3_ms, repeats=config.repeats, peak_bytes=row.peak_bytes,
        memory_method=row.memory_method or None, metrics={"world": row.world, "per_rank_ms": row.per_rank_ms}, note=row.note,
    )


# --------------------------------------------------------------------------------------------
# command line (the lead's cli/bench.py calls add_distributed_parser(kinds))
# --------------------------------------------------------------------------------------------
def distributed_table(rows: Sequence[DistributedRow]) -> Any:
    from rich.table import Table

    table = Table(title="distributed attention on CPU processes (gloo): slowest rank's time, largest per-rank peak memory")
    for name in ("method", "mode", "world", "N", "N / rank", "median ms", "per-rank ms", "peak MiB / rank", "note"):
        table.add_column(name, justify="left" if name in ("method", "mode", "note") else "right")
    for r in rows:
        table.add_row(
            r.method, r.mode, str(r.world), str(r.length), str(r.local_length),
            "-" if r.median_ms is None else f"{r.median_ms:.3g}",
            " ".join(f"{x:.3g}" for x in r.per_rank_ms) or "-",
            "-" if r.peak_bytes is None else f"{r.peak_bytes / 2**20:.1f}", r.note,
        )
    return table


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {text}")
    return value


def _cmd_distributed(args: argparse.Namespace, console: Any) -> int:
    from rich.text import Text

    config = DistributedConfig(
        worlds=tuple(args.worlds), methods=tuple(args.methods), modes=tuple(args.modes), length=args.length, batch=args.batch,
        heads=args.heads, kv_heads=args.kv_heads, head_dim=args.head_dim, window=args.window, repeats=args.repeats,
        threads=args.threads,
    )
    with ResultStore(args.db) as store:
        rows = run_distributed(config, store)
    console.print(distributed_table(rows))
    console.print(Text(f"{sum(r.median_ms is not None for r in rows)} cases measured on {os.cpu_count()} cores; results in {args.db}"))
    return 0


def add_distributed_parser(kinds: Any) -> argparse.ArgumentParser:
    """Add ``distributed`` to the ``attnzoo bench`` subcommands (``kinds``: their subparsers action)."""
    from .results import default_db_path

    parser = kinds.add_parser("distributed", help="ring / Ulysses / state-passing / halo attention: time and memory per rank against world size (CPU, gloo)")
    d = DistributedConfig()
    parser.add_argument("--worlds", nargs="+", type=_positive_int, default=list(d.worlds), help="world sizes (processes on this machine)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(d.methods))
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(d.modes), help="forward (no_grad) and/or train (forward + backward)")
    parser.add_argument("--length", type=_positive_int, default=d.length, help="global sequence length N (split over the ranks)")
    parser.add_argument("--batch", type=_positive_int, default=d.batch)
    parser.add_argument("--heads", type=_positive_int, default=d.heads)
    parser.add_argument("--kv-heads", type=_positive_int, default=None, help="key/value heads (GQA); default: --heads")
    parser.add_argument("--head-dim", type=_positive_int, default=d.head_dim)
    parser.add_argument("--window", type=_positive_int, default=d.window, help="left window of the halo method")
    parser.add_argument("--repeats", type=_positive_int, default=d.repeats, help="timed repeats (the same on every rank)")
    parser.add_argument("--threads", type=_positive_int, default=d.threads, help="torch intra-op threads per rank")
    parser.add_argument("--db", type=Path, default=default_db_path(), help="the results database")
    parser.set_defaults(handler=_cmd_distributed)
    return parser


def _as_dict(row: DistributedRow) -> dict[str, Any]:  # for callers that want plain data
    return asdict(row)
