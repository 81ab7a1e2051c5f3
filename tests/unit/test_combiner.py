"""combiner (L11): Combiner-Fixed and Combiner-Axial against the paper's factorization written
out query by query (Ren et al. 2021, Sec. 3-4), plus the properties that make it "full attention":
each row of p(j|i) is a distribution that gives every key of the support positive mass."""

from __future__ import annotations

import math

import pytest
import torch

import attnzoo
from attnzoo.errors import ParameterError
from attnzoo.functional.local import combiner_attention
from attnzoo.functional.local.combiner import combiner_weights

COMBINER = attnzoo.get("combiner")
BACKENDS = ["reference", "factorized"]


# --------------------------------------------------------------------------------------------
# the oracle: the partition and p(j|i) for one query at a time, in plain Python loops
# --------------------------------------------------------------------------------------------
def _partition_of(i: int, n: int, block: int, variant: str, causal: bool) -> tuple[list[int], list[list[int]]]:
    """(direct keys, regions) of query i, as lists of positions."""
    if variant == "logsparse":  # a Fenwick walk down from i: peel the lowest set bit's span off each time
        regions, start, rest = [], i, i
        for level in range(i.bit_length()):
            if rest & (1 << level):
                regions.append(list(range(start - 2**level, start)))
                start -= 2**level
        assert start == 0
        return [i], regions
    if variant == "fixed":
        seg = i // block
        start, stop = seg * block, min(n, seg * block + block)
        direct = list(range(start, i + 1 if causal else stop))
        last = seg if causal else math.ceil(n / block)
        regions = [list(range(r * block, min(n, r * block + block))) for r in range(last) if r != seg]
        return direct, regions
    row, col = divmod(i, block)
    row_of = lambda j: j // block  # noqa: E731
    col_of = lambda j: j % block  # noqa: E731
    keys = range(i + 1) if causal else range(n)
    direct = [j for j in keys if row_of(j) == row or col_of(j) == col]
    regions = []
    for other in range(block):
        if other == col:
            continue
        region = [j for j in keys if col_of(j) == other and row_of(j) != row]
        if region:
            regions.append(region)
    return direct, regions


def _pool(x: torch.Tensor, members: list[int], pooling: str) -> torch.Tensor:
    rows = torch.stack([x[j] for j in members])
    return rows.max(0).values if pooling == "max" else rows.mean(0)


def _oracle(q, k, v, *, block, variant, causal, pooling):
    """out_i = sum_{direct} p(j|i) v_j + sum_r p(r|i) sum_{j in r} q(j|r) v_j, one query and head at a time."""
    b, h, n, d = q.shape
    scale = d**-0.5
    out = torch.zeros(b, h, n, v.shape[-1], dtype=q.dtype)
    weights = torch.zeros(b, h, n, n, dtype=q.dtype)
    for bi in range(b):
        m = n
        for hi in range(h):
            qs, ks, vs = q[bi, hi, :m], k[bi, hi, :m], v[bi, hi, :m]
            for i in range(m):
                direct, regions = _partition_of(i, m, block, variant, causal)
                logits = [scale * float(qs[i] @ ks[j]) for j in direct]
                logits += [scale * float(qs[i] @ _pool(ks, r, pooling)) for r in regions]
                top = max(logits)
                e = [math.exp(x - top) for x in logits]
                z = sum(e)
                for jj, j in enumerate(direct):
                    weights[bi, hi, i, j] += e[jj] / z
                for rr, r in enumerate(regions):
                    p_region = e[len(direct) + rr] / z
                    qbar = _pool(qs, r, pooling)
                    inner = torch.softmax(torch.stack([scale * (qbar @ ks[j]) for j in r]), 0)
                    for jj, j in enumerate(r):
                        weights[bi, hi, i, j] += p_region * inner[jj]
                out[bi, hi, i] = weights[bi, hi, i, :m] @ vs
    return out, weights


