"""Titans' neural memory (catalog F11): the recurrence against Eq. 12-15 written out with autograd
gradients, the chunked form (Sec. 3.2) against chunk size 1 and a written-out per-chunk loop,
decoding in any split against the full forward, and TitansMAG against Eq. 26-28 written out."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from attnzoo.errors import AttnZooError, ParameterError, ShapeError
from attnzoo.nn import NeuralMemory, TitansMAC, TitansMAG
from attnzoo.nn.linear.titans import neural_memory_chunked, neural_memory_recurrent

DT = torch.float64


# ---------------------------------------------------------------------------------------------
# oracles, written from the paper (no call into the module's internals)
# ---------------------------------------------------------------------------------------------
def mlp(weights, z):
    """M(z): bias-free layers (B, H, out, in), SiLU between them."""
    for i, w in enumerate(weights):
        z = torch.einsum("bhoi,bhti->bhto", w, z)
        if i < len(weights) - 1:
            z = z * torch.sigmoid(z)
    return z


def loss_grad(weights, k, v):
    """grad_M ||M(k) - v||^2 (Eq. 12) for one token per (batch, head), by autograd."""
    with torch.enable_grad():
        leaves = [w.detach().requires_grad_() for w in weights]
        loss = ((mlp(leaves, k) - v) ** 2).sum()  # separable over (batch, head): the sum's gradient is each one's
        return list(torch.autograd.grad(loss, leaves))


def per_chunk_loop(q, k, v, lr, mom, dec, weights, chunk, surprise=None):
    """Sec. 3.2 written out: inside each chunk every gradient is taken at the chunk's starting
    weights; then Eq. 14, Eq. 13 and the read-out y_t = M_t(q_t) (Eq. 15) token by token."""
    w = [x.clone() for x in weights]
    s = [torch.zeros_like(x) for x in weights] if surprise is None else list(surprise)
    out = []
    n = q.shape[2]
    for t0 in range(0, n, chunk):
        start = [x.clone() for x in w]
        for t in range(t0, min(t0 + chunk, n)):
            u = loss_grad(start, k[:, :, t : t + 1], v[:, :, t : t + 1])
            th, et, al = (g[:, :, t, None, None] for g in (lr, mom, dec))
            s = [et * si - th * ui for si, ui in zip(s, u)]  # Eq. 14
            w = [(1 - al) * wi + si for wi, si in zip(w, s)]  # Eq. 13
            out.append(mlp(w, q[:, :, t : t + 1]))  # Eq. 15
    return torch.cat(out, dim=2), w, s


def problem(depth=2, b=2, h=3, n=11, d=4, hidden=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k = (F.normalize(torch.randn(b, h, n, d, generator=gen, dtype=DT), dim=-1) for _ in range(2))
    v = torch.randn(b, h, n, d, generator=gen, dtype=DT)
    lr = 0.3 * torch.rand(b, h, n, generator=gen, dtype=DT)
    mom, dec = (torch.rand(b, h, n, generator=gen, dtype=DT) for _ in range(2))
    widths = [d] + [hidden] * (depth - 1) + [d]
    weights = [torch.randn(b, h, widths[i + 1], widths[i], generator=gen, dtype=DT) * widths[i] ** -0.5 for i in range(depth)]
    return q, k, v, lr, mom, dec, weights


def close(a, b, **kw):
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, **kw)


# ---------------------------------------------------------------------------------------------
# the memory update
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("depth", [1, 2, 3])
def test_recurrence_is_eq_12_to_15_with_autograd_gradients(depth):
    q, k, v, lr, mom, dec, w = problem(depth)
    y, mw, ms = neural_memory_recurrent(q, k, v, lr, mom, dec, w)
    want_y, want_w, want_s = per_chunk_loop(q, k, v, lr, mom, dec, w, chunk=1)  # chunk 1: the token recurrence
    close(y, want_y)
    for a, b in zip(mw + ms, want_w + want_s):
        close(a, b)


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_chunk_size_one_equals_the_recurrence(depth):
    q, k, v, lr, mom, dec, w = problem(depth)
    rec = neural_memory_recurrent(q, k, v, lr, mom, dec, w)
    chk = neural_memory_chunked(q, k, v, lr, mom, dec, w, chunk_size=1)
    close(chk[0], rec[0])
    for a, b in zip(chk[1] + chk[2], rec[1] + rec[2]):
        close(a, b)


@pytest.mark.parametrize("depth,chunk", [(1, 3), (2, 4), (2, 11), (3, 5), (2, 16)])
def test_chunked_form_equals_a_written_out_per_chunk_loop(depth, chunk):
    q, k, v, lr, mom, dec, w = problem(depth)  # N = 11: the last chunk partial unless chunk divides it
    y, mw, ms = neural_memory_chunked(q, k, v, lr, mom, dec, w, chunk_size=chunk)
    want_y, want_w, want_s = per_chunk_loop(q, k, v, lr, mom, dec, w, chunk)
    close(y, want_y)
    for a, b in zip(mw + ms, want_w + want_s):
        close(a, b)


def test_linear_memory_without_momentum_and_decay_is_the_delta_rule():
    # depth 1, eta = alpha = 0: M_t = M_{t-1} - theta_t 2 (M_{t-1} k_t - v_t) k_t^T
    q, k, v, lr, mom, dec, w = problem(depth=1)
    zero = torch.zeros_like(mom)
    y = neural_memory_chunked(q, k, v, lr, zero, zero, w, chunk_size=4)[0]
    m = w[0].clone()
    want = []
    for t in range(q.shape[2]):
        kt, vt = k[:, :, t], v[:, :, t]
        err = torch.einsum("bhoi,bhi->bho", m, kt) - vt
        m_next = m - 2 * lr[:, :, t, None, None] * torch.einsum("bho,bhi->bhoi", err, kt)
        want.append(torch.einsum("bhoi,bhi->bho", m_next, q[:, :, t]))
        m = m_next
    # eta = 0 makes S_t the current gradient only, but the chunk takes it at the chunk start:
    # compare with chunk size 1, and the chunked form with its own loop above
    y1 = neural_memory_chunked(q, k, v, lr, zero, zero, w, chunk_size=1)[0]
    close(y1, torch.stack(want, dim=2))
    assert (y - y1).abs().max() > 1e-6  # a chunk of 4 really is mini-batch descent


def test_gradients_through_the_chunked_form():
    q, k, v, lr, mom, dec, w = problem(depth=2, b=1, h=1, n=6, d=3, hidden=4)
    args = [t.requires_grad_() for t in (q, k, v, lr, mom, dec, *w)]

    def fn(q, k, v, lr, mom, dec, w0, w1):
        return neural_memory_chunked(q, k, v, lr, mom, dec, [w0, w1], chunk_size=4)[0]

    assert torch.autograd.gradcheck(fn, args, fast_mode=True)


def test_strong_forgetting_and_tiny_momentum_stay_finite():
    q, k, v, lr, mom, dec, w = problem(depth=2, n=40)
    dec = torch.ones_like(dec)  # alpha = 1: forget everything each token
    mom = torch.zeros_like(mom)
    y = neural_memory_chunked(q, k, v, lr, mom, dec, w, chunk_size=16)[0]
    want = per_chunk_loop(q, k, v, lr, mom, dec, w, 16)[0]
    assert torch.isfinite(y).all()
    close(y, want)


# ---------------------------------------------------------------------------------------------
# the layers: decoding in any split, MAG written out
# ---------------------------------------------------------------------------------------------
SPLITS = [[1] * 13, [5, 8], [3, 1, 4, 1, 4], [13]]


def decode(module, x, sizes):
    state = module.init_state(x.shape[0])
    outs, t = [], 0
    for n in sizes:
        y, state = module.step(x[:, t : t + n], state)
        outs.append(y)
        t += n
    return torch.cat(outs, dim=1), state


@pytest.mark.parametrize("sizes", SPLITS, ids=["tokens", "5-8", "mixed", "whole"])
@pytest.mark.parametrize("cls", [NeuralMemory, TitansMAG, TitansMAC])
def test_decoding_in_any_split_equals_the_forward(cls, sizes):
    torch.manual_seed(0)
    kw = {
        NeuralMemory: dict(chunk_size=4),
        TitansMAG: dict(window=3, num_persistent=2, chunk_size=4),
        TitansMAC: dict(segment_len=4, num_persistent=2),
    }[cls]
    module = cls(16, 2, **kw).to(DT)
    x = torch.randn(2, 13, 16, dtype=DT)
    with torch.no_grad():
        full = module(x)
        got, state = decode(module, x, sizes)
    close(got, full)
    assert state.seen == 13 + (2 if cls is TitansMAG else 0)


def test_state_is_a_value_cloneable_and_bounded():
    torch.manual_seed(0)
    module = TitansMAG(16, 2, window=3, num_persistent=2, chunk_size=4).to(DT)
    x = torch.randn(1, 30, 16, dtype=DT)
    with torch.no_grad():
        _, state = decode(module, x[:, :10], [10])
        copy = state.clone()
        assert copy.nbytes == state.nbytes and copy.nbytes > 0
        pairs = zip(copy.tensors().values(), state.tensors().values())
        assert all(a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr() for a, b in pairs)
        y1, s1 = module.step(x[:, 10:11], state)
        y2, _ = module.step(x[:, 10:11], state)  # the same state stepped twice: a branch, unchanged
        y3, _ = module.step(x[:, 10:11], copy)
        close(y1, y2)
        close(y1, y3)
        _, long = decode(module, x, [1] * 30)
    assert long.attn_k.shape[2] == 2 + 3  # persistent + window, whatever the length
    assert long.pending_k is None or long.pending_k.shape[2] < 4
    assert long.nbytes <= state.nbytes + 4 * 16 * 8 * 4  # at most a chunk's pending tokens more


def heads_of(t, h):
    b, n, c = t.shape
    return t.view(b, n, h, c // h).transpose(1, 2)


def merged(t):
    b, h, n, d = t.shape
    return t.transpose(1, 2).reshape(b, n, h * d)


def rms(z, weight):
    return z * torch.rsqrt(z.pow(2).mean(-1, keepdim=True) + torch.finfo(z.dtype).eps) * weight


def memory_inputs(mem, z):
    """The memory's q, k, v (SiLU, q and k l2-normalised, Sec. 4.4) and theta, eta, alpha of tokens z."""
    h = mem.num_heads
    q, k, v = (heads_of(F.silu(t), h) for t in (z @ mem.to_qkv.weight.T).chunk(3, dim=-1))
    g = (z @ mem.to_gates.weight.T + mem.to_gates.bias).view(z.shape[0], z.shape[1], 3, h).permute(2, 0, 3, 1)
    return F.normalize(q, dim=-1), F.normalize(k, dim=-1), v, mem.max_lr * torch.sigmoid(g[0]), torch.sigmoid(g[1]), torch.sigmoid(g[2])


