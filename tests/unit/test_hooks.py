"""attnzoo.hooks (catalog X1): capture and edit attention during a forward, against hand-built answers."""

from __future__ import annotations

import math

import pytest
import torch

import attnzoo
from attnzoo import hooks, registry
from attnzoo.errors import ParameterError
from attnzoo.kernels import reference as reference_kernel

F64 = torch.float64


def qkv(b=2, h=3, n=7, d=8, seed=0, grad=False):
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, h, n, d, generator=gen, dtype=F64).requires_grad_(grad) for _ in range(3))


def softmax_probs(q, k, *, allowed=None):
    s = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    if allowed is not None:
        s = s.masked_fill(~allowed, float("-inf"))
    return torch.softmax(s, dim=-1)


class TwoLayers(torch.nn.Module):
    """Two attention layers (projections around attnzoo calls) with submodule names."""

    class Attn(torch.nn.Module):
        def __init__(self, mechanism, **params):
            super().__init__()
            self.mechanism, self.params = mechanism, params

        def forward(self, q, k, v):
            return attnzoo.attention(q, k, v, self.mechanism, **self.params)

    def __init__(self, mechanism="softmax", **params):
        super().__init__()
        self.first = self.Attn(mechanism, **params)
        self.second = self.Attn(mechanism, **params)

    def forward(self, q, k, v):
        a = self.first(q, k, v)
        return self.second(a, k, v)


# ---- capture ---------------------------------------------------------------------------
@pytest.mark.parametrize("causal", [False, True])
def test_capture_equals_softmax_probabilities(causal):
    q, k, v = qkv()
    with hooks.attention_hooks() as h:
        out = attnzoo.attention(q, k, v, "softmax", causal=causal)
    (record,) = h.records
    allowed = torch.ones(7, 7, dtype=torch.bool).tril() if causal else None
    expected = softmax_probs(q, k, allowed=allowed)
    assert record.mechanism == "softmax" and record.layer == "call0" and record.distribution is True
    torch.testing.assert_close(record.weights, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(record.weights @ v, out, rtol=1e-10, atol=1e-12)


def test_capture_local_mechanism_equals_its_window():
    q, k, v = qkv(n=9)
    with hooks.attention_hooks() as h:
        attnzoo.attention(q, k, v, "sliding_window", window=2)
    i = torch.arange(9)
    allowed = (i[:, None] - i[None, :]).abs() <= 2
    torch.testing.assert_close(h.records[0].weights, softmax_probs(q, k, allowed=allowed), rtol=1e-12, atol=1e-12)


def test_capture_2d_local_mechanism_flattens_tokens():
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 4, 5, 8, generator=gen, dtype=F64) for _ in range(3))
    with hooks.attention_hooks() as h:
        out = attnzoo.attention(q, k, v, "neighborhood", kernel_size=3)
    w = h.records[0].weights
    assert w.shape == (1, 2, 20, 20) and h.records[0].distribution
    torch.testing.assert_close((w @ v.reshape(1, 2, 20, 8)).reshape(out.shape), out, rtol=1e-10, atol=1e-12)
    assert int((w[0, 0, 0] > 0).sum()) == 9  # a corner query sees a 3x3 window


def test_capture_gqa_and_padding():
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(2, 4, 5, 8, generator=gen, dtype=F64)
    k, v = (torch.randn(2, 2, 6, 8, generator=gen, dtype=F64) for _ in range(2))
    pad = torch.zeros(2, 6, dtype=torch.bool)
    pad[1, 4:] = True
    with hooks.attention_hooks() as h:
        out = attnzoo.attention(q, k, v, "softmax", key_padding_mask=pad)
    w = h.records[0].weights
    expected = softmax_probs(q, k.repeat_interleave(2, dim=1), allowed=~pad.view(2, 1, 1, 6))
    torch.testing.assert_close(w, expected, rtol=1e-12, atol=1e-12)
    assert bool((w[1, ..., 4:] == 0).all())
    torch.testing.assert_close(w @ v.repeat_interleave(2, dim=1), out, rtol=1e-10, atol=1e-12)


