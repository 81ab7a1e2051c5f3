"""attnzoo.integrations.transformers: attnzoo mechanisms as transformers attention implementations.

References are transformers' own implementations: with ``attnzoo:softmax`` a model must give
sdpa's logits (padded batches: on the real positions) and greedy ``generate`` tokens; MiniLM's
shipped weights in ``BertModel`` must give the stock model's hidden states. Mechanisms sdpa
cannot run (``linear``) are checked against themselves: a padded batch equals each sequence run
alone. Models are tiny random-init configs (hidden 64, 2 layers) in float32, compared at 1e-5.
"""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("transformers")  # the hf extra
from attnzoo.integrations import transformers as hf  # noqa: E402  (first: it makes torchvision importable)

import transformers  # noqa: E402
from transformers import AttentionInterface, BertModel, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM  # noqa: E402
from transformers.masking_utils import causal_mask_function, sliding_window_causal_mask_function  # noqa: E402

import attnzoo  # noqa: E402
from attnzoo.errors import ParameterError, UnknownMechanismError  # noqa: E402

ATOL = 1e-5
VOCAB = 128
LENGTHS = (11, 7, 4)  # one full row, two padded
N = LENGTHS[0]


def llama_config(**overrides) -> LlamaConfig:
    base = dict(
        hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
        vocab_size=VOCAB, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    return LlamaConfig(**{**base, **overrides})


def build(model_class, config, implementation: str, seed: int = 0):
    torch.manual_seed(seed)
    model = model_class(config).eval()
    model.set_attn_implementation(implementation)
    return model


def twin(model, implementation: str):
    """The same weights under another attention implementation."""
    other = copy.deepcopy(model)
    other.set_attn_implementation(implementation)
    return other


def padded_batch(side: str, lengths=LENGTHS, n: int = N, seed: int = 1):
    """(ids, attention_mask 1 = real, position_ids counting real tokens only)."""
    ids = torch.randint(3, VOCAB, (len(lengths), n), generator=torch.Generator().manual_seed(seed))
    mask = torch.zeros(len(lengths), n, dtype=torch.long)
    for b, length in enumerate(lengths):
        mask[b, :length] = 1 if side == "right" else 0
        if side == "left":
            mask[b, n - length :] = 1
    ids = ids.masked_fill(mask == 0, 0)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, positions


def logits(model, ids, mask=None, positions=None):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, position_ids=positions).logits


# ---- (a) generate: the same greedy tokens as sdpa -----------------------------------------
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_generate_matches_sdpa(family):
    if family == "llama":
        model_class, config = LlamaForCausalLM, llama_config()
    else:
        model_class = transformers.Qwen3ForCausalLM
        config = transformers.Qwen3Config(**llama_config().to_diff_dict() | dict(head_dim=16, model_type="qwen3"))
    sdpa = build(model_class, config, "sdpa")
    ours = twin(sdpa, hf.register("softmax"))
    ids, mask, _ = padded_batch("left")  # generate pads on the left
    kwargs = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    expected = sdpa.generate(ids, **kwargs)
    got = ours.generate(ids, **kwargs)
    assert ours.config._attn_implementation == "attnzoo:softmax"
    assert torch.equal(got, expected)
    assert len(set(expected[0, N:].tolist())) > 1  # the check sees a non-trivial continuation


def test_generate_with_a_static_cache_matches_sdpa():
    """A static cache returns all its slots; the mask function trims the unfilled ones."""
    sdpa = build(LlamaForCausalLM, llama_config(), "sdpa")
    ours = twin(sdpa, hf.register("softmax"))
    ids, mask, _ = padded_batch("left")
    kwargs = dict(attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0, cache_implementation="static")
    assert torch.equal(ours.generate(ids, **kwargs), sdpa.generate(ids, **kwargs))


# ---- (b) padded batches: sdpa's logits on the real positions ------------------------------
@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_logits_match_sdpa(side):
    sdpa = build(LlamaForCausalLM, llama_config(), "sdpa")
    ours = twin(sdpa, hf.register("softmax"))
    ids, mask, positions = padded_batch(side)
    real = mask.bool()
    expected, got = logits(sdpa, ids, mask, positions), logits(ours, ids, mask, positions)
    torch.testing.assert_close(got[real], expected[real], atol=ATOL, rtol=0)