def memory_out(mem, r):
    return rms(merged(r), mem.norm.weight) @ mem.out_proj.weight.T


def mag_written_out(m: TitansMAG, x):
    """Eq. 26-28 from the layer's parameters, the memory by the token recurrence (chunk_size=1)."""
    b, n, c = x.shape
    h, d, p, w = m.num_heads, c // m.num_heads, m.num_persistent, m.window
    xt = torch.cat((m.persistent.expand(b, -1, -1), x), dim=1)  # Eq. 26
    L = xt.shape[1]
    q, k, v = (heads_of(t, h) for t in (xt @ m.qkv.weight.T).chunk(3, dim=-1))
    s = q @ k.transpose(-1, -2) * d**-0.5
    i, j = torch.arange(L)[:, None], torch.arange(L)[None, :]
    seen = (j <= i) & ((i - j <= w) | (j < p))  # SW-Attn*: the window plus the persistent tokens
    y = merged(torch.softmax(s.masked_fill(~seen, float("-inf")), -1) @ v)  # Eq. 27
    mem = m.memory
    w0 = [wi.expand(b, *wi.shape) for wi in mem.memory_init]
    r = per_chunk_loop(*memory_inputs(mem, xt), w0, chunk=1)[0]
    o = rms(y, m.attn_norm.weight) * torch.sigmoid(memory_out(mem, r))  # Eq. 28
    return (o @ m.out_proj.weight.T)[:, p:]


