"""per_head_patterns (L7): each head against its pattern built by explicit loops."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import attnzoo
from attnzoo import HeadPattern
from attnzoo.errors import ParameterError
from attnzoo.functional.local import PerHeadMask


def loop_mask(spec: HeadPattern, nq: int, nk: int, causal: bool) -> torch.Tensor:
    offset = nk - nq
    m = torch.zeros(nq, nk, dtype=torch.bool)
    for i in range(nq):
        ip = i + offset
        for j in range(nk):
            ok = False
            if spec.window is not None:
                left, right = spec.window
                ok |= (left is None or j >= ip - left) and (right is None or j <= ip + right)
            ok |= j < spec.sinks
            if spec.stride is not None:
                ok |= j % spec.stride[0] == spec.stride[1]
            if spec.block is not None:
                size, shift = spec.block
                ok |= (ip + shift) // size == (j + shift) // size
            m[i, j] = ok and (not causal or j <= ip)
    return m


SPECS = [
    HeadPattern(window=(5, 0), stride=(4, 1)),  # S2-Attention
    HeadPattern(window=(12, 3)),  # MoA span
    HeadPattern(window=(4, 0), sinks=3, stride=(7, 0)),  # LongGen
    HeadPattern(block=(16, 8), sinks=2),  # SinkLoRA shifted group
]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("backend", ["tiled", "reference"])
def test_each_head_sees_its_own_pattern(causal, backend):
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(2, 4, 37, 8, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(2, 4, 50, 8, generator=gen, dtype=torch.float64) for _ in range(2))
    out = attnzoo.per_head_patterns_attention(q, k, v, head_patterns=SPECS, causal=causal, backend=backend)
    for h, spec in enumerate(SPECS):
        m = loop_mask(spec, 37, 50, causal)
        want = F.scaled_dot_product_attention(q[:, h], k[:, h], v[:, h], attn_mask=m)
        want = want.masked_fill(~m.any(-1, keepdim=True), 0.0)  # no key: zeros
        torch.testing.assert_close(out[:, h], want)


def test_the_tile_plan_is_the_union_of_the_heads():
    """Head 0 sees only the start, head 1 only the end: planning from head 0 would skip tiles."""
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, 600, 16, generator=gen, dtype=torch.float64) for _ in range(3))
    heads = [HeadPattern(sinks=50), HeadPattern(block=(600, 0), stride=(600, 599))]
    out = attnzoo.per_head_patterns_attention(q, k, v, head_patterns=heads, backend="tiled")
    ref = attnzoo.per_head_patterns_attention(q, k, v, head_patterns=heads, backend="reference")
    torch.testing.assert_close(out, ref)


def test_softmax_plans_a_head_dependent_mask_mod_over_all_heads():
    """The same union holds when the per-head mask reaches softmax as a (cacheable) mask_mod."""
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, 600, 16, generator=gen, dtype=torch.float64) for _ in range(3))
    mask = PerHeadMask((HeadPattern(sinks=50), HeadPattern(block=(600, 0), stride=(600, 599))), 0, False)
    out = attnzoo.softmax_attention(q, k, v, mask_mod=mask, backend="tiled")
    torch.testing.assert_close(out, attnzoo.softmax_attention(q, k, v, mask_mod=mask, backend="reference"))


def test_bad_patterns_are_refused_with_the_head_named():
    x = torch.randn(1, 2, 20, 8)
    with pytest.raises(ParameterError, match="head 1 needs stride as"):
        attnzoo.per_head_patterns_attention(x, x, x, head_patterns=[{"sinks": 1}, {"stride": (3, 3)}])
    with pytest.raises(ParameterError, match="a list of 1 or 2 HeadPattern"):
        attnzoo.per_head_patterns_attention(x, x, x, head_patterns=[{"sinks": 1}] * 3)


# ---- key_padding_mask: each sequence's patterns placed on its real keys
from .padding import N as PAD_N, assert_padded_equals_alone, padding  # noqa: E402
from .qkv import random_qkv  # noqa: E402

#: Every part of a HeadPattern counts positions: sinks, shards and blocks must follow the sequence.
PADDED_HEADS = [
    HeadPattern(window=(2, 1), sinks=1),
    HeadPattern(stride=(3, 1), window=(1, 0)),
    HeadPattern(block=(4, 2), sinks=2),
    HeadPattern(window=(None, 0), stride=(2, 0)),
]


@pytest.mark.parametrize("backend", ["reference", "tiled"])
@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("causal", [False, True])
def test_padded_batch_equals_each_sequence_alone(causal, side, backend):
    q, k, v = random_qkv(b=3, h=4, nq=PAD_N, nk=PAD_N, kv_heads=2)
    attend = lambda *t, **kw: attnzoo.per_head_patterns_attention(*t, head_patterns=PADDED_HEADS, causal=causal, backend=backend, **kw)  # noqa: E731
    assert_padded_equals_alone(attend, q, k, v, side)


@pytest.mark.parametrize("alignment", ["bottom_right", "top_left"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_cross_attention_equals_each_sequence_alone(side, alignment):
    q, k, v = random_qkv(b=3, h=4, nq=6, nk=PAD_N)
    attend = lambda *t, **kw: attnzoo.per_head_patterns_attention(*t, head_patterns=PADDED_HEADS, causal_alignment=alignment, backend="tiled", **kw)  # noqa: E731
    assert_padded_equals_alone(attend, q, k, v, side, cross=True)


def test_left_padding_moves_the_sinks_to_the_first_real_keys():
    """A sink-only head on a left-padded entry sees exactly its first real key: the output is that value."""
    q, k, v = random_qkv(b=3, h=1, nq=PAD_N, nk=PAD_N)
    pad = padding("left")
    out = attnzoo.per_head_patterns_attention(q, k, v, head_patterns=[HeadPattern(sinks=1)], key_padding_mask=pad)
    for b in range(3):
        first = int((~pad[b]).nonzero()[0])
        torch.testing.assert_close(out[b, 0, first:], v[b, 0, first].expand(PAD_N - first, -1))


# --------------------------------------------------------------------------------------------
# sharded: strided shards on their gathered keys
# --------------------------------------------------------------------------------------------
SHARDED_SPECS = [
    HeadPattern(window=(70, 0), stride=(4, 1)),  # S2-Attention: the shard overlaps the window
    HeadPattern(stride=(5, 2)),  # a shard alone: its rest is empty
    HeadPattern(window=(10, 5), sinks=80, stride=(8, 0)),  # LongGen: sinks wider than a tile
    HeadPattern(block=(96, 32), stride=(1, 0)),  # period 1 (every key): no gathering, the rest's kernel
]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("nq", [300, 257])
def test_sharded_equals_each_heads_loop_and_its_gradients(causal, nq):
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(1, 4, nq, 16, generator=gen, requires_grad=True)
    k, v = (torch.randn(1, 2, 300, 16, generator=gen, requires_grad=True) for _ in range(2))  # GQA: 2 query heads per key head
    out, lse = attnzoo.per_head_patterns_attention(q, k, v, head_patterns=SHARDED_SPECS, causal=causal, return_lse=True, backend="sharded")
    for h, spec in enumerate(SHARDED_SPECS):
        m = loop_mask(spec, nq, 300, causal)
        s = (q[0, h].double() @ k[0, h // 2].double().T) * 16**-0.5
        want = torch.softmax(s.masked_fill(~m, float("-inf")), -1).nan_to_num() @ v[0, h // 2].double()  # no key: 0
        torch.testing.assert_close(out[0, h].double(), want, atol=2e-6, rtol=1e-5)
        torch.testing.assert_close(lse[0, h].double(), torch.logsumexp(s.masked_fill(~m, float("-inf")), -1), atol=2e-6, rtol=1e-5)
    g = torch.randn(out.shape, generator=gen)
    ref = attnzoo.per_head_patterns_attention(q, k, v, head_patterns=SHARDED_SPECS, causal=causal, backend="fused")
    for got, want in zip(torch.autograd.grad((out * g).sum(), (q, k, v)), torch.autograd.grad((ref * g).sum(), (q, k, v))):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_shard_keys_tile_grid_brackets_its_elements():
    """visit may over-report and full under-report, never the reverse: checked against the elements."""
    from attnzoo.functional.local.per_head import ShardKeys
    from attnzoo.masks import _tile_bounds

    for rest in (HeadPattern(window=(70, 0)), HeadPattern(), HeadPattern(window=(10, 5), sinks=80), HeadPattern(block=(96, 32))):
        for causal in (False, True):
            keys = ShardKeys(4, 1, rest, offset=3, causal=causal)
            nq, nk = 400, 120
            qf, ql = _tile_bounds(nq, 64)
            kf, kl = _tile_bounds(nk, 64)
            visit, full = keys._tile_grid(qf, ql, kf, kl)
            elems = keys(None, None, torch.arange(nq)[:, None], torch.arange(nk)[None, :])
            for a in range(len(qf)):
                for b in range(len(kf)):
                    tile = elems[qf[a] : ql[a] + 1, kf[b] : kl[b] + 1]
                    assert not tile.any() or visit[a, b], (rest, causal, a, b)
                    assert not full[a, b] or tile.all(), (rest, causal, a, b)


def test_dispatch_picks_sharded_for_strided_heads_only():
    mech = attnzoo.get("per_head_patterns")
    q = k = v = torch.randn(1, 2, 256, 16)

    def chosen(patterns, **kw):
        return next(name for name, reason in mech.explain(q, k, v, head_patterns=patterns, causal=True, **kw) if reason is None)

    assert chosen([HeadPattern(window=(16, 0), stride=(4, h)) for h in range(2)]) == "sharded"
    assert chosen([HeadPattern(window=(16, 0), stride=(2, h)) for h in range(2)]) == "fused"  # short: period 2 gains nothing
    assert chosen([HeadPattern(window=(16, 0))]) == "fused"
    assert chosen([HeadPattern(stride=(4, 0))], key_padding_mask=torch.zeros(1, 256, dtype=torch.bool)) == "fused"
