"""``torch.nn.functional.scaled_dot_product_attention`` with one CPU pitfall routed around.

torch's fused CPU kernel treats a row of fewer keys than its vector width (8 floats with AVX2,
16 with AVX-512) whose scores are all NaN like a fully masked row and returns zeros there:
a NaN query then vanishes before attnzoo's finite check can name it (measured on torch 2.13:
a NaN query over 5 keys gave 0, over 20 keys NaN). Calls with fewer than
:data:`FLASH_CPU_MIN_KEYS` keys on CPU take the math kernel instead; their scores are at most
16 per query, so materializing them costs no more than q itself.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

__all__ = ["sdpa", "FLASH_CPU_MIN_KEYS"]

FLASH_CPU_MIN_KEYS = 16


def sdpa(q: Tensor, k: Tensor, v: Tensor, **kwargs: Any) -> Tensor:
    """``F.scaled_dot_product_attention(q, k, v, **kwargs)``, NaN-faithful for short key rows on CPU."""
    if q.device.type == "cpu" and k.shape[-2] < FLASH_CPU_MIN_KEYS:
        with sdpa_kernel(SDPBackend.MATH):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, **kwargs)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, **kwargs)
