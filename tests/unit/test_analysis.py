"""attnzoo.analysis (catalog A1-A4) on hand-built maps with known answers."""

from __future__ import annotations

import math

import pytest
import torch

import attnzoo
from attnzoo import analysis
from attnzoo.errors import ParameterError

F64 = torch.float64


def one_hot_rows(targets, n):
    """(len(targets), n): row i puts all its mass on key targets[i]."""
    m = torch.zeros(len(targets), n, dtype=F64)
    m[torch.arange(len(targets)), torch.tensor(targets)] = 1.0
    return m


def uniform(n):
    return torch.full((n, n), 1.0 / n, dtype=F64)


# ---- A1: rollout and entropy -----------------------------------------------------------
def test_rollout_of_identity_maps_is_identity_and_of_uniform_is_uniform():
    eye = torch.eye(4, dtype=F64).expand(2, 4, 4)  # (H, N, N)
    torch.testing.assert_close(analysis.rollout([eye, eye, eye]), torch.eye(4, dtype=F64))
    u = uniform(4).expand(2, 4, 4)
    # one layer: 0.5 I + 0.5 U; two layers: (0.5 I + 0.5 U)^2 = 0.25 I + 0.75 U (U^2 = U)
    torch.testing.assert_close(analysis.rollout([u, u]), 0.25 * torch.eye(4, dtype=F64) + 0.75 * uniform(4))


def test_rollout_hand_computed_two_layers_with_heads_and_batch():
    shift = one_hot_rows([1, 2, 0], 3)  # token i attends to i + 1 (mod 3)
    layer1 = torch.stack([shift, torch.eye(3, dtype=F64)])  # head mean: 0.5 shift + 0.5 I
    a1 = 0.5 * torch.eye(3, dtype=F64) + 0.5 * (0.5 * shift + 0.5 * torch.eye(3, dtype=F64))
    a2 = 0.5 * torch.eye(3, dtype=F64) + 0.5 * shift
    expected = a2 @ a1
    out = analysis.rollout([layer1.expand(2, 2, 3, 3), shift.expand(2, 1, 3, 3)])
    assert out.shape == (2, 3, 3)
    torch.testing.assert_close(out[1], expected)
    torch.testing.assert_close(out.sum(-1), torch.ones(2, 3, dtype=F64))


def test_head_entropy_known_values():
    maps = torch.stack([one_hot_rows([0, 1, 2, 3], 4), uniform(4)])  # head 0: one key, head 1: uniform
    torch.testing.assert_close(analysis.head_entropy(maps), torch.tensor([0.0, math.log(4)], dtype=F64))
    half = torch.tensor([[0.5, 0.5, 0.0]], dtype=F64).expand(1, 3, 3)
    torch.testing.assert_close(analysis.head_entropy(half), torch.tensor([math.log(2)], dtype=F64))
    masked = torch.cat([uniform(2), torch.zeros(1, 2, dtype=F64)]).unsqueeze(0)  # a row that sees nothing: left out
    torch.testing.assert_close(analysis.head_entropy(masked), torch.tensor([math.log(2)], dtype=F64))
    assert analysis.head_entropy(maps, per_query=True).shape == (2, 4)


# ---- A2: sinks -------------------------------------------------------------------------
def sink_maps():
    """Head 0 puts 0.7 of every row on key 0; head 1 is uniform over 5 keys."""
    sink = torch.full((5, 5), 0.075, dtype=F64)
    sink[:, 0] = 0.7
    return torch.stack([sink, uniform(5)])


def test_first_token_mass_and_sink_rate():
    maps = sink_maps()
    torch.testing.assert_close(analysis.first_token_mass(maps), torch.tensor([0.7, 0.2], dtype=F64))
    assert analysis.sink_rate([maps, maps[1:]]) == pytest.approx(1 / 3)
    assert analysis.sink_rate([maps], threshold=0.1) == 1.0


def test_extreme_token_mass():
    maps = sink_maps()
    maps[1] = one_hot_rows([3, 3, 3, 4, 4], 5)  # key 3 gets 0.6, key 4 gets 0.4
    mass, index = analysis.extreme_token_mass(maps, top=1)
    torch.testing.assert_close(mass, torch.tensor([0.7, 0.6], dtype=F64))
    assert index.tolist() == [[0], [3]]
    mass, index = analysis.extreme_token_mass(maps, top=2)
    torch.testing.assert_close(mass, torch.tensor([0.775, 1.0], dtype=F64))


def test_value_norm_drain_with_gqa():
    maps = sink_maps()  # both query heads share one value head
    v = torch.ones(1, 5, 4, dtype=F64)
    v[0, 0] = 0.1  # the sink's value is small: norm 0.2 against 2 for the others
    drain = analysis.value_norm_drain(maps, v)
    mean = (0.2 + 4 * 2.0) / 5
    assert drain[0].item() == pytest.approx(0.2 / mean)  # head 0's top key is the sink
    assert drain[1].item() == pytest.approx(0.2 / mean)  # uniform: ties go to key 0 too
    with pytest.raises(ParameterError) as err:
        analysis.value_norm_drain(maps, torch.ones(3, 5, 4))
    assert err.value.argument == "v"


