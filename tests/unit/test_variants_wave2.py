"""Wave-2 variants (issue 15): X2 epipolar masks, D4 DiffQKV, V9 calibration hooks, V7 URPE / RCMHA,
V10 GIN attention / TAP + ADL, V5 GAAM, X5 global-local / pair-wise cross-attention.

Each oracle is the paper's arithmetic written out here (loops or einsums), not a call of the
module's own internals."""

from __future__ import annotations

import math

import pytest
import torch

import attnzoo
from attnzoo.errors import AttnZooError, ParameterError

F64 = torch.float64


def gen(seed):
    return torch.Generator().manual_seed(seed)


# ============================================================================================
# X2: epipolar mask
# ============================================================================================
from attnzoo.masks_epipolar import epipolar_mask, fundamental_matrix  # noqa: E402


def rotation(ax, ay, az):
    cx, sx, cy, sy, cz, sz = math.cos(ax), math.sin(ax), math.cos(ay), math.sin(ay), math.cos(az), math.sin(az)
    rx = torch.tensor([[1, 0, 0], [0, cx, -sx], [0, sx, cx]], dtype=F64)
    ry = torch.tensor([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]], dtype=F64)
    rz = torch.tensor([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]], dtype=F64)
    return rz @ ry @ rx


def camera_pair(width=12, height=10):
    """Two cameras looking at the origin from different places (a synthetic stereo-like pair)."""
    K = torch.tensor([[14.0, 0.0, width / 2], [0.0, 13.0, height / 2], [0.0, 0.0, 1.0]], dtype=F64)
    R1, R2 = rotation(0.05, -0.1, 0.02), rotation(-0.08, 0.35, -0.05)
    t1, t2 = torch.tensor([0.1, -0.05, 4.0], dtype=F64), torch.tensor([-0.9, 0.2, 4.3], dtype=F64)
    return K, R1, t1, K.clone(), R2, t2


def epipolar_oracle(K1, R1, t1, K2, R2, t2, h1, w1, h2, w2, d, offset=0.0):
    """Per-pixel loop: the line through the epipole (camera 1's centre seen by camera 2) and the
    image of a point on pixel x_1's ray; no fundamental matrix."""
    P2 = K2 @ torch.cat([R2, t2[:, None]], 1)
    c1 = -R1.T @ t1  # camera 1's centre in the world
    e2 = P2 @ torch.cat([c1, torch.ones(1, dtype=F64)])
    allowed = torch.zeros(h1 * w1, h2 * w2, dtype=torch.bool)
    for r in range(h1):
        for c in range(w1):
            x1 = torch.tensor([c + offset, r + offset, 1.0], dtype=F64)
            ray = R1.T @ torch.linalg.solve(K1, x1)
            point = c1 + 3.0 * ray
            x2 = P2 @ torch.cat([point, torch.ones(1, dtype=F64)])
            line = torch.linalg.cross(e2, x2)
            for r2 in range(h2):
                for c2 in range(w2):
                    p = torch.tensor([c2 + offset, r2 + offset, 1.0], dtype=F64)
                    dist = abs(float(line @ p)) / math.hypot(float(line[0]), float(line[1]))
                    allowed[r * w1 + c, r2 * w2 + c2] = dist <= d
    return allowed


def test_fundamental_matrix_satisfies_the_epipolar_constraint():
    K1, R1, t1, K2, R2, t2 = camera_pair()
    F = fundamental_matrix(K1, R1, t1, K2, R2, t2)
    X = torch.randn(20, 3, generator=gen(0), dtype=F64)
    x1 = (K1 @ (R1 @ X.T + t1[:, None])).T
    x2 = (K2 @ (R2 @ X.T + t2[:, None])).T
    x1, x2 = x1 / x1[:, 2:], x2 / x2[:, 2:]
    residual = torch.einsum("ni,ij,nj->n", x2, F, x1)
    assert residual.abs().max() < 1e-9 * F.abs().max() * 100


@pytest.mark.parametrize("offset", [0.0, 0.5])
def test_epipolar_mask_equals_the_per_pixel_loop(offset):
    K1, R1, t1, K2, R2, t2 = camera_pair()
    mask = epipolar_mask(K1, R1, t1, K2, R2, t2, size=(10, 12), key_size=(9, 11), distance=1.5, pixel_offset=offset)
    dense = attnzoo.masks.dense_mask(mask, 120, 99)[0, 0]
    expected = epipolar_oracle(K1, R1, t1, K2, R2, t2, 10, 12, 9, 11, 1.5, offset)
    assert torch.equal(dense, expected)
    assert 0 < expected.sum() < expected.numel()  # a band, neither empty nor everything


