"""Sparsifiner (catalog S8): the functional mechanism against a per-query loop of the paper's rule
(A_approx = C W_up, top-keep per query, softmax on the kept pairs), full budget == softmax,
padding, gradients, bad inputs; the module: shapes, the predictor written out, where gradients
flow, the reconstruction loss written out and decreasing under training."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import attnzoo
from attnzoo.errors import ParameterError, ShapeError
from attnzoo.functional.sparse import sparsifiner_attention
from attnzoo.nn import Sparsifiner, sparsifiner_reconstruction_loss


def _inputs(b=2, h=2, nq=30, nk=30, d=16, r=5, hkv=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hkv = h if hkv is None else hkv
    q = torch.randn(b, h, nq, d, generator=gen, dtype=torch.float64)
    k = torch.randn(b, hkv, nk, d, generator=gen, dtype=torch.float64)
    v = torch.randn(b, hkv, nk, 8, generator=gen, dtype=torch.float64)
    coef = torch.randn(b, h, nq, r, generator=gen, dtype=torch.float64).softmax(-1)
    basis = torch.randn(r, nk, generator=gen, dtype=torch.float64)
    return q, k, v, coef, basis


def _loop(q, k, v, coef, basis, keep, scale, pad=None):
    """Per query: predicted row, its ``keep`` best keys (ties: lowest index), softmax over them."""
    b, h, nq, _ = q.shape
    group = h // k.shape[1]
    out = torch.zeros(b, h, nq, v.shape[-1], dtype=q.dtype)
    for bi in range(b):
        for hi in range(h):
            for i in range(nq):
                row = [float(sum(coef[bi, hi, i, r] * basis[r, j] for r in range(basis.shape[0]))) for j in range(k.shape[2])]
                cands = [j for j in range(k.shape[2]) if pad is None or not pad[bi, j]]
                kept = sorted(cands, key=lambda j: (-row[j], j))[:keep]
                s = torch.stack([q[bi, hi, i] @ k[bi, hi // group, j] * scale for j in kept])
                w = torch.softmax(s, 0)
                out[bi, hi, i] = sum(wj * v[bi, hi // group, j] for wj, j in zip(w, kept))
    return out


@pytest.mark.parametrize("backend", ["reference", "gathered"])
@pytest.mark.parametrize("nq, nk, keep, hkv", [(30, 30, 7, 2), (11, 25, 1, 1), (20, 20, 20, 2)], ids=["self-k7", "cross-k1-gqa", "self-full"])
def test_matches_per_query_loop(backend, nq, nk, keep, hkv):
    q, k, v, coef, basis = _inputs(nq=nq, nk=nk, hkv=hkv, seed=nq + keep)
    got = sparsifiner_attention(q, k, v, coef=coef, basis=basis, keep=keep, scale=0.3, backend=backend)
    torch.testing.assert_close(got, _loop(q, k, v, coef, basis, keep, 0.3), atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("backend", ["reference", "gathered"])
def test_full_budget_is_softmax(backend):
    q, k, v, coef, basis = _inputs(nq=40, nk=40, seed=2)
    out = sparsifiner_attention(q, k, v, coef=coef, basis=basis, keep=40, backend=backend)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("backend", ["reference", "gathered"])
def test_padded_keys_are_never_attended(backend):
    q, k, v, coef, basis = _inputs(nq=12, nk=18, seed=4)
    pad = torch.zeros(2, 18, dtype=torch.bool)
    pad[0, 13:] = True
    pad[1, ::3] = True
    got = sparsifiner_attention(q, k, v, coef=coef, basis=basis, keep=6, key_padding_mask=pad, backend=backend)
    torch.testing.assert_close(got, _loop(q, k, v, coef, basis, 6, 16**-0.5, pad), atol=1e-12, rtol=1e-10)
    # right padding: the batch row equals the sequence alone with the basis cut to its keys
    alone = sparsifiner_attention(q[:1], k[:1, :, :13], v[:1, :, :13], coef=coef[:1], basis=basis[:, :13], keep=6, backend=backend)
    torch.testing.assert_close(got[:1], alone, atol=1e-12, rtol=1e-10)


def test_gradients_flow_to_qkv_not_to_the_predictor():
    q, k, v, coef, basis = _inputs(seed=6)
    grads = {}
    for backend in ("reference", "gathered"):
        leaves = [t.clone().requires_grad_() for t in (q, k, v, coef, basis)]
        out, lse = sparsifiner_attention(*leaves[:3], coef=leaves[3], basis=leaves[4], keep=5, return_lse=True, backend=backend)
        (out.pow(2).sum() + lse.sum()).backward()
        grads[backend] = [t.grad for t in leaves]
        assert leaves[3].grad is None and leaves[4].grad is None  # the mask is discrete (the code's attn_mask.detach_())
    for got, want in zip(grads["gathered"][:3], grads["reference"][:3]):
        assert bool(got.abs().sum() > 0)
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize(
    "change, argument",
    [(dict(keep=0), "keep"), (dict(keep=31), "keep"), (dict(keep=2.0), "keep"), (dict(basis=torch.zeros(4, 30, dtype=torch.float64)), "basis"),
     (dict(basis=torch.zeros(5, 29, dtype=torch.float64)), "basis"), (dict(coef=torch.zeros(2, 2, 29, 5, dtype=torch.float64)), "coef")],
)
def test_bad_inputs_name_the_argument(change, argument):
    q, k, v, coef, basis = _inputs()
    params = dict(coef=coef, basis=basis, keep=5) | change
    with pytest.raises(ParameterError) as err:
        sparsifiner_attention(q, k, v, **params)
    assert err.value.argument == argument and argument in str(err.value)


# --------------------------------------------------------------------------------------------
# the module
# --------------------------------------------------------------------------------------------
def _layer(seed=0, **kw):
    torch.manual_seed(seed)
    return Sparsifiner(64, num_heads=4, num_tokens=48, **kw).double()


def test_module_shape_and_budget():
    layer = _layer()
    x = torch.randn(2, 48, 64, dtype=torch.float64)
    assert layer(x).shape == (2, 48, 64)
    assert layer.keep == math.ceil(0.25 * 48) and layer.reduced_n == 6 and layer.reduced_c == 8


def test_module_predictor_written_out():
    """C = softmax(q_c (k_c^T P_down) / sqrt(c)), A = C P_up^T; the sparse form keeps coef_topk per row
    and |P_up| above the threshold; forward attends each query's top-keep of A (dense check)."""
    layer = _layer(coef_topk=3)
    x = torch.randn(2, 48, 64, dtype=torch.float64)
    q, k, v = (t.view(2, 48, 4, 16).transpose(1, 2) for t in layer.qkv(x).chunk(3, -1))
    qc = q @ layer.proj_c_q.weight.T + layer.proj_c_q.bias
    kc = k @ layer.proj_c_k.weight.T + layer.proj_c_k.bias
    coef = torch.softmax(qc @ (kc.transpose(-1, -2) @ layer.proj_n) / math.sqrt(8), -1)
    got_coef, got_basis = layer.predict(q, k, sparse=False)
    torch.testing.assert_close(got_coef, coef)
    torch.testing.assert_close(got_basis, layer.proj_back_n.T)
    sparse_coef, sparse_basis = layer.predict(q, k, sparse=True)
    assert bool(((sparse_coef != 0).sum(-1) <= 3).all())
    kept = sparse_coef != 0
    torch.testing.assert_close(sparse_coef[kept], coef[kept])
    assert torch.equal(sparse_basis, torch.where(layer.proj_back_n.T.abs() > layer.basis_threshold, layer.proj_back_n.T.abs(), torch.zeros_like(sparse_basis)))
    approx = sparse_coef @ sparse_basis
    order = torch.sort(approx, dim=-1, descending=True, stable=True).indices[..., : layer.keep]
    allowed = torch.zeros_like(approx, dtype=torch.bool).scatter_(-1, order, True)
    dense = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
    torch.testing.assert_close(layer(x), layer.proj(dense.transpose(1, 2).reshape(2, 48, 64)))


