"""TransNeXt's aggregated attention and convolutional GLU (Shi, "TransNeXt: Robust Foveal Visual Perception for
Vision Transformers", CVPR 2024), catalog M11.

Aggregated attention (pixel-focused attention with learnable tokens) lets every query see, in one softmax,
its own k x k neighbourhood at full resolution (a sliding window, like foveal vision) and a coarse
pooled copy of the whole image. Queries and keys are L2-normalised (cosine similarity) with a
learned per-head temperature and a length scale ``log(n)``; a learned query embedding is added to
every query; the local part has a learned bias, the pooled part a continuous position bias (an
MLP over log-spaced relative coordinates); and "learnable tokens" add a query-dependent,
softmax-free term to the local weights. ConvGLU is a GLU whose gate branch passes a
3x3 depth-wise conv. The arithmetic follows the official ``classification/attention_native.py``
and ``transnext.py``.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...errors import ParameterError, ShapeError
from ...functional import softmax_attention
from .._checks import heads_divide, merge_heads, odd_kernel, positive_int, split_heads
from .._registry import ModuleExample, register_module
from ._grid_ops import check_grid

__all__ = ["AggregatedAttention", "LengthScaledCosineAttention", "ConvolutionalGLU", "log_spaced_relative_coords"]


@torch.no_grad()
def log_spaced_relative_coords(query_size, key_size, pretrain_size=None, device=None, dtype=torch.float32):
    """TransNeXt's CPB inputs: ``(index (Nq * Nk,), table (T, 2))`` for queries on a grid and pooled keys.

    Key coordinates are the query coordinates average-pooled to ``key_size`` (so a pooled key sits
    at the centre of its cell); offsets are scaled by ``8 / (pretrain_size - 1)``, made unique, and
    mapped by ``sign(t) log2(1 + |t|) / log2(8)`` (the official ``get_relative_position_cpb``, in
    float32 there, in ``dtype`` here; a side of 1 divides by 1 instead of 0).
    """
    pretrain_size = pretrain_size or query_size
    values, inverses = [], []
    for q_len, k_len, p_len in zip(query_size, key_size, pretrain_size):
        q_axis = torch.arange(q_len, dtype=dtype, device=device)
        k_axis = F.adaptive_avg_pool1d(q_axis[None], k_len)[0]
        rel = (q_axis[:, None] - k_axis[None, :]) / max(p_len - 1, 1) * 8  # (q_len, k_len)
        uniq, inv = torch.unique(rel.reshape(-1), return_inverse=True)
        values.append(uniq)
        inverses.append(inv.reshape(q_len, k_len))
    # every (row offset, column offset) pair occurs, so the unique (dy, dx) rows are the product of
    # the unique offsets per axis, in the same lexicographic order as torch.unique(dim=0) on all pairs
    (uh, uw), (ih, iw) = values, inverses
    index = (ih[:, None, :, None] * len(uw) + iw[None, :, None, :]).reshape(-1)  # (Hq, Wq, Hk, Wk) flattened
    table = torch.stack(torch.meshgrid(uh, uw, indexing="ij"), dim=-1).reshape(-1, 2)
    table = torch.sign(table) * torch.log2(table.abs() + 1.0) / math.log2(8)
    return index, table


@register_module(
    "M11",
    paper="TransNeXt: Robust Foveal Visual Perception for Vision Transformers (Shi, CVPR 2024)",
    layout="(B, H, W, C)",
    example=ModuleExample(
        dict(dim=96, num_heads=2, window_size=3, sr_ratio=8),
        inputs=[(1, 56, 56, 96)],
        test_inputs=[(2, 8, 8, 16)],
        test_kwargs=dict(dim=16, num_heads=2, sr_ratio=4),
    ),
)
class AggregatedAttention(nn.Module):
    """Aggregated (pixel-focused) attention: a k x k sliding window and pooled tokens in one softmax.

    Per head, with ``q^ = L2(x W_q)``, local keys/values ``k_j = L2(x_j W_k), v_j = x_j W_v`` for the
    k x k neighbours j of the query (zero padding at the border, masked), pooled tokens
    ``p = LN(AvgPool_{H/r x W/r}(GELU(Conv1x1(x))))`` with ``k_p = L2(p W_k), v_p = p W_v`` (the same
    W_k, W_v), and ``n_i`` = the query's in-image neighbours + the pooled tokens (the
    paper's aggregated-attention equations, as the official native code computes them)::

        q~ = (q^ + e_q) * softplus(tau) * log(n_i)                 query embedding e_q, temperature tau
        s_local = q~ . k_j + b_local[j]        s_pool = q~ . k_p + CPB(q, p)
        [a_local, a_pool] = softmax([s_local, s_pool])               one softmax over both
        y = sum_j (a_local[j] + q^ . T[:, j] + b_T[j]) v_j  +  sum_p a_pool[p] v_p,   then W_o

    ``T`` (h x d x k^2) and ``b_T`` are the learnable tokens and bias (added after the softmax, so
    the local weights need not sum to one); ``CPB`` is a 2-512-h MLP over
    :func:`log_spaced_relative_coords`. Initialisation as the official code: softplus(tau) = 1/0.24,
    ``e_q`` and ``T`` truncated normal (std 0.02), ``b_local`` (std 4e-4), ``b_T`` zero.

    Simplifications against the official module: the resolution is read from the input at each
    call (the official one fixes it at construction, with its padding mask and log-length table);
    ``pretrain_size`` stands for the official CPB coordinate scaling (default: the input's size);
    dropout is not carried. Stage 4 of TransNeXt (``sr_ratio == 1``) uses full attention instead,
    :class:`LengthScaledCosineAttention`; this module needs ``sr_ratio >= 2`` or a ``fixed_pool_size``.

    Cost: O(N (k^2 + P) C) with P = N / r^2 pooled tokens, plus O(N C^2) projections and the
    CPB MLP, O(512 h T) over the T <= N P distinct offsets.
    Layout: ``(B, H, W, C)`` in and out; H, W >= ``sr_ratio`` (or > ``fixed_pool_size``).

    Args:
        dim: C. num_heads: h. window_size: k (odd). sr_ratio: r, the pooling factor.
        qkv_bias: bias of the q and kv projections (the official default is True).
        fixed_pool_size: pool to a fixed P x P instead of H/r x W/r. pretrain_size: (H0, W0) for the CPB scale.

    Example::

        >>> attn = AggregatedAttention(64, num_heads=2, window_size=3, sr_ratio=8)
        >>> y = attn(torch.randn(2, 56, 56, 64))
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        window_size: int = 3,
        sr_ratio: int = 8,
        qkv_bias: bool = True,
        fixed_pool_size: Optional[int] = None,
        pretrain_size: Optional[tuple[int, int]] = None,
    ):
        super().__init__()
        name = type(self).__name__
        positive_int(name, "dim", dim)
        head_dim = heads_divide(name, dim, num_heads)
        odd_kernel(name, window_size, optional=False)
        positive_int(name, "sr_ratio", sr_ratio)
        if fixed_pool_size is not None:
            positive_int(name, "fixed_pool_size", fixed_pool_size)
        elif sr_ratio < 2:
            raise ParameterError(f"{name}: sr_ratio: expected >= 2 (TransNeXt's stage 4 uses full attention), got {sr_ratio}", argument="sr_ratio")
        self.dim, self.num_heads, self.head_dim = dim, num_heads, head_dim
        self.window_size, self.sr_ratio, self.fixed_pool_size, self.pretrain_size = window_size, sr_ratio, fixed_pool_size, pretrain_size
        self.local_len = window_size ** 2
        self.temperature = nn.Parameter(torch.full((num_heads, 1, 1), math.log(math.expm1(1 / 0.24))))
        self.query_embedding = nn.Parameter(nn.init.trunc_normal_(torch.empty(num_heads, 1, head_dim), std=0.02))
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.sr = nn.Conv2d(dim, dim, 1)
        self.norm = nn.LayerNorm(dim)
        self.cpb_fc1 = nn.Linear(2, 512)
        self.cpb_fc2 = nn.Linear(512, num_heads)
        self.relative_pos_bias_local = nn.Parameter(nn.init.trunc_normal_(torch.empty(num_heads, self.local_len), std=0.0004))
        self.learnable_tokens = nn.Parameter(nn.init.trunc_normal_(torch.empty(num_heads, head_dim, self.local_len), std=0.02))
        self.learnable_bias = nn.Parameter(torch.zeros(num_heads, 1, self.local_len))

    def pool_size(self, h: int, w: int) -> tuple[int, int]:
        if self.fixed_pool_size is not None:
            return self.fixed_pool_size, self.fixed_pool_size
        return h // self.sr_ratio, w // self.sr_ratio

    def forward(self, x: Tensor) -> Tensor:
        """``x`` (B, H, W, C) -> (B, H, W, C)."""
        name = type(self).__name__
        check_grid(name, x, self.dim)
        b, h, w, c = x.shape
        heads, d, k = self.num_heads, self.head_dim, self.window_size
        ph, pw = self.pool_size(h, w)
        if ph < 1 or pw < 1 or (self.fixed_pool_size is not None and self.fixed_pool_size >= min(h, w)):
            raise ShapeError(
                f"{name}: x: expected H and W of at least sr_ratio={self.sr_ratio} (or above fixed_pool_size), "
                f"got shape {tuple(x.shape)}",
                argument="x",
            )
        n, p = h * w, ph * pw

        # in-image neighbours of each query (the official padding mask) and the length scale log(n_i)
        ones = torch.ones(1, 1, h, w, device=x.device, dtype=x.dtype)
        inside = F.unfold(ones, k, padding=k // 2)[0].transpose(0, 1)  # (N, k^2), 1 = in the image
        length_scale = torch.log(inside.sum(-1, keepdim=True) + p)  # (N, 1)

        q_hat = F.normalize(self.q(x).reshape(b, n, heads, d).transpose(1, 2), dim=-1)  # (B, h, N, d)
        q_tilde = (q_hat + self.query_embedding) * F.softplus(self.temperature) * length_scale

        k_loc, v_loc = self.kv(x).chunk(2, dim=-1)
        k_loc = F.normalize(k_loc.reshape(b, h, w, heads, d), dim=-1).reshape(b, h, w, c)
        kv_loc = torch.cat([k_loc, v_loc], dim=-1).permute(0, 3, 1, 2)  # (B, 2C, H, W)
        kv_loc = F.unfold(kv_loc, k, padding=k // 2).reshape(b, 2 * heads, d, self.local_len, n)
        k_loc, v_loc = kv_loc.permute(0, 1, 4, 2, 3).chunk(2, dim=1)  # (B, h, N, d, k^2) each

        s_local = torch.einsum("bhnd,bhndl->bhnl", q_tilde, k_loc) + self.relative_pos_bias_local[:, None]
        s_local = s_local.masked_fill(inside == 0, float("-inf"))

        pooled = F.gelu(self.sr(x.permute(0, 3, 1, 2)))
        pooled = self.norm(F.adaptive_avg_pool2d(pooled, (ph, pw)).flatten(2).transpose(1, 2))  # (B, P, C)
        k_pool, v_pool = self.kv(pooled).reshape(b, p, 2 * heads, d).transpose(1, 2).chunk(2, dim=1)

        index, table = log_spaced_relative_coords((h, w), (ph, pw), self.pretrain_size, device=x.device, dtype=x.dtype)
        cpb = self.cpb_fc2(torch.relu(self.cpb_fc1(table)))  # (T, h)
        pool_bias = cpb.transpose(0, 1)[:, index].reshape(heads, n, p)
        s_pool = q_tilde @ F.normalize(k_pool, dim=-1).transpose(-2, -1) + pool_bias

        attn = torch.cat([s_local, s_pool], dim=-1).softmax(dim=-1)
        a_local, a_pool = attn.split([self.local_len, p], dim=-1)
        a_local = a_local + q_hat @ self.learnable_tokens + self.learnable_bias  # the learnable tokens
        out = torch.einsum("bhnl,bhndl->bhnd", a_local, v_loc) + a_pool @ v_pool
        return self.proj(out.transpose(1, 2).reshape(b, h, w, c))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, window_size={self.window_size}, sr_ratio={self.sr_ratio}"


@register_module(
    "M11",
    paper="TransNeXt: Robust Foveal Visual Perception for Vision Transformers (Shi, CVPR 2024)",
    layout="(B, H, W, C)",
    example=ModuleExample(
        dict(dim=96, num_heads=2),
        inputs=[(1, 56, 56, 96)],
        test_inputs=[(2, 6, 8, 16)],
        test_kwargs=dict(dim=16, num_heads=2),
    ),
)
class LengthScaledCosineAttention(nn.Module):
    """TransNeXt's full attention (its last stage): cosine similarity, query embedding, log(N) scale, CPB bias.

    The ``sr_ratio == 1`` counterpart of :class:`AggregatedAttention` (the official ``Attention`` in
    ``transnext.py``), every token attending to every token::

        y = softmax(((L2(q) + e_q) * softplus(tau) * log(N)) L2(k)^T + CPB(i, j)) v,   then W_o

    with ``CPB`` the 2-512-h MLP over :func:`log_spaced_relative_coords` of the query grid against
    itself. Initialisation as the official code (softplus(tau) = 1/0.24, ``e_q`` truncated normal
    with std 0.02). The resolution is read from the input at each call (the official class fixes it).

    Cost: O(N^2 C) for the attention, O(N^2 (2 + h)) for the bias gather, O(N C^2) projections.
    Layout: ``(B, H, W, C)`` in and out.

    Args:
        dim: C. num_heads: h. qkv_bias: bias of the qkv projection. pretrain_size: (H0, W0) for the CPB scale.
        backend: passed to :func:`attnzoo.softmax_attention`.

    Example::

        >>> attn = LengthScaledCosineAttention(64, num_heads=2)
        >>> y = attn(torch.randn(2, 7, 7, 64))
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = True,
        pretrain_size: Optional[tuple[int, int]] = None,
        backend: Optional[str] = None,
    ):
        super().__init__()
        name = type(self).__name__
        positive_int(name, "dim", dim)
        self.head_dim = heads_divide(name, dim, num_heads)
        self.dim, self.num_heads, self.pretrain_size, self.backend = dim, num_heads, pretrain_size, backend
        self.temperature = nn.Parameter(torch.full((num_heads, 1, 1), math.log(math.expm1(1 / 0.24))))
        self.query_embedding = nn.Parameter(nn.init.trunc_normal_(torch.empty(num_heads, 1, self.head_dim), std=0.02))
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.cpb_fc1 = nn.Linear(2, 512)
        self.cpb_fc2 = nn.Linear(512, num_heads)

    def forward(self, x: Tensor) -> Tensor:
        """``x`` (B, H, W, C) -> (B, H, W, C)."""
        check_grid(type(self).__name__, x, self.dim)
        b, h, w, c = x.shape
        n = h * w
        q, k, v = (split_heads(t, self.num_heads) for t in self.qkv(x.reshape(b, n, c)).chunk(3, dim=-1))
        q = (F.normalize(q, dim=-1) + self.query_embedding) * F.softplus(self.temperature) * math.log(n)
        index, table = log_spaced_relative_coords((h, w), (h, w), self.pretrain_size, device=x.device, dtype=x.dtype)
        cpb = self.cpb_fc2(torch.relu(self.cpb_fc1(table)))  # (T, h)
        bias = cpb.transpose(0, 1)[:, index].reshape(1, self.num_heads, n, n)
        out = softmax_attention(q, F.normalize(k, dim=-1), v, bias=bias, scale=1.0, backend=self.backend)
        return self.proj(merge_heads(out)).reshape(b, h, w, c)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}"


@register_module(
    "M11",
    paper="TransNeXt: Robust Foveal Visual Perception for Vision Transformers (Shi, CVPR 2024)",
    layout="(B, H, W, C)",
    example=ModuleExample(
        dict(dim=96, hidden_features=768),
        inputs=[(1, 56, 56, 96)],
        test_inputs=[(2, 8, 8, 16)],
        test_kwargs=dict(dim=16, hidden_features=48),
    ),
)
class ConvolutionalGLU(nn.Module):
    """Convolutional GLU (ConvGLU): a GLU whose gate branch passes a 3x3 depth-wise conv.

    With ``h = floor(2 hidden / 3)`` (the official resizing that keeps the MLP's parameter count)::

        [g, v] = x W_1                       (C -> 2h)
        y = (GELU(DWConv3x3(g)) * v) W_2     (h -> C_out)

    The depth-wise conv (with bias, zero padding) gives each token its nearest-neighbour context,
    which TransNeXt uses in place of a position encoding.

    Cost: O(N C h (2 + 1)) for the linears, O(9 N h) for the conv.
    Layout: ``(B, H, W, C)`` in, ``(B, H, W, C_out)`` out.

    Args:
        dim: C. hidden_features: the MLP width before the 2/3 resizing (default C). out_features: C_out (default C).

    Example::

        >>> glu = ConvolutionalGLU(64, hidden_features=256)
        >>> y = glu(torch.randn(2, 14, 14, 64))
    """

    def __init__(self, dim: int, hidden_features: Optional[int] = None, out_features: Optional[int] = None):
        super().__init__()
        name = type(self).__name__
        positive_int(name, "dim", dim)
        hidden = positive_int(name, "hidden_features", hidden_features or dim)
        out = positive_int(name, "out_features", out_features or dim)
        hidden = int(2 * hidden / 3)
        if hidden < 1:
            raise ParameterError(f"{name}: hidden_features: expected at least 2, got {hidden_features}", argument="hidden_features")
        self.dim, self.hidden, self.out_features = dim, hidden, out
        self.fc1 = nn.Linear(dim, 2 * hidden)
        self.dwconv = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
        self.fc2 = nn.Linear(hidden, out)

    def forward(self, x: Tensor) -> Tensor:
        """``x`` (B, H, W, C) -> (B, H, W, C_out)."""
        check_grid(type(self).__name__, x, self.dim)
        g, v = self.fc1(x).chunk(2, dim=-1)
        g = self.dwconv(g.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return self.fc2(F.gelu(g) * v)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, hidden={self.hidden}, out_features={self.out_features}"
