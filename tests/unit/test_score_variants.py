"""Oracle tests of the score-level variants of issue 15 (catalog V1, V3, V4, V6, V8).

Each oracle is the paper's arithmetic written out here with loops/einsums, independent of the
mechanisms' code; the conformance suite (tests/conformance) checks the fast backends against each
mechanism's reference. Cases are named ``B-H-Nq-Nk-D``.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import attnzoo
from attnzoo.errors import ParameterError
from attnzoo.functional.variants.softcap import softcap_attention

torch.manual_seed(0)
F64 = dict(atol=1e-10, rtol=1e-8)


def _qkv(b=2, hq=4, hkv=2, nq=13, nk=13, d=16, dv=8, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(b, hq, nq, d, generator=gen, dtype=dtype), torch.randn(b, hkv, nk, d, generator=gen, dtype=dtype),
            torch.randn(b, hkv, nk, dv, generator=gen, dtype=dtype))


def _expand(q, k, v):
    g = q.shape[1] // k.shape[1]
    return k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)


def _causal_visible(nq, nk, alignment="bottom_right"):
    off = nk - nq if alignment == "bottom_right" else 0
    return torch.tensor([[j <= i + off for j in range(nk)] for i in range(nq)])


# --------------------------------------------------------------------------------------------
# V8 softcap
# --------------------------------------------------------------------------------------------
def _softcap_oracle(q, k, v, cap, scale, visible=None):
    k, v = _expand(q, k, v)
    s = torch.einsum("bhid,bhjd->bhij", q, k) * scale
    s = cap * torch.tanh(s / cap)
    if visible is not None:
        s = s.masked_fill(~visible, float("-inf"))
    return torch.einsum("bhij,bhjd->bhid", torch.softmax(s, -1), v)


@pytest.mark.parametrize("backend", ["reference", "tiled"])
@pytest.mark.parametrize("causal", [False, True])
def test_softcap_B2_H4_N13_D16_matches_the_gemma2_formula(backend, causal):
    q, k, v = _qkv()
    q = q * 4  # large logits: the cap matters
    want = _softcap_oracle(q, k, v, 2.0, 0.25, _causal_visible(13, 13) if causal else None)
    got = softcap_attention(q, k, v, cap=2.0, causal=causal, backend=backend)
    torch.testing.assert_close(got, want, **F64)


@pytest.mark.parametrize("backend", ["reference", "tiled"])
def test_softcap_with_an_infinite_cap_is_softmax(backend):
    q, k, v = _qkv(nq=9, nk=21)
    pad = torch.zeros(2, 21, dtype=torch.bool)
    pad[1, 15:] = True
    want = attnzoo.softmax_attention(q, k, v, causal=True, key_padding_mask=pad)
    got = softcap_attention(q, k, v, cap=float("inf"), causal=True, key_padding_mask=pad, backend=backend)
    torch.testing.assert_close(got, want, **F64)


def test_softcap_bounds_the_weights_ratio():
    """|logit| < cap, so within a row no weight exceeds another by more than e^(2 cap)."""
    q, k, v = _qkv(b=1, hq=1, hkv=1, nq=5, nk=7)
    q = q * 100
    eye = torch.eye(7, dtype=torch.float64).view(1, 1, 7, 7)
    w = softcap_attention(q, k, eye, cap=1.0, backend="reference")  # v = I reads the weights
    assert float((w.amax(-1) / w.amin(-1)).max()) <= math.exp(2.0) + 1e-9
    torch.testing.assert_close(w.sum(-1), torch.ones(1, 1, 5, dtype=torch.float64), **F64)


def test_softcap_default_cap_is_gemma2s():
    assert attnzoo.get("softcap").params[0].default == 50.0


def test_softcap_refuses_a_bad_cap():
    q, k, v = _qkv()
    with pytest.raises(ParameterError, match="cap"):
        softcap_attention(q, k, v, cap=0.0)


# --------------------------------------------------------------------------------------------
# V8 QK-layernorm and sigmaReparam (modules)
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("causal", [False, True])
def test_qknorm_attention_from_timm_matches_timm(causal):
    timm = pytest.importorskip("timm")
    from timm.layers import Attention

    torch.manual_seed(1)
    ref = Attention(32, num_heads=4, qkv_bias=True, qk_norm=True, norm_layer=nn.LayerNorm).eval()
    with torch.no_grad():  # non-trivial norm affines
        for norm in (ref.q_norm, ref.k_norm):
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.uniform_(-0.3, 0.3)
    x = torch.randn(2, 17, 32)
    layer = attnzoo.nn.QKNormAttention.from_timm(ref).eval()
    with torch.no_grad():
        torch.testing.assert_close(layer(x, causal=causal), ref(x, is_causal=causal), atol=1e-5, rtol=1e-5)
    assert timm is not None


def test_qknorm_attention_normalizes_each_heads_queries_and_keys():
    """The oracle: per head, LayerNorm over d_h of q and k, then softmax(q k^T / sqrt(d_h)) v."""
    torch.manual_seed(2)
    layer = attnzoo.nn.QKNormAttention(24, num_heads=3).double()
    x = torch.randn(2, 11, 24, dtype=torch.float64) * 10  # large activations: the norm bounds the logits
    qkv = x @ layer.qkv.weight.t()
    out = torch.zeros(2, 11, 24, dtype=torch.float64)
    for h in range(3):
        sl = slice(8 * h, 8 * h + 8)
        q, k, v = qkv[..., sl], qkv[..., 24:48][..., sl], qkv[..., 48:][..., sl]
        q = (q - q.mean(-1, keepdim=True)) / torch.sqrt(q.var(-1, unbiased=False, keepdim=True) + 1e-5)
        k = (k - k.mean(-1, keepdim=True)) / torch.sqrt(k.var(-1, unbiased=False, keepdim=True) + 1e-5)
        out[..., sl] = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), -1) @ v
    want = out @ layer.proj.weight.t() + layer.proj.bias
    torch.testing.assert_close(layer(x), want, atol=1e-9, rtol=1e-9)


def test_qknorm_attention_from_timm_refuses_a_module_without_layernorm():
    pytest.importorskip("timm")
    from timm.layers import Attention

    with pytest.raises(ParameterError, match="qk_norm"):
        attnzoo.nn.QKNormAttention.from_timm(Attention(32, num_heads=4))


def test_sigma_reparam_starts_as_its_plain_linear_layer():
    torch.manual_seed(3)
    layer = attnzoo.nn.SigmaReparamLinear(32, 24)
    x = torch.randn(2, 5, 32)
    torch.testing.assert_close(layer(x), x @ layer.weight.t() + layer.bias, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(layer.gamma.detach(), torch.linalg.matrix_norm(layer.weight.detach(), ord=2), atol=1e-6, rtol=1e-5)


def test_sigma_reparam_power_iteration_tracks_the_spectral_norm():
    """After the weight changes, training-mode forwards converge to torch.linalg.matrix_norm(W, ord=2)."""
    torch.manual_seed(4)
    layer = attnzoo.nn.SigmaReparamLinear(16, 12).double().train()
    with torch.no_grad():
        layer.weight.copy_(torch.randn(12, 16, dtype=torch.float64))
    x = torch.randn(1, 3, 16, dtype=torch.float64)
    for _ in range(200):
        layer(x)
    want = torch.linalg.matrix_norm(layer.weight.detach(), ord=2)
    torch.testing.assert_close(layer.spectral_norm, want, atol=1e-8, rtol=1e-8)
    torch.testing.assert_close(layer.sigma().detach(), want, atol=1e-8, rtol=1e-8)
    # W_hat = gamma W / sigma(W): its spectral norm is gamma
    torch.testing.assert_close(torch.linalg.matrix_norm(layer.reparameterized_weight().detach(), ord=2), layer.gamma.detach(), atol=1e-8, rtol=1e-8)


def test_sigma_reparam_eval_leaves_u_alone_and_gradients_reach_gamma():
    torch.manual_seed(5)
    layer = attnzoo.nn.SigmaReparamLinear(8, 8)
    with torch.no_grad():
        layer.weight.add_(torch.randn(8, 8))
    u = layer.u.clone()
    layer.eval()(torch.randn(1, 2, 8))
    torch.testing.assert_close(layer.u, u, rtol=0, atol=0)
    layer.train()(torch.randn(1, 2, 8)).sum().backward()
    assert not torch.equal(layer.u, u)
    assert layer.gamma.grad is not None and layer.weight.grad is not None


# --------------------------------------------------------------------------------------------
# V4 token-count-dependent temperature
# --------------------------------------------------------------------------------------------
def _temperature_oracle(q, k, v, train_length, law, causal=False, pad=None):
    """Loop over rows: lambda_i from the count of keys row i sees, then a plain softmax."""
    k, v = _expand(q, k, v)
    b, h, nq, d = q.shape
    nk = k.shape[2]
    out = torch.zeros(b, h, nq, v.shape[-1], dtype=q.dtype)
    for bi in range(b):
        for i in range(nq):
            keys = [j for j in range(nk) if (not causal or j <= i + nk - nq) and (pad is None or not pad[bi, j])]
            if not keys:
                continue
            ratio = math.log(len(keys)) / math.log(train_length)
            lam = math.sqrt(ratio) if law == "sqrt_log" else ratio
            s = torch.einsum("hd,hjd->hj", q[bi, :, i], k[bi, :, keys]) * d**-0.5 * lam
            out[bi, :, i] = torch.einsum("hj,hjd->hd", torch.softmax(s, -1), v[bi, :, keys])
    return out


@pytest.mark.parametrize("backend", ["reference", "sdpa", "tiled"])
@pytest.mark.parametrize("law", ["sqrt_log", "log"])
@pytest.mark.parametrize("causal", [False, True])
def test_length_temperature_B2_H4_N11_D16_matches_the_row_loop(backend, law, causal):
    from attnzoo.functional.variants.temperature import length_temperature_attention

    q, k, v = _qkv(nq=11, nk=11)
    pad = torch.zeros(2, 11, dtype=torch.bool)
    pad[1, :3] = True  # left padding on the second sequence
    want = _temperature_oracle(q, k, v, 5, law, causal, pad)
    got = length_temperature_attention(q, k, v, train_length=5, law=law, causal=causal, key_padding_mask=pad, backend=backend)
    torch.testing.assert_close(got, want, **F64)


@pytest.mark.parametrize("backend", ["reference", "sdpa", "tiled"])
def test_length_temperature_at_the_training_length_is_softmax(backend):
    from attnzoo.functional.variants.temperature import length_temperature_attention

    q, k, v = _qkv(nq=7, nk=19)
    want = attnzoo.softmax_attention(q, k, v)
    torch.testing.assert_close(length_temperature_attention(q, k, v, train_length=19, backend=backend), want, **F64)


def test_length_temperature_keeps_the_entropy_closer_to_its_training_value():
    """Jin et al.'s observation: softmax entropy grows with N; the sqrt(log_T N) temperature reduces the drift."""
    from attnzoo.functional.variants.temperature import length_temperature_attention

    def entropy(n, tempered):
        gen = torch.Generator().manual_seed(n)
        q = torch.randn(1, 1, 64, 32, generator=gen, dtype=torch.float64) * 2
        k = torch.randn(1, 1, n, 32, generator=gen, dtype=torch.float64) * 2
        eye = torch.eye(n, dtype=torch.float64).view(1, 1, n, n)
        p = length_temperature_attention(q, k, eye, train_length=64, backend="reference") if tempered else attnzoo.softmax_attention(q, k, eye)
        return float(-(p * p.clamp_min(1e-300).log()).sum(-1).mean())

    base = entropy(64, False)
    assert abs(entropy(1024, True) - base) < abs(entropy(1024, False) - base)


