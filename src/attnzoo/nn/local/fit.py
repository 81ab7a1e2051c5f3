"""FIT: Far-reaching Interleaved Transformers (catalog L10; Chen & Li, arXiv 2305.12689).

The data tokens are cut into groups of ``group_size`` consecutive tokens; each group owns
``latents_per_group`` latent tokens. One FIT block, in the paper's arrangement (its Fig. 2, and the
order of the public ``FIT`` layer in google-research/pix2seq ``architectures/transformers.py``):

1. **local layers**: ordinary pre-LN transformer layers (self-attention + MLP) run on each group
   alone: ``x_g <- x_g + Attn(LN(x_g))``, ``x_g <- x_g + MLP(LN(x_g))``;
2. **read**: each group's latents cross-attend to their group's tokens,
   ``z_g <- z_g + CrossAttn(LN(z_g), LN(x_g))`` (no MLP, as in the public code);
3. **global layers**: transformer layers over all latents of all groups together,
   ``Z = [z_1; ...; z_G]`` (``G * latents_per_group`` tokens);
4. **write**: each group's tokens cross-attend to their group's (updated) latents,
   ``x_g <- x_g + CrossAttn(LN(x_g), LN(z_g))`` (no MLP; ``write_back=False`` skips it, as the
   public code does after the last block).

Every attention step is softmax attention (:func:`attnzoo.softmax_attention`, ``backend=``
passed through) on reshaped groups: no N x N tensor. Cost per block, with N tokens, group size
``n``, ``m`` latents per group, ``G = N / n`` groups, width ``d``:

    local  O(N * n * d)      read / write  O(N * m * d)      global  O((G * m)^2 * d)

so attention costs ``O(N n + (N m / n)^2)``: with ``m`` fixed and ``n ~ N^(1/3)`` it is
``O(N^(4/3))`` (the paper's abstract), against ``O(N^2)`` for full attention. Every token reaches
every other in one block (token -> its latents -> all latents -> its group's tokens):
"far-reaching".

The cross-attentions run at width ``min(dim, latent_dim)`` with ``min(num_heads,
latent_num_heads)`` heads, like the public code (``dim_x_att``). Not here: the autoregressive
variant (FITAR: chunk-causal latent attention and shifted latents), dropout / drop-path, the
conditioning cross-attention of the diffusion denoiser.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from ...errors import ParameterError, ShapeError
from ...functional.dense import softmax_attention
from .._checks import positive_int
from .._registry import ModuleExample, register_module

__all__ = ["FITBlock"]


def _heads(owner: str, name: str, width: int, heads: int) -> int:
    positive_int(owner, name, heads)
    if width % heads:
        raise ParameterError(f"{owner}: {name}: expected a divisor of the attention width {width}, got {heads}", argument=name)
    return heads


class _SelfAttention(nn.Module):
    """Pre-LN self-attention (its residual is added by the caller) over (batch, tokens, width)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: Tensor, backend: Optional[str]) -> Tensor:
        b, t, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, t, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        out = softmax_attention(q, k, v, backend=backend)
        return self.proj(out.transpose(1, 2).reshape(b, t, w))


