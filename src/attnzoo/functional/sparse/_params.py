"""Parameters and test sampling shared by the sparse family's mechanisms."""

from __future__ import annotations

import random
from typing import Any, Callable, Optional

from ...registry import Problem
from .._padding import key_padding_param, sample_padding


#: ``key_padding_mask`` of the family: a padded key is never selected nor attended.
PADDING_PARAM = key_padding_param(doc="(B, Nk) bool, True = ignore the key (never selected nor attended)")


def positive_int(what: str) -> Callable[[Any, Problem], Optional[str]]:
    """A ``Param`` check: a positive int (``what`` says what it counts)."""

    def check(value: Any, p: Problem) -> Optional[str]:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            return f"a positive int ({what})"
        return None

    return check


def sample_options(params: dict[str, Any], p: Problem, rng: random.Random, **padding: Any) -> dict[str, Any]:
    """The options every sparse mechanism shares, switched on at random (the conformance suite):
    key padding (``padding`` goes to :func:`sample_padding`), ``return_lse``, ``scale``."""
    pad = sample_padding(p, rng, **padding)
    if pad is not None:
        params["key_padding_mask"] = pad
    if rng.random() < 0.3:
        params["return_lse"] = True
    if rng.random() < 0.2:
        params["scale"] = rng.choice((0.05, 0.5, 1.0))
    return params
