"""``attnzoo bench cache``: the needle task, the cached decoder and the policy sweep."""

from __future__ import annotations

import pytest
import torch

from attnzoo.bench.cache_recall import (
    SEP,
    CacheConfig,
    CachedDecoder,
    evaluate_policy,
    needle_recall,
    prompt_length,
    run_cache,
    select,
)
from attnzoo.bench.mqar import IGNORE_INDEX, MQARModel
from attnzoo.bench.report import collect
from attnzoo.bench.results import ResultStore
from attnzoo.cli import main
from attnzoo.errors import ParameterError


def test_needle_recall_layout():
    inputs, labels = needle_recall(64, num_pairs=6, num_questions=3, num_examples=5, seed=1)
    p, m = 6, 3
    assert inputs.shape == labels.shape == (5, 2 * p + 2 * m + 2)
    for x, y in zip(inputs, labels):
        keys, values = x[0 : 2 * p : 2], x[1 : 2 * p : 2]
        assert len(set(keys.tolist())) == p and (keys >= 2).all() and (keys < 32).all() and (values >= 32).all()
        assert x[2 * p] == SEP and x[2 * p + m + 1] == SEP
        question, again = x[2 * p + 1 : 2 * p + 1 + m], x[-m:]
        assert torch.equal(question, again)
        value_of = dict(zip(keys.tolist(), values.tolist()))
        assert y[-m:].tolist() == [value_of[k] for k in again.tolist()]
        assert (y[:-m] == IGNORE_INDEX).all()
    assert prompt_length(p, m) == inputs.shape[1] - m
    with pytest.raises(ParameterError, match="num_questions"):
        needle_recall(64, 2, 3, 1)


def small_model(seed=0):
    torch.manual_seed(seed)
    return MQARModel(64, 32, "softmax", num_heads=2).eval()


def test_decoder_with_the_whole_cache_equals_the_full_forward():
    model = small_model()
    inputs, _ = needle_recall(64, 8, 4, 3, seed=2)
    s = prompt_length(8, 4)
    decoder = CachedDecoder(model)
    full = model(inputs)
    torch.testing.assert_close(decoder.prefill(inputs[:, :s]), full[:, :s], rtol=1e-5, atol=1e-5)
    decoder.compress("full", s, num_questions=4)
    for t in range(s, inputs.shape[1]):
        torch.testing.assert_close(decoder.step(inputs[:, t]), full[:, t], rtol=1e-5, atol=1e-5)


def test_decoder_after_compression_equals_a_forward_that_masks_the_evicted_keys():
    # oracle: the same model where the answer rows of each layer cannot see the evicted prompt keys
    model = small_model(1)
    inputs, _ = needle_recall(64, 8, 4, 2, seed=3)
    s, budget = prompt_length(8, 4), 7
    decoder = CachedDecoder(model)
    decoder.prefill(inputs[:, :s])
    kept = [select("key_norm", c.keys, q, budget, window=5) for c, q in zip(decoder.caches, decoder.prefill_queries)]
    decoder.compress("key_norm", budget, num_questions=4)
    steps = torch.stack([decoder.step(inputs[:, t]) for t in range(s, inputs.shape[1])], 1)

    x = model.embedding(inputs)
    n = inputs.shape[1]
    for layer, keep in zip(model.layers, kept):
        x = x + layer.conv(layer.conv_norm(x))
        mixer = layer.mixer
        h = layer.mixer_norm(x)
        q, k, v = (proj(h).view(2, n, mixer.num_heads, mixer.head_dim).transpose(1, 2) for proj in (mixer.q_proj, mixer.k_proj, mixer.v_proj))
        visible = torch.ones(2, mixer.num_heads, n, n, dtype=torch.bool).tril()
        evicted = torch.ones(2, mixer.num_heads, s, dtype=torch.bool)
        evicted.scatter_(2, keep, False)
        visible[:, :, s:, :s] &= ~evicted[:, :, None, :]
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=visible)
        x = x + mixer.out_proj(out.transpose(1, 2).reshape(2, n, -1))
    torch.testing.assert_close(steps, model.logits(x)[:, s:], rtol=1e-5, atol=1e-5)


