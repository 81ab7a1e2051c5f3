"""Kernelized attention with relative positional encoding, through the FFT (catalog F9).

Luo et al. (NeurIPS 2021), "Stable, Fast and Accurate: Kernelized Attention with Relative
Positional Encoding", Sec. 2.3 and 3.2: softmax attention with an RPE bias,
``exp(q_i . k_j / sqrt D + b_(j-i))``, has the kernel form ``phi(q_i) . phi(k_j) e^(b_(j-i))``
with Performer's positive random features phi, so

    out_i = sum_j e^(b_(j-i)) (phi(q_i) . phi(k_j)) v_j  /  (sum_j e^(b_(j-i)) phi(q_i) . phi(k_j) + eps)

(the denominator only with ``normalize``). ``C_ij = e^(b_(j-i))`` is a Toeplitz matrix, so for
each of the F x (Dv + 1) channels of ``X_j = phi(k_j)^T [v_j, 1]`` the sum ``Y_i = sum_j C_ij X_j``
is one convolution, computed by FFT in O(N log N); ``out_i = phi(q_i) Y_i`` (the paper's
Sec. 3.2, "Fast Attention Calculation using Fast Fourier Transform"). Total O(N log N F Dv)
time. Source note: the paper's full text could not be read here (its abstract and table of
contents could); the formula is the abstract's construction written with Performer's
features, and no official code was found in the searchable index.

The table ``rpe`` holds ``b`` for every offset ``j - i`` from ``-(Nq - 1)`` to ``Nk - 1``:
``rpe[..., (j - i) + Nq - 1] = b_(j-i)``, shape (Nq + Nk - 1,) or (H, Nq + Nk - 1) per query
head (2N - 1 for self-attention; ``rpe[N - 1]`` is the offset 0, ``rpe[:N - 1]`` the keys before
the query; a table indexed by i - j is this one flipped). With ``causal`` (Nq = Nk) the
weights of the keys after the query are 0 (``b = -inf``).

Stability: ``e^b`` is taken after subtracting the largest b of the table (per head); the
factor cancels in the normalized output and multiplies the bare one back. The FFT's rounding is
relative to the largest term of each transform (about 1e-7 in float32, 1e-16 in float64 times
log N), not to each output: rows whose sums are much smaller than the largest (a causal first
token, strongly decaying biases) get a larger relative error in float32 (measured with causal
positive random features, N <= 160: up to 240 times the suite's float32 tolerance, atol 2e-5 +
rtol 2e-4). ``fft_precision`` picks the
transforms' dtype for float32 inputs: ``"auto"`` (default) float64 when causal, float32
otherwise (non-causal rows all sum over every key: within 2e-4 in the conformance sweeps).
Half inputs compute in float32. A row whose weighted sum is exactly 0 (possible with ``relu``)
outputs 0 on ``reference`` but the transforms' rounding noise divided by ``eps`` on ``fft``.

Backends: ``reference`` (C materialized with the scores, O(Nq Nk)) and ``fft`` (the Toeplitz
products by ``torch.fft.rfft``/``irfft`` of length >= Nq + Nk - 1, in blocks of feature
channels so that at most ~``FFT_BLOCK_BYTES`` of transforms live at once, each block
recomputed in the backward pass (activation checkpointing)).
"""

from __future__ import annotations

import dataclasses
import random
from typing import Any, Optional

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from ...kernels.linear_scan import append_ones
from ...registry import Backend, Mechanism, Param, Problem, choice, flag, positive_number, register
from ._shared import compute_dtype, expand_heads, key_padding_param, padded_keys, sample_padding, zero_padded
from .feature_maps import SOFTMAX_KERNEL_PARAMS, feature_map_check, feature_map_for, projection_conflict

__all__ = ["kernelized_rpe_attention", "KERNELIZED_RPE", "RPE_FEATURE_MAPS"]

RPE_FEATURE_MAPS = ("softmax_kernel", "elu", "relu", "identity")
FFT_BLOCK_BYTES = 64 * 2**20  # complex spectra of one block of feature channels