def test_epipolar_mask_drives_softmax_attention_on_every_backend():
    K1, R1, t1, K2, R2, t2 = camera_pair(8, 8)
    mask = epipolar_mask(K1, R1, t1, K2, R2, t2, size=8, distance=1.0)
    allowed = epipolar_oracle(K1, R1, t1, K2, R2, t2, 8, 8, 8, 8, 1.0)
    q, k, v = (torch.randn(2, 2, 64, 16, generator=gen(i), dtype=F64) for i in range(3))
    s = (q @ k.transpose(-1, -2) / 4).masked_fill(~allowed, float("-inf"))
    expected = torch.nan_to_num(torch.softmax(s, -1)) @ v
    for backend in ("reference", "tiled"):
        out = attnzoo.softmax_attention(q, k, v, mask_mod=mask, backend=backend)
        torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-9)


def test_epipolar_mask_batched_cameras_differ_per_batch_entry():
    a, b = camera_pair(6, 6), camera_pair(6, 6)
    b = (b[0], b[1], b[2], b[3], rotation(0.3, -0.4, 0.1), b[5])
    batched = [torch.stack([x, y]) for x, y in zip(a, b)]
    mask = epipolar_mask(*batched, size=6, distance=0.8)
    dense = attnzoo.masks.dense_mask(mask, 36, 36, batch=2)
    assert torch.equal(dense[0, 0], epipolar_oracle(*a, 6, 6, 6, 6, 0.8))
    assert torch.equal(dense[1, 0], epipolar_oracle(*b, 6, 6, 6, 6, 0.8))


def test_epipolar_mask_refuses_bad_arguments():
    K1, R1, t1, K2, R2, t2 = camera_pair()
    with pytest.raises(ParameterError, match="distance"):
        epipolar_mask(K1, R1, t1, K2, R2, t2, size=4, distance=-1.0)
    with pytest.raises(AttnZooError, match="K1"):
        epipolar_mask(K1[:2], R1, t1, K2, R2, t2, size=4)
    with pytest.raises(ParameterError, match="size"):
        epipolar_mask(K1, R1, t1, K2, R2, t2, size=(4, 0))


# ============================================================================================
# D4: DiffQKV
# ============================================================================================
from attnzoo.nn.variants.diffqkv import DiffQKVAttention  # noqa: E402


def diffqkv_loop(layer, x, causal=False):
    """Per batch, query head and token: scores against K head i // (Hq/Hk), values of V head i // (Hq/Hv)."""
    hq, hk, hv = layer.num_heads, layer.num_k_heads, layer.num_v_heads
    dq, dk, dv = layer.q_head_dim, layer.k_head_dim, layer.v_head_dim
    b, n, _ = x.shape
    out = torch.zeros(b, n, hq * dv, dtype=x.dtype)
    for bi in range(b):
        q = (x[bi] @ layer.q_proj.weight.T).view(n, hq, dq)
        k = (x[bi] @ layer.k_proj.weight.T).view(n, hk, dk)
        v = (x[bi] @ layer.v_proj.weight.T).view(n, hv, dv)
        for i in range(hq):
            qi = q[:, i]
            if layer.q_aug is not None:
                qi = (torch.nn.functional.silu(qi) if layer.aug_activation == "silu" else qi) @ layer.q_aug[i]
            ki, vi = k[:, i // (hq // hk)], v[:, i // (hq // hv)]
            for t in range(n):
                last = t + 1 if causal else n
                s = torch.stack([qi[t] @ ki[s_] for s_ in range(last)]) / math.sqrt(dk)
                w = torch.softmax(s, 0)
                out[bi, t, i * dv:(i + 1) * dv] = sum(w[s_] * vi[s_] for s_ in range(last))
    return out @ layer.proj.weight.T + layer.proj.bias


@pytest.mark.parametrize("heads,dims,act", [((4, 1, 2), (4, 8, 6), None), ((4, 2, 1), (6, 3, 6), "silu"), ((2, 2, 2), (4, 4, None), None)])
@pytest.mark.parametrize("causal", [False, True])
def test_diffqkv_equals_the_written_out_loop(heads, dims, act, causal):
    torch.manual_seed(0)
    layer = DiffQKVAttention(16, num_heads=heads[0], num_k_heads=heads[1], num_v_heads=heads[2], k_head_dim=dims[0], v_head_dim=dims[1],
                             q_head_dim=dims[2], aug_activation=act).double()
    x = torch.randn(2, 7, 16, generator=gen(1), dtype=F64)
    torch.testing.assert_close(layer(x, causal=causal), diffqkv_loop(layer, x, causal), rtol=1e-10, atol=1e-10)


def test_diffqkv_cache_is_smaller_and_bad_heads_refused():
    layer = DiffQKVAttention(64, num_heads=8, num_k_heads=2, num_v_heads=4, k_head_dim=8, v_head_dim=16)
    assert layer.kv_cache_numbers_per_token() == 2 * 8 + 4 * 16 < 2 * 64
    assert layer.q_aug is None
    with pytest.raises(ParameterError, match="num_k_heads"):
        DiffQKVAttention(64, num_heads=8, num_k_heads=3)
    with pytest.raises(ParameterError, match="num_k_heads"):
        DiffQKVAttention(64, num_heads=12, num_k_heads=4, num_v_heads=6)


# ============================================================================================
# V9: post-softmax calibration hooks
# ============================================================================================
from attnzoo import hooks  # noqa: E402
from attnzoo.hooks_calibration import calibrate_sinks, modulate_heads, redistribute_visual_sinks  # noqa: E402


def sink_qkv(b=2, h=3, n=10, d=8, seed=0):
    q, k, v = (torch.randn(b, h, n, d, generator=gen(seed + i), dtype=F64) for i in range(3))
    u = torch.ones(d, dtype=F64) / math.sqrt(d)
    q += 2 * u
    k[:, :, 2] += 5 * u  # key 2 draws much attention from every query: a sink
    return q, k, v


def edited(q, k, v, edit, **params):
    with hooks.attention_hooks(edits=[edit]) as hk:
        out = attnzoo.softmax_attention(q, k, v, **params)
    return out, hk.records[0].weights


def plain_probs(q, k, causal=False):
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool).triu(1), float("-inf"))
    return torch.softmax(s, -1)


