"""The Agent Attention module (Han et al., ECCV 2024; catalog F4 / M13).

:class:`AgentAttention` is the paper's token mixer around :func:`~attnzoo.functional.agent_attention`:

    q, k, v = x W_qkv (per head)
    A = AdaptiveAvgPool(q) to n agent tokens      (Sec. 3.3: agents pooled from the queries)
    out = agent_attention(q, k, v, A, biases) + DWC(v)    (Sec. 3.3, eq. 5: the depthwise-conv term)
    y = out W_proj

over channels-last tokens: (B, N, C) with ``spatial_dims=1`` (1D pooling and a 1D depthwise
convolution over the sequence) or (B, H, W, C) with ``spatial_dims=2`` (2D pooling to a
sqrt(n) x sqrt(n) grid and a k x k depthwise convolution, as the paper's vision models).

The agent bias (Sec. 3.3), on a fixed 2D grid (``grid_size=(h, w)``), as the official Agent-PVT
code builds it (LeapLabTHU/Agent-Attention, ``agent_pvt.py``, no spatial reduction): per head,

    agent_bias[a, (y, x)] = up(B_an)[a, y, x] + r_a[a, y] + c_a[a, x]       (agents -> keys)
    query_bias[(y, x), a] = up(B_na)[a, y, x] + r_q[y, a] + c_q[x, a]       (queries -> agents)

with B_an, B_na (H, n, 7, 7) block biases upsampled bilinearly to (h, w) (``up``) and row and
column biases r, c; all initialized N(0, 0.02) truncated, as there. The class-token biases of
Agent-DeiT and the windowed variants of Agent-Swin are not built; nor is a 1D bias (the paper
has none).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...errors import ParameterError, ShapeError
from ...functional.linear import agent_attention
from .._checks import odd_kernel, spatial_dims_1_or_2
from .._registry import ModuleExample, register_module
from .attention import _TokenMixer

__all__ = ["AgentAttention"]


@register_module(
    "F4",
    "M13",
    paper="Agent Attention: On the Integration of Softmax and Linear Attention (Han et al., ECCV 2024)",
    layout="(B, H, W, C)",
    example=ModuleExample(
        dict(dim=96, num_heads=3, agent_num=49), inputs=[(1, 56, 56, 96)], test_inputs=[(2, 8, 8, 16)],
        test_kwargs=dict(dim=16, num_heads=2, agent_num=4),
    ),
)
class AgentAttention(_TokenMixer):
    """Agent attention over channels-last tokens: qkv projection, agents pooled from Q, two
    softmax attentions through the agents, plus a depthwise convolution of V, output projection.

    Args:
        dim: channels C. num_heads: heads (a divisor of C).
        agent_num: n agent tokens (the paper: 49); with ``spatial_dims=2`` a perfect square
            (pooled to a sqrt(n) x sqrt(n) grid).
        spatial_dims: 1 for (B, N, C) tokens, 2 for (B, H, W, C) grids.
        kernel_size: of the depthwise convolution on V (odd; the paper: 3); None drops the term.
        grid_size: (h, w), with ``spatial_dims=2``: build the agent bias for inputs of that grid
            (inputs must then have it); None: no agent bias.
        backend: passed to :func:`~attnzoo.functional.agent_attention` (``sdpa`` or ``reference``).

    Example::

        >>> layer = AgentAttention(dim=384, num_heads=6, agent_num=49, spatial_dims=2)
        >>> y = layer(torch.randn(2, 14, 14, 384))
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        agent_num: int = 49,
        spatial_dims: int = 2,
        kernel_size: Optional[int] = 3,
        grid_size: Optional[tuple[int, int]] = None,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        backend: Optional[str] = None,
    ):
        super().__init__(dim, num_heads, qkv_bias, proj_bias)
        name = type(self).__name__
        spatial_dims_1_or_2(name, spatial_dims)
        if isinstance(agent_num, bool) or not isinstance(agent_num, int) or agent_num < 1:
            raise ParameterError(f"{name}: agent_num: expected a positive int, got {agent_num!r}", argument="agent_num")
        side = math.isqrt(agent_num)
        if spatial_dims == 2 and side * side != agent_num:
            raise ParameterError(
                f"{name}: agent_num: expected a perfect square with spatial_dims=2 (a sqrt(n) x sqrt(n) pooled grid), got {agent_num}",
                argument="agent_num",
            )
        odd_kernel(name, kernel_size)
        if grid_size is not None:
            grid_ok = (
                isinstance(grid_size, tuple)
                and len(grid_size) == 2
                and all(isinstance(g, int) and not isinstance(g, bool) and g >= 1 for g in grid_size)
            )
            if spatial_dims != 2 or not grid_ok:
                raise ParameterError(
                    f"{name}: grid_size: expected None or a pair of positive ints (h, w) with spatial_dims=2, got {grid_size!r}",
                    argument="grid_size",
                )
        self.agent_num, self.spatial_dims, self.kernel_size, self.backend = agent_num, spatial_dims, kernel_size, backend
        self.grid_size = grid_size
        if grid_size is not None:
            h, w, heads = grid_size[0], grid_size[1], num_heads
            self.an_bias = nn.Parameter(nn.init.trunc_normal_(torch.empty(heads, agent_num, 7, 7), std=0.02))
            self.na_bias = nn.Parameter(nn.init.trunc_normal_(torch.empty(heads, agent_num, 7, 7), std=0.02))
            self.ah_bias = nn.Parameter(nn.init.trunc_normal_(torch.empty(heads, agent_num, h, 1), std=0.02))
            self.aw_bias = nn.Parameter(nn.init.trunc_normal_(torch.empty(heads, agent_num, 1, w), std=0.02))
            self.ha_bias = nn.Parameter(nn.init.trunc_normal_(torch.empty(heads, h, 1, agent_num), std=0.02))
            self.wa_bias = nn.Parameter(nn.init.trunc_normal_(torch.empty(heads, 1, w, agent_num), std=0.02))
        self.pool_size = agent_num if spatial_dims == 1 else (side, side)
        conv = nn.Conv1d if spatial_dims == 1 else nn.Conv2d
        self.dwc = None if kernel_size is None else conv(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)

    def agents(self, q: Tensor, spatial: tuple[int, ...]) -> Tensor:
        """(B, H, N, D) queries -> (B, H, n, D) agents: adaptive average pooling over the token grid."""
        b, h, _, d = q.shape
        grid = q.reshape(b * h, *spatial, d).movedim(-1, 1)  # (B H, D, *spatial)
        pool = F.adaptive_avg_pool1d if self.spatial_dims == 1 else F.adaptive_avg_pool2d
        return pool(grid, self.pool_size).flatten(2).transpose(1, 2).reshape(b, h, self.agent_num, d)

    def agent_biases(self) -> tuple[Optional[Tensor], Optional[Tensor]]:
        """``(agent_bias (1, H, n, h w), query_bias (1, H, h w, n))`` from the parameters, or (None, None)."""
        if self.grid_size is None:
            return None, None
        heads, n, size = self.num_heads, self.agent_num, self.grid_size
        up = lambda b: F.interpolate(b, size=size, mode="bilinear").reshape(heads, n, -1)  # noqa: E731
        agent_bias = up(self.an_bias) + (self.ah_bias + self.aw_bias).reshape(heads, n, -1)
        query_bias = up(self.na_bias).transpose(1, 2) + (self.ha_bias + self.wa_bias).reshape(heads, -1, n)
        return agent_bias.unsqueeze(0), query_bias.unsqueeze(0)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 2 + self.spatial_dims or x.shape[-1] != self.dim:
            layout = "(B, N, C)" if self.spatial_dims == 1 else "(B, H, W, C)"
            raise ShapeError(f"{type(self).__name__}: x: expected {layout} with C={self.dim}, got shape {tuple(x.shape)}", argument="x")
        spatial = tuple(x.shape[1:-1])
        if self.grid_size is not None and spatial != self.grid_size:
            raise ShapeError(f"{type(self).__name__}: x: the agent bias is laid on a {self.grid_size} grid, got {spatial}", argument="x")
        q, k, v = self.heads(x.reshape(x.shape[0], -1, self.dim))
        agent_bias, query_bias = self.agent_biases()
        out = self.merge(
            agent_attention(q, k, v, self.agents(q, spatial), agent_bias=agent_bias, query_bias=query_bias, backend=self.backend)
        )
        if self.dwc is not None:  # the depthwise convolution of V over the token grid (channels first)
            values = self.merge(v).reshape(*x.shape).movedim(-1, 1)
            out = out + self.dwc(values).movedim(1, -1).reshape(out.shape)
        return self.proj(out).reshape(x.shape)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, agent_num={self.agent_num}, spatial_dims={self.spatial_dims}, kernel_size={self.kernel_size}, grid_size={self.grid_size}"