# --------------------------------------------------------------------------------------------
# parameters
# --------------------------------------------------------------------------------------------
def _offsets(p: Problem) -> int:
    return p.q_len + p.kv_len - 1


def _check_rpe(value: Any, p: Problem) -> Optional[str]:
    n = _offsets(p)
    expected = f"a floating tensor of shape (Nq + Nk - 1 = {n},) or (H={p.q_heads}, {n}) on {p.device}: b_(j-i) at index j - i + Nq - 1"
    if not isinstance(value, Tensor) or not value.is_floating_point() or value.device != p.device:
        return expected
    if value.dim() == 1 and value.shape[0] == n:
        return None
    if value.dim() == 2 and tuple(value.shape) == (p.q_heads, n):
        return None
    return expected + f", got shape {tuple(value.shape)}"


KERNELIZED_RPE_PARAMS = (
    Param(
        "rpe",
        None,
        "the relative biases b: (Nq + Nk - 1,) or (H, Nq + Nk - 1), rpe[..., j - i + Nq - 1] = b_(j-i) (attnzoo.nn.KernelizedRPEAttention learns them)",
        _check_rpe,
        (None, torch.zeros(3, 3, 3), torch.zeros(1), "b"),
        "Tensor",
    ),
    Param(
        "feature_map",
        "softmax_kernel",
        "phi: " + ", ".join(RPE_FEATURE_MAPS) + " (Performer's positive random features, the paper's), or a callable",
        feature_map_check(RPE_FEATURE_MAPS, pairs=False),
        ("taylor", 3),
        "str | callable",
    ),
    *SOFTMAX_KERNEL_PARAMS,
    positive_number("scale", "multiplies q before phi (split as sqrt on q and k for softmax_kernel); default head_dim ** -0.5"),
    flag("causal", False, "weights of the keys after the query are 0 (b = -inf for j > i); Nq = Nk"),
    flag("normalize", True, "divide by sum_j e^(b_(j-i)) phi(q_i) . phi(k_j) (+ eps); False: the bare sum"),
    choice(
        "fft_precision",
        ("auto", "float32", "float64"),
        "auto",
        "dtype of the fft backend's transforms for float32/half inputs; auto: float64 when causal (small prefix sums), else float32",
    ),
    dataclasses.replace(positive_number("eps", "added to the denominator (normalize=True)", optional=False), default=1e-6),
    key_padding_param(
        "(B, Nk) bool, True = ignore that key (torch.nn.MultiheadAttention's convention): padded keys' features are zeroed; "
        "the biases b_(j-i) are relative, so padding on either side is exact given the sequence's own table"
    ),
)
_MAP_ONLY = ("num_features", "seed", "projection")


def _check_combination(bound: dict[str, Any], p: Problem) -> Optional[tuple[str, str]]:
    if bound["causal"] and p.q_len != p.kv_len:
        return (
            "causal",
            f"causal kernelized RPE places queries and keys on one sequence: needs as many queries as keys, got {p.q_len} and {p.kv_len}",
        )
    if bound["feature_map"] != "softmax_kernel":
        for name in _MAP_ONLY:
            if bound[name] is not None:
                return name, "only used by feature_map='softmax_kernel': leave it None"
    return projection_conflict(bound)


# --------------------------------------------------------------------------------------------
# operands
# --------------------------------------------------------------------------------------------
def _operands(q: Tensor, k: Tensor, v: Tensor, params: dict) -> tuple[Tensor, Tensor, Tensor]:
    """phi(s q), phi(k) (B, H, N, F; zero for padded keys) and v, in the compute dtype, key/value heads repeated.

    A zero phi(k_j) removes key j from every channel of phi(k)^T [v, 1] before the Toeplitz
    product, so the RPE weights e^(b_(j-i)) multiply nothing there (numerator and normalizer)."""
    dtype, heads = compute_dtype(q.dtype), q.shape[1]
    q, k, v = q.to(dtype), expand_heads(k, heads).to(dtype), expand_heads(v, heads).to(dtype)
    scale = params["scale"] or q.shape[-1] ** -0.5
    fmap, pad = params["feature_map"], padded_keys(params)
    if callable(fmap):
        return fmap(q * scale), zero_padded(fmap(k), pad), v
    maps = feature_map_for(
        fmap, head_dim=q.shape[-1], scale=scale, device=q.device, **{n: params[n] for n in _MAP_ONLY if fmap == "softmax_kernel"}
    )
    return maps.query(q), zero_padded(maps.key(k), pad), v


