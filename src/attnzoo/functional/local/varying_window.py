"""Varying window attention, VWA (catalog L8): query windows attend a re-scaled, R times larger context.

Yan, Wu and Zhang, "Multi-Scale Representations by Varying Window Attention for Semantic
Segmentation" (ICLR 2024), Sec. 3; official code: github.com/yan-hao-tian/vw,
``mmsegmentation-custom/mmseg/models/decode_heads/vw_head.py`` (``VWHead.vwformer``,
``dope_scaling``, ``copy_shift_padding``, ``varying_context_window``).

Local window attention (LWA) lets a P x P query window attend itself. VWA keeps the query window
and lets it attend a *context window* R times larger per axis, centred on it. Attending all
(RP)^2 context tokens would cost R^2 times LWA's scores and memory; the paper re-scales each
context window to P x P tokens first, so the attention is LWA's again:

- *pre-scaling*: the re-scaling runs once over the whole map, before the (overlapping) context
  windows are cut out; re-scaling each window after cutting would repeat it R^2 times;
- *DOPE* (densely overlapping patch embedding): a stride-1 R x R convolution to C / R^2
  channels, whose R x R block at the context token's position is then stacked back into C
  channels (space to depth), so one token summarises one R x R block;
- *CSP* (copy-shift padding): a context window that sticks out of the map is filled with
  copies of map tokens instead of zeros, so that it holds R P real tokens per axis: the tokens
  of the context window shifted inward until it lies inside the map.

Here the functional form takes q, k and v and does the parameter-free part: the context
windows (centred, shifted inward as CSP makes them) and the re-scaling, either by averaging
each R-block of k and v (``rescale="mean"``) or by reading k and v already re-scaled by DOPE
(``rescale="prescaled"``: :class:`attnzoo.nn.VaryingWindowAttention` holds the convolution);
``rescale="none"`` attends the whole enlarged context (the R^2 cost the re-scaling removes).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor

from ..._validate import per_axis
from ...kernels.reference import materialized_attention
from ...registry import Backend, Mechanism, Param, Problem, choice, positive_number, register
from ._shared import (
    _attend_groups,
    _crop,
    _flat,
    _merge_groups,
    _pad_to,
    _split_groups,
    flat_padding,
    ints_per_axis,
    key_padding_param,
    sample_padding,
    unpadded_keys,
)

RESCALES = ("mean", "prescaled", "none")


@dataclass(frozen=True)
class _ContextAxis:
    """One spatial axis of VWA: query windows of ``window`` tokens and their context windows.

    The axis (``size`` tokens) is cut into ``ceil(size / window)`` query windows. Query window
    w starts at ``w * window``; its context window spans ``R * window`` tokens (the whole axis
    when that is longer), centred on the query window, then shifted inward to lie inside the
    axis: the tokens the paper's copy-shift padding puts in it. The context is read every
    ``step`` tokens: every R-th (one token per R-block) when re-scaled, every token when not.
    """

    size: int
    window: int
    ratio: int
    rescaled: bool

    @property
    def n_windows(self) -> int:
        return -(-self.size // self.window)

    @property
    def span(self) -> int:
        """Tokens of the axis a context window covers."""
        return min(self.ratio * self.window, self.size)

    @property
    def step(self) -> int:
        return self.ratio if self.rescaled else 1

    @property
    def tokens(self) -> int:
        """Context tokens per window: ``window`` when re-scaled (fewer on an axis shorter than R P)."""
        return -(-self.span // self.step)

    def starts(self) -> list[int]:
        """First token of each query window's context window."""
        # The official code pads R P - (R + 1) P // 2 tokens on the left, i.e. ceil((R - 1) P / 2):
        # the context extends that far before the query window and the rest after it.
        reach = ((self.ratio - 1) * self.window + 1) // 2
        return [min(max(w * self.window - reach, 0), self.size - self.span) for w in range(self.n_windows)]

    def anchors(self, device: torch.device) -> Tensor:
        """(n_windows, tokens) long: the first input token of each context token's block."""
        starts = torch.tensor(self.starts(), device=device)
        return starts[:, None] + self.step * torch.arange(self.tokens, device=device)


