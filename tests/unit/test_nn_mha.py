"""nn.mha: MultiheadAttention (torch's conventions over any registered mechanism) and ShortConvolution.

Covers: the softmax layer against ``torch.nn.MultiheadAttention`` with copied weights
(``from_torch``), in float64 to 1e-6, for self- and cross-attention (kdim/vdim), both layouts and
unbatched inputs, bias=False, add_bias_kv and add_zero_attn, and each kind of mask (bool and float
key_padding_mask, bool (L, S) and float (B * H, L, S) attn_mask, both together, causal), outputs,
weights (averaged or per head) and gradients of inputs and parameters; dropout in training
(the same weights torch drops under the same seed) and none in eval; queries with no key to see
(0, not NaN); causality (future tokens never change past outputs) for softmax and linear and the
non-causal default; padded batches for other mechanisms (each sequence alone gives the same
output); clear errors naming the argument (a mechanism without key_padding_mask, attn_mask or
need_weights for a mechanism without scores, dropout beyond softmax, a positional mechanism name,
extra keys with causal, a missing pattern, unknown mechanisms and parameters, shapes); per-length
example parameters and state sizes; the README example (which asserts torch parity itself); the
short convolution against a depthwise Conv1d.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import attnzoo
from attnzoo import registry
from attnzoo.errors import ParameterError, ShapeError, UnknownMechanismError
from attnzoo.nn.mha import MultiheadAttention, ShortConvolution

# the CPU is shared: two threads under load were up to 10x slower than one for these small models
pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    # torch warns when its two masks differ in type; mixing them is what the parity tests check
    pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask and attn_mask:UserWarning"),
]

F64 = torch.float64
E, H, L, S, B = 16, 4, 5, 7, 3


def _layer(mechanism: str, causal: bool = True, **params) -> MultiheadAttention:
    torch.manual_seed(0)
    return MultiheadAttention(32, 4, batch_first=True, mechanism=mechanism, causal=causal, **params).double()


def _pair(batch_first: bool = False, **config) -> tuple[torch.nn.MultiheadAttention, MultiheadAttention]:
    torch.manual_seed(0)
    theirs = torch.nn.MultiheadAttention(E, H, batch_first=batch_first, dtype=F64, **config).eval()
    if theirs.bias_k is None and theirs.in_proj_bias is not None:  # torch starts its biases at 0: make them count
        torch.nn.init.normal_(theirs.in_proj_bias)
        torch.nn.init.normal_(theirs.out_proj.bias)
    return theirs, MultiheadAttention.from_torch(theirs)


def _inputs(batch_first: bool, kdim: int = E, vdim: int = E, gen_seed: int = 1, requires_grad: bool = False):
    gen = torch.Generator().manual_seed(gen_seed)

    def tokens(n: int, c: int) -> torch.Tensor:
        shape = (B, n, c) if batch_first else (n, B, c)
        return torch.randn(shape, generator=gen, dtype=F64).requires_grad_(requires_grad)

    return tokens(L, E), tokens(S, kdim), tokens(S, vdim)


def _masks(gen_seed: int = 2) -> dict[str, dict[str, torch.Tensor]]:
    """Each kind of torch mask, named; every query keeps at least one key."""
    gen = torch.Generator().manual_seed(gen_seed)
    padding = torch.zeros(B, S, dtype=torch.bool)
    padding[0, -3:] = True
    padding[2, :2] = True
    blocked = torch.rand(L, S, generator=gen) < 0.4
    blocked[:, 2] = False  # key 2 is never padded nor blocked
    return {
        "none": {},
        "padding-bool": {"key_padding_mask": padding},
        "padding-float": {"key_padding_mask": torch.randn(B, S, generator=gen, dtype=F64)},
        "attn-bool-LS": {"attn_mask": blocked},
        "attn-float-BHLS+padding": {"attn_mask": torch.randn(B * H, L, S, generator=gen, dtype=F64), "key_padding_mask": padding},
        "attn-bool-BHLS": {"attn_mask": (torch.rand(B * H, L, S, generator=gen) < 0.3) & (torch.arange(S) != 2)},
    }


CONFIGS = {
    "self": {},
    "cross-kdim5-vdim3": {"kdim": 5, "vdim": 3},
    "no-bias": {"bias": False},
    "add_bias_kv": {"add_bias_kv": True},
    "add_zero_attn": {"add_zero_attn": True},
}


@pytest.mark.parametrize("batch_first", [False, True], ids=["LBE", "BLE"])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_softmax_layer_equals_torch_multihead_attention(config, batch_first):
    kw = CONFIGS[config]
    theirs, ours = _pair(batch_first, **kw)
    q, k, v = _inputs(batch_first, kw.get("kdim", E), kw.get("vdim", E))
    for name, masks in _masks().items():
        for average in (True, False):
            expected, expected_w = theirs(q, k, v, need_weights=True, average_attn_weights=average, **masks)
            out, weights = ours(q, k, v, need_weights=True, average_attn_weights=average, **masks)
            torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6, msg=f"{config} {name}")
            torch.testing.assert_close(weights, expected_w, rtol=1e-6, atol=1e-6, msg=f"{config} {name} weights")
        out, weights = ours(q, k, v, **masks)  # the mechanism's own path, no weights
        assert weights is None
        torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6, msg=f"{config} {name} via the mechanism")


def test_gradients_equal_torch_for_inputs_and_parameters():
    theirs, ours = _pair(False, kdim=5, vdim=3)
    masks = _masks()["attn-float-BHLS+padding"]
    grads = []
    for module in (theirs, ours):
        q, k, v = _inputs(False, 5, 3, requires_grad=True)
        out, _ = module(q, k, v, need_weights=False, **masks)
        out.square().sum().backward()
        params = {n: p.grad for n, p in module.named_parameters()}
        grads.append(((q.grad, k.grad, v.grad), params))
    for got, want in zip(grads[1][0], grads[0][0]):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    theirs_p, ours_p = grads[0][1], grads[1][1]
    torch.testing.assert_close(ours_p["q_proj.weight"], theirs_p["q_proj_weight"], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours_p["k_proj.weight"], theirs_p["k_proj_weight"], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours_p["v_proj.weight"], theirs_p["v_proj_weight"], rtol=1e-6, atol=1e-6)
    in_bias = torch.cat([ours_p["q_proj.bias"], ours_p["k_proj.bias"], ours_p["v_proj.bias"]])
    torch.testing.assert_close(in_bias, theirs_p["in_proj_bias"], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours_p["out_proj.weight"], theirs_p["out_proj.weight"], rtol=1e-6, atol=1e-6)


def test_causal_layer_equals_torch_with_a_causal_mask_and_is_causal():
    theirs, ours_plain = _pair(True)
    ours_causal = MultiheadAttention.from_torch(theirs, causal=True)
    x, _, _ = _inputs(True)
    future = torch.ones(L, L, dtype=torch.bool).triu(1)  # True = not allowed
    expected, _ = theirs(x, x, x, attn_mask=future, need_weights=False)
    torch.testing.assert_close(ours_causal(x)[0], expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours_plain(x, is_causal=True)[0], expected, rtol=1e-6, atol=1e-6)
    padding = torch.zeros(B, L, dtype=torch.bool)
    padding[0, -2:] = True  # right padding: every query keeps key 0 (torch gives NaN to a query without keys)
    expected, _ = theirs(x, x, x, attn_mask=future, key_padding_mask=padding)
    torch.testing.assert_close(ours_causal(x, key_padding_mask=padding, need_weights=True)[0], expected, rtol=1e-6, atol=1e-6)
    assert not ours_plain.causal  # torch's default: not causal


def test_unbatched_inputs_equal_torch():
    theirs, ours = _pair(False)
    q, k, v = (t[:, 0] for t in _inputs(False))
    padding = torch.zeros(S, dtype=torch.bool)
    padding[-2:] = True
    expected, expected_w = theirs(q, k, v, key_padding_mask=padding, average_attn_weights=False)
    out, weights = ours(q, k, v, key_padding_mask=padding, need_weights=True, average_attn_weights=False)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(weights, expected_w, rtol=1e-6, atol=1e-6)
    assert weights.shape == (H, L, S)


def test_dropout_drops_the_weights_torch_drops_and_none_in_eval():
    theirs, ours = _pair(True, dropout=0.3)
    q, k, v = _inputs(True)
    theirs.train()
    ours.train()
    torch.manual_seed(7)
    expected, expected_w = theirs(q, k, v, need_weights=True, average_attn_weights=False)
    torch.manual_seed(7)  # the same draws: torch drops its (B * H, L, S) weights, these are (B, H, L, S)
    out, weights = ours(q, k, v, need_weights=True, average_attn_weights=False)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(weights, expected_w, rtol=1e-6, atol=1e-6)
    assert (weights == 0).any()  # the check can fail: something was dropped
    dropped, _ = ours(q, k, v)  # training without need_weights drops too
    ours.eval()
    clean, _ = ours(q, k, v)
    assert (dropped - clean).abs().max() > 1e-3
    torch.testing.assert_close(clean, theirs.eval()(q, k, v)[0], rtol=1e-6, atol=1e-6)


def test_a_query_with_no_key_outputs_zero_not_nan():
    _, ours = _pair(True)
    q, k, v = _inputs(True)
    blocked = torch.zeros(L, S, dtype=torch.bool)
    blocked[1] = True  # query 1 sees nothing
    padding = torch.zeros(B, S, dtype=torch.bool)
    padding[0, :3] = True
    blocked[3, 3:] = True  # query 3 of batch 0: keys 0-2 padded, 3+ blocked
    for need_weights in (False, True):
        out, weights = ours(q, k, v, attn_mask=blocked, key_padding_mask=padding, need_weights=need_weights)
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out[:, 1], ours.out_proj.bias.expand(B, E))  # attention 0, then out_proj
        torch.testing.assert_close(out[0, 3], ours.out_proj.bias)
        assert (out[1, 3] - ours.out_proj.bias).abs().max() > 1e-3  # batch 1 has keys 0-2
        if need_weights:
            assert weights[:, 1].abs().sum() == 0


@pytest.mark.parametrize("mechanism", ["softmax", "linear"])
def test_future_tokens_do_not_change_past_outputs(mechanism):
    layer = _layer(mechanism)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 24, 32, generator=gen, dtype=F64)
    changed = x.clone()
    changed[:, 15:] = torch.randn(2, 9, 32, generator=gen, dtype=F64)
    y, y_changed = layer(x)[0], layer(changed)[0]
    torch.testing.assert_close(y_changed[:, :15], y[:, :15])
    assert (y_changed[:, 15:] - y[:, 15:]).abs().max() > 1e-3  # the check can fail: the future did change


def test_default_layer_is_not_causal():
    torch.manual_seed(0)
    layer = MultiheadAttention(32, 4, batch_first=True).double()
    x = torch.randn(1, 10, 32, dtype=F64)
    changed = x.clone()
    changed[:, -1] += 1.0
    assert (layer(changed)[0][:, 0] - layer(x)[0][:, 0]).abs().max() > 1e-6


def test_softmax_layer_matches_projections_around_torch_sdpa():
    layer = _layer("softmax")
    x = torch.randn(3, 17, 32, dtype=F64)

    def heads(proj):
        return proj(x).view(3, 17, 4, 8).transpose(1, 2)

    out = F.scaled_dot_product_attention(heads(layer.q_proj), heads(layer.k_proj), heads(layer.v_proj), is_causal=True)
    expected = layer.out_proj(out.transpose(1, 2).reshape(3, 17, 32))
    torch.testing.assert_close(layer(x)[0], expected)


PADDED = ["softmax", "linear", "based", "retention", "transnormer"]


@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
@pytest.mark.parametrize("mechanism", PADDED)
def test_padded_batch_equals_each_sequence_alone(mechanism, causal):
    assert any(p.name == "key_padding_mask" for p in attnzoo.get(mechanism).params)
    torch.manual_seed(0)
    layer = MultiheadAttention(16, 2, batch_first=True, mechanism=mechanism, causal=causal, example_params=True).double()
    x = torch.randn(2, 12, 16, dtype=F64)
    padding = torch.zeros(2, 12, dtype=torch.bool)
    padding[1, 7:] = True  # right padding: sequence 1 has 7 tokens
    out, _ = layer(x, key_padding_mask=padding)
    torch.testing.assert_close(out[1, :7], layer(x[1:2, :7])[0][0], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(out[0], layer(x[0:1])[0][0], rtol=1e-9, atol=1e-9)
    if not causal:  # the check can fail: attending the pads would change the output
        assert (out[1, :7] - layer(x[1:2])[0][0, :7]).abs().max() > 1e-6


def test_mechanism_without_key_padding_mask_is_refused_naming_it(monkeypatch):
    linear = attnzoo.get("linear")
    bare = dataclasses.replace(linear, name="test_no_padding", params=tuple(p for p in linear.params if p.name != "key_padding_mask"))
    monkeypatch.setitem(registry._REGISTRY, bare.name, bare)
    layer = MultiheadAttention(16, 2, batch_first=True, mechanism=bare.name)
    x = torch.randn(2, 6, 16)
    assert layer(x)[0].shape == x.shape
    with pytest.raises(ParameterError, match="takes no key_padding_mask") as info:
        layer(x, key_padding_mask=torch.zeros(2, 6, dtype=torch.bool))
    assert info.value.argument == "key_padding_mask"


def test_what_only_softmax_computes_is_refused_for_other_mechanisms():
    layer = MultiheadAttention(16, 2, batch_first=True, mechanism="linear")
    x = torch.randn(2, 6, 16)
    cases = {
        "attn_mask": dict(attn_mask=torch.zeros(6, 6, dtype=torch.bool)),
        "key_padding_mask": dict(key_padding_mask=torch.zeros(2, 6)),  # a float mask is an additive bias
        "need_weights": dict(need_weights=True),
    }
    for argument, kwargs in cases.items():
        with pytest.raises(ParameterError) as info:
            layer(x, **kwargs)
        assert info.value.argument == argument
    with pytest.raises(ParameterError) as info:
        MultiheadAttention(16, 2, 0.1, mechanism="linear")
    assert info.value.argument == "dropout"


def test_constructor_errors_name_the_argument():
    cases = [
        ("mechanism", lambda: MultiheadAttention(32, 4, "linear")),  # the old positional mechanism
        ("causal", lambda: MultiheadAttention(32, 4, add_bias_kv=True, causal=True)),
        ("dropout", lambda: MultiheadAttention(32, 4, dropout=1.0)),
        ("batch_first", lambda: MultiheadAttention(32, 4, batch_first=1)),
        ("kdim", lambda: MultiheadAttention(32, 4, kdim=0)),
        ("not_a_param", lambda: MultiheadAttention(32, 4, not_a_param=1)),
        ("num_heads", lambda: MultiheadAttention(30, 4)),
        ("key_padding_mask", lambda: MultiheadAttention(32, 4, key_padding_mask=None)),
        ("module", lambda: MultiheadAttention.from_torch(torch.nn.Linear(2, 2))),
    ]
    for argument, build in cases:
        with pytest.raises(ParameterError) as info:
            build()
        assert info.value.argument == argument, argument


def test_forward_errors_name_the_argument():
    layer = MultiheadAttention(16, 2, kdim=5)
    q, k = torch.randn(4, 2, 16), torch.randn(6, 2, 5)
    cases = [
        ("key", lambda: layer(q, torch.randn(6, 2, 16), k)),
        ("value", lambda: layer(q, k, torch.randn(6, 2, 7))),
        ("value", lambda: layer(q, k, torch.randn(5, 2, 16))),
        ("key", lambda: layer(q, torch.randn(6, 3, 5), torch.randn(6, 3, 16))),
        ("key_padding_mask", lambda: layer(q, k, torch.randn(6, 2, 16), key_padding_mask=torch.zeros(2, 5, dtype=torch.bool))),
        ("attn_mask", lambda: layer(q, k, torch.randn(6, 2, 16), attn_mask=torch.zeros(4, 4, dtype=torch.bool))),
        ("query", lambda: layer(torch.randn(4, 2, 8))),
    ]
    for argument, call in cases:
        with pytest.raises(ShapeError) as info:
            call()
        assert info.value.argument == argument, argument
    with pytest.raises(ParameterError) as info:
        MultiheadAttention(16, 2, add_zero_attn=True)(q, is_causal=True)
    assert info.value.argument == "is_causal"


def test_cross_attention_needs_the_cross_pattern():
    window_only = MultiheadAttention(16, 2, batch_first=True, mechanism="window", window_size=2)
    with pytest.raises(ParameterError, match="noncausal_cross") as info:
        window_only(torch.randn(1, 4, 16), torch.randn(1, 6, 16), torch.randn(1, 6, 16))
    assert info.value.argument == "mechanism"
    with pytest.raises(ParameterError, match="does not support the noncausal_cross pattern") as info:
        MultiheadAttention(16, 2, mechanism="window", add_zero_attn=True)
    assert info.value.argument == "mechanism"


def test_other_mechanisms_do_cross_attention():
    torch.manual_seed(0)
    layer = MultiheadAttention(16, 2, kdim=6, vdim=5, mechanism="linear").double()
    q, k, v = torch.randn(4, 2, 16, dtype=F64), torch.randn(9, 2, 6, dtype=F64), torch.randn(9, 2, 5, dtype=F64)
    out, _ = layer(q, k, v)
    # the same projections around the functional call
    heads = lambda t, p: p(t.transpose(0, 1)).view(2, -1, 2, 8).transpose(1, 2)  # noqa: E731
    expected = attnzoo.linear_attention(heads(q, layer.q_proj), heads(k, layer.k_proj), heads(v, layer.v_proj))
    expected = layer.out_proj(expected.transpose(1, 2).reshape(2, 4, 16)).transpose(0, 1)
    torch.testing.assert_close(out, expected)


def test_gradients_reach_every_projection():
    layer = _layer("linear")
    layer(torch.randn(2, 12, 32, dtype=F64))[0].square().sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_example_params_follow_the_sequence_length():
    # kernelized_rpe's example rpe is a (H, 2N - 1) tensor: one per length, rebuilt per shape
    torch.manual_seed(0)
    layer = MultiheadAttention(16, 2, batch_first=True, mechanism="kernelized_rpe", example_params=True)
    for n in (8, 13):
        assert layer(torch.randn(1, n, 16))[0].shape == (1, n, 16)
    assert len(layer._examples) == 2


def test_user_parameters_override_example_ones():
    layer = MultiheadAttention(16, 2, mechanism="sliding_window", causal=True, example_params=True, window=(2, 0))
    problem = layer.mechanism.describe(*layer.heads(torch.randn(1, 9, 16)))
    assert layer.params_for(problem)["window"] == (2, 0)
    assert layer.params_for(problem)["causal"] is True


def test_state_size_is_per_layer_and_none_for_a_kv_cache():
    linear = MultiheadAttention(32, 4, mechanism="linear")
    assert linear.state_size() == 4 * attnzoo.get("linear").state_size(8, 8)
    assert MultiheadAttention(32, 4).state_size() is None
    assert linear.d_model == linear.embed_dim == 32  # the old name still reads


def test_unknown_mechanism_names_itself_and_the_registered_ones():
    with pytest.raises(UnknownMechanismError, match="no_such_attention.*registered.*softmax"):
        MultiheadAttention(32, 4, mechanism="no_such_attention")


def test_mechanism_without_the_pattern_is_refused():
    causal_less = next(m for m in attnzoo.list_mechanisms() if not m.patterns & {"causal_self", "causal_cross"})
    with pytest.raises(ParameterError, match="does not support the causal_self or causal_cross pattern") as info:
        MultiheadAttention(32, 4, mechanism=causal_less.name, causal=True)
    assert info.value.argument == "mechanism"


def test_short_convolution_is_a_causal_depthwise_conv1d():
    torch.manual_seed(0)
    conv = ShortConvolution(6, kernel_size=4).double()
    x = torch.randn(2, 11, 6, dtype=F64)
    # taps in Conv1d's layout: weight[s] multiplies x_{t-3+s}
    expected = F.conv1d(F.pad(x.transpose(1, 2), (3, 0)), conv.weight.t().unsqueeze(1), conv.bias, groups=6).transpose(1, 2)
    torch.testing.assert_close(conv(x), expected)
    changed = x.clone()
    changed[:, 7:] += 1.0
    torch.testing.assert_close(conv(changed)[:, :7], conv(x)[:, :7])


def test_readme_example_runs():
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    body = re.search(r"^## MultiheadAttention and heads\n(.*?)(?=^## )", readme, re.S | re.M)
    assert body, "README has no '## MultiheadAttention and heads' section"
    blocks = re.findall(r"^```python\n(.*?)^```$", body.group(1), re.S | re.M)
    assert len(blocks) == 1
    scope: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), scope)  # noqa: S102 - the README's own example; it asserts parity itself
    assert scope["logits"].shape == (2, 10) and scope["log_p"].shape == (2, 3, 10)
    assert torch.isneginf(scope["log_p"][1, :, 7:]).all()