# --------------------------------------------------------------------------------------------
# V6 reversed attention
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["reference", "tiled"])
def test_reversed_attention_columns_sum_to_one(backend):
    from attnzoo.functional.variants.reversed import reversed_attention

    q, k, _ = _qkv(b=2, hq=2, hkv=2, nq=9, nk=6)
    eye = torch.eye(6, dtype=torch.float64).expand(2, 2, 6, 6)  # v = I: the output is P itself
    p = reversed_attention(q, k, eye, backend=backend)
    torch.testing.assert_close(p.sum(-2), torch.ones(2, 2, 6, dtype=torch.float64), **F64)
    assert not torch.allclose(p.sum(-1), torch.ones(2, 2, 9, dtype=torch.float64))  # rows are not distributions


@pytest.mark.parametrize("backend", ["reference", "tiled"])
def test_reversed_attention_B2_H4_N10x7_D16_matches_the_column_loop(backend):
    """The oracle: for each key j, a softmax over the (unpadded) queries; out_i = sum_j P_ij v_j."""
    from attnzoo.functional.variants.reversed import reversed_attention

    q, k, v = _qkv(nq=10, nk=7)
    kk, vv = _expand(q, k, v)
    kpad = torch.zeros(2, 7, dtype=torch.bool)
    kpad[0, 5:] = True
    qpad = torch.zeros(2, 10, dtype=torch.bool)
    qpad[1, :4] = True
    want = torch.zeros(2, 4, 10, 8, dtype=torch.float64)
    for b in range(2):
        rows = [i for i in range(10) if not qpad[b, i]]
        for j in range(7):
            if kpad[b, j]:
                continue
            s = torch.einsum("hid,hd->hi", q[b, :, rows], kk[b, :, j]) * 0.25
            want[b, :, rows] += torch.softmax(s, -1)[..., None] * vv[b, :, j][:, None]
    got = reversed_attention(q, k, v, key_padding_mask=kpad, query_padding_mask=qpad, backend=backend)
    torch.testing.assert_close(got, want, **F64)