def test_mask_registration_is_what_keeps_padding():
    """The trap register() closes: an attention function alone gets attention_mask=None."""
    sdpa = build(LlamaForCausalLM, llama_config(), "sdpa")
    AttentionInterface.register("attnzoo-test:no-mask", hf._attention_function("softmax", {}))
    bare = twin(sdpa, "attnzoo-test:no-mask")
    ids, mask, positions = padded_batch("left")
    real = mask.bool()
    gap = (logits(bare, ids, mask, positions) - logits(sdpa, ids, mask, positions))[real].abs().max()
    assert gap > 1e-2


def test_packed_sequences_take_the_dense_mask():
    """position_ids restarting inside a row (packing: no attention_mask, no cache) is transformers'
    own dense mask; each packed sequence then equals itself run alone."""
    sdpa = build(LlamaForCausalLM, llama_config(), "sdpa")
    ours = twin(sdpa, hf.register("softmax"))
    ids = torch.randint(3, VOCAB, (1, 10), generator=torch.Generator().manual_seed(3))
    positions = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1, 2]])
    with torch.no_grad():
        packed = ours(input_ids=ids, position_ids=positions, use_cache=False).logits
        expected = sdpa(input_ids=ids, position_ids=positions, use_cache=False).logits
    torch.testing.assert_close(packed, expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(packed[:, 4:7], logits(ours, ids[:, 4:7]), atol=ATOL, rtol=0)


def test_gradients_match_sdpa():
    """Training (no dropout): the loss's parameter gradients through attnzoo:softmax are sdpa's."""
    sdpa = build(LlamaForCausalLM, llama_config(), "sdpa").train()
    ours = twin(sdpa, hf.register("softmax")).train()
    ids, mask, positions = padded_batch("left")
    labels = ids.masked_fill(mask == 0, -100)
    for model in (sdpa, ours):
        model(input_ids=ids, attention_mask=mask, position_ids=positions, labels=labels).loss.backward()
    for (name, a), b in zip(sdpa.named_parameters(), ours.parameters()):
        torch.testing.assert_close(b.grad, a.grad, atol=ATOL, rtol=1e-4, msg=name)
    assert ours.model.layers[0].self_attn.q_proj.weight.grad.abs().max() > 0


# ---- (c) MiniLM's weights in BertModel ------------------------------------------------------
def test_minilm_bert_matches_stock():
    minilm = pytest.importorskip("attnzoo.bench.minilm")
    try:
        directory = minilm.model_dir()
    except (ImportError, FileNotFoundError) as err:
        pytest.skip(str(err))
    stock = BertModel.from_pretrained(directory, attn_implementation="sdpa").eval()
    ours = BertModel.from_pretrained(directory, attn_implementation=hf.register("softmax")).eval()
    assert ours.config._attn_implementation == "attnzoo:softmax"
    ids = torch.randint(1000, 2000, (3, 9), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    mask[2, 3:] = 0
    real = mask.bool()
    with torch.no_grad():
        expected = stock(input_ids=ids, attention_mask=mask).last_hidden_state
        got = ours(input_ids=ids, attention_mask=mask).last_hidden_state
        eager = twin(stock, "eager")(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(got[real], expected[real], atol=ATOL, rtol=0)
    torch.testing.assert_close(got[real], eager[real], atol=ATOL, rtol=0)


def test_encoder_decoder_cross_attention_matches_sdpa():
    """Bart: bidirectional encoder, causal decoder, cross-attention over the padded encoder keys."""
    config = transformers.BartConfig(
        vocab_size=VOCAB, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, max_position_embeddings=64,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=None,
    )  # fmt: skip
    sdpa = build(transformers.BartForConditionalGeneration, config, "sdpa")
    ours = twin(sdpa, hf.register("softmax"))
    ids, mask, _ = padded_batch("right")
    decoder_ids = torch.randint(3, VOCAB, (len(LENGTHS), 5), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        expected = sdpa(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids).logits
        got = ours(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids).logits
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    kwargs = dict(attention_mask=mask, max_new_tokens=5, min_new_tokens=5, do_sample=False, num_beams=1)
    assert torch.equal(ours.generate(ids, **kwargs), sdpa.generate(ids, **kwargs))


# ---- (d) other mechanisms end to end -------------------------------------------------------
def mistral(implementation: str, window: int = 4):
    config = MistralConfig(**llama_config().to_diff_dict() | dict(sliding_window=window, model_type="mistral", head_dim=16))
    return build(MistralForCausalLM, config, implementation)


def test_sliding_window_mechanism_matches_sdpa_on_mistral():
    sdpa = mistral("sdpa", window=4)  # 11 tokens: the window cuts
    ours = twin(sdpa, hf.register("sliding_window"))
    ids, _, _ = padded_batch("right", lengths=(N, N))
    torch.testing.assert_close(logits(ours, ids), logits(sdpa, ids), atol=ATOL, rtol=0)
    softmax = twin(sdpa, hf.register("softmax"))  # the window as a mask_mod
    torch.testing.assert_close(logits(softmax, ids), logits(sdpa, ids), atol=ATOL, rtol=0)
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(ours.generate(ids, **kwargs), sdpa.generate(ids, **kwargs))


@pytest.mark.parametrize("side", ["left", "right"])
def test_sliding_window_padded_batch(side):
    """Padding reaches sliding_window through its key_padding_mask, or is refused naming the mask."""
    sdpa = mistral("sdpa", window=4)
    ours = twin(sdpa, hf.register("sliding_window"))
    ids, mask, positions = padded_batch(side)
    if "key_padding_mask" not in {p.name for p in attnzoo.get("sliding_window").params}:
        with pytest.raises(ParameterError, match="takes no key_padding_mask") as err:
            logits(ours, ids, mask, positions)
        assert err.value.argument == "attention_mask"
        return
    real = mask.bool()
    torch.testing.assert_close(logits(ours, ids, mask, positions)[real], logits(sdpa, ids, mask, positions)[real], atol=ATOL, rtol=0)


@pytest.mark.parametrize("side", ["left", "right"])
def test_linear_padded_batch_equals_each_sequence_alone(side):
    model = build(LlamaForCausalLM, llama_config(), hf.register("linear"))
    ids, mask, positions = padded_batch(side)
    batched = logits(model, ids, mask, positions)
    for b, length in enumerate(LENGTHS):
        where = slice(0, length) if side == "right" else slice(N - length, N)
        alone = logits(model, ids[b : b + 1, where])
        torch.testing.assert_close(batched[b, where], alone[0], atol=ATOL, rtol=0)


def test_linear_generate_with_cache_equals_without():
    """Decoding with a KV cache puts the one query at the end of the keys (bottom-right)."""
    model = build(LlamaForCausalLM, llama_config(), hf.register("linear"))
    ids, _, _ = padded_batch("right", lengths=(N, N))
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(ids, use_cache=True, **kwargs), model.generate(ids, use_cache=False, **kwargs))


def test_user_4d_masks():
    """A factoring 4D mask reaches linear as key padding + causal; one that does not is softmax's bias."""
    n = 6
    ids = torch.randint(3, VOCAB, (2, n), generator=torch.Generator().manual_seed(5))
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    keep = torch.ones(2, n, dtype=torch.bool)
    keep[1, :2] = False
    factoring = (causal[None] & keep[:, None, :])[:, None]  # (B, 1, n, n), True = attend
    linear = build(LlamaForCausalLM, llama_config(), hf.register("linear"))
    torch.testing.assert_close(logits(linear, ids, factoring), logits(linear, ids, keep.long()), atol=ATOL, rtol=0)
    additive = torch.zeros(factoring.shape).masked_fill(~factoring, torch.finfo(torch.float32).min)
    torch.testing.assert_close(logits(linear, ids, additive), logits(linear, ids, keep.long()), atol=ATOL, rtol=0)

    blocks = torch.zeros(n, n, dtype=torch.bool)
    blocks[:3, :3] = blocks[3:, 3:] = True  # two bidirectional blocks: neither padding nor causal
    dense = blocks.expand(2, 1, n, n)
    sdpa = build(LlamaForCausalLM, llama_config(), "sdpa")
    softmax = twin(sdpa, hf.register("softmax"))
    torch.testing.assert_close(logits(softmax, ids, dense), logits(sdpa, ids, dense), atol=ATOL, rtol=0)
    with pytest.raises(ParameterError, match="not key padding plus a causal pattern") as err:
        logits(linear, ids, dense)
    assert err.value.argument == "attention_mask"


def test_gemma2_softcap_scaling_and_hybrid_layers_match_eager():
    """Gemma 2: logit soft-capping (softmax's score_mod), query_pre_attn_scalar (scaling is not
    head_dim ** -0.5), and sliding and full layers alternating, each with its own mask."""
    config = transformers.Gemma2Config(
        **llama_config().to_diff_dict() | dict(model_type="gemma2", head_dim=16, sliding_window=4,
                                               attn_logit_softcapping=5.0, query_pre_attn_scalar=32),
    )  # fmt: skip
    assert config.layer_types == ["sliding_attention", "full_attention"]
    eager = build(transformers.Gemma2ForCausalLM, config, "eager")  # sdpa has no soft-capping
    ours = twin(eager, hf.register("softmax"))
    ids, mask, positions = padded_batch("left")
    real = mask.bool()
    torch.testing.assert_close(logits(ours, ids, mask, positions)[real], logits(eager, ids, mask, positions)[real], atol=ATOL, rtol=0)
    kwargs = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(ours.generate(ids, **kwargs), eager.generate(ids, **kwargs))
    linear = twin(eager, hf.register("linear"))
    with pytest.raises(ParameterError) as err:
        logits(linear, ids)
    assert err.value.argument in ("sliding_window", "softcap")


class _Recorder:
    """A stand-in mechanism that records the K/V heads it receives and runs softmax."""

    def __init__(self, gqa: bool):
        self.name, self.gqa, self.params, self.kv_heads = "recorder", gqa, (), []

    def __call__(self, q, k, v, **params):
        self.kv_heads.append(k.shape[1])
        return attnzoo.softmax_attention(q, k, v, **params)


@pytest.mark.parametrize("gqa", [True, False])
def test_kv_heads_repeated_only_without_gqa(gqa):
    gen = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(2, h, 5, 8, generator=gen, dtype=torch.float64) for h in (4, 2, 2))
    mech = _Recorder(gqa)
    out = hf._run(mech, {}, q, hf._Call(k, v, causal=False), None, None)
    assert mech.kv_heads == [2 if gqa else 4]
    expected = attnzoo.softmax_attention(q, k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1))
    torch.testing.assert_close(out, expected)


def test_4d_masks_broadcast_and_edited_in_place():
    """(B, 1, 1, Nk) and (1, 1, Nq, Nk) masks broadcast; a mask edited in place between forwards
    is read again (every layer shares one reading of it per forward); integer masks are refused."""
    n = 6
    ids = torch.randint(3, VOCAB, (2, n), generator=torch.Generator().manual_seed(8))
    keep = torch.ones(2, n, dtype=torch.bool)
    keep[0, :3] = False
    model = build(LlamaForCausalLM, llama_config(), hf.register("linear"))
    # keys only, no causal part (B, 1, 1, Nk): row 0 equals its 3 real tokens run alone, bidirectionally
    positions = (keep.long().cumsum(-1) - 1).clamp(min=0)
    padded = logits(model, ids, keep[:, None, None, :], positions)
    alone = logits(model, ids[:1, 3:], torch.ones(1, 1, 3, 3, dtype=torch.bool))
    torch.testing.assert_close(padded[0, 3:], alone[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(padded[1], logits(model, ids[1:], torch.ones(1, 1, n, n, dtype=torch.bool))[0], atol=ATOL, rtol=0)
    causal = torch.ones(1, 1, n, n, dtype=torch.bool).tril()
    torch.testing.assert_close(logits(model, ids, causal), logits(model, ids), atol=ATOL, rtol=0)
    user = causal.clone()
    first = logits(model, ids, user)
    user[..., 0, 0] = False  # no longer causal-plus-padding: the edit must be seen
    with pytest.raises(ParameterError, match="not key padding plus a causal pattern"):
        logits(model, ids, user)
    torch.testing.assert_close(first, logits(model, ids, causal))
    with pytest.raises(ParameterError, match="bool, True = attend") as err:
        logits(model, ids, causal.long())
    assert err.value.argument == "attention_mask"


def test_attention_function_contract():
    """(B, H, S, D) in, (B, S, H, D) out; is_causal from the call, else the module; scaling is the scale."""
    gen = torch.Generator().manual_seed(10)
    q, k, v = (torch.randn(2, h, 5, 8, generator=gen, dtype=torch.float64) for h in (4, 2, 2))
    attend = hf._attention_function("softmax", {})
    module = torch.nn.Module()
    module.is_causal = True
    out, weights = attend(module, q, k, v, None, scaling=0.3)
    assert weights is None and out.shape == (2, 5, 4, 8)
    reference = attnzoo.softmax_attention(q, k, v, causal=True, scale=0.3)
    torch.testing.assert_close(out, reference.transpose(1, 2))
    out, _ = attend(module, q, k, v, None, scaling=0.3, is_causal=False)
    torch.testing.assert_close(out, attnzoo.softmax_attention(q, k, v, scale=0.3).transpose(1, 2))


def test_from_config_takes_the_key():
    key = hf.register("softmax")
    model = transformers.AutoModelForCausalLM.from_config(llama_config(), attn_implementation=key)
    assert model.config._attn_implementation == key
    assert model.model.layers[0].self_attn.config._attn_implementation == key


# ---- the mask function's three answers -----------------------------------------------------
def test_mask_function_answers():
    keep = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]], dtype=torch.bool)
    assert hf.attnzoo_mask(2, 4, 4, attention_mask=torch.ones(2, 4, dtype=torch.bool)) is None
    padded = hf.attnzoo_mask(2, 4, 4, attention_mask=keep)
    assert padded.shape == (2, 4) and torch.equal(padded, keep) and padded._attnzoo_pattern == hf._Pattern(True)
    window = hf.attnzoo_mask(2, 4, 4, mask_function=sliding_window_causal_mask_function(3), attention_mask=keep)
    assert window._attnzoo_pattern == hf._Pattern(True, 3)
    # a static cache: 8 slots, 4 filled by these queries; the unfilled ones are trimmed
    static = hf.attnzoo_mask(2, 4, 8, mask_function=causal_mask_function, attention_mask=keep)
    assert torch.equal(static, keep)
    dense = hf.attnzoo_mask(2, 4, 4, mask_function=lambda b, h, q, kv: kv <= q + 1, attention_mask=keep)
    assert dense.shape == (2, 1, 4, 4) and dense.dtype == torch.bool
    assert torch.equal(dense[1, 0], torch.ones(4, 4, dtype=torch.bool).tril(1))


