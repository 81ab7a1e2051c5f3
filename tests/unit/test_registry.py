"""Registry and dispatch on a mechanism made up for the test (not registered globally)."""

from __future__ import annotations

import re

import pytest
import torch

import attnzoo
from attnzoo.kernels import block_sparse
from attnzoo.errors import NoBackendError, ParameterError
from attnzoo.registry import PATTERNS, Backend, Mechanism, flag, register


def _fake(tag):
    def fn(q, k, v, **params):
        return torch.full_like(q, float(tag))

    return fn


def make_mechanism() -> Mechanism:
    mech = Mechanism(
        name="fake",
        family="test",
        catalog=(),
        paper="-",
        formula="-",
        cost="-",
        summary="-",
        patterns=frozenset({"noncausal_self"}),
        params=(flag("causal", False, "-"),),
    )
    mech.add_backend(Backend("reference", _fake(0), priority=-100))
    mech.add_backend(Backend("fast_cpu_fp32", _fake(1), devices=frozenset({"cpu"}), dtypes=frozenset({torch.float32}), priority=10))
    mech.add_backend(Backend("no_grad", _fake(2), autograd=False, priority=5))
    mech.add_backend(
        Backend("only_causal", _fake(3), accepts=lambda p, params: None if params["causal"] else "needs causal=True", priority=20)
    )
    mech.add_backend(Backend("short_only", _fake(4), prefers=lambda p, params: None if p.q_len <= 4 else "meant for N <= 4", priority=30))
    return mech


def tag_of(out):
    return int(out.flatten()[0])


def test_dispatch_takes_the_best_backend_that_accepts():
    mech = make_mechanism()
    x = torch.randn(1, 2, 8, 4)
    assert tag_of(mech(x, x, x)) == 1  # fast_cpu_fp32
    assert tag_of(mech(x, x, x, causal=True)) == 3  # only_causal outranks it
    assert tag_of(mech(x[:, :, :3], x[:, :, :3], x[:, :, :3])) == 4  # short_only preferred for N <= 4
    xd = x.double()
    assert tag_of(mech(xd, xd, xd)) == 2  # float64: no_grad
    assert tag_of(mech(xd.requires_grad_(), xd, xd)) == 0  # with grad: only the reference is left


def test_forcing_a_backend_and_its_refusal():
    mech = make_mechanism()
    x = torch.randn(1, 2, 8, 4)
    assert tag_of(mech(x, x, x, backend="short_only")) == 4  # a preference does not stop forcing
    with pytest.raises(NoBackendError, match="only_causal.*needs causal=True"):
        mech(x, x, x, backend="only_causal")
    with pytest.raises(NoBackendError, match="takes float32, not float64"):
        mech(x.double(), x.double(), x.double(), backend="fast_cpu_fp32")


def test_a_learnable_parameter_counts_as_needing_grad():
    mech = make_mechanism()
    mech.params = mech.params + (attnzoo.registry.Param("weight", None, "-"),)
    mech._params["weight"] = mech.params[-1]
    x = torch.randn(1, 2, 8, 4, dtype=torch.float64)
    assert tag_of(mech(x, x, x, weight=torch.ones(1))) == 2  # float64, no grad: no_grad backend
    assert tag_of(mech(x, x, x, weight=torch.ones(1, requires_grad=True))) == 0  # the weight wants a gradient


def test_no_backend_lists_every_reason():
    mech = make_mechanism()
    mech.backends["reference"].accepts = lambda p, params: "refuses everything today"
    x = torch.randn(1, 2, 8, 4, dtype=torch.float64, requires_grad=True)
    with pytest.raises(NoBackendError) as info:
        mech(x, x, x)
    text = str(info.value)
    for name in mech.backends:
        assert f"  {name}: " in text
    assert "forward only" in text and "refuses everything today" in text


def test_explain_and_device_priority():
    mech = make_mechanism()
    x = torch.randn(1, 2, 8, 4)
    reasons = dict(mech.explain(x, x, x))
    assert reasons["fast_cpu_fp32"] is None and reasons["only_causal"] == "needs causal=True"
    assert reasons["short_only"].startswith("not preferred")
    mech.backends["no_grad"].device_priority = {"cpu": 50}
    assert tag_of(mech(x, x, x)) == 2


def test_parameters_are_validated_once_and_unknown_ones_refused():
    mech = make_mechanism()
    x = torch.randn(1, 2, 8, 4)
    with pytest.raises(ParameterError, match="causal: expected a bool"):
        mech(x, x, x, causal="yes")
    with pytest.raises(ParameterError, match="it accepts: causal"):
        mech(x, x, x, window=3)
    with pytest.raises(ParameterError, match="does not support the causal_self pattern"):
        mech.example_params(mech.describe(x, x, x), "causal_self")


def test_self_only_mechanism_refuses_cross_inputs():
    mech = make_mechanism()
    q, k = torch.randn(1, 2, 8, 4), torch.randn(1, 2, 5, 4)
    with pytest.raises(attnzoo.errors.ShapeError, match="self-attention only"):
        mech(q, k, k)


