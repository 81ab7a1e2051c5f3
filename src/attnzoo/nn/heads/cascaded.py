"""Cascaded group attention (Liu et al., "EfficientViT: Memory Efficient Vision Transformer with
Cascaded Group Attention", CVPR 2023, "Cascaded Group Attention" under the EfficientViT building
blocks; Eq. 2-3, Eq. 1 being the sandwich layout).

Each head sees its own split of the channels, and the split is first added to the previous head's
output, so later heads refine what earlier ones computed::

    X~_ij     = Attn(X_ij W^Q_ij, X_ij W^K_ij, X_ij W^V_ij)              (Eq. 2)
    X~_{i+1}  = Concat[X~_ij]_{j=1..h} W^P_i
    X'_ij     = X_ij + X~_i(j-1),  1 < j <= h                            (Eq. 3)

with ``X_ij`` the j-th of h channel splits. As in the official code (and timm's
``CascadedGroupAttention``) the projections are 1x1 Conv-BN, the query passes a depthwise
Conv-BN (the "token interaction" layer) before the product, the logits get a learned bias per head
indexed by the absolute offset ``(|dy|, |dx|)`` between the two pixels (LeViT's attention bias),
and the output projection is ReLU then Conv-BN. A map other than resolution x resolution is zero
padded at the bottom/right to multiples of it and cut into windows (the padding unmasked, as the
official ``LocalWindowAttention`` does).

:class:`~attnzoo.nn.SingleHeadAttention` (SHViT) reuses :class:`ConvBN` from here.
"""

from __future__ import annotations

import copy
from typing import Any, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...errors import ParameterError, ShapeError
from ...functional.dense import softmax_attention
from .._checks import heads_divide, odd_kernel, positive_int
from .._registry import ModuleExample, register_module

__all__ = ["CascadedGroupAttention", "ConvBN"]


class ConvBN(nn.Module):
    """A bias-free Conv2d followed by BatchNorm2d (the "Conv-BN" of EfficientViT/LeViT/SHViT).

    ``bn_weight`` sets the BatchNorm's initial scale (the papers' code uses 0 on the last
    projection of a residual branch).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1, groups: int = 1, bn_weight: float = 1.0):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        nn.init.constant_(self.bn.weight, bn_weight)
        nn.init.zeros_(self.bn.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.bn(self.conv(x))

    def copy_from(self, conv: nn.Conv2d, bn: nn.BatchNorm2d) -> "ConvBN":
        """Take a timm Conv-BN pair's weights and statistics (deep copies)."""
        if conv.weight.shape != self.conv.weight.shape:
            raise ParameterError(f"ConvBN: expected a conv weight of shape {tuple(self.conv.weight.shape)}, got {tuple(conv.weight.shape)}", argument="conv")
        self.conv, self.bn = copy.deepcopy(conv), copy.deepcopy(bn)
        return self