def _context_axes(q: Tensor, *, window_size: Any, ratio: Any, rescale: str) -> tuple[_ContextAxis, ...]:
    shape = tuple(q.shape[2:-1])
    n = len(shape)
    windows, ratios = per_axis(window_size, n, int), per_axis(ratio, n, int)
    return tuple(_ContextAxis(size, w, r, rescale != "none") for size, w, r in zip(shape, windows, ratios))


VARYING_WINDOW_PARAMS = (
    Param("window_size", None, "query window size P per axis (int or tuple); the map need not be a multiple of it", ints_per_axis(1), (None, 0, "8", 1.5), "int | tuple"),
    Param("ratio", None, "context enlarging ratio R per axis (int or tuple): the context window spans R * P", ints_per_axis(1), (None, 0, -2, "2", 2.0), "int | tuple"),
    choice(
        "rescale",
        RESCALES,
        "mean",
        "how each context window becomes P tokens per axis: 'mean' of each R-block; 'prescaled': k, v already hold "
        "each block's embedding at its first token (DOPE, nn.VaryingWindowAttention); 'none': all R * P tokens (R^d cost)",
    ),
    key_padding_param(
        "context windows are centred on the query windows and shifted inward by the padded length N, so a padded "
        "sequence's contexts differ from the sequence's alone; pad 2D/3D maps, or run 1D sequences unpadded",
        doc="(B, Nk) or (B, *spatial) bool, True = ignore that key (2D/3D): a context token is the mean of the real "
        "tokens of its block ('mean'), or its token ('prescaled', 'none'); one with no real token is masked",
    ),
    positive_number("scale", "multiplies q.k; default head_dim ** -0.5"),
)


# --------------------------------------------------------------------------------------------
# reference: every window's context tokens as weights over the input tokens, then masked softmax
# --------------------------------------------------------------------------------------------
def _axis_weights(axis: _ContextAxis, rescale: str, dtype: torch.dtype, device: torch.device) -> Tensor:
    """(n_windows, tokens, size): how each context token of each window is made from the axis' tokens."""
    anchors = axis.anchors(device)[..., None]
    position = torch.arange(axis.size, device=device)
    if rescale == "mean":  # the block [anchor, anchor + R), cut at the end of the axis
        block = ((position >= anchors) & (position < anchors + axis.ratio)).to(dtype)
        return block / block.sum(-1, keepdim=True)
    return (position == anchors).to(dtype)  # one input token per context token


def _context_weights(axes: tuple[_ContextAxis, ...], rescale: str, dtype: torch.dtype, device: torch.device) -> Tensor:
    """(windows, tokens, N) over row-major windows, tokens and input positions: the per-axis weights' product."""
    weights = _axis_weights(axes[0], rescale, dtype, device)
    for axis in axes[1:]:
        a = _axis_weights(axis, rescale, dtype, device)
        g, t, n = weights.shape
        weights = torch.einsum("gtn,hsm->ghtsnm", weights, a).reshape(g * a.shape[0], t * a.shape[1], n * a.shape[2])
    return weights


def _query_windows(axes: tuple[_ContextAxis, ...], device: torch.device) -> Tensor:
    """(N,) long: the row-major index of each query token's window."""
    index = torch.zeros((), dtype=torch.long, device=device)
    for axis in axes:
        index = index[..., None] * axis.n_windows + torch.arange(axis.size, device=device) // axis.window
    return index.reshape(-1)


