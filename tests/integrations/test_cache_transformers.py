"""attnzoo.cache.transformers: eviction policies as transformers caches inside ``generate()``.

The model is a tiny random-init GQA Llama (hidden 64, 4 query heads over 2 kv heads, 2 layers,
float32, init std 0.2). References: the stock ``DynamicCache`` (at a budget holding everything, greedy tokens
must be identical) and the pure rules of :mod:`attnzoo.cache.policies` applied to the keys and
queries the model really computes (recorded with a DynamicCache and a recording attention
function), which pins what reaches the rule: post-RoPE queries, the layer's keys, the scale.
"""

from __future__ import annotations

import warnings

import pytest
import torch

pytest.importorskip("transformers")  # the hf extra
from attnzoo.cache import transformers as zc  # noqa: E402  (first: it makes torchvision importable)

from transformers import AttentionInterface, DynamicCache, LlamaConfig, LlamaForCausalLM  # noqa: E402
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask  # noqa: E402
from transformers.integrations.sdpa_attention import sdpa_attention_forward  # noqa: E402

from attnzoo.cache import policies as P  # noqa: E402
from attnzoo.errors import ParameterError  # noqa: E402

VOCAB, PROMPT, NEW, LAYERS = 128, 40, 30, 2


def model(implementation: str = "sdpa", seed: int = 1):
    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=LAYERS,
        vocab_size=VOCAB, max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        initializer_range=0.2,  # sharp enough attention for a varied greedy continuation (0.02 loops on 2-3 tokens)
    )  # fmt: skip
    torch.manual_seed(seed)
    m = LlamaForCausalLM(config).eval()
    m.set_attn_implementation(implementation)
    return m


def prompt(batch: int = 1, n: int = PROMPT, seed: int = 1):
    return torch.randint(3, VOCAB, (batch, n), generator=torch.Generator().manual_seed(seed))


def generate(m, ids, cache, **kwargs):
    kwargs = dict(max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=0) | kwargs
    with torch.no_grad():
        return m.generate(ids, cache=cache, **kwargs)


# name -> a cache factory (model, budget) and the extra keyword arguments the tests use
POLICIES = {
    "streaming_llm": lambda m, **kw: zc.StreamingLLMCache(budget=kw.pop("budget"), n_sink=4, **kw),
    "key_norm": lambda m, **kw: zc.KeyNormCache(m, **kw),
    "h2o": lambda m, **kw: zc.H2OCache(m, **kw),
    "snapkv": lambda m, **kw: zc.SnapKVCache(m, window=8, **kw),
    "tova": lambda m, **kw: zc.TOVACache(m, **kw),
}


# ---- budget = full: the stock cache's tokens -------------------------------------------------
@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_full_budget_generates_the_stock_tokens(policy):
    m = model()
    ids = prompt()
    expected = generate(m, ids, DynamicCache())
    cache = POLICIES[policy](m, budget=PROMPT + NEW)
    assert torch.equal(generate(m, ids, cache), expected)
    assert len(set(expected[0, PROMPT:].tolist())) > 10  # a varied continuation
    assert cache.get_seq_length() == cache.stored_length() == PROMPT + NEW - 1
    zc.unbind(m)
    assert m.config._attn_implementation == "sdpa"


def test_full_budget_on_an_eager_model_and_a_batch_of_two():
    """The wrapped implementation may be eager (the model file's own function); equal-length rows batch."""
    m = model("eager")
    ids = prompt(batch=2)
    expected = generate(m, ids, DynamicCache(), max_new_tokens=12, min_new_tokens=12)
    assert torch.equal(generate(m, ids, zc.H2OCache(m, budget=PROMPT + NEW), max_new_tokens=12, min_new_tokens=12), expected)
    assert m.config._attn_implementation == "attnzoo-cache:eager"


def test_snapkv_with_compression_ratio_zero_is_the_stock_cache():
    m = model()
    ids = prompt()
    assert torch.equal(generate(m, ids, zc.SnapKVCache(m, compression_ratio=0.0, window=8)), generate(m, ids, DynamicCache()))


def test_the_old_argument_name_works():
    m = model()
    ids = prompt()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers 5.24+: past_key_values -> cache
        with torch.no_grad():
            got = m.generate(ids, past_key_values=zc.TOVACache(m, budget=100), max_new_tokens=5, do_sample=False)
    assert torch.equal(got, generate(m, ids, DynamicCache(), max_new_tokens=5, min_new_tokens=5))


