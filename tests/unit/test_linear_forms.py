"""The three forms of the linear family agree: parallel (reference) == chunked == recurrent.

Engine level (attnzoo.kernels.linear_scan) and mechanism level (linear, retention), forward and
gradients, in float64 so any disagreement is an error of the algorithm, not of rounding; chunk
sizes that do and do not divide N; causal (bottom-right, Nq != Nk) and bidirectional; decoding
by ``step`` in random splits against the full causal forward; the decoding state's size.
Ids read like fla's: B-H-Nq-Nk-F-Dv.
"""

from __future__ import annotations

import math
import random

import pytest
import torch

import attnzoo
from attnzoo.kernels import linear_scan
from attnzoo.kernels.linear_scan import chunked_form, chunked_scan, decay_row_sums, parallel_form, parallel_scores, prefix_state, recurrent_form

TOL = dict(rtol=1e-10, atol=1e-10)
LOG_DECAY = torch.tensor([0.5, 0.9, 0.999], dtype=torch.float64).log()
CHUNKS = (1, 3, 16, 64)  # 37 tokens: 3 and 16 leave a tail chunk, 64 is one partial chunk


def _tensors(b, h, nq, nk, f, dv, seed=0, grad=True):
    gen = torch.Generator().manual_seed(seed)
    shapes = ((b, h, nq, f), (b, h, nk, f), (b, h, nk, dv))
    return [torch.randn(s, generator=gen, dtype=torch.float64).requires_grad_(grad) for s in shapes]


def _grads(out, inputs, seed=1):
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    return torch.autograd.grad((out * weight).sum(), inputs, allow_unused=True)


def _assert_same(got, want, what):
    torch.testing.assert_close(got, want, **TOL, msg=lambda m: f"{what}: {m}")


# --------------------------------------------------------------------------------------------
# engine
# --------------------------------------------------------------------------------------------
ENGINE_CASES = [
    pytest.param(True, 37, 37, id="causal-B2-H3-N37"),
    pytest.param(True, 21, 37, id="causal-B2-H3-Nq21-Nk37"),  # more keys: a prefix state
    pytest.param(True, 37, 21, id="causal-B2-H3-Nq37-Nk21"),  # more queries: the first see nothing
    pytest.param(False, 37, 37, id="bidirectional-B2-H3-N37"),
    pytest.param(False, 21, 37, id="bidirectional-B2-H3-Nq21-Nk37"),
]


@pytest.mark.parametrize("causal, nq, nk", ENGINE_CASES)
@pytest.mark.parametrize("decayed", [False, True], ids=["no_decay", "decay"])
@pytest.mark.parametrize("chunk", CHUNKS)
def test_engine_forms_agree_forward_and_backward(causal, nq, nk, decayed, chunk):
    if decayed and not causal and nq != nk:
        pytest.skip("a decayed bidirectional pass needs Nq = Nk")
    log_decay = LOG_DECAY if decayed else None
    q, k, v = _tensors(2, 3, nq, nk, 5, 4)
    spec = parallel_form(q, k, v, causal=causal, log_decay=log_decay, scale=0.7)
    chunked = chunked_form(q, k, v, causal=causal, log_decay=log_decay, chunk_size=chunk, scale=0.7)
    recurrent, _ = recurrent_form(q, k, v, causal=causal, log_decay=log_decay, scale=0.7)
    _assert_same(chunked, spec, "chunked forward")
    _assert_same(recurrent, spec, "recurrent forward")
    want = _grads(spec, (q, k, v))
    for name, out in (("chunked", chunked), ("recurrent", recurrent)):
        for arg, got, expected in zip("qkv", _grads(out, (q, k, v)), want):
            _assert_same(got, expected, f"{name} d{arg}")


def test_parallel_form_is_the_written_sum():
    """The spec itself, against a double loop over i and j."""
    q, k, v = _tensors(1, 3, 6, 6, 2, 3, grad=False)
    gamma = LOG_DECAY.exp()
    for causal in (True, False):
        out = parallel_form(q, k, v, causal=causal, log_decay=LOG_DECAY)
        for h in range(3):
            for i in range(6):
                js = range(i + 1) if causal else range(6)
                want = sum(gamma[h] ** abs(i - j) * (q[0, h, i] @ k[0, h, j]) * v[0, h, j] for j in js)
                torch.testing.assert_close(out[0, h, i], want, **TOL)


@pytest.mark.parametrize("decayed", [False, True], ids=["no_decay", "decay"])
def test_chunked_scan_gradients_reach_the_starting_state(decayed):
    """gradcheck of the chunked autograd.Function with a state in and the state out."""
    log_decay = LOG_DECAY[:2] if decayed else None
    q, k, v = _tensors(1, 2, 11, 11, 3, 2)
    start = torch.randn(1, 2, 3, 2, dtype=torch.float64, requires_grad=True)

    def run(q, k, v, start):
        return chunked_scan(q, k, v, log_decay=log_decay, state=start, chunk_size=4, scale=0.7)

    assert torch.autograd.gradcheck(run, (q, k, v, start))


