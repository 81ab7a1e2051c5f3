"""varying_window (L8, VWA): checked against the official recipe written out with its copy-shift padding.

The oracles follow the official ``vw_head.py`` step by step (pad each axis with copies of map
tokens, cut R P context windows every P tokens, space-to-depth or average each R-block in the
padded order) on sizes it supports (multiples of P, R P <= the axis); the library computes the
contexts as inward-shifted windows, so agreement checks that reading of copy-shift padding.
"""

from __future__ import annotations

import pytest
import torch

import attnzoo
from attnzoo.errors import NonFiniteError, ParameterError, ShapeError
from attnzoo.functional.local import varying_window_attention
from attnzoo.nn.local.varying_window import VaryingWindowAttention


def copy_shift_windows(x: torch.Tensor, P: int, R: int, first_axis: int = 2) -> torch.Tensor:
    """(.., S0, S1, C) -> (.., n0, n1, C, RP, RP): each axis padded with copies, then R P windows every P."""
    cut = (R + 1) * P // 2
    for dim in (first_axis, first_axis + 1):
        L = x.shape[dim]
        before = x.narrow(dim, cut, R * P - cut)  # the tokens just past the first context window's reach
        after = x.narrow(dim, L - R * P, R * P - cut)
        x = torch.cat([before, x, after], dim)
    return x.unfold(first_axis, R * P, P).unfold(first_axis + 1, R * P, P)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, -1) @ v