@pytest.mark.parametrize("causal", [False, True])
def test_act_sink_calibration_follows_the_formula(causal):
    q, k, v = sink_qkv()
    out, w = edited(q, k, v, calibrate_sinks([2, 5], keep=0.4, heads=[0, 2]), causal=causal)
    a = plain_probs(q, k, causal)
    expected = a.clone()
    for bi in range(2):
        for h in (0, 2):
            for i in range(10):
                row = a[bi, h, i]
                removed = 0.6 * (row[2] + row[5])
                others = [j for j in range(10) if j not in (2, 5)]
                rest = sum(row[j] for j in others)
                for j in others:
                    expected[bi, h, i, j] = row[j] + removed * row[j] / rest
                expected[bi, h, i, 2], expected[bi, h, i, 5] = 0.4 * row[2], 0.4 * row[5]
    torch.testing.assert_close(w, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 3, 10, dtype=F64))
    torch.testing.assert_close(out, expected @ v)
    torch.testing.assert_close(w[:, 1], a[:, 1])  # head 1 untouched


def test_act_finds_sinks_by_threshold_and_keeps_the_first_token():
    q, k, v = sink_qkv()
    k[:, :, 0] += 5 * torch.ones(8, dtype=F64) / math.sqrt(8)  # the first token is a sink too; ACT leaves it alone
    a = plain_probs(q, k)
    _, w = edited(q, k, v, calibrate_sinks(keep=0.5, threshold=1.5))
    found = a.mean(-2) > 1.5 / 10  # (B, H, Nk): ACT's alpha / N on the head's average row
    assert found[..., 2].all() and found[..., 0].all()
    for bi in range(2):
        for h in range(3):
            sinks = [j for j in range(1, 10) if found[bi, h, j]]
            others = [j for j in range(10) if j not in sinks]
            for i in range(10):
                row = a[bi, h, i]
                removed = 0.5 * row[sinks].sum()
                torch.testing.assert_close(w[bi, h, i, sinks], 0.5 * row[sinks])
                torch.testing.assert_close(w[bi, h, i, others], row[others] + removed * row[others] / row[others].sum())
    assert (w[..., 0] > a[..., 0]).all()  # a receiver, never a donor
    torch.testing.assert_close(w.sum(-1), torch.ones_like(w.sum(-1)))


