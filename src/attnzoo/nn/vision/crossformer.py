"""CrossFormer's long/short distance attention and dynamic position bias (Wang et al., ICLR 2022), catalog M10.

Short distance attention (SDA) groups G x G adjacent tokens; long distance attention (LDA) groups
the tokens that lie a fixed interval I apart, so each group spans the whole image sparsely. Both
are plain multi-head self-attention inside a group, with a dynamic position bias (DPB): an MLP
that maps a relative offset (dy, dx) to one bias per head. CrossFormer blocks alternate SDA and
LDA. The arithmetic follows the official ``models/crossformer_backbone.py`` (CrossFormer++ /
detection code: fixed interval, padding to a multiple of the group size or interval with padded
keys masked out).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...errors import ParameterError
from ...functional import softmax_attention
from .._checks import heads_divide, merge_heads, positive_int, split_heads
from .._registry import ModuleExample, register_module
from ._grid_ops import check_grid, relative_position_index

__all__ = ["DynamicPositionBias", "LongShortDistanceAttention"]


class DynamicPositionBias(nn.Module):
    """CrossFormer's DPB: an MLP from a relative offset (dy, dx) to one bias per head (the paper's DPB section).

    ``B(dy, dx) = Linear_{D->heads}(ReLU(LN(Linear_{D->D}(ReLU(LN(Linear_{D->D}(ReLU(LN(Linear_{2->D}(dy, dx))))))))))``

    ``residual=True`` adds the two middle stages as residuals (the official class has the switch;
    its attention uses ``residual=False``). Cost: O(T D^2) for T offsets, independent of the input.

    Example::

        >>> dpb = DynamicPositionBias(hidden=8, num_heads=4)
        >>> dpb(torch.tensor([[0.0, 1.0], [-2.0, 3.0]])).shape
        torch.Size([2, 4])
    """

    def __init__(self, hidden: int, num_heads: int, residual: bool = False):
        super().__init__()
        positive_int(type(self).__name__, "hidden", hidden)
        positive_int(type(self).__name__, "num_heads", num_heads)
        self.residual = residual
        self.pos_proj = nn.Linear(2, hidden)
        self.pos1 = nn.Sequential(nn.LayerNorm(hidden), nn.ReLU(), nn.Linear(hidden, hidden))
        self.pos2 = nn.Sequential(nn.LayerNorm(hidden), nn.ReLU(), nn.Linear(hidden, hidden))
        self.pos3 = nn.Sequential(nn.LayerNorm(hidden), nn.ReLU(), nn.Linear(hidden, num_heads))

    def forward(self, offsets: Tensor) -> Tensor:
        """``offsets`` (..., 2) float (dy, dx) -> (..., num_heads)."""
        pos = self.pos_proj(offsets)
        if self.residual:
            pos = pos + self.pos1(pos)
            pos = pos + self.pos2(pos)
        else:
            pos = self.pos2(self.pos1(pos))
        return self.pos3(pos)

    def group_bias(self, gh: int, gw: int) -> Tensor:
        """The (heads, gh*gw, gh*gw) bias of a gh x gw group: DPB over the (2gh-1)(2gw-1) offsets, gathered."""
        device, dtype = self.pos_proj.weight.device, self.pos_proj.weight.dtype
        dy, dx = torch.meshgrid(
            torch.arange(1 - gh, gh, device=device), torch.arange(1 - gw, gw, device=device), indexing="ij"
        )
        table = self(torch.stack([dy, dx], dim=-1).reshape(-1, 2).to(dtype))  # ((2gh-1)(2gw-1), heads)
        index = relative_position_index(gh, gw, device=device)
        return table[index.reshape(-1)].reshape(gh * gw, gh * gw, -1).permute(2, 0, 1)


@register_module(
    "M10",
    paper="CrossFormer: A Versatile Vision Transformer Hinging on Cross-scale Attention (Wang et al., ICLR 2022)",
    layout="(B, H, W, C)",
    example=ModuleExample(
        dict(dim=96, num_heads=3, group_size=7, interval=8, mode="long"),
        inputs=[(1, 56, 56, 96)],
        test_inputs=[(2, 8, 8, 32)],
        test_kwargs=dict(dim=32, num_heads=2, group_size=4, interval=2, dpb_dim=4),
    ),
)
class LongShortDistanceAttention(nn.Module):
    """Long/short distance attention (LSDA) with a dynamic position bias, one mode per layer.

    With the image padded (bottom/right, zeros) to ``Hp x Wp`` (the paper's LSDA section; the
    official ``CrossFormerBlock``)::

        SDA (mode="short"): groups of G x G adjacent tokens,  token (r, c) in group (r // G, c // G)
        LDA (mode="long"):  groups of (Hp/I) x (Wp/I) tokens I apart, token (r, c) in group (r % I, c % I)
        per group:  y = softmax(q k^T / sqrt(d) + DPB(dy, dx) + M_pad) v,   then W_proj

    where (dy, dx) is the offset between two tokens *in group coordinates* (for LDA one step is I
    pixels), ``M_pad`` hides the padded keys (the official code adds -1e6; here they are masked),
    and DPB is :class:`DynamicPositionBias`. When ``min(H, W) <= group_size`` the official block
    switches to SDA over ``min(H, W)``-sized groups; this module does the same for that call only
    (the official block keeps the change in its state).

    Cost: SDA O(N G^2 C); LDA O(N (N / I^2) C); the DPB MLP O(G^2 D^2) per call.
    Layout: ``(B, H, W, C)`` in and out, any H and W (padded as above).

    Paper vs code: the paper's DPB has D/4 hidden units; the official attention builds
    ``DynamicPosBias(dim // 4)``, which divides by 4 again, so D/16. ``dpb_dim=None`` follows the
    code (``dim // 16``). CrossFormer v1 grouped LDA with ``I = H / G``; CrossFormer++ (the
    backbone code followed here) fixes I and lets the group size follow the image.

    Args:
        dim: C. num_heads: h. group_size: G (SDA). interval: I (LDA). mode: ``"short"`` or ``"long"``.
        qkv_bias: bias of the qkv projection (on, as the official default). qk_scale: overrides d^-1/2.
        dpb_dim: hidden width of the DPB MLP (default ``dim // 16``, at least 2). dpb_residual: DPB's residual form.
        backend: passed to :func:`attnzoo.softmax_attention`.

    Example::

        >>> sda = LongShortDistanceAttention(64, num_heads=2, group_size=7, mode="short")
        >>> lda = LongShortDistanceAttention(64, num_heads=2, interval=8, mode="long")
        >>> y = lda(sda(torch.randn(2, 56, 56, 64)))
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        group_size: int = 7,
        interval: int = 8,
        mode: str = "short",
        qkv_bias: bool = True,
        qk_scale: Optional[float] = None,
        dpb_dim: Optional[int] = None,
        dpb_residual: bool = False,
        backend: Optional[str] = None,
    ):
        super().__init__()
        name = type(self).__name__
        positive_int(name, "dim", dim)
        head_dim = heads_divide(name, dim, num_heads)
        positive_int(name, "group_size", group_size)
        positive_int(name, "interval", interval)
        if mode not in ("short", "long"):
            raise ParameterError(f"{name}: mode: expected 'short' (SDA) or 'long' (LDA), got {mode!r}", argument="mode")
        hidden = max(dim // 16, 2) if dpb_dim is None else positive_int(name, "dpb_dim", dpb_dim)
        self.dim, self.num_heads, self.group_size, self.interval, self.mode = dim, num_heads, group_size, interval, mode
        self.scale = qk_scale or head_dim ** -0.5
        self.backend = backend
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.pos = DynamicPositionBias(hidden, num_heads, residual=dpb_residual)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        """``x`` (B, H, W, C) -> (B, H, W, C)."""
        check_grid(type(self).__name__, x, self.dim)
        b, h, w, c = x.shape
        mode, g = self.mode, self.group_size
        if min(h, w) <= g:  # the official fallback: one SDA group spanning the short side
            mode, g = "short", min(h, w)
        step = self.interval if mode == "long" else g
        pad_b, pad_r = (-h) % step, (-w) % step
        if pad_b or pad_r:
            x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
        hp, wp = h + pad_b, w + pad_r
        if mode == "short":
            gh = gw = g
            groups = x.reshape(b, hp // g, g, wp // g, g, c).permute(0, 1, 3, 2, 4, 5)
        else:
            i = self.interval
            gh, gw = hp // i, wp // i
            groups = x.reshape(b, gh, i, gw, i, c).permute(0, 2, 4, 1, 3, 5)
        outer = groups.shape[1:3]
        groups = groups.reshape(-1, gh * gw, c)

        pad_mask = None
        if pad_b or pad_r:
            real = torch.zeros(hp, wp, dtype=torch.bool, device=x.device)
            real[:h, :w] = True
            if mode == "short":
                real = real.reshape(hp // g, g, wp // g, g).permute(0, 2, 1, 3)
            else:
                real = real.reshape(gh, self.interval, gw, self.interval).permute(1, 3, 0, 2)
            pad_mask = (~real.reshape(1, -1, gh * gw)).expand(b, -1, -1).reshape(-1, gh * gw)

        q, k, v = (split_heads(t, self.num_heads) for t in self.qkv(groups).chunk(3, dim=-1))
        bias = self.pos.group_bias(gh, gw).to(q.dtype).unsqueeze(0)
        out = softmax_attention(q, k, v, bias=bias, key_padding_mask=pad_mask, scale=self.scale, backend=self.backend)
        out = self.proj(merge_heads(out)).reshape(b, *outer, gh, gw, c)
        if mode == "short":
            out = out.permute(0, 1, 3, 2, 4, 5)
        else:
            out = out.permute(0, 3, 1, 4, 2, 5)
        out = out.reshape(b, hp, wp, c)
        return out[:, :h, :w].contiguous() if (pad_b or pad_r) else out

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, mode={self.mode!r}, group_size={self.group_size}, interval={self.interval}"
