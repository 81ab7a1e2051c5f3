"""Oracles for the head variants (catalog H1, H4, H5, H6): each written out from the paper's equations
(or the official code's arithmetic) with einsums and loops, independently of the modules."""

from __future__ import annotations

import math

import pytest
import torch

from attnzoo.errors import ParameterError, ShapeError
from attnzoo.nn.heads.moh import MixtureOfHeadAttention

DT = torch.float64


def _mha(x, w_qkv, b_qkv, w_o, b_o, heads, gates=None):
    """Plain multi-head attention, per head, with an optional per-token weight (B, N, h) on each head."""
    b, n, _ = x.shape
    qkv = x @ w_qkv.T + (0 if b_qkv is None else b_qkv)
    q, k, v = qkv.chunk(3, dim=-1)
    d = q.shape[-1] // heads
    outs = []
    for h in range(heads):
        sl = slice(h * d, (h + 1) * d)
        a = torch.softmax(q[..., sl] @ k[..., sl].transpose(1, 2) / math.sqrt(d), dim=-1)
        o = a @ v[..., sl]
        if gates is not None:
            o = o * gates[..., h : h + 1]
        outs.append(o)
    return torch.cat(outs, -1) @ w_o.T + b_o


# ---------------------------------------------------------------- H1 MoH


def _moh_gates(layer, x):
    """MoH-DiT MoHAttention arithmetic, token by token."""
    b, n, c = x.shape
    hs, hr, k = layer.shared_heads, layer.routed_heads, layer.top_k
    g = torch.zeros(b, n, layer.num_heads, dtype=x.dtype)
    for bi in range(b):
        for t in range(n):
            xt = x[bi, t]
            routed = torch.zeros(hr, dtype=x.dtype)
            if hr:
                p = torch.softmax(layer.router.weight @ xt, 0)
                order = sorted(range(hr), key=lambda i: -float(p[i].detach()))[:k]
                z = sum(p[i] for i in order)
                for i in order:
                    routed[i] = p[i] / z * k
            shared = torch.ones(hs, dtype=x.dtype)
            if hs > 1:
                shared = torch.softmax(layer.shared_router.weight @ xt, 0) * hs
            if hs and hr:
                a = torch.softmax(layer.balance.weight @ xt, 0) * 2
                shared, routed = shared * a[0], routed * a[1]
            g[bi, t] = torch.cat([shared, routed])
    return g


@pytest.mark.parametrize("heads,shared,top_k", [(6, 2, 2), (4, 0, 2), (4, 1, 1), (4, 4, 0)])
def test_moh_matches_the_official_arithmetic(heads, shared, top_k):
    torch.manual_seed(0)
    layer = MixtureOfHeadAttention(24, heads, shared_heads=shared, top_k=top_k, qkv_bias=True).to(DT).eval()
    x = torch.randn(2, 9, 24, dtype=DT)
    g = _moh_gates(layer, x)
    torch.testing.assert_close(layer.gates(x), g)
    ref = _mha(x, layer.qkv.weight, layer.qkv.bias, layer.proj.weight, layer.proj.bias, heads, g)
    torch.testing.assert_close(layer(x), ref)


def test_moh_with_all_heads_on_and_equal_weights_is_mha():
    torch.manual_seed(0)
    layer = MixtureOfHeadAttention(32, 4, shared_heads=4, top_k=0).to(DT)
    torch.nn.init.zeros_(layer.shared_router.weight)  # uniform softmax * h_s = 1 on every head
    x = torch.randn(2, 11, 32, dtype=DT)
    ref = _mha(x, layer.qkv.weight, None, layer.proj.weight, layer.proj.bias, 4)
    torch.testing.assert_close(layer(x), ref)
    # the same through torch's MHA with the same weights
    mha = torch.nn.MultiheadAttention(32, 4, bias=True, batch_first=True).to(DT)
    with torch.no_grad():
        mha.in_proj_weight.copy_(layer.qkv.weight)
        mha.in_proj_bias.zero_()
        mha.out_proj.weight.copy_(layer.proj.weight)
        mha.out_proj.bias.copy_(layer.proj.bias)
    torch.testing.assert_close(layer(x), mha(x, x, x, need_weights=False)[0])


