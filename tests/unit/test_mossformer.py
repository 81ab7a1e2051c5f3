"""joint_chunk (catalog F10: MossFormer's joint attention, FLASH's mixed chunk attention) and MossFormerAttention.

External oracle: the official formulation written out step by step from the MossFormer /
MossFormer2 code (modelscope ClearerVoice-Studio, ``FLASH_ShareA_FFConvM``: ``cal_attention``
with its zero padding, padding mask, ``/ g`` scores, relu^2, causal ``triu(1)`` mask, linear
``/ n`` or per-group ``/ g`` exclusive cumsum; ``FFConvM``, ``ScaleNorm``, ``OffsetScale``,
token shift; rotary-embedding-torch's ``rotate_queries_or_keys``), independently of the library.
"""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from attnzoo.errors import ParameterError, ShapeError
from attnzoo.functional.linear.mossformer import JOINT_CHUNK, joint_chunk_attention
from attnzoo.nn.linear.mossformer import MossFormerAttention
from .padding import N as PAD_N, assert_padded_equals_alone, padding
from .qkv import random_qkv as _padding_qkv

D64 = torch.float64


# --------------------------------------------------------------------------------------------
# the official formulation, written out (single head: (b, n, d) tensors, as the official code)
# --------------------------------------------------------------------------------------------
def official_cal_attention(quad_q, lin_q, quad_k, lin_k, v, u, g, causal):
    """FLASH_ShareA_FFConvM.cal_attention: pad to a multiple of g, group, relu^2 inside, linear across."""
    b, n = quad_q.shape[0], quad_q.shape[-2]
    padding = (g - n % g) % g
    mask = None
    if padding > 0:
        quad_q, quad_k, lin_q, lin_k, v, u = (F.pad(t, (0, 0, 0, padding), value=0.0) for t in (quad_q, quad_k, lin_q, lin_k, v, u))
        mask = F.pad(torch.ones((b, n), dtype=torch.bool), (0, padding), value=False)
    quad_q, quad_k, lin_q, lin_k, v, u = (t.reshape(b, -1, g, t.shape[-1]) for t in (quad_q, quad_k, lin_q, lin_k, v, u))
    if mask is not None:
        mask = mask.reshape(b, -1, 1, g)
    sim = torch.einsum("...id,...jd->...ij", quad_q, quad_k) / g
    attn = F.relu(sim) ** 2
    if mask is not None:
        attn = attn.masked_fill(~mask, 0.0)
    if causal:
        attn = attn.masked_fill(torch.ones((g, g), dtype=torch.bool).triu(1), 0.0)
    quad_out_v = torch.einsum("...ij,...jd->...id", attn, v)
    quad_out_u = torch.einsum("...ij,...jd->...id", attn, u)
    if causal:
        lin_kv = torch.einsum("bgnd,bgne->bgde", lin_k, v) / g
        lin_kv = F.pad(lin_kv.cumsum(dim=1), (0, 0, 0, 0, 1, -1), value=0.0)
        lin_out_v = torch.einsum("bgde,bgnd->bgne", lin_kv, lin_q)
        lin_ku = torch.einsum("bgnd,bgne->bgde", lin_k, u) / g
        lin_ku = F.pad(lin_ku.cumsum(dim=1), (0, 0, 0, 0, 1, -1), value=0.0)
        lin_out_u = torch.einsum("bgde,bgnd->bgne", lin_ku, lin_q)
    else:
        lin_kv = torch.einsum("bgnd,bgne->bde", lin_k, v) / n
        lin_out_v = torch.einsum("bgnd,bde->bgne", lin_q, lin_kv)
        lin_ku = torch.einsum("bgnd,bgne->bde", lin_k, u) / n
        lin_out_u = torch.einsum("bgnd,bde->bgne", lin_q, lin_ku)
    return tuple(t.reshape(b, -1, t.shape[-1])[:, :n] for t in (quad_out_v + lin_out_v, quad_out_u + lin_out_u))


def official_scale_norm(x, g, eps=1e-5):
    norm = torch.norm(x, dim=-1, keepdim=True) * x.shape[-1] ** -0.5
    return x / norm.clamp(min=eps) * g


