"""attnzoo.distributed on CPU with gloo: spawned processes, world sizes 2 and 4, exact against one process.

Every rank builds the same seeded inputs (and rank 0 broadcasts them, to be sure), computes the
single-process result, shards it the way the distributed call shards its inputs, and compares
outputs, LSE and the gradients of q, k, v (fp32, atol 1e-5). The torch.distributed calls are
wrapped to count the messages and collectives of each case. One spawn per world size runs
every case (process start-up dominates on a small machine); the tests read its results.
Shapes: B2-Hq4-Hkv2-N64-D16 (ring), B1-Hq8-Hkv4-N64-D16 (Ulysses), B2-H2-N64-D16 (linear, halo).
"""

from __future__ import annotations

import datetime
import socket
import traceback
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import attnzoo
import attnzoo.distributed
from attnzoo.errors import ParameterError, ShapeError
from attnzoo.functional.linear.retention import retnet_gamma

ATOL = 1e-5
WORLDS = (2, 4)
COUNTED = ("isend", "irecv", "all_gather_single", "reduce_scatter_single", "all_to_all_single", "all_reduce")


# --------------------------------------------------------------------------------------------
# single-process oracle for softmax (the formula, no attnzoo code)
# --------------------------------------------------------------------------------------------
def softmax_oracle(q, k, v, causal):
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    if causal:
        n = q.shape[2]
        s = s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    return torch.softmax(s, -1) @ v, torch.logsumexp(s, -1)


# --------------------------------------------------------------------------------------------
# the worker: every case, on every rank
# --------------------------------------------------------------------------------------------
class Counter:
    """Wraps the torch.distributed calls the package uses and counts them."""

    def __init__(self):
        self.calls = dict.fromkeys(COUNTED, 0)
        for name in COUNTED:
            original = getattr(dist, name)

            def wrapped(*args, _name=name, _original=original, **kwargs):
                self.calls[_name] += 1
                return _original(*args, **kwargs)

            setattr(dist, name, wrapped)

    def take(self) -> dict:
        out, self.calls = dict(self.calls), dict.fromkeys(COUNTED, 0)
        return {k: v for k, v in out.items() if v}


def _inputs(shapes, seed):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(*s, generator=g) for s in shapes]
    for x in xs:
        dist.broadcast(x, 0)  # identical everywhere even if a generator differed
    return xs


def _errors(pairs) -> dict:
    return {name: float((a.detach() - b.detach()).abs().max()) for name, (a, b) in pairs.items()}


def _compare(dist_fn, full_fn, q, k, v, layout, counter, with_lse):
    """Run ``dist_fn`` on the shards and ``full_fn`` on the whole; max errors and call counts."""
    b, h, n = q.shape[:3]
    gout, glse = (x.to(q.dtype) for x in _inputs([(b, h, n, v.shape[-1]), (b, h, n)], 99))
    shard = lambda x: attnzoo.distributed.shard_sequence(x, layout=layout)  # noqa: E731
    qf, kf, vf = (x.clone().requires_grad_() for x in (q, k, v))
    ref = full_fn(qf, kf, vf)
    ref_out, ref_lse = ref if with_lse else (ref[0] if isinstance(ref, tuple) else ref, None)
    ((ref_out * gout).sum() + (0 if ref_lse is None else (ref_lse * glse).sum())).backward()
    ql, kl, vl = (shard(x).clone().requires_grad_() for x in (q, k, v))
    counter.take()
    res = dist_fn(ql, kl, vl)
    forward_calls = counter.take()
    out, lse = res if with_lse else (res, None)
    loss = (out * shard(gout)).sum() + (0 if lse is None else (lse * shard(glse)).sum())
    loss.backward()
    backward_calls = counter.take()
    pairs = {"out": (out, shard(ref_out)), "dq": (ql.grad, shard(qf.grad)), "dk": (kl.grad, shard(kf.grad)), "dv": (vl.grad, shard(vf.grad))}
    if with_lse:
        pairs["lse"] = (lse, shard(ref_lse))
    return {"errors": _errors(pairs), "forward": forward_calls, "backward": backward_calls}


def _ring_cases():
    """(name, comm, causal, layout, with_lse): with the LSE in the loss the backward runs the
    materialized block gradients (dlse), without it torch's CPU flash backward."""
    for comm in ("p2p", "allgather"):
        for causal, layout in ((False, "contiguous"), (True, "contiguous"), (True, "zigzag")):
            yield f"ring-{comm}-{'causal' if causal else 'full'}-{layout}", comm, causal, layout, True
        yield f"ring-{comm}-causal-zigzag-nolse", comm, True, "zigzag", False
        yield f"ring-{comm}-full-contiguous-nolse", comm, False, "contiguous", False