def _vwa_reference(
    q: Tensor, k: Tensor, v: Tensor, *, window_size: Any, ratio: Any, rescale: str, scale: Optional[float], key_padding_mask: Optional[Tensor] = None
) -> Tensor:
    """The spec: every window's context tokens made explicitly, then masked softmax over them."""
    axes = _context_axes(q, window_size=window_size, ratio=ratio, rescale=rescale)
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    weights = _context_weights(axes, rescale, cdt, q.device)[None]  # (1 | B, windows, tokens, N)
    seen = None
    if key_padding_mask is not None:  # each context token over the real tokens it reads; none: masked
        weights = weights * (~flat_padding(key_padding_mask, q.shape[0])).to(cdt)[:, None, None, :]
        total = weights.sum(-1, keepdim=True)
        weights = weights / torch.where(total > 0, total, torch.ones_like(total))
        seen = (total > 0).flatten(1)[:, None, None, :]  # (B, 1, 1, windows * tokens)
    weights = weights.expand(q.shape[0], *weights.shape[1:])
    keys, values = (torch.einsum("bgtn,bhnd->bhgtd", weights, _flat(x).to(cdt)).flatten(2, 3) for x in (k, v))
    windows, tokens = weights.shape[1:3]
    owner = torch.arange(windows, device=q.device).repeat_interleave(tokens)  # the window each key belongs to
    allowed = _query_windows(axes, q.device)[:, None] == owner[None, :]
    if seen is not None:
        allowed = allowed & seen
    out, _ = materialized_attention(_flat(q), keys, values, scale=scale, allowed=allowed)
    return out.reshape(*q.shape[:-1], v.shape[-1])


# --------------------------------------------------------------------------------------------
# fast: pre-scale the whole map once, gather each window's context, one SDPA over the windows
# --------------------------------------------------------------------------------------------
class _BlockSum(torch.autograd.Function):
    """Sums of the blocks [p, p + R) along ``dim`` that fit in it: the axis shortens from L to L - R + 1.

    The adjoint is the same block sum over the gradient padded with R - 1 zeros on both sides
    (dx_j sums the outputs of the blocks holding j). With autograd's ``unfold_backward`` instead,
    forward + backward took 26 ms against 8 ms ((1, 8, 4096, 64), R = 4, one CPU thread).
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, dim: int, r: int) -> Tensor:
        ctx.dim, ctx.r = dim, r
        return x.unfold(dim, r, 1).sum(-1)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Optional[Tensor], None, None]:
        padded = torch.nn.functional.pad(grad, [0, 0] * (grad.dim() - 1 - ctx.dim) + [ctx.r - 1, ctx.r - 1])
        return _BlockSum.apply(padded, ctx.dim, ctx.r), None, None


def _block_means(x: Tensor, axes: tuple[_ContextAxis, ...]) -> Tensor:
    """Pre-scaling without weights: position p holds the mean of the block [p, p + R) on every axis.

    Only blocks that start where a context token can start are kept: on an axis of at least R P
    tokens every context lies inside it, so the blocks running past the end are dropped (the axis
    shortens by R - 1); on a shorter axis they are cut at the end and averaged over what they hold.
    """
    out = x.to(torch.float64 if x.dtype == torch.float64 else torch.float32)  # sums of R terms, rounded once
    for i, axis in enumerate(axes):
        if axis.ratio == 1:
            continue
        dim, size, r = 2 + i, axis.size, axis.ratio
        if axis.span == r * axis.window:
            out = _BlockSum.apply(out, dim, r) / r
            continue
        padded = torch.nn.functional.pad(out, [0, 0] * (out.dim() - 1 - dim) + [0, r - 1])  # F.pad lists the last axis first
        count = (size - torch.arange(size, device=x.device)).clamp(max=r).to(out.dtype)
        out = _BlockSum.apply(padded, dim, r) / count.view([-1 if d == dim else 1 for d in range(out.dim())])
    return out.to(x.dtype)


def _gather_contexts(x: Tensor, axes: tuple[_ContextAxis, ...]) -> Tensor:
    """(B, H, *S, D) -> (B * n_windows, H, tokens, D): each query window's context tokens."""
    for i, axis in enumerate(axes):
        x = x.index_select(2 + i, axis.anchors(x.device).reshape(-1))  # axis i becomes (window, token)
    return _split_groups(x, [(axis.n_windows, axis.tokens) for axis in axes], group_is_inner=False)


