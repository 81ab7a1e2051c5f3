"""Sparsifiner's learned connectivity predictor and its training loss (catalog S8; Wei et al., CVPR 2023).

Multi-head self-attention whose connectivity mask is predicted per instance by a low-rank MHSA
(Sec. 3, Fig. 2; the official ``MaskPredictor`` of lim142857/Sparsifiner):

    q_c = q W_q + b_q,  k_c = k W_k + b_k                      (head_dim -> head_dim / reduce_c)
    C   = softmax(q_c (k_c^T P_down) * s)                       (B, H, N, r),  P_down (N, r), r = N / reduce_n
    A_approx = C @ W_up                                         (B, H, N, N),  W_up = P_up^T (r, N)
    M_i = top-keep of A_approx[i],  keep = ceil(keep_rate * N)  (keep_rate 0.25)
    out = W_o [softmax over M of (scale q k^T) v]               (attnzoo.sparsifiner_attention)

At inference (and in the sparse phase of training) the code sparsifies the predictor: the basis
keeps the entries with ``|W_up| > basis_threshold`` (2e-2; the code's ``nn.Threshold`` on
``basis.abs()``, so the kept entries are magnitudes) and each row of C keeps its ``coef_topk``
(8) largest coefficients; :meth:`Sparsifiner.predict` with ``sparse=True`` does the same.

Training (the code's ``LOSS.USE_ATTN_RECON`` phase, its default first 5 epochs with weight 0.01):
the **attention reconstruction loss**, a summed squared error between the dense approximation
(raw C and W_up) and the full attention of a teacher (the frozen dense model),

    L_recon = sum (C W_up - A_teacher)^2,   A_teacher = softmax(scale q k^T) (no gradient),

where, during that phase, the layer itself attends densely ("don't distort the token values
while reconstructing"). :meth:`Sparsifiner.reconstruction_loss` computes it; by default the
teacher is the layer's own dense attention, detached (self-distillation, the code's
``ATTN_SELF_DISTILL`` target). Gradients reach the predictor (W_q, W_k, P_down, P_up) and, through
q_c and k_c, the qkv projection, as in the code; the mask itself never carries gradient.

Choices: the predictor's logit scale is ``reduced_c ** -0.5`` (the code's default ``qk_scale``
is ``num_heads ** -0.5``, which reads as a slip); no CLS row is special-cased (the code keeps
the CLS query dense and predicts only the patch rows); ``num_tokens`` is fixed, as P_down and
P_up are per-position (the paper's ViTs have a fixed token count).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ...errors import ParameterError, ShapeError
from ...functional.sparse.sparsifiner import sparsifiner_attention
from .._checks import check_tokens, merge_heads, positive_int, split_heads
from .._registry import ModuleExample, register_module

__all__ = ["Sparsifiner", "sparsifiner_reconstruction_loss"]


def sparsifiner_reconstruction_loss(approx: Tensor, teacher: Tensor) -> Tensor:
    """The attention reconstruction loss: ``sum((approx - teacher)^2)`` (the code's ``F.mse_loss(..., reduction='sum')``);
    ``teacher`` is detached."""
    if approx.shape != teacher.shape:
        raise ShapeError(f"sparsifiner_reconstruction_loss: teacher: expected shape {tuple(approx.shape)}, got {tuple(teacher.shape)}", argument="teacher")
    return (approx - teacher.detach()).pow(2).sum()


@register_module(
    "S8",
    paper="Sparsifiner: Learning Sparse Instance-Dependent Attention for Efficient Vision Transformers (Wei et al., CVPR 2023)",
    layout="(B, N, C)",
    # bench: DeiT-S (197 tokens, 384 channels, 6 heads)
    example=ModuleExample(
        dict(dim=384, num_heads=6, num_tokens=197), inputs=[(1, 197, 384)], test_inputs=[(2, 16, 32)],
        test_kwargs=dict(dim=32, num_heads=2, num_tokens=16, reduce_n_factor=4, coef_topk=2),
        # the connectivity predictor only picks the mask (discrete, detached as in the official code): the
        # task loss of forward() never reaches it, reconstruction_loss() trains it (see the module docstring)
        no_grad=("proj_n", "proj_back_n", "proj_c_q.weight", "proj_c_q.bias", "proj_c_k.weight", "proj_c_k.bias"),
    ),
)
class Sparsifiner(nn.Module):
    """Multi-head self-attention on a learned, instance-dependent sparse connectivity mask.

    ``forward(x)`` (B, N, C) -> (B, N, C): attention over each query's ``keep`` predicted keys.

    Args:
        dim: model width C. num_heads: heads (C divisible by it). num_tokens: N (fixed: the
            token-axis projections are per position). keep_rate: share of keys kept per query
            (the paper's 0.25). reduce_n_factor: r = N // reduce_n_factor (the code's 8; its
            default config 6). reduce_c_factor: predictor head dim = head_dim // it (2).
        basis_threshold, coef_topk: the inference-time sparsification of W_up and C (2e-2, 8).
        qkv_bias: bias of the qkv projection. backend: passed to the functional form.

    Example::

        >>> layer = Sparsifiner(384, num_heads=6, num_tokens=197)       # DeiT-S
        >>> y = layer(torch.randn(2, 197, 384))
        >>> y, loss = layer.reconstruction_loss(torch.randn(2, 197, 384))  # the predictor's training phase
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        num_tokens: int = 197,
        keep_rate: float = 0.25,
        reduce_n_factor: int = 8,
        reduce_c_factor: int = 2,
        basis_threshold: float = 2e-2,
        coef_topk: int = 8,
        qkv_bias: bool = False,
        backend: str | None = None,
    ):
        super().__init__()
        name = type(self).__name__
        self.dim, self.num_heads = positive_int(name, "dim", dim), positive_int(name, "num_heads", num_heads)
        if dim % num_heads:
            raise ParameterError(f"{name}: num_heads: must divide dim={dim}, got {num_heads}", argument="num_heads")
        self.num_tokens = positive_int(name, "num_tokens", num_tokens)
        if isinstance(keep_rate, bool) or not isinstance(keep_rate, (int, float)) or not 0 < keep_rate <= 1:
            raise ParameterError(f"{name}: keep_rate: expected a number in (0, 1], got {keep_rate!r}", argument="keep_rate")
        self.keep = math.ceil(keep_rate * num_tokens)
        self.head_dim = dim // num_heads
        self.reduced_c = max(1, self.head_dim // positive_int(name, "reduce_c_factor", reduce_c_factor))
        self.reduced_n = max(1, num_tokens // positive_int(name, "reduce_n_factor", reduce_n_factor))
        self.coef_topk = positive_int(name, "coef_topk", coef_topk)
        self.basis_threshold = float(basis_threshold)
        self.backend = backend
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        # the connectivity predictor
        self.proj_c_q = nn.Linear(self.head_dim, self.reduced_c)
        self.proj_c_k = nn.Linear(self.head_dim, self.reduced_c)
        self.proj_n = nn.Parameter(torch.randn(num_tokens, self.reduced_n) * 0.02)  # P_down
        self.proj_back_n = nn.Parameter(torch.randn(num_tokens, self.reduced_n) * 0.02)  # P_up (W_up = P_up^T)

    def _qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        check_tokens(type(self).__name__, x, self.dim)
        if x.shape[1] != self.num_tokens:
            raise ShapeError(f"Sparsifiner: x: expected N={self.num_tokens} tokens (the predictor's projections are per position), got {x.shape[1]}", argument="x")
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return split_heads(q, self.num_heads), split_heads(k, self.num_heads), split_heads(v, self.num_heads)

    def predict(self, q: Tensor, k: Tensor, *, sparse: bool = True) -> tuple[Tensor, Tensor]:
        """``(C, W_up)``: the basis coefficients (B, H, N, r) and the basis (r, N). ``sparse``: the
        inference-time form (each row of C keeps its ``coef_topk`` largest, W_up keeps |entries| > threshold)."""
        qc, kc = self.proj_c_q(q), self.proj_c_k(k)  # (B, H, N, c)
        k_down = kc.transpose(-1, -2) @ self.proj_n  # (B, H, c, r): keys projected along the tokens
        coef = torch.softmax(qc @ k_down * self.reduced_c**-0.5, dim=-1)
        basis = self.proj_back_n.transpose(0, 1)
        if sparse:
            kept = coef.topk(min(self.coef_topk, coef.shape[-1]), dim=-1)
            coef = torch.zeros_like(coef).scatter(-1, kept.indices, kept.values)
            basis = torch.nn.functional.threshold(basis.abs(), self.basis_threshold, 0.0)
        return coef, basis

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self._qkv(x)
        coef, basis = self.predict(q, k, sparse=True)
        out = sparsifiner_attention(q, k, v, coef=coef, basis=basis, keep=self.keep, backend=self.backend)
        return self.proj(merge_heads(out))

    def reconstruction_loss(self, x: Tensor, teacher_attention: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(out, loss)`` of the reconstruction phase: the layer attends densely and the loss is
        ``sum((C W_up - A_teacher)^2)`` with the raw predictor; ``teacher_attention`` (B, H, N, N),
        default the layer's own dense attention (detached)."""
        q, k, v = self._qkv(x)
        attn = torch.softmax(q @ k.transpose(-1, -2) * self.head_dim**-0.5, dim=-1)
        coef, basis = self.predict(q, k, sparse=False)
        teacher = attn if teacher_attention is None else teacher_attention
        loss = sparsifiner_reconstruction_loss(coef @ basis, teacher)
        return self.proj(merge_heads(attn @ v)), loss
