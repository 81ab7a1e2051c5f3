"""Position and channel self-attention modules (Fu et al., "Dual Attention Network for Scene
Segmentation", CVPR 2019, Sec. 3.2-3.3), as used by the guided attention of Sinha & Dolz,
"Multi-scale self-guided attention for medical image segmentation" (IEEE JBHI 2020, Sec. III-B).

Position attention (PAM), N = H W pixels, B = W_q x, C = W_k x (1x1 convs to C/8), D = W_v x:

    s_ji = exp(B_i . C_j) / sum_i exp(B_i . C_j)            (DANet Eq. 1; no 1/sqrt(d) scale)
    E_j  = alpha sum_i s_ji D_i + A_j                          (Eq. 2)

Channel attention (CAM), with the A's channels as rows (C x N):

    x_ji = softmax_i(-(A_j . A_i))  =  softmax_i(max_k(A_j . A_k) - A_j . A_i)   (Eq. 3 as the official code computes it)
    E_j  = beta sum_i x_ji A_i + A_j                           (Eq. 4)

In Eq. 1 the output position j reads ``C_j`` and the weights run over i; the code puts the query conv at the
output position (``energy[i, j] = q_i . k_j``, softmax over j), the same map with B and C relabelled. We follow
the code. The paper's Eq. 3 prints ``exp(A_i . A_j)``; both the DANet and the Multi-scale self-guided attention code
(``src/models/attention.py``, ``CAM_Module``) take the softmax of ``rowmax(E) - E``, i.e. of ``-E``. We
follow the code. ``alpha`` and ``beta`` start at 0, so both modules are the identity at initialisation.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ...errors import ParameterError
from ...functional import softmax_attention
from .._checks import check_image, positive_int
from .._registry import ModuleExample, register_module

__all__ = ["PositionAttentionModule", "ChannelAttentionModule"]

_PAPER = "DANet (Fu et al., CVPR 2019); Multi-scale self-guided attention (Sinha & Dolz, IEEE JBHI 2020)"


@register_module(
    "C6",
    paper=_PAPER,
    layout="(B, C, H, W)",
    example=ModuleExample(dict(channels=64), inputs=[(1, 64, 56, 56)], test_inputs=[(2, 16, 8, 8)],
                          test_kwargs=dict(channels=16, gamma_init=0.5)),
)
class PositionAttentionModule(nn.Module):
    """Position attention module (PAM): softmax self-attention over the H W pixels, added with a zero-init gain.

    ``E = alpha * V softmax(Q^T K)^T + X`` with Q, K = 1x1 convs to C / ``reduction`` (bias, as the official
    code) and V a 1x1 conv C -> C (DANet Eq. 1-2). No 1/sqrt(d) scale (as the paper and code). The attention
    step is :func:`attnzoo.softmax_attention` with ``scale=1``, so no N x N map is held on its fused backends.

    Cost: O(N^2 C) time for N = H W (O(N) memory on the fused backends); 1x1 convs O(N C^2).
    Layout: (B, C, H, W). Paper: DANet (Fu et al., CVPR 2019), the PAM of Multi-scale self-guided attention.

    Args:
        channels: C. reduction: Q/K width C // reduction (8). gamma_init: alpha's initial value (0: identity).

    Example::

        >>> pam = PositionAttentionModule(64)
        >>> y = pam(torch.randn(2, 64, 16, 16))   # == x at init (alpha = 0)
    """

    def __init__(self, channels: int, reduction: int = 8, *, gamma_init: float = 0.0):
        super().__init__()
        name = type(self).__name__
        self.channels = positive_int(name, "channels", channels)
        positive_int(name, "reduction", reduction)
        if channels // reduction < 1:
            raise ParameterError(f"{name}: reduction: expected <= channels={channels}, got {reduction}", argument="reduction")
        inner = channels // reduction
        self.query = nn.Conv2d(channels, inner, 1)
        self.key = nn.Conv2d(channels, inner, 1)
        self.value = nn.Conv2d(channels, channels, 1)
        self.gamma = nn.Parameter(torch.full((1,), float(gamma_init)))

    def forward(self, x: Tensor) -> Tensor:
        check_image(type(self).__name__, x, self.channels)
        b, c, h, w = x.shape
        q = self.query(x).flatten(2).transpose(1, 2).unsqueeze(1)  # (B, 1, N, C/r)
        k = self.key(x).flatten(2).transpose(1, 2).unsqueeze(1)
        v = self.value(x).flatten(2).transpose(1, 2).unsqueeze(1)  # (B, 1, N, C)
        out = softmax_attention(q, k, v, scale=1.0)  # out_j = sum_i softmax_i(q_j . k_i) v_i
        out = out.squeeze(1).transpose(1, 2).reshape(b, c, h, w)
        return self.gamma * out + x


@register_module(
    "C6",
    paper=_PAPER,
    layout="(B, C, H, W)",
    example=ModuleExample(dict(channels=64), inputs=[(1, 64, 56, 56)], test_inputs=[(2, 16, 8, 8)],
                          test_kwargs=dict(channels=16, gamma_init=0.5)),
)
class ChannelAttentionModule(nn.Module):
    """Channel attention module (CAM): a C x C softmax map over channel affinities, added with a zero-init gain.

    ``E = beta * softmax(rowmax(A A^T) - A A^T) A + A`` with A the input as (C, H W) (DANet Eq. 3-4 as the
    official code computes them; ``softmax(rowmax - E) = softmax(-E)``, so channels that differ most weigh most).
    No projection: ``beta`` is the only parameter. The step is :func:`attnzoo.softmax_attention` with queries A,
    keys -A, values A over the channel axis and ``scale=1``.

    Cost: O(C^2 N) time for N = H W, O(C^2) memory. Layout: (B, C, H, W).
    Paper: DANet (Fu et al., CVPR 2019), the CAM of Multi-scale self-guided attention.

    Args:
        channels: C. gamma_init: beta's initial value (0: identity).

    Example::

        >>> cam = ChannelAttentionModule(64, gamma_init=0.1)
        >>> y = cam(torch.randn(2, 64, 16, 16))
    """

    def __init__(self, channels: int, *, gamma_init: float = 0.0):
        super().__init__()
        self.channels = positive_int(type(self).__name__, "channels", channels)
        self.gamma = nn.Parameter(torch.full((1,), float(gamma_init)))

    def forward(self, x: Tensor) -> Tensor:
        check_image(type(self).__name__, x, self.channels)
        b, c, h, w = x.shape
        a = x.reshape(b, 1, c, h * w)  # channels as the sequence, pixels as features
        out = softmax_attention(a, -a, a, scale=1.0)  # softmax_i(-(A_j . A_i)) A_i
        return self.gamma * out.reshape(b, c, h, w) + x