def _vwa_sdpa(
    q: Tensor, k: Tensor, v: Tensor, *, window_size: Any, ratio: Any, rescale: str, scale: Optional[float], key_padding_mask: Optional[Tensor] = None
) -> Tensor:
    """Pre-scale k, v once, gather every window's P^d context tokens, one SDPA over all windows (masked only with padding)."""
    axes = _context_axes(q, window_size=window_size, ratio=ratio, rescale=rescale)
    unpadded = None
    if key_padding_mask is not None:
        k, v, real = _without_pads(k, v, unpadded_keys(key_padding_mask, k), axes, rescale)
        unpadded = _gather_contexts(real, axes)[:, 0, :, 0] > 0
    elif rescale == "mean":
        k, v = _block_means(k, axes), _block_means(v, axes)
    k_ctx, v_ctx = _gather_contexts(k, axes), _gather_contexts(v, axes)
    splits = [(axis.n_windows, axis.window) for axis in axes]
    padded = [n * w for n, w in splits]
    q_win = _split_groups(q if list(q.shape[2:-1]) == padded else _pad_to(q, padded), splits, group_is_inner=False)
    out = _attend_groups(q_win, k_ctx, v_ctx, None, q.shape[0], scale, unpadded)  # short contexts: see kernels/sdpa.py  # padding queries see real tokens: cropped
    return _crop(_merge_groups(out, splits, False, q.shape[0]), tuple(q.shape[2:-1]))


def _without_pads(k: Tensor, v: Tensor, real: Tensor, axes: tuple[_ContextAxis, ...], rescale: str) -> tuple[Tensor, Tensor, Tensor]:
    """k, v with the pads out of every context token, and how much real input each token holds.

    ``"mean"``: block means of ``k * real`` over block means of ``real``, the mean over the
    block's real tokens (the same count divides both); other rescales read one token each.
    """
    real = real.to(k.dtype)
    if rescale != "mean":
        return k * real, v * real, real
    share = _block_means(real, axes)
    safe = torch.where(share > 0, share, torch.ones_like(share))  # blocks without a real token: 0 / 1, never 0 / 0
    return _block_means(k * real, axes) / safe, _block_means(v * real, axes) / safe, share


def _vwa_sample_params(p: Problem, pattern: str, rng: Optional[random.Random]) -> dict[str, Any]:
    if rng is None:  # plain: windows of 16 (or the axis) with a 4 times larger context, averaged
        return {"window_size": tuple(min(16, s) for s in p.q_shape), "ratio": 4}
    params: dict[str, Any] = {
        "window_size": tuple(rng.randrange(1, s + 2) for s in p.q_shape),  # may exceed the axis: padded
        "ratio": tuple(rng.randrange(1, 5) for _ in p.q_shape),  # R * P may exceed the axis: the whole axis
        "rescale": rng.choice(RESCALES),
    }
    if len(p.kv_shape) > 1:  # refused on 1D sequences
        pad = sample_padding(p, rng)
        if pad is not None:
            params["key_padding_mask"] = pad
    return params


VARYING_WINDOW = register(
    Mechanism(
        name="varying_window",
        family="local",
        catalog=("L8",),
        paper="Multi-Scale Representations by Varying Window Attention for Semantic Segmentation (VWA; Yan, Wu and Zhang, ICLR 2024), Sec. 3",
        formula="out_x = sum_t softmax_t(scale q_x.k~_t) v~_t over the context tokens t of x's P-window: its R*P window (centred, shifted inside), one token per R-block",
        cost="O(N * prod(window_size) * D) time, O(N * D) memory: window attention's (rescale='none': prod(ratio) times that)",
        summary="VWA: query windows of P attend a context window R times larger, re-scaled to P tokens per axis (LWA's cost)",
        patterns=frozenset({"noncausal_self"}),
        params=VARYING_WINDOW_PARAMS,
        spatial_dims=(1, 2, 3),
        gqa=True,
        sample_params=_vwa_sample_params,
    )
)
VARYING_WINDOW.add_backend(
    Backend("reference", _vwa_reference, doc="every window's context tokens made explicitly, masked softmax over them: the spec", priority=-100, materializes_scores=True)
)
VARYING_WINDOW.implementation("sdpa", priority=50)(_vwa_sdpa)


