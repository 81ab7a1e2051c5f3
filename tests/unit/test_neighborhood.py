"""neighborhood (L1): NATTEN's window semantics, stride (GNA), the rpb table and the neighbour
table, each checked against an independent formulation."""

from __future__ import annotations

import dataclasses
import itertools
import math
import random

import pytest
import torch

import attnzoo
from attnzoo import masks
from attnzoo.errors import ParameterError, ShapeError
from attnzoo.functional.local import NeighborhoodMask
from attnzoo.functional.local.neighborhood import neighbor_table
from attnzoo.kernels.gathered import native_usable

NA = attnzoo.get("neighborhood")


def natten_window_start(index: int, length: int, kernel: int, dilation: int) -> int:
    """NATTEN's non-causal window start (odd kernels), in absolute indices, as NATTEN states it."""
    nb = kernel // 2
    if dilation <= 1:
        return max(index - nb, 0) + (index + nb >= length) * (length - index - nb - 1)
    ni = index - nb * dilation
    if ni < 0:
        return index % dilation
    if index + nb * dilation >= length:
        imodd = index % dilation
        a = (length // dilation) * dilation
        b = length - a
        if imodd < b:
            return length - b + imodd - 2 * nb * dilation
        return a + imodd - kernel * dilation
    return ni


def natten_pb_start(index: int, length: int, kernel: int, dilation: int) -> int:
    """NATTEN <= 0.17's first rpb entry of a query's window (odd kernels), as NATTEN states it:
    window slot t of the query uses entry ``pb_start + t`` of the 2k - 1 table."""
    nb = kernel // 2
    if dilation <= 1:
        return nb + (index < nb) * (nb - index) + (index + nb >= length) * (length - index - 1 - nb)
    if index - nb * dilation < 0:
        return kernel - 1 - index // dilation
    if index + nb * dilation >= length:
        return (length - index - 1) // dilation
    return nb


def pattern(shape, kernel, dilation=None, stride=None, causal=None):
    ones = (1,) * len(shape)
    return NeighborhoodMask(tuple(shape), tuple(kernel), tuple(dilation or ones), tuple(stride or ones), tuple(causal or (False,) * len(shape)))


def dense(p):
    n = math.prod(p.shape)
    return masks.dense_mask(p, n, n)[0, 0]


def mask_1d(length, kernel, dilation=1, causal=False, stride=1):
    return dense(pattern((length,), (kernel,), (dilation,), (stride,), (causal,)))


def random_geometry(rng: random.Random, n_axes: int, max_size: int):
    """A valid (shape, kernel, dilation, stride, causal), every option drawn per axis."""
    shape, kernel, dilation, stride, causal = [], [], [], [], []
    for _ in range(n_axes):
        size = rng.randint(1, max_size)
        d = rng.randint(1, max(1, size // 2))
        k = rng.randint(1, size // d)
        shape.append(size)
        dilation.append(d)
        kernel.append(k)
        stride.append(rng.randint(1, k))
        causal.append(rng.random() < 0.4)
    return tuple(shape), tuple(kernel), tuple(dilation), tuple(stride), tuple(causal)


# --------------------------------------------------------------------------------------------
# windows
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("length", range(1, 26))
def test_matches_nattens_window_rule(length):
    for kernel in range(1, length + 1, 2):
        for dilation in range(1, length // kernel + 1):
            m = mask_1d(length, kernel, dilation)
            for i in range(length):
                start = natten_window_start(i, length, kernel, dilation)
                want = {start + dilation * t for t in range(kernel)}
                got = set(m[i].nonzero().flatten().tolist())
                assert got == want, f"L={length} k={kernel} d={dilation} i={i}: {sorted(got)} != {sorted(want)}"


@pytest.mark.parametrize("shape, kernel, dilation", [((9,), (4,), (2,)), ((7, 8), (3, 4), (2, 1)), ((4, 5, 6), (3, 2, 5), (1, 2, 1))])
def test_every_query_sees_exactly_the_kernel_volume(shape, kernel, dilation):
    m = dense(pattern(shape, kernel, dilation))
    assert torch.all(m.sum(-1) == math.prod(kernel))


def test_causal_windows_end_at_the_query():
    m = mask_1d(12, 4, dilation=2, causal=True)
    for i in range(12):
        p, g = i // 2, i % 2
        want = {g + 2 * t for t in range(max(p - 3, 0), p + 1)}
        assert set(m[i].nonzero().flatten().tolist()) == want


def test_two_axes_are_the_product_of_one():
    rows, cols = mask_1d(6, 3, 2, stride=2), mask_1d(7, 5, 1, causal=True, stride=3)
    m = dense(pattern((6, 7), (3, 5), (2, 1), (2, 3), (False, True))).view(6, 7, 6, 7)
    for a, b in itertools.product(range(6), range(7)):
        assert torch.equal(m[a, b], rows[a][:, None] & cols[b][None, :])


def test_causal_1d_neighborhood_is_a_causal_sliding_window():
    x = torch.randn(2, 3, 40, 16, dtype=torch.float64)
    out = attnzoo.neighborhood_attention(x, x, x, kernel_size=9, causal=True)
    torch.testing.assert_close(out, attnzoo.sliding_window_attention(x, x, x, window=(8, 0), causal=True))


# --------------------------------------------------------------------------------------------
# stride (Generalized Neighborhood Attention)
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("length, kernel, stride, dilation", [(13, 5, 2, 1), (16, 4, 3, 2), (11, 3, 3, 3), (9, 6, 4, 1)])
def test_a_stride_group_shares_its_leaders_window(length, kernel, stride, dilation):
    """GNA's rule: every query of a stride group sees the plain (stride 1) window of the group's
    centre query (right of centre for even strides; where a short group at the border has no
    centre, the last query of the dilation group stands in, as in NATTEN)."""
    strided, plain = mask_1d(length, kernel, dilation, stride=stride), mask_1d(length, kernel, dilation)
    for i in range(length):
        members = list(range(i % dilation, length, dilation))  # i's dilation group, in order
        first = (i // dilation // stride) * stride
        leader = members[min(first + stride // 2, len(members) - 1)]
        assert torch.equal(strided[i], plain[leader]), f"query {i} does not see the window of its leader {leader}"


@pytest.mark.parametrize("shape, kernel", [((12,), (4,)), ((6, 9), (3, 3)), ((4, 6, 4), (2, 3, 2))])
def test_stride_equal_to_the_kernel_is_window_attention(shape, kernel):
    """stride = kernel_size tiles the grid into blocks: Swin's (unshifted) window attention."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, *shape, 8, dtype=torch.float64) for _ in range(3))
    out = attnzoo.neighborhood_attention(q, k, v, kernel_size=kernel, stride=kernel)
    torch.testing.assert_close(out, attnzoo.window_attention(q, k, v, window_size=kernel))


def test_causal_stride_shares_the_window_start_and_never_sees_the_future():
    length, kernel, stride = 14, 5, 3
    m = mask_1d(length, kernel, causal=True, stride=stride)
    for i in range(length):
        last_of_group = min((i // stride) * stride + stride - 1, length - 1)
        want = set(range(max(last_of_group - kernel + 1, 0), i + 1))
        assert set(m[i].nonzero().flatten().tolist()) == want, f"query {i}"


def test_stride_one_is_plain_neighborhood_attention():
    x = torch.randn(1, 2, 7, 9, 8)
    torch.testing.assert_close(NA(x, x, x, kernel_size=3, stride=1), NA(x, x, x, kernel_size=3))


# --------------------------------------------------------------------------------------------
# relative positional bias
# --------------------------------------------------------------------------------------------
def natten_rpb_attention_1d(q, k, v, rpb, kernel, dilation):
    """NATTEN <= 0.17's 1D NA with rpb, a query at a time: scores over the window slots plus
    ``rpb[h, pb_start + t]``, softmax, weighted values. q, k, v (H, L, D), rpb (H, 2k-1)."""
    heads, length, d = q.shape
    out = torch.empty_like(q)
    for i in range(length):
        start, pb = natten_window_start(i, length, kernel, dilation), natten_pb_start(i, length, kernel, dilation)
        keys = [start + t * dilation for t in range(kernel)]
        s = q[:, i : i + 1] @ k[:, keys].transpose(-1, -2) * d**-0.5 + rpb[:, pb : pb + kernel].unsqueeze(1)
        out[:, i] = (s.softmax(-1) @ v[:, keys]).squeeze(1)
    return out


@pytest.mark.parametrize("backend", ["reference", "tiled"])
@pytest.mark.parametrize("length, kernel, dilation", [(9, 3, 1), (13, 5, 2), (17, 5, 3), (7, 7, 1), (20, 3, 6)])
def test_rpb_follows_nattens_bias_rule(backend, length, kernel, dilation):
    torch.manual_seed(length)
    q, k, v = (torch.randn(1, 3, length, 8, dtype=torch.float64) for _ in range(3))
    rpb = torch.randn(3, 2 * kernel - 1, dtype=torch.float64)
    out = attnzoo.neighborhood_attention(q, k, v, kernel_size=kernel, dilation=dilation, rpb=rpb, backend=backend)
    torch.testing.assert_close(out[0], natten_rpb_attention_1d(q[0], k[0], v[0], rpb, kernel, dilation))


def test_rpb_of_two_axes_indexes_the_table_row_major():
    """NATTEN 2D: entry (pb_i + ti, pb_j + tj) of the (2k-1, 2k-1) table, row then column."""
    shape, kernel, dilation = (7, 10), (3, 5), (2, 1)
    p = pattern(shape, kernel, dilation)
    index, rel = neighbor_table(shape, kernel, dilation)
    for qi, qj in itertools.product(range(shape[0]), range(shape[1])):
        row = qi * shape[1] + qj
        for slot, (ti, tj) in enumerate(itertools.product(range(kernel[0]), range(kernel[1]))):
            key_i = natten_window_start(qi, shape[0], kernel[0], dilation[0]) + ti * dilation[0]
            key_j = natten_window_start(qj, shape[1], kernel[1], dilation[1]) + tj * dilation[1]
            entry_i = natten_pb_start(qi, shape[0], kernel[0], dilation[0]) + ti
            entry_j = natten_pb_start(qj, shape[1], kernel[1], dilation[1]) + tj
            assert index[row, slot] == key_i * shape[1] + key_j
            assert rel[row, slot] == entry_i * (2 * kernel[1] - 1) + entry_j
            assert p.bias_index(torch.tensor(row), index[row, slot]) == rel[row, slot]


def test_a_zero_rpb_changes_nothing_and_a_constant_one_cancels():
    x = torch.randn(1, 2, 6, 7, 8, dtype=torch.float64)
    plain = NA(x, x, x, kernel_size=(3, 4), stride=(2, 1))
    for table in (torch.zeros(2, 5, 7, dtype=torch.float64), torch.full((2, 5, 7), 3.0, dtype=torch.float64)):
        torch.testing.assert_close(NA(x, x, x, kernel_size=(3, 4), stride=(2, 1), rpb=table), plain)


@pytest.mark.parametrize(
    "shape, kw",
    [
        ((19,), dict(kernel_size=4, dilation=2, stride=3)),
        ((7, 9), dict(kernel_size=(3, 4), dilation=(2, 1), stride=(2, 4), causal=(True, False))),
        ((4, 5, 6), dict(kernel_size=(2, 3, 3), stride=(1, 2, 3), causal=(False, False, True))),
    ],
    ids=["1d", "2d", "3d"],
)
def test_rpb_gradient_on_tiled_equals_the_reference(shape, kw):
    torch.manual_seed(0)
    q = torch.randn(2, 4, *shape, 8, dtype=torch.float64, requires_grad=True)  # 4 query heads on 2 KV heads
    k = torch.randn(2, 2, *shape, 8, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 2, *shape, 5, dtype=torch.float64, requires_grad=True)
    kernel = kw["kernel_size"] if isinstance(kw["kernel_size"], tuple) else (kw["kernel_size"],) * len(shape)
    rpb = torch.randn(4, *(2 * s - 1 for s in kernel), dtype=torch.float64, requires_grad=True)
    weight = torch.randn(2, 4, *shape, 5, dtype=torch.float64)
    grads = {}
    for backend in ("reference", "tiled"):
        out = attnzoo.neighborhood_attention(q, k, v, rpb=rpb, backend=backend, **kw)
        grads[backend] = torch.autograd.grad((out * weight).sum(), (q, k, v, rpb))
    for name, got, want in zip("qkv", grads["tiled"], grads["reference"]):
        torch.testing.assert_close(got, want, msg=lambda m, name=name: f"d{name}: {m}")
    torch.testing.assert_close(grads["tiled"][3], grads["reference"][3], msg=lambda m: f"drpb: {m}")
    assert grads["reference"][3].abs().sum() > 0


def test_reference_rpb_gradcheck():
    torch.manual_seed(1)
    q, k, v = (torch.randn(1, 1, 5, 3, 2, dtype=torch.float64, requires_grad=True) for _ in range(3))
    rpb = torch.randn(1, 5, 3, dtype=torch.float64, requires_grad=True)

    def fn(q, k, v, rpb):
        return NA(q, k, v, kernel_size=(3, 2), stride=(2, 1), causal=(False, True), rpb=rpb, backend="reference")

    assert torch.autograd.gradcheck(fn, (q, k, v, rpb))


def test_a_learnable_rpb_trains_through_dispatch_and_its_output_stays_editable():
    x = torch.randn(1, 2, 10, 8)
    rpb = torch.zeros(2, 5, requires_grad=True)
    order = NA.explain(x, x, x, kernel_size=3, rpb=rpb)
    expected = "gathered" if native_usable(x.device, x.dtype) else "tiled"
    assert order[0] == (expected, None)
    out = attnzoo.neighborhood_attention(x, x, x, kernel_size=3, rpb=rpb)
    out.mul_(2)  # the result is an ordinary tensor, not a view autograd forbids editing
    out.sum().backward()
    assert rpb.grad is not None and rpb.grad.shape == rpb.shape


@pytest.mark.parametrize("backend", ["gathered", "tiled"])
@pytest.mark.parametrize(
    "shape, kernel, dilation, stride, causal",
    [((9, 11), (3, 5), (2, 1), (1, 2), (False, False)), ((6, 7), 3, 1, (3, 1), (True, False)), ((4, 5, 6), (3, 2, 3), 1, 1, False)],
)
def test_rpb_gradient_matches_the_reference(backend, shape, kernel, dilation, stride, causal):
    gen = torch.Generator().manual_seed(len(shape))
    q, k, v = (torch.randn(1, 2, *shape, 16, generator=gen, requires_grad=True) for _ in range(3))
    n = len(shape)
    ks = (kernel,) * n if isinstance(kernel, int) else kernel
    rpb = torch.randn(2, *(2 * x - 1 for x in ks), generator=gen, requires_grad=True)
    params = dict(kernel_size=kernel, dilation=dilation, stride=stride, causal=causal, rpb=rpb)
    grad = torch.randn(1, 2, *shape, 16, generator=gen)
    ours = torch.autograd.grad(NA(q, k, v, backend=backend, **params), (q, k, v, rpb), grad)
    ref = torch.autograd.grad(NA(q, k, v, backend="reference", **params), (q, k, v, rpb), grad)
    for name, a, b in zip(("q", "k", "v", "rpb"), ours, ref):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3, msg=lambda m, name=name: f"{name}: {m}")


# --------------------------------------------------------------------------------------------
# the neighbour table
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(40))
def test_neighbor_table_holds_exactly_the_keys_of_the_predicate(seed):
    rng = random.Random(seed)
    n_axes = 1 + seed % 3
    shape, kernel, dilation, stride, causal = random_geometry(rng, n_axes, {1: 24, 2: 9, 3: 5}[n_axes])
    p = pattern(shape, kernel, dilation, stride, causal)
    index, rel = neighbor_table(shape, kernel, dilation, stride, causal)
    n, slots = math.prod(shape), math.prod(kernel)
    assert index.shape == rel.shape == (n, slots) and index.dtype == rel.dtype == torch.int64
    seen = index >= 0
    got = torch.zeros(n, n, dtype=torch.bool)
    rows = torch.arange(n)[:, None].expand(n, slots)
    got[rows[seen], index[seen]] = True
    assert torch.equal(got, dense(p)), f"{p}"
    assert torch.equal(seen.sum(1), got.sum(1)), "a key listed twice in a row"
    assert torch.equal(rel >= 0, seen)
    assert torch.equal(rel[seen], p.bias_index(rows[seen], index[seen]))
    assert int(rel.max()) < math.prod(2 * k - 1 for k in kernel)
    if not any(causal):
        assert bool(seen.all()), "a non-causal window is always full"


def test_neighbor_table_slots_run_over_the_kernel_grid_row_major():
    index, rel = neighbor_table((5, 6), (3, 3))
    centre = 2 * 6 + 3  # query (2, 3): its window is rows 1-3, columns 2-4
    assert index[centre].tolist() == [r * 6 + c for r in (1, 2, 3) for c in (2, 3, 4)]
    assert rel[centre].tolist() == [r * 5 + c for r in (1, 2, 3) for c in (1, 2, 3)]  # the centre band of (5, 5)


def test_neighbor_table_is_built_without_an_n_by_n_tensor():
    index, _ = neighbor_table((512, 512), 3)  # N^2 would be 6.9e10 entries
    assert index.shape == (512 * 512, 9)


def test_neighbor_table_checks_its_arguments():
    for kwargs, name in (
        (dict(shape=(8,), kernel_size=9), "dilation"),
        (dict(shape=(8,), kernel_size=3, stride=4), "stride"),
        (dict(shape=(8,), kernel_size=3, stride=0), "stride"),
        (dict(shape=(8, 8), kernel_size=(3, 3, 3)), "kernel_size"),
        (dict(shape=(8,), kernel_size=3, causal="yes"), "causal"),
        (dict(shape=(0,), kernel_size=1), "shape"),
    ):
        with pytest.raises(ParameterError, match=name) as info:
            neighbor_table(**kwargs)
        assert info.value.argument == name


# --------------------------------------------------------------------------------------------
# layout and bad inputs
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["tiled", "reference"])
def test_spatial_layout_round_trips(backend):
    x = torch.randn(1, 2, 5, 6, 7, 8)
    out, lse = attnzoo.neighborhood_attention(x, x, x, kernel_size=3, return_lse=True, backend=backend)
    assert out.shape == x.shape and lse.shape == (1, 2, 5, 6, 7)


def test_bad_inputs_name_the_argument():
    x = torch.randn(1, 2, 6, 8, 16)
    with pytest.raises(ParameterError, match="kernel_size: expected a kernel no larger") as info:
        NA(x, x, x, kernel_size=(7, 3))
    assert info.value.argument == "kernel_size"
    with pytest.raises(ParameterError, match="dilation: kernel_size \\* dilation must fit") as info:
        NA(x, x, x, kernel_size=3, dilation=(3, 1))
    with pytest.raises(ParameterError, match="kernel_size: expected a positive int or a tuple of 2"):
        NA(x, x, x, kernel_size=(3, 3, 3))
    with pytest.raises(ParameterError, match="causal: expected a bool or a tuple of 2"):
        NA(x, x, x, kernel_size=3, causal=(True,))
    with pytest.raises(ShapeError, match="self-attention only"):
        NA(x, x[:, :, :5], x[:, :, :5], kernel_size=3)


@pytest.mark.parametrize(
    "params, message",
    [
        (dict(stride=(2, 4)), "stride: expected at most kernel_size on each axis: axis 1 has kernel 3, got stride 4"),
        (dict(stride=0), "stride: expected a positive int or a tuple of 2"),
        (dict(stride=(1, -1)), "stride: expected a positive int"),
        (dict(rpb=torch.zeros(2, 5, 7)), r"rpb: expected shape \(2, 5, 5\) \(heads, 2 \* kernel_size - 1 per axis\), got \(2, 5, 7\)"),
        (dict(rpb=torch.zeros(3, 5, 5)), r"rpb: expected None or a floating tensor of shape \(heads=2, 2k-1, 2k-1\)"),
        (dict(rpb=torch.zeros(2, 5, 5, dtype=torch.int64)), "rpb: expected None or a floating tensor"),
        (dict(rpb=torch.zeros(2, 25)), "rpb: expected None or a floating tensor"),
        (dict(rpb=torch.zeros(2, 5, 5, device="meta")), "on cpu"),
    ],
)
def test_bad_stride_and_rpb_name_the_argument(params, message):
    x = torch.randn(1, 2, 6, 8, 16)
    with pytest.raises(ParameterError, match=message) as info:
        NA(x, x, x, kernel_size=3, **params)
    assert info.value.argument == next(iter(params))


def test_flex_takes_a_learnable_rpb_on_cuda_and_says_why_not_on_cpu():
    x = torch.randn(1, 2, 6, 8, 32)
    rpb = torch.zeros(2, 5, 5, requires_grad=True)
    problem, params = NA.prepare(x, x, x, {"kernel_size": 3, "rpb": rpb})
    on_cuda = dataclasses.replace(problem, device=torch.device("cuda"))  # FlexAttention differentiates the captured table there
    assert NA.backends["flex"].decline_reason(on_cuda, params) is None
    assert NA.backends["flex"].decline_reason(problem, params).startswith("forward only on CPU")


@pytest.mark.slow
def test_flex_carries_rpb_as_its_score_mod():
    """Compiled FlexAttention (a CPU compile: slow) with rpb, stride, dilation and a causal axis."""
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 8, 8, 64), torch.randn(2, 2, 8, 8, 64), torch.randn(2, 2, 8, 8, 64)
    kw = dict(kernel_size=(3, 5), stride=(2, 3), dilation=(2, 1), causal=(False, True), rpb=torch.randn(4, 5, 9))
    out = attnzoo.neighborhood_attention(q, k, v, backend="flex", **kw)
    torch.testing.assert_close(out, attnzoo.neighborhood_attention(q, k, v, backend="reference", **kw), atol=2e-5, rtol=2e-4)


# --------------------------------------------------------------------------------------------
# key_padding_mask: 1D windows placed on each sequence's real keys, 2D/3D pads masked
# --------------------------------------------------------------------------------------------
from attnzoo.errors import NoBackendError  # noqa: E402
from attnzoo.functional.local.neighborhood import _SpanNeighborhood  # noqa: E402
from attnzoo.functional.local._shared import key_spans  # noqa: E402

from .padding import LENGTHS as PAD_LENGTHS, N as PAD_N, assert_padded_equals_alone, padding, real  # noqa: E402
from .qkv import random_qkv  # noqa: E402

#: Geometries that fit the shortest padded sequence (4 tokens): even kernels, dilation, stride, causal.
PADDED_GEOMETRIES = [
    dict(kernel_size=3),
    dict(kernel_size=4, causal=True),
    dict(kernel_size=2, dilation=2),
    dict(kernel_size=4, stride=2),
    dict(kernel_size=2, dilation=2, stride=2, causal=True),
]


@pytest.mark.parametrize("backend", ["reference", "tiled"])
@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("geometry", PADDED_GEOMETRIES, ids=lambda g: "-".join(f"{k}{v}" for k, v in g.items()))
def test_1d_padded_batch_equals_each_sequence_alone_although_windows_shift_at_the_end(geometry, side, backend):
    q, k, v = random_qkv(b=3, h=4, nq=PAD_N, nk=PAD_N, kv_heads=2)
    rpb = torch.randn(4, 2 * geometry["kernel_size"] - 1, dtype=torch.float64)
    attend = lambda *t, **kw: NA(*t, rpb=rpb, backend=backend, **geometry, **kw)  # noqa: E731
    assert_padded_equals_alone(attend, q, k, v, side)


def test_masking_alone_would_not_be_exact_for_neighborhood_attention():
    """Why the windows move: near a sequence's end NATTEN's window shifts inward, by its length."""
    q, k, v = random_qkv(b=3, nq=PAD_N, nk=PAD_N)
    pad = padding("right")
    placed = NA(q, k, v, kernel_size=3, key_padding_mask=pad)
    masked_only = attnzoo.softmax_attention(q, k, v, key_padding_mask=pad, mask_mod=pattern((PAD_N,), (3,)))
    rows = real(PAD_LENGTHS[1], "right")
    alone = NA(q[1:2, :, rows], k[1:2, :, rows], v[1:2, :, rows], kernel_size=3)
    torch.testing.assert_close(placed[1:2, :, rows], alone)
    assert not torch.allclose(masked_only[1:2, :, rows], alone)


@pytest.mark.parametrize("side", ["right", "left"])
def test_1d_rpb_gradient_with_padding_is_the_sum_of_the_sequences_alone(side):
    q, k, v = random_qkv(b=3, h=2, nq=PAD_N, nk=PAD_N)
    rpb = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    params = dict(kernel_size=2, dilation=2)
    weight = torch.randn(3, 2, PAD_N, v.shape[-1], dtype=torch.float64)
    pad = padding(side)
    for backend in ("reference", "tiled"):
        out = NA(q, k, v, rpb=rpb, key_padding_mask=pad, backend=backend, **params)
        got = torch.autograd.grad((out * weight).sum(), rpb)[0]
        want = 0
        for b, length in enumerate(PAD_LENGTHS):
            rows = real(length, side)
            alone = NA(q[b : b + 1, :, rows], k[b : b + 1, :, rows], v[b : b + 1, :, rows], rpb=rpb, backend=backend, **params)
            want = want + torch.autograd.grad((alone * weight[b : b + 1, :, rows]).sum(), rpb)[0]
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-8, msg=lambda m: f"{backend}: {m}")


def test_1d_query_rows_outside_a_sequence_output_zero():
    q, k, v = random_qkv(b=3, nq=PAD_N, nk=PAD_N)
    pad = padding("left")
    for backend in ("reference", "tiled"):
        out = NA(q, k, v, kernel_size=3, key_padding_mask=pad, backend=backend)
        assert torch.all(out[pad[:, None, :].expand(-1, out.shape[1], -1)] == 0), backend


def test_the_span_tile_plan_covers_every_pair_it_must():
    """Long padded sequences: the closed-form tile grid of the span pattern may over-report, never under."""
    n = 700
    pad = torch.zeros(3, n, dtype=torch.bool)
    pad[0, 450:] = True
    pad[1, :333] = True
    pad[2, :50] = True
    pad[2, 600:] = True
    base = pattern((n,), (9,), dilation=(3,), stride=(2,))
    first, stop = key_spans(pad)
    span = _SpanNeighborhood(base, first, stop - first)
    plan = masks.plan_for(span, n, n, batch=3)
    visit, _ = masks.tile_grid(span, n, n, plan.block_q, plan.block_k, batch=3)
    needed = masks.dense_mask(span, n, n, batch=3).any(dim=(0, 1))  # (n, n): a pair some entry attends
    bq, bk = plan.block_q, plan.block_k
    needed_tiles = torch.nn.functional.pad(needed, (0, -n % bk, 0, -n % bq)).view(-(-n // bq), bq, -(-n // bk), bk).any(dim=(1, 3))
    assert torch.all(visit | ~needed_tiles)
    assert not visit.all(), "the plan skips the tiles no window reaches"
    q, k, v = random_qkv(b=3, h=1, nq=n, nk=n, d=4, dv=4)
    params = dict(kernel_size=9, dilation=3, stride=2, key_padding_mask=pad)
    torch.testing.assert_close(NA(q, k, v, backend="tiled", **params), NA(q, k, v, backend="reference", **params), atol=1e-12, rtol=1e-10)


def test_2d_padding_masks_keys_out_of_windows_that_stay_in_place():
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 2, 6, 7, 8, generator=gen, dtype=torch.float64) for _ in range(3))
    pad = torch.zeros(2, 6, 7, dtype=torch.bool)
    pad[0, 4:, :] = True  # an image padded at the bottom
    pad[1, :, 5:] = True  # and one at the right
    params = dict(kernel_size=(3, 3), dilation=(1, 2))
    rpb = torch.randn(2, 5, 5, dtype=torch.float64)
    allowed = dense(pattern((6, 7), (3, 3), dilation=(1, 2)))  # the windows of the full grid
    for backend in ("reference", "tiled"):
        out = NA(q, k, v, rpb=rpb, key_padding_mask=pad, backend=backend, **params)
        plain = NA(q, k, v, rpb=rpb, backend="reference", **params)
        for b in range(2):
            reaches_a_pad = (allowed & pad[b].reshape(1, -1)).any(-1)  # (42,): windows holding a pad
            got, want = out[b].reshape(2, 42, -1), plain[b].reshape(2, 42, -1)
            # a window without pads is the plain window: it was not moved to avoid the pads
            torch.testing.assert_close(got[:, ~reaches_a_pad], want[:, ~reaches_a_pad], msg=backend)
            assert not torch.allclose(got[:, reaches_a_pad], want[:, reaches_a_pad]), backend


def test_gathered_takes_no_padding_and_says_so():
    q, k, v = random_qkv(b=3, nq=PAD_N, nk=PAD_N)
    with pytest.raises(NoBackendError, match="key_padding_mask"):
        NA(q.float(), k.float(), v.float(), kernel_size=3, key_padding_mask=padding("right"), backend="gathered")
