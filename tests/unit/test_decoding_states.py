"""Decoding states are values: ``step`` returns a new state and never changes its input, so a state
can branch (beam search, rollback); parameters given at ``init_state`` are bound to the state.

Registry-driven: every mechanism with a decoder, at its plain causal parameters, in float64 so the
comparisons with the full forward can be tight.
"""

from __future__ import annotations

import copy
import math
import random

import pytest
import torch

import attnzoo
from attnzoo import masks
from attnzoo.errors import ParameterError
from attnzoo.registry import DecodingState

DECODERS = [m for m in attnzoo.list_mechanisms() if m.decoder is not None]
B, HKV, D, DV = 2, 2, 8, 8
TOL = dict(atol=1e-10, rtol=1e-9)  # float64: every form agrees to rounding


def _tokens(mech, n, seed):
    gen = torch.Generator().manual_seed(seed)
    hq = 2 * HKV if mech.gqa else HKV
    q = torch.randn(B, hq, n, D, generator=gen, dtype=torch.float64)
    k = torch.randn(B, HKV, n, D, generator=gen, dtype=torch.float64)
    v = torch.randn(B, HKV, n, DV, generator=gen, dtype=torch.float64)
    return q, k, v


def _params(mech, q, k, v):
    return mech.example_params(mech.describe(q, k, v), "causal_self")


def _out(result):
    return result[0] if isinstance(result, tuple) else result


def _run(mech, state, q, k, v, sizes, **params):
    """Step ``state`` through q, k, v in pieces of ``sizes`` tokens (the last piece takes the rest):
    the concatenated outputs and the final state."""
    outs, start, n = [], 0, q.shape[2]
    for size in list(sizes) + [n]:
        stop = min(n, start + size)
        if stop == start:
            break
        out, state = mech.step(q[:, :, start:stop], k[:, :, start:stop], v[:, :, start:stop], state, **params)
        outs.append(_out(out))
        start = stop
    return torch.cat(outs, dim=2), state


def _snapshot(state):
    """A deep copy of what the state holds: its tensors and its plain fields."""
    return copy.deepcopy({"tensors": state.tensors(), "fields": {k: v for k, v in vars(state).items() if not isinstance(v, torch.Tensor)}})


def _assert_unchanged(state, snapshot):
    tensors = state.tensors()
    assert tensors.keys() == snapshot["tensors"].keys()
    for name, t in tensors.items():
        assert torch.equal(t, snapshot["tensors"][name]), f"{name} was written by a later step"
    for name, value in snapshot["fields"].items():
        if isinstance(value, (int, float, str, type(None))):
            assert getattr(state, name) == value, f"{name} changed"


def _cat(*parts):
    return tuple(torch.cat(p, dim=2) for p in zip(*parts))


#: Random options left out of the branching sweep: tensors about one call's tokens (a step has its
#: own) and what softmax refuses while decoding.
NOT_BOUND_ONCE = {"key_padding_mask", "linear_q", "linear_k", "bias", "mask_mod"}


@pytest.mark.parametrize("mech", DECODERS, ids=lambda m: m.name)
def test_two_branches_from_one_state_each_equal_their_full_forward(mech):
    prefix = _tokens(mech, 11, 0)
    _check_branches(mech, prefix, _params(mech, *prefix))


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("mech", DECODERS, ids=lambda m: m.name)
def test_branches_with_random_options(mech, seed):
    """Feature maps, decays, sinks, group and block sizes, scales: every option is bound the same way."""
    prefix = _tokens(mech, 11, 100 + seed)
    options = mech.example_params(mech.describe(*prefix), "causal_self", random.Random(seed))
    _check_branches(mech, prefix, {name: x for name, x in options.items() if name not in NOT_BOUND_ONCE and not _sized_by_sequence(x)})


def _sized_by_sequence(value) -> bool:
    """Tensor options (gates per token, compressed blocks) fit one length: a growing sequence cannot bind them."""
    return isinstance(value, torch.Tensor) or (isinstance(value, (tuple, list)) and any(isinstance(x, torch.Tensor) for x in value))