def test_module_forward_gradients():
    """The sparse forward trains qkv and the output projection; the predictor gets no gradient
    from it (the mask is discrete): only the reconstruction loss trains the predictor."""
    layer = _layer()
    layer(torch.randn(2, 48, 64, dtype=torch.float64)).pow(2).sum().backward()
    assert layer.qkv.weight.grad is not None and bool(layer.qkv.weight.grad.abs().sum() > 0)
    assert all(p.grad is None for p in (layer.proj_n, layer.proj_back_n, layer.proj_c_q.weight, layer.proj_c_k.weight))


def test_reconstruction_loss_written_out_and_reaches_the_predictor():
    layer = _layer()
    x = torch.randn(2, 48, 64, dtype=torch.float64)
    out, loss = layer.reconstruction_loss(x)
    q, k, v = (t.view(2, 48, 4, 16).transpose(1, 2) for t in layer.qkv(x).chunk(3, -1))
    attn = torch.softmax(q @ k.transpose(-1, -2) / 4.0, -1)
    coef, basis = layer.predict(q, k, sparse=False)
    torch.testing.assert_close(loss, ((coef @ basis - attn) ** 2).sum())
    torch.testing.assert_close(out, layer.proj((attn @ v).transpose(1, 2).reshape(2, 48, 64)))  # dense during reconstruction
    loss.backward()
    for p in (layer.proj_n, layer.proj_back_n, layer.proj_c_q.weight, layer.proj_c_k.weight):
        assert p.grad is not None and bool(p.grad.abs().sum() > 0)
    teacher = attn.detach().clone().requires_grad_()
    sparsifiner_reconstruction_loss(coef @ basis, teacher).backward()
    assert teacher.grad is None  # the target is detached
    with pytest.raises(ShapeError):
        sparsifiner_reconstruction_loss(coef @ basis, attn[..., :-1])


