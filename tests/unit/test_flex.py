"""The FlexAttention backends: which mechanisms have one, what each declines on CPU and on CUDA,
where dispatch sends calls on CUDA, and the BlockMask cache.

Nothing here compiles: CUDA problems are described (``dataclasses.replace`` of a CPU problem's
device), which is all ``decline_reason`` and dispatch read. The compiled kernels themselves run
in the conformance suite (``test_compiled_backends*``, fixed shapes; their CUDA cases on a GPU,
``benchmarks/gpu_check.sh``).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import attnzoo
from attnzoo import masks
from attnzoo.kernels.flex import FLEX_CPU_MIN_HEAD_DIM, FLEX_CUDA_MIN_HEAD_DIM, FLEX_RECOMPILE_LIMIT

#: Every mechanism whose pattern is a fixed predicate over its inputs' tokens (the local family
#: but varying_window, whose default re-scaling attends block means, not a subset of the keys;
#: softmax with causal/mask_mod/score_mod).
FIXED_PATTERNS = ("softmax", "sliding_window", "per_head_patterns", "neighborhood", "window", "grid", "halo", "axial")
#: Mechanisms whose partition + SDPA path stays first on CUDA (no wasted pairs; flex takes the LSE).
PARTITIONED = ("window", "grid", "halo", "axial")


def _on(problem, device: str, **changes):
    return dataclasses.replace(problem, device=torch.device(device), **changes)


def _problem(name: str, shape=(8, 8), head_dim: int = 64, value_dim: int | None = None, grad: bool = False, **params):
    mech = attnzoo.get(name)
    shape = shape if len(shape) in mech.spatial_dims else (64,)
    q = torch.randn(1, 2, *shape, head_dim, requires_grad=grad)
    v = torch.randn(1, 2, *shape, value_dim or head_dim)
    example = mech.example_params(mech.describe(q, q, v), "noncausal_self")
    return mech, *mech.prepare(q, q, v, {**example, **params})


@pytest.mark.parametrize("name", FIXED_PATTERNS)
def test_every_fixed_pattern_has_a_flex_backend_ranked_above_tiled_on_cuda(name):
    mech = attnzoo.get(name)
    flex = mech.backends["flex"]
    assert flex.compiles and torch.float64 not in flex.dtypes
    assert flex.device_priority["cuda"] > mech.backends["tiled"].device_priority.get("cuda", mech.backends["tiled"].priority)
    assert flex.priority < mech.backends["tiled"].priority  # CPU: tiled first (flex is forward only there)


@pytest.mark.parametrize("name", FIXED_PATTERNS)
def test_flex_on_cuda_takes_gradients_and_the_lse(name):
    mech, problem, params = _problem(name, grad=True)
    params = {**params, "return_lse": True}
    flex = mech.backends["flex"]
    assert flex.decline_reason(_on(problem, "cuda"), params) is None
    assert "forward only" in flex.decline_reason(problem, params)  # CPU: no FlexAttention backward
    no_grad = _on(problem, "cpu", requires_grad=False)
    assert "LSE" in flex.decline_reason(no_grad, params)


@pytest.mark.parametrize("name", FIXED_PATTERNS)
def test_flex_head_dim_limits_per_device(name):
    flex = attnzoo.get(name).backends["flex"]
    _, problem, params = _problem(name, head_dim=FLEX_CUDA_MIN_HEAD_DIM)
    assert flex.decline_reason(_on(problem, "cuda"), params) is None
    assert str(FLEX_CPU_MIN_HEAD_DIM) in flex.decline_reason(problem, params)
    for qk, v in ((8, 16), (16, 8), (12, 24)):
        _, small, params = _problem(name, head_dim=qk, value_dim=v)
        reason = flex.decline_reason(_on(small, "cuda"), params)
        assert reason is not None and str(FLEX_CUDA_MIN_HEAD_DIM) in reason and "CUDA" in reason


def test_flex_takes_a_learnable_rpb_on_cuda_only():
    x = torch.randn(1, 2, 6, 8, 32)
    rpb = torch.zeros(2, 5, 5, requires_grad=True)
    na = attnzoo.get("neighborhood")
    problem, params = na.prepare(x, x, x, {"kernel_size": 3, "rpb": rpb})
    assert problem.requires_grad  # the table's gradient makes it a training call
    assert na.backends["flex"].decline_reason(_on(problem, "cuda"), params) is None
    assert "forward only" in na.backends["flex"].decline_reason(problem, params)


def test_softmax_flex_on_cuda_takes_a_learnable_bias_and_score_mod_captures():
    softmax = attnzoo.get("softmax")
    q = torch.randn(1, 2, 20, 32, requires_grad=True)
    slopes = torch.tensor([0.5, 0.25], requires_grad=True)

    def learned_alibi(score, b, h, qi, ki):
        return score - slopes[h] * (qi - ki).abs()

    bias = torch.zeros(1, 2, 20, 20, requires_grad=True)
    for extra in ({"score_mod": learned_alibi}, {"bias": bias}):
        problem, params = softmax.prepare(q, q, q, {**extra, "return_lse": True})
        assert softmax.backends["flex"].decline_reason(_on(problem, "cuda"), params) is None
        # on CUDA, dispatch sends it to flex (tiled cannot differentiate a captured tensor; sdpa has no LSE)
        assert softmax.select(_on(problem, "cuda"), params).name == "flex"


@pytest.mark.parametrize("name", FIXED_PATTERNS)
def test_cuda_dispatch_prefers_flex_over_tiled(name):
    """Training with the LSE on CUDA: flex, never the PyTorch tiled engine or the reference."""
    mech, problem, params = _problem(name, grad=True)
    assert mech.select(_on(problem, "cuda"), {**params, "return_lse": True}).name == "flex"


@pytest.mark.parametrize("name", PARTITIONED)
def test_cuda_dispatch_keeps_the_partition_sdpa_first(name):
    """A partition + one SDPA wastes no pairs; a BlockMask over row-major tokens can (axial along
    the first axis and grid touch every key block), so sdpa stays first and flex takes the LSE."""
    mech, problem, params = _problem(name, grad=True)
    assert mech.select(_on(problem, "cuda"), params).name == "sdpa"


def test_cuda_dispatch_of_sequence_patterns_and_softmax():
    for name in ("sliding_window", "per_head_patterns", "neighborhood"):
        mech, problem, params = _problem(name, grad=True)
        assert mech.select(_on(problem, "cuda"), params).name == "flex", name
    softmax = attnzoo.get("softmax")
    q = torch.randn(1, 2, 64, 64)
    problem, params = softmax.prepare(q, q, q, {"causal": True})
    assert softmax.select(_on(problem, "cuda"), params).name == "sdpa"  # flash for plain causal
    problem, params = softmax.prepare(q, q, q, {"mask_mod": masks.sliding_window(8)})
    assert softmax.select(_on(problem, "cuda"), params).name == "flex"


def test_block_masks_of_cacheable_patterns_are_built_once():
    pytest.importorskip("torch.nn.attention.flex_attention")
    pattern = masks.sliding_window(16, 0)
    first = masks.flex_block_mask(pattern, 300, 300)
    assert masks.flex_block_mask(masks.sliding_window(16, 0), 300, 300) is first  # equal patterns share it
    assert masks.flex_block_mask(pattern, 256, 300) is not first
    dense = masks.dense_mask(pattern, 300, 300)[0, 0]
    assert torch.equal(first.to_dense()[0, 0].bool(), _tiles_touched(dense, 128))

    def closure(b, h, q_idx, kv_idx):  # not cacheable: it could read tensors that change
        return kv_idx <= q_idx

    assert masks.flex_block_mask(closure, 300, 300) is not masks.flex_block_mask(closure, 300, 300)


def _tiles_touched(dense: torch.Tensor, block: int) -> torch.Tensor:
    n_q, n_k = -(-dense.shape[0] // block), -(-dense.shape[1] // block)
    padded = torch.zeros(n_q * block, n_k * block, dtype=torch.bool)
    padded[: dense.shape[0], : dense.shape[1]] = dense
    return padded.view(n_q, block, n_k, block).any(dim=(1, 3))


def test_the_compiled_function_keeps_more_graphs_than_dynamos_default():
    """Past torch's default of 8 recompiles, dynamo runs flex_attention uncompiled (Nq x Nk scores)."""
    assert FLEX_RECOMPILE_LIMIT >= 64 > torch._dynamo.config.recompile_limit


