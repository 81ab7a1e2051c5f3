"""Sparsifiner: attention on a learned, instance-dependent connectivity mask (catalog S8).

Wei et al., "Sparsifiner: Learning Sparse Instance-Dependent Attention for Efficient Vision
Transformers" (CVPR 2023, arXiv 2303.13755), Sec. 3 and Fig. 2; public code lim142857/Sparsifiner
(``src/models/sparsifiner.py: MaskPredictor``). A cheap low-rank predictor approximates each
query's attention row; its ``keep`` largest entries form the connectivity mask M, and full-rank
attention is computed only on M:

    A_approx = C @ W_up,   C = softmax(q_c (k_c P_down)^T * s) (Nq x r),  W_up (r x Nk)
    M_i      = the ``keep`` largest entries of A_approx[i]            (ties: lowest index)
    out_i    = sum_{j in M_i} softmax_{j in M_i}(scale q_i . k_j) v_j

``q_c = q W_q``, ``k_c = k W_k`` are the head-dim down-projections (head_dim / 2 in the paper),
``P_down`` (Nk x r) projects the keys along the tokens (Linformer's projection, r = N / 8) and
``W_up`` is the sparse up-projection basis. This function takes the predictor's result in its
factored form, ``coef = C`` (B, Hq, Nq, r) and ``basis = W_up`` (r, Nk): the learned parts live in
:class:`attnzoo.nn.Sparsifiner`, which computes them and trains them. The factored form keeps the
predictor O(Nq * r) and lets the fast backend form A_approx a chunk of queries at a time. The
paper's budget is ``keep = ceil(keep_rate * N)`` with keep_rate 0.25 (its default config).

The mask carries no gradient (the code's ``attn_mask.detach_()``): ``coef`` and ``basis`` get
none from the attention; the predictor learns from its own loss (``nn.sparsifiner``).
Selection scores in float64 in every backend. Padded keys are never selected nor attended.
Cost: O(Nq * r * Nk) to predict, O(Nq * keep * D) to attend; the fast backend holds
O(chunk * Nk) predicted scores and O(chunk * keep * D) gathered keys.

Backends: ``reference`` (A_approx whole, stable-sort top-k, dense masked softmax over
materialized scores); ``gathered`` (query chunks: predicted scores, top-k, the kept keys gathered;
from keep >= Nk / 8, as the paper's 25%, the chunk's masked scores instead of the gather).
"""

from __future__ import annotations

import random
from typing import Any, Optional

import torch
from torch import Tensor

from ...kernels.reference import default_scale, materialized_attention
from ...registry import Backend, Mechanism, Param, Problem, flag, positive_number, register
from ._params import PADDING_PARAM, sample_options
from ._select import NEG_INF, softmax_lse, sorted_top_k_mask, top_k_mask

__all__ = ["sparsifiner_attention", "SPARSIFINER"]

#: predicted scores held per query chunk of the gathered backend (float64 elements)
CHUNK_SCORES = 1 << 21
#: from keep >= Nk / 8 a chunk attends through its masked (chunk x Nk) scores instead of gathering
#: keep key rows per query (the gather then costs more than the GEMM; as :mod:`.topk`)
DENSE_SHARE = 8


def _check_keep(value: Any, p: Problem) -> Optional[str]:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        return "a positive int (keys kept per query)"
    if value > p.kv_len:
        return f"at most the number of keys Nk={p.kv_len}, got {value}"
    return None


def _check_coef(value: Any, p: Problem) -> Optional[str]:
    if not isinstance(value, Tensor) or not value.is_floating_point() or value.dim() != 4 or tuple(value.shape[:3]) != (p.batch, p.q_heads, p.q_len) or value.device != p.device:
        return f"a floating tensor (B={p.batch}, Hq={p.q_heads}, Nq={p.q_len}, r) on {p.device} (the predictor's basis coefficients)"
    return None


def _check_basis(value: Any, p: Problem) -> Optional[str]:
    if not isinstance(value, Tensor) or not value.is_floating_point() or value.dim() != 2 or value.shape[1] != p.kv_len or value.device != p.device:
        return f"a floating tensor (r, Nk={p.kv_len}) on {p.device} (the predictor's up-projection basis)"
    return None


def _check_params(bound: dict[str, Any], p: Problem) -> Optional[tuple[str, str]]:
    if bound["coef"].shape[-1] != bound["basis"].shape[0]:
        return "basis", f"its rank {bound['basis'].shape[0]} must equal coef's last dim {bound['coef'].shape[-1]}"
    return None


