"""Mixture-of-head attention (Jin et al., "MoH: Multi-Head Attention as Mixture-of-Head Attention",
ICML 2025; catalog H1).

Multi-head attention written as a sum over heads, ``MHA(X) = sum_i H^i W_O^i`` (Sec. 3.1, Eq. 2), with
each head an expert of a mixture (Sec. 3.2, Eq. 3-4): a router weighs the heads per token,

    MoH(X, X') = sum_{i=1}^{h} g_i H^i W_O^i
    g_i = alpha_1 h_s softmax(W_s x)_i                       1 <= i <= h_s       (shared heads, always on)
    g_i = alpha_2 k   softmax(W_r x)_i / Z    if i in top-k, else 0                (routed heads)
    [alpha_1, alpha_2] = 2 softmax(W_h x)                                          (shared vs routed balance)

with Z the sum of the kept routed probabilities (they are renormalised over the top-k). The scales
(``h_s``, ``k``, 2) are the official code's (SkyworkAI/MoH, ``MoHAttention`` in MoH-DiT/models.py):
they make every gate 1 on average, so with all gates equal the layer is plain MHA. The load-balance
loss (Sec. 3.2, Eq. 5) over the h - h_s routed heads, as the official code computes it::

    L_b = (h - h_s) sum_i f_i P_i,   f_i = mean_t 1[i in top-k(t)],   P_i = mean_t softmax(W_r x_t)_i

(so L_b = k for a uniform router); it is kept in ``layer.aux_loss`` after each training-mode call
(None in eval), instead of the official class-level list that grows until cleared.

Cost: the attention of h heads, O(N^2 C) and O(N C^2) for the projections, plus the routers O(N C h).
The attention of unselected heads is computed densely and multiplied by zero here (the paper's
efficiency comes from skipping them in a sparse kernel; this module is the exact arithmetic).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...errors import ParameterError
from ...functional.dense import softmax_attention
from .._checks import check_tokens, merge_heads, positive_int, split_heads
from .._registry import ModuleExample, register_module

__all__ = ["MixtureOfHeadAttention"]


@register_module(
    "H1",
    paper="MoH: Multi-Head Attention as Mixture-of-Head Attention (Jin et al., ICML 2025)",
    layout="(B, N, C)",
    example=ModuleExample(
        dict(dim=512, num_heads=8, shared_heads=2, top_k=4), inputs=[(1, 1024, 512)],  # 6 of 8 heads per token (75%)
        test_inputs=[(2, 17, 48)], test_kwargs=dict(dim=48, num_heads=6, shared_heads=2, top_k=2),
    ),
)
class MixtureOfHeadAttention(nn.Module):
    """Mixture-of-head attention over tokens (B, N, C): per-token gates on the heads (shared heads
    always on, top-k of the routed heads), weighted sum of the head outputs.

    ``MoH(X) = sum_i g_i H^i W_O^i`` (Sec. 3.2, Eq. 3-4; the gates g as in the module notes, the
    official scales). Cost: O(N^2 C) attention + O(N C^2) projections + O(N C h) routers.
    Layout: (B, N, C) -> (B, N, C).

    Args:
        dim: channels C. num_heads: h heads (head_dim = C / h unless given).
        shared_heads: h_s heads always active (the first h_s heads). top_k: k routed heads kept per
            token out of the h - h_s others (0 when h_s = h: no routing).
        qkv_bias: bias of the qkv projection. head_dim: per-head width (default C / h).
        backend: passed to :func:`attnzoo.softmax_attention`.

    ``forward(x, key_padding_mask=None, causal=False)`` returns (B, N, C); in training mode the
    load-balance loss L_b is left in ``self.aux_loss`` (add ``beta * aux_loss`` to the task loss;
    the paper uses beta = 0.01). :meth:`gates` gives the (B, N, h) head weights g.

    Example::

        >>> layer = MixtureOfHeadAttention(384, num_heads=6, shared_heads=2, top_k=2)
        >>> y = layer(torch.randn(2, 197, 384))
        >>> loss = task_loss + 0.01 * layer.aux_loss
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        *,
        shared_heads: int = 2,
        top_k: int = 4,
        qkv_bias: bool = False,
        head_dim: Optional[int] = None,
        backend: Optional[str] = None,
    ):
        super().__init__()
        name = type(self).__name__
        positive_int(name, "dim", dim)
        positive_int(name, "num_heads", num_heads)
        if head_dim is None:
            if dim % num_heads:
                raise ParameterError(f"{name}: num_heads: expected a divisor of dim={dim} (or pass head_dim), got {num_heads}", argument="num_heads")
            head_dim = dim // num_heads
        positive_int(name, "head_dim", head_dim)
        if isinstance(shared_heads, bool) or not isinstance(shared_heads, int) or not 0 <= shared_heads <= num_heads:
            raise ParameterError(f"{name}: shared_heads: expected an int in [0, num_heads={num_heads}], got {shared_heads!r}", argument="shared_heads")
        routed = num_heads - shared_heads
        if isinstance(top_k, bool) or not isinstance(top_k, int) or not 0 <= top_k <= routed or (routed > 0 and top_k == 0):
            raise ParameterError(
                f"{name}: top_k: expected an int in [1, num_heads - shared_heads = {routed}] (0 only when every head is shared), got {top_k!r}",
                argument="top_k",
            )
        self.dim, self.num_heads, self.head_dim = dim, num_heads, head_dim
        self.shared_heads, self.routed_heads, self.top_k = shared_heads, routed, top_k
        self.backend = backend
        self.qkv = nn.Linear(dim, 3 * num_heads * head_dim, bias=qkv_bias)
        self.proj = nn.Linear(num_heads * head_dim, dim)
        # routers (bias-free, as the official code): W_r over routed heads, W_s over shared heads
        # (a softmax over a single shared head is the constant 1: no W_s then), W_h the 2-way balance
        self.router = nn.Linear(dim, routed, bias=False) if routed > 0 else None
        self.shared_router = nn.Linear(dim, shared_heads, bias=False) if shared_heads > 1 else None
        self.balance = nn.Linear(dim, 2, bias=False) if routed > 0 and shared_heads > 0 else None
        self.aux_loss: Optional[Tensor] = None

    def gates(self, x: Tensor) -> Tensor:
        """The per-token head weights g, (B, N, h): shared heads first, then routed ones (0 if unselected)."""
        check_tokens(type(self).__name__, x, self.dim)
        parts = []
        shared = None
        if self.shared_heads > 0:
            if self.shared_router is None:
                shared = x.new_ones(*x.shape[:-1], 1)
            else:
                shared = F.softmax(self.shared_router(x), dim=-1) * self.shared_heads
        routed = None
        if self.router is not None:
            probs = F.softmax(self.router(x), dim=-1)
            idx = probs.topk(self.top_k, dim=-1).indices
            mask = torch.zeros_like(probs).scatter_(-1, idx, 1.0)
            kept = probs * mask
            kept = kept / kept.sum(-1, keepdim=True).clamp_min(torch.finfo(kept.dtype).eps)
            routed = kept * self.top_k
            if self.training:
                frac = mask.reshape(-1, self.routed_heads).mean(0)  # f_i
                prob = probs.reshape(-1, self.routed_heads).mean(0)  # P_i
                self.aux_loss = self.routed_heads * (frac * prob).sum()
        if shared is not None and routed is not None and self.balance is not None:
            alpha = F.softmax(self.balance(x), dim=-1) * 2
            shared, routed = shared * alpha[..., :1], routed * alpha[..., 1:]
        if shared is not None:
            parts.append(shared)
        if routed is not None:
            parts.append(routed)
        return torch.cat(parts, dim=-1)

    def forward(self, x: Tensor, key_padding_mask: Optional[Tensor] = None, causal: bool = False) -> Tensor:
        check_tokens(type(self).__name__, x, self.dim)
        self.aux_loss = None
        g = self.gates(x)  # (B, N, h)
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        q, k, v = (split_heads(t, self.num_heads) for t in (q, k, v))
        heads = softmax_attention(q, k, v, causal=causal, key_padding_mask=key_padding_mask, backend=self.backend)
        heads = heads * g.transpose(1, 2).unsqueeze(-1)  # (B, h, N, d) * (B, h, N, 1)
        return self.proj(merge_heads(heads))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, shared_heads={self.shared_heads}, top_k={self.top_k}"