def _qkv(n, *, b=2, h=2, d=8, dv=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, h, n, dd, generator=gen, dtype=torch.float64) for dd in (d, d, dv))


CASES = [(v, c, p) for v in ("fixed", "axial") for c in (False, True) for p in ("max", "mean")] + [("logsparse", True, p) for p in ("max", "mean")]


def _block(variant, block):
    return None if variant == "logsparse" else block


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant, causal, pooling", CASES)
def test_equals_the_factorization_written_out_per_query(backend, variant, causal, pooling):
    q, k, v = _qkv(14, dv=5)  # 14 = 3 full blocks of 4 and a partial one
    want, _ = _oracle(q, k, v, block=4, variant=variant, causal=causal, pooling=pooling)
    got = combiner_attention(q, k, v, block_size=_block(variant, 4), variant=variant, causal=causal, pooling=pooling, backend=backend)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("variant, causal, pooling", CASES)
def test_every_key_of_the_support_gets_mass_and_rows_sum_to_one(variant, causal, pooling):
    q, k, v = _qkv(23)
    p = combiner_weights(q, k, block_size=_block(variant, 5), variant=variant, causal=causal, pooling=pooling)
    support = torch.ones(23, 23, dtype=torch.bool)
    if causal:
        support = support.tril()
    torch.testing.assert_close(p.sum(-1), torch.ones(2, 2, 23, dtype=torch.float64), atol=1e-12, rtol=0)
    assert torch.equal(p > 0, support.expand_as(p)), "full coverage: every key of the support, and only those, gets positive mass"
    _, oracle_p = _oracle(q, k, v, block=5, variant=variant, causal=causal, pooling=pooling)
    torch.testing.assert_close(p, oracle_p, atol=1e-12, rtol=1e-10)
    out = combiner_attention(q, k, v, block_size=_block(variant, 5), variant=variant, causal=causal, pooling=pooling, backend="factorized")
    torch.testing.assert_close(out, p @ v, atol=1e-12, rtol=1e-10)


def test_it_is_not_softmax_attention_in_general():
    """The abstraction is an approximation of p(j|i) inside a region: it differs from softmax."""
    q, k, v = _qkv(32)
    out = combiner_attention(q, k, v, block_size=4)
    assert (out - attnzoo.softmax_attention(q, k, v)).abs().max() > 1e-3


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("backend", BACKENDS)
def test_degenerate_partitions_are_softmax_attention(backend, causal):
    """One segment / one row holds every key (all direct); segments of one token make every
    abstraction that token itself (kbar = k_j, q(j|r) = 1): both are exact softmax attention."""
    q, k, v = _qkv(11)
    want = attnzoo.softmax_attention(q, k, v, causal=causal)
    for variant, block in (("fixed", 11), ("fixed", 1), ("axial", 11), ("fixed", 50)):
        got = combiner_attention(q, k, v, block_size=block, variant=variant, causal=causal, backend=backend)
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10, msg=lambda m, variant=variant, block=block: f"{variant} block {block}: {m}")


@pytest.mark.parametrize("variant", ["fixed", "axial", "logsparse"])
def test_gradients_match_the_reference_and_pass_gradcheck(variant):
    q, k, v = (t.requires_grad_() for t in _qkv(10, b=1, h=2, d=4, dv=3, seed=3))
    for causal in (False, True) if variant != "logsparse" else (True,):
        grads = []
        for backend in BACKENDS:
            out = combiner_attention(q, k, v, block_size=_block(variant, 3), variant=variant, causal=causal, backend=backend)
            weight = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
            grads.append(torch.autograd.grad((out * weight).sum(), (q, k, v)))
        for a, e in zip(*grads):
            torch.testing.assert_close(a, e, atol=1e-10, rtol=1e-8)
        assert all(float(g.abs().sum()) > 0 for g in grads[1])
    fn = lambda q, k, v: combiner_attention(q, k, v, block_size=_block(variant, 3), variant=variant, pooling="mean", causal=True, backend="factorized")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v))