def test_moh_routed_all_selected_with_uniform_router_is_mha_scaled():
    # every routed head kept (k = h - h_s) and a zero router: each gate is k / (h - h_s) = 1
    torch.manual_seed(0)
    layer = MixtureOfHeadAttention(32, 4, shared_heads=0, top_k=4).to(DT)
    torch.nn.init.zeros_(layer.router.weight)
    x = torch.randn(1, 7, 32, dtype=DT)
    torch.testing.assert_close(layer(x), _mha(x, layer.qkv.weight, None, layer.proj.weight, layer.proj.bias, 4))


def test_moh_load_balance_loss():
    torch.manual_seed(0)
    layer = MixtureOfHeadAttention(24, 6, shared_heads=2, top_k=2).to(DT).train()
    x = torch.randn(3, 5, 24, dtype=DT)
    layer(x)
    p = torch.softmax(x.reshape(-1, 24) @ layer.router.weight.T, -1)
    f = torch.zeros(4, dtype=DT)
    for row in p:
        for i in row.topk(2).indices:
            f[i] += 1 / p.shape[0]
    torch.testing.assert_close(layer.aux_loss, 4 * (f * p.mean(0)).sum())
    layer.eval()
    layer(x)
    assert layer.aux_loss is None
    # a uniform router gives L_b = k
    torch.nn.init.zeros_(layer.router.weight)
    layer.train()
    layer(x)
    torch.testing.assert_close(layer.aux_loss, torch.tensor(2.0, dtype=DT))


def test_moh_refuses_bad_arguments():
    with pytest.raises(ParameterError, match="top_k"):
        MixtureOfHeadAttention(32, 4, shared_heads=2, top_k=3)
    with pytest.raises(ParameterError, match="top_k"):
        MixtureOfHeadAttention(32, 4, shared_heads=2, top_k=0)
    with pytest.raises(ParameterError, match="shared_heads"):
        MixtureOfHeadAttention(32, 4, shared_heads=5, top_k=0)
    with pytest.raises(ShapeError, match="expected"):
        MixtureOfHeadAttention(32, 4, shared_heads=2, top_k=1)(torch.randn(2, 3, 16))


# ---------------------------------------------------------------- H4 low-rank factorized MHSA (LAMA)

from attnzoo.nn.heads.low_rank import LowRankFactorizedAttention  # noqa: E402


@pytest.mark.parametrize("rank,normalize", [(1, False), (3, False), (2, True)])
def test_lama_matches_the_bilinear_form_per_head(rank, normalize):
    torch.manual_seed(0)
    c, h = 10, 4
    layer = LowRankFactorizedAttention(c, h, rank=rank, normalize_scores=normalize).to(DT)
    x = torch.randn(2, 7, c, dtype=DT)
    p, q, ctx = layer.p.detach(), layer.q.detach(), layer.context.detach()
    out = torch.zeros(2, h, c, dtype=DT)
    for b in range(2):
        s = torch.zeros(7, h, dtype=DT)
        for i in range(7):
            for k in range(h):
                w_k = q[:, k * rank : (k + 1) * rank] @ p[:, k * rank : (k + 1) * rank].T  # rank-r bilinear matrix
                s[i, k] = x[b, i] @ w_k @ ctx
            if normalize:
                s[i] = s[i] / s[i].norm().clamp_min(1e-12)
        a = torch.softmax(torch.tanh(s), dim=0)  # over tokens
        out[b] = a.T @ x[b]
    torch.testing.assert_close(layer(x), out)