# ---- a small budget: the cache really holds it -----------------------------------------------
@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_small_budget_holds_at_most_budget_keys(policy):
    budget = 16
    m = model()
    cache = POLICIES[policy](m, budget=budget)
    out = generate(m, prompt(), cache)
    assert out.shape == (1, PROMPT + NEW)
    assert cache.get_seq_length() == PROMPT + NEW - 1  # tokens seen: original positions kept
    stored = [cache.stored_length(i) for i in range(LAYERS)]
    if policy == "snapkv":  # once, after the prompt: then every generated token is kept
        assert stored == [budget + NEW - 1] * LAYERS
    else:
        assert stored == [budget] * LAYERS
    for layer in cache.layers:
        assert layer.keys.shape == layer.values.shape == (1, 2, stored[0], 16)
        assert layer.positions.shape == (1, 2, stored[0])
        kv_length, kv_offset = layer.get_mask_sizes(1)
        assert (kv_length, kv_offset) == (stored[0] + 1, PROMPT + NEW - 1 - stored[0])


def test_memory_is_reported_in_bytes():
    m = model()
    ids = prompt()
    full = DynamicCache()
    generate(m, ids, full)
    full_bytes = sum(layer.keys.nbytes + layer.values.nbytes for layer in full.layers)
    cache = zc.H2OCache(m, budget=16)
    generate(m, ids, cache)
    kv = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
    assert cache.kv_bytes() == kv == LAYERS * 2 * (1 * 2 * 16 * 16) * 4  # layers x (K, V) x (B Hkv budget D) x fp32
    extra = sum(layer.positions.nbytes + layer.scores.nbytes for layer in cache.layers)
    assert cache.memory_bytes() == kv + extra
    assert kv * (PROMPT + NEW - 1) == full_bytes * 16  # the budget's share of the stock cache


# ---- the cache's decisions are the rules', on the model's own queries and keys ----------------
def record_prefill(m, ids):
    """The post-RoPE queries (per layer) and keys a DynamicCache prefill computes."""
    queries = {}

    def recording(module, query, key, value, attention_mask, **kwargs):
        queries[module.layer_idx] = query.detach().clone()
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("attnzoo-test:record", recording)
    AttentionMaskInterface.register("attnzoo-test:record", sdpa_mask)
    m.set_attn_implementation("attnzoo-test:record")
    cache = DynamicCache()
    with torch.no_grad():
        m(ids, cache=cache)
    m.set_attn_implementation("sdpa")
    return queries, [layer.keys for layer in cache.layers]


@pytest.mark.parametrize("policy", ["h2o", "snapkv", "tova", "key_norm", "streaming_llm"])
def test_prefill_eviction_equals_the_rule_on_the_models_tensors(policy):
    budget, window = 16, 8
    m = model()
    ids = prompt()
    queries, keys = record_prefill(m, ids)
    cache = POLICIES[policy](m, budget=budget)
    with torch.no_grad():
        m(ids, cache=cache)
    scale = 16**-0.5
    for i in range(LAYERS):
        q, k = queries[i], keys[i]
        if policy == "h2o":
            expected = P.h2o(P.accumulate_attention(None, q, k, scale=scale), budget=budget, recent=budget // 2)
        elif policy == "snapkv":
            expected = P.snapkv(k, q[:, :, -window:], budget=budget, scale=scale)
        elif policy == "tova":
            expected = P.tova(k, q[:, :, -1:], budget=budget, scale=scale)
        elif policy == "key_norm":
            expected = P.key_norm(k, budget=budget)
        else:
            expected = P.streaming_llm(k, budget=budget, n_sink=4)
        assert torch.equal(cache.layers[i].positions, expected)
        torch.testing.assert_close(cache.layers[i].keys, P.gather_kept(k, expected), atol=1e-6, rtol=0)


# ---- refusals -----------------------------------------------------------------------------
@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_a_left_padded_batch_is_refused(policy):
    m = model()
    ids = prompt(batch=2)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    with pytest.raises(ParameterError) as info:
        generate(m, ids.masked_fill(mask == 0, 0), POLICIES[policy](m, budget=16), attention_mask=mask)
    assert info.value.argument == "attention_mask"
    assert "padded" in str(info.value)


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_a_padded_mask_without_position_ids_is_refused_by_a_bound_cache(policy):
    m = model()
    ids = prompt(batch=2)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    cache = POLICIES[policy](m, budget=16) if policy != "streaming_llm" else zc.StreamingLLMCache(m, budget=16)
    with pytest.raises(ParameterError, match="padded"), torch.no_grad():
        m(ids, attention_mask=mask, cache=cache)


def test_scored_policies_need_the_model():
    for cls in (zc.H2OCache, zc.SnapKVCache, zc.TOVACache):
        with pytest.raises(ParameterError) as info:
            cls(budget=16)
        assert info.value.argument == "model"


def test_a_cache_the_model_no_longer_feeds_says_so():
    m = model()
    stale = zc.H2OCache(m, budget=16)
    zc.H2OCache(m, budget=16)  # the model now feeds this one
    with pytest.raises(zc.CacheStateError, match="queries never reached"):
        generate(m, prompt(), stale, max_new_tokens=3, min_new_tokens=3)


@pytest.mark.parametrize(
    "make, argument",
    [
        (lambda m: zc.SnapKVCache(m, budget=16, window=32), "budget"),
        (lambda m: zc.SnapKVCache(m, compression_ratio=0.9, window=8), "compression_ratio"),
        (lambda m: zc.StreamingLLMCache(budget=4, n_sink=4), "n_sink"),
    ],
)
def test_budgets_too_small_for_the_policy_name_the_argument(make, argument):
    m = model()
    with pytest.raises(ParameterError) as info:
        generate(m, prompt(), make(m), max_new_tokens=2, min_new_tokens=2)
    assert info.value.argument == argument


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        (dict(), "compression_ratio"),
        (dict(budget=0), "budget"),
        (dict(compression_ratio=1.0), "compression_ratio"),
        (dict(budget=8, heavy_fraction=1.5), "heavy_fraction"),
    ],
)
def test_bad_arguments_are_refused_at_construction(kwargs, argument):
    with pytest.raises(ParameterError) as info:
        zc.H2OCache(model(), **kwargs)
    assert info.value.argument == argument