def test_var_moves_sink_mass_onto_the_image_tokens_in_image_centric_heads():
    q, k, v = sink_qkv(n=12)
    image = torch.zeros(12, dtype=torch.bool)
    image[2:9] = True  # tokens 2..8 are the image; 2 and 3 its visual sinks
    a = plain_probs(q, k)
    _, w = edited(q, k, v, redistribute_visual_sinks(image, [2, 3], p=0.6, rho=0.3))
    rest = list(range(4, 9))
    for bi in range(2):
        for h in range(3):
            ratios = [float(a[bi, h, i, rest].sum() / a[bi, h, i, 2:9].sum()) for i in range(12)]
            centric = sum(ratios) / 12 >= 0.3
            for i in range(12):
                row, new = a[bi, h, i], w[bi, h, i]
                if not centric:
                    torch.testing.assert_close(new, row)
                    continue
                omega = 0.6 * (row[2] + row[3])
                torch.testing.assert_close(new[2:4], 0.4 * row[2:4])
                torch.testing.assert_close(new[rest], row[rest] + omega * row[rest] / row[rest].sum())
                torch.testing.assert_close(new[[0, 1, 9, 10, 11]], row[[0, 1, 9, 10, 11]])  # text tokens untouched
    torch.testing.assert_close(w.sum(-1), torch.ones_like(w.sum(-1)))


def test_var_forced_heads_and_modulation():
    q, k, v = sink_qkv()
    a = plain_probs(q, k)
    _, w = edited(q, k, v, redistribute_visual_sinks([2, 3, 4, 5], [2], p=1.0, heads=1))
    torch.testing.assert_close(w[:, [0, 2]], a[:, [0, 2]])
    assert (w[:, 1, :, 2] == 0).all()
    out, w = edited(q, k, v, modulate_heads([1.0, 2.0, 0.5], keys=[4, 5, 6]))
    factor = torch.ones(3, 10, dtype=F64)
    factor[1, 4:7], factor[2, 4:7] = 2.0, 0.5
    expected = a * factor[None, :, None]
    expected = expected / expected.sum(-1, keepdim=True)
    torch.testing.assert_close(w, expected)
    torch.testing.assert_close(out, expected @ v)
    _, w = edited(q, k, v, modulate_heads({0: 3.0}, keys=[1]))
    torch.testing.assert_close(w[:, 1:], a[:, 1:])
    assert (w[:, 0, :, 1] > a[:, 0, :, 1]).all()


def test_calibration_edits_refuse_bad_values_and_keep_gradients():
    with pytest.raises(ParameterError, match="keep"):
        calibrate_sinks([1], keep=1.5)
    with pytest.raises(ParameterError, match="factors"):
        modulate_heads([-1.0])
    q, k, v = (x.requires_grad_() for x in sink_qkv())
    out, _ = edited(q, k, v, calibrate_sinks([2]))
    out.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


# ============================================================================================
# V7: URPE and RCMHA
# ============================================================================================
from attnzoo.nn.variants.relative import RelativeConvAttention, UniversalRPEAttention  # noqa: E402