SPARSIFINER_PARAMS = (
    Param("coef", None, "required: (B, Hq, Nq, r) the predictor's basis coefficients C (nn.Sparsifiner computes them)", _check_coef, (None, "c", torch.zeros(2, 2)), "Tensor"),
    Param("basis", None, "required: (r, Nk) the predictor's up-projection basis W_up", _check_basis, (None, "b", torch.zeros(1, 1, 1)), "Tensor"),
    Param("keep", None, "required: keys attended per query, the connectivity budget (the paper's ceil(0.25 N))", _check_keep, (None, 0, -1, 1.5, "8", True), "int"),
    PADDING_PARAM,
    positive_number("scale", "multiplies q.k; default head_dim ** -0.5"),
    flag("return_lse", False, "also return the log-sum-exp of each row over its kept keys, (B, H, Nq)"),
)


def _predicted(coef: Tensor, basis: Tensor, pad: Optional[Tensor]) -> Tensor:
    """float64 A_approx = C @ W_up, -inf on padded keys (no gradient: the mask is discrete)."""
    s = torch.matmul(coef.detach().double(), basis.detach().double())
    if pad is not None:
        s = s.masked_fill(pad[:, None, None, :], NEG_INF)
    return s


def _reference(q, k, v, *, coef, basis, keep, key_padding_mask, scale, return_lse):
    """A_approx whole, its ``keep`` largest per row by a stable sort, a dense masked softmax."""
    mask = sorted_top_k_mask(_predicted(coef, basis, key_padding_mask), keep)
    out, lse = materialized_attention(q, k, v, scale=scale, allowed=mask)
    return (out, lse) if return_lse else out