# ---- (e) refusals -------------------------------------------------------------------------
def test_unknown_mechanism_and_parameters():
    with pytest.raises(UnknownMechanismError):
        hf.register("no_such_mechanism")
    with pytest.raises(ParameterError) as err:
        hf.register("linear", no_such_param=1)
    assert err.value.argument == "no_such_param"
    with pytest.raises(ParameterError, match="set by the integration") as err:
        hf.register("softmax", causal=True)
    assert err.value.argument == "causal"
    assert hf.register("linear", key="my-linear", feature_map="relu") == "my-linear"


def test_dropout_in_training():
    """softmax applies attention dropout (torch's SDPA, same RNG draws as transformers' sdpa); others refuse."""
    config = llama_config(attention_dropout=0.5)
    sdpa = build(LlamaForCausalLM, config, "sdpa").train()
    ours = twin(sdpa, hf.register("softmax")).train()
    ids, mask, positions = padded_batch("right")
    torch.manual_seed(7)
    expected = logits(sdpa, ids, mask, positions)
    torch.manual_seed(7)
    got = logits(ours, ids, mask, positions)
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], atol=ATOL, rtol=0)
    assert not torch.allclose(got, logits(ours.eval(), ids, mask, positions))  # dropout did apply
    linear = twin(sdpa, hf.register("linear")).train()
    with pytest.raises(ParameterError, match="dropout") as err:
        logits(linear, ids, mask, positions)
    assert err.value.argument == "dropout"


def test_refusals_name_the_argument():
    linear = twin(mistral("sdpa"), hf.register("linear"))
    ids, _, _ = padded_batch("right", lengths=(N, N))
    with pytest.raises(ParameterError, match="sliding_window=4") as err:
        logits(linear, ids)
    assert err.value.argument == "sliding_window"
    softmax = build(LlamaForCausalLM, llama_config(), hf.register("softmax"))
    with pytest.raises(ParameterError) as err, torch.no_grad():
        softmax(input_ids=ids, output_attentions=True)
    assert err.value.argument == "output_attentions"
    agent = build(LlamaForCausalLM, llama_config(), hf.register("agent", agents=4))
    with pytest.raises(ParameterError, match="no causal form") as err:
        logits(agent, ids)
    assert err.value.argument == "is_causal"