def heads_of(t, h):
    n, c = t.shape
    return t.view(n, h, c // h)


def urpe_loop(layer, x, causal=False, pad=None):
    h, d, D = layer.num_heads, layer.head_dim, layer.max_distance
    b, n, c = x.shape
    out = torch.zeros(b, n, c, dtype=x.dtype)
    for bi in range(b):
        qkv = x[bi] @ layer.qkv.weight.T
        q, k, v = (heads_of(t, h) for t in qkv.split(c, -1))
        for hi in range(h):
            for i in range(n):
                keys = [j for j in range(n) if (not causal or j <= i) and (pad is None or not pad[bi, j])]
                off = [min(max(j - i, -D), D) + D for j in keys]
                s = torch.stack([q[i, hi] @ k[j, hi] / math.sqrt(d) + layer.rel_bias[hi, o] for j, o in zip(keys, off)])
                p = torch.softmax(s, 0) * torch.stack([layer.toeplitz[hi, o] for o in off])
                if layer.renormalize:
                    p = p / p.sum()
                out[bi, i, hi * d:(hi + 1) * d] = sum(pj * v[j, hi] for pj, j in zip(p, keys))
    return out @ layer.proj.weight.T + layer.proj.bias


@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize("causal", [False, True])
def test_urpe_equals_the_written_out_loop(renormalize, causal):
    torch.manual_seed(0)
    layer = UniversalRPEAttention(16, num_heads=2, max_distance=3, renormalize=renormalize).double()
    with torch.no_grad():
        layer.rel_bias.normal_()
        layer.toeplitz.uniform_(0.2, 2.0)
    x = torch.randn(2, 9, 16, generator=gen(2), dtype=F64)
    pad = torch.zeros(2, 9, dtype=torch.bool)
    pad[1, -2:] = True
    torch.testing.assert_close(layer(x, causal=causal, key_padding_mask=pad), urpe_loop(layer, x, causal, pad), rtol=1e-10, atol=1e-10)


def test_urpe_toeplitz_structure_breaks_row_stochasticity():
    torch.manual_seed(0)
    layer = UniversalRPEAttention(16, num_heads=2, max_distance=4).double()
    x = torch.randn(1, 8, 16, generator=gen(3), dtype=F64)
    with torch.no_grad():
        p = layer.attention_matrix(x)  # C = 1 at init: plain RPE attention
        torch.testing.assert_close(p.sum(-1), torch.ones(1, 2, 8, dtype=F64))
        layer.toeplitz.uniform_(0.2, 2.0)
        w = layer.attention_matrix(x)
    assert (w.sum(-1) - 1).abs().max() > 1e-3  # the paper's point: no longer right-stochastic
    c = layer.toeplitz.detach()
    for h in range(2):
        for i in range(8):
            for j in range(8):  # w = P . C with C_ij = c_{j - i}: Toeplitz
                assert abs(float(w[0, h, i, j] - p[0, h, i, j] * c[h, min(max(j - i, -4), 4) + 4])) < 1e-12


def rcmha_loop(layer, x, causal=False):
    h, d, D, kk = layer.num_heads, layer.head_dim, layer.max_distance, layer.kernel_size
    b, n, c = x.shape
    left = kk - 1 if causal else (kk - 1) // 2
    out = torch.zeros(b, n, c, dtype=x.dtype)
    for bi in range(b):
        y = x[bi] @ layer.qkv.weight.T  # (n, 3c)
        conv = torch.zeros_like(y)
        for t in range(n):
            for m in range(kk):
                src = t + m - left
                if 0 <= src < n:
                    conv[t] += layer.dwconv[:, 0, m] * y[src]
        q, k, v = (heads_of(t, h) for t in conv.split(c, -1))
        for hi in range(h):
            for i in range(n):
                keys = [j for j in range(n) if not causal or j <= i]
                s = []
                for j in keys:
                    r = layer.rel[min(max(i - j, -D), D) + D, hi]
                    s.append(((q[i, hi] + layer.u[hi]) @ k[j, hi] + (q[i, hi] + layer.w[hi]) @ r) / math.sqrt(d))
                p = torch.softmax(torch.stack(s), 0)
                out[bi, i, hi * d:(hi + 1) * d] = sum(pj * v[j, hi] for pj, j in zip(p, keys))
    return out @ layer.proj.weight.T + layer.proj.bias


@pytest.mark.parametrize("causal", [False, True])
def test_rcmha_equals_the_written_out_loop(causal):
    torch.manual_seed(0)
    layer = RelativeConvAttention(16, num_heads=2, kernel_size=3, max_distance=3).double()
    with torch.no_grad():
        layer.u.normal_()
        layer.w.normal_()
        layer.rel.normal_()
    x = torch.randn(2, 8, 16, generator=gen(4), dtype=F64)
    torch.testing.assert_close(layer(x, causal=causal), rcmha_loop(layer, x, causal), rtol=1e-10, atol=1e-10)


def test_rcmha_causal_output_ignores_the_future():
    torch.manual_seed(0)
    layer = RelativeConvAttention(16, num_heads=2, kernel_size=5).double()
    x = torch.randn(1, 10, 16, generator=gen(5), dtype=F64)
    y = x.clone()
    y[:, 6:] = torch.randn(1, 4, 16, generator=gen(6), dtype=F64)
    torch.testing.assert_close(layer(x, causal=True)[:, :6], layer(y, causal=True)[:, :6])
    with pytest.raises(ParameterError, match="kernel_size"):
        RelativeConvAttention(16, num_heads=2, kernel_size=4)


# ============================================================================================
# V10: GIN attention, TAP, ADL
# ============================================================================================
from attnzoo.nn.variants.graph import GINAttention, TokenAwareAttention, TokenAwarePooling, attention_diversification_loss  # noqa: E402


def gin_loop(layer, x, causal=False, threshold=None):
    h, d = layer.num_heads, layer.head_dim
    b, n, c = x.shape
    out = torch.zeros(b, n, c, dtype=x.dtype)
    for bi in range(b):
        qkv = x[bi] @ layer.qkv.weight.T
        q, k, v = (heads_of(t, h) for t in qkv.split(c, -1))
        for hi in range(h):
            for i in range(n):
                keys = [j for j in range(n) if not causal or j <= i]
                a = torch.softmax(torch.stack([q[i, hi] @ k[j, hi] / math.sqrt(d) for j in keys]), 0)
                node = (1 + layer.eps[hi]) * v[i, hi]
                for aj, j in zip(a, keys):
                    if threshold is None or aj > threshold:
                        node = node + aj * v[j, hi]
                hidden = torch.nn.functional.gelu(node @ layer.mlp[0].weight.T + layer.mlp[0].bias)
                out[bi, i, hi * d:(hi + 1) * d] = hidden @ layer.mlp[2].weight.T + layer.mlp[2].bias
    return out @ layer.proj.weight.T + layer.proj.bias


@pytest.mark.parametrize("threshold", [None, 0.1])
@pytest.mark.parametrize("causal", [False, True])
def test_gin_attention_equals_the_written_out_loop(threshold, causal):
    torch.manual_seed(0)
    layer = GINAttention(16, num_heads=2, threshold=threshold).double()
    with torch.no_grad():
        layer.eps.normal_()
    x = torch.randn(2, 7, 16, generator=gen(7), dtype=F64)
    torch.testing.assert_close(layer(x, causal=causal), gin_loop(layer, x, causal, threshold), rtol=1e-10, atol=1e-10)


def test_gin_attention_with_eps_minus_one_and_no_mlp_is_softmax_attention():
    torch.manual_seed(0)
    layer = GINAttention(16, num_heads=2).double()
    layer.mlp = torch.nn.Identity()
    with torch.no_grad():
        layer.eps.fill_(-1.0)
    x = torch.randn(2, 7, 16, generator=gen(8), dtype=F64)
    q, k, v = (t.view(2, 7, 2, 8).transpose(1, 2) for t in (x @ layer.qkv.weight.T).split(16, -1))
    mha = (torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), -1) @ v).transpose(1, 2).reshape(2, 7, 16)
    torch.testing.assert_close(layer(x), mha @ layer.proj.weight.T + layer.proj.bias)


