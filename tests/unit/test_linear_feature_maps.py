"""Feature maps of the linear family: each map's defining identity, random features seeded and
deterministic, and the parameter checks that name the argument at fault."""

from __future__ import annotations

import pytest
import torch

import attnzoo
from attnzoo.errors import ParameterError
from attnzoo.functional.linear.feature_maps import (
    default_num_features,
    elu_plus_one,
    feature_count,
    feature_map_for,
    hedgehog_features,
    orthogonal_gaussian,
    positive_random_features,
    taylor_feature_count,
    taylor_features,
)


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_taylor_features_give_the_second_order_expansion_exactly():
    x, y = _randn(50, 7), _randn(50, 7, seed=1)
    dot = (x * y).sum(-1)
    got = (taylor_features(x) * taylor_features(y)).sum(-1)
    torch.testing.assert_close(got, 1 + dot + dot**2 / 2, rtol=1e-12, atol=1e-12)
    assert taylor_features(x).shape[-1] == taylor_feature_count(7) == 1 + 7 + 28


def test_taylor_feature_dim_keeps_the_leading_channels():
    x = _randn(3, 10)
    torch.testing.assert_close(taylor_features(x, 4), taylor_features(x[:, :4]))
    assert taylor_features(x, 4).shape[-1] == taylor_feature_count(4) == 15


def test_elu_plus_one_is_positive_and_linear_above_zero():
    x = torch.linspace(-30, 30, 601, dtype=torch.float64)
    phi = elu_plus_one(x)
    assert bool((phi > 0).all())
    torch.testing.assert_close(phi[x > 0], x[x > 0] + 1)


def test_random_projection_is_seeded_deterministic_and_orthogonal_in_blocks():
    a = orthogonal_gaussian(20, 8, seed=3)
    assert a.shape == (8, 20) and a.dtype == torch.float64
    assert torch.equal(a, orthogonal_gaussian(20, 8, seed=3)), "same seed, same features"
    assert not torch.allclose(a, orthogonal_gaussian(20, 8, seed=4)), "another seed, other features"
    block = a[:, :8] / a[:, :8].norm(dim=0)
    torch.testing.assert_close(block.T @ block, torch.eye(8, dtype=torch.float64), rtol=0, atol=1e-12)
    per_head = orthogonal_gaussian(5, 4, seed=0, heads=3)
    assert per_head.shape == (3, 4, 5) and not torch.allclose(per_head[0], per_head[1])


def test_linear_softmax_kernel_is_deterministic_for_a_seed():
    q, k, v = _randn(1, 2, 30, 8), _randn(1, 2, 30, 8, seed=1), _randn(1, 2, 30, 8, seed=2)
    mech = attnzoo.get("linear")
    first = mech(q, k, v, feature_map="softmax_kernel", seed=11)
    assert torch.equal(first, mech(q, k, v, feature_map="softmax_kernel", seed=11))
    assert not torch.allclose(first, mech(q, k, v, feature_map="softmax_kernel", seed=12))
    w = orthogonal_gaussian(default_num_features(8), 8, seed=11)
    torch.testing.assert_close(first, mech(q, k, v, feature_map="softmax_kernel", projection=w))


def test_positive_random_features_estimate_the_softmax_kernel():
    """E[phi(x) . phi(y)] = exp(x . y) (Performer Lemma 1): the mean over 200 seeds is within 5%.

    Small norms keep the estimator's log-normal tail short. Without the sign fix of the QR
    (directions not uniform) this mean was 21% off; with it, 2.2%."""
    x, y = _randn(16, 6) * 0.25, _randn(16, 6, seed=1) * 0.25
    estimates = torch.stack(
        [(positive_random_features(x, w) * positive_random_features(y, w)).sum(-1) for w in (orthogonal_gaussian(256, 6, seed=s) for s in range(200))]
    )
    rel = (estimates.mean(0) / torch.exp((x * y).sum(-1)) - 1).abs().max()
    assert rel < 0.05, f"worst relative error of the mean estimate {rel:.3g}"


def test_positive_random_features_stay_finite_for_large_inputs():
    w = orthogonal_gaussian(32, 16, seed=0).float()
    x = torch.randn(100, 16) * 1e3
    phi = positive_random_features(x, w)
    assert bool(torch.isfinite(phi).all()) and bool((phi >= 0).all())


def test_softmax_kernel_linear_attention_approaches_softmax_attention():
    """Many features, normalized: close to exact softmax attention (the approximation works end to end)."""
    q, k, v = _randn(1, 1, 64, 8) * 0.5, _randn(1, 1, 64, 8, seed=1) * 0.5, _randn(1, 1, 64, 8, seed=2)
    exact = attnzoo.softmax_attention(q, k, v, causal=True)
    approx = attnzoo.get("linear")(q, k, v, feature_map="softmax_kernel", num_features=4096, causal=True)
    elu = attnzoo.get("linear")(q, k, v, causal=True)
    err = (approx - exact).abs().mean()
    assert err < 0.02 and err < (elu - exact).abs().mean() / 3, f"mean error {err:.3g}"