def _offset_index(height: int, width: int, resolution: int, device: torch.device) -> Tensor:
    """(H W, H W) index ``|dy| * resolution + |dx|`` into the (heads, resolution**2) bias table."""
    ys, xs = torch.meshgrid(torch.arange(height, device=device), torch.arange(width, device=device), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    return (ys[:, None] - ys[None, :]).abs() * resolution + (xs[:, None] - xs[None, :]).abs()


@register_module(
    "H2",
    paper="EfficientViT: Memory Efficient Vision Transformer with Cascaded Group Attention (Liu et al., CVPR 2023)",
    layout="(B, C, H, W)",
    example=ModuleExample(
        dict(dim=64, num_heads=4, key_dim=16, resolution=7), inputs=[(1, 64, 14, 14)],  # EfficientViT-M0 stage 1
        test_inputs=[(2, 16, 6, 6)], test_kwargs=dict(dim=16, num_heads=2, key_dim=4, resolution=3, kernel_sizes=3),
    ),
)
class CascadedGroupAttention(nn.Module):
    """Cascaded group attention on a (B, C, H, W) feature map (EfficientViT, Eq. 2-3).

    Head j takes channel split ``x_j`` plus head j-1's output (Eq. 3), projects it by a 1x1
    Conv-BN to ``q, k`` (``key_dim`` each) and ``v`` (C / h), passes ``q`` through a k x k
    depthwise Conv-BN, and attends over the window's H W pixels::

        out_j = v softmax(q^T k / sqrt(key_dim) + B_j[|dy|, |dx|])^T
        y     = ConvBN(ReLU(concat_j out_j))

    Cost: O(h (H W)^2 key_dim + (H W)^2 C) per window, and O(H W C (2 key_dim + C / h)) for the
    projections; the heads run one after another (the cascade), not in parallel.

    Args:
        dim: channels C (a multiple of num_heads). num_heads: h (the paper's groups).
        key_dim: width of q and k per head. resolution: the attention window (pixels on a side); a
            map that is not resolution x resolution is padded and cut into windows of that size.
        kernel_sizes: odd kernel of each head's depthwise query conv (one int for all, or one per head).
        zero_init_proj: start the output BatchNorm's scale at 0 (the official init, which makes the
            layer output 0 so its residual block starts as the identity); off by default.

    ``from_timm`` takes timm's ``CascadedGroupAttention`` or ``LocalWindowAttention`` (which needs
    ``attn_ratio * key_dim == dim / num_heads``, as every EfficientViT model has).

    Example::

        >>> layer = CascadedGroupAttention(64, num_heads=4, key_dim=16, resolution=7)
        >>> y = layer(torch.randn(2, 64, 14, 14))   # four 7 x 7 windows
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 4,
        key_dim: int = 16,
        resolution: int = 7,
        kernel_sizes: Union[int, Sequence[int]] = 5,
        *,
        zero_init_proj: bool = False,
        backend: Union[str, None] = None,
    ):
        super().__init__()
        name = type(self).__name__
        heads_divide(name, positive_int(name, "dim", dim), num_heads)
        positive_int(name, "key_dim", key_dim)
        positive_int(name, "resolution", resolution)
        kernels = [kernel_sizes] * num_heads if isinstance(kernel_sizes, int) else list(kernel_sizes)
        if len(kernels) != num_heads:
            raise ParameterError(f"{name}: kernel_sizes: expected one int or {num_heads} ints, got {kernel_sizes!r}", argument="kernel_sizes")
        for k in kernels:
            odd_kernel(name, k, optional=False)
        self.dim, self.num_heads, self.key_dim, self.resolution = dim, num_heads, key_dim, resolution
        self.val_dim = dim // num_heads
        self.kernel_sizes = tuple(kernels)
        self.backend = backend
        self.qkvs = nn.ModuleList(ConvBN(self.val_dim, 2 * key_dim + self.val_dim) for _ in range(num_heads))
        self.dws = nn.ModuleList(ConvBN(key_dim, key_dim, k, groups=key_dim) for k in kernels)
        self.proj = ConvBN(dim, dim, bn_weight=0.0 if zero_init_proj else 1.0)
        # one bias per head and absolute offset (|dy|, |dx|); the official init is zeros
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, resolution * resolution))

    def _attend(self, x: Tensor) -> Tensor:
        b, _, h, w = x.shape
        bias = self.attention_biases[:, _offset_index(h, w, self.resolution, x.device)].unsqueeze(0).to(x.dtype)
        splits = x.chunk(self.num_heads, dim=1)
        outs = []
        feat = splits[0]
        for j in range(self.num_heads):
            if j > 0:
                feat = outs[-1] + splits[j]  # Eq. 3: the cascade
            q, k, v = self.qkvs[j](feat).split([self.key_dim, self.key_dim, self.val_dim], dim=1)
            q = self.dws[j](q)
            q, k, v = (t.flatten(2).transpose(1, 2).unsqueeze(1) for t in (q, k, v))  # (B, 1, HW, d)
            out = softmax_attention(q, k, v, bias=bias[:, j : j + 1], scale=self.key_dim**-0.5, backend=self.backend)
            outs.append(out.squeeze(1).transpose(1, 2).reshape(b, self.val_dim, h, w))
        return self.proj(F.relu(torch.cat(outs, dim=1)))

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.dim:
            raise ShapeError(f"{type(self).__name__}: x: expected (B, C={self.dim}, H, W), got shape {tuple(x.shape)}", argument="x")
        b, c, h, w = x.shape
        r = self.resolution
        if h == r and w == r:
            return self._attend(x)
        # windows of r x r, zero padded at the bottom/right (the official LocalWindowAttention)
        pad_h, pad_w = (r - h % r) % r, (r - w % r) % r
        x = F.pad(x, (0, pad_w, 0, pad_h))
        nh, nw = (h + pad_h) // r, (w + pad_w) // r
        x = x.view(b, c, nh, r, nw, r).permute(0, 2, 4, 1, 3, 5).reshape(b * nh * nw, c, r, r)
        x = self._attend(x)
        x = x.view(b, nh, nw, c, r, r).permute(0, 3, 1, 4, 2, 5).reshape(b, c, nh * r, nw * r)
        return x[:, :, :h, :w].contiguous()

    @classmethod
    def from_timm(cls, module: Any) -> "CascadedGroupAttention":
        """A copy of timm's ``efficientvit_msra.CascadedGroupAttention`` or ``LocalWindowAttention``."""
        attn = getattr(module, "attn", module)
        dim = attn.proj[1].conv.out_channels
        if attn.val_dim * attn.num_heads != dim:
            raise ParameterError(
                f"{cls.__name__}.from_timm: expected attn_ratio * key_dim = dim / num_heads (the cascade adds each head's output "
                f"to the next split), got val_dim={attn.val_dim}, dim={dim}, num_heads={attn.num_heads}",
                argument="module",
            )
        kernels = [dw.conv.kernel_size[0] for dw in attn.dws]
        layer = cls(dim, attn.num_heads, attn.key_dim, attn.resolution, kernels)
        for ours, theirs in zip(layer.qkvs, attn.qkvs):
            ours.copy_from(theirs.conv, theirs.bn)
        for ours, theirs in zip(layer.dws, attn.dws):
            ours.copy_from(theirs.conv, theirs.bn)
        layer.proj.copy_from(attn.proj[1].conv, attn.proj[1].bn)
        with torch.no_grad():
            layer.attention_biases.copy_(attn.attention_biases)
        return layer.train(module.training)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, key_dim={self.key_dim}, resolution={self.resolution}, kernel_sizes={self.kernel_sizes}"
