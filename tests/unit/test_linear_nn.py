"""attnzoo.nn modules of the linear family: Hedgehog's map and its distillation, Performer's map
and its redraw policy, the LinearAttention and Retention layers."""

from __future__ import annotations

import pytest
import torch

import attnzoo
from attnzoo.errors import ParameterError, ShapeError
from attnzoo.nn import HedgehogFeatureMap, LinearAttention, RandomFeatureMap, Retention


def _qk(b=2, h=2, n=24, d=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(b, h, n, d, generator=gen), torch.randn(b, h, n, d, generator=gen)


def test_hedgehog_map_plugs_into_the_functional_form():
    fmap = HedgehogFeatureMap(num_heads=2, head_dim=8, feature_dim=5)
    q, k = _qk()
    v = torch.randn(2, 2, 24, 3)
    assert fmap(q).shape == (2, 2, 24, 10)
    out = attnzoo.get("linear")(q, k, v, causal=True, **fmap.attention_params())
    out.sum().backward()
    assert fmap.weight.grad is not None and fmap.weight.grad.abs().sum() > 0
    assert fmap.bias.grad is not None


@pytest.mark.parametrize("shape", [(1, 2, 2, 24, 8), (2, 24, 8), (2, 3, 24, 8), (2, 2, 24, 5)], ids=["extra-dim", "no-heads", "wrong-heads", "wrong-D"])
def test_hedgehog_map_refuses_a_wrong_shape(shape):
    """Regression (module suite): a (1, B, H, N, D) input broadcast through the per-head matmul
    and came out (1, B, H, N, 2F) without a word; the map now names x and the expected layout."""
    fmap = HedgehogFeatureMap(num_heads=2, head_dim=8)
    with pytest.raises(ShapeError, match=r"x: expected \(B, H=2, N, D=8\)"):
        fmap(torch.randn(*shape))


def test_hedgehog_distillation_loss_is_the_cross_entropy_written_out():
    fmap = HedgehogFeatureMap(num_heads=2, head_dim=8)
    q, k = _qk(n=6)
    s = 8**-0.5
    teacher = torch.softmax((q * s) @ k.transpose(-1, -2), -1)
    scores = fmap(q * s) @ fmap(k).transpose(-1, -2)
    student = scores / scores.sum(-1, keepdim=True)
    want = -(teacher * student.log()).sum(-1).mean()
    torch.testing.assert_close(fmap.distillation_loss(q, k), want)


def test_hedgehog_distillation_loss_is_causal():
    fmap = HedgehogFeatureMap(num_heads=2, head_dim=8)
    q, k = _qk(n=10)
    k2 = k.clone()
    k2[:, :, 1:] = torch.randn_like(k2[:, :, 1:])  # only row 0's single key is kept
    row0 = lambda kk: HedgehogFeatureMap.distillation_loss(fmap, q[:, :, :1], kk[:, :, :1], causal=True)  # noqa: E731
    torch.testing.assert_close(row0(k), row0(k2))
    assert float(row0(k).detach()) == pytest.approx(0.0, abs=1e-6), "one visible key: both distributions are [1], no loss"


def test_hedgehog_distillation_brings_linear_weights_toward_softmax():
    """The cross-entropy is the teacher's entropy plus KL(teacher || linear): training halves the KL."""
    torch.manual_seed(0)
    fmap = HedgehogFeatureMap(num_heads=2, head_dim=8, feature_dim=16)
    q, k = _qk(n=32)
    scores = (q * 8**-0.5) @ k.transpose(-1, -2)
    teacher = torch.softmax(scores.masked_fill(torch.ones(32, 32, dtype=torch.bool).triu(1), float("-inf")), -1)
    entropy = float(-(teacher * teacher.clamp(min=1e-30).log()).sum(-1).mean())
    opt = torch.optim.Adam(fmap.parameters(), lr=0.05)
    first = float(fmap.distillation_loss(q, k, causal=True).detach()) - entropy
    for _ in range(60):
        opt.zero_grad()
        loss = fmap.distillation_loss(q, k, causal=True)
        loss.backward()
        opt.step()
    last = float(loss.detach()) - entropy
    assert 0 <= last < 0.5 * first, f"KL went from {first:.3f} to {last:.3f}"


def test_random_feature_map_redraws_on_schedule_only_in_training():
    fmap = RandomFeatureMap(head_dim=8, num_features=16, seed=5, redraw_interval=3)
    first = fmap.projection.clone()
    assert torch.equal(first, RandomFeatureMap(head_dim=8, num_features=16, seed=5).projection), "seeded"
    assert [fmap.maybe_redraw() for _ in range(3)] == [False, False, True]
    second = fmap.projection.clone()
    assert not torch.equal(first, second)
    fmap.eval()
    assert not any(fmap.maybe_redraw() for _ in range(10))
    assert torch.equal(fmap.projection, second), "no redraw in eval mode"
    replay = RandomFeatureMap(head_dim=8, num_features=16, seed=5)
    replay.redraw()
    assert torch.equal(replay.projection, second), "draw i is seeded with seed + i"


def test_random_feature_map_matches_the_functional_seeded_map():
    fmap = RandomFeatureMap(head_dim=8, num_features=16, seed=2)
    q, k = _qk()
    v = torch.randn(2, 2, 24, 8)
    mech = attnzoo.get("linear")
    torch.testing.assert_close(mech(q, k, v, **fmap.attention_params()), mech(q, k, v, feature_map="softmax_kernel", num_features=16, seed=2))


@pytest.mark.parametrize(
    "layer",
    [
        lambda: LinearAttention(32, 4, causal=True, chunk_size=8),
        lambda: LinearAttention(32, 4, feature_map=HedgehogFeatureMap(4, 8)),
        lambda: LinearAttention(32, 4, feature_map=RandomFeatureMap(8, 32, redraw_interval=2), causal=True),
        lambda: Retention(32, 4, chunk_size=8),
        lambda: Retention(32, 4, causal=False, gamma=0.9, normalize_decay=True),
    ],
    ids=["linear-elu", "linear-hedgehog", "linear-performer", "retention", "retention-bidirectional"],
)
def test_layers_run_and_their_backends_agree(layer):
    torch.manual_seed(0)
    module = layer().eval()
    x = torch.randn(2, 19, 32)
    y = module(x)
    assert y.shape == x.shape
    module.backend = "reference"
    torch.testing.assert_close(module(x), y, rtol=1e-4, atol=1e-5)
    module.train()
    module(x).sum().backward()
    assert module.qkv.weight.grad is not None


def test_layers_name_bad_arguments():
    with pytest.raises(ParameterError) as info:
        LinearAttention(30, 4)
    assert info.value.argument == "num_heads"
    with pytest.raises(ShapeError) as info:
        Retention(32, 4)(torch.randn(2, 5, 16))
    assert info.value.argument == "x"
    with pytest.raises(ParameterError) as info:
        RandomFeatureMap(8, num_features=0)
    assert info.value.argument == "num_features"


# --------------------------------------------------------------------------------------------
# key_padding_mask through the family's sequence modules: real rows equal each sequence alone
# --------------------------------------------------------------------------------------------
def _padded_module_cases():
    from attnzoo.nn.linear.based import TaylorLinearAttention
    from attnzoo.nn.linear.kernelized_rpe import KernelizedRPEAttention
    from attnzoo.nn.linear.linfusion import LinFusionAttention
    from attnzoo.nn.linear.transnormer import TransNormerAttention

    return [
        pytest.param(lambda: LinearAttention(16, 2, causal=True), ("right", "left"), id="LinearAttention"),
        pytest.param(lambda: Retention(16, 2, group_norm=False, normalize_decay=True), ("right", "left"), id="Retention"),
        pytest.param(lambda: TaylorLinearAttention(16, 2, feature_dim=4), ("right", "left"), id="TaylorLinearAttention"),
        pytest.param(lambda: TransNormerAttention(16, 2, kind="norm", causal=True), ("right", "left"), id="TransNormer-norm"),
        pytest.param(lambda: TransNormerAttention(16, 2, kind="diag", block_size=4), ("right",), id="TransNormer-diag"),
        pytest.param(lambda: LinFusionAttention(16, 2), ("right", "left"), id="LinFusionAttention"),
        pytest.param(lambda: KernelizedRPEAttention(16, 2, max_len=32, num_features=8), ("right", "left"), id="KernelizedRPEAttention"),
    ]


@pytest.mark.parametrize("make, sides", _padded_module_cases())
def test_modules_pass_the_padding_mask_through(make, sides):
    torch.manual_seed(0)
    module = make().double().eval()
    lengths, n = (11, 7, 3), 11
    x = torch.randn(3, n, 16, dtype=torch.float64)
    for side in sides:
        pad = torch.ones(3, n, dtype=torch.bool)
        rows = [slice(0, length) if side == "right" else slice(n - length, n) for length in lengths]
        for b, r in enumerate(rows):
            pad[b, r] = False
        with torch.no_grad():
            out = module(x, key_padding_mask=pad)
            for b, r in enumerate(rows):
                alone = module(x[b : b + 1, r])
                torch.testing.assert_close(out[b : b + 1, r], alone, atol=1e-10, rtol=1e-8, msg=lambda m, side=side, b=b: f"{side}, sequence {b}: {m}")
