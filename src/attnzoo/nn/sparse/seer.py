"""SeerAttention's learned block gate and its distillation (catalog S2; Gao et al., arXiv 2410.13276, Sec. 3).

The gate (``AttnGate``, gate type ``Qavg_Kmaxminavg`` of the official code): per block of
``block_size`` tokens, the queries are average-pooled and the keys max-, min- and average-pooled
(concatenated), each through a per-head linear map to ``hidden`` features; the block scores are
``softmax(Q_g K_g^T / sqrt(hidden))`` over key blocks (causal: future blocks excluded). The base
model stays frozen; the gate is trained by self-distillation: its target is the true attention map
max-pooled to blocks and row-normalized, the loss KL(target || gate). At inference,
:func:`attnzoo.block_gate_attention` attends the blocks scoring above a threshold (the paper's
5e-4 to 5e-3). The official gate also applies RoPE to the pooled features; pass ``rope`` (a
callable on (B, H, n_blocks, hidden) with block positions) to do the same.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from ...errors import ShapeError
from .._checks import positive_int
from .._registry import ModuleExample, register_module

__all__ = ["SeerAttentionGate", "seer_distillation_target", "seer_distillation_loss"]

NEG_INF = float("-inf")


def _pooled(x: Tensor, block: int, how: str) -> Tensor:
    """(B, H, N, D) -> (B, H, n_blocks, D) per block of ``block`` tokens (the last may be short)."""
    b, h, n, d = x.shape
    blocks = math.ceil(n / block)
    pad = blocks * block - n
    if how == "avg":
        sums = torch.nn.functional.pad(x, (0, 0, 0, pad)).view(b, h, blocks, block, d).sum(3)
        counts = torch.full((blocks,), float(block), device=x.device, dtype=x.dtype)
        counts[-1] = block - pad
        return sums / counts[:, None]
    fill = NEG_INF if how == "max" else float("inf")
    padded = torch.nn.functional.pad(x, (0, 0, 0, pad), value=fill).view(b, h, blocks, block, d)
    return padded.amax(3) if how == "max" else padded.amin(3)


@register_module(
    "S2",
    paper="SeerAttention: Learning Intrinsic Sparse Attention in Your LLMs (Gao et al., 2024)",
    layout="q (B, H, N, D), k (B, Hkv, N, D) -> block scores (B, H, N / block, N / block)",
    # bench: a Llama-3-8B layer's heads (32 query, 8 key/value, D = 128) at 4096 tokens; the test keeps
    # block_size 64 (the output shape is a function of the input shapes only) with 200 tokens: 4 blocks
    example=ModuleExample(
        dict(num_heads=32, head_dim=128), inputs=[(1, 32, 4096, 128), (1, 8, 4096, 128)],
        test_inputs=[(2, 4, 200, 8), (2, 2, 200, 8)], test_kwargs=dict(num_heads=4, head_dim=8, hidden=16),
        output=lambda shapes: (shapes[0][0], shapes[0][1], -(-shapes[0][2] // 64), -(-shapes[1][2] // 64)),
    ),
)
class SeerAttentionGate(nn.Module):
    """Block scores from pooled queries and keys: ``forward(q, k, causal=False)`` -> (B, H, nb, nb) probabilities.

    Args:
        num_heads: query heads H (keys with fewer heads are repeated, GQA). head_dim: D.
        hidden: gate features per head (the paper's 128). block_size: tokens per block (64).
        rope: optional callable ``(x (B, H, n_blocks, hidden), positions (n_blocks,)) -> x`` applied to
            both pooled sides, as the official gate applies RoPE.

    Cost: O(N D) to pool, O((N / block)^2 hidden) for the block scores.

    Example::

        >>> gate = SeerAttentionGate(num_heads=32, head_dim=128)
        >>> scores = gate(torch.randn(1, 32, 4096, 128), torch.randn(1, 8, 4096, 128), causal=True)  # (1, 32, 64, 64)
    """

    def __init__(self, num_heads: int, head_dim: int, hidden: int = 128, block_size: int = 64, rope: Optional[Callable[[Tensor, Tensor], Tensor]] = None):
        super().__init__()
        name = type(self).__name__
        self.num_heads, self.head_dim = positive_int(name, "num_heads", num_heads), positive_int(name, "head_dim", head_dim)
        self.hidden, self.block_size = positive_int(name, "hidden", hidden), positive_int(name, "block_size", block_size)
        self.rope = rope
        self.q_proj = nn.Parameter(torch.randn(num_heads, head_dim, hidden) * head_dim**-0.5)
        self.k_proj = nn.Parameter(torch.randn(num_heads, 3 * head_dim, hidden) * (3 * head_dim) ** -0.5)

    def forward(self, q: Tensor, k: Tensor, causal: bool = False) -> Tensor:
        if q.dim() != 4 or q.shape[1] != self.num_heads or q.shape[3] != self.head_dim:
            raise ShapeError(f"SeerAttentionGate: q: expected (B, {self.num_heads}, N, {self.head_dim}), got {tuple(q.shape)}", argument="q")
        if k.dim() != 4 or self.num_heads % k.shape[1] or k.shape[3] != self.head_dim:
            raise ShapeError(f"SeerAttentionGate: k: expected (B, Hkv, N, {self.head_dim}) with Hkv dividing {self.num_heads}, got {tuple(k.shape)}", argument="k")
        k = k.repeat_interleave(self.num_heads // k.shape[1], dim=1)
        qg = torch.einsum("bhnd,hde->bhne", _pooled(q, self.block_size, "avg"), self.q_proj)
        pooled_k = torch.cat([_pooled(k, self.block_size, how) for how in ("max", "min", "avg")], dim=-1)
        kg = torch.einsum("bhnd,hde->bhne", pooled_k, self.k_proj)
        if self.rope is not None:
            qg, kg = self.rope(qg, torch.arange(qg.shape[2], device=q.device)), self.rope(kg, torch.arange(kg.shape[2], device=q.device))
        logits = qg @ kg.transpose(-1, -2) * self.hidden**-0.5
        if causal:
            nq, nk = logits.shape[-2:]
            logits = logits.masked_fill(torch.ones(nq, nk, dtype=torch.bool, device=q.device).triu(1 + nk - nq), NEG_INF)
        return torch.softmax(logits, dim=-1)

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, head_dim={self.head_dim}, hidden={self.hidden}, block_size={self.block_size}"


@torch.no_grad()
def seer_distillation_target(q: Tensor, k: Tensor, block_size: int = 64, causal: bool = False, scale: Optional[float] = None) -> Tensor:
    """The gate's target: the true attention probabilities max-pooled to (query block, key block)
    and normalized per query block. (B, H, nb, nb); computed one query block at a time (O(block * N) memory)."""
    b, h, n, d = q.shape
    k = k.repeat_interleave(h // k.shape[1], dim=1)
    sc = d**-0.5 if scale is None else scale
    blocks = math.ceil(n / block_size)
    pad = blocks * block_size - k.shape[2]
    out = torch.empty(b, h, blocks, math.ceil(k.shape[2] / block_size), dtype=torch.float32, device=q.device)
    keys = torch.arange(k.shape[2], device=q.device)
    for qb in range(blocks):
        rows = torch.arange(qb * block_size, min(n, (qb + 1) * block_size), device=q.device)
        s = q[:, :, rows].float() @ k.float().transpose(-1, -2) * sc
        if causal:
            s = s.masked_fill(keys[None, :] > rows[:, None] + k.shape[2] - n, NEG_INF)
        p = torch.nn.functional.pad(torch.softmax(s, dim=-1), (0, pad))
        out[:, :, qb] = p.view(b, h, rows.numel(), -1, block_size).amax(dim=(2, 4))
    return out / out.sum(-1, keepdim=True)


def seer_distillation_loss(gate: Tensor, target: Tensor) -> Tensor:
    """KL(target || gate) summed over key blocks, averaged over (batch, head, query block): the
    paper's ``KLDivLoss``; blocks with target 0 contribute 0 (a causal gate's 0s are no -inf)."""
    if gate.shape != target.shape:
        raise ShapeError(f"seer_distillation_loss: gate: expected the target's shape {tuple(target.shape)}, got {tuple(gate.shape)}", argument="gate")
    live = target > 0
    terms = torch.where(live, target * (target.clamp_min(1e-30).log() - gate.clamp_min(1e-30).log()), torch.zeros_like(gate))
    return terms.sum(-1).mean()
