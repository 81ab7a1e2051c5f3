"""nn.mha: the generic MultiheadAttention over registered mechanisms, and ShortConvolution.

Covers: causality (future tokens never change past outputs) for softmax and linear; the softmax
layer against an independent oracle (the same projections around torch's SDPA); per-length
example parameters (kernelized_rpe's rpe is sized by the sequence); state sizes; clear errors
for unknown mechanisms, missing patterns and unknown parameters; the short convolution against
a depthwise Conv1d and its causality.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import attnzoo
from attnzoo.errors import ParameterError, ShapeError, UnknownMechanismError
from attnzoo.nn.mha import MultiheadAttention, ShortConvolution


# the CPU is shared: two threads under load were up to 10x slower than one for these small models
pytestmark = pytest.mark.usefixtures("one_thread")


def _layer(mechanism: str, causal: bool = True, **params) -> MultiheadAttention:
    torch.manual_seed(0)
    return MultiheadAttention(32, 4, mechanism, causal, **params).double()


@pytest.mark.parametrize("mechanism", ["softmax", "linear"])
def test_future_tokens_do_not_change_past_outputs(mechanism):
    layer = _layer(mechanism)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 24, 32, generator=gen, dtype=torch.float64)
    changed = x.clone()
    changed[:, 15:] = torch.randn(2, 9, 32, generator=gen, dtype=torch.float64)
    y, y_changed = layer(x), layer(changed)
    torch.testing.assert_close(y_changed[:, :15], y[:, :15])
    assert (y_changed[:, 15:] - y[:, 15:]).abs().max() > 1e-3  # the check can fail: the future did change


def test_noncausal_layer_sees_the_future():
    layer = _layer("softmax", causal=False)
    x = torch.randn(1, 10, 32, dtype=torch.float64)
    changed = x.clone()
    changed[:, -1] += 1.0
    assert (layer(changed)[:, 0] - layer(x)[:, 0]).abs().max() > 1e-6


def test_softmax_layer_matches_projections_around_torch_sdpa():
    layer = _layer("softmax")
    x = torch.randn(3, 17, 32, dtype=torch.float64)

    def heads(proj):
        return proj(x).view(3, 17, 4, 8).transpose(1, 2)

    out = F.scaled_dot_product_attention(heads(layer.q_proj), heads(layer.k_proj), heads(layer.v_proj), is_causal=True)
    expected = layer.out_proj(out.transpose(1, 2).reshape(3, 17, 32))
    torch.testing.assert_close(layer(x), expected)


def test_gradients_reach_every_projection():
    layer = _layer("linear")
    layer(torch.randn(2, 12, 32, dtype=torch.float64)).square().sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_example_params_follow_the_sequence_length():
    # kernelized_rpe's example rpe is a (H, 2N - 1) tensor: one per length, rebuilt per shape
    torch.manual_seed(0)
    layer = MultiheadAttention(16, 2, "kernelized_rpe", example_params=True)
    for n in (8, 13):
        assert layer(torch.randn(1, n, 16)).shape == (1, n, 16)
    assert len(layer._examples) == 2


def test_user_parameters_override_example_ones():
    layer = MultiheadAttention(16, 2, "sliding_window", example_params=True, window=(2, 0))
    problem = layer.mechanism.describe(*layer.heads(torch.randn(1, 9, 16)))
    assert layer.params_for(problem)["window"] == (2, 0)
    assert layer.params_for(problem)["causal"] is True


def test_state_size_is_per_layer_and_none_for_a_kv_cache():
    linear = MultiheadAttention(32, 4, "linear")
    assert linear.state_size() == 4 * attnzoo.get("linear").state_size(8, 8)
    assert MultiheadAttention(32, 4, "softmax").state_size() is None


def test_unknown_mechanism_names_itself_and_the_registered_ones():
    with pytest.raises(UnknownMechanismError, match="no_such_attention.*registered.*softmax"):
        MultiheadAttention(32, 4, "no_such_attention")


def test_mechanism_without_the_pattern_is_refused():
    causal_less = next(m for m in attnzoo.list_mechanisms() if "causal_self" not in m.patterns)
    with pytest.raises(ParameterError, match="does not support the causal_self pattern") as info:
        MultiheadAttention(32, 4, causal_less.name, causal=True)
    assert info.value.argument == "mechanism"


def test_bad_arguments_name_the_argument():
    with pytest.raises(ParameterError) as info:
        MultiheadAttention(32, 4, "softmax", not_a_param=1)
    assert info.value.argument == "not_a_param"
    with pytest.raises(ParameterError) as info:
        MultiheadAttention(30, 4, "softmax")
    assert info.value.argument == "num_heads"
    with pytest.raises(ShapeError):
        MultiheadAttention(32, 4, "softmax")(torch.randn(2, 5, 16))


def test_short_convolution_is_a_causal_depthwise_conv1d():
    torch.manual_seed(0)
    conv = ShortConvolution(6, kernel_size=4).double()
    x = torch.randn(2, 11, 6, dtype=torch.float64)
    # taps in Conv1d's layout: weight[s] multiplies x_{t-3+s}
    expected = F.conv1d(F.pad(x.transpose(1, 2), (3, 0)), conv.weight.t().unsqueeze(1), conv.bias, groups=6).transpose(1, 2)
    torch.testing.assert_close(conv(x), expected)
    changed = x.clone()
    changed[:, 7:] += 1.0
    torch.testing.assert_close(conv(changed)[:, :7], conv(x)[:, :7])
