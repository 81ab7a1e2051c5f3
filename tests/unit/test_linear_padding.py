"""key_padding_mask across the linear family (True = ignore the key).

Family-wide: every mechanism of family "linear" declares the parameter through the one shared
check, bad masks are refused naming it, and a batch entry whose keys are all padded gives a
finite output (0 where the formula makes it 0; the transnormer norm gives its bias). Then
``linear`` and ``retention`` in detail (the other mechanisms' padded-batch tests live in their
own test files): padded == each sequence alone on both sides, causal and bidirectional, self and
cross, every backend in float64 (outputs and gradients), the C++ kernel's float32 paths, and
decoding steps that carry their own slice of the mask.
"""

from __future__ import annotations

import pytest
import torch

import attnzoo
from attnzoo.errors import ParameterError
from attnzoo.functional import linear_attention, retention
from attnzoo.kernels.linear_scan import native_scan_usable

from .padding import N, assert_padded_equals_alone, padding
from .qkv import random_qkv

SIDES = ("right", "left")


def _family() -> list[str]:
    return sorted(m.name for m in attnzoo.list_mechanisms() if m.family == "linear")


def test_the_family_is_all_here():
    assert len(_family()) >= 11, _family()


def _plain_params(name: str, q, k, v) -> dict:
    mech = attnzoo.get(name)
    pattern = "noncausal_self" if "noncausal_self" in mech.patterns else sorted(mech.patterns)[0]
    return mech.example_params(mech.describe(q, k, v), pattern)


@pytest.mark.parametrize("name", _family())
def test_every_linear_mechanism_declares_the_shared_parameter(name):
    mech = attnzoo.get(name)
    param = next((p for p in mech.params if p.name == "key_padding_mask"), None)
    assert param is not None and param.default is None
    assert "True = ignore" in param.doc
    assert param.check.__qualname__ == "_check_key_padding", "one validator for the family (_shared.py)"


BAD_MASKS = [
    pytest.param(lambda b, n: torch.zeros(b, n), id="float"),
    pytest.param(lambda b, n: torch.zeros(b, n, dtype=torch.int64), id="int"),
    pytest.param(lambda b, n: torch.zeros(b, n + 1, dtype=torch.bool), id="too-long"),
    pytest.param(lambda b, n: torch.zeros(b + 1, n, dtype=torch.bool), id="batch"),
    pytest.param(lambda b, n: torch.zeros(b, 1, 1, n, dtype=torch.bool), id="4d"),
    pytest.param(lambda b, n: [[False] * n] * b, id="list"),
]


@pytest.mark.parametrize("name", _family())
@pytest.mark.parametrize("make", BAD_MASKS)
def test_bad_masks_are_refused_naming_the_parameter(name, make):
    q, k, v = random_qkv(2, 2, 9, 9, 4, 3)
    params = _plain_params(name, q, k, v)
    with pytest.raises(ParameterError) as info:
        attnzoo.get(name)(q, k, v, key_padding_mask=make(2, 9), **params)
    assert info.value.argument == "key_padding_mask"
    assert "key_padding_mask" in str(info.value) and "True = ignore" in str(info.value)


@pytest.mark.parametrize("name", _family())
def test_all_keys_padded_gives_a_finite_output(name):
    """Entry 0 has no real key: 0 out (no key weighs anything; flow, inline, agent, joint_chunk
    and linfusion define the empty sums as 0 too); transnormer normalizes a zero vector (0 without
    a bias); the others' real entry is unaffected."""
    mech = attnzoo.get(name)
    q, k, v = random_qkv(2, 2, 9, 9, 4, 3)
    params = _plain_params(name, q, k, v)
    pad = torch.zeros(2, 9, dtype=torch.bool)
    pad[0] = True
    for backend in mech.backends:
        out = mech(q, k, v, backend=backend, key_padding_mask=pad, **params)
        assert torch.isfinite(out).all(), f"{name}/{backend}"
        torch.testing.assert_close(out[0], torch.zeros_like(out[0]), atol=1e-12, rtol=0, msg=lambda m: f"{name}/{backend}: {m}")
        per_batch = {n: t[1:] for n, t in params.items() if isinstance(t, torch.Tensor) and t.dim() == 4 and t.shape[0] == 2}  # (B, H, N, D) operands
        alone = mech(q[1:], k[1:], v[1:], backend=backend, **{**params, **per_batch})
        torch.testing.assert_close(out[1:], alone, atol=1e-10, rtol=1e-8)


