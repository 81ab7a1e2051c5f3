"""FITBlock (L10): one block against its arithmetic written out group by group and head by head
(local layers, latent read, global latent layers, write back: Chen & Li 2023, Fig. 2)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from attnzoo.errors import ParameterError, ShapeError
from attnzoo.nn import FITBlock


def _ln(x, norm):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias


def _lin(x, layer):
    return x @ layer.weight.T + layer.bias


def _attend(q, k, v, heads):
    """Multi-head softmax attention written out: q (tq, w), k/v (tk, w) -> (tq, w)."""
    hd = q.shape[-1] // heads
    outs = []
    for h in range(heads):
        sl = slice(h * hd, (h + 1) * hd)
        scores = q[:, sl] @ k[:, sl].T / hd**0.5
        p = torch.exp(scores - scores.max(-1, keepdim=True).values)
        outs.append((p / p.sum(-1, keepdim=True)) @ v[:, sl])
    return torch.cat(outs, -1)


def _self_layer(x, layer):
    """x (t, w): x + proj(MHA(LN x)); then x + MLP(LN x)."""
    a = layer.attn
    w = x.shape[-1]
    qkv = _lin(_ln(x, a.norm), a.qkv)
    # the module's qkv projection lays out (3, heads, head_dim) along the width
    q, k, v = qkv[:, :w], qkv[:, w : 2 * w], qkv[:, 2 * w :]
    x = x + _lin(_attend(q, k, v, a.heads), a.proj)
    lin1, lin2 = layer.mlp[0], layer.mlp[2]
    return x + _lin(F.gelu(_lin(_ln(x, layer.norm), lin1)), lin2)


def _cross(x, y, c):
    att = c.q.out_features
    q = _lin(_ln(x, c.norm_x), c.q)
    kv = _lin(_ln(y, c.norm_y), c.kv)
    return x + _lin(_attend(q, kv[:, :att], kv[:, att:], c.heads), c.proj)


def _oracle(block, x, z):
    """The block for one batch entry: x (N, C), z (G, m, Cl), loops over groups."""
    n = block.group_size
    groups = x.shape[0] // n
    xs = [x[g * n : (g + 1) * n] for g in range(groups)]
    for layer in block.local:  # local layers: each group alone
        xs = [_self_layer(xg, layer) for xg in xs]
    zs = [_cross(z[g], xs[g], block.read) for g in range(groups)]  # read
    flat = torch.cat(zs, 0)
    for layer in block.glob:  # global layers over all G * m latents
        flat = _self_layer(flat, layer)
    m = z.shape[1]
    zs = [flat[g * m : (g + 1) * m] for g in range(groups)]
    if block.write is not None:  # write back
        xs = [_cross(xs[g], zs[g], block.write) for g in range(groups)]
    return torch.cat(xs, 0), torch.stack(zs)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(dim=16, group_size=5, latents_per_group=3, num_heads=4),
        dict(dim=16, group_size=4, latents_per_group=2, num_heads=4, latent_dim=8, latent_num_heads=2, local_layers=2, global_layers=2),
        dict(dim=12, group_size=6, latents_per_group=1, num_heads=3, latent_dim=24, latent_num_heads=6, write_back=False, local_layers=0),
    ],
)
def test_block_equals_its_arithmetic_written_out(kwargs):
    torch.manual_seed(0)
    block = FITBlock(**kwargs).double()
    for p in block.parameters():  # not the init values (LayerNorm 1/0): every parameter matters
        torch.nn.init.normal_(p, std=0.3)
    n, dim, ld = kwargs["group_size"], kwargs["dim"], block.latent_dim
    x = torch.randn(2, 4 * n, dim, dtype=torch.float64)
    z = torch.randn(2, 4, kwargs["latents_per_group"], ld, dtype=torch.float64)
    out_x, out_z = block(x, z)
    assert out_x.shape == x.shape and out_z.shape == z.shape
    for b in range(2):
        want_x, want_z = _oracle(block, x[b], z[b])
        torch.testing.assert_close(out_x[b], want_x, atol=1e-10, rtol=1e-10)
        torch.testing.assert_close(out_z[b], want_z, atol=1e-10, rtol=1e-10)


def test_information_flow_is_local_without_write_back_and_far_reaching_with_it():
    torch.manual_seed(1)
    x = torch.randn(1, 32, 16)
    bump = x.clone()
    bump[:, :8] += torch.randn(1, 8, 16)  # change group 0 only (not a constant: LayerNorm removes those)
    for write_back in (False, True):
        block = FITBlock(dim=16, group_size=8, latents_per_group=2, num_heads=2, num_groups=4, write_back=write_back)
        (a, za), (b, zb) = block(x), block(bump)
        far = (a[:, 24:] - b[:, 24:]).abs().max()
        assert (za[:, 3] - zb[:, 3]).abs().max() > 1e-4, "the global layers carry group 0 to group 3's latents"
        if write_back:
            assert far > 1e-4, "with write back, group 3's tokens hear group 0"
        else:
            assert far == 0, "without write back, tokens see only their own group"


def test_gradients_reach_every_parameter_and_input():
    block = FITBlock(dim=16, group_size=4, latents_per_group=2, num_heads=4, latent_dim=8, latent_num_heads=2, num_groups=3)
    x = torch.randn(2, 12, 16, requires_grad=True)
    out, z = block(x)
    (out.square().mean() + z.square().mean()).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    missing = [n for n, p in block.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing, f"no gradient: {missing}"


def test_bad_arguments_name_themselves():
    for kwargs, name in (
        (dict(dim=16, group_size=0, latents_per_group=2), "group_size"),
        (dict(dim=16, group_size=4, latents_per_group=0), "latents_per_group"),
        (dict(dim=16, group_size=4, latents_per_group=2, num_heads=3), "num_heads"),
        (dict(dim=16, group_size=4, latents_per_group=2, num_heads=4, latent_dim=10, latent_num_heads=4), "latent_num_heads"),
        (dict(dim=16, group_size=4, latents_per_group=2, num_heads=4, local_layers=-1), "local_layers"),
        (dict(dim=16, group_size=4, latents_per_group=2, num_heads=4, mlp_ratio=0), "mlp_ratio"),
    ):
        with pytest.raises(ParameterError) as err:
            FITBlock(**kwargs)
        assert err.value.argument == name
    block = FITBlock(dim=16, group_size=4, latents_per_group=2, num_heads=4)
    with pytest.raises(ShapeError) as err:
        block(torch.randn(1, 10, 16), torch.randn(1, 2, 2, 16))
    assert err.value.argument == "x"
    with pytest.raises(ShapeError) as err:
        block(torch.randn(1, 12, 16), torch.randn(1, 2, 2, 16))
    assert err.value.argument == "latents"
    with pytest.raises(ParameterError) as err:
        block(torch.randn(1, 12, 16))
    assert err.value.argument == "latents"