@pytest.mark.parametrize("variant", ["fixed", "axial", "logsparse"])
def test_causal_outputs_ignore_the_future(variant):
    q, k, v = _qkv(19)
    full = combiner_attention(q, k, v, block_size=_block(variant, 4), variant=variant, causal=True, backend="factorized")
    for cut in (1, 4, 7, 13):
        prefix = combiner_attention(q[:, :, :cut], k[:, :, :cut], v[:, :, :cut], block_size=_block(variant, 4), variant=variant, causal=True, backend="factorized")
        torch.testing.assert_close(prefix, full[:, :, :cut], atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant, causal, pooling", CASES)
def test_padding_equals_each_sequence_alone_and_the_oracle(backend, variant, causal, pooling, side):
    """The partition starts at each sequence's first real token: pads on either side change nothing."""
    q, k, v = _qkv(13)
    lengths = [13, 8]
    pos = torch.arange(13)[None, :]
    pad = pos >= torch.tensor(lengths)[:, None] if side == "right" else pos < 13 - torch.tensor(lengths)[:, None]
    got = combiner_attention(q, k, v, block_size=_block(variant, 3), variant=variant, causal=causal, pooling=pooling, key_padding_mask=pad, backend=backend)
    for bi, m in enumerate(lengths):
        real = slice(0, m) if side == "right" else slice(13 - m, 13)
        alone = tuple(t[bi : bi + 1, :, real] for t in (q, k, v))
        want, _ = _oracle(*alone, block=3, variant=variant, causal=causal, pooling=pooling)
        torch.testing.assert_close(got[bi : bi + 1, :, real], want, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
def test_scattered_pads_are_excluded_keys_and_an_empty_entry_gives_zeros(backend):
    q, k, v = _qkv(14)
    pad = torch.zeros(2, 14, dtype=torch.bool)
    pad[0, [2, 5, 6, 11]] = True
    pad[1] = True
    out = combiner_attention(q, k, v, block_size=4, variant="axial", key_padding_mask=pad, backend=backend)
    assert torch.all(out[1] == 0)
    k2, v2 = k.clone(), v.clone()
    k2[0][:, pad[0]], v2[0][:, pad[0]] = 1e3, 1e6  # what pads hold never reaches an output
    torch.testing.assert_close(combiner_attention(q, k2, v2, block_size=4, variant="axial", key_padding_mask=pad, backend=backend), out)
    p = combiner_weights(q, k, block_size=4, variant="axial", key_padding_mask=pad)
    assert torch.all(p[0][:, :, pad[0]] == 0) and torch.all(p[0][:, ~pad[0]][:, :, ~pad[0]] > 0)


def test_shapes_dtypes_and_value_dim():
    q, k = torch.randn(2, 3, 50, 16), torch.randn(2, 3, 50, 16)
    v = torch.randn(2, 3, 50, 24)
    for variant in ("fixed", "axial"):
        out = combiner_attention(q, k, v, block_size=7, variant=variant)
        assert out.shape == (2, 3, 50, 24) and out.dtype == torch.float32
        half = combiner_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), block_size=7, variant=variant)
        assert half.dtype == torch.bfloat16
        torch.testing.assert_close(half.float(), out, atol=3e-2, rtol=3e-2)


def test_dispatch_picks_the_factorized_backend():
    x = torch.randn(1, 2, 64, 16)
    assert [n for n, why in COMBINER.explain(x, x, x, block_size=8) if why is None][0] == "factorized"


