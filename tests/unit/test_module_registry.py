"""The module suite: every registered ``attnzoo.nn`` module, checked from its registry entry.

A module registers a constructor and input shapes (:class:`attnzoo.nn.ModuleExample`); from those
this suite checks, for every module without per-module code: the output shape, finite outputs,
float64 (and the module's parameters' dtype) followed, a gradient reaching the input and every
parameter the example uses, evaluation mode deterministic, and an input of the wrong rank refused
with an error that names the input. Per-paper oracles live in each family's own test file.
"""

from __future__ import annotations

import pytest
import torch

import attnzoo
from attnzoo.errors import AttnZooError
from attnzoo.nn import list_modules

ENTRIES = [e for e in list_modules() if e.example is not None]
IDS = [e.name for e in ENTRIES]


def make_inputs(entry, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=gen, dtype=dtype) for shape in entry.example.shapes("test")]


def build(entry, dtype=torch.float32):
    torch.manual_seed(0)
    return entry.build("test").to(dtype)


def first_tensor(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def test_every_module_declares_catalog_ids_paper_layout_and_an_example():
    assert ENTRIES, "no module registered"
    for entry in list_modules():
        assert entry.paper and entry.layout, entry.name
        assert entry.example is not None, f"{entry.name}: register a ModuleExample (the bench and this suite use it)"
        assert entry.summary, f"{entry.name}: the class needs a docstring"
        assert getattr(attnzoo.nn, entry.name) is entry.cls, f"{entry.name} is not exported from attnzoo.nn"


@pytest.mark.parametrize("entry", ENTRIES, ids=IDS)
def test_output_shape_finite_and_deterministic_in_eval(entry):
    module = build(entry).eval()
    inputs = make_inputs(entry)
    with torch.no_grad():
        out = first_tensor(module(*inputs))
        again = first_tensor(module(*inputs))
    assert tuple(out.shape) == entry.example.output_shape([tuple(x.shape) for x in inputs])
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, again, rtol=0, atol=0)


@pytest.mark.parametrize("entry", ENTRIES, ids=IDS)
def test_float64_is_followed(entry):
    module = build(entry, torch.float64).eval()
    out = first_tensor(module(*make_inputs(entry, torch.float64)))
    assert out.dtype == torch.float64


@pytest.mark.parametrize("entry", ENTRIES, ids=IDS)
def test_gradient_reaches_the_input_and_every_used_parameter(entry):
    module = build(entry, torch.float64).train()
    inputs = [x.requires_grad_() for x in make_inputs(entry, torch.float64)]
    out = first_tensor(module(*inputs))
    # a random projection of the output, so no symmetric loss can hide a dead branch
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    (out * weight).sum().backward()
    assert inputs[0].grad is not None and inputs[0].grad.abs().sum() > 0
    dead = [
        name
        for name, p in module.named_parameters()
        if p.requires_grad and name not in entry.example.no_grad and (p.grad is None or p.grad.abs().sum() == 0)
    ]
    assert not dead, f"{entry.name}: no gradient reaches {dead} (declare them in ModuleExample.no_grad if intended)"


@pytest.mark.parametrize("entry", ENTRIES, ids=IDS)
def test_wrong_rank_input_is_refused_clearly(entry):
    module = build(entry)
    inputs = make_inputs(entry)
    inputs[0] = inputs[0].unsqueeze(0)  # one dimension too many
    with pytest.raises((AttnZooError, ValueError)) as err:
        module(*inputs)
    assert any(word in str(err.value) for word in ("shape", "dims", "dimension", "rank", "expected")), str(err.value)
