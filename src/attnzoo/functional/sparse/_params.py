"""Parameters and test sampling shared by the sparse family's mechanisms."""

from __future__ import annotations

import random
from typing import Any, Callable, Optional

from ...kernels import block_sparse
from ...registry import Backend, Problem
from .._padding import key_padding_param, sample_padding


#: ``key_padding_mask`` of the family: a padded key is never selected nor attended.
PADDING_PARAM = key_padding_param(doc="(B, Nk) bool, True = ignore the key (never selected nor attended)")


def int_at_least(minimum: int, what: str) -> Callable[[Any, Problem], Optional[str]]:
    """A ``Param`` check: an int (not a bool) >= ``minimum`` (``what`` says what it counts)."""
    expected = "a positive int" if minimum == 1 else f"an int >= {minimum}"

    def check(value: Any, p: Problem) -> Optional[str]:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            return f"{expected} ({what})"
        return None

    return check


def positive_int(what: str) -> Callable[[Any, Problem], Optional[str]]:
    """A ``Param`` check: a positive int."""
    return int_at_least(1, what)


def unit_interval(what: str) -> Callable[[Any, Problem], Optional[str]]:
    """A ``Param`` check: a number in (0, 1] (a share: of mass, of keys, a distance bound)."""

    def check(value: Any, p: Problem) -> Optional[str]:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < float(value) <= 1.0:
            return f"a number in (0, 1] ({what})"
        return None

    return check


#: ``Mechanism.causal_block`` of a selection that reads the last queries (MInference, FlexPrefill):
#: no prefix of the output is independent of the tokens after it.
WHOLE_SEQUENCE = 1 << 62


def multiple_of(name: str, of: str) -> Callable[[dict, Problem], Optional[tuple[str, str]]]:
    """A ``check_params``: the int parameter ``name`` must be a multiple of the int parameter ``of``."""

    def check(params: dict, p: Problem) -> Optional[tuple[str, str]]:
        value, base = params.get(name), params.get(of)
        if isinstance(value, int) and isinstance(base, int) and base >= 1 and value % base:
            return name, f"a multiple of {of}={base}, got {value}"
        return None

    return check


def sample_options(params: dict[str, Any], p: Problem, rng: random.Random, *, padded: bool = True, **padding: Any) -> dict[str, Any]:
    """The options every sparse mechanism shares, switched on at random (the conformance suite):
    key padding (unless ``padded`` is False; ``padding`` goes to :func:`sample_padding`),
    ``return_lse``, ``scale``."""
    pad = sample_padding(p, rng, **padding) if padded else None
    if pad is not None:
        params["key_padding_mask"] = pad
    if rng.random() < 0.3:
        params["return_lse"] = True
    if rng.random() < 0.2:
        params["scale"] = rng.choice((0.05, 0.5, 1.0))
    return params


def _native_accepts(p: Problem, params: dict) -> Optional[str]:
    return block_sparse.decline_reason(p)


def native_backend(
    name: str, fn: Callable[..., Any], doc: str, *, priority: Optional[int] = None, accepts: Optional[Callable[[Problem, dict], Optional[str]]] = None
) -> Backend:
    """A backend on the C++ CPU kernels (block-sparse plans, gathered rows): their capabilities
    (CPU; float32, bfloat16, float16), declining where the kernel is not built (and where
    ``accepts``, the mechanism's own condition, gives a reason)."""
    capabilities = dict(block_sparse.FUSED_CAPABILITIES)
    if priority is not None:
        capabilities["priority"] = priority
    check = _native_accepts if accepts is None else (lambda p, params: accepts(p, params) or _native_accepts(p, params))
    return Backend(name, fn, doc=doc, accepts=check, **capabilities)