def test_capture_layers_named_by_module_and_occurrence():
    q, k, v = qkv()
    model = TwoLayers()
    with hooks.attention_hooks(model) as h:
        model(q, k, v)
        model(q, k, v)
    assert [r.name for r in h.records] == ["first", "second", "first#1", "second#1"]
    assert list(h.maps()) == ["first", "second", "first#1", "second#1"]
    with hooks.attention_hooks(model, layers=["second"]) as h:
        model(q, k, v)
    assert h.records[0].weights is None and h.records[1].weights is not None


def test_nothing_captured_outside_and_no_work_when_unused(monkeypatch):
    q, k, v = qkv()
    with hooks.attention_hooks() as h:
        pass
    assert registry._INTERCEPTORS == () and reference_kernel.TAP is None

    def boom(*args, **kwargs):
        raise AssertionError("hooks ran outside their context")

    monkeypatch.setattr(hooks.attention_hooks, "_handle", boom)
    monkeypatch.setattr(hooks, "_materialize", boom)
    attnzoo.attention(q, k, v, "softmax")
    attnzoo.attention(q, k, v, "sliding_window", window=2)
    assert h.records == []


def test_weights_materialized_only_when_asked(monkeypatch):
    q, k, v = qkv()
    calls = []
    real = hooks._materialize
    monkeypatch.setattr(hooks, "_materialize", lambda *args: calls.append(1) or real(*args))
    with hooks.attention_hooks(capture=False) as h:
        attnzoo.attention(q, k, v, "softmax")
    assert calls == [] and h.records[0].weights is None and h.records[0].mechanism == "softmax"
    with hooks.attention_hooks(layers=lambda rec: rec.index == 1) as h:
        attnzoo.attention(q, k, v, "softmax")
        attnzoo.attention(q, k, v, "softmax")
    assert calls == [1] and h.records[0].weights is None and h.records[1].weights is not None


def test_capture_restores_after_an_error():
    q, k, v = qkv()
    with pytest.raises(ParameterError):
        with hooks.attention_hooks():
            attnzoo.attention(q, k, v, "softmax", no_such_parameter=1)
    assert registry._INTERCEPTORS == () and reference_kernel.TAP is None


def test_memory_guard_skips_then_raises():
    q, k, v = qkv()  # each map: 2 * 3 * 7 * 7 float64 = 2352 bytes
    with pytest.warns(UserWarning, match="max_bytes=3000"):
        with hooks.attention_hooks(max_bytes=3000) as h:
            attnzoo.attention(q, k, v, "softmax")
            out = attnzoo.attention(q, k, v, "softmax")
    assert h.records[0].weights is not None and h.records[1].weights is None
    assert "skipped" in h.records[1].note and h.held_bytes == 2352
    torch.testing.assert_close(out, attnzoo.attention(q, k, v, "softmax"))  # the call itself still runs
    with pytest.raises(ParameterError, match="max_bytes") as err:
        with hooks.attention_hooks(max_bytes=100, on_exceed="raise"):
            attnzoo.attention(q, k, v, "softmax")
    assert err.value.argument == "max_bytes"


def test_non_distribution_mechanisms_are_flagged():
    q, k, v = qkv()
    with hooks.attention_hooks() as h:
        attnzoo.attention(q, k, v, "linear")  # elu+1, normalized: a distribution
        attnzoo.attention(q, k, v, "linear", normalize=False)
        attnzoo.attention(q, k, v, "transnormer")
        out = attnzoo.attention(q, k, v, "linear", normalize=False, causal=True)
        attnzoo.attention(q, k, v, "inline")
    flags = [r.distribution for r in h.records]
    assert flags == [True, False, False, False, None]
    assert "not a probability distribution" in h.records[1].note
    torch.testing.assert_close(h.records[3].weights @ v, out, rtol=1e-10, atol=1e-12)
    assert h.records[4].weights is None and "inline" in h.records[4].note


