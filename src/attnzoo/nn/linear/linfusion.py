"""The LinFusion attention layer (Liu et al., 2024; catalog F8).

:class:`LinFusionAttention` is the official ``GeneralizedLinearAttention``
(Huage001/LinFusion, ``src/linfusion/attention.py``) over (B, N, C) tokens::

    q = W_q (x + MLP_q(x)),   k = W_k (c + MLP_k(c)),   v = W_v c      (c = context, or x)
    o = linfusion_attention(q, k, v)                                  (elu + 1, mean-normalized)
    y = o W_out + b_out

with ``MLP(x) = Linear(LeakyReLU(LayerNorm(Linear(x))))`` of hidden width ``projection_mid_dim``
(default C, as the official ``get_none_linear_projection``; -1 drops the MLPs: q = W_q x. The
official code's -1 returns an identity that its forward still adds, q = W_q (2 x), which is
the same layer with W_q doubled). Projections without bias, the output projection with one, as the diffusers
``Attention`` the official layer subclasses. The paper distils it from the UNet's softmax
self-attention; the training loop is not part of this module.
"""

from __future__ import annotations

from typing import Any, Optional

from torch import Tensor, nn

from ...errors import ParameterError, ShapeError
from ...functional.linear.linfusion import linfusion_attention
from .._registry import ModuleExample, register_module

__all__ = ["LinFusionAttention", "token_mlp"]


def token_mlp(dim: int, mid_dim: Optional[int]) -> Optional[nn.Module]:
    """LinFusion's MLP on the tokens before the q/k projection: Linear, LayerNorm, LeakyReLU, Linear
    (``mid_dim`` None: ``dim``; -1: None, no MLP)."""
    if mid_dim == -1:
        return None
    width = dim if mid_dim is None else mid_dim
    return nn.Sequential(nn.Linear(dim, width), nn.LayerNorm(width), nn.LeakyReLU(), nn.Linear(width, dim))


@register_module(
    "F8",
    paper="LinFusion: 1 GPU, 1 Minute, 16K Image (Liu et al., 2024)",
    layout="(B, N, C)",
    # bench: the self-attention of SD 1.5's first UNet stage (a 64 x 64 latent, 320 channels, 5 heads)
    example=ModuleExample(
        dict(dim=320, num_heads=5), inputs=[(1, 4096, 320)], test_inputs=[(2, 17, 32)], test_kwargs=dict(dim=32, num_heads=2)
    ),
)
class LinFusionAttention(nn.Module):
    """LinFusion's generalized linear attention over (B, N, C) tokens, self or cross.

    Args:
        dim: channels C. num_heads: heads (a divisor of C).
        projection_mid_dim: hidden width of the q and k MLPs (None: C; -1: no MLP).
        context_dim: channels of the context for cross attention (None: C).
        feature_map, eps: passed to :func:`~attnzoo.functional.linfusion_attention`.
        backend: ``factorized`` or ``reference``.

    Example::

        >>> layer = LinFusionAttention(dim=320, num_heads=5)
        >>> y = layer(torch.randn(1, 64 * 64, 320))
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        projection_mid_dim: Optional[int] = None,
        context_dim: Optional[int] = None,
        feature_map: Any = "elu",
        eps: float = 1e-4,
        qkv_bias: bool = False,
        proj_bias: bool = True,
        backend: Optional[str] = None,
    ):
        super().__init__()
        name = type(self).__name__
        if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1 or dim % num_heads:
            raise ParameterError(f"{name}: num_heads: expected a divisor of dim={dim}, got {num_heads!r}", argument="num_heads")
        if projection_mid_dim is not None and (isinstance(projection_mid_dim, bool) or not isinstance(projection_mid_dim, int) or not (projection_mid_dim >= 1 or projection_mid_dim == -1)):
            raise ParameterError(f"{name}: projection_mid_dim: expected None, -1 or a positive int, got {projection_mid_dim!r}", argument="projection_mid_dim")
        context = dim if context_dim is None else context_dim
        self.dim, self.num_heads, self.context_dim = dim, num_heads, context
        self.feature_map, self.eps, self.backend = feature_map, eps, backend
        self.to_q = nn.Linear(dim, dim, bias=qkv_bias)
        self.to_k = nn.Linear(context, dim, bias=qkv_bias)
        self.to_v = nn.Linear(context, dim, bias=qkv_bias)
        self.to_out = nn.Linear(dim, dim, bias=proj_bias)
        self.to_q_ = token_mlp(dim, projection_mid_dim)
        self.to_k_ = token_mlp(context, projection_mid_dim)

    @staticmethod
    def _mixed(x: Tensor, mlp: Optional[nn.Module]) -> Tensor:
        """``x + MLP(x)``: the MLP corrects the tokens, the projection follows (x alone without an MLP)."""
        return x if mlp is None else x + mlp(x)

    def _heads(self, x: Tensor) -> Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.num_heads, self.dim // self.num_heads).transpose(1, 2)

    def forward(self, x: Tensor, context: Optional[Tensor] = None, key_padding_mask: Optional[Tensor] = None) -> Tensor:
        """(B, N, C) -> (B, N, C), attending ``context`` (B, M, context_dim) or x itself;
        ``key_padding_mask`` (B, M) bool, True = a padded key token (the means run over the real ones)."""
        name = type(self).__name__
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ShapeError(f"{name}: x: expected (B, N, C={self.dim}), got shape {tuple(x.shape)}", argument="x")
        c = x if context is None else context
        if c.dim() != 3 or c.shape[-1] != self.context_dim or c.shape[0] != x.shape[0]:
            raise ShapeError(f"{name}: context: expected (B={x.shape[0]}, M, {self.context_dim}), got shape {tuple(c.shape)}", argument="context")
        q = self._heads(self.to_q(self._mixed(x, self.to_q_)))
        k = self._heads(self.to_k(self._mixed(c, self.to_k_)))
        v = self._heads(self.to_v(c))
        out = linfusion_attention(q, k, v, feature_map=self.feature_map, eps=self.eps, backend=self.backend, key_padding_mask=key_padding_mask)
        return self.to_out(out.transpose(1, 2).reshape(x.shape))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, context_dim={self.context_dim}, eps={self.eps}"