def test_bad_inputs_name_the_argument():
    x = torch.randn(1, 2, 12, 8)
    for kwargs, name in (
        (dict(block_size=0), "block_size"),
        (dict(block_size=2.0), "block_size"),
        (dict(block_size=4, variant="dilated"), "variant"),
        (dict(block_size=4, pooling="sum"), "pooling"),
        (dict(block_size=4, causal=1), "causal"),
        (dict(block_size=4, scale=-1.0), "scale"),
        (dict(variant="fixed"), "block_size"),
        (dict(variant="logsparse", block_size=4, causal=True), "block_size"),
        (dict(variant="logsparse"), "variant"),  # autoregressive only
    ):
        with pytest.raises(ParameterError) as err:
            combiner_attention(x, x, x, **kwargs)
        assert err.value.argument == name
    with pytest.raises(ParameterError) as err:
        COMBINER(x, x, x)  # block_size is required
    assert err.value.argument == "block_size"
    with pytest.raises(ParameterError) as err:
        combiner_attention(x, x, x, block_size=4, key_padding_mask=torch.zeros(1, 11, dtype=torch.bool))
    assert err.value.argument == "key_padding_mask"
    with pytest.raises(Exception, match="k|cross|length"):
        combiner_attention(x, torch.randn(1, 2, 10, 8), torch.randn(1, 2, 10, 8), block_size=4)


def test_factorized_holds_no_n_by_n_tensor():
    """The largest intermediate of the fast path at N = 4096, block 64 is O(N sqrt N), far below N^2."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Largest(TorchDispatchMode):
        biggest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    Largest.biggest = max(Largest.biggest, t.numel() // (t.shape[0] * t.shape[1]) if t.dim() >= 2 else t.numel())
            return out

    n = 4096
    x = torch.randn(1, 1, n, 16)
    for variant in ("fixed", "axial", "logsparse"):
        Largest.biggest = 0
        with Largest():
            combiner_attention(x, x, x, block_size=_block(variant, 64), variant=variant, causal=True, backend="factorized")
        assert Largest.biggest <= 4 * n * 64, f"{variant}: an intermediate of {Largest.biggest} elements per head"


def test_hooks_see_the_distribution():
    from attnzoo.hooks import weights_of

    q, k, v = _qkv(12)
    w, is_distribution = weights_of(COMBINER, q, k, v, block_size=4, variant="axial", causal=True)
    assert is_distribution
    torch.testing.assert_close(w @ v, combiner_attention(q, k, v, block_size=4, variant="axial", causal=True), atol=1e-12, rtol=1e-10)


def test_logsparse_regions_tile_the_past_in_log_many_spans():
    """Query i = 0b1011 (11) reads i itself and the spans [10, 11), [8, 10), [0, 8): three regions."""
    direct, regions = _partition_of(11, 16, 0, "logsparse", True)
    assert direct == [11] and regions == [[10], [8, 9], list(range(8))]
    q, k, v = _qkv(16)
    p = combiner_weights(q, k, block_size=None, variant="logsparse", causal=True)
    # inside a span of several keys the weights follow the span's own softmax (qbar . k_j): one ratio per span
    span = p[0, 0, 11, :8]
    inner = torch.softmax(q[0, 0, :8].max(0).values @ k[0, 0, :8].T / 8**0.5, 0)
    torch.testing.assert_close(span / span.sum(), inner, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("variant", ["fixed", "axial", "logsparse"])
def test_causal_queries_ahead_of_the_first_real_token_output_zero_and_see_no_future(variant):
    q, k, v = _qkv(12)
    pad = torch.zeros(2, 12, dtype=torch.bool)
    pad[:, :3] = True
    for backend in BACKENDS:
        out = combiner_attention(q, k, v, block_size=_block(variant, 4), variant=variant, causal=True, key_padding_mask=pad, backend=backend)
        assert torch.all(out[:, :, :3] == 0) and torch.all(out[:, :, 3:].abs().sum(-1) > 0)
        later = [t.clone() for t in (q, k, v)]
        for t in later:
            t[:, :, 7:] = torch.randn_like(t[:, :, 7:])
        again = combiner_attention(*later, block_size=_block(variant, 4), variant=variant, causal=True, key_padding_mask=pad, backend=backend)
        torch.testing.assert_close(again[:, :, :7], out[:, :, :7], atol=1e-12, rtol=1e-10)