def test_edits_refuse_where_they_have_no_meaning():
    q, k, v = qkv()
    with pytest.raises(ParameterError, match="linear: its weights are not a softmax") as err:
        with hooks.attention_hooks(edits=[hooks.mask_keys([0])]):
            attnzoo.attention(q, k, v, "linear")
    assert err.value.argument == "edits"
    agents = torch.randn(1, 3, 4, 8, dtype=F64)
    with pytest.raises(ParameterError, match="agent: its reference is not one softmax"):
        with hooks.attention_hooks(edits=[hooks.reweight_keys([0], 2.0)]):
            attnzoo.attention(q, k, v, "agent", agents=agents)
    with hooks.attention_hooks(edits=[hooks.ablate_heads(1)]):  # output edits work for any mechanism
        out = attnzoo.attention(q, k, v, "linear")
    assert bool((out[:, 1] == 0).all()) and bool((out[:, 0] != 0).any())


# ---- edits -----------------------------------------------------------------------------
IDENTITY = hooks.Edit(scores=lambda s, r: s, probs=lambda p, r: p)


@pytest.mark.parametrize("mechanism, params", [("softmax", {"causal": True}), ("sliding_window", {"window": 2})])
def test_identity_edit_equals_plain_run_output_and_gradient(mechanism, params):
    q, k, v = qkv(grad=True)
    plain = attnzoo.attention(q, k, v, mechanism, **params)
    grads = torch.autograd.grad(plain.square().sum(), (q, k, v))
    with hooks.attention_hooks(edits=[IDENTITY]) as h:
        edited = attnzoo.attention(q, k, v, mechanism, **params)
    torch.testing.assert_close(edited, plain, rtol=1e-10, atol=1e-12)
    for a, b in zip(torch.autograd.grad(edited.square().sum(), (q, k, v)), grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
    assert h.records[0].distribution is False  # a probability edit may break the rows' sums: said so


def test_mask_keys_equals_key_padding():
    q, k, v = qkv()
    pad = torch.zeros(2, 7, dtype=torch.bool)
    pad[:, 3] = True
    with hooks.attention_hooks(edits=[hooks.mask_keys([3])]) as h:
        edited = attnzoo.attention(q, k, v, "softmax")
    torch.testing.assert_close(edited, attnzoo.attention(q, k, v, "softmax", key_padding_mask=pad), rtol=1e-10, atol=1e-12)
    assert bool((h.records[0].weights[..., 3] == 0).all())
    # per batch entry, and one head only
    pad = torch.zeros(2, 7, dtype=torch.bool)
    pad[1, 5] = True
    with hooks.attention_hooks(edits=[hooks.mask_keys(pad, heads=[2])], capture=False):
        edited = attnzoo.attention(q, k, v, "softmax")
    masked = attnzoo.attention(q, k, v, "softmax", key_padding_mask=pad)
    plain = attnzoo.attention(q, k, v, "softmax")
    torch.testing.assert_close(edited[:, 2], masked[:, 2], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(edited[:, :2], plain[:, :2], rtol=1e-10, atol=1e-12)


def test_reweight_is_the_equalizer():
    q, k, v = qkv()
    p = softmax_probs(q, k)
    scale = torch.ones(7, dtype=F64)
    scale[1], scale[4] = 3.0, 0.5
    expected = (p * scale) @ v  # Prompt-to-Prompt: columns scaled, rows not renormalized
    with hooks.attention_hooks(edits=[hooks.reweight_keys([4, 1], torch.tensor([0.5, 3.0]))]) as h:
        edited = attnzoo.attention(q, k, v, "softmax")
    torch.testing.assert_close(edited, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(h.records[0].weights, p * scale, rtol=1e-12, atol=1e-12)
    with hooks.attention_hooks(edits=[hooks.reweight_keys([1], 3.0, heads=0, renormalize=True)], capture=False):
        edited = attnzoo.attention(q, k, v, "softmax")
    w = p[:, 0] * torch.tensor([1, 3.0, 1, 1, 1, 1, 1], dtype=F64)
    torch.testing.assert_close(edited[:, 0], (w / w.sum(-1, keepdim=True)) @ v[:, 0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(edited[:, 1:], attnzoo.attention(q, k, v, "softmax")[:, 1:], rtol=1e-10, atol=1e-12)


def test_replace_maps_reproduces_the_other_run():
    model = TwoLayers("sliding_window", window=2)
    q1, k1, v = qkv(seed=1)
    q2, k2, _ = qkv(seed=2)
    with hooks.attention_hooks(model) as run1:
        out1 = model(q1, k1, v)
    with hooks.attention_hooks(model, edits=[hooks.replace_maps(run1)]) as run2:
        out2 = model(q2, k2, v)
    torch.testing.assert_close(out2, out1, rtol=1e-10, atol=1e-12)  # same v, run 1's maps: run 1's output
    for a, b in zip(run1.records, run2.records):
        torch.testing.assert_close(b.weights, a.weights)
    # one layer only: the first attends with run 1's map, the second with its own
    with hooks.attention_hooks(model, edits=[hooks.replace_maps(run1, layers=["first"])]) as run3:
        out3 = model(q2, k2, v)
    first = run1.records[0].weights @ v
    torch.testing.assert_close(run3.records[1].weights, softmax_probs(first, k2, allowed=(torch.arange(7)[:, None] - torch.arange(7)).abs() <= 2))
    torch.testing.assert_close(out3, run3.records[1].weights @ v, rtol=1e-10, atol=1e-12)
    # diffusion control: replace in the first of two "steps" only
    with hooks.attention_hooks(model) as record_two:
        model(q1, k1, v)
        model(q1, k1, v)
    with hooks.attention_hooks(model, edits=[hooks.replace_maps(record_two, layers=lambda rec: rec.occurrence < 1)]):
        first_step, second_step = model(q2, k2, v), model(q2, k2, v)
    torch.testing.assert_close(first_step, out1, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(second_step, model(q2, k2, v))
    wrong = {("first", 0): torch.zeros(1, 1, 2, 2, dtype=F64)}
    with pytest.raises(ParameterError, match="source"):
        with hooks.attention_hooks(model, edits=[hooks.replace_maps(wrong)]):
            model(q2, k2, v)


def test_ablate_heads_zeroes_their_output_only():
    q, k, v = qkv()
    model = TwoLayers()
    with hooks.attention_hooks(model, capture=False, edits=[hooks.ablate_heads([0, 2], layers=["second"])]):
        out = model(q, k, v)
    first = attnzoo.attention(q, k, v, "softmax")
    second = attnzoo.attention(first, k, v, "softmax")
    assert bool((out[:, [0, 2]] == 0).all())
    torch.testing.assert_close(out[:, 1], second[:, 1])


def test_argument_errors_name_the_argument():
    for kwargs, argument in (
        ({"max_bytes": -1}, "max_bytes"),
        ({"on_exceed": "ignore"}, "on_exceed"),
        ({"edits": [lambda s, r: s]}, "edits"),
        ({"model": "not a module"}, "model"),
        ({"layers": 3}, "layers"),
    ):
        with pytest.raises(ParameterError) as err:
            hooks.attention_hooks(**kwargs)
        assert err.value.argument == argument
    with pytest.raises(ParameterError) as err:
        hooks.mask_keys([0], heads="all")
    assert err.value.argument == "heads"
    with pytest.raises(ParameterError) as err:
        hooks.Edit(scores=3)
    assert err.value.argument == "scores"
    with pytest.raises(ParameterError) as err:
        hooks.ablate_heads(0, layers=5)
    assert err.value.argument == "layers"
    q, k, v = qkv()
    for edit, argument in ((hooks.mask_keys([9]), "keys"), (hooks.ablate_heads([3]), "heads"), (hooks.reweight_keys([0, 1], torch.ones(3)), "factor")):
        with pytest.raises(ParameterError) as err:
            with hooks.attention_hooks(edits=[edit]):
                attnzoo.attention(q, k, v, "softmax")
        assert err.value.argument == argument


def test_weights_of_one_call():
    q, k, v = qkv()
    w, distribution = hooks.weights_of(attnzoo.get("softmax"), q, k, v, causal=True)
    assert distribution
    torch.testing.assert_close(w, softmax_probs(q, k, allowed=torch.ones(7, 7, dtype=torch.bool).tril()))
    with pytest.raises(ParameterError, match="inline"):
        hooks.weights_of(attnzoo.get("inline"), q, k, v)


def test_readme_example_runs():
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    body = re.search(r"^## Hooks and analysis\n(.*?)(?=^## )", readme, re.S | re.M).group(1)
    (code,) = re.findall(r"^```python\n(.*?)^```$", body, re.S | re.M)
    namespace: dict = {}
    exec(compile(code, "README.md:hooks", "exec"), namespace)
    maps, x = namespace["maps"], namespace["x"]
    assert list(maps) == ["0.attn", "1.attn"] and maps["0.attn"].shape == (2, 4, 10, 10)
    assert namespace["entropy"].shape == (4,)
    torch.testing.assert_close(namespace["flow"].sum(-1), torch.ones(2, 10, dtype=F64))
    assert not torch.allclose(namespace["y_edited"], namespace["y"])
    # replace_maps with run 1's maps and x's own values would give y again
    with hooks.attention_hooks(namespace["model"], edits=[hooks.replace_maps(namespace["run1"])]):
        again = namespace["model"](x)
    torch.testing.assert_close(again, namespace["y"], rtol=1e-5, atol=1e-5)


# ---- every registered mechanism -----------------------------------------------------------
OUTPUT_NORMALIZED_AFTER_WEIGHTS = {"transnormer"}  # its norm acts on w @ v: the weights do not give the output
SHAPES = {1: (12,), 2: (3, 4), 3: (2, 2, 3)}


def _sweep_cases():

    for mech in attnzoo.list_mechanisms():
        for pattern in ("noncausal_self", "causal_self"):
            if pattern in mech.patterns:
                for dims in mech.spatial_dims:
                    for seed in range(2):
                        yield pytest.param(mech.name, pattern, dims, seed, id=f"{mech.name}-{pattern}-{dims}d-seed{seed}")


@pytest.mark.parametrize("name, pattern, dims, seed", list(_sweep_cases()))
def test_every_mechanism_is_captured_exactly_or_says_why(name, pattern, dims, seed):
    import random

    mech = attnzoo.get(name)
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, 2, *SHAPES[dims], 8, generator=gen, dtype=F64) for _ in range(3))
    params = mech.example_params(mech.describe(q, k, v), pattern, random.Random(seed))
    with hooks.attention_hooks() as h:
        result = mech(q, k, v, **params)
    out = result[0] if isinstance(result, tuple) else result
    (record,) = h.records
    if record.weights is None:
        assert record.distribution is None and record.note.startswith(name + ":")
        return
    w = record.weights
    n = q[0, 0, ..., 0].numel()
    assert w.shape == (2, 2, n, n)
    if record.distribution:
        live = w.sum(-1) > 0  # a query whose keys are all padded sees nothing
        assert bool((w >= 0).all())
        torch.testing.assert_close(w.sum(-1)[live], torch.ones_like(w.sum(-1)[live]), rtol=0, atol=1e-3)
    if name not in OUTPUT_NORMALIZED_AFTER_WEIGHTS:
        torch.testing.assert_close(w @ v.reshape(2, 2, n, 8), out.reshape(2, 2, n, 8), rtol=1e-9, atol=1e-10)
    else:
        assert record.distribution is False


# ---- through an integration ----------------------------------------------------------------
def test_capture_through_a_swapped_timm_vit():
    timm_integration = pytest.importorskip("attnzoo.integrations.timm")
    timm = pytest.importorskip("timm")
    from attnzoo import analysis

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2).eval()
    timm_integration.swap_attention(model, "softmax")
    seen = {}
    model.blocks[1].attn.register_forward_pre_hook(lambda module, args: seen.setdefault("x", args[0]))
    with torch.no_grad(), hooks.attention_hooks(model) as h:
        model(torch.randn(1, 3, 32, 32))
    assert [r.name for r in h.records] == ["blocks.0.attn", "blocks.1.attn"]
    attn, x = model.blocks[1].attn, seen["x"]
    b, n, c = x.shape
    q, k, _ = attn.qkv(x).reshape(b, n, 3, 3, c // 3).permute(2, 0, 3, 1, 4)
    expected = torch.softmax(q @ k.transpose(-1, -2) * (c // 3) ** -0.5, dim=-1)
    torch.testing.assert_close(h.maps()["blocks.1.attn"], expected, rtol=1e-4, atol=1e-6)
    distance = analysis.attention_distance(h.maps()["blocks.0.attn"], (4, 4), prefix=1, patch_size=8)
    assert distance.shape == (3,) and bool((distance > 0).all()) and bool((distance < 8 * math.sqrt(18)).all())