def _shifted_biases(rpe: Tensor, heads: int, causal: bool, nq: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(H|1, L) biases minus their per-head max (future offsets at -inf when causal), and that max (H|1, 1)."""
    b = rpe.to(dtype)
    b = b.unsqueeze(0) if b.dim() == 1 else b
    if causal:  # offsets j - i > 0 are the positions after nq - 1
        future = torch.arange(b.shape[-1], device=b.device) > nq - 1
        b = b.masked_fill(future, float("-inf"))
    top = b.amax(-1, keepdim=True).detach()
    return b - top, top


def _finish(out: Tensor, top: Tensor, params: dict) -> Tensor:
    """Split the normalizer off (normalize) or put the max bias back (bare sum)."""
    if params["normalize"]:
        return out[..., :-1] / (out[..., -1:] + params["eps"] * torch.exp(-top).unsqueeze(-1))
    return out * torch.exp(top).unsqueeze(-1)


# --------------------------------------------------------------------------------------------
# reference: scores times the materialized Toeplitz matrix
# --------------------------------------------------------------------------------------------
def _toeplitz(weights: Tensor, nq: int, nk: int) -> Tensor:
    """C_ij = weights[..., j - i + nq - 1], (H|1, Nq, Nk)."""
    index = torch.arange(nk, device=weights.device).view(1, -1) - torch.arange(nq, device=weights.device).view(-1, 1) + nq - 1
    return weights[..., index]


def _reference(q, k, v, **params):
    """A_ij = phi(q_i) . phi(k_j) e^(b_(j-i) - max b) materialized; out = A [v, 1], then the division."""
    out_dtype = q.dtype
    fq, fk, v = _operands(q, k, v, params)
    nq, nk = fq.shape[2], fk.shape[2]
    shifted, top = _shifted_biases(params["rpe"], fq.shape[1], params["causal"], nq, fq.dtype)
    scores = (fq @ fk.transpose(-1, -2)) * _toeplitz(torch.exp(shifted), nq, nk)
    values = append_ones(v) if params["normalize"] else v
    return _finish(scores @ values, top, params).to(out_dtype)


# --------------------------------------------------------------------------------------------
# fft: the Toeplitz product of every channel of phi(k)^T [v, 1] as a convolution
# --------------------------------------------------------------------------------------------
def _fft_length(n: int) -> int:
    """The smallest 2^a 3^b 5^c >= n (pocketfft and cuFFT are fastest on these)."""
    best = 1 << max(0, (n - 1).bit_length())
    p5 = 1
    while p5 < 2 * n:
        p35 = p5
        while p35 < 2 * n:
            size = p35
            while size < n:
                size *= 2
            best = min(best, size)
            p35 *= 3
        p5 *= 5
    return best


def _block_product(fq: Tensor, fk: Tensor, values: Tensor, kernel_spectrum: Tensor, nk: int, size: int) -> Tensor:
    """sum_f phi(q)_f Y_f of one block of features, (B, H, Dv', Nq): Y = Toeplitz(C) (phi(k)_f v), by FFT.

    Tokens on the last axis (``fq`` (B, H, f, Nq), ``fk`` (B, H, f, Nk), ``values`` (B, H, Dv', Nk)):
    a transform along a strided axis measured 3x slower. x (B, H, f, Dv', Nk) convolved with the
    reversed weights a' gives ``(a' * x)[Nk - 1 + i] = sum_j C_ij x_j``.
    """
    nq = fq.shape[-1]
    x = fk.unsqueeze(3) * values.unsqueeze(2)  # (B, H, f, Dv', Nk)
    spectrum = torch.fft.rfft(x, n=size, dim=-1) * kernel_spectrum
    y = torch.fft.irfft(spectrum, n=size, dim=-1)[..., nk - 1 : nk - 1 + nq]  # (B, H, f, Dv', Nq)
    return (fq.unsqueeze(3) * y).sum(2)


def _feature_block(f: int, n: int, dv: int, batch_heads: int, itemsize: int) -> int:
    """Features per block so that one block's complex spectra stay under FFT_BLOCK_BYTES."""
    per_feature = batch_heads * (n // 2 + 1) * dv * 2 * itemsize
    return max(1, min(f, FFT_BLOCK_BYTES // max(per_feature, 1)))


def _transform_dtype(dtype: torch.dtype, params: dict) -> torch.dtype:
    """float64 inputs stay float64; float32 ones follow ``fft_precision``.

    The FFT's rounding is relative to the largest terms of a transform, not to each output: a
    causal row's prefix sum can be 1e3-1e6 times smaller than the largest (the first tokens,
    exponential features), which float32 transforms turn into a relative error of 1e-4 or more.
    """
    precision = params["fft_precision"]
    if dtype == torch.float64 or precision == "float64" or (precision == "auto" and params["causal"]):
        return torch.float64
    return dtype


def _fft(q, k, v, **params):
    """O(N log N F Dv): rfft of the reversed weights once, then per feature block a convolution."""
    out_dtype = q.dtype
    fq, fk, v = _operands(q, k, v, params)
    dtype = _transform_dtype(fq.dtype, params)
    fq, fk, v = fq.to(dtype), fk.to(dtype), v.to(dtype)
    nq, nk, f = fq.shape[2], fk.shape[2], fq.shape[-1]
    shifted, top = _shifted_biases(params["rpe"], fq.shape[1], params["causal"], nq, fq.dtype)
    size = _fft_length(nq + nk - 1)
    kernel_spectrum = torch.fft.rfft(torch.exp(shifted).flip(-1), n=size, dim=-1).view(-1, 1, 1, size // 2 + 1)  # (H|1, 1, 1, S')
    values = (append_ones(v) if params["normalize"] else v).transpose(-1, -2).contiguous()  # (B, H, Dv', Nk)
    fq, fk = fq.transpose(-1, -2).contiguous(), fk.transpose(-1, -2).contiguous()  # (B, H, F, N)
    block = _feature_block(f, size, values.shape[-2], fq.shape[0] * fq.shape[1], fq.element_size())
    out = None
    for start in range(0, f, block):
        piece = (fq[:, :, start : start + block], fk[:, :, start : start + block], values, kernel_spectrum)
        needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in piece)
        if needs_grad and block < f:  # keep one block's spectra, not all: recompute it backward
            part = checkpoint(_block_product, *piece, nk, size, use_reentrant=False)
        else:
            part = _block_product(*piece, nk, size)
        out = part if out is None else out + part
    return _finish(out.transpose(-1, -2), top, params).to(out_dtype)


# --------------------------------------------------------------------------------------------
# parameters for the conformance suite and the benchmark
# --------------------------------------------------------------------------------------------
def alibi_like_rpe(heads: int, nq: int, nk: int, *, device: Any = None, dtype: torch.dtype = torch.float32) -> Tensor:
    """(H, Nq + Nk - 1) biases ``-m_h |j - i|`` with ALiBi's slopes m_h = 2^(-8 (h + 1) / H): a plain default table."""
    offsets = torch.arange(nq + nk - 1, dtype=torch.float64) - (nq - 1)
    slopes = torch.pow(2.0, -8.0 * torch.arange(1, heads + 1, dtype=torch.float64) / heads)
    return (-slopes.view(-1, 1) * offsets.abs().view(1, -1)).to(device=device, dtype=dtype)


def _sample_params(p: Problem, pattern: str, rng: Optional[random.Random]) -> dict[str, Any]:
    """ALiBi-like biases (benchmark); random biases, maps and options with ``rng`` (the suite)."""
    params: dict[str, Any] = {"causal": pattern.startswith("causal")}
    if rng is None:
        params["rpe"] = alibi_like_rpe(p.q_heads, p.q_len, p.kv_len, device=p.device, dtype=p.dtype)
        return params
    gen = torch.Generator().manual_seed(rng.randrange(2**31))
    per_head = rng.random() < 0.5
    shape = ((p.q_heads,) if per_head else ()) + (_offsets(p),)
    params["rpe"] = (torch.randn(*shape, generator=gen) * rng.choice((0.1, 0.5, 1.0))).to(device=p.device, dtype=p.dtype)
    params["feature_map"] = rng.choice(("softmax_kernel", "softmax_kernel", "elu", "relu"))
    if params["feature_map"] == "softmax_kernel":
        if rng.random() < 0.5:
            params.update(num_features=rng.choice((None, 8, 33)), seed=rng.randrange(1000))
        else:
            m = rng.choice((8, 40))
            w = torch.randn(*((p.q_heads,) if rng.random() < 0.5 else ()), p.head_dim, m, generator=gen)
            params["projection"] = w.to(device=p.device, dtype=p.dtype)
    # relu rows can sum to exactly 0, where the fft's rounding noise divided by eps is not 0: bare
    params["normalize"] = params["feature_map"] != "relu"
    if rng.random() < 0.3:
        params["fft_precision"] = "float64" if params["causal"] else rng.choice(("float32", "float64"))
    if not params["normalize"]:  # a bare sum grows like N F: small scales keep it inside float32's absolute tolerance
        params["scale"] = rng.choice((0.02, 0.1))
    elif rng.random() < 0.3:
        params["scale"] = rng.choice((0.1, 0.5, 1.0))
    params["key_padding_mask"] = sample_padding(p, rng)
    return params


# --------------------------------------------------------------------------------------------
# registration
# --------------------------------------------------------------------------------------------
KERNELIZED_RPE = register(
    Mechanism(
        name="kernelized_rpe",
        family="linear",
        catalog=("F9",),
        paper="Stable, Fast and Accurate: Kernelized Attention with Relative Positional Encoding (Luo et al., NeurIPS 2021)",
        formula="out_i = sum_j e^(b_(j-i)) phi(q_i).phi(k_j) v_j / sum_j e^(b_(j-i)) phi(q_i).phi(k_j)",
        cost="O(N log N F Dv) time, O(N F_block Dv) memory (fft); O(Nq Nk) (reference)",
        summary="Performer random-feature attention times relative-position weights e^(b_(j-i)), the Toeplitz products by FFT",
        patterns=frozenset({"noncausal_self", "causal_self", "noncausal_cross"}),
        params=KERNELIZED_RPE_PARAMS,
        gqa=True,
        exact=True,
        decoder=None,  # e^(b_(j-i)) depends on the distance: no fixed-size state, no recurrence
        sample_params=_sample_params,
        check_params=_check_combination,
        state_size=None,
    )
)
KERNELIZED_RPE.add_backend(
    Backend(
        "reference",
        _reference,
        doc="scores times the materialized Toeplitz matrix e^(b_(j-i)): the spec",
        priority=-100,
        materializes_scores=True,
    )
)
#: Up to this many scores (Nq x Nk per head) the materialized form is the faster one on CPU:
#: at N = 1024 it took 485 ms where ``fft`` took 13.1 s (8 heads x 266 features x 65 channels
#: of length-2N transforms), and ``fft`` was still 7x slower than dense SDPA at N = 16384.
FFT_MIN_SCORES = 4096 * 4096


def _fft_prefers(problem: Problem, params: dict) -> Optional[str]:
    if problem.device.type == "cpu" and problem.q_len * problem.kv_len <= FFT_MIN_SCORES:
        return f"the materialized reference is faster on CPU up to Nq x Nk = {FFT_MIN_SCORES} (F x (Dv + 1) transforms per head)"
    return None


KERNELIZED_RPE.add_backend(
    Backend(
        "fft",
        _fft,
        doc="per feature channel, the Toeplitz product by rfft/irfft (O(N log N)), feature blocks checkpointed",
        priority=50,
        prefers=_fft_prefers,
    )
)


def kernelized_rpe_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    rpe: Tensor,
    *,
    feature_map: Any = "softmax_kernel",
    num_features: Optional[int] = None,
    seed: Optional[int] = None,
    projection: Optional[Tensor] = None,
    scale: Optional[float] = None,
    causal: bool = False,
    normalize: bool = True,
    fft_precision: str = "auto",
    eps: float = 1e-6,
    key_padding_mask: Optional[Tensor] = None,
    backend: Optional[str] = None,
) -> Tensor:
    """Kernelized attention with relative positional encoding (Luo et al., NeurIPS 2021, Sec. 3.2; catalog F9).

    ::

        out_i = sum_j e^(b_(j-i)) (phi(q_i) . phi(k_j)) v_j / (sum_j e^(b_(j-i)) phi(q_i) . phi(k_j) + eps)

    with ``b_(j-i) = rpe[..., j - i + Nq - 1]``; the Toeplitz products are FFT convolutions.

    Args:
        q: (B, Hq, Nq, D). k: (B, Hkv, Nk, D), Hq a multiple of Hkv. v: (B, Hkv, Nk, Dv).
        rpe: (Nq + Nk - 1,) or (Hq, Nq + Nk - 1): b for the offsets -(Nq - 1) .. Nk - 1
            (2N - 1 for self-attention; index N - 1 is offset 0).
        feature_map: ``"softmax_kernel"`` (Performer's positive orthogonal random features, the
            paper's: ``num_features`` and ``seed``, or ``projection`` W (D, m) / (H, D, m)),
            ``"elu"`` (elu + 1), ``"relu"``, ``"identity"`` or a callable phi.
        scale: multiplies q before phi, default D^-0.5 (softmax_kernel: sqrt on q and k).
        causal: keys after the query get weight 0 (Nq = Nk).
        normalize: divide by the weighted row sum (+ ``eps``).
        fft_precision: ``"auto"`` (float64 transforms when causal, the input's float32
            otherwise), ``"float32"`` or ``"float64"``; float64 inputs always use float64.
        key_padding_mask: (B, Nk) bool, **True = ignore that key**: its features are zeroed.
            The weights depend on the offset j - i only, so a padded self-attention batch (pads
            on either side) equals each sequence of length L alone with the padded table's
            middle ``rpe[..., N - L : N + L - 1]``, on its real rows. A query that sees no real
            key outputs 0 (its sums are exactly zero).
        backend: force ``fft`` (default) or ``reference``.

    Returns:
        (B, Hq, Nq, Dv) in the dtype of q (computed in float32 for half inputs).

    Cost: O(N log N F Dv) time on ``fft`` (F random features), its transforms held one
    feature block at a time (~64 MiB). float32 transforms err by ~1e-7 of the largest row sum;
    ``fft_precision="auto"`` uses float64 ones when causal (about twice the time).
    No decoding state: the weights depend on the distance i - j.

    Example::

        >>> q = k = v = torch.randn(1, 8, 4096, 64)
        >>> rpe = torch.zeros(8, 2 * 4096 - 1)
        >>> out = kernelized_rpe_attention(q, k, v, rpe, num_features=128, seed=0)
    """
    return KERNELIZED_RPE(
        q,
        k,
        v,
        backend=backend,
        rpe=rpe,
        feature_map=feature_map,
        num_features=num_features,
        seed=seed,
        projection=projection,
        scale=scale,
        causal=causal,
        normalize=normalize,
        fft_precision=fft_precision,
        eps=eps,
        key_padding_mask=key_padding_mask,
    )


KERNELIZED_RPE.function = kernelized_rpe_attention
KERNELIZED_RPE.decoder_refusal = "its rpe table is sized by the sequence length (2N - 1 offsets), which decoding grows"