def test_lama_rank_one_is_the_reimplementation_and_pools_convexly():
    torch.manual_seed(0)
    layer = LowRankFactorizedAttention(6, 3).to(DT)
    x = torch.randn(1, 5, 6, dtype=DT)
    # JohnGiorgi's LAMA: softmax(tanh((P^T c) * (Q^T h_t))) over t
    sim = torch.tanh((layer.p.T @ layer.context)[:, None] * (layer.q.T @ x[0].T))
    torch.testing.assert_close(layer.attention(x)[0], torch.softmax(sim, -1))
    same = torch.randn(1, 1, 6, dtype=DT).expand(1, 5, 6)
    torch.testing.assert_close(layer(same), same[:, :3])  # a convex combination of equal tokens
    mask = torch.tensor([[False, False, True, True, True]])
    torch.testing.assert_close(layer(x, key_padding_mask=mask), layer(x[:, :2]))


# ---------------------------------------------------------------- H5 ZeroI2V STDHA

from attnzoo.nn.heads.dual_head import SpatioTemporalDualHeadAttention  # noqa: E402


def _temporal_shift(feat, fold, stride=1):
    """The official TemporalShift (divide_head=False) on (B, T, N, C): channel folds from t -/+ stride."""
    out = feat.clone()
    out[:, stride:, :, :fold] = feat[:, :-stride, :, :fold]
    out[:, :-stride, :, fold : 2 * fold] = feat[:, stride:, :, fold : 2 * fold]
    return out


def _frame_mha(q, k, v, heads):
    b, t, n, c = q.shape
    d = c // heads
    out = torch.zeros_like(q)
    for f in range(t):
        for h in range(heads):
            sl = slice(h * d, (h + 1) * d)
            a = torch.softmax(q[:, f, :, sl] @ k[:, f, :, sl].transpose(1, 2) / math.sqrt(d), -1)
            out[:, f, :, sl] = a @ v[:, f, :, sl]
    return out


@pytest.mark.parametrize("heads,frames", [(4, 3), (8, 5), (4, 1)])
def test_stdha_matches_the_official_channel_shift(heads, frames):
    torch.manual_seed(0)
    c = 32
    layer = SpatioTemporalDualHeadAttention(c, heads).to(DT)
    x = torch.randn(2, frames, 6, c, dtype=DT)
    q, k, v = (x @ layer.qkv.weight.T + layer.qkv.bias).chunk(3, -1)
    fold = c // 4  # shift_div = 4
    k, v = _temporal_shift(k, fold), _temporal_shift(v, fold)
    ref = _frame_mha(q, k, v, heads) @ layer.proj.weight.T + layer.proj.bias
    torch.testing.assert_close(layer(x), ref)


def test_stdha_with_zero_offsets_is_per_frame_mha():
    torch.manual_seed(0)
    layer = SpatioTemporalDualHeadAttention(16, 4, head_offsets=(0, 0, 0, 0)).to(DT)
    mha = torch.nn.MultiheadAttention(16, 4, batch_first=True).to(DT)
    with torch.no_grad():
        mha.in_proj_weight.copy_(layer.qkv.weight)
        mha.in_proj_bias.copy_(layer.qkv.bias)
        mha.out_proj.weight.copy_(layer.proj.weight)
        mha.out_proj.bias.copy_(layer.proj.bias)
    x = torch.randn(2, 3, 7, 16, dtype=DT)
    flat = x.reshape(6, 7, 16)
    torch.testing.assert_close(layer(x), mha(flat, flat, flat, need_weights=False)[0].reshape(2, 3, 7, 16))