def test_softmax_kernel_splits_the_scale_between_q_and_k():
    """phi(sqrt(s) q) . phi(sqrt(s) k): the same kernel exp(s q . k), from the balanced split."""
    w = orthogonal_gaussian(16, 4, seed=0)
    maps = feature_map_for("softmax_kernel", head_dim=4, scale=0.25, device=torch.device("cpu"), projection=w)
    x = _randn(3, 4)
    torch.testing.assert_close(maps.query(x), positive_random_features(x * 0.5, w))
    torch.testing.assert_close(maps.key(x), positive_random_features(x * 0.5, w))
    plain = feature_map_for("elu", head_dim=4, scale=0.25, device=torch.device("cpu"))
    torch.testing.assert_close(plain.query(x), elu_plus_one(0.25 * x))
    torch.testing.assert_close(plain.key(x), elu_plus_one(x))


def test_hedgehog_features_are_a_distribution_over_2f_features():
    x = _randn(2, 3, 5, 4)
    w, b = _randn(3, 4, 6, seed=1), _randn(3, 6, seed=2)
    phi = hedgehog_features(x, w, b)
    assert phi.shape == (2, 3, 5, 12)
    torch.testing.assert_close(phi.sum(-1), torch.ones(2, 3, 5, dtype=torch.float64))
    proj = x @ w + b.unsqueeze(1)
    torch.testing.assert_close(phi, torch.softmax(torch.cat([proj, -proj], -1), -1))


def test_feature_count_of_each_map():
    assert feature_count("elu", 64) == 64
    assert feature_count("softmax_kernel", 64) == default_num_features(64) == 266
    assert feature_count("softmax_kernel", 64, projection=torch.zeros(64, 100)) == 100
    assert feature_count("taylor", 64, feature_dim=16) == 1 + 16 + 136
    assert feature_count("hedgehog", 64, feature_weights=torch.zeros(8, 64, 32)) == 64
    assert feature_count(lambda x: torch.cat([x, x], -1), 64) == 128


# --------------------------------------------------------------------------------------------
# errors name the argument
# --------------------------------------------------------------------------------------------
def _qkv(h=2, d=8):
    return torch.randn(1, h, 5, d), torch.randn(1, h, 5, d), torch.randn(1, h, 5, d)


@pytest.mark.parametrize(
    "params, argument, phrase",
    [
        (dict(feature_map="elu", num_features=16), "num_features", "softmax_kernel"),
        (dict(feature_map="elu", feature_dim=4), "feature_dim", "taylor"),
        (dict(feature_map="taylor", feature_weights=torch.zeros(8, 4)), "feature_weights", "hedgehog"),
        (dict(feature_map="hedgehog"), "feature_weights", "needs its weights"),
        (dict(feature_map="softmax_kernel", projection=torch.zeros(8, 16), seed=1), "seed", "one of them"),
        (dict(feature_map="softmax_kernel", projection=torch.zeros(8, 16), num_features=8), "num_features", "16"),
        (dict(feature_map="softmax_kernel", projection=torch.zeros(7, 16)), "projection", "(D=8, m)"),
        (dict(feature_map="hedgehog", feature_weights=torch.zeros(8, 4), feature_bias=torch.zeros(5)), "feature_bias", "does not fit"),
        (dict(feature_map="taylor", feature_dim=9), "feature_dim", "<= 8"),
        (dict(feature_map="softmax"), "feature_map", "'softmax_kernel'"),
        (dict(chunk_size=0), "chunk_size", "positive int"),
        (dict(eps=0.0), "eps", "positive"),
    ],
)
def test_linear_parameter_errors_name_the_argument(params, argument, phrase):
    with pytest.raises(ParameterError) as info:
        attnzoo.get("linear")(*_qkv(), **params)
    assert info.value.argument == argument and phrase in str(info.value), str(info.value)


@pytest.mark.parametrize(
    "params, argument, phrase",
    [
        (dict(gamma=(0.9, 0.9, 0.9)), "gamma", "2 of them"),
        (dict(gamma=torch.full((2,), 0.9, requires_grad=True)), "gamma", "detach"),
        (dict(gamma=1.5), "gamma", "(0, 1]"),
    ],
)
def test_retention_parameter_errors_name_the_argument(params, argument, phrase):
    with pytest.raises(ParameterError) as info:
        attnzoo.get("retention")(*_qkv(), **params)
    assert info.value.argument == argument and phrase in str(info.value), str(info.value)


def test_bidirectional_retention_refuses_cross_lengths():
    q, k, v = _qkv()
    with pytest.raises(ParameterError, match="as many queries as keys") as info:
        attnzoo.get("retention")(q[:, :, :3], k, v, causal=False)
    assert info.value.argument == "causal"