@pytest.mark.parametrize("backend", ["reference", "tiled"])
def test_reversed_attention_is_dependencyvits_transposed_softmax(backend):
    """DependencyViT / timm ReversedAttention: x = softmax(q k^T * scale, -1)^T v (self-attention)."""
    from attnzoo.functional.variants.reversed import reversed_attention

    q, k, v = _qkv(hq=3, hkv=3, nq=12, nk=12)
    attn = torch.softmax(torch.einsum("bhid,bhjd->bhij", q, k) * 16**-0.5, -1)
    want = torch.einsum("bhji,bhjd->bhid", attn, v)
    torch.testing.assert_close(reversed_attention(k, q, v, backend=backend), want, **F64)


def test_reversed_attention_self_padding_masks_the_queries_too():
    from attnzoo.functional.variants.reversed import reversed_attention

    q, k, v = _qkv(nq=11, nk=11)
    pad = torch.zeros(2, 11, dtype=torch.bool)
    pad[0, 8:] = True
    out = reversed_attention(q, k, v, key_padding_mask=pad)
    alone = reversed_attention(q[:1, :, :8], k[:1, :, :8], v[:1, :, :8])
    torch.testing.assert_close(out[:1, :, :8], alone, **F64)
    assert float(out[0, :, 8:].abs().max()) == 0.0