def test_stdha_head_offsets_reach_the_named_frame():
    # a head with offset +2 reads frame t + 2 (own frame near the end); check through a perturbation
    torch.manual_seed(0)
    layer = SpatioTemporalDualHeadAttention(8, 2, head_offsets=(2, 0)).to(DT)
    assert layer.frame_index(4).tolist() == [[2, 3, 2, 3], [0, 1, 2, 3]]
    x = torch.randn(1, 4, 3, 8, dtype=DT)
    x2 = x.clone()
    x2[0, 3] += 1.0
    diff = (layer(x) - layer(x2)).abs().amax((-1, -2))[0]
    assert diff[1] > 0 and diff[3] > 0 and diff[0] == 0 and diff[2] == 0
    with pytest.raises(ParameterError, match="head_offsets"):
        SpatioTemporalDualHeadAttention(8, 2, head_offsets=(1,))


# ---------------------------------------------------------------- H6 UoE selective multi-head attention

from attnzoo.nn.heads.selective import SelectiveMultiHeadAttention  # noqa: E402


def _smha_oracle(layer, x, causal):
    """UoE SMHA_v3 arithmetic: gather each head's routed tokens (in order), attend, W_o^e, scatter-add."""
    b, n, c = x.shape
    h, d, k = layer.num_heads, layer.head_dim, layer.top_k
    q, kk, v = (x @ layer.qkv.weight.T + layer.qkv.bias).chunk(3, -1)
    p = torch.softmax(x @ layer.router.weight.T + layer.router.bias, -1)
    out = torch.zeros(b, n, c, dtype=x.dtype) + layer.proj.bias
    for bi in range(b):
        for e in range(h):
            rows = [t for t in range(n) if e in p[bi, t].topk(k).indices.tolist()]
            if not rows:
                continue
            sl = slice(e * d, (e + 1) * d)
            qe, ke, ve = q[bi, rows, sl], kk[bi, rows, sl], v[bi, rows, sl]
            s = qe @ ke.T / math.sqrt(d)
            if causal:  # gathered in order: causal on the gathered index = causal on positions
                s = s.masked_fill(torch.ones_like(s, dtype=torch.bool).triu(1), float("-inf"))
            he = torch.softmax(s, -1) @ ve @ layer.proj.weight[:, sl].T  # row slice W_o^e
            for j, t in enumerate(rows):
                top = p[bi, t].topk(k).values
                g = p[bi, t, e] / top.sum() * k if layer.weighted else 1.0
                out[bi, t] += g * he[j]
    return out


@pytest.mark.parametrize("top_k,weighted,causal", [(2, True, False), (1, True, True), (3, False, False), (2, False, True)])
def test_smha_matches_gathered_per_head_attention(top_k, weighted, causal):
    torch.manual_seed(0)
    layer = SelectiveMultiHeadAttention(24, 4, top_k=top_k, weighted=weighted).to(DT).eval()
    x = torch.randn(2, 9, 24, dtype=DT)
    torch.testing.assert_close(layer(x, causal=causal), _smha_oracle(layer, x, causal))


def test_smha_all_heads_with_uniform_router_is_mha():
    torch.manual_seed(0)
    layer = SelectiveMultiHeadAttention(32, 4, top_k=4).to(DT)
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.bias.zero_()
    x = torch.randn(2, 7, 32, dtype=DT)
    ref = _mha(x, layer.qkv.weight, layer.qkv.bias, layer.proj.weight, layer.proj.bias, 4)
    torch.testing.assert_close(layer(x), ref)
    assert SelectiveMultiHeadAttention(32, 8).top_k == 4  # official default: half the heads


def test_smha_load_balance_loss_and_refusals():
    torch.manual_seed(0)
    layer = SelectiveMultiHeadAttention(16, 4, top_k=2).to(DT).train()
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.bias.zero_()
    layer(torch.randn(2, 5, 16, dtype=DT))
    torch.testing.assert_close(layer.aux_loss, torch.tensor(2.0, dtype=DT))
    with pytest.raises(ParameterError, match="top_k"):
        SelectiveMultiHeadAttention(16, 4, top_k=5)
    with pytest.raises(ShapeError, match="expected"):
        layer(torch.randn(2, 5, 8, dtype=DT))