def _run_cases(rank, world, counter) -> dict:
    D = attnzoo.distributed
    results = {}
    q, k, v = _inputs([(2, 4, 64, 16), (2, 2, 64, 16), (2, 2, 64, 16)], 0)  # GQA: 4 query heads, 2 key/value heads
    for name, comm, causal, layout, with_lse in _ring_cases():
        results[name] = _compare(
            partial(D.ring_attention, causal=causal, layout=layout, comm=comm, return_lse=with_lse),
            partial(softmax_oracle, causal=causal), q, k, v, layout, counter, with_lse)

    for comm in ("p2p", "allgather"):  # float64: exact to rounding, so a missing term could not hide under the fp32 tolerance
        results[f"ring-{comm}-float64"] = _compare(
            partial(D.ring_attention, causal=True, layout="zigzag", comm=comm, return_lse=True),
            partial(softmax_oracle, causal=True), *(x.double() for x in (q, k, v)), "zigzag", counter, True)

    uq, uk, uv = _inputs([(1, 8, 64, 16), (1, 4, 64, 16), (1, 4, 64, 16)], 1)
    for layout in ("contiguous", "zigzag"):
        results[f"ulysses-softmax-causal-{layout}"] = _compare(
            partial(D.ulysses_attention, mechanism="softmax", layout=layout, causal=True, return_lse=True),
            partial(softmax_oracle, causal=True), uq, uk, uv, layout, counter, True)
    gamma = retnet_gamma(8)
    mh = [x.repeat_interleave(2, 1) if x.shape[1] == 4 else x for x in (uq, uk, uv)]  # retention: Hq = Hkv
    results["ulysses-retention"] = _compare(
        lambda a, b, c: D.ulysses_attention(a, b, c, "retention", per_head={"gamma": gamma}),
        lambda a, b, c: attnzoo.attention(a, b, c, "retention", gamma=gamma), *mh, "contiguous", counter, False)
    results["ulysses-sliding_window"] = _compare(
        lambda a, b, c: D.ulysses_attention(a, b, c, "sliding_window", window=(5, 3)),
        lambda a, b, c: attnzoo.attention(a, b, c, "sliding_window", window=(5, 3)), uq, uk, uv, "contiguous", counter, False)

    lq, lk, lv = _inputs([(2, 2, 64, 16)] * 3, 2)
    for tag, mech, params in (("linear", "linear", {"causal": True}), ("retention", "retention", {"causal": True}),
                              ("retention-normalized", "retention", {"causal": True, "normalize_decay": True}),
                              ("linear-bidirectional", "linear", {"causal": False})):
        results[f"state-{tag}"] = _compare(
            partial(D.state_passing_attention, mechanism=mech, **params),
            partial(attnzoo.attention, mechanism=mech, **params), lq, lk, lv, "contiguous", counter, False)
    for window, causal in (((7, 0), True), ((5, 3), False)):
        results[f"halo-{'causal' if causal else 'full'}"] = _compare(
            partial(D.halo_attention, window=window, causal=causal, return_lse=True),
            partial(attnzoo.attention, mechanism="sliding_window", window=window, causal=causal, return_lse=True),
            lq, lk, lv, "contiguous", counter, True)

    x = torch.arange(2 * 8 * 64 * 3, dtype=torch.float32).view(2, 8, 64, 3)
    trips = {}
    for layout in ("contiguous", "zigzag"):
        local = D.shard_sequence(x, layout=layout)
        positions = D.local_positions(local.shape[2], rank, world, layout)
        heads = D.seq_to_heads(local, layout=layout)  # (B, 8 / W, N, 3): whole sequence of our heads, global order
        h = 8 // world
        trips[layout] = {
            "unshard": bool(torch.equal(D.unshard_sequence(local, layout=layout), x)),
            "positions": bool(torch.equal(local, x[:, :, positions])),
            "seq_to_heads": bool(torch.equal(heads, x[:, rank * h : (rank + 1) * h])),
            "heads_to_seq": bool(torch.equal(D.heads_to_seq(heads, layout=layout), local)),
        }
    results["roundtrips"] = trips

    refusals = {}
    attempts = {
        "odd-length": lambda: D.shard_sequence(torch.zeros(1, 2, 4 * world + 1, 4)),
        "zigzag-length": lambda: D.shard_sequence(torch.zeros(1, 2, 3 * world, 4), layout="zigzag"),
        "zigzag-odd-local": lambda: D.ring_attention(*(torch.zeros(1, 2, 3, 4),) * 3, causal=True, layout="zigzag"),
        "ulysses-heads": lambda: D.ulysses_attention(*(torch.zeros(1, 2 * world - 1, 4, 4),) * 3),
        "ulysses-kv-heads": lambda: D.ulysses_attention(torch.zeros(1, world, 4, 4), *(torch.zeros(1, 1, 4, 4),) * 2),
        "state-mechanism": lambda: D.state_passing_attention(*(torch.zeros(1, 2, 4, 4),) * 3, "softmax"),
        "state-bidirectional-decay": lambda: D.state_passing_attention(*(torch.zeros(1, 2, 4, 4),) * 3, "retention", causal=False),
        "bad-comm": lambda: D.ring_attention(*(torch.zeros(1, 2, 4, 4),) * 3, comm="smoke"),
    }
    for name, attempt in attempts.items():
        try:
            attempt()
            refusals[name] = None
        except (ParameterError, ShapeError) as e:
            refusals[name] = (type(e).__name__, e.argument, str(e))
    results["refusals"] = refusals
    counter.take()
    return results