def test_training_the_predictor_lowers_the_loss_and_raises_recall():
    """A few Adam steps on the predictor alone (the backbone frozen, as the paper's first phase with
    a teacher): the loss falls and the predicted top-keep overlaps the true top-keep more."""
    layer = _layer(seed=1)
    x = torch.randn(4, 48, 64, dtype=torch.float64)
    predictor = [layer.proj_n, layer.proj_back_n, *layer.proj_c_q.parameters(), *layer.proj_c_k.parameters()]
    opt = torch.optim.Adam(predictor, lr=3e-2)

    def recall():
        with torch.no_grad():
            q, k, _ = (t.view(4, 48, 4, 16).transpose(1, 2) for t in layer.qkv(x).chunk(3, -1))
            coef, basis = layer.predict(q, k, sparse=False)
            pred = (coef @ basis).topk(layer.keep, -1).indices
            true = (q @ k.transpose(-1, -2)).topk(layer.keep, -1).indices
            hits = (pred[..., :, None] == true[..., None, :]).any(-1).double().mean()
            return float(hits)

    with torch.no_grad():
        first = float(layer.reconstruction_loss(x)[1])
    before = recall()
    for _ in range(200):
        opt.zero_grad()
        layer.reconstruction_loss(x)[1].backward()
        opt.step()
    with torch.no_grad():
        assert float(layer.reconstruction_loss(x)[1]) < 0.5 * first
    assert recall() > before + 0.1


def test_module_bad_arguments():
    with pytest.raises(ParameterError, match="num_heads"):
        Sparsifiner(64, num_heads=5, num_tokens=10)
    with pytest.raises(ParameterError, match="keep_rate"):
        Sparsifiner(64, num_heads=4, num_tokens=10, keep_rate=0.0)
    with pytest.raises(ShapeError, match="x"):
        Sparsifiner(64, num_heads=4, num_tokens=10)(torch.randn(1, 11, 64))


def test_registered():
    mech = attnzoo.get("sparsifiner")
    assert {"reference", "gathered"} <= set(mech.backends) and mech.catalog == ("S8",)


@pytest.mark.parametrize("nnz", [0, 1, 3])
def test_sparse_coefficients_select_as_the_loop(nnz):
    """A sparse ``coef`` (the paper's inference form: a few nonzeros per row; none: all predictions
    tie at 0 and the lowest indices are kept): both backends select as the per-query loop."""
    q, k, v, coef, basis = _inputs(nq=25, nk=40, r=16, seed=nnz)
    if nnz:
        top = coef.topk(nnz, -1)
        coef = torch.zeros_like(coef).scatter(-1, top.indices, top.values)
    else:
        coef = torch.zeros_like(coef)  # every prediction 0: ties everywhere, lowest indices kept
    outs = [sparsifiner_attention(q, k, v, coef=coef, basis=basis, keep=4, backend=b) for b in ("reference", "gathered")]
    torch.testing.assert_close(outs[1], outs[0], atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(outs[0], _loop(q, k, v, coef, basis, 4, 0.25), atol=1e-12, rtol=1e-10)
