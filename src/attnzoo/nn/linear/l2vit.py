"""L2ViT's enhanced linear attention and its Local Concentration Module (catalog F8).

Zheng (2025), "The Linear Attention Resurrection in Vision Transformer" (arXiv 2501.16182);
official code ChuanyangZheng/L2ViT, ``classification/models/l2vit.py`` (``LinearAttention``,
``LCM``, ``LGABlock``). The linear global attention is ReLU-kernel linear attention with a
learnable per-head temperature t_h (initialized to D^-0.5) and a floored denominator:

    out_i = t_h relu(q_i) (sum_j relu(k_j)^T v_j) / max(relu(q_i) . sum_j relu(k_j), 100)

(the floor of 100 is the official code's clamp, "makes training stable"). That is the
``linear`` mechanism with ``feature_map="relu"``, unnormalized, with a column of ones appended to
v for the denominator: no new mechanism. Linear attention spreads each query's weight over
the whole image; the Local Concentration Module (LCM) re-concentrates it with two depthwise
k x k convolutions (k = 7) around a GELU and a BatchNorm:

    LCM(x) = DWConv_2(BN(GELU(DWConv_1(x))))

and the block applies them as two residual steps (the official ``LGABlock`` with
``enhanced=True``; its conditional position encoding and MLP belong to the block, not here):

    x = x + Attn(LN_1(x));    x = x + LCM(LN_3(x))

Tokens are channels-last, (B, H, W, C) (``spatial_dims=2``, the paper) or (B, N, C)
(``spatial_dims=1``: 1D convolutions, an extension).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from ...errors import ParameterError, ShapeError
from ...functional.linear import linear_attention
from ...kernels.linear_scan import append_ones
from .._checks import odd_kernel, spatial_dims_1_or_2
from .._registry import ModuleExample, register_module
from .attention import _TokenMixer

__all__ = ["LocalConcentrationModule", "L2ViTAttention", "DENOMINATOR_FLOOR"]

#: the official clamp of the linear attention's denominator.
DENOMINATOR_FLOOR = 100.0



def _check_layout(owner: str, x: Tensor, dim: int, spatial_dims: int) -> None:
    if x.dim() != 2 + spatial_dims or x.shape[-1] != dim:
        layout = "(B, N, C)" if spatial_dims == 1 else "(B, H, W, C)"
        raise ShapeError(f"{owner}: x: expected {layout} with C={dim}, got shape {tuple(x.shape)}", argument="x")


@register_module(
    "F8",
    paper="The Linear Attention Resurrection in Vision Transformer (L2ViT; Zheng, 2025)",
    layout="(B, H, W, C)",
    example=ModuleExample(dict(dim=96), inputs=[(1, 56, 56, 96)], test_inputs=[(2, 8, 8, 16)], test_kwargs=dict(dim=16)),
)
class LocalConcentrationModule(nn.Module):
    """L2ViT's LCM: depthwise conv, GELU, BatchNorm, depthwise conv, on channels-last tokens.

    Args:
        dim: channels C. kernel_size: of both depthwise convolutions (odd; the paper: 7).
        spatial_dims: 2 for (B, H, W, C) grids, 1 for (B, N, C) sequences.

    Example::

        >>> lcm = LocalConcentrationModule(96)
        >>> y = lcm(torch.randn(2, 56, 56, 96))            # same shape
    """

    def __init__(self, dim: int, *, kernel_size: int = 7, spatial_dims: int = 2):
        super().__init__()
        owner = type(self).__name__
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ParameterError(f"{owner}: dim: expected a positive int, got {dim!r}", argument="dim")
        odd_kernel(owner, kernel_size, optional=False)
        self.dim, self.kernel_size, self.spatial_dims = dim, kernel_size, spatial_dims_1_or_2(owner, spatial_dims)
        conv = nn.Conv1d if spatial_dims == 1 else nn.Conv2d
        self.conv1 = conv(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        self.act = nn.GELU()
        self.bn = nn.BatchNorm1d(dim) if spatial_dims == 1 else nn.BatchNorm2d(dim)
        self.conv2 = conv(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)

    def forward(self, x: Tensor) -> Tensor:
        _check_layout(type(self).__name__, x, self.dim, self.spatial_dims)
        grid = x.movedim(-1, 1)  # channels first
        return self.conv2(self.bn(self.act(self.conv1(grid)))).movedim(1, -1)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, kernel_size={self.kernel_size}, spatial_dims={self.spatial_dims}"


class _EnhancedLinearAttention(_TokenMixer):
    """The official ``LinearAttention``: qkv, ReLU linear attention with temperature and floored denominator, proj."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool, denominator_floor: float, backend: Optional[str]):
        super().__init__(dim, num_heads, qkv_bias, True)
        self.temperature = nn.Parameter(torch.full((num_heads, 1, 1), (dim // num_heads) ** -0.5))
        self.denominator_floor, self.backend = denominator_floor, backend

    def forward(self, tokens: Tensor) -> Tensor:
        q, k, v = self.heads(tokens)
        # [numerator, denominator] in one pass: relu(q) sum relu(k)^T [v, 1], unnormalized, unscaled
        both = linear_attention(q, k, append_ones(v), feature_map="relu", normalize=False, scale=1.0, backend=self.backend)
        numerator, denominator = both[..., :-1], both[..., -1:]
        out = self.temperature * numerator / denominator.clamp(min=self.denominator_floor)
        return self.proj(self.merge(out))


@register_module(
    "F8",
    paper="The Linear Attention Resurrection in Vision Transformer (L2ViT; Zheng, 2025)",
    layout="(B, H, W, C)",
    example=ModuleExample(
        dict(dim=96, num_heads=3), inputs=[(1, 56, 56, 96)], test_inputs=[(2, 8, 8, 16)], test_kwargs=dict(dim=16, num_heads=2)
    ),
)
class L2ViTAttention(nn.Module):
    """L2ViT's enhanced linear global attention with its LCM, as two residual steps on channels-last tokens.

    ``forward(x) = y + LCM(LN_3(y))`` with ``y = x + Attn(LN_1(x))``; ``attention(x)`` is the
    linear attention alone (the official ``LinearAttention``).

    Args:
        dim: channels C. num_heads: heads (a divisor of C).
        spatial_dims: 2 for (B, H, W, C) grids (the paper), 1 for (B, N, C) sequences.
        kernel_size: of the LCM's depthwise convolutions (the paper: 7); None drops the LCM
            (the plain linear global attention block of the paper's ablation).
        denominator_floor: the clamp of the denominator (official: 100).
        backend: passed to :func:`~attnzoo.functional.linear_attention`.

    Example::

        >>> layer = L2ViTAttention(dim=96, num_heads=3)
        >>> y = layer(torch.randn(2, 56, 56, 96))
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        spatial_dims: int = 2,
        kernel_size: Optional[int] = 7,
        qkv_bias: bool = True,
        denominator_floor: float = DENOMINATOR_FLOOR,
        backend: Optional[str] = None,
    ):
        super().__init__()
        owner = type(self).__name__
        if (
            isinstance(denominator_floor, bool)
            or not isinstance(denominator_floor, (int, float))
            or not 0 < denominator_floor < float("inf")
        ):
            raise ParameterError(
                f"{owner}: denominator_floor: expected a finite positive number, got {denominator_floor!r}", argument="denominator_floor"
            )
        self.dim, self.spatial_dims = dim, spatial_dims_1_or_2(owner, spatial_dims)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = _EnhancedLinearAttention(dim, num_heads, qkv_bias, float(denominator_floor), backend)
        self.norm3 = None if kernel_size is None else nn.LayerNorm(dim)
        self.lcm = None if kernel_size is None else LocalConcentrationModule(dim, kernel_size=kernel_size, spatial_dims=spatial_dims)

    @property
    def num_heads(self) -> int:
        return self.attn.num_heads

    def attention(self, x: Tensor) -> Tensor:
        """The enhanced linear attention alone on channels-last tokens (no norm, no residual, no LCM)."""
        _check_layout(type(self).__name__, x, self.dim, self.spatial_dims)
        return self.attn(x.reshape(x.shape[0], -1, self.dim)).reshape(x.shape)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attention(self.norm1(x))
        if self.lcm is not None:
            x = x + self.lcm(self.norm3(x))
        return x

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_heads={self.num_heads}, spatial_dims={self.spatial_dims}, denominator_floor={self.attn.denominator_floor}"
        )