@pytest.mark.parametrize("decayed", [False, True], ids=["no_decay", "decay"])
def test_rows_in_pieces_equal_rows_together(decayed, monkeypatch):
    """The chunked Function takes batch x head rows in pieces to bound its temporaries: one row
    a piece (forced here) gives the same outputs, final state and gradients."""
    log_decay = LOG_DECAY if decayed else None
    q, k, v = _tensors(2, 3, 37, 37, 4, 3)
    start = torch.randn(2, 3, 4, 3, dtype=torch.float64, requires_grad=True)
    results = []
    for piece_bytes in (2**40, 1):
        monkeypatch.setattr(linear_scan, "PIECE_BYTES", piece_bytes)
        out, end = chunked_scan(q, k, v, log_decay=log_decay, state=start, chunk_size=8, scale=0.7)
        loss = (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view(out.shape)).sum() + (end * end.detach()).sum()
        results.append((out, end, torch.autograd.grad(loss, (q, k, v, start))))
    (out1, end1, grads1), (out2, end2, grads2) = results
    _assert_same(out2, out1, "out")
    _assert_same(end2, end1, "final state")
    for got, want in zip(grads2, grads1):
        _assert_same(got, want, "gradient")


@pytest.mark.parametrize("decayed", [False, True], ids=["no_decay", "decay"])
def test_pieces_from_the_state_equal_one_pass(decayed):
    log_decay = LOG_DECAY if decayed else None
    q, k, v = _tensors(2, 3, 30, 30, 4, 3, grad=False)
    whole, whole_state = chunked_scan(q, k, v, log_decay=log_decay, chunk_size=8)
    outs, state = [], None
    for start, stop in ((0, 7), (7, 8), (8, 30)):
        out, state = chunked_scan(q[:, :, start:stop], k[:, :, start:stop], v[:, :, start:stop], log_decay=log_decay, state=state, chunk_size=5)
        outs.append(out)
    _assert_same(torch.cat(outs, dim=2), whole, "pieces")
    _assert_same(state, whole_state, "final state")
    _assert_same(prefix_state(k, v, log_decay), whole_state, "prefix_state")


def test_decay_row_sums_match_the_materialized_weights():
    ones_q, ones_k = torch.ones(1, 3, 9, 1, dtype=torch.float64), torch.ones(1, 3, 9, 1, dtype=torch.float64)
    for causal in (True, False):
        for log_decay in (None, LOG_DECAY):
            want = parallel_scores(ones_q, ones_k, causal=causal, log_decay=log_decay).sum(-1, keepdim=True)[0]
            got = decay_row_sums(9, 9, causal=causal, log_decay=log_decay, device=torch.device("cpu"))
            torch.testing.assert_close(got.expand_as(want), want, **TOL)


# --------------------------------------------------------------------------------------------
# mechanisms: every option, all three backends
# --------------------------------------------------------------------------------------------
def _softplus(x):
    return torch.nn.functional.softplus(x)


def _linear_options(h, d):
    gen = torch.Generator().manual_seed(3)
    weights = torch.randn(h, d, 6, generator=gen, dtype=torch.float64) * d**-0.5
    return {
        "identity": dict(feature_map="identity", normalize=False),
        "elu": dict(feature_map="elu"),
        "elu-bare": dict(feature_map="elu", normalize=False),
        "relu": dict(feature_map="relu", eps=1e-3),
        "softmax_kernel-seed": dict(feature_map="softmax_kernel", num_features=24, seed=7),
        "softmax_kernel-projection": dict(feature_map="softmax_kernel", projection=torch.randn(h, d, 10, generator=gen, dtype=torch.float64)),
        "taylor": dict(feature_map="taylor", feature_dim=3),
        "taylor-bare": dict(feature_map="taylor", normalize=False, scale=0.3),
        "hedgehog": dict(feature_map="hedgehog", feature_weights=weights, feature_bias=torch.randn(h, 6, generator=gen, dtype=torch.float64)),
        "callable": dict(feature_map=_softplus),
        "pair": dict(feature_map=(torch.sigmoid, _softplus)),
    }


def _retention_options(h):
    return {
        "defaults": {},
        "gamma-per-head": dict(gamma=(0.3, 0.8, 0.97, 1.0)[:h]),
        "normalize_decay": dict(normalize_decay=True),
        "normalize_scores": dict(normalize_scores=True, gamma=0.9),
        "both-normalizations": dict(normalize_decay=True, normalize_scores=True, scale=0.5),
    }


