"""NSA's learned parts (nn.NativeSparseAttention, nn.BlockCompressor) and the functional form's
``compressed_kv``: phi and the gates written out block by block (Yuan et al. 2025, Eq. 5 and 7)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import attnzoo
from attnzoo.errors import ParameterError
from attnzoo.nn import BlockCompressor, NativeSparseAttention

SMALL = dict(block_size=8, compress_block=8, compress_stride=4, top_n=3, window=6)


def _layer(**kw) -> NativeSparseAttention:
    torch.manual_seed(0)
    return NativeSparseAttention(32, num_heads=4, num_kv_heads=2, **{**SMALL, **kw}).double()


def test_block_compressor_is_an_mlp_of_each_block_plus_its_position_embedding():
    torch.manual_seed(1)
    phi = BlockCompressor(head_dim=4, block=6, stride=3, hidden=10).double()
    x = torch.randn(2, 3, 20, 4, dtype=torch.float64)
    got = phi(x)
    starts = range(0, 20 - 6 + 1, 3)  # complete blocks only: (20 - 6) // 3 + 1 = 5
    assert got.shape == (2, 3, len(starts), 4)
    lin1, lin2 = phi.mlp[0], phi.mlp[2]
    for i, s in enumerate(starts):
        block = x[:, :, s : s + 6] + phi.position  # (B, H, 6, 4): position embedding per slot
        want = lin2(F.gelu(lin1(block.reshape(2, 3, 24))))
        torch.testing.assert_close(got[:, :, i], want)


def test_compressed_kv_replaces_the_block_means():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 40, 8, generator=gen, dtype=torch.float64) for _ in range(3))
    count = (40 - 8) // 4 + 1
    means = tuple(x.unfold(2, 8, 4)[:, :, :count].mean(-1) for x in (k, v))
    for backend in ("reference", "fused"):
        if backend == "fused":
            q, k, v, means = q.float(), k.float(), v.float(), tuple(m.float() for m in means)
        default = attnzoo.nsa_attention(q, k, v, backend=backend, **SMALL)
        given = attnzoo.nsa_attention(q, k, v, compressed_kv=means, backend=backend, **SMALL)
        torch.testing.assert_close(given, default)
        other = attnzoo.nsa_attention(q, k, v, compressed_kv=tuple(m.flip(2) for m in means), backend=backend, **SMALL)
        assert (other - default).abs().max() > 1e-3  # the given blocks are really used


def test_compressed_kv_of_the_wrong_count_names_the_argument():
    q = k = v = torch.randn(1, 2, 40, 8)
    wrong = (torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8))
    with pytest.raises(ParameterError) as info:
        attnzoo.nsa_attention(q, k, v, compressed_kv=wrong, **SMALL)
    assert info.value.argument == "compressed_kv" and "9 compressed blocks" in str(info.value)


def test_layer_equals_its_arithmetic_written_out():
    layer = _layer()
    x = torch.randn(2, 40, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    b, n, _ = x.shape
    q = layer.q_proj(x).view(b, n, 4, 8).transpose(1, 2)
    k = layer.k_proj(x).view(b, n, 2, 8).transpose(1, 2)
    v = layer.v_proj(x).view(b, n, 2, 8).transpose(1, 2)
    gates = torch.sigmoid(layer.gate(x)).view(b, n, 4, 3).transpose(1, 2)  # Eq. 5: g = sigmoid(MLP(x))
    compressed = (layer.k_compressor(k), layer.v_compressor(v))
    o = attnzoo.nsa_attention(q, k, v, gates=gates, compressed_kv=compressed, backend="reference", **SMALL)
    want = layer.out_proj(o.transpose(1, 2).reshape(b, n, 32))
    torch.testing.assert_close(layer(x), want)


def test_layer_is_causal_and_trains_every_part():
    layer = _layer()
    x = torch.randn(1, 48, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    y = layer(x)
    x2 = x.clone()
    x2[:, 30:] = torch.randn(1, 18, 32, dtype=torch.float64)
    torch.testing.assert_close(layer(x2)[:, :30], y[:, :30])  # the future never leaks
    y.square().sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name  # phi, its position embedding and the gates learn


def test_layer_runs_the_fused_backend_in_float32():
    layer = _layer().float()
    x = torch.randn(2, 64, 32)
    torch.testing.assert_close(layer(x), NativeSparseAttention.forward(layer.double(), x.double()).float(), atol=1e-5, rtol=1e-4)


def test_layer_refuses_bad_arguments():
    with pytest.raises(ParameterError) as info:
        NativeSparseAttention(32, num_heads=4, num_kv_heads=3)
    assert info.value.argument == "num_kv_heads"
    with pytest.raises(ParameterError) as info:
        NativeSparseAttention(30, num_heads=4)
    assert info.value.argument == "num_heads"
    with pytest.raises(ParameterError) as info:
        NativeSparseAttention(32, num_heads=4, top_n=0)
    assert info.value.argument == "top_n"
