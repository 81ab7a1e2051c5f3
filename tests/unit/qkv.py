"""Random q, k, v for the unit tests of the attention mechanisms (one generator, drawn q, k, v in order)."""

from __future__ import annotations

from typing import Optional

import torch


def random_qkv(
    b: int = 2,
    h: int = 3,
    nq: int = 13,
    nk: int = 13,
    d: int = 6,
    dv: int = 4,
    *,
    kv_heads: Optional[int] = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    grad: bool = False,
    generator: Optional[torch.Generator] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q (b, h, nq, d), k (b, kv_heads or h, nk, d), v (b, kv_heads or h, nk, dv), from ``seed``
    (or from ``generator``, which goes on to draw whatever the caller needs next)."""
    gen = generator if generator is not None else torch.Generator().manual_seed(seed)
    hk = h if kv_heads is None else kv_heads
    q = torch.randn(b, h, nq, d, generator=gen, dtype=dtype)
    k = torch.randn(b, hk, nk, d, generator=gen, dtype=dtype)
    v = torch.randn(b, hk, nk, dv, generator=gen, dtype=dtype)
    return q.requires_grad_(grad), k.requires_grad_(grad), v.requires_grad_(grad)