def _gathered(q, k, v, *, coef, basis, keep, key_padding_mask, scale, return_lse):
    """Query chunks: the chunk's predicted scores, top-k (lowest index on ties), the kept keys gathered."""
    b, h, nq, d = q.shape
    nk, dv = k.shape[2], v.shape[-1]
    group = h // k.shape[1]
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    kk, vv = k.repeat_interleave(group, dim=1).to(cdt), v.repeat_interleave(group, dim=1).to(cdt)
    sc = default_scale(q, scale)
    chunk = max(1, CHUNK_SCORES // max(1, b * h * nk))
    outs, lses = [], []
    for start in range(0, nq, chunk):
        c = coef[:, :, start : start + chunk]
        with torch.no_grad():
            kept = top_k_mask(_predicted(c, basis, key_padding_mask), keep)  # (B, H, c, Nk)
            take = int(kept.sum(-1).max())
            idx = kept.to(torch.int8).topk(max(take, 1), dim=-1).indices  # the kept keys (and fillers)
            ok = kept.gather(-1, idx)
        qc = q[:, :, start : start + chunk].to(cdt)
        if idx.shape[-1] * DENSE_SHARE >= nk:  # many keys kept: the chunk's masked scores cost less than gathering them
            p, lse = softmax_lse(((qc * sc) @ kk.transpose(-1, -2)).masked_fill(~kept, NEG_INF))
            outs.append((p @ vv).to(q.dtype))
            lses.append(lse)
            continue
        n = idx.shape[2]
        flat = idx.flatten(2)
        kg = kk.gather(2, flat[..., None].expand(-1, -1, -1, d)).view(b, h, n, -1, d)
        vg = vv.gather(2, flat[..., None].expand(-1, -1, -1, dv)).view(b, h, n, -1, dv)
        s = torch.einsum("bhqd,bhqtd->bhqt", qc, kg) * sc
        p, lse = softmax_lse(s.masked_fill(~ok, NEG_INF))
        outs.append(torch.einsum("bhqt,bhqtd->bhqd", p, vg).to(q.dtype))
        lses.append(lse)
    out, lse = torch.cat(outs, 2), torch.cat(lses, 2)
    return (out, lse) if return_lse else out


def predictor_tensors(p: Problem, rank: int, seed: int) -> tuple[Tensor, Tensor]:
    """Random but well-formed ``coef`` (rows on the simplex) and ``basis`` for a problem (tests, benchmarks)."""
    gen = torch.Generator().manual_seed(seed)
    coef = torch.randn(p.batch, p.q_heads, p.q_len, rank, generator=gen).softmax(-1)
    basis = torch.randn(rank, p.kv_len, generator=gen)
    return coef.to(device=p.device, dtype=p.dtype), basis.to(device=p.device, dtype=p.dtype)


def _sample_params(p: Problem, pattern: str, rng: Optional[random.Random]) -> dict[str, Any]:
    rank = max(4, p.kv_len // 8)  # the paper's N / 8 (at least 4: rows that differ at small N)
    if rng is None:
        coef, basis = predictor_tensors(p, rank, 0)
        return {"coef": coef, "basis": basis, "keep": max(1, -(-p.kv_len // 4))}
    coef, basis = predictor_tensors(p, rng.randint(1, 6), rng.randrange(2**31))
    params: dict[str, Any] = {"coef": coef, "basis": basis, "keep": rng.randint(1, p.kv_len)}
    if rng.random() < 0.3:
        params["key_padding_mask"] = torch.rand(p.batch, p.kv_len, generator=torch.Generator().manual_seed(rng.randrange(2**31))).lt(0.3).to(p.device)
    return sample_options(params, p, rng, padded=False)


def _sparsity_params(p: Problem, share: float) -> dict[str, Any]:
    coef, basis = predictor_tensors(p, max(4, p.kv_len // 8), 0)
    return {"coef": coef, "basis": basis, "keep": max(1, round(share * p.kv_len))}


SPARSIFINER = register(
    Mechanism(
        name="sparsifiner",
        family="sparse",
        catalog=("S8",),
        paper="Sparsifiner: Learning Sparse Instance-Dependent Attention for Efficient Vision Transformers (Wei et al., CVPR 2023), Sec. 3, Fig. 2",
        formula="out_i = sum_{j in M_i} softmax(scale q_i.k_j) v_j, M_i = top-keep of (C W_up)_i, C = softmax(q_c (k_c P_down)^T) (the learned low-rank predictor)",
        cost="O(Nq * r * Nk) to predict, O(Nq * keep * D) to attend; O(chunk * Nk) memory (gathered)",
        summary="Sparsifiner: a learned low-rank predictor's top-k connectivity per query, full attention on the kept pairs",
        patterns=frozenset({"noncausal_self", "noncausal_cross"}),
        params=SPARSIFINER_PARAMS,
        gqa=True,
        sample_params=_sample_params,
        check_params=_check_params,
        sparsity_params=_sparsity_params,
    )
)
SPARSIFINER.add_backend(
    Backend("reference", _reference, doc="A_approx whole, stable-sort top-k, dense masked softmax: the spec", priority=-100, materializes_scores=True)
)
SPARSIFINER.add_backend(
    Backend("gathered", _gathered, doc="query chunks: predicted scores, top-k, softmax over the gathered kept keys (no Nq x Nk tensor)", priority=30)
)


def sparsifiner_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    coef: Tensor,
    basis: Tensor,
    keep: int,
    key_padding_mask: Optional[Tensor] = None,
    scale: Optional[float] = None,
    return_lse: bool = False,
    backend: Optional[str] = None,
) -> Any:
    """Sparsifiner (catalog S8): attention on the ``keep`` pairs per query a low-rank predictor ranks highest.

    ``M_i = top-keep of (coef @ basis)_i``; ``out_i = sum_{j in M_i} softmax(scale q_i.k_j) v_j``.

    Args:
        q: (B, Hq, Nq, D). k: (B, Hkv, Nk, D), Hq a multiple of Hkv. v: (B, Hkv, Nk, Dv).
        coef: (B, Hq, Nq, r) the predictor's basis coefficients (``nn.Sparsifiner.predict``).
        basis: (r, Nk) the predictor's up-projection basis. keep: keys per query (<= Nk).
        key_padding_mask: (B, Nk) bool, True = never selected. scale: defaults to ``D ** -0.5``.
        return_lse: also return the LSE over the kept keys.

    Cost: O(Nq * r * Nk) to predict, O(Nq * keep * D) to attend. Paper: Wei et al., CVPR 2023.

    Example::

        >>> layer = attnzoo.nn.Sparsifiner(256, num_heads=4, num_tokens=196)
        >>> out = layer(torch.randn(2, 196, 256))
    """
    return SPARSIFINER(
        q, k, v, backend=backend, coef=coef, basis=basis, keep=keep, key_padding_mask=key_padding_mask, scale=scale, return_lse=return_lse
    )


SPARSIFINER.function = sparsifiner_attention