def test_every_policy_keeps_the_budget():
    model = small_model()
    inputs, _ = needle_recall(64, 8, 4, 2, seed=4)
    s = prompt_length(8, 4)
    decoder = CachedDecoder(model)
    decoder.prefill(inputs[:, :s])
    cache, q = decoder.caches[0], decoder.prefill_queries[0]
    for policy in ("streaming_llm", "h2o", "snapkv", "tova", "key_norm"):
        kept = select(policy, cache.keys, q, 9, window=5)
        assert kept.shape == (2, 2, 9), policy
        assert all(len(set(row.tolist())) == 9 for row in kept.reshape(-1, 9)), policy
    snap = select("snapkv", cache.keys, q, 9, window=5)
    assert (snap[..., -5:] == torch.arange(s - 5, s)).all()  # the observation window is kept
    with pytest.raises(ParameterError, match="policy"):
        select("lru", cache.keys, q, 9, window=5)


def test_evaluate_policy_counts_the_kept_bytes():
    model = small_model()
    config = CacheConfig(vocab_size=64, num_pairs=8, num_questions=4, d_model=32, test_examples=3)
    inputs, labels = needle_recall(64, 8, 4, 3, seed=5)
    row = evaluate_policy(model, config, "streaming_llm", 0.5, inputs, labels)
    assert row.budget_tokens == round(0.5 * config.prompt_length)
    assert row.kv_bytes == 2 * 2 * row.budget_tokens * 32 * 4  # layers x (K, V) x tokens x d_model x float32
    assert 0.0 <= row.accuracy <= 1.0 and row.ms_per_token > 0


def test_training_learns_the_task_and_compression_costs_recall(tmp_path):
    # small enough for CI (~10 s): 8 pairs, 4 questions; the full cache must recall, and
    # keeping 10% of the prompt by position alone (StreamingLLM) must not
    config = CacheConfig(vocab_size=64, num_pairs=8, num_questions=4, d_model=32, train_steps=500, batch_size=32,
                         lr=1e-2, test_examples=128, budgets=(0.1,), policies=("full", "streaming_llm"))
    with ResultStore(tmp_path / "r.sqlite") as store:
        trained, rows = run_cache(config, store)
    assert trained.accuracy > 0.9, trained.losses[-5:]
    full = next(r for r in rows if r.policy == "full")
    stream = next(r for r in rows if r.policy == "streaming_llm")
    assert full.accuracy == pytest.approx(trained.accuracy)
    assert stream.accuracy < full.accuracy - 0.3
    stored = collect(tmp_path / "r.sqlite").cache
    assert {r["mechanism"] for r in stored} == {"full", "streaming_llm"}


def test_cli_bench_cache(tmp_path, capsys):
    status = main(["bench", "cache", "--num-pairs", "4", "--num-questions", "2", "--d-model", "16", "--train-steps", "5",
                   "--test-examples", "4", "--budgets", "0.5", "--policies", "full", "snapkv", "streaming_llm",
                   "--db", str(tmp_path / "r.sqlite"), "--plot", str(tmp_path / "c.png")])
    assert status == 0
    out = capsys.readouterr().out
    assert "snapkv" in out and "SnapKV vs StreamingLLM" in out
    assert (tmp_path / "c.png").stat().st_size > 1000


def test_k6_policies_keep_their_budgets():
    model = small_model()
    config = CacheConfig(vocab_size=64, num_pairs=8, num_questions=4, d_model=32, test_examples=3)
    inputs, labels = needle_recall(64, 8, 4, 3, seed=6)
    s = config.prompt_length
    per_token = 2 * 32 * 4  # K and V, d_model float32, one layer
    longgen = evaluate_policy(model, config, "longgen", 0.3, inputs, labels)
    assert longgen.kv_bytes == (s + round(0.3 * s)) * per_token  # one full layer, one at the budget
    pyramid = evaluate_policy(model, config, "pyramidkv", 0.5, inputs, labels)
    assert pyramid.kv_bytes <= 2 * round(0.5 * s) * per_token + per_token
    moa = evaluate_policy(model, config, "moa", 0.3, inputs, labels)
    heads = 2
    assert moa.kv_bytes <= 2 * heads * round(0.3 * s) * per_token // heads  # H x budget keys per layer, per head d_model / H


def test_moa_with_whole_spans_equals_the_full_cache():
    model = small_model()
    inputs, _ = needle_recall(64, 8, 4, 2, seed=7)
    s = prompt_length(8, 4)
    decoder = CachedDecoder(model)
    decoder.prefill(inputs[:, :s])
    decoder.head_spans = [torch.full((2,), s), torch.full((2,), s)]
    decoder.compress("moa", s, num_questions=4)
    full = model(inputs)
    for t in range(s, inputs.shape[1]):
        torch.testing.assert_close(decoder.step(inputs[:, t]), full[:, t], rtol=1e-5, atol=1e-5)
