"""Modules of the linear family: learnable (or redrawn) feature maps, and thin attention layers.

The functional forms (:func:`~attnzoo.functional.linear_attention`,
:func:`~attnzoo.functional.retention`) take the maps' tensors; these modules hold them:

* :class:`HedgehogFeatureMap`: Hedgehog's per-head MLP map and its distillation loss;
* :class:`RandomFeatureMap`: Performer's FAVOR+ projection with a redraw policy;
* :class:`LinearAttention`, :class:`Retention`: a qkv projection, the functional call and an
  output projection over (B, N, C) tokens (timm-style), ``backend=`` passed through.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor, nn

from ...errors import ParameterError, ShapeError
from ...functional.linear import linear_attention, retention
from ...functional.linear.feature_maps import default_num_features, hedgehog_features, orthogonal_gaussian, positive_random_features
from ...kernels.linear_scan import parallel_scores
from .._checks import positive_int
from .._registry import ModuleExample, register_module

__all__ = ["HedgehogFeatureMap", "RandomFeatureMap", "LinearAttention", "Retention"]




@register_module(
    "F1",
    paper="The Hedgehog & the Porcupine: Expressive Linear Attentions with Softmax Mimicry (Zhang et al., ICLR 2024)",
    layout="(B, H, N, D) heads -> (B, H, N, 2F)",
    example=ModuleExample(
        dict(num_heads=8, head_dim=64), inputs=[(1, 8, 1024, 64)], test_inputs=[(2, 2, 17, 8)],
        test_kwargs=dict(num_heads=2, head_dim=8),
        output=lambda shapes: (*shapes[0][:3], 2 * shapes[0][3]),  # feature_dim defaults to head_dim: 2F = 2D
    ),
)
class HedgehogFeatureMap(nn.Module):
    """Hedgehog's learned feature map (Zhang et al., 2024, Sec. 4), one single-layer MLP per head.

    ``phi(x) = softmax([x W_h + b_h, -(x W_h + b_h)])`` over its 2F features, W_h (D, F)
    initialized to the identity (the map starts as a plain exp map of x); heads (B, H, N, D) ->
    features (B, H, N, 2F), cost O(N H D F). Pass it to the
    functional form with ``linear_attention(q, k, v, **fmap.attention_params())``, and train it
    with :meth:`distillation_loss` against the softmax attention it should mimic.

    Example::

        >>> fmap = HedgehogFeatureMap(num_heads=8, head_dim=64)
        >>> loss = fmap.distillation_loss(q, k, causal=True)   # teacher: softmax(s q k^T)
        >>> out = linear_attention(q, k, v, causal=True, **fmap.attention_params())
    """

    def __init__(self, num_heads: int, head_dim: int, feature_dim: Optional[int] = None, bias: bool = True):
        super().__init__()
        self.num_heads = positive_int("HedgehogFeatureMap", "num_heads", num_heads)
        self.head_dim = positive_int("HedgehogFeatureMap", "head_dim", head_dim)
        self.feature_dim = positive_int("HedgehogFeatureMap", "feature_dim", head_dim if feature_dim is None else feature_dim)
        self.weight = nn.Parameter(torch.eye(head_dim, self.feature_dim).repeat(num_heads, 1, 1))
        self.bias = nn.Parameter(torch.zeros(num_heads, self.feature_dim)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        """(B, H, N, D) -> (B, H, N, 2F)."""
        if x.dim() != 4 or x.shape[1] != self.num_heads or x.shape[-1] != self.head_dim:
            # without it a (..., B, H, N, D) input broadcasts through the per-head matmul silently
            raise ShapeError(
                f"HedgehogFeatureMap: x: expected (B, H={self.num_heads}, N, D={self.head_dim}), got shape {tuple(x.shape)}", argument="x"
            )
        return hedgehog_features(x, self.weight, self.bias)

    def attention_params(self) -> dict[str, Any]:
        """The functional form's parameters for this map."""
        return {"feature_map": "hedgehog", "feature_weights": self.weight, "feature_bias": self.bias}

    def distillation_loss(self, q: Tensor, k: Tensor, *, causal: bool = False, scale: Optional[float] = None, eps: float = 1e-12) -> Tensor:
        """Hedgehog's attention-weight distillation: the cross-entropy of the linear weights
        under the softmax weights, ``-mean_i sum_j a_ij log(â_ij)``.

        ``a = softmax(s q k^T)`` (the teacher, not differentiated), ``â_ij = phi(s q_i) . phi(k_j) /
        sum_j'`` (this map; ``s`` multiplies q before phi as in the functional form), future keys
        masked when ``causal`` (bottom-right). Materializes Nq x Nk weights: train on short
        sequences, as the paper does.
        """
        s = q.shape[-1] ** -0.5 if scale is None else scale
        with torch.no_grad():
            logits = parallel_scores(q * s, k, causal=False)
            if causal:
                hidden = torch.ones(logits.shape[-2:], dtype=torch.bool, device=q.device).triu(k.shape[2] - q.shape[2] + 1)
                logits = logits.masked_fill(hidden, float("-inf"))
            teacher = torch.softmax(logits, dim=-1)
        scores = parallel_scores(self(q * s), self(k), causal=causal)
        student = scores / scores.sum(-1, keepdim=True).clamp(min=eps)
        return -(teacher * student.clamp(min=eps).log()).sum(-1).mean()

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, head_dim={self.head_dim}, feature_dim={self.feature_dim}, bias={self.bias is not None}"