def _check_branches(mech, prefix, params):
    """From the state after ``prefix``: two branches stepped in turns and, after both, the parent
    once more; each equals the full forward over the prefix and its own continuation."""
    branch_a, branch_b, branch_c = _tokens(mech, 7, 1), _tokens(mech, 7, 2), _tokens(mech, 5, 3)
    state = mech.init_state(*prefix, **params)
    out_prefix, parent = _run(mech, state, *prefix, (3, 1, 4), **params)
    # interleave the branches token by token: each one's appends must not reach the other
    a, b, outs_a, outs_b = parent, parent, [], []
    for t in range(7):
        for tokens, outs, which in ((branch_a, outs_a, "a"), (branch_b, outs_b, "b")):
            piece = tuple(x[:, :, t : t + 1] for x in tokens)
            out, new = mech.step(*piece, a if which == "a" else b, **params)
            outs.append(_out(out))
            a, b = (new, b) if which == "a" else (a, new)
    # the parent, stepped again after both branches, continues as if they never happened
    out_c, _ = _run(mech, parent, *branch_c, (2,), **params)
    for branch, outs in ((branch_a, outs_a), (branch_b, outs_b), (branch_c, [out_c])):
        full = _out(mech(*_cat(prefix, branch), **params))
        torch.testing.assert_close(torch.cat([out_prefix, *outs], dim=2), full, **TOL)


@pytest.mark.parametrize("mech", DECODERS, ids=lambda m: m.name)
def test_step_leaves_its_input_state_unchanged(mech):
    q, k, v = _tokens(mech, 20, 4)
    params = _params(mech, q, k, v)
    state = mech.init_state(q, k, v, **params)
    for start, stop in ((0, 1), (1, 6), (6, 7), (7, 20)):  # one token, several, one, many (the chunked forms)
        before = _snapshot(state)
        _, new = mech.step(q[:, :, start:stop], k[:, :, start:stop], v[:, :, start:stop], state, **params)
        _, _ = mech.step(q[:, :, start:stop], k[:, :, start:stop], v[:, :, start:stop], state, **params)  # and once more
        assert new is not state
        _assert_unchanged(state, before)
        state = new


@pytest.mark.parametrize("mech", DECODERS, ids=lambda m: m.name)
def test_bound_parameters_may_be_omitted_or_repeated_but_not_changed(mech):
    q, k, v = _tokens(mech, 6, 5)
    params = _params(mech, q, k, v)
    name, other = _a_different_bound_value(mech, q, k, v, params)
    params[name] = _value_for(mech, name, q, k, v, params)
    state = mech.init_state(q, k, v, **params)
    assert state.mechanism == mech.name and name in state.params
    repeated, _ = _run(mech, state, q, k, v, (2,), **params)
    per_step = {key: value for key, value in params.items() if key in mech.decoder.per_step}
    omitted, _ = _run(mech, state, q, k, v, (2,), **per_step)  # the bound value, not the registry default
    torch.testing.assert_close(omitted, repeated, **TOL)
    with pytest.raises(ParameterError, match=f"{name}: bound at init_state") as err:
        mech.step(q[:, :, :1], k[:, :, :1], v[:, :, :1], state, **{**params, name: other})
    assert err.value.argument == name


def _value_for(mech, name, q, k, v, params):
    """A valid non-default value of ``name`` to bind (so omitting it at step is not the registry default)."""
    candidates = {"scale": 0.7, "eps": 1e-3, "group_size": 3, "block_size": 3, "norm_eps": 1e-3}
    value = candidates.get(name, params.get(name))
    return value if _binds(mech, q, k, v, {**params, name: value}) else params.get(name)


def _a_different_bound_value(mech, q, k, v, params):
    """A bound parameter of ``mech`` and a valid value of it other than the one bound."""
    bound = mech.bind(mech.describe(q, k, v), params)
    for name in ("scale", "eps", "group_size", "block_size", "window", "gamma", "sinks", "norm_eps"):
        if name not in bound or name in mech.decoder.per_step:
            continue
        value = _value_for(mech, name, q, k, v, params)
        other = {"scale": 0.25, "eps": 1e-5, "group_size": 5, "block_size": 5, "sinks": 2, "norm_eps": 1e-4}.get(name)
        if name == "window":
            other = (value[0] + 1, 0)
        if name == "gamma":
            other = 0.5
        if other is not None and _binds(mech, q, k, v, {**params, name: other}):
            return name, other
    pytest.fail(f"{mech.name}: no bound parameter to vary; add one to this test")


def _binds(mech, q, k, v, params):
    try:
        mech.bind(mech.describe(q, k, v), params)
    except ParameterError:
        return False
    return True