def mac_written_out(m: TitansMAC, x):
    """Eq. 21-25 segment by segment; inside a segment the memory's gradients are taken at its start."""
    b, n, c = x.shape
    h, d, p, cs, mem = m.num_heads, c // m.num_heads, m.num_persistent, m.segment_len, m.memory
    w = [wi.expand(b, *wi.shape).clone() for wi in mem.memory_init]
    s = [torch.zeros_like(wi) for wi in w]
    outs = []
    for t0 in range(0, n, cs):
        seg = x[:, t0 : t0 + cs]
        L = seg.shape[1]
        hret = memory_out(mem, mlp(w, memory_inputs(mem, seg)[0]))  # Eq. 21: M*_{t-1}(q_t)
        ctx = torch.cat((m.persistent.expand(b, -1, -1), hret, seg), dim=1)  # Eq. 22
        wq, wk, wv = m.qkv.weight.chunk(3, dim=0)
        q, k, v = heads_of(seg @ wq.T, h), heads_of(ctx @ wk.T, h), heads_of(ctx @ wv.T, h)
        i, j = torch.arange(L)[:, None], torch.arange(L)[None, :]
        seen = torch.cat((torch.ones(L, p, dtype=torch.bool), j <= i, j <= i), dim=1)
        att = (q @ k.transpose(-1, -2) * d**-0.5).masked_fill(~seen, float("-inf"))
        y = merged(torch.softmax(att, -1) @ v)  # Eq. 23
        r, w, s = per_chunk_loop(*memory_inputs(mem, y), w, chunk=cs, surprise=s)  # Eq. 24, one chunk
        o = rms(y, m.attn_norm.weight) * torch.sigmoid(memory_out(mem, r))  # Eq. 25
        outs.append(o @ m.out_proj.weight.T)
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("persistent,segment", [(2, 4), (0, 3), (3, 16)])
def test_mac_is_eq_21_to_25_written_out(persistent, segment):
    torch.manual_seed(3)
    m = TitansMAC(12, 3, segment_len=segment, num_persistent=persistent).to(DT)
    x = torch.randn(2, 11, 12, dtype=DT)
    with torch.no_grad():
        close(m(x), mac_written_out(m, x))


