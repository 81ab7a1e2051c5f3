"""Differential attention: the functional form against Eq. 1 written out, the layer against timm's
DiffAttention (weights copied, lambda randomized) and against Eq. 2-3 written out."""

from __future__ import annotations

import math

import pytest
import torch

import attnzoo
from attnzoo.errors import ParameterError
from attnzoo.nn import DifferentialAttention


def _maps(q, k, causal):
    d = q.shape[-1] // 2
    out = []
    for half in (slice(0, d), slice(d, 2 * d)):
        s = q[..., half] @ k[..., half].transpose(-1, -2) / math.sqrt(d)
        if causal:
            s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool).triu(1), float("-inf"))
        out.append(torch.softmax(s, -1))
    return out


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("backend", ["reference", "paired"])
def test_output_is_the_difference_of_two_softmax_maps(causal, backend):
    gen = torch.Generator().manual_seed(0)
    q, k = (torch.randn(2, 3, 10, 8, generator=gen, dtype=torch.float64) for _ in range(2))
    v = torch.randn(2, 3, 10, 5, generator=gen, dtype=torch.float64)
    lam = torch.tensor([0.2, 0.8, -0.3], dtype=torch.float64)
    p1, p2 = _maps(q, k, causal)
    want = (p1 - lam.view(1, 3, 1, 1) * p2) @ v
    torch.testing.assert_close(attnzoo.differential_attention(q, k, v, lam=lam, causal=causal, backend=backend), want)


def test_odd_head_dim_and_bad_lambda_are_named():
    q = k = v = torch.randn(1, 2, 6, 7)
    with pytest.raises(ParameterError) as info:
        attnzoo.differential_attention(q, k, v)
    assert info.value.argument == "q"
    q = k = v = torch.randn(1, 2, 6, 8)
    with pytest.raises(ParameterError) as info:
        attnzoo.differential_attention(q, k, v, lam=torch.ones(3))
    assert info.value.argument == "lam"


def test_layer_is_eq_2_and_3_written_out():
    torch.manual_seed(0)
    layer = DifferentialAttention(32, num_heads=2, depth=2).double()
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    b, n, _ = x.shape
    q, k, v = layer.qkv(x).chunk(3, dim=-1)
    lam_init = 0.8 - 0.6 * math.exp(-0.6)
    lam = torch.exp(layer.lambda_q1 @ layer.lambda_k1) - torch.exp(layer.lambda_q2 @ layer.lambda_k2) + lam_init
    heads = []
    for h in range(2):
        qh, kh, vh = (t[..., h * 16 : (h + 1) * 16] for t in (q, k, v))
        p1, p2 = _maps(qh, kh, causal=True)
        o = (p1 - lam * p2) @ vh
        o = o / torch.sqrt(o.square().mean(-1, keepdim=True) + 1e-5) * layer.sub_norm.weight
        heads.append(o * (1 - lam_init))
    want = layer.proj(torch.cat(heads, -1))
    torch.testing.assert_close(layer(x, causal=True), want)


@pytest.mark.parametrize("dual_lambda", [False, True])
@pytest.mark.parametrize("qk_norm", [False, True])
def test_from_timm_matches_timms_diff_attention(dual_lambda, qk_norm):
    pytest.importorskip("timm")  # tests/conftest.py made torchvision importable first
    from timm.layers.diff_attention import DiffAttention

    torch.manual_seed(1)
    theirs = DiffAttention(48, num_heads=3, qkv_bias=True, qk_norm=qk_norm, depth=4, dual_lambda=dual_lambda).eval()
    with torch.no_grad():  # lambda is exp(0) - exp(0) + init at timm's init: randomize it, and the norms' weights
        for p in theirs.parameters():
            if p.dim() <= 1:
                p.add_(torch.randn_like(p) * 0.3)
    ours = DifferentialAttention.from_timm(theirs)
    x = torch.randn(2, 17, 48)
    for causal in (False, True):
        torch.testing.assert_close(ours(x, causal=causal), theirs(x, is_causal=causal), atol=1e-5, rtol=1e-5)


def test_gradients_reach_every_parameter():
    layer = DifferentialAttention(32, num_heads=4)
    layer(torch.randn(2, 12, 32)).square().sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