def _mechanism_cases():
    cases = []
    for name, options in _linear_options(2, 6).items():
        cases.append(pytest.param("linear", options, id=f"linear-{name}"))
    for name, options in _retention_options(2).items():
        cases.append(pytest.param("retention", options, id=f"retention-{name}"))
    return cases


SHAPES = [
    pytest.param(True, 2, 1, 29, 29, id="causal-B2-H2-Hkv1-N29"),  # GQA
    pytest.param(True, 2, 2, 13, 29, id="causal-B2-H2-Nq13-Nk29"),
    pytest.param(True, 2, 2, 29, 13, id="causal-B2-H2-Nq29-Nk13"),
    pytest.param(False, 2, 2, 29, 29, id="bidirectional-B2-H2-N29"),
]


def _differentiable(options):
    return {n: t.detach().clone().requires_grad_(True) if isinstance(t, torch.Tensor) else t for n, t in options.items()}


@pytest.mark.parametrize("name, options", _mechanism_cases())
@pytest.mark.parametrize("causal, heads, kv_heads, nq, nk", SHAPES)
@pytest.mark.parametrize("chunk", (3, 8, 64))
def test_mechanism_backends_agree(name, options, causal, heads, kv_heads, nq, nk, chunk):
    mech = attnzoo.get(name)
    if not causal and nq != nk and name == "retention":
        pytest.skip("bidirectional retention needs Nq = Nk")
    gen = torch.Generator().manual_seed(nq + nk)
    q = torch.randn(1, heads, nq, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, kv_heads, nk, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, kv_heads, nk, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    options = _differentiable(options)
    inputs = [q, k, v] + [t for t in options.values() if isinstance(t, torch.Tensor)]
    outs = {b: mech(q, k, v, backend=b, causal=causal, chunk_size=chunk, **options) for b in ("reference", "chunked", "recurrent")}
    want = _grads(outs["reference"], inputs)
    for backend in ("chunked", "recurrent"):
        _assert_same(outs[backend], outs["reference"], f"{backend} forward")
        for i, (got, expected) in enumerate(zip(_grads(outs[backend], inputs), want)):
            _assert_same(got, expected, f"{backend} gradient of input {i}")


# --------------------------------------------------------------------------------------------
# decoding
# --------------------------------------------------------------------------------------------
def _decode(mech, q, k, v, splits, **params):
    state = mech.init_state(q, k, v, **params)
    outs, start = [], 0
    for size in splits:
        out, state = mech.step(q[:, :, start : start + size], k[:, :, start : start + size], v[:, :, start : start + size], state, **params)
        outs.append(out)
        start += size
    return torch.cat(outs, dim=2), state


@pytest.mark.parametrize("name, options", _mechanism_cases())
@pytest.mark.parametrize("seed", range(3))
def test_decoding_by_step_equals_the_causal_forward(name, options, seed):
    mech = attnzoo.get(name)
    rng = random.Random(seed)
    n = 41
    splits = []
    while sum(splits) < n:
        splits.append(min(rng.choice((1, 1, 2, 5, 17)), n - sum(splits)))
    q, k, v = _tensors(2, 2, n, n, 6, 5, seed=seed, grad=False)
    params = dict(options, causal=True, chunk_size=rng.choice((4, 64)))
    with torch.no_grad():
        full = mech(q, k, v, **params)
        decoded, _ = _decode(mech, q, k, v, splits, **params)
    _assert_same(decoded, full, f"decoded in splits {splits}")


@pytest.mark.parametrize(
    "name, params, expected",
    [
        ("linear", dict(feature_map="elu"), 16 * 13),
        ("linear", dict(feature_map="elu", normalize=False), 16 * 12),
        ("linear", dict(feature_map="taylor", feature_dim=4), (1 + 4 + 10) * 13),
        ("linear", dict(feature_map="softmax_kernel", num_features=40), 40 * 13),
        ("linear", dict(feature_map="hedgehog", feature_weights=torch.zeros(16, 7)), 14 * 13),
        ("linear", dict(feature_map=_softplus), 16 * 13),
        ("retention", dict(), 16 * 12),
        ("retention", dict(normalize_scores=True), 16 * 13),
    ],
    ids=["elu", "elu-bare", "taylor-d4", "softmax_kernel-m40", "hedgehog-F7", "callable", "retention", "retention-normalize_scores"],
)
def test_state_size_is_the_decoding_state_and_does_not_grow(name, params, expected):
    mech = attnzoo.get(name)
    assert mech.state_size(16, 12, **params) == expected
    q, k, v = _tensors(2, 3, 300, 300, 16, 12, grad=False)
    params = dict(params, causal=True)
    sizes = []
    with torch.no_grad():
        state = mech.init_state(q, k, v, **params)
        for t in range(300):
            _, state = mech.step(q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1], state, **params)
            if t in (0, 299):
                sizes.append(state.kv.numel())
    assert sizes == [2 * 3 * expected] * 2, "the state is state_size per batch entry and head, after 1 token and after 300"