def tap_loop(tap, x):
    """Dilated 3x3 means (zeros outside, divided by 9) mixed by the predictor's softmax, BN in eval form."""
    conv1, bn, conv2 = tap.predictor
    g = x.permute(0, 3, 1, 2)
    y = torch.nn.functional.conv2d(g, conv1.weight, padding=1)
    y = (y - bn.running_mean[None, :, None, None]) / torch.sqrt(bn.running_var[None, :, None, None] + bn.eps) * bn.weight[None, :, None, None] + bn.bias[None, :, None, None]
    logits = torch.nn.functional.conv2d(y, conv2.weight, padding=1)
    w = torch.softmax(logits / tap.temperature, 1)  # (B, K, H, W)
    b, hh, ww, c = x.shape
    out = torch.zeros_like(x)
    for bi in range(b):
        for r in range(hh):
            for col in range(ww):
                acc = w[bi, 0, r, col] * x[bi, r, col]
                for d in range(1, tap.num_scales):
                    total = torch.zeros(c, dtype=x.dtype)
                    for dr in (-1, 0, 1):
                        for dc in (-1, 0, 1):
                            rr, cc = r + d * dr, col + d * dc
                            if 0 <= rr < hh and 0 <= cc < ww:
                                total = total + x[bi, rr, cc]
                    acc = acc + w[bi, d, r, col] * total / 9
                out[bi, r, col] = acc
    return out


def test_token_aware_pooling_equals_the_written_out_loop():
    torch.manual_seed(0)
    tap = TokenAwarePooling(6, num_scales=3, temperature=0.7).double().eval()
    with torch.no_grad():
        tap.predictor[1].running_mean.normal_()
        tap.predictor[1].running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, 5, 6, 6, generator=gen(9), dtype=F64)
    torch.testing.assert_close(tap(x), tap_loop(tap, x), rtol=1e-10, atol=1e-10)
    w = tap.scale_weights(x)
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 5, 6, dtype=F64))


