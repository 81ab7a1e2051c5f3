"""attnzoo.bench.efficiency: ratios from paired timing, the unstable flag, useful FLOPs, the stored fields.

The timing itself is faked here (no assertion depends on the wall clock); the calls still run.
"""

from __future__ import annotations

import pytest
import torch

from attnzoo.bench import efficiency
from attnzoo.bench.efficiency import (
    AUTO,
    BASELINE,
    RAW_TORCH,
    TRAIN_FLOPS_FACTOR,
    EfficiencyConfig,
    Row,
    causal_pairs,
    run_efficiency,
    useful_gflops,
)
from attnzoo.bench.results import ResultStore
from attnzoo.bench.timing import PairedTiming, Timing
from attnzoo.hooks import weights_of
from attnzoo.registry import get

B, H, D = 1, 2, 8


def tiny(**changes) -> EfficiencyConfig:
    base = dict(lengths=(16,), batch=B, heads=H, head_dim=D, budget_s=0.001, max_repeats=2, memory=False)
    return EfficiencyConfig(**(base | changes))


class FakeTimers:
    """Stands in for time_call and time_paired: calls each function once, returns canned numbers,
    and records what was paired with what."""

    ALONE = Timing(2.0, 1.9, 2.1, 5)
    PAIRED = PairedTiming(Timing(3.0, 2.9, 3.1, 5), Timing(2.5, 2.4, 2.6, 5), 1.25, 1.2, 1.3)

    def __init__(self):
        self.alone = 0
        self.paired = 0

    def time_call(self, fn, **kwargs):
        self.alone += 1
        fn()
        return self.ALONE

    def time_paired(self, fn, baseline, **kwargs):
        self.paired += 1
        fn()
        baseline()
        return self.PAIRED


@pytest.fixture
def fake_timers(monkeypatch):
    timers = FakeTimers()
    monkeypatch.setattr(efficiency, "time_call", timers.time_call)
    monkeypatch.setattr(efficiency, "time_paired", timers.time_paired)
    return timers


def test_every_case_but_the_baseline_is_paired_and_its_ratio_is_the_paired_median(fake_timers):
    rows = {(r.mechanism, r.backend): r for r in run_efficiency(tiny(mechanisms=("softmax", "linear"), dispatch_only=True))}
    assert set(rows) == {BASELINE, ("softmax", AUTO), ("linear", AUTO)}
    base = rows[BASELINE]
    assert base.timing == FakeTimers.ALONE and base.ratio == 1.0 and base.ratio_q1 is None and base.baseline_ms == 2.0
    for key in (("softmax", AUTO), ("linear", AUTO)):
        row = rows[key]
        # the paired median (1.25), not the quotient of the medians (3.0 / 2.0 = 1.5)
        assert row.timing == FakeTimers.PAIRED.case and row.ratio == 1.25
        assert (row.ratio_q1, row.ratio_q3, row.baseline_ms) == (1.2, 1.3, 2.5)
    assert fake_timers.alone == 1 and fake_timers.paired == 2  # the baseline once, alone; the others paired


def test_the_raw_torch_row_is_paired_too(fake_timers):
    rows = {(r.mechanism, r.backend): r for r in run_efficiency(tiny(mechanisms=("softmax",), backends=("sdpa",)))}
    assert rows[RAW_TORCH].ratio == 1.25 and rows[RAW_TORCH].ratio_q1 == 1.2


def test_rows_flag_an_iqr_wider_than_the_median():
    steady = Row("m", "b", 16, Timing(1.0, 0.9, 1.1, 5), 1.0, ratio_q1=0.95, ratio_q3=1.05)
    assert not steady.unstable
    assert Row("m", "b", 16, Timing(0.6, 0.5, 9.5, 5), 1.0).unstable  # the 0.6 ms with a 9 ms IQR
    assert Row("m", "b", 16, Timing(1.0, 0.9, 1.1, 5), 0.5, ratio_q1=0.1, ratio_q3=0.9).unstable  # the ratio's IQR
    assert not Row("m", "b", 16, note="skipped").unstable


# --------------------------------------------------------------------------------------------
# useful FLOPs
# --------------------------------------------------------------------------------------------
def test_gflops_arithmetic_on_a_known_case():
    # dense softmax, B=1, H=8, N=1024, D=64: 4 * 1 * 8 * 1024^2 * 64 FLOPs in 2 ms
    flops = 4 * 1 * 8 * 1024 * 1024 * 64
    row = Row("softmax", "sdpa", 1024, Timing(2.0, 1.9, 2.1, 5), 1.0, useful_flops=float(flops))
    assert row.gflops == pytest.approx(flops / 2e-3 / 1e9) == pytest.approx(1073.741824)
    assert useful_gflops(None, 2.0) is None and useful_gflops(1e9, None) is None and useful_gflops(1e9, 0.0) is None
    assert Row("x", "y", 16, Timing(2.0, 1.9, 2.1, 5)).gflops is None  # pairs unknown: blank


def test_causal_pairs_match_counting_the_mask():
    for nq in range(1, 7):
        for nk in range(1, 7):
            for offset in range(-8, 8):
                mask = torch.arange(nk)[None, :] <= torch.arange(nq)[:, None] + offset
                assert causal_pairs(nq, nk, offset) == int(mask.sum()), (nq, nk, offset)
    assert causal_pairs(4096, 4096, 0) == 4096 * 4097 // 2