#: 2D parameters that exercise each pattern's options (shifts, uneven grids, halos, a causal axis, dilation, rpb).
GRID_CASES = {
    "window": dict(window_size=(4, 5), shift_size=(2, 1)),
    "grid": dict(grid_size=(3, 4)),
    "halo": dict(block_size=(4, 3), halo_size=(1, 2)),
    "axial": dict(axis=0, causal=True),
    "neighborhood": dict(kernel_size=(3, 5), dilation=(2, 1), causal=(False, True)),
}


@pytest.mark.parametrize("device", [pytest.param("cpu", marks=pytest.mark.slow), pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("name", list(GRID_CASES))
def test_flex_on_grids_with_padding(name, device):
    """A 9 x 11 grid, GQA, scattered key padding (one entry mostly padded): flex equals the reference;
    on CUDA its gradients too (q, k, v and neighborhood's rpb table), through the output and the LSE."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    mech = attnzoo.get(name)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, 9, 11, 32, generator=gen).to(device) for h in (4, 2, 2))
    pad = torch.rand(2, 9, 11, generator=gen) < 0.3
    pad[1, :5] = True
    params = dict(GRID_CASES[name], key_padding_mask=pad.to(device), return_lse=True)
    if name == "neighborhood":
        params["rpb"] = torch.randn(4, 5, 9, generator=gen).to(device)
    train = device == "cuda"  # FlexAttention has no CPU backward, nor a CPU LSE
    if not train:
        params.pop("return_lse")
    leaves = {"q": q, "k": k, "v": v, **({"rpb": params["rpb"]} if "rpb" in params else {})}
    results = {}
    for backend in ("flex", "reference"):
        inputs = {n: t.detach().clone().requires_grad_(train) for n, t in leaves.items()}
        kw = {**params, **({"rpb": inputs["rpb"]} if "rpb" in inputs else {})}
        with torch.set_grad_enabled(train):
            result = mech(inputs["q"], inputs["k"], inputs["v"], backend=backend, **kw)
        out, lse = result if isinstance(result, tuple) else (result, None)
        grads = None
        if train:
            w_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(device)
            w_lse = torch.randn(lse.shape, generator=torch.Generator().manual_seed(2)).to(device)
            loss = (out * w_out).sum() + torch.where(torch.isfinite(lse), lse * w_lse, 0.0).sum()
            grads = dict(zip(inputs, torch.autograd.grad(loss, list(inputs.values()))))
        results[backend] = (out.detach(), None if lse is None else lse.detach(), grads)
    (out, lse, grads), (ref, ref_lse, ref_grads) = results["flex"], results["reference"]
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-4)
    if train:
        assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
        finite = torch.isfinite(ref_lse)
        torch.testing.assert_close(lse[finite], ref_lse[finite], atol=2e-5, rtol=2e-4)
        for n in ref_grads:
            torch.testing.assert_close(grads[n], ref_grads[n], atol=1e-4, rtol=1e-3, msg=lambda m, n=n: f"d{n}: {m}")


@pytest.mark.slow
def test_more_shapes_than_dynamos_default_limit_stay_compiled():
    """Ten shapes (ten compiles, ~4 s each on CPU): without the raised limit the ninth would run
    flex_attention uncompiled, with its one "called without torch.compile()" warning."""
    import warnings

    from attnzoo.kernels.flex import flex_forward

    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        for n in range(10):
            x = torch.randn(1, 1, 40 + n, 32)
            out = flex_forward(x, x, x, block_mask=None, scale=None)
            torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(x, x, x), atol=2e-5, rtol=2e-4)
    assert not [w for w in caught if "without torch.compile" in str(w.message)]
