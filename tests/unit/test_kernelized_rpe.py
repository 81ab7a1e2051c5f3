"""kernelized_rpe (F9): both backends against the paper's formula written out token by token
(Performer features drawn here from the projection, e^(b_(j-i)) weights), fft == reference
forward and gradients (q, k, v and the biases) in float64, causal, cross, feature blocks,
large biases, the float32 error, bad inputs, and the module."""

from __future__ import annotations

import math

import pytest
import torch

import attnzoo
from attnzoo.errors import ParameterError, ShapeError
from attnzoo.functional.linear import kernelized_rpe as krpe
from attnzoo.functional.linear.feature_maps import orthogonal_gaussian
from attnzoo.functional.linear.kernelized_rpe import kernelized_rpe_attention
from attnzoo.nn.linear.kernelized_rpe import KernelizedRPEAttention
from attnzoo.nn.linear.attention import RandomFeatureMap

from .qkv import random_qkv
from .padding import N as PAD_N, assert_padded_equals_alone


def _inputs(b=2, hq=4, hkv=2, nq=13, nk=13, d=8, dv=5, seed=0, dtype=torch.float64, grad=False):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = random_qkv(b, hq, nq, nk, d, dv, kv_heads=hkv, dtype=dtype, grad=grad, generator=gen)
    rpe = torch.randn(hq, nq + nk - 1, generator=gen, dtype=dtype).requires_grad_(grad)
    return q, k, v, rpe

def _performer(x, w):
    """FAVOR+ positive features exp(w^T x - |x|^2 / 2) / sqrt(m), written out."""
    return torch.exp(x @ w - (x * x).sum(-1, keepdim=True) / 2) / math.sqrt(w.shape[-1])