def test_a_state_is_refused_by_another_mechanism_and_a_non_state_is_refused():
    softmax, linear = attnzoo.get("softmax"), attnzoo.get("linear")
    q, k, v = _tokens(softmax, 3, 6)
    state = linear.init_state(q, k, v, causal=True)
    with pytest.raises(ParameterError, match="state: expected a state of softmax") as err:
        softmax.step(q, k, v, state)
    assert err.value.argument == "state"
    with pytest.raises(ParameterError, match="got NoneType"):
        softmax.step(q, k, v, None)


def test_softmax_refuses_a_changed_scale_naming_it():
    softmax = attnzoo.get("softmax")
    q, k, v = _tokens(softmax, 3, 7)
    state = softmax.init_state(q, k, v, scale=0.5)
    out, state = softmax.step(q, k, v, state)
    torch.testing.assert_close(out, softmax(q, k, v, causal=True, scale=0.5), **TOL)
    with pytest.raises(ParameterError, match=r"scale: bound at init_state to 0.5, got 0.25") as err:
        softmax.step(q, k, v, state, scale=0.25)
    assert err.value.argument == "scale"


# --------------------------------------------------------------------------------------------
# clone() and nbytes
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mech", DECODERS, ids=lambda m: m.name)
def test_clone_shares_no_storage_and_continues_the_same(mech):
    q, k, v = _tokens(mech, 15, 8)
    params = _params(mech, q, k, v)
    _, state = _run(mech, mech.init_state(q, k, v, **params), q[:, :, :9], k[:, :, :9], v[:, :, :9], (4,), **params)
    twin = state.clone()
    assert isinstance(twin, DecodingState) and twin.params == state.params and twin.mechanism == mech.name
    assert state.tensors(), "a state after 9 tokens holds tensors"
    for name, t in state.tensors().items():
        c = twin.tensors()[name]
        assert torch.equal(c, t) and c.untyped_storage().data_ptr() != t.untyped_storage().data_ptr(), name
    rest = (q[:, :, 9:], k[:, :, 9:], v[:, :, 9:])
    expected, _ = _run(mech, state, *rest, (1,), **params)
    got, _ = _run(mech, twin, *rest, (1,), **params)
    torch.testing.assert_close(got, expected, **TOL)


@pytest.mark.parametrize("mech", DECODERS, ids=lambda m: m.name)
def test_nbytes_counts_the_state_and_stays_within_state_size(mech):
    q, k, v = _tokens(mech, 40, 9)
    params = _params(mech, q, k, v)
    state = mech.init_state(q, k, v, **params)
    assert state.nbytes == 0  # nothing before the first token
    limit = None if mech.state_size is None else q.shape[0] * q.shape[1] * mech.state_size(D, DV, **params) * q.element_size()
    for t in range(40):
        _, state = mech.step(q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1], state, **params)
        held = sum(x.numel() * x.element_size() for x in state.tensors().values())
        assert held <= state.nbytes, "nbytes counts at least what the state's tensors hold"
        if limit is not None:  # a state of fixed size: never more than the mechanism declares
            assert state.nbytes <= limit, f"{state.nbytes} bytes after {t + 1} tokens > state_size's {limit}"


def test_kv_nbytes_is_the_buffer_and_a_clone_holds_only_its_rows():
    softmax = attnzoo.get("softmax")
    q, k, v = _tokens(softmax, 20, 10)
    _, state = _run(softmax, softmax.init_state(q, k, v), q, k, v, (1,) * 20)
    itemsize, capacity = q.element_size(), state.buffer.capacity
    assert capacity >= 20 and state.nbytes == 2 * B * HKV * capacity * D * itemsize
    assert state.clone().nbytes == 2 * B * HKV * 20 * D * itemsize


# --------------------------------------------------------------------------------------------
# the KV cache: copy-on-write, amortized O(1) appends
# --------------------------------------------------------------------------------------------
def _buffers_over(softmax, state, q, k, v, steps):
    """Step one token at a time; the distinct buffers the states used (held, so no id is reused)."""
    buffers = []
    for t in range(steps):
        _, state = softmax.step(q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1], state)
        if not any(state.buffer is seen for seen in buffers):
            buffers.append(state.buffer)
    return buffers, state