@pytest.mark.parametrize(
    "pattern, pairs",
    [
        ("noncausal_self", 16 * 16),
        ("causal_self", 16 * 17 // 2),
        ("noncausal_cross", 8 * 16),  # Nq = N / 2
        ("causal_cross", 8 * 8 + 8 * 9 // 2),  # bottom-right: query i sees keys up to i + 8
    ],
)
def test_softmax_rows_count_the_pairs_the_pattern_allows(fake_timers, pattern, pairs):
    rows = run_efficiency(tiny(mechanisms=("softmax",), backends=("sdpa",), patterns=(pattern,)))
    timed = [r for r in rows if r.timing is not None]
    assert {(r.mechanism, r.backend) for r in timed} >= {BASELINE, ("softmax", AUTO)}
    for row in timed:
        assert row.useful_flops == 4 * B * H * D * pairs, row
        assert row.gflops == pytest.approx(row.useful_flops / (row.timing.median_ms * 1e-3) / 1e9)


def test_train_mode_counts_the_backward_as_two_and_a_half_forwards(fake_timers):
    rows = run_efficiency(tiny(mechanisms=("softmax",), backends=("sdpa",), mode="train"))
    base = next(r for r in rows if (r.mechanism, r.backend) == BASELINE)
    assert TRAIN_FLOPS_FACTOR == 3.5 and base.useful_flops == 4 * B * H * D * 16 * 16 * 3.5


def test_sparse_patterns_are_counted_from_the_reference_and_linear_mechanisms_stay_blank(fake_timers):
    config = tiny(mechanisms=("sliding_window", "neighborhood", "linear"), dispatch_only=True, patterns=("noncausal_self", "causal_self"))
    rows = run_efficiency(config)
    for row in rows:
        assert row.timing is not None, row
        if row.mechanism == "linear":
            assert row.useful_flops is None and row.gflops is None
            continue
        # the same pairs, read independently: the nonzero attention weights of the call
        mech = get(row.mechanism)
        q, k, v = efficiency._inputs(config, 16, row.pattern)
        with torch.no_grad():
            w, _ = weights_of(mech, q, k, v, **efficiency._params(mech, mech.describe(q, k, v), row.pattern, config))
        pairs = int((w > 0).sum())
        assert 0 < pairs < B * H * 16 * 16  # a sparse pattern
        assert row.useful_flops == 4 * D * pairs, row


def test_pairs_are_not_counted_past_the_limit(fake_timers, monkeypatch):
    monkeypatch.setattr(efficiency, "PAIR_COUNT_MAX_SCORES", 15 * 15)
    rows = run_efficiency(tiny(mechanisms=("softmax", "sliding_window"), dispatch_only=True))
    by = {(r.mechanism, r.backend): r for r in rows}
    assert by[("sliding_window", AUTO)].useful_flops is None  # not counted: blank, not guessed
    assert by[BASELINE].useful_flops == 4 * B * H * D * 256  # dense softmax: in closed form at any N


def test_a_mechanism_may_declare_its_pairs(fake_timers, monkeypatch):
    mech = get("sliding_window")
    monkeypatch.setattr(mech, "allowed_pairs", lambda problem, bound: 7)
    row = next(r for r in run_efficiency(tiny(mechanisms=("sliding_window",), dispatch_only=True)))
    assert row.useful_flops == 4 * D * 7


# --------------------------------------------------------------------------------------------
# the store
# --------------------------------------------------------------------------------------------
def test_new_fields_are_stored_as_metrics_and_resume_reads_them_back(fake_timers, tmp_path):
    config = tiny(mechanisms=("softmax", "linear"), dispatch_only=True)
    with ResultStore(tmp_path / "r.sqlite") as store:
        rows = run_efficiency(config, store=store)
        stored = {(r["mechanism"], r["backend"]): r for r in store.results(kind="efficiency")}
        auto = stored[("softmax", AUTO)]["metrics"]
        assert auto["ratio"] == 1.25 and (auto["ratio_q1"], auto["ratio_q3"], auto["baseline_ms"]) == (1.2, 1.3, 2.5)
        assert auto["paired"] is True and auto["unstable"] is False
        assert auto["useful_flops"] == 4 * B * H * D * 256 and auto["useful_gflops"] == pytest.approx(rows[1].gflops)
        assert stored[BASELINE]["metrics"]["paired"] is False and stored[("linear", AUTO)]["metrics"]["useful_flops"] is None
        again = run_efficiency(config, store=store, resume=True)
        assert again == rows and fake_timers.alone == 1 and fake_timers.paired == 2  # read back, not run again


def test_rows_stored_before_paired_timing_still_resume(fake_timers, tmp_path):
    config = tiny(mechanisms=("softmax",), dispatch_only=True)
    with ResultStore(tmp_path / "r.sqlite") as store:
        rows = run_efficiency(config, store=store)
        # rewrite the metrics as an older attnzoo stored them: the ratio alone
        store._db.execute("""UPDATE results SET metrics = json_object('ratio', json_extract(metrics, '$.ratio'))""")
        store._db.commit()
        again = run_efficiency(config, store=store, resume=True)
    assert [(r.timing, r.ratio) for r in again] == [(r.timing, r.ratio) for r in rows]
    assert all(r.ratio_q1 is None and r.baseline_ms is None and r.useful_flops is None and r.gflops is None for r in again)


def test_references_that_are_not_one_softmax_over_the_own_keys_stay_blank(fake_timers):
    # agent attends twice (through its agent tokens), varying_window attends pooled keys
    rows = run_efficiency(tiny(lengths=(64,), mechanisms=("agent", "varying_window"), dispatch_only=True))
    assert [r.mechanism for r in rows if r.timing is not None] == ["agent", "varying_window"]
    assert all(r.useful_flops is None for r in rows)