def _paper(q, k, v, rpe, w, causal=False, normalize=True, eps=0.0):
    """z_i = sum_j e^(b_(j-i)) phi(q_i) phi(k_j)^T v_j / sum_j e^(b_(j-i)) phi(q_i) phi(k_j)^T, one query at a time."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    root = q.shape[-1] ** -0.25  # exp(q.k / sqrt D) split evenly
    fq, fk = _performer(q * root, w), _performer(k * root, w)
    nq, nk = q.shape[2], k.shape[2]
    out = torch.zeros(*q.shape[:3], v.shape[-1], dtype=q.dtype)
    for i in range(nq):
        num = torch.zeros(q.shape[0], q.shape[1], v.shape[-1], dtype=q.dtype)
        den = torch.zeros(q.shape[0], q.shape[1], 1, dtype=q.dtype)
        for j in range(nk if not causal else i + 1):
            weight = torch.exp(rpe[:, j - i + nq - 1]).view(1, -1, 1) * (fq[:, :, i] * fk[:, :, j]).sum(-1, keepdim=True)
            num, den = num + weight * v[:, :, j], den + weight
        out[:, :, i] = num / (den + eps) if normalize else num
    return out


@pytest.mark.parametrize("backend", ("reference", "fft"))
@pytest.mark.parametrize("causal, nq, nk", [(False, 11, 11), (False, 7, 12), (False, 12, 5), (True, 11, 11)])
@pytest.mark.parametrize("normalize", (True, False))
def test_matches_the_paper_written_out(backend, causal, nq, nk, normalize):
    q, k, v, rpe = _inputs(nq=nq, nk=nk)
    w = orthogonal_gaussian(16, 8, seed=3)
    out = kernelized_rpe_attention(q, k, v, rpe, projection=w, causal=causal, normalize=normalize, eps=1e-300, backend=backend)
    torch.testing.assert_close(out, _paper(q, k, v, rpe, w, causal, normalize), atol=1e-12, rtol=1e-9)


def test_approximates_softmax_attention_with_the_bias():
    """With many random features the kernel estimates exp(q.k / sqrt D): softmax(q k^T / sqrt D + b) v."""
    q, k, v, rpe = _inputs(b=1, hq=2, hkv=2, nq=16, nk=16, d=8)
    q, k = q * 0.5, k * 0.5
    index = torch.arange(16).view(1, -1) - torch.arange(16).view(-1, 1) + 15
    exact = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8) + rpe[:, index], dim=-1) @ v
    errors = [(kernelized_rpe_attention(q, k, v, rpe, num_features=m, seed=1) - exact).norm() / exact.norm() for m in (64, 4096)]
    assert errors[1] < 0.05 and errors[1] < errors[0] / 2, errors


@pytest.mark.parametrize("causal, nq, nk", [(False, 19, 19), (False, 9, 23), (True, 21, 21)])
# relu unnormalized: a relu row can sum to 0 exactly, where the fft's rounding noise / eps is not 0
@pytest.mark.parametrize(
    "feature_map, shared_rpe, normalize", [("softmax_kernel", False, True), ("elu", True, True), ("relu", False, False)]
)
def test_fft_equals_reference_forward_and_gradients(causal, nq, nk, feature_map, shared_rpe, normalize):
    q, k, v, rpe = _inputs(nq=nq, nk=nk, seed=1, grad=True)
    if shared_rpe:
        rpe = rpe[0].detach().clone().requires_grad_(True)
    extra = {"num_features": 12, "seed": 5} if feature_map == "softmax_kernel" else {}
    results = []
    for backend in ("reference", "fft"):
        out = kernelized_rpe_attention(q, k, v, rpe, causal=causal, feature_map=feature_map, normalize=normalize, backend=backend, **extra)
        weight = torch.linspace(-1, 1, out.shape[-1], dtype=out.dtype)
        results.append((out, *torch.autograd.grad((out * weight).sum(), (q, k, v, rpe))))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8)


def test_feature_blocks_with_checkpointing_match(monkeypatch):
    """Blocks of a few features each (recomputed backward) give the one-block result."""
    q, k, v, rpe = _inputs(nq=17, nk=17, seed=2, grad=True)
    results = []
    for block_bytes in (krpe.FFT_BLOCK_BYTES, 1):
        monkeypatch.setattr(krpe, "FFT_BLOCK_BYTES", block_bytes)
        out = kernelized_rpe_attention(q, k, v, rpe, num_features=10, seed=0, causal=True)
        results.append((out, *torch.autograd.grad(out.square().sum(), (q, k, v, rpe))))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)


def test_large_biases_stay_finite():
    """e^b for b ~ 200 overflows float32; the max is subtracted first, so shifting b changes nothing."""
    q, k, v, rpe = _inputs(nq=15, nk=15, seed=3, dtype=torch.float32)
    for causal in (False, True):
        base = kernelized_rpe_attention(q, k, v, rpe, causal=causal)
        shifted = kernelized_rpe_attention(q, k, v, rpe + 200.0, causal=causal)
        assert torch.isfinite(shifted).all()
        torch.testing.assert_close(shifted, base, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("causal, precision", [(False, "float32"), (True, "auto"), (True, "float64")])
def test_float32_error_against_float64(causal, precision):
    """The stated float32 accuracy at N = 300, D = 32, m = 110 features, biases of spread 1."""
    q, k, v, rpe = _inputs(b=1, hq=2, hkv=2, nq=300, nk=300, d=32, dv=32, seed=4)
    exact = kernelized_rpe_attention(q, k, v, rpe, causal=causal, seed=0)
    fast = kernelized_rpe_attention(q.float(), k.float(), v.float(), rpe.float(), causal=causal, seed=0, fft_precision=precision)
    torch.testing.assert_close(fast.double(), exact, atol=2e-5, rtol=2e-4)


def test_bad_inputs_are_named():
    q, k, v, rpe = _inputs(nq=13, nk=13)
    for bad in (rpe[:, :-1], rpe[:2], torch.zeros(25, 2, dtype=rpe.dtype), None):
        with pytest.raises(ParameterError, match="rpe") as info:
            kernelized_rpe_attention(q, k, v, bad)
        assert info.value.argument == "rpe"
    with pytest.raises(ParameterError, match="2N - 1|Nq \\+ Nk - 1"):
        kernelized_rpe_attention(q, k, v, rpe[:, :-1])
    with pytest.raises(ParameterError, match="causal"):
        kernelized_rpe_attention(q[:, :, :5], k, v, torch.zeros(4, 17, dtype=q.dtype), causal=True)
    with pytest.raises(ParameterError, match="num_features"):
        kernelized_rpe_attention(q, k, v, rpe, feature_map="elu", num_features=8)
    with pytest.raises(ParameterError, match="seed"):
        kernelized_rpe_attention(q, k, v, rpe, projection=torch.randn(8, 4, dtype=q.dtype), seed=1)
    for name, bad in (("feature_map", "taylor"), ("fft_precision", "half"), ("eps", 0.0), ("scale", -1.0)):
        with pytest.raises(ParameterError, match=name) as info:
            kernelized_rpe_attention(q, k, v, rpe, **{name: bad})
        assert info.value.argument == name
    assert attnzoo.get("kernelized_rpe").decoder is None


# --------------------------------------------------------------------------------------------
# the module
# --------------------------------------------------------------------------------------------
def test_module_matches_its_pipeline_and_learns_the_table():
    torch.manual_seed(0)
    m = KernelizedRPEAttention(16, 2, max_len=20, num_features=12, seed=3).double()
    with torch.no_grad():
        m.rpe.normal_()
    x = torch.randn(2, 9, 16, dtype=torch.float64)
    q, k, v = m.heads(x)
    rpe = m.rpe[:, 19 - 8 : 19 + 9]
    expected = m.proj(m.merge(_paper(q, k, v, rpe, m.feature_map.projection, eps=1e-6)))
    y = m(x)
    torch.testing.assert_close(y, expected, atol=1e-12, rtol=1e-9)
    y.sum().backward()
    used = m.rpe.grad.abs().sum(0) > 0
    assert used[11:28].all() and not used[:11].any() and not used[28:].any()


def test_module_options_and_errors():
    m = KernelizedRPEAttention(16, 2, max_len=8, feature_map="elu", causal=True)
    assert m(torch.randn(1, 8, 16)).shape == (1, 8, 16)
    with pytest.raises(ShapeError, match="max_len"):
        m(torch.randn(1, 9, 16))
    with pytest.raises(ParameterError, match="num_features"):
        KernelizedRPEAttention(16, 2, max_len=8, feature_map="elu", num_features=4)
    with pytest.raises(ParameterError, match="max_len"):
        KernelizedRPEAttention(16, 2, max_len=0)
    redrawn = KernelizedRPEAttention(16, 2, max_len=8, feature_map=RandomFeatureMap(8, 6, redraw_interval=1))
    before = redrawn.feature_map.projection.clone()
    redrawn.train()(torch.randn(1, 4, 16))
    assert not torch.equal(before, redrawn.feature_map.projection)


# --------------------------------------------------------------------------------------------
# key_padding_mask (True = ignore the key): a padded batch equals each sequence alone
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ("reference", "fft"))
@pytest.mark.parametrize("causal", (False, True), ids=("noncausal", "causal"))
@pytest.mark.parametrize("side", ("right", "left"))
@pytest.mark.parametrize("feature_map", ("softmax_kernel", "elu"))
def test_padded_batch_equals_each_sequence_alone(backend, causal, side, feature_map):
    """Zeroed features under relative weights e^(b_(j-i)): a sequence of length L alone uses the
    middle of the padded table, rpe[..., N - L : N + L - 1] (the same offsets)."""
    q, k, v = random_qkv(3, 2, PAD_N, PAD_N, 6, 5)
    table = torch.randn(2, 2 * PAD_N - 1, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * 0.5
    options = {"num_features": 8, "seed": 2} if feature_map == "softmax_kernel" else {}

    def per_length(length, positions):
        return {"rpe": table[:, PAD_N - length : PAD_N + length - 1]}

    def attend(q, k, v, **kw):
        return kernelized_rpe_attention(q, k, v, feature_map=feature_map, causal=causal, backend=backend, **options, **kw)

    assert_padded_equals_alone(attend, q, k, v, side, per_length=per_length, atol=1e-9, rtol=1e-7)
