"""FocalNets' focal modulation (catalog M3): an attention-free token mixer.

Yang et al., "Focal Modulation Networks", NeurIPS 2022, Sec. 3.2. Self-attention's "interact
then aggregate" becomes "aggregate then interact": a query token is modulated elementwise by a
context gathered around it at several granularities::

    q, Z^0, G = f(X)                                  one linear to C + C + (L + 1) channels
    Z^l       = GELU(DWConv_{k_l}(Z^{l-1})),  l = 1..L,   k_l = focal_factor * (l - 1) + focal_window
    Z^{L+1}   = GELU(AvgPool_global(Z^L))           the image-level context
    Z^out     = sum_{l=1}^{L+1} G^l * Z^l            gated aggregation (G^l one channel, per pixel)
    Y         = proj(q * h(Z^out))                   elementwise modulation

(the hierarchical contextualization, gated aggregation and modulation of the paper; the
official code's optional ``normalize_modulator`` divides Z^out by L + 1 and ``use_postln``
normalizes q * h(Z^out) before ``proj``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...errors import ParameterError
from .._checks import positive_int
from .._registry import ModuleExample, register_module
from ._grid_ops import check_grid

__all__ = ["FocalModulation"]


@register_module(
    "M3",
    paper="Focal Modulation Networks (Yang et al., NeurIPS 2022)",
    layout="(B, H, W, C)",
    example=ModuleExample(
        dict(dim=96, focal_level=2, focal_window=3),
        inputs=[(1, 56, 56, 96)],
        test_inputs=[(2, 8, 8, 16)],
        test_kwargs=dict(dim=16),
    ),
)
class FocalModulation(nn.Module):
    """Focal modulation over (B, H, W, C): each token times a gated sum of multi-scale depthwise contexts.

    ``Y = proj(q * h(sum_{l=1}^{L+1} G^l * Z^l))`` with ``q, Z^0, G = f(X)``,
    ``Z^l = GELU(DWConv_{k_l}(Z^{l-1}))`` (``k_l = focal_factor * (l - 1) + focal_window``, zero
    padded to keep H x W) and ``Z^{L+1} = GELU(mean_{H,W}(Z^L))`` (FocalNets, Sec. 3.2).

    Cost: O(N * C * sum_l k_l^2) for the depthwise convolutions plus O(N * C^2) for ``f``, ``h``
    and ``proj``, N = H * W tokens: linear in N, no attention map. The receptive field of one
    output is sum_l (k_l // 2) pixels each way, plus the global mean.

    Args:
        dim: channels C. focal_level: L, the number of depthwise levels. focal_window: the first
            level's kernel. focal_factor: kernel growth per level (each k_l must be odd).
        bias: bias of ``f`` and ``h``. use_post_norm: LayerNorm of q * h(Z^out) before ``proj``
            (official ``use_postln_in_modulation``). normalize_modulator: divide Z^out by L + 1.
        norm_eps: the post norm's epsilon (official nn.LayerNorm: 1e-5; timm's LayerNorm2d: 1e-6).

    ``f``, ``h`` and ``proj`` are linears on channels-last tokens (the official layout; timm's
    1 x 1 convolutions on NCHW hold the same weights). ``forward(x)``: (B, H, W, C) -> (B, H, W, C).

    Example::

        >>> layer = FocalModulation(96, focal_level=2, focal_window=3)
        >>> y = layer(torch.randn(2, 56, 56, 96))
    """

    def __init__(
        self,
        dim: int,
        focal_level: int = 2,
        focal_window: int = 3,
        *,
        focal_factor: int = 2,
        bias: bool = True,
        use_post_norm: bool = False,
        normalize_modulator: bool = False,
        norm_eps: float = 1e-5,
    ):
        super().__init__()
        name = type(self).__name__
        self.dim = positive_int(name, "dim", dim)
        self.focal_level = positive_int(name, "focal_level", focal_level)
        self.focal_window = positive_int(name, "focal_window", focal_window)
        if isinstance(focal_factor, bool) or not isinstance(focal_factor, int) or focal_factor < 0:
            raise ParameterError(f"{name}: focal_factor: expected a non-negative int, got {focal_factor!r}", argument="focal_factor")
        self.focal_factor = focal_factor
        self.kernel_sizes = [focal_factor * level + focal_window for level in range(focal_level)]
        if any(k % 2 == 0 for k in self.kernel_sizes):
            raise ParameterError(
                f"{name}: focal_window: expected odd kernels focal_factor * l + focal_window, got {self.kernel_sizes} "
                f"(focal_window={focal_window}, focal_factor={focal_factor})",
                argument="focal_window",
            )
        self.normalize_modulator = normalize_modulator
        self.f = nn.Linear(dim, 2 * dim + focal_level + 1, bias=bias)
        self.h = nn.Linear(dim, dim, bias=bias)
        self.proj = nn.Linear(dim, dim)
        self.focal_layers = nn.ModuleList(nn.Conv2d(dim, dim, k, padding=k // 2, groups=dim, bias=False) for k in self.kernel_sizes)
        self.norm: nn.Module = nn.LayerNorm(dim, eps=norm_eps) if use_post_norm else nn.Identity()

    def contexts(self, x: Tensor) -> tuple[Tensor, Tensor, list[Tensor]]:
        """q (B, H, W, C), the gates G (B, L + 1, H, W) and the contexts Z^1..Z^{L+1} (each (B, C, H, W) or (B, C, 1, 1))."""
        c = self.dim
        q, z, gates = self.f(x).split([c, c, self.focal_level + 1], dim=-1)
        z = z.permute(0, 3, 1, 2)  # the depthwise convolutions run on (B, C, H, W)
        levels = []
        for conv in self.focal_layers:
            z = F.gelu(conv(z))
            levels.append(z)
        levels.append(F.gelu(z.mean((2, 3), keepdim=True)))
        return q, gates.permute(0, 3, 1, 2), levels

    def forward(self, x: Tensor) -> Tensor:
        check_grid(type(self).__name__, x, self.dim)
        q, gates, levels = self.contexts(x)
        z_out = sum(level * gates[:, i : i + 1] for i, level in enumerate(levels))
        if self.normalize_modulator:
            z_out = z_out / (self.focal_level + 1)
        modulator = self.h(z_out.permute(0, 2, 3, 1))
        return self.proj(self.norm(q * modulator))

    @classmethod
    def from_timm(cls, module: Any) -> "FocalModulation":
        """A copy of ``timm.models.focalnet.FocalModulation`` (its 1 x 1 convolutions become linears;
        post norm and its epsilon carried; dropout not)."""
        if not all(hasattr(module, a) for a in ("f", "h", "proj", "focal_layers", "focal_level", "focal_window", "focal_factor")):
            raise ParameterError(f"{cls.__name__}.from_timm: module: expected timm's FocalModulation, got {type(module).__name__}", argument="module")
        post = bool(module.use_post_norm)
        layer = cls(
            module.dim, module.focal_level, module.focal_window, focal_factor=module.focal_factor,
            bias=module.f.bias is not None, use_post_norm=post, normalize_modulator=bool(module.normalize_modulator),
            norm_eps=getattr(module.norm, "eps", 1e-5),
        )
        with torch.no_grad():
            for ours, theirs in ((layer.f, module.f), (layer.h, module.h), (layer.proj, module.proj)):
                ours.weight.copy_(theirs.weight.flatten(1))
                if ours.bias is not None:
                    ours.bias.copy_(theirs.bias)
            for ours_conv, theirs_seq in zip(layer.focal_layers, module.focal_layers):
                ours_conv.weight.copy_(theirs_seq[0].weight)
            if post:  # timm's LayerNorm2d normalizes the channels, as nn.LayerNorm does on channels-last
                layer.norm.weight.copy_(module.norm.weight)
                layer.norm.bias.copy_(module.norm.bias)
        return layer.to(module.f.weight.dtype)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, focal_level={self.focal_level}, kernel_sizes={self.kernel_sizes}, normalize_modulator={self.normalize_modulator}"