def _worker(rank, world, port, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        results = _run_cases(rank, world, Counter())
    except Exception:  # the parent reports it
        results = {"crash": traceback.format_exc()}
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{world: [results of rank 0, rank 1, ...]} from one spawn per world size."""
    out = {}
    for world in WORLDS:
        path = tmp_path_factory.mktemp(f"world{world}")
        mp.spawn(_worker, args=(world, _free_port(), str(path)), nprocs=world, join=True)
        out[world] = [torch.load(path / f"rank{r}.pt") for r in range(world)]
        for r, res in enumerate(out[world]):
            assert "crash" not in res, f"world {world} rank {r} crashed:\n{res.get('crash')}"
    return out


CASES = [name for name, *_ in _ring_cases()] + [
    "ulysses-softmax-causal-contiguous", "ulysses-softmax-causal-zigzag", "ulysses-retention", "ulysses-sliding_window",
    "state-linear", "state-retention", "state-retention-normalized", "state-linear-bidirectional", "halo-causal", "halo-full",
]


# --------------------------------------------------------------------------------------------
# tests
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("case", CASES)
def test_exact_against_one_process(runs, world, case):
    """Output, LSE (where returned) and dq/dk/dv of every rank equal the single-process ones, sharded."""
    for rank, res in enumerate(runs[world]):
        errors = res[case]["errors"]
        assert set(errors) >= {"out", "dq", "dk", "dv"}
        bad = {k: v for k, v in errors.items() if not v <= ATOL}
        assert not bad, f"{case} world {world} rank {rank}: {bad}"


@pytest.mark.parametrize("world", WORLDS)
def test_ring_collective_counts(runs, world):
    """p2p: W-1 K/V messages forward; W-1 K/V plus W gradient messages backward. allgather: 1 / 1 + 1."""
    for res in runs[world]:
        for name in (c for c in CASES if c.startswith("ring-p2p")):
            assert res[name]["forward"] == {"isend": world - 1, "irecv": world - 1}, name
            assert res[name]["backward"] == {"isend": 2 * world - 1, "irecv": 2 * world - 1}, name
        for name in (c for c in CASES if c.startswith("ring-allgather")):
            assert res[name]["forward"] == {"all_gather_single": 1}, name
            assert res[name]["backward"] == {"all_gather_single": 1, "reduce_scatter_single": 1}, name


@pytest.mark.parametrize("world", WORLDS)
def test_ulysses_collective_counts(runs, world):
    """One all-to-all per tensor each way: q, k, v, out (+ lse) forward; their gradients backward."""
    for res in runs[world]:
        assert res["ulysses-softmax-causal-zigzag"]["forward"] == {"all_to_all_single": 5}
        assert res["ulysses-softmax-causal-zigzag"]["backward"] == {"all_to_all_single": 5}
        assert res["ulysses-retention"]["forward"] == {"all_to_all_single": 4}
        assert res["ulysses-retention"]["backward"] == {"all_to_all_single": 4}


@pytest.mark.parametrize("world", WORLDS)
def test_state_and_halo_messages(runs, world):
    """The state goes one hop down the chain and its gradient one hop back; halos only to neighbours."""
    for rank, res in enumerate(runs[world]):
        first, last = rank == 0, rank == world - 1
        chain = {k: v for k, v in (("isend", int(not last)), ("irecv", int(not first))) if v}
        assert res["state-linear"]["forward"] == chain
        back = {k: v for k, v in (("isend", int(not first)), ("irecv", int(not last))) if v}
        assert res["state-linear"]["backward"] == back
        assert res["state-linear-bidirectional"]["forward"] == {"all_reduce": 1}
        assert res["state-linear-bidirectional"]["backward"] == {"all_reduce": 1}
        # causal window: the tail goes to the next rank; its gradient comes back
        assert res["halo-causal"]["forward"] == chain
        assert res["halo-causal"]["backward"] == back
        edges = 1 if (first or last) else 2
        assert res["halo-full"]["forward"] == {"isend": edges, "irecv": edges}


@pytest.mark.parametrize("world", WORLDS)
def test_refusals_name_the_argument(runs, world):
    refusals = runs[world][0]["refusals"]
    expected = {
        "odd-length": ("ShapeError", "x"), "zigzag-length": ("ShapeError", "x"), "zigzag-odd-local": ("ShapeError", "q"),
        "ulysses-heads": ("ParameterError", "q"), "ulysses-kv-heads": ("ParameterError", "k"),
        "state-mechanism": ("ParameterError", "mechanism"), "bad-comm": ("ParameterError", "comm"),
        "state-bidirectional-decay": ("ParameterError", "causal"),
    }
    for name, (kind, argument) in expected.items():
        got = refusals[name]
        assert got is not None, f"{name} was not refused"
        assert got[:2] == (kind, argument), (name, got)
        assert argument in got[2]
    assert "divisible" in refusals["ulysses-heads"][2] and "divisible" in refusals["odd-length"][2]


@pytest.mark.parametrize("world", WORLDS)
def test_layout_round_trips(runs, world):
    """shard/unshard, local_positions and the Ulysses all-to-alls are exact permutations (DeepSpeed's round-trip test)."""
    for rank, res in enumerate(runs[world]):
        for layout, checks in res["roundtrips"].items():
            assert all(checks.values()), (world, rank, layout, checks)


@pytest.mark.parametrize("world", WORLDS)
def test_ring_float64_to_rounding(runs, world):
    """In float64 the ring equals one process to 1e-12 (values, LSE, gradients), both comms."""
    for rank, res in enumerate(runs[world]):
        for comm in ("p2p", "allgather"):
            errors = res[f"ring-{comm}-float64"]["errors"]
            assert max(errors.values()) < 1e-12, (world, rank, comm, errors)


def test_ring_plan_balances_zigzag():
    """Zigzag causal: every rank computes the same number of (query, key) pairs at every step."""
    for world in (2, 4):
        n = 8
        for step in range(world):
            work = set()
            for rank in range(world):
                plan = attnzoo.distributed.ring_plan(rank, (rank - step) % world, world, n, True, "zigzag")
                work.add(sum((qs.stop - qs.start) * (ks.stop - ks.start) / (2 if c else 1) for qs, ks, c in plan))
            assert len(work) == 1, (world, step, work)


def test_uninitialized_group_is_refused():
    if dist.is_initialized():
        pytest.skip("a process group is initialized in this process")
    with pytest.raises(ParameterError, match="group"):
        attnzoo.distributed.ring_attention(*(torch.zeros(1, 1, 4, 4),) * 3)


def test_bench_distributed_command(tmp_path):
    """``attnzoo bench distributed`` (the parser the lead adds to cli/bench.py) measures one rank end to end."""
    import argparse
    import io

    from rich.console import Console

    from attnzoo.bench.distributed import DistributedConfig, _why_not, add_distributed_parser
    from attnzoo.bench.results import ResultStore

    parser = argparse.ArgumentParser()
    add_distributed_parser(parser.add_subparsers(dest="bench_kind"))
    db = tmp_path / "r.sqlite"
    args = parser.parse_args(["distributed", "--worlds", "1", "--methods", "ring-p2p", "state-linear", "--modes", "train",
                              "--length", "64", "--heads", "2", "--head-dim", "16", "--repeats", "1", "--db", str(db)])
    console = Console(file=io.StringIO(), width=200)
    assert args.handler(args, console) == 0
    with ResultStore(db) as store:
        stored = store.results(kind="distributed")
    assert {r["mechanism"] for r in stored} == {"ring-p2p", "state-linear"}
    assert all(r["median_ms"] > 0 and r["note"] == "" for r in stored)
    assert "ring-p2p" in console.file.getvalue()
    small = DistributedConfig(heads=2, length=64, window=8)
    assert "heads" in _why_not("ulysses", 4, small) and _why_not("ulysses", 2, small) == ""
    assert "window" in _why_not("halo", 16, small)
