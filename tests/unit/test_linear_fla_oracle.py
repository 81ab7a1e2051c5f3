"""linear and retention against flash-linear-attention's naive PyTorch references (an external oracle).

fla's package needs triton to import, so its ``ops/<name>/naive.py`` files are loaded by path.
Skipped when fla (``pip install --no-deps fla-core flash-linear-attention einops``) is absent;
CI does not install it. Layouts: fla's linear_attn and simple_gla take (B, T, H, D), retention
and based (B, H, T, D).
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch

import attnzoo
from attnzoo.functional.linear import retnet_gamma


def _fla_naive(name: str):
    """fla/ops/<name>/naive.py as a module, or skip."""
    spec = importlib.util.find_spec("fla")  # finds the package without importing it (no triton needed)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("flash-linear-attention is not installed")
    if importlib.util.find_spec("einops") is None:
        pytest.skip("fla's naive references need einops")
    path = Path(spec.submodule_search_locations[0]) / "ops" / name / "naive.py"
    if not path.exists():
        pytest.skip(f"this fla version has no {path}")
    module_spec = importlib.util.spec_from_file_location(f"fla_naive_{name}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


BACKENDS = ("reference", "chunked", "recurrent")


def assert_matches_float32_oracle(got, expected):
    """fla's linear_attn, retention and simple_gla naive forms compute in float32 whatever the input:
    compare by RMS ratio (as fla's own tests do), at float32's precision."""
    err = (got - expected).pow(2).mean().sqrt()
    assert err <= 1e-5 * expected.pow(2).mean().sqrt(), f"RMS error {float(err):.3g} vs RMS {float(expected.pow(2).mean().sqrt()):.3g}"


def _qkv(b=2, h=3, n=70, d=16, dv=12, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, h, n, size, generator=gen, dtype=dtype) for size in (d, d, dv))


def _btHd(x):
    return x.transpose(1, 2).contiguous()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("normalize", [False, True])
def test_linear_identity_equals_fla_naive_recurrent_linear_attn(backend, normalize):
    naive = _fla_naive("linear_attn")
    q, k, v = _qkv()
    # fla's normalizer divides by (s q . cumsum k) + 1e-10 without a feature map: identity, eps 1e-10.
    # Positive q, k keep that denominator away from zero.
    q, k = q.abs(), k.abs()
    expected, _ = naive.naive_recurrent_linear_attn(_btHd(q), _btHd(k), _btHd(v), normalize=normalize)
    got = attnzoo.get("linear")(q, k, v, feature_map="identity", causal=True, normalize=normalize, eps=1e-10, chunk_size=16, backend=backend)
    assert_matches_float32_oracle(got, expected.transpose(1, 2))


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_identity_equals_fla_naive_chunk_linear_attn(backend):
    naive = _fla_naive("linear_attn")
    q, k, v = _qkv(n=128)  # fla's naive chunked form needs T divisible by its chunk of 64
    expected = naive.naive_chunk_linear_attn(_btHd(q), _btHd(k), _btHd(v))
    got = attnzoo.get("linear")(q, k, v, feature_map="identity", causal=True, normalize=False, chunk_size=48, backend=backend)
    torch.testing.assert_close(got, expected.transpose(1, 2), rtol=1e-10, atol=1e-10)  # this one keeps float64


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("heads", [1, 4, 8])
def test_retention_defaults_equal_fla_naive_retention(backend, heads):
    naive = _fla_naive("retention")
    q, k, v = _qkv(h=heads, n=97, d=32, dv=32)
    expected = naive.naive_retention(q, k, v)
    got = attnzoo.get("retention")(q, k, v, chunk_size=20, backend=backend)  # every default: fla's semantics
    assert_matches_float32_oracle(got, expected)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("use_norm", [True, False])
def test_taylor_map_equals_fla_naive_parallel_based(backend, use_norm):
    naive = _fla_naive("based")
    q, k, v = _qkv(d=16, dv=24, n=50)
    expected = naive.naive_parallel_based(q, k, v, use_norm=use_norm)
    got = attnzoo.get("linear")(q, k, v, feature_map="taylor", causal=True, normalize=use_norm, eps=1e-6, chunk_size=16, backend=backend)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)


def test_taylor_map_equals_fla_naive_chunk_based():
    naive = _fla_naive("based")
    q, k, v = _qkv(d=8, dv=16, n=64)
    expected = naive.naive_chunk_based(q, k, v, chunk_size=16)
    got = attnzoo.get("linear")(q, k, v, feature_map="taylor", causal=True, eps=1e-6, chunk_size=16, backend="chunked")
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("form", ["naive_recurrent_simple_gla", "naive_parallel_simple_gla", "naive_chunk_simple_gla"])
def test_retention_equals_fla_simple_gla_with_constant_gates(backend, form):
    """simple_gla with a per-head gate constant over time, g = log(gamma), is retention with gamma."""
    naive = _fla_naive("simple_gla")
    q, k, v = _qkv(h=4, n=75, d=16, dv=8)
    gamma = [0.5, 0.9, 0.99, 1.0]
    gates = torch.tensor([math.log(g) for g in gamma], dtype=torch.float64).expand(q.shape[0], q.shape[2], 4).contiguous()
    expected = getattr(naive, form)(_btHd(q), _btHd(k), _btHd(v), gates)[0].transpose(1, 2)
    got = attnzoo.get("retention")(q, k, v, gamma=gamma, chunk_size=16, backend=backend)
    assert_matches_float32_oracle(got, expected)


def test_retnet_default_decays_are_fla_s():
    heads = 8
    expected = 1 - torch.tensor(2.0).pow(-5.0 - torch.arange(heads, dtype=torch.float64))
    torch.testing.assert_close(torch.tensor(retnet_gamma(heads), dtype=torch.float64), expected, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("use_norm", [True, False])
def test_based_defaults_equal_fla_naive_parallel_based(backend, use_norm):
    """based with its defaults (d = 16 = D, scale d^-0.5, eps 1e-6) is fla's naive_parallel_based."""
    naive = _fla_naive("based")
    q, k, v = _qkv(d=16, dv=24, n=50)
    expected = naive.naive_parallel_based(q, k, v, use_norm=use_norm)
    got = attnzoo.get("based")(q, k, v, normalize=use_norm, chunk_size=16, backend=backend)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
def test_based_equals_fla_naive_chunk_based(backend):
    naive = _fla_naive("based")
    q, k, v = _qkv(d=8, dv=16, n=64)
    expected = naive.naive_chunk_based(q, k, v, chunk_size=16)
    got = attnzoo.get("based")(q, k, v, feature_dim=8, chunk_size=24, backend=backend)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)