def test_token_aware_attention_paths_agree_and_adl_matches_its_formula():
    torch.manual_seed(0)
    layer = TokenAwareAttention(16, num_heads=2).double().eval()
    x = torch.randn(2, 4, 5, 16, generator=gen(10), dtype=F64)
    with torch.no_grad():
        y, attn = layer(x, return_attention=True)
        torch.testing.assert_close(y, layer(x))
    assert attn.shape == (2, 2, 20, 20)
    loss = attention_diversification_loss([attn, attn[:, :, :10, :10].softmax(-1)], threshold=2.0)
    expected = 0.0
    for a in (attn, attn[:, :, :10, :10].softmax(-1)):
        n = a.shape[-1]
        tau = 2.0 / n
        layer_sum, count = 0.0, 0
        for bi in range(2):
            mean_heads = a[bi].mean(0)
            avg = mean_heads.mean(0)
            avg = avg * (avg > tau)
            for i in range(n):
                row = mean_heads[i] * (mean_heads[i] > tau)
                layer_sum += float(row @ avg / max(float(row.norm() * avg.norm()), 1e-8))
                count += 1
        expected += layer_sum / count
    assert abs(float(loss) - expected / 2) < 1e-10
    uniform = torch.full((1, 1, 8, 8), 1 / 8, dtype=F64)
    assert abs(float(attention_diversification_loss(uniform, threshold=0.5)) - 1.0) < 1e-12  # all rows alike: maximal
    with pytest.raises(AttnZooError, match="shape"):
        attention_diversification_loss(torch.zeros(2, 3, 4))


# ============================================================================================
# V5: GAAM
# ============================================================================================
from attnzoo.nn.variants.gaussian import GaussianAdaptiveAttention  # noqa: E402


def gaam_loop(layer, x):
    """Per head and per slice along the axis: the official arithmetic (MHGAAM.py / PyPI) written out."""
    b, n, c = x.shape
    h, g = layer.num_heads, layer.num_gaussians
    d = c // h
    out = torch.zeros_like(x)
    for bi in range(b):
        for hi in range(h):
            block = x[bi, :, hi * d:(hi + 1) * d]  # (n, d)
            slices = [block[t] for t in range(n)] if layer.norm_axis == "channels" else [block[:, j] for j in range(d)]
            for s_i, vec in enumerate(slices):
                mu, var = vec.mean(), vec.var() + layer.eps
                if layer.combine == "mixture":
                    w = torch.softmax(layer.mixture_logits[hi], 0)
                    m = sum(w[gi] * torch.exp(-((vec - (mu + layer.mean_offsets[hi, gi])) / var.sqrt()) ** 2 / (2 * layer.c[hi, gi] ** 2)) for gi in range(g))
                else:
                    m = torch.ones_like(vec)
                    for gi in range(g):
                        m = m * torch.exp(-((vec - (mu + layer.mean_offsets[hi, gi])) / var.sqrt()) ** 2 / (2 * layer.c[hi, gi] ** 2))
                y = vec * m / m.sum().clamp(min=layer.eps)
                if layer.norm_axis == "channels":
                    out[bi, s_i, hi * d:(hi + 1) * d] = y
                else:
                    out[bi, :, hi * d + s_i] = y
    return out


@pytest.mark.parametrize("norm_axis", ["channels", "tokens"])
@pytest.mark.parametrize("combine", ["mixture", "product"])
def test_gaam_equals_the_written_out_loop(norm_axis, combine):
    torch.manual_seed(0)
    layer = GaussianAdaptiveAttention(12, num_heads=3, num_gaussians=3, norm_axis=norm_axis, combine=combine).double()
    with torch.no_grad():
        layer.mean_offsets.normal_(0, 0.5)
        layer.c.uniform_(0.5, 3.0)
        if layer.mixture_logits is not None:
            layer.mixture_logits.normal_()
    x = torch.randn(2, 6, 12, generator=gen(11), dtype=F64)
    torch.testing.assert_close(layer(x), gaam_loop(layer, x), rtol=1e-10, atol=1e-10)


def test_gaam_weights_are_a_density_along_the_axis_and_peak_at_the_mean():
    layer = GaussianAdaptiveAttention(8, num_heads=1, num_gaussians=1).double()
    x = torch.randn(3, 5, 8, generator=gen(12), dtype=F64)
    w = layer.weights(x)
    torch.testing.assert_close(w.sum(-1), torch.ones(3, 5, dtype=F64))
    assert (w > 0).all()
    closest = (x - x.mean(-1, keepdim=True)).abs().argmin(-1)  # offset 0: the entry nearest the mean weighs most
    assert torch.equal(w.argmax(-1), closest)
    with pytest.raises(ParameterError, match="norm_axis"):
        GaussianAdaptiveAttention(8, norm_axis="rows")


# ============================================================================================
# X5: global-local and pair-wise cross-attention
# ============================================================================================
from attnzoo.nn.cross.global_local import GlobalLocalCrossAttention, PairwiseCrossAttention, attention_rollout  # noqa: E402


def attend_loop(q, k, v):
    """softmax(q k^T / sqrt(d)) v for one head, row by row."""
    rows = []
    for i in range(q.shape[0]):
        s = torch.stack([q[i] @ k[j] for j in range(k.shape[0])]) / math.sqrt(q.shape[1])
        rows.append(torch.softmax(s, 0) @ v)
    return torch.stack(rows)