# ---- A3: retrieval and ablation --------------------------------------------------------
def test_retrieval_score_counts_copies_from_the_needle():
    context = torch.tensor([9, 9, 5, 6, 7, 9])  # the needle is tokens 5 6 7 at keys 2..4
    emitted = torch.tensor([5, 6, 7])
    copy_head = one_hot_rows([2, 3, 4], 6)  # attends to the key holding the token it emits
    lagging = one_hot_rows([2, 2, 3], 6)  # inside the needle but the wrong token twice
    outside = one_hot_rows([0, 1, 5], 6)
    maps = torch.stack([copy_head, lagging, outside])
    score = analysis.retrieval_score(maps, context, emitted, (2, 5))
    torch.testing.assert_close(score, torch.tensor([1.0, 1 / 3, 0.0], dtype=F64))
    # an emitted token that is not from the needle never counts, even if copied
    score = analysis.retrieval_score(one_hot_rows([0], 6).unsqueeze(0), context, torch.tensor([9]), (2, 5))
    assert score.tolist() == [0.0]
    with pytest.raises(ParameterError) as err:
        analysis.retrieval_score(maps, context, emitted, (4, 2))
    assert err.value.argument == "needle"


class SumOfHeads(torch.nn.Module):
    """Two attention layers whose metric is the sum of their outputs: ablating head h of a layer
    changes it by minus that head's output sum (the second layer reads v, not the first's output)."""

    class Attn(torch.nn.Module):
        def forward(self, q, k, v):
            return attnzoo.attention(q, k, v, "softmax")

    def __init__(self):
        super().__init__()
        self.a, self.b = self.Attn(), self.Attn()

    def forward(self, q, k, v):
        return self.a(q, k, v).sum() + self.b(q, k, 2 * v).sum()


def test_head_ablation_importance_is_minus_each_heads_contribution():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 3, 5, 4, generator=gen, dtype=F64) for _ in range(3))
    model = SumOfHeads()
    out = attnzoo.attention(q, k, v, "softmax")
    per_head = out.sum((0, 2, 3))
    importance = analysis.head_ablation_importance(lambda: model(q, k, v), ["a", "b"], 3, model=model)
    torch.testing.assert_close(importance, -torch.stack([per_head, 2 * per_head]), rtol=1e-10, atol=1e-12)
    # without a model, calls are named by order
    importance = analysis.head_ablation_importance(lambda: model(q, k, v), ["call1"], 3)
    torch.testing.assert_close(importance[0], -2 * per_head, rtol=1e-10, atol=1e-12)


# ---- A4: spatial distance and clustering -----------------------------------------------
def test_attention_distance_on_a_grid():
    n = 3 * 4
    right = torch.zeros(n, n, dtype=F64)  # each token attends to its right neighbour (itself at the edge)
    diagonal = torch.zeros(n, n, dtype=F64)  # to the token one down and one right (itself at the edge)
    for r in range(3):
        for c in range(4):
            i = r * 4 + c
            right[i, i + 1 if c < 3 else i] = 1.0
            diagonal[i, (r + 1) * 4 + c + 1 if r < 2 and c < 3 else i] = 1.0
    d = analysis.attention_distance(torch.stack([right, diagonal]), (3, 4), patch_size=16)
    torch.testing.assert_close(d, torch.tensor([16 * 9 / 12, 16 * math.sqrt(2) * 6 / 12], dtype=F64))


def test_attention_distance_drops_prefix_tokens_and_renormalizes():
    body = torch.tensor([[0.0, 0.5], [0.25, 0.25]], dtype=F64)  # after the class token
    maps = torch.zeros(1, 3, 3, dtype=F64)
    maps[0, 0] = 1.0 / 3
    maps[0, 1:, 0] = torch.tensor([0.5, 0.5])
    maps[0, 1:, 1:] = body
    d = analysis.attention_distance(maps, (2,), prefix=1)
    torch.testing.assert_close(d, torch.tensor([(1.0 + 0.5) / 2], dtype=F64))  # rows renormalized: 1.0 and 0.5
    with pytest.raises(ParameterError) as err:
        analysis.attention_distance(maps, (3,), prefix=1)
    assert err.value.argument == "prefix"


def test_cluster_heads_finds_the_two_patterns():
    previous = one_hot_rows([0, 0, 1, 2, 3], 5)
    first = one_hot_rows([0] * 5, 5)
    heads = torch.stack([first, previous, previous * 0.9 + 0.02, first * 0.95 + 0.01, previous])
    labels, centers = analysis.cluster_heads(heads, 2)
    assert labels.tolist() == [0, 1, 1, 0, 1]
    assert centers.shape == (2, 25)
    assert analysis.cluster_heads(heads, 2, seed=5)[0].tolist() == [0, 1, 1, 0, 1]
    assert analysis.cluster_heads(heads, 1)[0].tolist() == [0] * 5
    with pytest.raises(ParameterError) as err:
        analysis.cluster_heads(heads, 6)
    assert err.value.argument == "clusters"


def test_maps_are_checked():
    with pytest.raises(ParameterError) as err:
        analysis.head_entropy(torch.ones(3, 3))
    assert err.value.argument == "maps"
    with pytest.raises(ParameterError):
        analysis.rollout([torch.ones(1, 2, 3)])
    with pytest.raises(ParameterError) as err:
        analysis.rollout([uniform(3).unsqueeze(0)], residual=2.0)
    assert err.value.argument == "residual"