class RandomFeatureMap(nn.Module):
    """Performer's FAVOR+ positive orthogonal random features (Choromanski et al., 2021), redrawn on a schedule.

    Holds the projection W (D, m), or (H, D, m) with ``num_heads``, as a buffer. Draw i (0 at
    construction) is seeded with ``seed + i``: runs are repeatable. With ``redraw_interval``
    set, :meth:`maybe_redraw` (called by :class:`LinearAttention` on each training forward)
    draws new features every that many training calls, Performer's ``feature_redraw_interval``.

    Example::

        >>> fmap = RandomFeatureMap(head_dim=64, num_features=256, redraw_interval=1000)
        >>> out = linear_attention(q, k, v, **fmap.attention_params())
    """

    def __init__(self, head_dim: int, num_features: Optional[int] = None, *, num_heads: Optional[int] = None, seed: int = 0, redraw_interval: Optional[int] = None):
        super().__init__()
        self.head_dim = positive_int("RandomFeatureMap", "head_dim", head_dim)
        self.num_features = positive_int("RandomFeatureMap", "num_features", default_num_features(head_dim) if num_features is None else num_features)
        self.num_heads = None if num_heads is None else positive_int("RandomFeatureMap", "num_heads", num_heads)
        self.redraw_interval = None if redraw_interval is None else positive_int("RandomFeatureMap", "redraw_interval", redraw_interval)
        self.seed, self.draws, self.calls = seed, 0, 0
        self.register_buffer("projection", self._draw().float())

    def _draw(self) -> Tensor:
        return orthogonal_gaussian(self.num_features, self.head_dim, seed=self.seed + self.draws, heads=self.num_heads)

    @torch.no_grad()
    def redraw(self) -> None:
        """Draw the next projection (seed + number of draws so far)."""
        self.draws += 1
        self.calls = 0
        self.projection.copy_(self._draw())

    def maybe_redraw(self) -> bool:
        """Count one training call; redraw when ``redraw_interval`` calls have passed. Returns whether it redrew."""
        if not self.training or self.redraw_interval is None:
            return False
        self.calls += 1
        if self.calls < self.redraw_interval:
            return False
        self.redraw()
        return True

    def forward(self, x: Tensor) -> Tensor:
        """(B, H, N, D) -> (B, H, N, m): ``exp(x W - |x|^2/2) / sqrt(m)`` (no scale applied)."""
        return positive_random_features(x, self.projection)

    def attention_params(self) -> dict[str, Any]:
        return {"feature_map": "softmax_kernel", "projection": self.projection}

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, num_features={self.num_features}, num_heads={self.num_heads}, redraw_interval={self.redraw_interval}"