def project(layer, x):
    c = layer.dim
    return (t.view(x.shape[0], layer.num_heads, layer.head_dim).transpose(0, 1) for t in (x @ layer.qkv.weight.T + layer.qkv.bias).split(c, -1))


def test_attention_rollout_follows_eq_2():
    maps = [torch.softmax(torch.randn(2, 3, 5, 5, generator=gen(20 + i), dtype=F64), -1) for i in range(3)]
    expected = torch.stack([torch.eye(5, dtype=F64)] * 2)
    for a in maps:
        step = torch.zeros(2, 5, 5, dtype=F64)
        for h in range(3):
            step += a[:, h] / 3
        expected = (0.5 * step + 0.5 * torch.eye(5, dtype=F64)) @ expected
    torch.testing.assert_close(attention_rollout(maps), expected)
    torch.testing.assert_close(attention_rollout(maps).sum(-1), torch.ones(2, 5, dtype=F64))


@pytest.mark.parametrize("given_rollout", [False, True])
def test_glca_equals_the_written_out_selection_and_cross_attention(given_rollout):
    torch.manual_seed(0)
    layer = GlobalLocalCrossAttention(16, num_heads=2, top_ratio=0.3).double()
    x = torch.randn(2, 11, 16, generator=gen(13), dtype=F64)
    rollout = attention_rollout([torch.softmax(torch.randn(2, 2, 11, 11, generator=gen(14), dtype=F64), -1)]) if given_rollout else None
    out, chosen = layer(x, rollout=rollout, return_indices=True)
    r = 3  # floor(0.3 * 10 patches)
    assert out.shape == (2, 1 + r, 16)
    for bi in range(2):
        q, k, v = project(layer, x[bi])
        if given_rollout:
            score = rollout[bi, 0]
        else:
            cls = sum(torch.softmax(torch.stack([q[h, 0] @ k[h, j] for j in range(11)]) / math.sqrt(8), 0) for h in range(2)) / 2
            score = 0.5 * cls + 0.5 * torch.eye(11, dtype=F64)[0]
        ranked = sorted(range(1, 11), key=lambda j: -float(score[j].detach()))[:r]
        assert chosen[bi].tolist() == sorted(ranked)
        rows = [0] + sorted(ranked)
        heads = [attend_loop(q[h, rows], k[h], v[h]) for h in range(2)]
        expected = torch.cat(heads, -1) @ layer.proj.weight.T + layer.proj.bias
        torch.testing.assert_close(out[bi], expected, rtol=1e-10, atol=1e-10)


def test_glca_with_every_token_selected_is_self_attention():
    torch.manual_seed(0)
    layer = GlobalLocalCrossAttention(16, num_heads=2, top_ratio=1.0).double()
    x = torch.randn(2, 9, 16, generator=gen(15), dtype=F64)
    for bi in range(2):
        q, k, v = project(layer, x[bi])
        expected = torch.cat([attend_loop(q[h], k[h], v[h]) for h in range(2)], -1) @ layer.proj.weight.T + layer.proj.bias
        torch.testing.assert_close(layer(x)[bi], expected)
    with pytest.raises(ParameterError, match="top_ratio"):
        GlobalLocalCrossAttention(16, num_heads=2, top_ratio=0.0)


def test_pwca_attends_to_both_images_and_reduces_to_self_attention_on_a_copy():
    torch.manual_seed(0)
    layer = PairwiseCrossAttention(16, num_heads=2).double()
    x1 = torch.randn(2, 7, 16, generator=gen(16), dtype=F64)
    x2 = torch.randn(2, 5, 16, generator=gen(17), dtype=F64)
    out = layer(x1, x2)
    for bi in range(2):
        q1, k1, v1 = project(layer, x1[bi])
        _, k2, v2 = project(layer, x2[bi])
        heads = [attend_loop(q1[h], torch.cat([k1[h], k2[h]]), torch.cat([v1[h], v2[h]])) for h in range(2)]
        torch.testing.assert_close(out[bi], torch.cat(heads, -1) @ layer.proj.weight.T + layer.proj.bias, rtol=1e-10, atol=1e-10)
        self_heads = [attend_loop(q1[h], k1[h], v1[h]) for h in range(2)]
        torch.testing.assert_close(layer(x1, x1)[bi], torch.cat(self_heads, -1) @ layer.proj.weight.T + layer.proj.bias)
    with pytest.raises(AttnZooError, match="x2"):
        layer(x1, x2[0])