def test_reversed_attention_has_no_causal_form():
    q, k, v = _qkv()
    with pytest.raises(ParameterError, match="causal"):
        attnzoo.get("reversed")(q, k, v, causal=True)
    with pytest.raises(ParameterError, match="no causal form"):
        attnzoo.get("reversed").init_state(q, k, v)


# --------------------------------------------------------------------------------------------
# V1 softplus + l1 normalization + length scale
# --------------------------------------------------------------------------------------------
def _softplus_oracle(q, k, v, train_length, causal=False, pad=None):
    """Row loop: lambda_i = log n_i / log T, w = log(1 + exp(lambda_i q.k / sqrt(d))), divided by its sum."""
    k, v = _expand(q, k, v)
    b, h, nq, d = q.shape
    nk = k.shape[2]
    out = torch.zeros(b, h, nq, v.shape[-1], dtype=q.dtype)
    for bi in range(b):
        for i in range(nq):
            keys = [j for j in range(nk) if (not causal or j <= i + nk - nq) and (pad is None or not pad[bi, j])]
            if not keys:
                continue
            lam = 1.0 if train_length is None else math.log(len(keys)) / math.log(train_length)
            w = torch.log1p(torch.exp(torch.einsum("hd,hjd->hj", q[bi, :, i], k[bi, :, keys]) * d**-0.5 * lam))
            out[bi, :, i] = torch.einsum("hj,hjd->hd", w / w.sum(-1, keepdim=True), v[bi, :, keys])
    return out


