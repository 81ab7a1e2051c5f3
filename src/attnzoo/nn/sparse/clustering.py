"""Clustering attention layers (catalog S4) with their learned centres.

* :class:`RoutingAttention` -- the Routing Transformer's attention layer (Roy et al., TACL 2021,
  Sec. 4): projections, the shared centroids mu (H, C, D) updated by online k-means, the
  functional :func:`attnzoo.kmeans_routing_attention`, an output projection.

  Online k-means (Sec. 4.1): in training mode, after each forward, every centroid moves towards the
  queries and keys routed to it (nearest centroid, cosine), by an exponential moving average with
  decay lambda = 0.999:

      mu_c <- lambda mu_c + (1 - lambda) normalize(sum_{i: Q_i -> c} Q_i + sum_{j: K_j -> c} K_j)

  over the unit-normalised queries and keys of the whole batch. The paper writes the update with
  the raw sums split (1 - lambda) / 2 between queries and keys; here the sum is normalised to the
  unit sphere, as the public code (lucidrains' ``kmeans_iter`` + ``ema_inplace``) does, so a
  centroid's norm does not grow with the batch; a centroid no token chose is left as it was.
  The commitment loss ``commitment * mean ||x - mu_{c(x)}||^2`` over the normalised queries and
  keys (factor 1e-4, as the public code) pulls the projections towards their centroids; it is
  kept in :attr:`RoutingAttention.aux_loss` after each forward for the caller to add to its loss.
* :class:`TokenCentreAttention` -- CATANet's token aggregation (Liu et al., CVPR 2025, Sec. 3.2):
  M shared token centres in the input space (a buffer), refined by spherical k-means iterations
  on each training batch and kept as an EMA (decay 0.999); tokens grouped by their nearest centre;
  :func:`attnzoo.token_centres_attention` with the projected centres as the inter-group keys and
  values.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...errors import ParameterError
from ...functional.sparse.clustering import kmeans_routing_attention, route_scores, token_centres_attention
from .._checks import check_tokens, merge_heads, positive_int, split_heads
from .._registry import ModuleExample, register_module

__all__ = ["RoutingAttention", "TokenCentreAttention", "online_kmeans_update", "spherical_kmeans_step"]


@torch.no_grad()
def online_kmeans_update(centroids: Tensor, x: Tensor, decay: float) -> Tensor:
    """One online k-means step: the new (H, C, D) centroids after seeing tokens ``x`` (B, H, M, D).

    Each token (unit-normalised) goes to its nearest centroid; a centroid c with at least one token
    becomes ``decay * mu_c + (1 - decay) * normalize(sum of its tokens)``, the others stay.
    """
    h, c, d = centroids.shape
    xn = F.normalize(x.detach().double(), dim=-1).transpose(0, 1).reshape(h, -1, d)  # (H, B*M, D)
    assign = route_scores(x, centroids).transpose(0, 1).reshape(h, -1, c).argmax(-1)  # (H, B*M): nearest centroid
    sums = torch.zeros(h, c, d, dtype=torch.float64, device=x.device).scatter_add_(1, assign[..., None].expand(-1, -1, d), xn)
    counts = torch.zeros(h, c, dtype=torch.float64, device=x.device).scatter_add_(1, assign, torch.ones_like(assign, dtype=torch.float64))
    moved = decay * centroids.double() + (1 - decay) * F.normalize(sums, dim=-1)
    return torch.where(counts[..., None] > 0, moved, centroids.double()).to(centroids.dtype)


@register_module(
    "S4",
    paper="Efficient Content-Based Sparse Attention with Routing Transformers (Roy et al., TACL 2021)",
    layout="(B, N, C)",
    example=ModuleExample(
        dict(d_model=512, num_heads=8, num_clusters=32), inputs=[(1, 1024, 512)], test_inputs=[(2, 17, 32)],
        test_kwargs=dict(d_model=32, num_heads=2, num_clusters=4),
    ),
)
class RoutingAttention(nn.Module):
    """Routing Transformer attention layer: q/k/v projections, online k-means centroids, clustered attention.

    Args:
        d_model: channels C of the input (B, N, C). num_heads: heads H. num_clusters: centroids per head
            (the paper: about sqrt(N)). window: tokens per cluster (None: ceil(N / num_clusters), the
            paper's balanced clusters). head_dim: default C // H.
        causal: keys at positions <= the query's only. balanced: see :func:`attnzoo.kmeans_routing_attention`.
        decay: the EMA decay lambda of the centroids (the paper's 0.999). commitment: weight of the
            commitment loss (1e-4). backend: passed to the functional form.

    In training mode each forward moves the centroids (:func:`online_kmeans_update` over the
    projected queries and keys) and leaves the commitment loss in :attr:`aux_loss`.

    Example::

        >>> layer = RoutingAttention(256, num_heads=4, num_clusters=16)
        >>> y = layer(torch.randn(2, 1024, 256)); loss = task_loss(y) + layer.aux_loss
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        num_clusters: int,
        *,
        window: Optional[int] = None,
        head_dim: Optional[int] = None,
        causal: bool = False,
        balanced: bool = True,
        decay: float = 0.999,
        commitment: float = 1e-4,
        backend: Optional[str] = None,
    ):
        super().__init__()
        name = type(self).__name__
        self.d_model, self.num_heads = positive_int(name, "d_model", d_model), positive_int(name, "num_heads", num_heads)
        self.num_clusters = positive_int(name, "num_clusters", num_clusters)
        self.window = positive_int(name, "window", window) if window is not None else None
        if head_dim is None and d_model % num_heads:
            raise ParameterError(f"{name}: num_heads: expected a divisor of d_model={d_model} (or pass head_dim), got {num_heads}", argument="num_heads")
        self.head_dim = positive_int(name, "head_dim", head_dim) if head_dim is not None else d_model // num_heads
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 <= decay < 1.0:
            raise ParameterError(f"{name}: decay: expected a number in [0, 1), got {decay!r}", argument="decay")
        if isinstance(commitment, bool) or not isinstance(commitment, (int, float)) or not commitment >= 0.0:
            raise ParameterError(f"{name}: commitment: expected a number >= 0, got {commitment!r}", argument="commitment")
        self.causal, self.balanced, self.decay, self.commitment, self.backend = bool(causal), bool(balanced), float(decay), float(commitment), backend
        inner = num_heads * self.head_dim
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(d_model, inner), nn.Linear(d_model, inner), nn.Linear(d_model, inner)
        self.out_proj = nn.Linear(inner, d_model)
        self.register_buffer("centroids", F.normalize(torch.randn(num_heads, num_clusters, self.head_dim), dim=-1))
        self.aux_loss: Optional[Tensor] = None

    def commitment_loss(self, q: Tensor, k: Tensor) -> Tensor:
        """``commitment * mean ||x - mu_{c(x)}||^2`` over the unit-normalised queries and keys (B, H, N, D)."""
        x = F.normalize(torch.cat([q, k], dim=2), dim=-1)
        assign = route_scores(x, self.centroids).argmax(-1)  # (B, H, M)
        mu = F.normalize(self.centroids.to(x.dtype), dim=-1)
        routed = mu[torch.arange(self.num_heads, device=x.device)[None, :, None], assign]  # (B, H, M, D)
        return self.commitment * F.mse_loss(x, routed)

    def forward(self, x: Tensor, context: Optional[Tensor] = None, key_padding_mask: Optional[Tensor] = None) -> Tensor:
        """``x`` (B, N, C) -> (B, N, C); ``context`` (B, M, C) for cross-attention (default x);
        ``key_padding_mask`` (B, M) True = pad (``balanced=False`` only)."""
        name = type(self).__name__
        check_tokens(name, x, self.d_model)
        src = x if context is None else context
        if context is not None:
            check_tokens(name, context, self.d_model)
        q = split_heads(self.q_proj(x), self.num_heads)
        k, v = split_heads(self.k_proj(src), self.num_heads), split_heads(self.v_proj(src), self.num_heads)
        out = kmeans_routing_attention(
            q, k, v, centroids=self.centroids.to(q.dtype), window=self.window, balanced=self.balanced, causal=self.causal,
            key_padding_mask=key_padding_mask, backend=self.backend,
        )
        self.aux_loss = self.commitment_loss(q, k)
        if self.training:
            self.centroids.copy_(online_kmeans_update(self.centroids, torch.cat([q, k], dim=2), self.decay))
        return self.out_proj(merge_heads(out))

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, num_heads={self.num_heads}, num_clusters={self.num_clusters}, window={self.window}, "
                f"causal={self.causal}, balanced={self.balanced}, decay={self.decay}")


