"""HAT's channel attention block and overlapping cross-attention (Chen et al., "Activating More Pixels in
Image Super-Resolution Transformer", CVPR 2023: CAB and OCAB), catalog M1.

HAT (Hybrid Attention Transformer) adds two mixers to Swin's window attention:

* the channel attention block (CAB): conv 3x3 (C -> C/r), GELU, conv 3x3 (C/r -> C), then an
  RCAN squeeze-and-excitation gate; HAT's hybrid block adds ``0.01 * CAB(x)`` beside W-MSA;
* overlapping cross-attention (OCA): queries from non-overlapping M x M windows, keys and values
  from larger overlapping M_o x M_o windows around them (M_o = M + floor(gamma M)), with a
  relative position bias over the (M + M_o - 1)^2 offsets.

The arithmetic follows the official ``hat/archs/hat_arch.py`` (``CAB``, ``OCAB``); the layer
norms, MLP and residual of OCAB are the block's, not this mixer's.
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
from ._grid_ops import check_divisible, check_grid, from_windows, to_windows

__all__ = ["ConvChannelAttentionBlock", "OverlappingCrossAttention", "oca_relative_position_index"]


@register_module(
    "M1",
    paper="Activating More Pixels in Image Super-Resolution Transformer (Chen et al., CVPR 2023)",
    layout="(B, H, W, C)",
    example=ModuleExample(
        dict(dim=96, compress_ratio=3, squeeze_factor=30),
        inputs=[(1, 56, 56, 96)],
        test_inputs=[(2, 8, 8, 16)],
        test_kwargs=dict(dim=16, compress_ratio=2, squeeze_factor=4),
    ),
)
class ConvChannelAttentionBlock(nn.Module):
    """HAT's channel attention block (CAB): two 3x3 convs and an RCAN channel-attention gate.

    ::

        f = Conv3x3_{C/r -> C}(GELU(Conv3x3_{C -> C/r}(x)))
        a = sigmoid(Conv1x1_{C/s -> C}(ReLU(Conv1x1_{C -> C/s}(GAP(f)))))   (RCAN's CA, weights in (0, 1))
        y = f * a

    ``r = compress_ratio`` (3) and ``s = squeeze_factor`` (30) are HAT's defaults; all convs have
    biases, as in the official ``CAB``. HAT's hybrid block uses ``x + W-MSA(LN x) + 0.01 CAB(LN x)``.

    Cost: O(N C^2 18 / r) for the convs, O(C^2 / s) for the gate.
    Layout: ``(B, H, W, C)`` in and out (the official block permutes to (B, C, H, W) for the convs;
    so does this one).

    Example::

        >>> cab = ConvChannelAttentionBlock(96)
        >>> y = cab(torch.randn(2, 32, 32, 96))
    """

    def __init__(self, dim: int, compress_ratio: int = 3, squeeze_factor: int = 30):
        super().__init__()
        name = type(self).__name__
        positive_int(name, "dim", dim)
        positive_int(name, "compress_ratio", compress_ratio)
        positive_int(name, "squeeze_factor", squeeze_factor)
        for arg, value in (("compress_ratio", compress_ratio), ("squeeze_factor", squeeze_factor)):
            if dim // value < 1:
                raise ParameterError(f"{name}: {arg}: expected at most dim={dim}, got {value}", argument=arg)
        self.dim = dim
        mid, squeezed = dim // compress_ratio, dim // squeeze_factor
        self.conv1 = nn.Conv2d(dim, mid, 3, padding=1)
        self.conv2 = nn.Conv2d(mid, dim, 3, padding=1)
        self.squeeze = nn.Conv2d(dim, squeezed, 1)
        self.excite = nn.Conv2d(squeezed, dim, 1)

    def _features(self, x: Tensor) -> Tensor:
        check_grid(type(self).__name__, x, self.dim)
        return self.conv2(F.gelu(self.conv1(x.permute(0, 3, 1, 2))))

    def _gate(self, f: Tensor) -> Tensor:
        return torch.sigmoid(self.excite(F.relu(self.squeeze(f.mean(dim=(2, 3), keepdim=True)))))

    def attention_weights(self, x: Tensor) -> Tensor:
        """The channel weights ``a`` (B, C), each in (0, 1)."""
        return self._gate(self._features(x)).flatten(1)

    def forward(self, x: Tensor) -> Tensor:
        """``x`` (B, H, W, C) -> (B, H, W, C)."""
        f = self._features(x)
        return (f * self._gate(f)).permute(0, 2, 3, 1)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, compressed={self.conv1.out_channels}, squeezed={self.squeeze.out_channels}"


def oca_relative_position_index(window: int, overlap_window: int, device=None) -> Tensor:
    """HAT's (M^2, M_o^2) index into the (M + M_o - 1)^2 OCA bias table (``HAT.calculate_rpi_oca``).

    The official code takes ``e - o`` (key position in the overlapping window minus query position
    in the window, per axis), adds ``M - M_o + 1``, and flattens with stride ``M + M_o - 1``; the
    result can be negative and relies on Python's wrap-around. Taken modulo the table size, as here,
    it is a bijection from the offsets onto the table.
    """
    span = window + overlap_window - 1
    qy, qx = torch.meshgrid(torch.arange(window, device=device), torch.arange(window, device=device), indexing="ij")
    ky, kx = torch.meshgrid(
        torch.arange(overlap_window, device=device), torch.arange(overlap_window, device=device), indexing="ij"
    )
    shift = window - overlap_window + 1
    dy = ky.reshape(1, -1) - qy.reshape(-1, 1) + shift
    dx = kx.reshape(1, -1) - qx.reshape(-1, 1) + shift
    return (dy * span + dx) % (span * span)


@register_module(
    "M1",
    paper="Activating More Pixels in Image Super-Resolution Transformer (Chen et al., CVPR 2023)",
    layout="(B, H, W, C)",
    example=ModuleExample(
        dict(dim=96, num_heads=6, window_size=8, overlap_ratio=0.5),
        inputs=[(1, 56, 56, 96)],
        test_inputs=[(2, 8, 8, 16)],
        test_kwargs=dict(dim=16, num_heads=2, window_size=4),
    ),
)
class OverlappingCrossAttention(nn.Module):
    """Overlapping cross-attention (OCA): M x M query windows attend to M_o x M_o overlapping key windows.

    With ``[q, k, v] = x W_qkv``, ``M_o = M + floor(gamma M)`` and the key/value windows cut by
    ``Unfold(M_o, stride=M, padding=(M_o - M) / 2)`` over the zero-padded image (the paper's OCA;
    the official ``OCAB``)::

        per window w:  y_w = softmax(q_w k_{w,o}^T / sqrt(d) + B) v_{w,o},     then W_proj

    where ``q_w`` holds the M^2 tokens of window w, ``k_{w,o}, v_{w,o}`` the M_o^2 tokens of the
    enlarged window centred on it, and ``B`` is a learned (M + M_o - 1)^2 x h table indexed as
    :func:`oca_relative_position_index` (truncated normal, std 0.02). The official code does not
    mask the zero padding at the image border: those keys are zero vectors whose logit is the bias
    alone, and they take part in the softmax. ``mask_padding=True`` hides them instead.

    Cost: O(N M_o^2 C) for the attention (``(1 + gamma)^2`` times Swin's), O(N C^2) projections.
    Layout: ``(B, H, W, C)`` in and out; H and W multiples of ``window_size``; ``floor(gamma M)``
    must be even so the padding is the same on both sides (the official unfold assumes it).

    Args:
        dim: C. num_heads: h. window_size: M. overlap_ratio: gamma (0.5 in HAT).
        qkv_bias: bias of the qkv projection. qk_scale: overrides ``d ** -0.5``.
        mask_padding: mask the border's zero keys (default off, as the official code).
        backend: passed to :func:`attnzoo.softmax_attention`.

    Example::

        >>> oca = OverlappingCrossAttention(96, num_heads=6, window_size=16, overlap_ratio=0.5)
        >>> y = oca(torch.randn(1, 64, 64, 96))
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: int = 16,
        overlap_ratio: float = 0.5,
        qkv_bias: bool = True,
        qk_scale: Optional[float] = None,
        mask_padding: bool = False,
        backend: Optional[str] = None,
    ):
        super().__init__()
        name = type(self).__name__
        positive_int(name, "dim", dim)
        head_dim = heads_divide(name, dim, num_heads)
        positive_int(name, "window_size", window_size)
        if isinstance(overlap_ratio, bool) or not isinstance(overlap_ratio, (int, float)) or overlap_ratio < 0:
            raise ParameterError(f"{name}: overlap_ratio: expected a float >= 0, got {overlap_ratio!r}", argument="overlap_ratio")
        overlap = int(window_size * overlap_ratio)
        if overlap % 2:
            raise ParameterError(
                f"{name}: overlap_ratio: expected floor(overlap_ratio * window_size) even (symmetric padding), "
                f"got {overlap} for window_size={window_size}",
                argument="overlap_ratio",
            )
        self.dim, self.num_heads, self.window_size, self.overlap_ratio = dim, num_heads, window_size, overlap_ratio
        self.overlap_window = window_size + overlap
        self.scale = qk_scale or head_dim ** -0.5
        self.mask_padding, self.backend = mask_padding, backend
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        span = window_size + self.overlap_window - 1
        self.relative_position_bias_table = nn.Parameter(nn.init.trunc_normal_(torch.zeros(span * span, num_heads), std=0.02))
        self.register_buffer("rel_index", oca_relative_position_index(window_size, self.overlap_window), persistent=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        """``x`` (B, H, W, C) -> (B, H, W, C)."""
        name = type(self).__name__
        check_grid(name, x, self.dim)
        check_divisible(name, x, self.window_size, "window_size")
        b, h, w, c = x.shape
        m, mo = self.window_size, self.overlap_window
        pad = (mo - m) // 2
        qkv = self.qkv(x)
        q = split_heads(to_windows(qkv[..., :c], m, m), self.num_heads)  # (B nW, h, M^2, d)
        kv = F.unfold(qkv[..., c:].permute(0, 3, 1, 2), mo, padding=pad, stride=m)  # (B, 2C M_o^2, nW)
        n_win = kv.shape[-1]
        kv = kv.reshape(b, 2, c, mo * mo, n_win).permute(1, 0, 4, 3, 2).reshape(2, b * n_win, mo * mo, c)
        k, v = split_heads(kv[0], self.num_heads), split_heads(kv[1], self.num_heads)
        n = m * m
        bias = self.relative_position_bias_table[self.rel_index.reshape(-1)].reshape(n, mo * mo, -1)
        bias = bias.permute(2, 0, 1).to(q.dtype).unsqueeze(0)
        pad_mask = None
        if self.mask_padding and pad:
            ones = torch.ones(1, 1, h, w, device=x.device, dtype=x.dtype)
            real = F.unfold(ones, mo, padding=pad, stride=m)[0]  # (M_o^2, nW)
            pad_mask = (real.transpose(0, 1) == 0).repeat(b, 1)
        out = softmax_attention(q, k, v, bias=bias, key_padding_mask=pad_mask, scale=self.scale, backend=self.backend)
        return self.proj(from_windows(merge_heads(out), b, h, w, m, m))

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, window_size={self.window_size}, "
                f"overlap_window={self.overlap_window}, mask_padding={self.mask_padding}")