@pytest.mark.parametrize("persistent,window", [(2, 3), (0, 4), (3, 20)])
def test_mag_is_eq_26_to_28_written_out(persistent, window):
    torch.manual_seed(1)
    m = TitansMAG(12, 3, window=window, num_persistent=persistent, chunk_size=1).to(DT)
    x = torch.randn(2, 9, 12, dtype=DT)
    with torch.no_grad():
        close(m(x), mag_written_out(m, x))


def test_neural_memory_recurrent_switch_and_chunk_agree_at_chunk_one():
    torch.manual_seed(2)
    m = NeuralMemory(12, 3, chunk_size=1, depth=3).to(DT)
    x = torch.randn(2, 7, 12, dtype=DT)
    close(m.retrieve(x), m.retrieve(x, recurrent=True))


def test_bad_arguments_are_named():
    with pytest.raises(ParameterError, match="chunk_size"):
        NeuralMemory(16, 2, chunk_size=0)
    with pytest.raises(ParameterError, match="num_heads"):
        TitansMAG(16, 3)
    with pytest.raises(ParameterError, match="num_persistent"):
        TitansMAG(16, 2, num_persistent=-1)
    m = NeuralMemory(16, 2)
    state = m.init_state(2)
    with pytest.raises(ShapeError, match="expected batch"):
        m.step(torch.randn(3, 1, 16), state)
    with pytest.raises(AttnZooError, match="state"):
        m.step(torch.randn(2, 1, 16), None)
