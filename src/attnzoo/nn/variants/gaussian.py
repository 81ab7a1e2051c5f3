"""Gaussian adaptive attention (catalog V5): GAAM, attention weights from a Gaussian density of the features.

Ioannides et al., "Gaussian Adaptive Attention is All You Need: Robust Contextual Representations
Across Multiple Modalities" (2024, Sec. 3). Each head takes a slice of the features and, along the
normalization axis, computes the data's mean ``mu`` and variance ``sigma^2``; a mixture of ``G``
Gaussians with learned mean offsets ``delta_g`` and learned scales ``c_g`` gives each entry a
weight, the weights are normalized along the axis, and the entry is scaled by its weight::

    z_g = (x - (mu + delta_g)) / sqrt(sigma^2 + eps)
    m   = sum_g softmax(w)_g exp(-z_g^2 / (2 c_g^2))          (combine="mixture": the official MHGAAM.py)
    m   = prod_g exp(-z_g^2 / (2 c_g^2))                       (combine="product": the PyPI 0.1.5 package)
    y   = x * m / max(sum_axis m, eps)

The two official versions differ (see /work/shared/research): the GitHub ``MHGAAM.py`` mixes the
Gaussians with softmax weights and ``c = 2`` at init (our default); the PyPI release multiplies
them (``combine="product"``; we initialize ``c = initial_c`` there too, where the package draws
``c`` at random). ``sigma^2`` is the unbiased variance (``torch.var``), as in both.

Why a module and not a registered mechanism: GAAM has no query-key pairing; its "attention" is a
density of each feature's own normalized value, reweighting a single tensor. Its learnable state
(offsets, scales, mixture weights per head) and its input (a tensor, not q, k, v) make it a
layer, like a normalization; it is placed where a model would put attention or after it.

Heads split the channels into ``num_heads`` slices with their own parameters (the official code
splits the normalization axis itself; splitting channels keeps the layer independent of the
sequence length, and is the same as the official code when ``norm_axis="channels"``).
``norm_axis="channels"`` normalizes each token's slice over its features; ``"tokens"`` normalizes
each feature over the sequence. Cost O(B N C G) time, O(B N C) memory; no N x N. Layout (B, N, C).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from ...errors import ParameterError
from .._checks import check_tokens, heads_divide, positive_int
from .._registry import ModuleExample, register_module

__all__ = ["GaussianAdaptiveAttention"]


@register_module(
    "V5",
    paper="Gaussian Adaptive Attention is All You Need (Ioannides et al., 2024)",
    layout="(B, N, C)",
    example=ModuleExample(dict(dim=512, num_heads=8, num_gaussians=4), inputs=[(1, 1024, 512)], test_inputs=[(2, 17, 32)],
                          test_kwargs=dict(dim=32, num_heads=4, num_gaussians=3)),
)
class GaussianAdaptiveAttention(nn.Module):
    """Multi-head Gaussian adaptive attention (GAAM) over tokens (B, N, C): features scaled by a normalized Gaussian-mixture density.

    Args:
        dim: channels C. num_heads: H (divides C). num_gaussians: G per head.
        norm_axis: ``"channels"`` (each token's head slice) or ``"tokens"`` (each feature over the sequence).
        combine: ``"mixture"`` (softmax-weighted sum; official GitHub) or ``"product"`` (PyPI 0.1.5).
        initial_c: the Gaussians' scale c at init (2, the official default). eps: added to the variance and the floor of the normalizer.

    Formula, cost, paper and the choice of a module over a mechanism: the module docstring.
    ``weights(x)`` returns the normalized density ``m / sum m`` (B, N, C).

    Example::

        >>> layer = GaussianAdaptiveAttention(64, num_heads=4, num_gaussians=3)
        >>> y = layer(torch.randn(2, 50, 64))
    """

    def __init__(self, dim: int, num_heads: int = 1, num_gaussians: int = 4, *, norm_axis: str = "channels", combine: str = "mixture",
                 initial_c: float = 2.0, eps: float = 1e-8):
        super().__init__()
        name = type(self).__name__
        self.dim = positive_int(name, "dim", dim)
        heads_divide(name, dim, num_heads)
        self.num_heads = num_heads
        self.num_gaussians = positive_int(name, "num_gaussians", num_gaussians)
        if norm_axis not in ("channels", "tokens"):
            raise ParameterError(f"{name}: norm_axis: expected 'channels' or 'tokens', got {norm_axis!r}", argument="norm_axis")
        if combine not in ("mixture", "product"):
            raise ParameterError(f"{name}: combine: expected 'mixture' or 'product', got {combine!r}", argument="combine")
        for arg, value in (("initial_c", initial_c), ("eps", eps)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ParameterError(f"{name}: {arg}: expected a positive number, got {value!r}", argument=arg)
        if norm_axis == "channels" and dim // num_heads < 2:
            raise ParameterError(f"{name}: num_heads: a variance over each head's channels needs at least 2 of them, got dim / num_heads = {dim // num_heads}",
                                 argument="num_heads")
        self.norm_axis, self.combine, self.eps = norm_axis, combine, float(eps)
        self.mean_offsets = nn.Parameter(torch.zeros(num_heads, num_gaussians))
        self.c = nn.Parameter(torch.full((num_heads, num_gaussians), float(initial_c)))
        self.mixture_logits: Optional[nn.Parameter] = nn.Parameter(torch.ones(num_heads, num_gaussians)) if combine == "mixture" else None

    def weights(self, x: Tensor) -> Tensor:
        """The normalized density m / sum_axis m, (B, N, C)."""
        check_tokens(type(self).__name__, x, self.dim)
        b, n, c = x.shape
        h, g = self.num_heads, self.num_gaussians
        xh = x.view(b, n, h, c // h)
        axis = 3 if self.norm_axis == "channels" else 1
        if xh.shape[axis] < 2:
            raise ParameterError(f"{type(self).__name__}: x: norm_axis='tokens' needs at least 2 tokens for a variance, got shape {tuple(x.shape)}",
                                 argument="x")
        mean = xh.mean(dim=axis, keepdim=True)
        var = xh.var(dim=axis, keepdim=True) + self.eps
        # (B, N, H, d, G): one z per Gaussian
        z = (xh.unsqueeze(-1) - (mean.unsqueeze(-1) + self.mean_offsets.view(1, 1, h, 1, g))) / torch.sqrt(var).unsqueeze(-1)
        log_density = -(z**2) / (2.0 * self.c.view(1, 1, h, 1, g) ** 2)
        if self.mixture_logits is not None:
            m = (torch.softmax(self.mixture_logits, dim=-1).view(1, 1, h, 1, g) * torch.exp(log_density)).sum(-1)
        else:
            m = torch.exp(log_density.sum(-1))
        m = m / m.sum(dim=axis, keepdim=True).clamp(min=self.eps)
        return m.reshape(b, n, c)

    def forward(self, x: Tensor) -> Tensor:
        return x * self.weights(x)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, num_gaussians={self.num_gaussians}, norm_axis={self.norm_axis!r}, combine={self.combine!r}"
