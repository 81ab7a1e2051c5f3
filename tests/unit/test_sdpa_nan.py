"""kernels/sdpa.py: a NaN input reaches the output (and the finite check) however few keys a row has."""

from __future__ import annotations

import pytest
import torch

import attnzoo
from attnzoo.errors import NonFiniteError
from attnzoo.kernels.sdpa import sdpa


@pytest.mark.parametrize("n_keys", [1, 5, 7, 15, 16, 40])
def test_a_nan_query_gives_a_nan_row_for_any_number_of_keys(n_keys):
    q, k, v = torch.randn(1, 2, 4, 16), torch.randn(1, 2, n_keys, 16), torch.randn(1, 2, n_keys, 16)
    q[0, 1, 2, 3] = float("nan")
    out = sdpa(q, k, v)
    assert bool(out[0, 1, 2].isnan().all())
    assert not bool(out[0, 0].isnan().any()) and not bool(out[0, 1, :2].isnan().any())
    torch.testing.assert_close(out[0, 0], torch.nn.functional.scaled_dot_product_attention(q, k, v)[0, 0])


def test_softmax_sdpa_backend_names_a_nan_query_over_few_keys():
    q, k, v = torch.randn(1, 1, 4, 16), torch.randn(1, 1, 5, 16), torch.randn(1, 1, 5, 16)
    q[0, 0, 1, 3] = float("nan")
    with pytest.raises(NonFiniteError) as err:
        attnzoo.get("softmax")(q, k, v, backend="sdpa")
    assert err.value.argument == "q"


def test_window_attention_names_a_nan_query_in_a_small_window():
    x = torch.randn(1, 2, 8, 8, 16)
    q = x.clone()
    q[0, 0, 3, 3, 0] = float("nan")
    with pytest.raises(NonFiniteError):
        attnzoo.window_attention(q, x, x, window_size=2, backend="sdpa")