class _CrossAttention(nn.Module):
    """Pre-LN cross-attention: ``x`` (batch, tx, dx) reads ``y`` (batch, ty, dy) at width ``att``."""

    def __init__(self, dx: int, dy: int, att: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm_x, self.norm_y = nn.LayerNorm(dx, eps=1e-6), nn.LayerNorm(dy, eps=1e-6)
        self.q = nn.Linear(dx, att)
        self.kv = nn.Linear(dy, 2 * att)
        self.proj = nn.Linear(att, dx)

    def forward(self, x: Tensor, y: Tensor, backend: Optional[str]) -> Tensor:
        b, tx, _ = x.shape
        ty, att = y.shape[1], self.q.out_features
        hd = att // self.heads
        q = self.q(self.norm_x(x)).reshape(b, tx, self.heads, hd).transpose(1, 2)
        k, v = self.kv(self.norm_y(y)).reshape(b, ty, 2, self.heads, hd).permute(2, 0, 3, 1, 4)
        out = softmax_attention(q, k, v, backend=backend)
        return self.proj(out.transpose(1, 2).reshape(b, tx, att))


class _Layer(nn.Module):
    """A pre-LN transformer layer: self-attention then MLP, each with its residual."""

    def __init__(self, width: int, heads: int, mlp_ratio: float):
        super().__init__()
        hidden = max(1, int(width * mlp_ratio))
        self.attn = _SelfAttention(width, heads)
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

    def forward(self, x: Tensor, backend: Optional[str]) -> Tensor:
        x = x + self.attn(x, backend)
        return x + self.mlp(self.norm(x))


@register_module(
    "L10",
    paper="FIT: Far-reaching Interleaved Transformers (Chen & Li, 2023)",
    layout="(B, N, C)",
    # forward returns (x, latents); the suite checks x, which every parameter reaches through the write step
    example=ModuleExample(
        dict(dim=512, group_size=64, latents_per_group=8, num_heads=8, num_groups=16), inputs=[(1, 1024, 512)],
        test_inputs=[(2, 16, 16)], test_kwargs=dict(dim=16, group_size=4, latents_per_group=2, num_heads=2, num_groups=4),
    ),
)
class FITBlock(nn.Module):
    """One FIT block: group-local layers, latent read, global latent layers, write back.

    Args:
        dim: width C of the data tokens. group_size: tokens per group (N must be a multiple).
        latents_per_group: latent tokens m per group. latent_dim: their width (default ``dim``).
        num_heads: heads of the local layers. latent_num_heads: heads of the global layers
            (default ``num_heads``); the read / write cross-attentions use the smaller of the two.
        local_layers, global_layers: transformer layers of each kind (the paper's "(local)global"
            layer specification, e.g. ``(2)4``).
        mlp_ratio: MLP hidden width over the layer width.
        write_back: run the write cross-attention (the public code skips it in the last block).
        num_groups: if given, the block owns learned initial latents ``(num_groups, m,
            latent_dim)`` (the paper's latent position embedding), used when ``forward`` gets
            ``latents=None``.
        backend: passed to every :func:`attnzoo.softmax_attention` call.

    ``forward(x, latents=None)``: ``x`` (B, N, C), ``latents`` (B, N / group_size, m, latent_dim);
    returns the updated ``(x, latents)``.

    Example::

        >>> block = FITBlock(dim=64, group_size=64, latents_per_group=4, num_heads=4, num_groups=64)
        >>> x, z = block(torch.randn(2, 4096, 64))
    """

    def __init__(
        self,
        dim: int,
        group_size: int,
        latents_per_group: int,
        *,
        latent_dim: Optional[int] = None,
        num_heads: int = 8,
        latent_num_heads: Optional[int] = None,
        local_layers: int = 1,
        global_layers: int = 1,
        mlp_ratio: float = 4.0,
        write_back: bool = True,
        num_groups: Optional[int] = None,
        backend: Optional[str] = None,
    ):
        super().__init__()
        name = type(self).__name__
        self.dim = positive_int(name, "dim", dim)
        self.group_size = positive_int(name, "group_size", group_size)
        self.latents_per_group = positive_int(name, "latents_per_group", latents_per_group)
        self.latent_dim = dim if latent_dim is None else positive_int(name, "latent_dim", latent_dim)
        latent_num_heads = num_heads if latent_num_heads is None else latent_num_heads
        _heads(name, "num_heads", dim, num_heads)
        _heads(name, "latent_num_heads", self.latent_dim, latent_num_heads)
        for arg, value in (("local_layers", local_layers), ("global_layers", global_layers)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ParameterError(f"{name}: {arg}: expected a non-negative int, got {value!r}", argument=arg)
        if isinstance(mlp_ratio, bool) or not isinstance(mlp_ratio, (int, float)) or not mlp_ratio > 0:
            raise ParameterError(f"{name}: mlp_ratio: expected a positive number, got {mlp_ratio!r}", argument="mlp_ratio")
        att = min(dim, self.latent_dim)
        rw_heads = _heads(name, "num_heads", att, min(num_heads, latent_num_heads))
        self.write_back, self.backend = bool(write_back), backend
        self.local = nn.ModuleList(_Layer(dim, num_heads, mlp_ratio) for _ in range(local_layers))
        self.read = _CrossAttention(self.latent_dim, dim, att, rw_heads)
        self.glob = nn.ModuleList(_Layer(self.latent_dim, latent_num_heads, mlp_ratio) for _ in range(global_layers))
        self.write = _CrossAttention(dim, self.latent_dim, att, rw_heads) if write_back else None
        self.latents = None
        if num_groups is not None:
            positive_int(name, "num_groups", num_groups)
            self.latents = nn.Parameter(torch.randn(num_groups, self.latents_per_group, self.latent_dim) * 0.02)

    def forward(self, x: Tensor, latents: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        name = type(self).__name__
        if x.dim() != 3 or x.shape[-1] != self.dim or x.shape[1] % self.group_size:
            raise ShapeError(f"{name}: x: expected (B, N, C={self.dim}) with N a multiple of group_size={self.group_size}, got shape {tuple(x.shape)}", argument="x")
        b, n, c = x.shape
        groups, m = n // self.group_size, self.latents_per_group
        if latents is None:
            if self.latents is None:
                raise ParameterError(f"{name}: latents: required unless the block was built with num_groups", argument="latents")
            latents = self.latents.unsqueeze(0).expand(b, -1, -1, -1)
        if tuple(latents.shape) != (b, groups, m, self.latent_dim):
            raise ShapeError(f"{name}: latents: expected {(b, groups, m, self.latent_dim)}, got shape {tuple(latents.shape)}", argument="latents")
        xg = x.reshape(b * groups, self.group_size, c)  # group-major: group g = tokens [g n, (g + 1) n)
        for layer in self.local:  # 1. local layers, each group alone
            xg = layer(xg, self.backend)
        zg = latents.reshape(b * groups, m, self.latent_dim)
        zg = zg + self.read(zg, xg, self.backend)  # 2. read: latents <- their group's tokens
        z = zg.reshape(b, groups * m, self.latent_dim)
        for layer in self.glob:  # 3. global layers over every latent
            z = layer(z, self.backend)
        zg = z.reshape(b * groups, m, self.latent_dim)
        if self.write is not None:  # 4. write: tokens <- their group's latents
            xg = xg + self.write(xg, zg, self.backend)
        return xg.reshape(b, n, c), z.reshape(b, groups, m, self.latent_dim)

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, group_size={self.group_size}, latents_per_group={self.latents_per_group}, latent_dim={self.latent_dim}, "
            f"local_layers={len(self.local)}, global_layers={len(self.glob)}, write_back={self.write_back}"
        )
