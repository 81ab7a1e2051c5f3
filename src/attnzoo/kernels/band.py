"""Causal band attention as two calls of PyTorch's fused CPU attention kernel, merged by LSE.

Query p sees keys ``p - w <= j <= p`` (a causal sliding window of w + 1 keys). Cut the tokens
into chunks of c = w: query ``p = i*c + o`` of chunk i sees

* the keys ``i*c .. p`` of its own chunk: *causal* attention inside the chunk;
* the keys ``(i-1)*c + o .. i*c - 1`` of the previous chunk, key place ``a >= o``: reversing
  the order of both the queries and the keys of the pair makes that ``a' <= o'``, causal
  attention again.

So the band is two batched causal attentions over (B * H, n_chunks, c, D) views, each run by
``aten::_scaled_dot_product_flash_attention_for_cpu`` (fused, no mask tensor, and it returns
the LSE), merged with the log-sum-exp rule. The work is exactly the band (each part computes a
triangle), with none of the tile waste or the per-tile masks of the generic tiled engine.

Backward: the flash backward of each part, given the *merged* output and LSE, returns that
part's exact share of dQ, dK, dV (``dS = P (dP - rowsum(dO O))`` with the global P), as in
ring attention; the shares are added. The LSE is differentiable too (its gradient rides in one
extra head-dim column, only when it is used).

Cost: O(N * w * D) time, O(N * D) memory (plus one LSE per part).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

__all__ = ["causal_band_attention", "band_supported"]

_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
_flash_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default


def band_supported(device: torch.device, dtype: torch.dtype) -> Optional[str]:
    """Why the band kernel cannot run these inputs (None: it can)."""
    if device.type != "cpu":
        return "needs PyTorch's fused CPU attention kernel (CPU only)"
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):  # float64: measured at ~1e-7, not float64-exact
        return f"{dtype} is not run in full precision by the fused CPU attention kernel"
    return None


def _chunks(x: Tensor, c: int) -> Tensor:
    """(B, H, N, D), N a multiple of c -> (B * H, N // c, c, D), a view."""
    b, h, n, d = x.shape
    return x.reshape(b * h, n // c, c, d)


def _previous(x: Tensor) -> Tensor:
    """Chunks 0 .. n-2 in reversed order inside each chunk (the keys of the second part)."""
    return x[:, :-1].flip(2)


def _current(x: Tensor) -> Tensor:
    """Chunks 1 .. n-1 reversed inside each chunk (the queries of the second part)."""
    return x[:, 1:].flip(2)


def _merge(o1: Tensor, l1: Tensor, o2: Tensor, l2: Tensor) -> tuple[Tensor, Tensor]:
    """Chunks 1.. combine both parts; chunk 0 has only the first (o1, l1 cover every chunk)."""
    lse = l1.clone()
    lse[:, 1:] = torch.logaddexp(l1[:, 1:], l2)
    out = o1.float() * torch.exp(l1 - lse).unsqueeze(-1)
    out[:, 1:] += o2.float() * torch.exp(l2 - lse[:, 1:]).unsqueeze(-1)
    return out.to(o1.dtype), lse


class _CausalBand(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, q: Tensor, k: Tensor, v: Tensor, c: int, scale: float) -> tuple[Tensor, Tensor]:
        qc, kc, vc = _chunks(q, c), _chunks(k, c), _chunks(v, c)
        o1, l1 = _flash(qc, kc, vc, 0.0, True, scale=scale)
        if qc.shape[1] == 1:
            out, lse = o1, l1
        else:
            o2, l2 = _flash(_current(qc), _previous(kc), _previous(vc), 0.0, True, scale=scale)
            out, lse = _merge(o1, l1, o2.flip(2), l2.flip(2))
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.c, ctx.scale = c, scale
        ctx.set_materialize_grads(False)  # an unused LSE costs nothing in the backward
        return out.reshape(q.shape[:-1] + v.shape[-1:]), lse.reshape(q.shape[:-1])

    @staticmethod
    def backward(ctx: Any, dout: Optional[Tensor], dlse: Optional[Tensor]) -> tuple[Any, ...]:
        q, k, v, out, lse = ctx.saved_tensors
        c, scale = ctx.c, ctx.scale
        if dout is None:
            dout = torch.zeros_like(out).reshape(q.shape[:-1] + v.shape[-1:])
        if dlse is not None:
            q, k, v, out, dout = _with_lse_column(q, k, v, out, dout, dlse, lse)
        qc, kc, vc, doc = _chunks(q, c), _chunks(k, c), _chunks(v, c), _chunks(dout.contiguous(), c)
        dq, dk, dv = _flash_backward(doc, qc, kc, vc, out, lse, 0.0, True, scale=scale)
        if qc.shape[1] > 1:  # flip copies, so the parts below are contiguous; dq, dk, dv are ours to add into
            dq2, dk2, dv2 = _flash_backward(_current(doc), _current(qc), _previous(kc), _previous(vc), _current(out), _current(lse), 0.0, True, scale=scale)
            dq[:, 1:] += dq2.flip(2)
            dk[:, :-1] += dk2.flip(2)
            dv[:, :-1] += dv2.flip(2)
        dq, dk, dv = dq.reshape(q.shape), dk.reshape(k.shape), dv.reshape(v.shape)
        if dlse is not None:  # drop the extra column
            dq, dk, dv = dq[..., :-1], dk[..., :-1], dv[..., :-1]
        return dq, dk, dv, None, None


def _with_lse_column(q: Tensor, k: Tensor, v: Tensor, out: Tensor, dout: Tensor, dlse: Tensor, lse: Tensor) -> tuple[Tensor, ...]:
    """The flash backward's inputs with one extra head-dim column that carries the LSE's gradient.

    d lse_i / d s_ij = P_ij, so the LSE's gradient g adds g_i P_ij to dS_ij = P_ij (dP_ij - D_i).
    A value column of ones with output 0 and output gradient g gives exactly that: dP_ij gains
    g_i and D_i = rowsum(dO * O) gains nothing. q and k get a zero column (scores unchanged) so
    every head dim stays equal, as the fused kernel wants.
    """
    zero = q.new_zeros(q.shape[:-1] + (1,))
    g = dlse.reshape(q.shape[:-1] + (1,)).masked_fill(~torch.isfinite(lse.reshape(q.shape[:-1] + (1,))), 0.0)
    q2, k2 = torch.cat((q, zero), -1), torch.cat((k, k.new_zeros(k.shape[:-1] + (1,))), -1)
    v2 = torch.cat((v, v.new_ones(v.shape[:-1] + (1,))), -1)
    out2 = torch.cat((out, out.new_zeros(out.shape[:-1] + (1,))), -1)
    dout2 = torch.cat((dout, g.to(dout.dtype)), -1)
    return q2, k2, v2, out2, dout2


def causal_band_attention(q: Tensor, k: Tensor, v: Tensor, *, left: int, scale: float) -> tuple[Tensor, Tensor]:
    """Query p over keys ``p - left .. p`` (self-attention, Nq == Nk): ``(out, lse)``.

    q, k, v: (B, H, N, D) with the same heads (expand GQA heads before). N is padded to a
    multiple of ``left`` at the end (padded keys come after every real query, so causality
    hides them); the padding is cut from the result.
    """
    n = q.shape[2]
    c = max(1, min(left, n))
    pad = -n % c
    if pad:
        q, k, v = (torch.nn.functional.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
    out, lse = _CausalBand.apply(q.contiguous(), k.contiguous(), v.contiguous(), c, scale)
    return out[:, :, :n], lse[:, :, :n]
