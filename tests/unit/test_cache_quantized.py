"""Mixed-precision KV caches (K5): packing, quantization, ZipCache's saliency and split."""

from __future__ import annotations

import pytest
import torch

from attnzoo.cache.quantized import (
    dequantize,
    mixed_precision_kv,
    normalized_attention_saliency,
    pack_bits,
    quantize,
    unpack_bits,
)
from attnzoo.errors import ParameterError, ShapeError


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_pack_round_trips_and_packs_8_over_bits_per_byte(bits):
    codes = torch.randint(0, 1 << bits, (3, 2, 13), dtype=torch.uint8)
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape[-1] == -(-13 // (8 // bits))
    assert torch.equal(unpack_bits(packed, bits, 13), codes)
    if bits == 4:  # the first code in the low nibble
        assert packed[0, 0, 0] == codes[0, 0, 0] | (codes[0, 0, 1] << 4)


@pytest.mark.parametrize("per", ["token", "channel"])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_quantization_error_is_within_half_a_step(per, bits):
    x = torch.randn(2, 3, 17, 8) * torch.linspace(0.1, 5, 8)  # channels of different ranges
    q = quantize(x, bits, per=per)
    assert q.scale.shape == ((2, 3, 17, 1) if per == "token" else (2, 3, 8, 1))
    step = q.scale if per == "token" else q.scale.transpose(-1, -2)
    err = (dequantize(q) - x).abs()
    assert (err <= step / 2 + 1e-5).all()
    # oracle: the asymmetric rule written out
    lo = x.amin(-1, keepdim=True) if per == "token" else x.amin(-2, keepdim=True)
    hi = x.amax(-1, keepdim=True) if per == "token" else x.amax(-2, keepdim=True)
    s = (hi - lo) / (2**bits - 1)
    z = (-lo / s).round()
    expected = ((x / s).round() + z).clamp(0, 2**bits - 1).sub(z).mul(s)
    torch.testing.assert_close(dequantize(q), expected, rtol=0, atol=1e-5)
    assert q.nbytes == q.packed.numel() + 4 * 2 * q.scale.numel()


def test_saliency_is_attention_over_the_queries_that_see_each_key():
    torch.manual_seed(0)
    q, k = torch.randn(1, 4, 6, 8), torch.randn(1, 2, 10, 8)
    sal = normalized_attention_saliency(q, k)
    expected = torch.zeros(1, 2, 10)
    for h in range(4):
        for i in range(6):
            pos = 10 - 6 + i  # bottom-right: the query's own position among the keys
            p = torch.softmax(q[0, h, i] @ k[0, h // 2, : pos + 1].T / 8**0.5, -1)
            expected[0, h // 2, : pos + 1] += p
    counts = torch.tensor([min(6, 10 - j) for j in range(10)], dtype=torch.float32) * 2  # queries x heads per kv head
    torch.testing.assert_close(sal, expected / counts, rtol=1e-5, atol=1e-6)


def test_mixed_precision_puts_the_salient_tokens_in_high_bits():
    torch.manual_seed(1)
    k, v = torch.randn(2, 2, 40, 16), torch.randn(2, 2, 40, 16)
    sal = torch.rand(2, 2, 40)
    mixed = mixed_precision_kv(k, v, sal, high_fraction=0.25, high_bits=8, low_bits=2)
    top = sal.topk(10, dim=-1).indices.sort(-1).values
    assert torch.equal(mixed.salient, top)
    keys, values = mixed.dequantize()
    err = (values - v).abs().mean(-1)  # per token
    high = err.gather(2, mixed.salient)
    low = err.gather(2, mixed.other)
    assert high.max() < low.min()  # 8-bit tokens are closer than every 2-bit one
    expected_bytes = sum(p.packed.numel() + 8 * p.scale.numel() for p in (mixed.keys_high, mixed.values_high, mixed.keys_low, mixed.values_low))
    assert mixed.nbytes == expected_bytes < (k.numel() + v.numel()) * 4 / 4  # under a quarter of float32, scales included
    everything = mixed_precision_kv(k, v, sal, high_fraction=1.0, high_bits=8)
    assert everything.keys_low is None
    torch.testing.assert_close(everything.dequantize()[0], k, rtol=0, atol=0.05)


def test_bad_arguments_name_themselves():
    k = torch.randn(1, 2, 8, 4)
    with pytest.raises(ParameterError, match="bits"):
        quantize(k, 3)
    with pytest.raises(ParameterError, match="per"):
        quantize(k, 4, per="head")
    with pytest.raises(ParameterError, match="high_fraction"):
        mixed_precision_kv(k, k, torch.rand(1, 2, 8), high_fraction=0.0)
    with pytest.raises(ShapeError, match="saliency"):
        mixed_precision_kv(k, k, torch.rand(1, 8), high_fraction=0.5)
    with pytest.raises(ShapeError, match="expected"):
        quantize(torch.randn(5), 4)