def test_crop_is_refused():
    m = model()
    cache = zc.StreamingLLMCache(budget=16)
    generate(m, prompt(), cache, max_new_tokens=2, min_new_tokens=2)
    with pytest.raises(zc.CacheStateError, match="crop"):
        cache.crop(-1)


# ---- the position policy: after eviction, a step equals full attention hiding the evicted keys --
def test_a_step_after_eviction_equals_a_masked_full_forward():
    """StreamingLLM evicts the same tokens in every layer and head, so the decoding step after the
    prompt's eviction must equal one full forward of prompt + token in which only the last query
    is masked to the sinks + recent window: this checks the kept positions (original, not
    re-assigned), ``get_seq_length`` and ``get_mask_sizes`` together."""
    budget, n_sink = 16, 4
    m = model()
    ids = prompt(n=PROMPT + 1)
    cache = zc.StreamingLLMCache(budget=budget, n_sink=n_sink)
    with torch.no_grad():
        m(ids[:, :PROMPT], cache=cache)
        step = m(ids[:, PROMPT:], cache=cache).logits[:, -1]
    assert cache.stored_length() == budget
    n = PROMPT + 1
    allowed = torch.ones(n, n).tril().bool()
    allowed[-1] = False
    allowed[-1, :n_sink] = True
    allowed[-1, PROMPT - (budget - n_sink) :] = True
    with torch.no_grad():
        full = m(ids, attention_mask=allowed[None, None]).logits[:, -1]
        unmasked = m(ids).logits[:, -1]
    torch.testing.assert_close(step, full, atol=1e-5, rtol=0)
    assert (step - unmasked).abs().max() > 1e-3  # the eviction did change the step


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_a_batch_of_equal_length_rows_equals_each_row_alone(policy):
    """Each row keeps its own tokens (per batch and kv head): batching changes nothing."""
    m = model()
    ids = torch.cat([prompt(seed=1), prompt(seed=2)])
    together = generate(m, ids, POLICIES[policy](m, budget=16), max_new_tokens=12, min_new_tokens=12)
    for b in range(2):
        alone = generate(m, ids[b : b + 1], POLICIES[policy](m, budget=16), max_new_tokens=12, min_new_tokens=12)
        assert torch.equal(together[b : b + 1], alone)


def test_the_readmes_transformers_and_cache_examples_run():
    """README "## transformers": the model example, then the KV-cache example on that model."""
    import pathlib
    import re

    text = (pathlib.Path(__file__).parents[2] / "README.md").read_text()
    part = text[text.index("## transformers") : text.index("## Hooks and analysis")]
    blocks = [body for lang, body in re.findall(r"^```(\w*)\n(.*?)^```$", part, re.S | re.M) if lang == "python"]
    assert len(blocks) == 2, "the model example and the cache example"
    namespace = {"torch": torch}
    torch.manual_seed(0)
    for i, block in enumerate(blocks):
        exec(compile(block, f"README.md:transformers[{i}]", "exec"), namespace)
    cache, tokens = namespace["cache"], namespace["tokens"]
    assert tokens.shape == (1, 96 + 8)
    assert all(cache.stored_length(layer) <= 48 + 8 for layer in range(2))  # the budget after the prompt, then the new tokens