@pytest.mark.parametrize("backend", ["reference", "chunked"])
@pytest.mark.parametrize("train_length", [None, 4])
@pytest.mark.parametrize("causal", [False, True])
def test_softplus_B2_H4_N9x12_D16_matches_the_row_loop(backend, train_length, causal, monkeypatch):
    from attnzoo.functional.variants import softplus

    monkeypatch.setattr(softplus, "CHUNK", 5)  # several chunks, a ragged last one
    q, k, v = _qkv(nq=9, nk=12)
    pad = torch.zeros(2, 12, dtype=torch.bool)
    pad[0, 10:] = True
    pad[1, :2] = True
    want = _softplus_oracle(q, k, v, train_length, causal, pad)
    got = softplus.softplus_attention(q, k, v, train_length=train_length, causal=causal, key_padding_mask=pad, backend=backend)
    torch.testing.assert_close(got, want, **F64)


def test_softplus_chunked_gradients_match_the_reference_across_chunks(monkeypatch):
    from attnzoo.functional.variants import softplus

    monkeypatch.setattr(softplus, "CHUNK", 4)
    q, k, v = (t.requires_grad_() for t in _qkv(nq=10, nk=10))
    w = torch.randn(2, 4, 10, 8, dtype=torch.float64)
    grads = {}
    for backend in ("reference", "chunked"):
        out = softplus.softplus_attention(q, k, v, train_length=6, causal=True, backend=backend)
        grads[backend] = torch.autograd.grad((out * w).sum(), (q, k, v))
    for got, want in zip(grads["chunked"], grads["reference"]):
        torch.testing.assert_close(got, want, **F64)


def test_softplus_rows_are_l1_normalized_and_positive():
    from attnzoo.functional.variants.softplus import softplus_attention

    q, k, _ = _qkv(b=1, hq=2, hkv=2, nq=6, nk=8)
    eye = torch.eye(8, dtype=torch.float64).expand(1, 2, 8, 8)
    w = softplus_attention(q * 10, k, eye, train_length=3)
    torch.testing.assert_close(w.sum(-1), torch.ones(1, 2, 6, dtype=torch.float64), **F64)
    assert float(w.min()) > 0


def test_softplus_length_scale_is_one_at_the_training_length():
    from attnzoo.functional.variants.softplus import softplus_attention

    q, k, v = _qkv(nq=5, nk=16)
    torch.testing.assert_close(softplus_attention(q, k, v, train_length=16), softplus_attention(q, k, v), **F64)


# --------------------------------------------------------------------------------------------
# V3 position temperature (Zhang et al., official gpt_2_PTS.py) and selective attention (Leviathan et al.)
# --------------------------------------------------------------------------------------------
def _pts_oracle(q, k, v, beta):
    """The official PTS arithmetic: att = q k^T / sqrt(d) * (1 + exp(-exp(beta)) log(arange(1, T + 1))), causal, softmax."""
    k, v = _expand(q, k, v)
    t, d = q.shape[2], q.shape[3]
    att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(d))
    beta = torch.as_tensor(beta, dtype=q.dtype).reshape(-1, 1, 1)
    row_length = torch.arange(1, t + 1, dtype=q.dtype).view(1, 1, t, 1)
    att = att * (1 + torch.exp(-torch.exp(beta)) * torch.log(row_length))
    att = att.masked_fill(torch.tril(torch.ones(t, t, dtype=torch.bool)) == 0, float("-inf"))
    return torch.softmax(att, -1) @ v


@pytest.mark.parametrize("backend", ["reference", "sdpa", "tiled"])
@pytest.mark.parametrize("per_head", [False, True])
def test_position_temperature_B2_H4_N15_D16_matches_the_official_pts_code(backend, per_head):
    from attnzoo.functional.variants.temperature import position_temperature_attention

    q, k, v = _qkv(nq=15, nk=15)
    beta = torch.tensor([1.5, -1.0, 0.0, -2.5], dtype=torch.float64) if per_head else -1.0
    want = _pts_oracle(q, k, v, beta if per_head else [beta])
    got = position_temperature_attention(q, k, v, beta=beta, causal=True, backend=backend)
    torch.testing.assert_close(got, want, **F64)