# --------------------------------------------------------------------------------------------
# linear and retention: every backend, float64
# --------------------------------------------------------------------------------------------
LINEAR_MAPS = [
    pytest.param({}, id="elu"),
    pytest.param({"feature_map": "identity", "normalize": False}, id="identity"),
    pytest.param({"feature_map": "relu", "normalize": True, "eps": 1e-3}, id="relu"),
    pytest.param({"feature_map": "softmax_kernel", "num_features": 8, "seed": 3}, id="favor"),
    pytest.param({"feature_map": "taylor", "feature_dim": 3}, id="taylor"),
]


@pytest.mark.parametrize("params", LINEAR_MAPS)
@pytest.mark.parametrize("backend", ("reference", "chunked", "recurrent"))
@pytest.mark.parametrize("causal", (False, True), ids=("bidirectional", "causal"))
@pytest.mark.parametrize("side", SIDES)
def test_linear_padded_batch_equals_each_sequence_alone(params, backend, causal, side):
    q, k, v = random_qkv(3, 4, N, N, 6, 5, kv_heads=2)

    def attend(q, k, v, **kw):
        return linear_attention(q, k, v, causal=causal, chunk_size=4, backend=backend, **params, **kw)

    assert_padded_equals_alone(attend, q, k, v, side)


@pytest.mark.parametrize("side", SIDES)
def test_linear_cross_attention_with_padded_keys(side):
    q, _, _ = random_qkv(3, 2, 5, 5, 6, 5, seed=1)
    _, k, v = random_qkv(3, 2, N, N, 6, 5, seed=2)
    for backend in ("reference", "chunked", "recurrent"):
        assert_padded_equals_alone(lambda q, k, v, **kw: linear_attention(q, k, v, backend=backend, **kw), q, k, v, side, cross=True)


RETENTION_OPTIONS = [
    pytest.param({}, id="plain"),
    pytest.param({"normalize_decay": True}, id="normalize_decay"),
    pytest.param({"normalize_scores": True, "gamma": 0.8}, id="normalize_scores"),
    pytest.param({"normalize_decay": True, "normalize_scores": True, "gamma": (0.5, 0.9, 0.99, 1.0)}, id="both"),
]


@pytest.mark.parametrize("options", RETENTION_OPTIONS)
@pytest.mark.parametrize("backend", ("reference", "chunked", "recurrent"))
@pytest.mark.parametrize("causal", (False, True), ids=("bidirectional", "causal"))
@pytest.mark.parametrize("side", SIDES)
def test_retention_padded_batch_equals_each_sequence_alone(options, backend, causal, side):
    """The decay gamma^(i-j) is relative: left padding is exact too once the pads weigh nothing
    (and leave normalize_decay's row sums)."""
    q, k, v = random_qkv(3, 4, N, N, 6, 5, kv_heads=2)

    def attend(q, k, v, **kw):
        return retention(q, k, v, causal=causal, chunk_size=3, backend=backend, **options, **kw)

    assert_padded_equals_alone(attend, q, k, v, side)


# --------------------------------------------------------------------------------------------
# the C++ kernel's float32 paths: fused forward (identity/relu: the raw keys zeroed), unfused
# (elu: phi(k) zeroed), and the autograd kernel
# --------------------------------------------------------------------------------------------
NATIVE = pytest.mark.skipif(not native_scan_usable(*random_qkv(1, 1, 2, 2, 2, 2, dtype=torch.float32)), reason="the C++ kernel is not built here")