def test_a_chain_of_1000_single_token_steps_reallocates_logarithmically_often():
    softmax = attnzoo.get("softmax")
    q, k, v = (torch.randn(1, 1, 1000, 4) for _ in range(3))
    buffers, state = _buffers_over(softmax, softmax.init_state(q, k, v), q, k, v, 1000)
    assert len(buffers) <= math.log2(1000) + 2, f"{len(buffers)} buffers for 1000 appends"
    assert torch.equal(state.k, k) and torch.equal(state.v, v)
    # a branch copies its rows once, then appends in place again
    fork = state
    _, first = softmax.step(q[:, :, :1], k[:, :, :1], v[:, :, :1], fork)
    more, _ = _buffers_over(softmax, fork, q, k, v, 200)
    assert len(more) <= 2 and all(b is not first.buffer for b in more)


def test_kv_branches_share_the_prefix_until_they_diverge():
    softmax = attnzoo.get("softmax")
    q, k, v = _tokens(softmax, 6, 11)
    _, parent = _run(softmax, softmax.init_state(q, k, v), q[:, :, :4], k[:, :, :4], v[:, :, :4], (4,))
    _, a = softmax.step(q[:, :, 4:5], k[:, :, 4:5], v[:, :, 4:5], parent)
    _, b = softmax.step(q[:, :, 5:6], k[:, :, 5:6], v[:, :, 5:6], parent)
    assert a.buffer is parent.buffer, "the newest state appends in place"
    assert b.buffer is not parent.buffer, "an older state copies before appending"
    assert torch.equal(a.k[:, :, 4], k[:, :, 4]) and torch.equal(b.k[:, :, 4], k[:, :, 5])
    assert parent.length == 4 and torch.equal(parent.k, k[:, :, :4])


@pytest.mark.parametrize("mech", DECODERS, ids=lambda m: m.name)
def test_gradients_through_decoding_steps_equal_the_full_forward(mech):
    """Under autograd no step writes into a tensor an earlier output saved (the KV cache copies)."""
    q, k, v = _tokens(mech, 9, 12)
    params = _params(mech, q, k, v)
    weights = torch.randn(q.shape[:3] + (DV,), generator=torch.Generator().manual_seed(13), dtype=torch.float64)

    def grads(run):
        leaves = [x.clone().requires_grad_(True) for x in (q, k, v)]
        (run(*leaves) * weights).sum().backward()
        return [x.grad for x in leaves]

    full = grads(lambda q_, k_, v_: _out(mech(q_, k_, v_, **params)))
    stepped = grads(lambda q_, k_, v_: _run(mech, mech.init_state(q_, k_, v_, **params), q_, k_, v_, (1, 3, 1), **params)[0])
    for name, g, e in zip("qkv", stepped, full):
        torch.testing.assert_close(g, e, **TOL, msg=lambda m, name=name: f"d{name}: {m}")


def test_a_bound_tensor_compares_by_value():
    """retention's per-head gamma as a tensor: an equal copy is accepted, another value refused."""
    retention = attnzoo.get("retention")
    q, k, v = _tokens(retention, 4, 14)
    gamma = torch.tensor([0.9, 0.6, 0.8, 0.7], dtype=torch.float64)[: q.shape[1]]
    state = retention.init_state(q, k, v, causal=True, gamma=gamma)
    same, _ = _run(retention, state, q, k, v, (1,), causal=True, gamma=gamma.clone())
    torch.testing.assert_close(same, retention(q, k, v, causal=True, gamma=gamma), **TOL)
    for other in (gamma.flip(0), 0.9):
        with pytest.raises(ParameterError, match="gamma: bound at init_state") as err:
            retention.step(q, k, v, state, causal=True, gamma=other)
        assert err.value.argument == "gamma"


def test_softmax_decoding_places_alibi_at_absolute_positions():
    """ALiBi's distance is query position minus key position: a step's queries are not at 0..T-1."""
    softmax = attnzoo.get("softmax")
    q, k, v = _tokens(softmax, 9, 15)
    for score_mod in (masks.alibi(q.shape[1]), masks.alibi(q.shape[1], offset=2), masks.softcap(2.0)):
        out, _ = _run(softmax, softmax.init_state(q, k, v, score_mod=score_mod), q, k, v, (1, 3, 2))
        torch.testing.assert_close(out, softmax(q, k, v, causal=True, score_mod=score_mod), **TOL)