@pytest.mark.parametrize("backend", ["reference", "sdpa", "tiled"])
def test_position_temperature_gradients_reach_beta_and_the_query_temperature(backend):
    from attnzoo.functional.variants.temperature import position_temperature_attention

    q, k, v = _qkv(nq=9, nk=9)
    beta = torch.tensor([0.5, -1.0, 0.0, 1.0], dtype=torch.float64, requires_grad=True)
    temp = (0.5 + torch.rand(2, 4, 9, dtype=torch.float64)).requires_grad_()
    out = position_temperature_attention(q, k, v, beta=beta, query_temperature=temp, causal=True, backend=backend)
    d_beta, d_temp = torch.autograd.grad(out.square().sum(), (beta, temp))
    # oracle: the same with the temperatures applied to the logits by hand
    b2, t2 = beta.detach().clone().requires_grad_(), temp.detach().clone().requires_grad_()
    kk, vv = _expand(q, k, v)
    tau = (1 + torch.exp(-torch.exp(b2)).view(1, 4, 1) * torch.log(torch.arange(1, 10, dtype=torch.float64))) * t2
    s = (q @ kk.transpose(-1, -2)) * 0.25 * tau[..., None]
    s = s.masked_fill(~_causal_visible(9, 9), float("-inf"))
    want = torch.autograd.grad((torch.softmax(s, -1) @ vv).square().sum(), (b2, t2))
    torch.testing.assert_close(d_beta, want[0], **F64)
    torch.testing.assert_close(d_temp, want[1], **F64)


def test_position_temperature_with_a_huge_beta_is_softmax():
    from attnzoo.functional.variants.temperature import position_temperature_attention

    q, k, v = _qkv(nq=12, nk=12)
    want = attnzoo.softmax_attention(q, k, v, causal=True)
    torch.testing.assert_close(position_temperature_attention(q, k, v, beta=10.0, causal=True), want, **F64)


def _selective_oracle(q, k, v, head=0, protect_first=True):
    """Loops per Leviathan et al. Sec. 3: F[i, j] = sum over earlier queries i' (j <= i', j != i', j != 0) of ReLU(L_h0[i', j])."""
    kk, vv = _expand(q, k, v)
    b, h, n, d = q.shape
    logits = torch.einsum("bhid,bhjd->bhij", q, kk) * d**-0.5
    out = torch.zeros(b, h, n, vv.shape[-1], dtype=q.dtype)
    for bi in range(b):
        for i in range(n):
            f = torch.zeros(i + 1, dtype=q.dtype)
            for ip in range(i):
                for j in range(ip + 1):
                    if j != ip and not (protect_first and j == 0):
                        f[j] += torch.relu(logits[bi, head, ip, j])
            p = torch.softmax(logits[bi, :, i, : i + 1] - f, -1)
            out[bi, :, i] = torch.einsum("hj,hjd->hd", p, vv[bi, :, : i + 1])
    return out


@pytest.mark.parametrize("backend", ["reference", "blocked"])
@pytest.mark.parametrize("head, protect_first", [(0, True), (2, False)])
def test_selective_attention_B2_H4_N11_D16_matches_the_loops(backend, head, protect_first, monkeypatch):
    from attnzoo.functional.variants import selective

    monkeypatch.setattr(selective, "BLOCK", 4)
    q, k, v = _qkv(nq=11, nk=11)
    want = _selective_oracle(q, k, v, head, protect_first)
    got = selective.selective_attention(q, k, v, selection_head=head, protect_first=protect_first, backend=backend)
    torch.testing.assert_close(got, want, **F64)


def test_selective_attention_without_masks_is_causal_softmax():
    """A selection head whose logits are never positive masks nothing."""
    from attnzoo.functional.variants.selective import selective_attention

    q, k, v = _qkv(nq=10, nk=10)
    k = k.abs()
    q[:, 0] = -q[:, 0].abs()  # head 0 (kv head 0): q.k <= 0 everywhere
    torch.testing.assert_close(selective_attention(q, k, v), attnzoo.softmax_attention(q, k, v, causal=True), **F64)


def test_selective_attention_is_causal_only():
    from attnzoo.functional.variants.selective import selective_attention

    q, k, v = _qkv()
    with pytest.raises(ParameterError, match="causal"):
        selective_attention(q, k, v, causal=False)
