"""Kernelized attention with a learned relative-position table (Luo et al., NeurIPS 2021; catalog F9).

:class:`KernelizedRPEAttention` holds what :func:`~attnzoo.functional.kernelized_rpe_attention`
takes as tensors: a qkv and an output projection, the per-head bias table ``b`` for every offset
up to ``max_len`` (zeros at first: plain Performer attention), and a
:class:`~attnzoo.nn.RandomFeatureMap` (Performer's projection, redrawn on its schedule in
training). For N tokens it passes the 2N - 1 central entries of the table, offsets -(N - 1) ..
N - 1.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor, nn

from ...errors import ParameterError, ShapeError
from ...functional.linear.kernelized_rpe import kernelized_rpe_attention
from .._checks import positive_int
from .._registry import ModuleExample, register_module
from .attention import RandomFeatureMap, _TokenMixer

__all__ = ["KernelizedRPEAttention"]


@register_module(
    "F9",
    paper="Stable, Fast and Accurate: Kernelized Attention with Relative Positional Encoding (Luo et al., NeurIPS 2021)",
    layout="(B, N, C)",
    example=ModuleExample(
        dict(dim=512, num_heads=8, max_len=1024, num_features=128), inputs=[(1, 1024, 512)], test_inputs=[(2, 17, 32)],
        test_kwargs=dict(dim=32, num_heads=2, max_len=17, num_features=16),
    ),
)
class KernelizedRPEAttention(_TokenMixer):
    """Random-feature attention weighted by learned ``e^(b_(j-i))``, over (B, N, C) tokens.

    Args:
        dim: channels C. num_heads: heads (a divisor of C).
        max_len: the longest sequence; the table holds 2 max_len - 1 biases per head.
        feature_map: a :class:`RandomFeatureMap` (registered as a submodule), or a name of the
            functional form (``"softmax_kernel"``, ``"elu"``, ``"relu"``, ``"identity"``);
            default a RandomFeatureMap of ``num_features`` features (None: int(D ln D)) drawn from ``seed``.
        causal: keys after the query get weight 0.
        backend: passed to :func:`~attnzoo.functional.kernelized_rpe_attention` (``fft`` or ``reference``).

    Example::

        >>> layer = KernelizedRPEAttention(dim=512, num_heads=8, max_len=4096, num_features=128)
        >>> y = layer(torch.randn(2, 4096, 512))
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        max_len: int,
        feature_map: Any = None,
        num_features: Optional[int] = None,
        seed: int = 0,
        redraw_interval: Optional[int] = None,
        causal: bool = False,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        backend: Optional[str] = None,
    ):
        super().__init__(dim, num_heads, qkv_bias, proj_bias)
        self.max_len = positive_int(type(self).__name__, "max_len", max_len)
        if feature_map is None:
            feature_map = RandomFeatureMap(dim // num_heads, num_features, seed=seed, redraw_interval=redraw_interval)
        elif num_features is not None:
            raise ParameterError(
                f"{type(self).__name__}: num_features: only used when feature_map is None (a RandomFeatureMap is built)",
                argument="num_features",
            )
        self.feature_map, self.causal, self.backend = feature_map, causal, backend
        self.rpe = nn.Parameter(torch.zeros(num_heads, 2 * max_len - 1))

    def biases(self, n: int) -> Tensor:
        """(H, 2n - 1): the table's entries for the offsets -(n - 1) .. n - 1."""
        centre = self.max_len - 1
        return self.rpe[:, centre - (n - 1) : centre + n]

    def _map_params(self) -> dict[str, Any]:
        if isinstance(self.feature_map, RandomFeatureMap):
            self.feature_map.maybe_redraw()
            return self.feature_map.attention_params()
        return {"feature_map": self.feature_map}

    def forward(self, x: Tensor, key_padding_mask: Optional[Tensor] = None) -> Tensor:
        """(B, N, C) -> (B, N, C); ``key_padding_mask`` (B, N) bool, True = a padded token (ignored as a
        key; the biases are relative, so padding on either side leaves the real rows as alone)."""
        q, k, v = self.heads(x)
        n = x.shape[1]
        if n > self.max_len:
            raise ShapeError(
                f"{type(self).__name__}: x: {n} tokens, more than max_len={self.max_len} (the bias table's reach)", argument="x"
            )
        out = kernelized_rpe_attention(
            q, k, v, self.biases(n), causal=self.causal, backend=self.backend, key_padding_mask=key_padding_mask, **self._map_params()
        )
        return self.proj(self.merge(out))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, max_len={self.max_len}, causal={self.causal}"
