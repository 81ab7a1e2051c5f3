"""L2ViT (F8): the enhanced linear attention against the official ``LinearAttention.forward``
written out (ReLU kernel, kv first, temperature, denominator clamped at 100), the Local
Concentration Module against its convolutions written out, and the block's two residual steps."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from attnzoo.errors import ParameterError, ShapeError
from attnzoo.nn.linear.l2vit import L2ViTAttention, LocalConcentrationModule


def _official_attention(m: L2ViTAttention, tokens: torch.Tensor) -> torch.Tensor:
    """ChuanyangZheng/L2ViT ``LinearAttention.forward`` (kv first) on (B, N, C) tokens."""
    attn = m.attn
    b, n, c = tokens.shape
    qkv = F.linear(tokens, attn.qkv.weight, attn.qkv.bias).reshape(b, n, 3, attn.num_heads, c // attn.num_heads).permute(2, 0, 3, 1, 4)
    q, k, v = torch.relu(qkv[0]), torch.relu(qkv[1]), qkv[2]
    denom = torch.clamp(q @ k.transpose(-2, -1).sum(dim=-1, keepdim=True), 1e2)
    out = (q @ ((k.transpose(-2, -1) @ v) * attn.temperature)) / denom
    return F.linear(out.transpose(1, 2).reshape(b, n, c), attn.proj.weight, attn.proj.bias)


def _official_lcm(lcm: LocalConcentrationModule, tokens: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``LCM.forward``: (B, N, C) -> grid -> conv1, GELU, BN, conv2 -> (B, N, C)."""
    b, n, c = tokens.shape
    x = tokens.transpose(-1, -2).reshape(b, c, *size)
    x = F.conv2d(x, lcm.conv1.weight, lcm.conv1.bias, padding=lcm.kernel_size // 2, groups=c)
    x = F.gelu(x)
    x = F.batch_norm(x, lcm.bn.running_mean, lcm.bn.running_var, lcm.bn.weight, lcm.bn.bias, training=False, eps=lcm.bn.eps)
    x = F.conv2d(x, lcm.conv2.weight, lcm.conv2.bias, padding=lcm.kernel_size // 2, groups=c)
    return x.flatten(2).transpose(-1, -2)


def _layer(dim=24, heads=3, **kwargs) -> L2ViTAttention:
    torch.manual_seed(0)
    m = L2ViTAttention(dim, heads, **kwargs).double().eval()
    with torch.no_grad():  # non-trivial BN statistics and norms, so that every parameter shows
        for module in m.modules():
            if isinstance(module, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
        m.attn.temperature.mul_(torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64).view(-1, 1, 1))
    return m


@pytest.mark.parametrize("amplitude", (0.3, 10.0))  # denominators below the floor of 100, and above
def test_attention_matches_the_official_linear_attention(amplitude):
    m = _layer()
    x = torch.randn(2, 6, 5, 24, dtype=torch.float64) * amplitude
    expected = _official_attention(m, x.reshape(2, 30, 24)).reshape(x.shape)
    torch.testing.assert_close(m.attention(x), expected, atol=1e-12, rtol=1e-10)


def test_the_floor_is_active_on_small_inputs():
    m = _layer()
    x = torch.randn(2, 6, 5, 24, dtype=torch.float64) * 0.3
    floored = m.attention(x)
    m.attn.denominator_floor = 1e-12
    assert not torch.allclose(floored, m.attention(x))


def test_lcm_matches_the_official_module():
    m = _layer()
    x = torch.randn(2, 6, 5, 24, dtype=torch.float64)
    expected = _official_lcm(m.lcm, x.reshape(2, 30, 24), (6, 5)).reshape(x.shape)
    torch.testing.assert_close(m.lcm(x), expected, atol=1e-12, rtol=1e-10)


def test_forward_is_the_two_residual_steps():
    """x + Attn(LN1 x), then + LCM(LN3 .), as the official LGABlock (enhanced) without CPE and MLP."""
    m = _layer()
    x = torch.randn(2, 6, 5, 24, dtype=torch.float64)
    tokens = x.reshape(2, 30, 24)
    y = tokens + _official_attention(m, F.layer_norm(tokens, (24,), m.norm1.weight, m.norm1.bias))
    y = y + _official_lcm(m.lcm, F.layer_norm(y, (24,), m.norm3.weight, m.norm3.bias), (6, 5))
    torch.testing.assert_close(m(x), y.reshape(x.shape), atol=1e-12, rtol=1e-10)


def test_one_dimensional_tokens_and_gradients():
    m = L2ViTAttention(16, 2, spatial_dims=1, kernel_size=3).double()
    x = torch.randn(3, 17, 16, dtype=torch.float64, requires_grad=True)
    y = m(x)
    y.square().sum().backward()
    assert y.shape == x.shape and m.attn.temperature.grad is not None and m.lcm.conv1.weight.grad is not None
    plain = L2ViTAttention(16, 2, spatial_dims=1, kernel_size=None).double()
    plain.load_state_dict({k: v for k, v in m.state_dict().items() if k.startswith(("norm1", "attn"))})
    torch.testing.assert_close(plain(x), x + m.attention(m.norm1(x)))


def test_bad_arguments_are_named():
    with pytest.raises(ParameterError, match="spatial_dims"):
        L2ViTAttention(16, 2, spatial_dims=3)
    with pytest.raises(ParameterError, match="kernel_size"):
        LocalConcentrationModule(16, kernel_size=4)
    with pytest.raises(ParameterError, match="denominator_floor"):
        L2ViTAttention(16, 2, denominator_floor=0)
    with pytest.raises(ParameterError, match="num_heads"):
        L2ViTAttention(16, 3)
    with pytest.raises(ShapeError, match="x"):
        L2ViTAttention(16, 2)(torch.randn(2, 9, 16))
    with pytest.raises(ShapeError, match="x"):
        LocalConcentrationModule(16)(torch.randn(2, 3, 3, 8))