def official_ffconvm(x, m, norm):
    """norm -> Linear -> SiLU -> ConvModule (h + depthwise conv, 'same' padding, no bias) -> Dropout (eval: none)."""
    h = official_scale_norm(x, m.norm.g) if norm == "scalenorm" else F.layer_norm(x, x.shape[-1:], m.norm.weight, m.norm.bias)
    h = F.silu(F.linear(h, m.linear.weight, m.linear.bias))
    k = m.conv.weight.shape[-1]
    return h + F.conv1d(h.transpose(1, 2), m.conv.weight, padding=(k - 1) // 2, groups=h.shape[-1]).transpose(1, 2)


def official_rotary(t, rot_dim, theta=10000.0):
    """rotary-embedding-torch: freqs repeated per interleaved pair, t * cos + rotate_half(t) * sin on the first rot_dim dims."""
    freqs = 1.0 / (theta ** (torch.arange(0, rot_dim, 2)[: rot_dim // 2].to(t.dtype) / rot_dim))
    freqs = torch.einsum("i,f->if", torch.arange(t.shape[-2], dtype=t.dtype), freqs).repeat_interleave(2, dim=-1)
    left, right = t[..., :rot_dim], t[..., rot_dim:]
    pairs = left.reshape(*left.shape[:-1], -1, 2)
    rotated_half = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).reshape(left.shape)
    return torch.cat((left * freqs.cos() + rotated_half * freqs.sin(), right), dim=-1)


def official_flash_share_a(x, layer, norm, group_size, rot_dim, causal=False):
    """FLASH_ShareA_FFConvM.forward with rotary_pos_emb = RotaryEmbedding(min(32, query_key_dim)), shift_tokens=True."""
    x_shift, x_pass = x.chunk(2, dim=-1)
    normed_x = torch.cat((F.pad(x_shift, (0, 0, 1, -1), value=0.0), x_pass), dim=-1)
    v, u = official_ffconvm(normed_x, layer.to_hidden, norm).chunk(2, dim=-1)
    qk = official_ffconvm(normed_x, layer.to_qk, norm)
    quad_q, lin_q, quad_k, lin_k = (torch.einsum("...d,hd->...hd", qk, layer.gamma) + layer.beta).unbind(dim=-2)
    quad_q, lin_q, quad_k, lin_k = (official_rotary(t, rot_dim) for t in (quad_q, lin_q, quad_k, lin_k))
    att_v, att_u = official_cal_attention(quad_q, lin_q, quad_k, lin_k, v, u, group_size, causal)
    out = (att_u * v) * torch.sigmoid(att_v * u)
    return x + official_ffconvm(out, layer.to_out, norm)


def _inputs(b=2, hq=4, hkv=2, n=37, d=8, dv=5, dtype=D64, seed=0, requires_grad=False):
    gen = torch.Generator().manual_seed(seed)
    q, lq = (torch.randn(b, hq, n, d, generator=gen, dtype=dtype) for _ in range(2))
    k, lk = (torch.randn(b, hkv, n, d, generator=gen, dtype=dtype) for _ in range(2))
    v = torch.randn(b, hkv, n, dv, generator=gen, dtype=dtype)
    return tuple(t.requires_grad_(requires_grad) for t in (q, k, v, lq, lk))


# --------------------------------------------------------------------------------------------
# the functional form against the official formulation
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
@pytest.mark.parametrize("n, g", [(37, 8), (32, 8), (5, 16), (19, 1), (40, 3)], ids=lambda x: str(x))
@pytest.mark.parametrize("backend", ["chunked", "reference"])
def test_matches_official_cal_attention(backend, n, g, causal):
    q, k, v, lq, lk = _inputs(n=n, hq=2, hkv=2)
    u = torch.randn(v.shape, dtype=D64, generator=torch.Generator().manual_seed(1))
    heads = [official_cal_attention(q[:, h], lq[:, h], k[:, h], lk[:, h], v[:, h], u[:, h], g, causal) for h in range(2)]
    values = torch.cat((v, u), dim=-1)  # one weight matrix for v and u, as the official "shared A"
    out = joint_chunk_attention(q, k, values, linear_q=lq, linear_k=lk, group_size=g, causal=causal, backend=backend)
    want = torch.cat([torch.stack([h[0] for h in heads], 1), torch.stack([h[1] for h in heads], 1)], dim=-1)
    torch.testing.assert_close(out, want, atol=1e-12, rtol=1e-10)


def test_default_linear_operands_are_q_and_k():
    q, k, v, _, _ = _inputs()
    a = joint_chunk_attention(q, k, v, group_size=4, causal=True)
    b = joint_chunk_attention(q, k, v, group_size=4, causal=True, linear_q=q, linear_k=k)
    torch.testing.assert_close(a, b, atol=0, rtol=0)


# --------------------------------------------------------------------------------------------
# chunked == reference (outputs and gradients), decoding == full causal forward
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
@pytest.mark.parametrize("g", [1, 3, 8, 64])
def test_chunked_matches_reference_forward_and_grads(g, causal):
    inputs = _inputs(n=29, requires_grad=True)
    q, k, v, lq, lk = inputs
    weight = torch.randn(2, 4, 29, 5, dtype=D64, generator=torch.Generator().manual_seed(3))
    outs, grads = {}, {}
    for backend in ("chunked", "reference"):
        outs[backend] = joint_chunk_attention(q, k, v, linear_q=lq, linear_k=lk, group_size=g, causal=causal, backend=backend)
        grads[backend] = torch.autograd.grad((outs[backend] * weight).sum(), inputs)
    torch.testing.assert_close(outs["chunked"], outs["reference"], atol=1e-12, rtol=1e-10)
    for name, got, want in zip(("q", "k", "v", "linear_q", "linear_k"), grads["chunked"], grads["reference"]):
        torch.testing.assert_close(got, want, atol=1e-11, rtol=1e-9, msg=lambda m, name=name: f"d{name}: {m}")


def test_half_precision_computes_in_float32():
    q, k, v, lq, lk = _inputs(dtype=torch.float32)
    ref = joint_chunk_attention(q, k, v, linear_q=lq, linear_k=lk, group_size=8, causal=True)
    half = [t.bfloat16() for t in (q, k, v, lq, lk)]
    out = joint_chunk_attention(*half[:3], linear_q=half[3], linear_k=half[4], group_size=8, causal=True)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=0.1, rtol=0.05)


@pytest.mark.parametrize("backend", ["chunked", "reference"])
def test_causal_outputs_ignore_the_future(backend):
    q, k, v, lq, lk = _inputs(n=40)
    out = joint_chunk_attention(q, k, v, linear_q=lq, linear_k=lk, group_size=6, causal=True, backend=backend)
    for last in (0, 5, 6, 17, 38):
        changed = [t.clone() for t in (q, k, v, lq, lk)]
        for t in changed:
            t[:, :, last + 1 :] = torch.randn(t[:, :, last + 1 :].shape, dtype=D64) * 3
        out2 = joint_chunk_attention(*changed[:3], linear_q=changed[3], linear_k=changed[4], group_size=6, causal=True, backend=backend)
        torch.testing.assert_close(out2[:, :, : last + 1], out[:, :, : last + 1], atol=1e-12, rtol=1e-10)
        assert not torch.allclose(out2[:, :, last + 1 :], out[:, :, last + 1 :])


@pytest.mark.parametrize("g", [1, 3, 4, 16])
@pytest.mark.parametrize("seed", range(3))
def test_decoding_matches_full_causal_forward(g, seed):
    q, k, v, lq, lk = _inputs(n=35, seed=seed)
    full = joint_chunk_attention(q, k, v, linear_q=lq, linear_k=lk, group_size=g, causal=True)
    rng = random.Random(seed)
    state = JOINT_CHUNK.init_state(q, k, v, group_size=g, causal=True)
    outs, start = [], 0
    while start < 35:
        part = slice(start, min(35, start + rng.randint(1, 9)))
        out, state = JOINT_CHUNK.step(
            q[:, :, part], k[:, :, part], v[:, :, part], state, group_size=g, causal=True, linear_q=lq[:, :, part], linear_k=lk[:, :, part]
        )
        outs.append(out)
        start = part.stop
    torch.testing.assert_close(torch.cat(outs, dim=2), full, atol=1e-12, rtol=1e-10)
    assert state.seen == 35


def test_state_size_counts_the_largest_state():
    g, n = 8, 23  # 23 = 2 full groups + 7 tokens: g - 1 keys buffered
    q, k, v, lq, lk = _inputs(b=1, hq=1, hkv=1, n=n, d=8, dv=5)
    state = JOINT_CHUNK.init_state(q, k, v, group_size=g, causal=True)
    _, state = JOINT_CHUNK.step(q, k, v, state, group_size=g, causal=True)
    held = sum(t.numel() for t in (state.before, state.current, state.keys, state.values))
    assert held == JOINT_CHUNK.state_size(8, 5, group_size=g) == 2 * 8 * 5 + 7 * (8 + 5)


# --------------------------------------------------------------------------------------------
# bad inputs name the argument
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [0, -3, 2.0, True, "8"])
def test_bad_group_size(bad):
    q, k, v, _, _ = _inputs()
    with pytest.raises(ParameterError, match="group_size") as info:
        joint_chunk_attention(q, k, v, group_size=bad)
    assert info.value.argument == "group_size"


@pytest.mark.parametrize(
    "name, make",
    [
        ("linear_q", lambda q, k: q[:, :, :-1]),  # one token short
        ("linear_q", lambda q, k: q[:, :2]),  # heads of k, not q
        ("linear_q", lambda q, k: q.float()),  # another dtype
        ("linear_k", lambda q, k: q),  # heads of q, not k
        ("linear_k", lambda q, k: k[..., :4]),  # another head dim
    ],
)
def test_bad_linear_operands(name, make):
    q, k, v, _, _ = _inputs()
    with pytest.raises(ParameterError, match=name) as info:
        joint_chunk_attention(q, k, v, **{name: make(q, k)})
    assert info.value.argument == name


def test_cross_attention_and_noncausal_decoding_are_refused():
    q, k, v, _, _ = _inputs()
    with pytest.raises(ShapeError):
        joint_chunk_attention(q, k[:, :, :-2], v[:, :, :-2])
    state = JOINT_CHUNK.init_state(q, k, v)
    with pytest.raises(ParameterError, match="causal") as info:
        JOINT_CHUNK.step(q, k, v, state)
    assert info.value.argument == "causal"


# --------------------------------------------------------------------------------------------
# the module against the official pipeline (same weights)
# --------------------------------------------------------------------------------------------
def _layer(norm="scalenorm", causal=False, backend=None, seed=0):
    torch.manual_seed(seed)
    layer = (
        MossFormerAttention(16, group_size=8, query_key_dim=40, causal=causal, norm=norm, kernel_size=5, backend=backend).double().eval()
    )
    with torch.no_grad():  # away from the init (gamma ~ 0.02, beta = 0, gains 1) so every term matters
        layer.gamma.normal_(0, 0.7)
        layer.beta.normal_(0, 0.3)
        for m in (layer.to_hidden, layer.to_qk, layer.to_out):
            for p in m.norm.parameters():
                p.add_(torch.randn_like(p) * 0.2)
    return layer


@pytest.mark.parametrize("norm", ["scalenorm", "layernorm"])
@pytest.mark.parametrize("n", [37, 16])
def test_module_matches_official_pipeline(norm, n):
    layer = _layer(norm)
    x = torch.randn(2, n, 16, dtype=D64, generator=torch.Generator().manual_seed(5))
    want = official_flash_share_a(x, layer, norm, group_size=8, rot_dim=32)
    torch.testing.assert_close(layer(x), want, atol=1e-12, rtol=1e-10)
    # the attention is not trivial here: its share of the output is not rounding
    assert (want - x).abs().max() > 1e-2


def test_module_backends_agree_and_train():
    x = torch.randn(2, 30, 16, dtype=D64, requires_grad=True)
    fast, ref = _layer(backend="chunked"), _layer(backend="reference")
    y_fast, y_ref = fast(x), ref(x)
    torch.testing.assert_close(y_fast, y_ref, atol=1e-12, rtol=1e-10)
    y_fast.square().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in fast.parameters())