def test_registration_rules():
    mech = make_mechanism()
    with pytest.raises(ValueError, match="registered twice"):
        mech.add_backend(Backend("reference", _fake(9)))
    with pytest.raises(ValueError, match="registered twice"):
        register(attnzoo.get("softmax"))
    with pytest.raises(ValueError, match="unknown patterns"):
        Mechanism("bad", "test", (), "-", "-", "-", "-", patterns=frozenset({"diagonal"}))


def test_the_registry_covers_the_dense_family():
    names = {m.name for m in attnzoo.list_mechanisms()}
    assert "softmax" in names
    softmax = attnzoo.get("softmax")
    assert set(softmax.patterns) == set(PATTERNS)
    assert {"reference", "sdpa", "tiled", "split_kv", "flex"} <= set(softmax.backends)
    assert [m.name for m in attnzoo.list_mechanisms("dense")] == ["softmax"]
    info = softmax.info()
    assert {p[0] for p in info["params"]} == {p.name for p in softmax.params}


def test_split_kv_is_picked_for_decoding_shapes_where_it_wins(monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 8)  # the rule compares batch x heads with the threads
    softmax = attnzoo.get("softmax")
    q, k = torch.randn(1, 32, 1, 64), torch.randn(1, 8, 8192, 64)  # GQA decoding
    problem = softmax.describe(q, k, k)
    assert softmax.select(problem, softmax.bind(problem, {})).name == "split_kv"
    q, k = torch.randn(1, 1, 1, 64), torch.randn(1, 1, 8192, 64)  # one head: SDPA leaves threads idle
    problem = softmax.describe(q, k, k)
    assert softmax.select(problem, softmax.bind(problem, {})).name == "split_kv"
    q, k = torch.randn(1, 64, 1, 64), torch.randn(1, 64, 8192, 64)  # MHA filling the threads: SDPA
    problem = softmax.describe(q, k, k)
    assert softmax.select(problem, softmax.bind(problem, {})).name == "sdpa"
    # ... unless SDPA cannot do it: the LSE of a decoding step goes to split_kv, not tiled
    assert softmax.select(problem, softmax.bind(problem, {"return_lse": True})).name == "split_kv"
    problem = softmax.describe(k[:, :, :64], k, k)
    assert softmax.select(problem, softmax.bind(problem, {})).name == "sdpa"
    problem = softmax.describe(k[:, :, :64], k, k)
    # a prefill's LSE: the block-sparse kernel (all blocks) where it is built, else the tiled engine
    want = "fused" if block_sparse.native_usable(torch.device("cpu"), torch.float32) else "tiled"
    assert softmax.select(problem, softmax.bind(problem, {"return_lse": True})).name == want


def test_kv_cache_grows_and_keeps_its_contents():
    softmax = attnzoo.get("softmax")
    x = torch.randn(1, 2, 50, 8)
    state = softmax.init_state(x, x, x)
    for i in range(50):
        _, state = softmax.step(x[:, :, i : i + 1], x[:, :, i : i + 1], x[:, :, i : i + 1], state)
    assert state.length == 50 and state.k.shape[2] >= 50
    assert torch.equal(state.k[:, :, :50], x) and torch.equal(state.v[:, :, :50], x)
    with pytest.raises(ParameterError, match="key_padding_mask: not supported while decoding"):
        softmax.step(x[:, :, :1], x[:, :, :1], x[:, :, :1], state, key_padding_mask=torch.zeros(1, 1, dtype=torch.bool))


def test_a_score_mod_with_learnable_captures_is_not_sent_to_tiled():
    """tiled differentiates score_mod in the score only; a learnable capture needs the reference."""
    softmax = attnzoo.get("softmax")
    slopes = torch.tensor([0.5, 0.25], requires_grad=True)

    def learned_alibi(score, b, h, qi, ki):
        return score - slopes[h] * (qi - ki).abs()

    q = torch.randn(1, 2, 20, 8, requires_grad=True)
    problem = softmax.describe(q, q, q)
    bound = softmax.bind(problem, {"score_mod": learned_alibi})
    assert softmax.select(problem, bound).name == "reference"
    with pytest.raises(NoBackendError, match="captures tensors that require grad .slopes."):
        softmax(q, q, q, score_mod=learned_alibi, backend="tiled")
    out = softmax(q, q, q, score_mod=learned_alibi)
    out.sum().backward()
    assert slopes.grad is not None and slopes.grad.abs().sum() > 0
    x = q.detach()  # only the capture needs a gradient: still not tiled, nor CPU flex
    assert [n for n, reason in softmax.explain(x, x, x, score_mod=learned_alibi) if reason is None] == ["reference"]
    with torch.no_grad():  # no gradient wanted: tiled is fine
        assert softmax.select(softmax.describe(q, q, q), bound).name == "tiled"


def test_every_causal_mechanism_decodes_or_says_why():
    """Catalog K1: a causal mechanism has a decoder (checked against its forward in any split by
    the conformance suite) or a documented refusal, which init_state raises."""
    for mech in attnzoo.list_mechanisms():
        if not any(p.startswith("causal") for p in mech.patterns):
            continue
        assert mech.decoder is not None or mech.decoder_refusal, f"{mech.name}: causal, with no decoder and no decoder_refusal"
        if mech.decoder is None:
            x = torch.zeros(1, 1, *([4] * mech.spatial_dims[0]), 8)
            with pytest.raises(ParameterError, match=re.escape(mech.decoder_refusal)):
                mech.init_state(x, x, x)