@NATIVE
@pytest.mark.parametrize("name, params", [
    ("linear", {"feature_map": "elu"}),
    ("linear", {"feature_map": "relu"}),
    ("linear", {"feature_map": "identity", "normalize": False}),
    ("retention", {}),
    ("retention", {"normalize_decay": True}),
    ("based", {"feature_dim": 4}),
    ("transnormer", {"feature_map": "relu"}),
    ("transnormer", {"feature_map": "elu"}),
])
@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("grad", (False, True), ids=("forward", "train"))
def test_native_float32_paths_take_the_mask(name, params, side, grad):
    mech = attnzoo.get(name)
    q, k, v = random_qkv(3, 2, 70, 70, 8, 8, dtype=torch.float32, seed=4)  # > one 64-token chunk
    pad = padding(side, (70, 40, 7), 70)
    q, k, v = (t * 0.5 for t in (q, k, v))
    kw = dict(causal=True, key_padding_mask=pad, **params)
    if grad:
        q.requires_grad_(True)
    got = mech(q, k, v, backend="chunked", **kw)
    want = mech(q.detach().double(), k.double(), v.double(), backend="reference", **kw)
    torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=2e-4)


# --------------------------------------------------------------------------------------------
# decoding: each step carries the mask of its new keys (through the decoder itself: which
# parameters Mechanism.step lets a step change is the registry's business)
# --------------------------------------------------------------------------------------------
def _decode(mech, q, k, v, splits, masks, **params):
    state = mech.decoder.init_state(mech.describe(q, k, v), **mech.bind(mech.describe(q, k, v), params))
    outs = []
    for (start, stop), mask in zip(splits, masks):
        qs, ks, vs = (t[:, :, start:stop] for t in (q, k, v))
        bound = mech.bind(mech.describe(qs, ks, vs), {**params, "key_padding_mask": mask})
        out, state = mech.decoder.step(qs, ks, vs, state, **bound)
        outs.append(out)
    return torch.cat(outs, dim=2)


@pytest.mark.parametrize("name, params", [("linear", {}), ("retention", {"normalize_scores": True}), ("based", {"feature_dim": 3}), ("transnormer", {})])
@pytest.mark.parametrize("side", SIDES)
def test_decoding_steps_with_their_slice_of_the_mask_equal_the_full_forward(name, params, side):
    mech = attnzoo.get(name)
    q, k, v = random_qkv(3, 2, N, N, 4, 3)
    pad = padding(side)
    full = mech(q, k, v, causal=True, key_padding_mask=pad, **params)
    splits = ((0, 1), (1, 5), (5, 6), (6, N))
    decoded = _decode(mech, q, k, v, splits, [pad[:, a:b] for a, b in splits], causal=True, **params)
    torch.testing.assert_close(decoded, full, atol=1e-10, rtol=1e-8)


def test_retention_refuses_a_mask_with_normalize_decay_while_decoding():
    mech = attnzoo.get("retention")
    q, k, v = random_qkv(2, 2, 4, 4, 4, 3)
    with pytest.raises(ParameterError) as info:
        _decode(mech, q, k, v, ((0, 2), (2, 4)), (None, torch.zeros(2, 2, dtype=torch.bool)), normalize_decay=True)
    assert info.value.argument == "key_padding_mask" and "decoding" in str(info.value)


def test_fused_kernel_keys_for_padding():
    """The raw key whose feature is 0 under each fused map: 0 for identity and relu, -inf for
    elu + 1 (the kernel's exp flushes it to 0); Taylor and callables have none (unfused path)."""
    from attnzoo.functional.linear.linear import keys_with_zero_features

    k = torch.randn(2, 1, 5, 3)
    pad = torch.tensor([[False, False, True, True, True], [True, False, False, False, False]])
    assert keys_with_zero_features(k, {"key_padding_mask": None, "feature_map": "taylor"}) is k
    for fmap, fill in (("identity", 0.0), ("relu", 0.0), ("elu", float("-inf"))):
        masked = keys_with_zero_features(k, {"key_padding_mask": pad, "feature_map": fmap})
        assert torch.equal(masked[~pad[:, None, :, None].expand_as(k)], k[~pad[:, None, :, None].expand_as(k)])
        assert torch.all(masked[pad[:, None, :, None].expand_as(k)] == fill)
    for fmap in ("taylor", torch.sigmoid):
        assert keys_with_zero_features(k, {"key_padding_mask": pad, "feature_map": fmap}) is None