def test_causal_module_ignores_the_future():
    layer = _layer(causal=True)
    x = torch.randn(1, 33, 16, dtype=D64)
    y = layer(x)
    for last in (3, 8, 20):
        x2 = x.clone()
        x2[:, last + 1 :] = torch.randn(x2[:, last + 1 :].shape, dtype=D64)
        torch.testing.assert_close(layer(x2)[:, : last + 1], y[:, : last + 1], atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        (dict(dim=0), "dim"),
        (dict(dim=16, group_size=0), "group_size"),
        (dict(dim=3, expansion_factor=1.0), "expansion_factor"),
        (dict(dim=16, kernel_size=4), "kernel_size"),
        (dict(dim=16, norm="rms"), "norm"),
    ],
)
def test_module_bad_arguments(kwargs, argument):
    with pytest.raises(ParameterError, match=argument) as info:
        MossFormerAttention(**kwargs)
    assert info.value.argument == argument


def test_module_bad_input_shape():
    with pytest.raises(ShapeError, match="x"):
        MossFormerAttention(16, group_size=4)(torch.randn(2, 10, 8))


# --------------------------------------------------------------------------------------------
# key_padding_mask (True = ignore the key): a padded batch equals each sequence alone
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ("reference", "chunked"))
@pytest.mark.parametrize("causal", (False, True), ids=("noncausal", "causal"))
@pytest.mark.parametrize("group_size", (1, 4, 64))
@pytest.mark.parametrize("separate", (False, True), ids=("shared", "linear_qk"))
def test_right_padded_batch_equals_each_sequence_alone(backend, causal, group_size, separate):
    """Pads' values zeroed (no weight in either part), the non-causal 1/N over the real tokens."""
    q, k, v = _padding_qkv(3, 2, PAD_N, PAD_N, 6, 5, seed=3)
    lq, lk, _ = _padding_qkv(3, 2, PAD_N, PAD_N, 6, 5, seed=4)

    if separate:  # the linear operands follow the sequence: run each alone with its own slice
        pad = padding("right")
        out = joint_chunk_attention(q, k, v, group_size=group_size, causal=causal, linear_q=lq, linear_k=lk, key_padding_mask=pad, backend=backend)
        for b, length in enumerate((13, 9, 4)):
            alone = joint_chunk_attention(
                q[b : b + 1, :, :length], k[b : b + 1, :, :length], v[b : b + 1, :, :length], group_size=group_size, causal=causal,
                linear_q=lq[b : b + 1, :, :length], linear_k=lk[b : b + 1, :, :length], backend=backend,
            )
            torch.testing.assert_close(out[b : b + 1, :, :length], alone, atol=1e-10, rtol=1e-8)
        return
    assert_padded_equals_alone(
        lambda q, k, v, **kw: joint_chunk_attention(q, k, v, group_size=group_size, causal=causal, backend=backend, **kw), q, k, v, "right"
    )


@pytest.mark.parametrize("backend", ("reference", "chunked"))
def test_left_padding_is_refused_naming_the_mask(backend):
    """The groups are cut from position 0: pads before a sequence would move its groups."""
    q, k, v = _padding_qkv(3, 2, PAD_N, PAD_N, 6, 5)
    with pytest.raises(ParameterError) as info:
        joint_chunk_attention(q, k, v, group_size=4, key_padding_mask=padding("left"), backend=backend)
    assert info.value.argument == "key_padding_mask" and "right" in str(info.value)


def test_module_passes_the_mask_to_the_joint_attention():
    """The attention takes it (left padding refused there, naming it); the convolutions around it read the pads."""
    module = MossFormerAttention(16, group_size=4, query_key_dim=8, kernel_size=3).eval()
    x = torch.randn(3, PAD_N, 16)
    with pytest.raises(ParameterError) as info:
        module(x, key_padding_mask=padding("left"))
    assert info.value.argument == "key_padding_mask"
    with torch.no_grad():
        assert module(x, key_padding_mask=padding("right")).shape == x.shape
