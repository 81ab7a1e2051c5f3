"""ECAPA-TDNN's attention blocks (Desplanques et al., "ECAPA-TDNN: Emphasized Channel Attention,
Propagation and Aggregation in TDNN Based Speaker Verification", Interspeech 2020, Sec. 3.1-3.2), on frame
sequences (B, C, T).

SE-Res2Block (Sec. 3.2): conv1x1 -> Res2 dilated conv (scale s) -> conv1x1 -> squeeze-excitation, plus the input:

    z = (1/T) sum_t h_t,   s = sigmoid(W_2 f(W_1 z + b_1) + b_2),   h~_c = s_c h_c          (Eq. 5-7)

Channel- and context-dependent attentive statistics pooling (Sec. 3.1):

    e_{t,c} = v_c^T f(W h_t + b) + k_c                        (Eq. 1; h_t = [x_t; mu; sigma] with global context)
    alpha_{t,c} = softmax_t(e_{t,c})                           (Eq. 2)
    mu~_c = sum_t alpha_{t,c} h_{t,c}                          (Eq. 3)
    sigma~_c = sqrt( sum_t alpha_{t,c} h_{t,c}^2 - mu~_c^2 )   (Eq. 4)

The arithmetic follows SpeechBrain's reference implementation (``speechbrain.lobes.models.ECAPA_TDNN``): a TDNN
block is ``BatchNorm(ReLU(Conv1d(x)))``; convolutions pad "same" with reflection; the std is
``sqrt(max(sum alpha (h - mu~)^2, 1e-12))`` (equal to Eq. 4); the global context's mean and std are unweighted
over the (unpadded) frames; ``lengths`` are relative, as SpeechBrain's. ``k_c`` of Eq. 1 is omitted: a
per-channel constant cancels in the softmax over t.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...errors import ParameterError, ShapeError
from .._checks import check_sequence, odd_kernel, positive_int
from .._registry import ModuleExample, register_module

__all__ = ["AttentiveStatisticsPooling", "SERes2Block"]

_PAPER = "ECAPA-TDNN (Desplanques et al., Interspeech 2020)"
_EPS = 1e-12


def _frame_mask(owner: str, x: Tensor, lengths: Optional[Tensor]) -> Tensor:
    """(B, 1, T) float mask of the real frames: t < lengths * T (SpeechBrain's relative lengths)."""
    b, _, t = x.shape
    if lengths is None:
        return x.new_ones(b, 1, t)
    if lengths.shape != (b,):
        raise ShapeError(f"{owner}: lengths: expected shape ({b},) of relative lengths in (0, 1], got {tuple(lengths.shape)}", argument="lengths")
    if not ((lengths > 0) & (lengths <= 1)).all():
        raise ParameterError(f"{owner}: lengths: expected relative lengths in (0, 1]", argument="lengths")
    frames = torch.arange(t, device=x.device, dtype=x.dtype)
    return (frames[None, :] < lengths.to(x.dtype)[:, None] * t).to(x.dtype).unsqueeze(1)


def _weighted_stats(x: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and std over t with weights w summing to 1 over t (broadcast to x): Eq. 3-4."""
    mean = (w * x).sum(dim=2)
    std = (w * (x - mean.unsqueeze(2)).pow(2)).sum(dim=2).clamp(min=_EPS).sqrt()
    return mean, std


class _TDNN(nn.Module):
    """Conv1d ("same", reflect) -> ReLU -> BatchNorm1d, SpeechBrain's TDNNBlock."""

    def __init__(self, cin: int, cout: int, kernel_size: int = 1, dilation: int = 1):
        super().__init__()
        self.pad = dilation * (kernel_size - 1) // 2
        self.conv = nn.Conv1d(cin, cout, kernel_size, dilation=dilation)
        self.norm = nn.BatchNorm1d(cout)

    def forward(self, x: Tensor) -> Tensor:
        if self.pad:
            x = F.pad(x, (self.pad, self.pad), mode="reflect")
        return self.norm(torch.relu(self.conv(x)))


@register_module(
    "C7",
    paper=_PAPER,
    layout="(B, C, T)",
    example=ModuleExample(dict(channels=1536, attention_channels=128), inputs=[(1, 1536, 200)], test_inputs=[(2, 16, 20)],
                          test_kwargs=dict(channels=16, attention_channels=8), output=lambda s: (s[0][0], 2 * s[0][1])),
)
class AttentiveStatisticsPooling(nn.Module):
    """Attentive statistics pooling: per-channel softmax weights over frames give a weighted mean and std (B, 2C).

    ``e = v^T tanh(BN(ReLU(W h_t + b)))`` per channel (Eq. 1), ``alpha = softmax_t(e)`` (Eq. 2),
    output ``[sum_t alpha h_t ; sqrt(sum_t alpha (h_t - mu~)^2)]`` (Eq. 3-4). With ``global_context`` the
    attention reads ``[h_t; mean_t h; std_t h]`` (3C channels), the utterance-level context of Sec. 3.1.
    ``forward(x, lengths=None)``: ``lengths`` (B,) relative in (0, 1], frames at t >= lengths * T are ignored.

    Cost: O(T C A) for A attention channels (the two 1x1 convs), O(T C) memory. Layout: (B, C, T) -> (B, 2C).
    Paper: ECAPA-TDNN (Desplanques et al., 2020); arithmetic of SpeechBrain's ``AttentiveStatisticsPooling``.

    Args:
        channels: C. attention_channels: A (128). global_context: append the utterance mean and std (True).

    Example::

        >>> pool = AttentiveStatisticsPooling(1536)
        >>> emb = pool(torch.randn(4, 1536, 200))   # (4, 3072)
    """

    def __init__(self, channels: int, attention_channels: int = 128, *, global_context: bool = True):
        super().__init__()
        name = type(self).__name__
        self.channels = positive_int(name, "channels", channels)
        positive_int(name, "attention_channels", attention_channels)
        self.global_context = global_context
        self.tdnn = _TDNN(3 * channels if global_context else channels, attention_channels)
        self.score = nn.Conv1d(attention_channels, channels, 1, bias=False)  # v_c; k_c cancels in the softmax

    def attention(self, x: Tensor, lengths: Optional[Tensor] = None) -> Tensor:
        """alpha (B, C, T): softmax over the real frames, per channel (Eq. 2)."""
        name = type(self).__name__
        mask = _frame_mask(name, x, lengths)
        h = x
        if self.global_context:
            mean, std = _weighted_stats(x, mask / mask.sum(dim=2, keepdim=True))
            t = x.shape[2]
            h = torch.cat([x, mean.unsqueeze(2).expand(-1, -1, t), std.unsqueeze(2).expand(-1, -1, t)], dim=1)
        e = self.score(torch.tanh(self.tdnn(h)))
        return torch.softmax(e.masked_fill(mask == 0, float("-inf")), dim=2)

    def forward(self, x: Tensor, lengths: Optional[Tensor] = None) -> Tensor:
        check_sequence(type(self).__name__, x, self.channels)
        mean, std = _weighted_stats(x, self.attention(x, lengths))
        return torch.cat([mean, std], dim=1)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, global_context={self.global_context}"


class _Res2(nn.Module):
    """Res2Net's hierarchical split: y_1 = x_1, y_2 = K_2(x_2), y_i = K_i(x_i + y_{i-1})."""

    def __init__(self, channels: int, scale: int, kernel_size: int, dilation: int):
        super().__init__()
        self.scale = scale
        width = channels // scale
        self.blocks = nn.ModuleList(_TDNN(width, width, kernel_size, dilation) for _ in range(scale - 1))

    def forward(self, x: Tensor) -> Tensor:
        parts = torch.chunk(x, self.scale, dim=1)
        out = [parts[0]]
        for i, block in enumerate(self.blocks, start=1):
            out.append(block(parts[i] if i == 1 else parts[i] + out[-1]))
        return torch.cat(out, dim=1)


@register_module(
    "C7",
    paper=_PAPER,
    layout="(B, C, T)",
    example=ModuleExample(dict(in_channels=512, kernel_size=3, dilation=2), inputs=[(1, 512, 200)], test_inputs=[(2, 16, 20)],
                          test_kwargs=dict(in_channels=16, scale=4, se_channels=8)),
)
class SERes2Block(nn.Module):
    """ECAPA-TDNN's SE-Res2Block: conv1x1 -> Res2 dilated conv -> conv1x1 -> squeeze-excitation, plus a shortcut.

    Each conv is a TDNN block ``BN(ReLU(conv))``. The Res2 stage splits the channels into ``scale`` groups,
    passes the first through and convolves the others hierarchically (each adds the previous group's output).
    The SE gate is ``sigmoid(W_2 ReLU(W_1 mean_t h + b_1) + b_2)`` (Eq. 5-7). The shortcut is the identity, or
    a 1x1 conv when ``out_channels != in_channels``. ``forward(x, lengths=None)``: the SE mean skips padded frames.

    Cost: O(T C^2) (the 1x1 convs) + O(T C^2 k / scale) (Res2); O(T C) memory. Layout: (B, C, T).
    Paper: ECAPA-TDNN (Desplanques et al., 2020), Sec. 3.2 (k = 3, dilation 2/3/4 in the paper's three blocks);
    arithmetic of SpeechBrain's ``SERes2NetBlock`` (reflect padding: T must exceed ``dilation``).

    Args:
        in_channels: C. out_channels: C' (default C). scale: Res2 groups (8; divides C'). se_channels: SE bottleneck (128).
        kernel_size: the Res2 convs' odd kernel (3). dilation: their dilation (1).

    Example::

        >>> block = SERes2Block(512, kernel_size=3, dilation=2)
        >>> y = block(torch.randn(4, 512, 200))
    """

    def __init__(self, in_channels: int, out_channels: Optional[int] = None, *, scale: int = 8, se_channels: int = 128,
                 kernel_size: int = 3, dilation: int = 1):
        super().__init__()
        name = type(self).__name__
        self.in_channels = positive_int(name, "in_channels", in_channels)
        out_channels = positive_int(name, "out_channels", out_channels) if out_channels is not None else in_channels
        positive_int(name, "scale", scale)
        positive_int(name, "se_channels", se_channels)
        positive_int(name, "dilation", dilation)
        odd_kernel(name, kernel_size, optional=False)
        if out_channels % scale:
            raise ParameterError(f"{name}: scale: expected a divisor of out_channels={out_channels}, got {scale}", argument="scale")
        self.out_channels, self.dilation = out_channels, dilation
        self.tdnn1 = _TDNN(in_channels, out_channels)
        self.res2 = _Res2(out_channels, scale, kernel_size, dilation)
        self.tdnn2 = _TDNN(out_channels, out_channels)
        self.se1 = nn.Conv1d(out_channels, se_channels, 1)
        self.se2 = nn.Conv1d(se_channels, out_channels, 1)
        self.shortcut: Optional[nn.Module] = nn.Conv1d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def se_gate(self, h: Tensor, lengths: Optional[Tensor] = None) -> Tensor:
        """s (B, C', 1) in (0, 1) (Eq. 5-6)."""
        mask = _frame_mask(type(self).__name__, h, lengths)
        z = (h * mask).sum(dim=2, keepdim=True) / mask.sum(dim=2, keepdim=True)
        return torch.sigmoid(self.se2(torch.relu(self.se1(z))))

    def forward(self, x: Tensor, lengths: Optional[Tensor] = None) -> Tensor:
        name = type(self).__name__
        check_sequence(name, x, self.in_channels)
        if x.shape[2] <= self.dilation:
            raise ShapeError(f"{name}: x: expected more than dilation={self.dilation} frames (reflect padding), got T={x.shape[2]}", argument="x")
        residual = x if self.shortcut is None else self.shortcut(x)
        h = self.tdnn2(self.res2(self.tdnn1(x)))
        return h * self.se_gate(h, lengths) + residual

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, out_channels={self.out_channels}"