def test_decoding_refuses_bidirectional():
    mech = attnzoo.get("linear")
    q, k, v = _tensors(1, 1, 4, 4, 8, 8, grad=False)
    state = mech.init_state(q, k, v)
    with pytest.raises(attnzoo.errors.ParameterError, match="causal") as info:
        mech.step(q, k, v, state, causal=False)
    assert info.value.argument == "causal"


# --------------------------------------------------------------------------------------------
# semantics worth pinning
# --------------------------------------------------------------------------------------------
def test_linear_is_katharopoulos_formula():
    """elu + 1, normalized, causal: the written formula with the scale on q."""
    q, k, v = _tensors(1, 2, 9, 9, 4, 3, grad=False)
    phi = lambda x: torch.nn.functional.elu(x) + 1  # noqa: E731
    s = 4**-0.5
    out = attnzoo.get("linear")(q, k, v, causal=True, backend="chunked", chunk_size=4)
    for i in range(9):
        w = torch.stack([(phi(s * q[0, :, i]) * phi(k[0, :, j])).sum(-1) for j in range(i + 1)], -1)  # (H, i+1)
        want = (w.unsqueeze(-1) * v[0, :, : i + 1]).sum(1) / (w.sum(-1, keepdim=True) + 1e-6)
        torch.testing.assert_close(out[0, :, i], want, **TOL)


def test_retention_normalizations_are_retnets():
    """normalize_decay and normalize_scores against RetNet's parallel formulas written out."""
    q, k, v = _tensors(1, 2, 10, 10, 4, 3, grad=False)
    gamma = torch.tensor([0.7, 0.95], dtype=torch.float64)
    idx = torch.arange(10)
    d = gamma.view(-1, 1, 1) ** (idx.view(-1, 1) - idx).clamp(min=0) * (idx.view(-1, 1) >= idx)
    d = d / d.sum(-1, keepdim=True).sqrt()
    r = (q * 4**-0.5) @ k.transpose(-1, -2) * d
    r = r / r.sum(-1, keepdim=True).abs().clamp(min=1)
    out = attnzoo.get("retention")(q, k, v, gamma=gamma, normalize_decay=True, normalize_scores=True, backend="chunked", chunk_size=3)
    torch.testing.assert_close(out, r @ v, **TOL)


def test_bidirectional_retention_decays_both_ways():
    q, k, v = _tensors(1, 1, 7, 7, 4, 3, grad=False)
    out = attnzoo.get("retention")(q, k, v, gamma=0.5, causal=False, backend="chunked", chunk_size=2)
    weights = 0.5 ** (torch.arange(7).view(-1, 1) - torch.arange(7)).abs().double()
    torch.testing.assert_close(out, ((q * 0.5) @ k.transpose(-1, -2) * weights) @ v, **TOL)


def test_half_inputs_are_computed_in_float32():
    q, k, v = (t.to(torch.bfloat16) for t in _tensors(1, 2, 300, 300, 16, 16, grad=False))
    out = attnzoo.get("retention")(q, k, v, gamma=1.0)
    want = attnzoo.get("retention")(q.double(), k.double(), v.double(), gamma=1.0, backend="reference")
    assert out.dtype == torch.bfloat16
    rel = (out.double() - want).norm() / want.norm()
    assert rel < 2**-8, f"relative error {rel:.3g}: a bf16 state summing 300 keys would be ~{math.sqrt(300) * 2**-8:.2g}"


@pytest.mark.parametrize(
    "name, options",
    [
        ("linear", {}),
        ("linear", {"feature_map": "taylor", "feature_dim": 4}),
        ("retention", {"normalize_decay": True, "normalize_scores": True}),
        ("retention", {}),
    ],
)
def test_inference_forward_in_pieces_equals_one_pass(name, options, monkeypatch):
    """Without autograd a long causal forward runs as decoding steps of whole chunks (small
    temporaries); with autograd it is one pass. Forcing tiny pieces, both must agree."""
    from attnzoo.functional.linear import _shared

    q, k, v = _tensors(2, 3, 150, 150, 8, 5, seed=3, grad=False)
    one_pass = attnzoo.attention(q.requires_grad_(), k, v, name, causal=True, chunk_size=16, backend="chunked", **options).detach()
    monkeypatch.setattr(_shared, "PIECE_ELEMENTS", 2 * 3 * 8 * 40)  # pieces of 32 tokens: 2 chunks, a tail of 22
    assert _shared._piece_tokens(q, v, {"chunk_size": 16}, 8) == 32
    with torch.inference_mode():
        pieces = attnzoo.attention(q.detach(), k, v, name, causal=True, chunk_size=16, backend="chunked", **options)
    _assert_same(pieces, one_pass, f"{name} {options}")