def vwa_oracle(q, k, v, P, R, rescale):
    """(B, H, S0, S1, D), sizes multiples of P: per query window, its copy-shift-padded context, a window loop."""
    b, h, S0, S1, _ = q.shape
    kc, vc = copy_shift_windows(k, P, R), copy_shift_windows(v, P, R)  # (B, H, n0, n1, D, RP, RP)
    out = torch.zeros(*q.shape[:-1], v.shape[-1], dtype=q.dtype)
    for i in range(S0 // P):
        for j in range(S1 // P):
            ctx = []
            for t in (kc[:, :, i, j], vc[:, :, i, j]):  # (B, H, D, RP, RP)
                if rescale == "mean":  # each R x R block in the padded order, as its space-to-depth groups them
                    t = t.unflatten(-1, (P, R)).unflatten(-3, (P, R)).mean((-3, -1))
                ctx.append(t.flatten(-2).transpose(-1, -2))
            qw = q[:, :, i * P : (i + 1) * P, j * P : (j + 1) * P].flatten(2, 3)
            out[:, :, i * P : (i + 1) * P, j * P : (j + 1) * P] = attend(qw, *ctx).unflatten(2, (P, P))
    return out


def _qkv(shape, seed, heads=(4, 2), dims=(8, 6)):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(2, heads[0], *shape, dims[0], generator=gen, dtype=torch.float64)
    k = torch.randn(2, heads[0], *shape, dims[0], generator=gen, dtype=torch.float64)
    v = torch.randn(2, heads[0], *shape, dims[1], generator=gen, dtype=torch.float64)
    return q, k, v


# (S0, S1, P, R): R P <= each axis; for "mean", ceil((R - 1) P / 2) is a multiple of R so the
# official block grouping of the copied pieces is the map's (see the docstring's departure 2)
MEAN_CASES = [(8, 8, 4, 2), (16, 12, 4, 2), (18, 18, 6, 3), (32, 16, 8, 2), (24, 24, 4, 1)]
SET_CASES = MEAN_CASES + [(8, 8, 2, 2), (15, 10, 5, 2), (12, 16, 4, 3), (9, 9, 3, 3)]


@pytest.mark.parametrize("S0, S1, P, R", MEAN_CASES)
@pytest.mark.parametrize("backend", ["sdpa", "reference"])
def test_mean_rescale_equals_the_official_recipe(S0, S1, P, R, backend):
    q, k, v = _qkv((S0, S1), seed=S0 * S1 + P + R)
    out = varying_window_attention(q, k, v, window_size=P, ratio=R, backend=backend)
    torch.testing.assert_close(out, vwa_oracle(q, k, v, P, R, "mean"))


@pytest.mark.parametrize("S0, S1, P, R", SET_CASES)
@pytest.mark.parametrize("backend", ["sdpa", "reference"])
def test_unscaled_context_is_the_copy_shift_padded_window(S0, S1, P, R, backend):
    q, k, v = _qkv((S0, S1), seed=S0 + S1 * P + R)
    out = varying_window_attention(q, k, v, window_size=P, ratio=R, rescale="none", backend=backend)
    torch.testing.assert_close(out, vwa_oracle(q, k, v, P, R, "none"))


@pytest.mark.parametrize("backend", ["sdpa", "reference"])
def test_ratio_one_is_window_attention(backend):
    q, k, v = _qkv((12, 8), seed=3)
    out = varying_window_attention(q, k, v, window_size=4, ratio=1, backend=backend)
    torch.testing.assert_close(out, attnzoo.window_attention(q, k, v, window_size=4))


@pytest.mark.parametrize("backend", ["sdpa", "reference"])
def test_context_covering_the_map_without_rescaling_is_dense_attention(backend):
    q, k, v = _qkv((6, 5), seed=4)
    out = varying_window_attention(q, k, v, window_size=(2, 3), ratio=(3, 2), rescale="none", backend=backend)
    dense = attnzoo.softmax_attention(q.flatten(2, 3), k.flatten(2, 3), v.flatten(2, 3))
    torch.testing.assert_close(out, dense.unflatten(2, (6, 5)))


@pytest.mark.parametrize("backend", ["sdpa", "reference"])
def test_last_block_of_a_short_axis_averages_the_tokens_it_has(backend):
    # one window of 5 on an axis of 5, R = 2: the context is the axis, blocks {0, 1}, {2, 3}, {4}
    q, k, v = _qkv((5,), seed=5)
    out = varying_window_attention(q, k, v, window_size=5, ratio=2, backend=backend)
    blocks = lambda t: torch.stack([t[:, :, 0:2].mean(2), t[:, :, 2:4].mean(2), t[:, :, 4]], dim=2)  # noqa: E731
    torch.testing.assert_close(out, attend(q, blocks(k), blocks(v)))


@pytest.mark.parametrize("rescale, key_factor", [("mean", 1), ("prescaled", 1), ("none", 16)])
def test_rescaled_attention_has_window_attentions_shape(monkeypatch, rescale, key_factor):
    """The paper's claim: VWA's scores are LWA's P^2 x P^2 per window; without re-scaling, R^2 times."""
    seen = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def recording(q, k, v, **kwargs):
        seen.append((tuple(q.shape), tuple(k.shape)))
        return sdpa(q, k, v, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording)
    x = torch.randn(1, 2, 32, 32, 8)
    attnzoo.window_attention(x, x, x, window_size=8, backend="sdpa")
    varying_window_attention(x, x, x, window_size=8, ratio=4, rescale=rescale, backend="sdpa")
    (lwa_q, lwa_k), (vwa_q, vwa_k) = seen
    assert vwa_q == lwa_q
    assert vwa_k[:2] == lwa_k[:2] and vwa_k[2] == key_factor * lwa_k[2]


def test_a_nan_query_reaches_the_output_with_a_short_context():
    """Four context keys: fewer than the CPU flash kernel's vector width, which would return zeros for the NaN row."""
    q, k, v = _qkv((4, 4), seed=6, dims=(16, 16))  # equal head dims: the flash kernel is eligible
    q[0, 0, 1, 2, 0] = float("nan")
    with pytest.raises(NonFiniteError) as info:
        varying_window_attention(q.float(), k.float(), v.float(), window_size=2, ratio=2, backend="sdpa")
    assert info.value.argument == "q"


@pytest.mark.parametrize("dim, r", [(2, 1), (2, 3), (3, 4), (4, 2)])
def test_block_sum_backward_is_its_adjoint(dim, r):
    from attnzoo.functional.local.varying_window import _BlockSum

    x = torch.randn(1, 2, 5, 6, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: _BlockSum.apply(t, dim, r), (x,))


def test_parameters_are_checked_by_name():
    x = torch.randn(1, 2, 8, 8, 16)
    with pytest.raises(ParameterError, match="ratio: expected a positive int or a tuple of 2") as info:
        varying_window_attention(x, x, x, window_size=4, ratio=(2, 0))
    assert info.value.argument == "ratio"
    with pytest.raises(ParameterError, match="rescale: expected one of 'mean', 'prescaled', 'none'"):
        varying_window_attention(x, x, x, window_size=4, ratio=2, rescale="dope")


# --------------------------------------------------------------------------------------------
# the module: DOPE + projections, against the official pipeline with the module's own weights
# --------------------------------------------------------------------------------------------
def module_oracle(layer: VaryingWindowAttention, x: torch.Tensor) -> torch.Tensor:
    """The official VWHead order: DOPE over the map, copy-shift pad, cut windows, space-to-depth, attend."""
    (P, _), (R, _) = layer.window_size, layer.ratio
    b, S0, S1, C = x.shape
    heads = layer.num_heads
    pad = [(R - 1) // 2, R // 2] * 2
    y = torch.nn.functional.conv2d(torch.nn.functional.pad(x.permute(0, 3, 1, 2), pad), layer.dope.weight, layer.dope.bias)
    ctx = copy_shift_windows(y, P, R)  # (B, C / R^2, n0, n1, RP, RP)
    ctx = ctx.unflatten(-1, (P, R)).unflatten(-3, (P, R))  # (B, c, n0, n1, P, R, P, R)
    z = ctx.permute(0, 2, 3, 4, 6, 5, 7, 1).flatten(-3)  # (B, n0, n1, P, P, (rh rw c)): space-to-depth
    k, v = layer.kv(z).chunk(2, dim=-1)
    q = layer.q(x).unflatten(1, (S0 // P, P)).unflatten(3, (S1 // P, P)).permute(0, 1, 3, 2, 4, 5)  # (B, n0, n1, P, P, C)
    split = lambda t: t.flatten(3, 4).unflatten(-1, (heads, -1)).transpose(-2, -3)  # noqa: E731  (B, n0, n1, heads, P*P, C/h)
    out = attend(split(q), split(k), split(v)).transpose(-2, -3).flatten(-2)  # (B, n0, n1, P*P, C)
    out = out.unflatten(3, (P, P)).permute(0, 1, 3, 2, 4, 5).reshape(b, S0, S1, C)
    return layer.proj(out)


@pytest.mark.parametrize("S0, S1, P, R", [(16, 16, 4, 2), (32, 32, 8, 4), (16, 24, 8, 2), (12, 12, 4, 1)])
def test_module_equals_the_official_pipeline(S0, S1, P, R):
    torch.manual_seed(S0 + S1 + P + R)
    layer = VaryingWindowAttention(dim=32, num_heads=4, window_size=P, ratio=R).double()
    x = torch.randn(2, S0, S1, 32, dtype=torch.float64)
    out, want = layer(x), module_oracle(layer, x)
    torch.testing.assert_close(out, want)
    weight = torch.randn_like(out)
    params = list(layer.parameters())
    got = torch.autograd.grad((out * weight).sum(), params)
    expected = torch.autograd.grad((want * weight).sum(), params)
    for p, g, e in zip(params, got, expected):
        assert g.abs().sum() > 0, f"no gradient reaches a parameter of shape {tuple(p.shape)}"
        torch.testing.assert_close(g, e)


def test_module_refuses_what_dope_cannot_embed():
    with pytest.raises(ParameterError, match="ratio: .*divides dim=36") as info:
        VaryingWindowAttention(dim=36, num_heads=4, window_size=8, ratio=(2, 4))
    assert info.value.argument == "ratio"
    with pytest.raises(ParameterError) as info:
        VaryingWindowAttention(dim=32, num_heads=3, window_size=8, ratio=2)
    assert info.value.argument == "num_heads"
    layer = VaryingWindowAttention(dim=32, num_heads=4, window_size=4, ratio=2)
    with pytest.raises(ShapeError, match=r"x: expected \(B, S0, S1, C=32\)"):
        layer(torch.randn(2, 8, 32))


def test_prescaled_context_is_dope_over_each_block_1d():
    """z_p stacks DOPE's outputs at p, ..., p + R - 1 (zero past the end), with DOPE padded as the official code."""
    torch.manual_seed(0)
    R, L = 3, 13
    layer = VaryingWindowAttention(dim=12, num_heads=2, window_size=4, ratio=R, spatial_dims=1).double()
    x = torch.randn(2, L, 12, dtype=torch.float64)
    y = torch.nn.functional.conv1d(torch.nn.functional.pad(x.transpose(1, 2), [(R - 1) // 2, R // 2]), layer.dope.weight, layer.dope.bias)
    zero = torch.zeros_like(y[:, :, 0])
    want = torch.stack([torch.cat([y[:, :, p + r] if p + r < L else zero for r in range(R)], dim=1) for p in range(L)], dim=1)
    torch.testing.assert_close(layer.prescaled_context(x), want)


@pytest.mark.parametrize("spatial", [(7, 10), (13,), (5, 6, 7)])
def test_module_backends_agree_on_sizes_the_official_code_refuses(spatial):
    torch.manual_seed(len(spatial))
    layer = VaryingWindowAttention(dim=16, num_heads=2, window_size=3, ratio=2, spatial_dims=len(spatial)).double()
    x = torch.randn(2, *spatial, 16, dtype=torch.float64)
    out = layer(x)
    layer.backend = "reference"
    torch.testing.assert_close(out, layer(x))


# ---- key_padding_mask (2D/3D): a context token averages the real tokens of its block
@pytest.mark.parametrize("backend", ["sdpa", "reference"])
@pytest.mark.parametrize("rescale", ["mean", "none", "prescaled"])
def test_padded_context_tokens_are_made_of_the_real_tokens_only(rescale, backend):
    """(2, 4) map, P = 2, R = (1, 2): each window's context is the whole map, its tokens the blocks
    k[i, 2j : 2j + 2] (mean) or k[i, 2j] (prescaled) or every token (none), written out here."""
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 1, 2, 4, 8, generator=gen, dtype=torch.float64) for _ in range(3))
    pad = torch.zeros(2, 2, 4, dtype=torch.bool)
    pad[0, 0, 1] = True  # block (0, 0) keeps one real token
    pad[0, 1, 2:] = True  # block (1, 1) has none: masked
    pad[1] = True  # no key at all: zeros
    out = varying_window_attention(q, k, v, window_size=2, ratio=(1, 2), rescale=rescale, key_padding_mask=pad, backend=backend)
    real = (~pad[0]).to(torch.float64)[..., None]
    if rescale == "mean":
        total = real.view(2, 2, 2, 1).sum(2)
        keys = (k[0, 0] * real).view(2, 2, 2, 8).sum(2) / total.clamp(min=1)
        values = (v[0, 0] * real).view(2, 2, 2, 8).sum(2) / total.clamp(min=1)
        seen = total[..., 0] > 0
    elif rescale == "prescaled":
        keys, values, seen = k[0, 0, :, ::2], v[0, 0, :, ::2], ~pad[0, :, ::2]
    else:
        keys, values, seen = k[0, 0], v[0, 0], ~pad[0]
    scores = (q[0, 0].reshape(8, 8) @ keys.reshape(-1, 8).T) * 8**-0.5
    weights = scores.masked_fill(~seen.reshape(1, -1), float("-inf")).softmax(-1)
    want = (weights @ values.reshape(-1, 8)).reshape(2, 4, 8)
    torch.testing.assert_close(out[0, 0], want, atol=1e-12, rtol=1e-10)
    assert torch.all(out[1] == 0)


def test_1d_padding_is_refused_because_contexts_are_placed_by_the_length():
    x = torch.randn(2, 1, 16, 8)
    with pytest.raises(ParameterError, match="key_padding_mask: expected None on 1D sequences") as info:
        varying_window_attention(x, x, x, window_size=4, ratio=2, key_padding_mask=torch.zeros(2, 16, dtype=torch.bool))
    assert info.value.argument == "key_padding_mask"
