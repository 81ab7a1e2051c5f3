"""The C++ block-sparse FA2 kernel (kernels/block_sparse.py): plans, forward, backward, LSE,
GQA, padding, per-head and per-batch plans, against attention over a written-out dense mask."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from attnzoo import masks
from attnzoo.functional import per_head_patterns_attention, sliding_window_attention, softmax_attention
from attnzoo.kernels import block_sparse
from attnzoo.kernels.block_sparse import BLOCK, SparsePlan, block_sparse_attention

pytestmark = pytest.mark.skipif(not block_sparse.native_usable(torch.device("cpu"), torch.float32), reason="the C++ kernel is not built here")


def dense_attention(q, k, v, allowed, scale=None):
    """Softmax over the allowed pairs, in float64; allowed broadcasts to (B, H, Nq, Nk)."""
    group = q.shape[1] // k.shape[1]
    k, v = k.double().repeat_interleave(group, 1), v.double().repeat_interleave(group, 1)
    s = q.double() @ k.transpose(-1, -2) * (scale if scale is not None else q.shape[-1] ** -0.5)
    s = s.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - lse.unsqueeze(-1).masked_fill(lse.unsqueeze(-1) == float("-inf"), 0.0))
    return p @ v, lse


def qkv(b, h, hk, nq, nk, d, dv=None, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    make = lambda *s: torch.randn(*s, generator=g).to(dtype).requires_grad_(True)  # noqa: E731
    return make(b, h, nq, d), make(b, hk, nk, d), make(b, hk, nk, dv or d)


def check(q, k, v, plan, allowed, *, pad=None, atol=2e-5):
    """Outputs, LSE and the gradients of q, k, v (through out and LSE) against the dense oracle."""
    out, lse = block_sparse_attention(q, k, v, plan, key_padding_mask=pad)
    if pad is not None:
        allowed = allowed & ~pad.view(pad.shape[0], 1, 1, -1)
    want, want_lse = dense_attention(q, k, v, allowed)
    torch.testing.assert_close(out.double(), want, atol=atol, rtol=1e-4)
    torch.testing.assert_close(lse.double(), want_lse, atol=atol, rtol=1e-4)
    g, gl = torch.randn_like(want), torch.randn_like(want_lse).masked_fill(want_lse == float("-inf"), 0.0)
    got = torch.autograd.grad((out.double() * g).sum() + (lse.double().nan_to_num(0.0, 0.0, 0.0) * gl).sum(), (q, k, v))
    ref = torch.autograd.grad((want * g).sum() + (want_lse.nan_to_num(0.0, 0.0, 0.0) * gl).sum(), (q, k, v))
    for name, a, b in zip("qkv", got, ref):
        torch.testing.assert_close(a.double(), b.double(), atol=atol * 10, rtol=1e-3, msg=lambda m: f"d{name}: {m}")


# --------------------------------------------------------------------------------------------
# plans
# --------------------------------------------------------------------------------------------
def unpack(plan: SparsePlan, b: int = 0, h: int = 0) -> torch.Tensor:
    """The plan written out as a dense (Nq, Nk) bool mask: what the kernel will compute."""
    nq, nk = plan.q_len, plan.kv_len
    out = torch.zeros(plan.n_q_blocks * BLOCK, plan.n_kv_blocks * BLOCK, dtype=torch.bool)
    ptr = plan.ptr[min(b, plan.ptr.shape[0] - 1), min(h, plan.ptr.shape[1] - 1)]
    for qb in range(plan.n_q_blocks):
        for e in range(int(ptr[qb]), int(ptr[qb + 1])):
            kb, mid = int(plan.kv_block[e]), int(plan.mask_id[e])
            tile = torch.ones(BLOCK, BLOCK, dtype=torch.bool)
            if mid >= 0:
                words = plan.bits[mid]
                tile = ((words.view(-1, 1) >> torch.arange(BLOCK)) & 1).bool()
            out[qb * BLOCK : (qb + 1) * BLOCK, kb * BLOCK : (kb + 1) * BLOCK] = tile
    return out[:nq, :nk]


@pytest.mark.parametrize(
    "pattern",
    [
        masks.causal(),
        masks.sliding_window(70, 0),
        masks.sliding_window(5, 100, offset=3),
        masks.causal() & masks.sliding_window(64, None) | masks.sinks(3),
    ],
    ids=["causal", "window70", "asym", "window_sinks"],
)
@pytest.mark.parametrize("nq, nk", [(300, 300), (64, 200), (129, 65)])
def test_plan_written_out_equals_the_predicate(pattern, nq, nk):
    plan = SparsePlan.from_mask(pattern, nq, nk)
    assert torch.equal(unpack(plan), masks.dense_mask(pattern, nq, nk)[0, 0])


def test_closed_form_and_evaluated_plans_agree():
    pattern = masks.sliding_window(90, 10)
    closed = SparsePlan.from_mask(pattern, 500, 500)
    evaluated = block_sparse._plan_by_evaluation(lambda b, h, q, k: pattern(b, h, q, k), 500, 500, 1, 1)
    assert torch.equal(unpack(closed), unpack(evaluated))
    # the evaluated plan marks only the blocks that need a mask; the closed form may mark more
    assert evaluated.blocks == closed.blocks and int((evaluated.mask_id >= 0).sum()) <= int((closed.mask_id >= 0).sum())


def test_plan_skips_blocks_outside_the_pattern():
    plan = SparsePlan.from_mask(masks.sliding_window(63, 0), 64 * 32, 64 * 32)
    assert plan.blocks == 32 + 31  # the diagonal block and the one before it
    assert plan.density == pytest.approx(63 / 32**2)


def test_plans_of_cacheable_patterns_are_cached():
    pattern = masks.sliding_window(33, 0)
    assert SparsePlan.from_mask(pattern, 1000, 1000) is SparsePlan.from_mask(pattern, 1000, 1000)


def test_block_mask_plan_rejects_a_wrong_grid():
    with pytest.raises(ValueError, match="block_mask"):
        SparsePlan.from_block_mask(torch.ones(3, 3, dtype=torch.bool), 300, 300)
    with pytest.raises(ValueError, match="block_mask"):
        SparsePlan.from_block_mask(torch.ones(5, 5), 300, 300)


# --------------------------------------------------------------------------------------------
# the kernel against the dense oracle
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("nq, nk", [(300, 300), (200, 333), (64, 64), (1, 100), (130, 7)])
@pytest.mark.parametrize("pattern", [masks.causal(), masks.sliding_window(40, 17)], ids=["causal", "window"])
def test_patterns_match_dense(pattern, nq, nk):
    q, k, v = qkv(2, 4, 2, nq, nk, 32, seed=nq + nk)
    plan = SparsePlan.from_mask(pattern, nq, nk)
    check(q, k, v, plan, masks.dense_mask(pattern, nq, nk))


def test_random_block_mask_with_empty_rows():
    nq = nk = 64 * 6 + 10
    grid = torch.rand(7, 7, generator=torch.Generator().manual_seed(3)) < 0.3
    grid[2] = False  # a query block that visits nothing: output 0, LSE -inf
    q, k, v = qkv(1, 2, 2, nq, nk, 16)
    plan = SparsePlan.from_block_mask(grid, nq, nk)
    allowed = grid.repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1)[:nq, :nk]
    check(q, k, v, plan, allowed)
    out, lse = block_sparse_attention(q, k, v, plan)
    assert (out[:, :, 128:192] == 0).all() and (lse[:, :, 128:192] == float("-inf")).all()


def test_value_dim_differs_from_key_dim():
    q, k, v = qkv(1, 2, 1, 200, 200, 16, dv=40)
    pattern = masks.causal()
    check(q, k, v, SparsePlan.from_mask(pattern, 200, 200), masks.dense_mask(pattern, 200, 200))


@pytest.mark.parametrize("own", [True, False], ids=["task_per_kv_head", "task_per_q_head"])
def test_gqa_backward_both_ownerships(own, monkeypatch):
    # one (batch, kv head) pair: below the thread count the backward splits the group's heads
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1 if own else 64)
    q, k, v = qkv(1, 4, 1, 150, 150, 32)
    pattern = masks.sliding_window(20, 20)
    check(q, k, v, SparsePlan.from_mask(pattern, 150, 150), masks.dense_mask(pattern, 150, 150))


def test_key_padding_both_sides_and_all_padded():
    q, k, v = qkv(3, 2, 2, 140, 140, 16)
    pad = torch.zeros(3, 140, dtype=torch.bool)
    pad[0, 100:] = True
    pad[1, :30] = True
    pad[2, :] = True  # every key padded: zeros, LSE -inf, no NaN anywhere
    pattern = masks.causal()
    check(q, k, v, SparsePlan.from_mask(pattern, 140, 140), masks.dense_mask(pattern, 140, 140), pad=pad)
    out, lse = block_sparse_attention(q, k, v, SparsePlan.from_mask(pattern, 140, 140), key_padding_mask=pad)
    assert (out[2] == 0).all() and (lse[2] == float("-inf")).all()


def test_per_head_and_per_batch_plans():
    heads = masks.MaskMod()
    # head h sees a window of 8 * (h + 1) keys to the left, batch entry b shifts it by b
    class PerHeadBatch(masks.MaskMod):
        batch_head_dependent = True

        def __call__(self, b, h, q_idx, kv_idx):
            return (kv_idx <= q_idx) & (kv_idx >= q_idx - 8 * (h + 1) - 20 * b)

    pattern = PerHeadBatch()
    q, k, v = qkv(2, 3, 3, 200, 200, 16)
    plan = SparsePlan.from_mask(pattern, 200, 200, batch=2, heads=3)
    assert tuple(plan.ptr.shape[:2]) == (2, 3)
    check(q, k, v, plan, masks.dense_mask(pattern, 200, 200, batch=2, heads=3))
    del heads


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs_compute_in_float32(dtype):
    q, k, v = qkv(1, 2, 2, 130, 130, 32, dtype=dtype)
    pattern = masks.causal()
    plan = SparsePlan.from_mask(pattern, 130, 130)
    out, lse = block_sparse_attention(q, k, v, plan)
    assert out.dtype == dtype and lse.dtype == torch.float32
    wide = [x.detach().float() for x in (q, k, v)]
    want, want_lse = block_sparse_attention(*wide, plan)
    torch.testing.assert_close(out, want.to(dtype))  # the float32 result, rounded once
    torch.testing.assert_close(lse, want_lse)
    grads = torch.autograd.grad(out.float().sum(), (q, k, v))
    assert all(g.dtype == dtype and torch.isfinite(g).all() for g in grads)


def test_nan_input_gives_nan_rows_not_silent_values():
    q, k, v = (x.detach() for x in qkv(1, 1, 1, 64, 64, 16))
    k = k.clone()
    k[0, 0, 5, 0] = float("nan")
    out, _ = block_sparse_attention(q, k, v, SparsePlan.from_mask(masks.causal(), 64, 64))
    assert torch.isnan(out[0, 0, 5:]).all() and torch.isfinite(out[0, 0, :5]).all()


# --------------------------------------------------------------------------------------------
# errors and reporting
# --------------------------------------------------------------------------------------------
def test_errors_name_the_argument():
    q, k, v = (x.detach() for x in qkv(1, 2, 2, 100, 100, 16))
    plan = SparsePlan.from_mask(masks.causal(), 100, 100)
    with pytest.raises(ValueError, match="plan"):
        block_sparse_attention(q[:, :, :50], k, v, plan)
    with pytest.raises(ValueError, match="key_padding_mask"):
        block_sparse_attention(q, k, v, plan, key_padding_mask=torch.zeros(1, 99, dtype=torch.bool))
    with pytest.raises(ValueError, match="q: expected"):
        block_sparse_attention(q[0], k, v, plan)
    with pytest.raises(RuntimeError, match="float64"):
        block_sparse_attention(q.double(), k.double(), v.double(), plan)


def test_kernel_path_reports_the_cpu_s_vector_width():
    path = block_sparse.kernel_path()
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    assert ("avx512" in path) == (" avx512f" in flags), path
    assert "GEMM" in path


# --------------------------------------------------------------------------------------------
# mechanisms on the kernel
# --------------------------------------------------------------------------------------------
def test_mechanisms_on_fused_equal_reference_with_padding():
    """Float32 padded batches (the conformance padding suite runs float64, which the kernel declines)."""
    q, k, v = (x.detach() for x in qkv(2, 4, 2, 150, 150, 16))
    pad = torch.zeros(2, 150, dtype=torch.bool)
    pad[0, 120:] = True
    pad[1, :40] = True
    for call, params in (
        (sliding_window_attention, dict(window=(30, 0), causal=True, sinks=2)),
        (per_head_patterns_attention, dict(head_patterns=[dict(window=(10, 0))] * 2 + [dict(window=(4, 4), sinks=3)] * 2, causal=False)),
        (softmax_attention, dict(causal=True, mask_mod=masks.sliding_window(50, 0))),
    ):
        got = call(q, k, v, key_padding_mask=pad, backend="fused", **params)
        want = call(q, k, v, key_padding_mask=pad, backend="reference", **params)
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4, msg=lambda m: f"{call.__name__}: {m}")


def test_dispatch_takes_fused_for_long_sliding_windows():
    from attnzoo import registry

    mech = registry.get("sliding_window")
    q = torch.randn(1, 2, 4096, 64)
    problem, bound = mech.prepare(q, q, q, dict(window=(256, 0), causal=True))
    assert mech.select(problem, bound).name == "fused"


def test_per_head_patterns_plan_in_closed_form_equals_the_predicate():
    from attnzoo.functional.local.per_head import HeadPattern, PerHeadMask

    heads = (
        HeadPattern(window=(100, 0)),
        HeadPattern(window=(7, 3), sinks=70),
        HeadPattern(stride=(128, 5)),
        HeadPattern(stride=(3, 1), window=(0, 0)),
        HeadPattern(block=(96, 17)),
        HeadPattern(block=(64, 0), sinks=1),
        HeadPattern(window=(None, 10)),
        HeadPattern(stride=(1, 0)),
    )
    for causal in (False, True):
        for nq, nk in ((700, 700), (300, 650)):
            pattern = PerHeadMask(heads, nk - nq, causal)
            plan = SparsePlan.from_mask(pattern, nq, nk, heads=len(heads))
            assert tuple(plan.ptr.shape[:2]) == (1, len(heads))
            want = masks.dense_mask(pattern, nq, nk, heads=len(heads))[0]
            for h in range(len(heads)):
                assert torch.equal(unpack(plan, 0, h), want[h]), (causal, nq, nk, h)


def test_pairs_counts_the_allowed_pairs():
    from attnzoo.functional.local.per_head import HeadPattern, PerHeadMask

    for pattern, heads in ((masks.sliding_window(70, 3), 1), (PerHeadMask((HeadPattern(window=(9, 0)), HeadPattern(stride=(5, 2))), 0, True), 2)):
        plan = SparsePlan.from_mask(pattern, 333, 290, heads=heads)
        assert plan.pairs() == int(masks.dense_mask(pattern, 333, 290, heads=heads).expand(1, heads, 333, 290).sum())