def varying_window_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    window_size: Any,
    ratio: Any,
    rescale: str = "mean",
    key_padding_mask: Optional[Tensor] = None,
    scale: Optional[float] = None,
    backend: Optional[str] = None,
) -> Tensor:
    """Varying window attention, VWA (catalog L8): a P-window of queries attends a re-scaled context R times larger.

    Per axis of size L, query window w covers ``[w P, (w + 1) P)`` (the last one padded; padding
    queries are cropped). Its context window covers ``[c_w, c_w + min(R P, L))`` with

        c_w = clamp(w P - ceil((R - 1) P / 2), 0, L - min(R P, L))

    i.e. centred on the query window, then shifted inward as the paper's copy-shift padding
    fills it. With ``rescale`` other than ``"none"`` the context window is read as blocks of R
    tokens per axis, one context token each, P per axis (so the scores are LWA's P^d x P^d per
    window):

        out_x = sum_t softmax_t(scale * q_x . k~_t) v~_t,   t over the tokens of x's context
        k~_t = mean_{r in [0, R)^d} k_{a_t + r}      (rescale="mean", the block cut at the map's end)
        k~_t = k_{a_t}                               (rescale="prescaled")

    where ``a_t = c_w + R j`` is the first token of block j (v~ likewise). ``"prescaled"`` is for
    k, v that already hold each block's embedding at its first token, as DOPE makes them
    (:class:`attnzoo.nn.VaryingWindowAttention`); ``"mean"`` is the parameter-free re-scaling;
    ``"none"`` attends every token of the context window (``k~_t = k_{c_w + t}``).

    Args:
        q, k, v: (B, H, *spatial, D), 1-3 spatial axes (the paper: 2), k/v may have fewer heads (GQA).
        window_size: P, an int or one per axis. ratio: R >= 1, an int or one per axis (the paper: 2, 4, 8).
        rescale: ``"mean"`` (default), ``"prescaled"`` or ``"none"``. scale: defaults to ``D ** -0.5``.
        key_padding_mask: (B, Nk) or (B, *spatial) bool, True = ignore that key, 2D/3D only: a
            context token is the mean of its block's real tokens (``"mean"``) or its one token,
            and is masked when it reads none (a query left with no context outputs 0). Refused
            on 1D sequences: contexts are centred and shifted inward by the padded length.
        backend: ``sdpa`` (pre-scale once, gather each window's context, one SDPA, no mask) or ``reference``.

    Cost: O(N P^d D) time and O(N D) memory, the cost of window attention with windows of P: the
    re-scaling is a pass over k, v (pre-scaling: once over the map, not once per overlapping context
    window), and the contexts gathered for all windows hold N tokens. ``"none"``: R^d times that.

    Paper: Yan, Wu and Zhang, ICLR 2024, Sec. 3 (VWA and its re-scaling: pre-scaling, DOPE, CSP).
    Departures from the official code (``vw_head.py``): (1) sizes need not be multiples of P (it
    fixes 8 windows per axis); (2) copy-shift padding is taken as the set of tokens it puts in a
    context window, the inward-shifted window, whose R-blocks are grouped in map order; the
    official grouping of its copied pieces is the same when ceil((R - 1) P / 2) is a multiple of R
    (its P = 16, R in {2, 4, 8}) and otherwise lets a block straddle the seam between copy and map;
    (3) a context window longer than the axis is the whole axis, each token once (the official
    code zero-pads and copies, repeating tokens); (4) ``"mean"`` stands in for DOPE's learned
    convolution, which lives in the module.

    Example::

        >>> x = torch.randn(2, 4, 64, 64, 32)  # (B, H, height, width, D)
        >>> out = varying_window_attention(x, x, x, window_size=8, ratio=4)  # 32 x 32 context as 8 x 8 tokens
    """
    return VARYING_WINDOW(q, k, v, backend=backend, window_size=window_size, ratio=ratio, rescale=rescale, key_padding_mask=key_padding_mask, scale=scale)


VARYING_WINDOW.function = varying_window_attention