@torch.no_grad()
def spherical_kmeans_step(x: Tensor, centres: Tensor) -> Tensor:
    """One k-means step on the unit sphere (CATANet's ``center_iter``): tokens ``x`` (B, N, C) and
    centres (M, C) are normalised, each token joins its nearest centre (cosine, ties to the lowest
    index), a centre becomes the normalised sum of its tokens over the batch; a centre no token
    joined stays (normalised). Returns (M, C)."""
    xn, cn = F.normalize(x.double(), dim=-1), F.normalize(centres.double(), dim=-1)
    owner = torch.einsum("bnc,mc->bnm", xn, cn).argmax(-1).reshape(-1)
    sums = torch.zeros_like(cn).index_add_(0, owner, xn.reshape(-1, xn.shape[-1]))
    counts = torch.bincount(owner, minlength=cn.shape[0])
    return torch.where(counts[:, None] > 0, F.normalize(sums, dim=-1), cn).to(centres.dtype)


@register_module(
    "S4",
    paper="CATANet: Efficient Content-Aware Token Aggregation for Lightweight Image Super-Resolution (Liu et al., CVPR 2025)",
    layout="(B, N, C)",
    # bench: CATANet's width (40 channels, qk 36) on a 64 x 64 patch
    example=ModuleExample(
        dict(d_model=40, num_heads=4, num_centres=16, group_size=64, qk_dim=36), inputs=[(1, 4096, 40)], test_inputs=[(2, 17, 16)],
        test_kwargs=dict(d_model=16, num_heads=2, num_centres=4, group_size=4, qk_dim=8),
    ),
)
class TokenCentreAttention(nn.Module):
    """CATANet's content-aware token aggregation attention (the attention of its Token-Aggregation Block).

    Args:
        d_model: channels C of the input (B, N, C). num_heads: heads H. num_centres: M shared token
            centres (CATANet: 16..128). group_size: chunk of the group-sorted sequence (32..256).
        qk_dim: width of queries and keys over all heads (CATANet: 36 for C = 40); default C.
        n_iter: k-means iterations per training batch (CATANet: 5). decay: EMA decay of the centres (0.999).
        backend: passed to the functional form.

    Forward (CATANet's TAB order): the centres (the buffer; on the first call, the means of M
    contiguous chunks of the tokens) get ``n_iter`` :func:`spherical_kmeans_step` on the batch in
    training mode (none in eval); each token's group is its nearest refined centre; the refined
    centres, projected to keys and values, are the inter-group branch. In training the buffer then
    becomes ``decay * centres + (1 - decay) * refined`` (the first batch: ``refined``).

    Example::

        >>> layer = TokenCentreAttention(40, num_heads=4, num_centres=16, group_size=64, qk_dim=36)
        >>> y = layer(torch.randn(2, 4096, 40))
    """

    def __init__(
        self, d_model: int, num_heads: int, num_centres: int, group_size: int, *, qk_dim: Optional[int] = None, n_iter: int = 5,
        decay: float = 0.999, backend: Optional[str] = None,
    ):
        super().__init__()
        name = type(self).__name__
        self.d_model, self.num_heads = positive_int(name, "d_model", d_model), positive_int(name, "num_heads", num_heads)
        self.num_centres, self.group_size = positive_int(name, "num_centres", num_centres), positive_int(name, "group_size", group_size)
        self.qk_dim = positive_int(name, "qk_dim", qk_dim) if qk_dim is not None else d_model
        self.n_iter = positive_int(name, "n_iter", n_iter)
        for what, width in (("qk_dim", self.qk_dim), ("d_model", d_model)):
            if width % num_heads:
                raise ParameterError(f"{name}: num_heads: expected a divisor of {what}={width}, got {num_heads}", argument="num_heads")
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 <= decay < 1.0:
            raise ParameterError(f"{name}: decay: expected a number in [0, 1), got {decay!r}", argument="decay")
        self.decay, self.backend = float(decay), backend
        self.to_q, self.to_k = nn.Linear(d_model, self.qk_dim, bias=False), nn.Linear(d_model, self.qk_dim, bias=False)
        self.to_v = nn.Linear(d_model, d_model, bias=False)
        self.centre_k, self.centre_v = nn.Linear(d_model, self.qk_dim, bias=False), nn.Linear(d_model, d_model, bias=False)
        self.proj = nn.Linear(d_model, d_model, bias=False)
        self.register_buffer("centres", torch.zeros(num_centres, d_model))
        self.register_buffer("initted", torch.tensor(False))

    @torch.no_grad()
    def _initial_centres(self, x: Tensor) -> Tensor:
        """The buffer, or on the first call the means of M contiguous chunks of the tokens (CATANet's init)."""
        if bool(self.initted):
            return self.centres.clone()
        m = self.num_centres
        chunks = torch.tensor_split(torch.arange(x.shape[1], device=x.device), m) if x.shape[1] >= m else [torch.arange(x.shape[1], device=x.device)] * m
        return torch.stack([x[:, idx].mean((0, 1)) for idx in chunks])

    def forward(self, x: Tensor) -> Tensor:
        """``x`` (B, N, C) -> (B, N, C)."""
        check_tokens(type(self).__name__, x, self.d_model)
        refined = self._initial_centres(x.detach())
        if self.training:
            for _ in range(self.n_iter):
                refined = spherical_kmeans_step(x.detach(), refined)
        with torch.no_grad():
            groups = torch.einsum("bnc,mc->bnm", F.normalize(x.detach().double(), dim=-1), F.normalize(refined.double(), dim=-1)).argmax(-1)
        h = self.num_heads
        centre_k = self.centre_k(refined).view(self.num_centres, h, -1).transpose(0, 1)  # (H, M, d)
        centre_v = self.centre_v(refined).view(self.num_centres, h, -1).transpose(0, 1)
        q, k, v = split_heads(self.to_q(x), h), split_heads(self.to_k(x), h), split_heads(self.to_v(x), h)
        out = token_centres_attention(q, k, v, centres=centre_k, group_size=self.group_size, groups=groups, centre_values=centre_v, backend=self.backend)
        if self.training:
            with torch.no_grad():
                self.centres.copy_(refined if not bool(self.initted) else self.decay * self.centres + (1 - self.decay) * refined)
                self.initted.fill_(True)
        return self.proj(merge_heads(out))

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, num_heads={self.num_heads}, num_centres={self.num_centres}, group_size={self.group_size}, n_iter={self.n_iter}"