class _TokenMixer(nn.Module):
    """(B, N, C) tokens -> q, k, v heads -> ``self.attend`` -> (B, N, C)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool, proj_bias: bool):
        super().__init__()
        if num_heads < 1 or dim % num_heads:
            raise ParameterError(f"{type(self).__name__}: num_heads: expected a divisor of dim={dim}, got {num_heads}", argument="num_heads")
        self.dim, self.num_heads = dim, num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)

    def heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ShapeError(f"{type(self).__name__}: x: expected (B, N, C={self.dim}), got shape {tuple(x.shape)}", argument="x")
        b, n, _ = x.shape
        qkv = self.qkv(x).view(b, n, 3, self.num_heads, self.dim // self.num_heads).permute(2, 0, 3, 1, 4)
        return qkv[0], qkv[1], qkv[2]

    def merge(self, out: Tensor) -> Tensor:
        return out.transpose(1, 2).reshape(out.shape[0], out.shape[2], self.dim)


@register_module(
    "F1",
    paper="Transformers are RNNs: Fast Autoregressive Transformers with Linear Attention (Katharopoulos et al., ICML 2020)",
    layout="(B, N, C)",
    example=ModuleExample(
        dict(dim=512, num_heads=8), inputs=[(1, 1024, 512)], test_inputs=[(2, 17, 32)], test_kwargs=dict(dim=32, num_heads=2)
    ),
)
class LinearAttention(_TokenMixer):
    """Linear attention over (B, N, C) tokens: qkv projection, :func:`linear_attention`, output projection.

    ``feature_map`` is a name, a callable, or a :class:`HedgehogFeatureMap` /
    :class:`RandomFeatureMap` (registered as a submodule; a random map is redrawn on its schedule
    in training).

    Example::

        >>> layer = LinearAttention(dim=512, num_heads=8, feature_map="elu", causal=True)
        >>> y = layer(torch.randn(2, 4096, 512))
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        feature_map: Any = "elu",
        causal: bool = False,
        normalize: bool = True,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        chunk_size: int = 64,
        backend: Optional[str] = None,
    ):
        super().__init__(dim, num_heads, qkv_bias, proj_bias)
        self.feature_map = feature_map
        self.causal, self.normalize, self.chunk_size, self.backend = causal, normalize, chunk_size, backend

    def _map_params(self) -> dict[str, Any]:
        if isinstance(self.feature_map, RandomFeatureMap):
            self.feature_map.maybe_redraw()
        if isinstance(self.feature_map, (HedgehogFeatureMap, RandomFeatureMap)):
            return self.feature_map.attention_params()
        return {"feature_map": self.feature_map}

    def forward(self, x: Tensor, key_padding_mask: Optional[Tensor] = None) -> Tensor:
        """(B, N, C) -> (B, N, C); ``key_padding_mask`` (B, N) bool, True = a padded token (ignored as a key)."""
        q, k, v = self.heads(x)
        out = linear_attention(
            q,
            k,
            v,
            causal=self.causal,
            normalize=self.normalize,
            chunk_size=self.chunk_size,
            backend=self.backend,
            key_padding_mask=key_padding_mask,
            **self._map_params(),
        )
        return self.proj(self.merge(out))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, causal={self.causal}, normalize={self.normalize}"


@register_module(
    "F2",
    paper="Retentive Network (Sun et al., 2023); ViR: Vision Retention Networks (Hatamizadeh et al., 2023)",
    layout="(B, N, C)",
    example=ModuleExample(
        dict(dim=512, num_heads=8), inputs=[(1, 1024, 512)], test_inputs=[(2, 17, 32)], test_kwargs=dict(dim=32, num_heads=2)
    ),
)
class Retention(_TokenMixer):
    """Retention over (B, N, C) tokens (RetNet, Sun et al., 2023): qkv projection, :func:`retention`,
    a per-head GroupNorm (RetNet's; it makes the output invariant to the per-row scale of the
    retention normalizations), output projection. RetNet's swish gate is left to the block.

    Example::

        >>> layer = Retention(dim=512, num_heads=8)                     # causal, RetNet's decays
        >>> y = layer(torch.randn(2, 4096, 512))
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        gamma: Any = None,
        causal: bool = True,
        normalize_decay: bool = False,
        group_norm: bool = True,
        qkv_bias: bool = False,
        proj_bias: bool = False,
        chunk_size: int = 64,
        backend: Optional[str] = None,
    ):
        super().__init__(dim, num_heads, qkv_bias, proj_bias)
        self.gamma, self.causal, self.normalize_decay = gamma, causal, normalize_decay
        self.chunk_size, self.backend = chunk_size, backend
        self.norm = nn.GroupNorm(num_heads, dim) if group_norm else None

    def forward(self, x: Tensor, key_padding_mask: Optional[Tensor] = None) -> Tensor:
        """(B, N, C) -> (B, N, C); ``key_padding_mask`` (B, N) bool, True = a padded token, ignored
        as a key by retention. The GroupNorm's statistics run over every token of the sequence
        axis (nn.GroupNorm on (B, C, N)), pads included: only ``group_norm=False`` keeps the
        real rows equal to the unpadded run."""
        q, k, v = self.heads(x)
        out = retention(
            q,
            k,
            v,
            gamma=self.gamma,
            causal=self.causal,
            normalize_decay=self.normalize_decay,
            chunk_size=self.chunk_size,
            backend=self.backend,
            key_padding_mask=key_padding_mask,
        )
        out = self.merge(out)
        if self.norm is not None:
            out = self.norm(out.transpose(1, 2)).transpose(1, 2)
        return self.proj(out)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, causal={self.causal}, gamma={self.gamma}"