# ---- K5: ZipCache mixed precision inside generate() ------------------------------------------
def test_zipcache_at_8_bits_generates_the_stock_tokens_in_a_quarter_of_the_memory():
    m = model()
    ids = prompt()
    expected = generate(m, ids, DynamicCache())
    cache = zc.ZipCacheCache(m, high_fraction=1.0, high_bits=8)
    assert torch.equal(generate(m, ids, cache), expected)
    assert cache.get_seq_length() == cache.stored_length() == PROMPT + NEW - 1
    fp32_prompt = LAYERS * 2 * 2 * PROMPT * 16 * 4  # layers x (K, V) x kv heads x tokens x head_dim x float32
    quantized = sum(layer.quantized.nbytes for layer in cache.layers)
    assert quantized < fp32_prompt / 2  # codes in a quarter, plus the scales
    assert cache.kv_bytes() == quantized + LAYERS * 2 * 2 * (NEW - 1) * 16 * 4  # generated tokens in float32
    zc.unbind(m)


def test_zipcache_quantizes_the_prompt_by_the_rule_on_the_models_tensors():
    # oracle: record the prompt's keys, values and queries with a stock cache, apply the pure rule
    m = model()
    ids = prompt()
    recorded = {}

    def recording(module, query, key, value, attention_mask, **kwargs):
        recorded.setdefault(module.layer_idx, (query, key, value, kwargs.get("scaling")))
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("zc-record", recording)
    AttentionMaskInterface.register("zc-record", sdpa_mask)
    m.set_attn_implementation("zc-record")
    with torch.no_grad():
        m(ids, cache=DynamicCache())
    m.set_attn_implementation("sdpa")
    cache = zc.ZipCacheCache(m, high_fraction=0.25, high_bits=4, low_bits=2)
    generate(m, ids, cache, max_new_tokens=1, min_new_tokens=1)
    from attnzoo.cache.quantized import mixed_precision_kv, normalized_attention_saliency

    for layer_idx, (q, k, v, scale) in recorded.items():
        want = mixed_precision_kv(k, v, normalized_attention_saliency(q, k, scale=scale), high_fraction=0.25, high_bits=4, low_bits=2)
        got = cache.layers[layer_idx].quantized
        assert torch.equal(got.salient, want.salient)
        for a, b in zip(got.dequantize(), want.dequantize()):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    zc.unbind(m)


def test_zipcache_needs_the_model_and_valid_bits():
    with pytest.raises(ParameterError, match="model"):
        zc.ZipCacheCache()
    m = model()
    with pytest.raises(ParameterError, match="high_bits"):
        zc.ZipCacheCache(m, high_bits=3)
    with pytest.raises(ParameterError, match="high_fraction"):
        zc.ZipCacheCache(m, high_fraction=0)


# ---- K6: PyramidKV's per-layer budgets inside generate() --------------------------------------
def test_pyramidkv_keeps_each_layers_share_and_generates():
    budget, window = 20, 8
    m = model()
    ids = prompt()
    queries, keys = record_prefill(m, ids)
    cache = zc.PyramidKVCache(m, budget=budget, window=window)
    with torch.no_grad():
        m(ids, cache=cache)
    shares = P.pyramid_budgets(budget, LAYERS, PROMPT, window=window)
    assert shares[0] > shares[-1] and sum(shares) == pytest.approx(LAYERS * budget, abs=LAYERS)
    for i in range(LAYERS):  # each layer: SnapKV's rule at its own share, on the model's tensors
        expected = P.snapkv(keys[i], queries[i][:, :, -window:], budget=shares[i], scale=16**-0.5)
        assert torch.equal(cache.layers[i].positions, expected)
    zc.unbind(m)
    out = generate(m, ids, zc.PyramidKVCache(m, budget=budget, window=window), max_new_tokens=6, min_new_tokens=6)
    assert out.shape == (1, PROMPT + 6)
    zc.unbind(m)


def test_pyramidkv_at_a_full_budget_generates_the_stock_tokens():
    m = model()
    ids = prompt()
    expected = generate(m, ids, DynamicCache())
    assert torch.equal(generate(m, ids, zc.PyramidKVCache(m, budget=PROMPT + NEW, window=8)), expected)
    zc.unbind(m)
    with pytest.raises(ParameterError, match="model"):
        zc.PyramidKVCache(budget=10)
    with pytest.raises(ParameterError, match="sdpa"):
        zc.PyramidKVCache(model("eager"), budget=10)
