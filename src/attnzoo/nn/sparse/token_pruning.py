"""Token keep/fuse by attention (catalog S9): EViT, Liang et al., "Not All Patches are What You Need:
Expediting Vision Transformers via Token Reorganizations" (ICLR 2022), Sec. 3.

After a block's attention, each image token's *attentiveness* is the [CLS] query's attention to it,
averaged over heads. The ``ceil(keep_rate * (N - 1))`` most attentive tokens are kept (in order of
attentiveness, the paper's ``topk(sorted=True)``; ties to the lowest index here); the rest are fused
into one token, their sum weighted by their attentiveness (EViT's code does not renormalize the
weights). The output is ``[CLS, kept..., fused]``: later blocks run on ~keep_rate of the tokens.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ...errors import ParameterError, ShapeError
from .._registry import ModuleExample, register_module

__all__ = ["TokenKeepFuse"]


@register_module(
    "S9",
    paper="Not All Patches are What You Need: Expediting Vision Transformers via Token Reorganizations (EViT; Liang et al., ICLR 2022)",
    layout="(B, N, C) with [CLS] first, attention (B, H, N, N) -> (B, 1 + K + 1, C)",
    # bench: DeiT-S tokens and its 6-head attention, keep rate 0.7 (EViT's); output: [CLS], ceil(0.7 (N - 1)) kept, the fused token
    example=ModuleExample(
        dict(keep_rate=0.7), inputs=[(1, 197, 384), (1, 6, 197, 197)], test_inputs=[(2, 17, 16), (2, 2, 17, 17)],
        output=lambda shapes: (shapes[0][0], 1 + math.ceil(0.7 * (shapes[0][1] - 1)) + 1, shapes[0][2]),
    ),
)
class TokenKeepFuse(nn.Module):
    """Keep the most attentive tokens, fuse the rest (EViT). No parameters.

    Args:
        keep_rate: share of the image tokens kept, in (0, 1]. fuse: append the fused token
            (EViT's default) or drop the inattentive tokens.

    ``forward(x, attention)``: ``x`` (B, N, C) with the [CLS] token first; ``attention`` either the
    block's probabilities (B, H, N, N) or the [CLS] row already averaged over heads (B, N - 1).
    Returns ``(tokens, kept)``: (B, 1 + K (+ 1), C) and the kept tokens' indices among the image
    tokens (B, K).

    Example::

        >>> prune = TokenKeepFuse(keep_rate=0.7)
        >>> x, kept = prune(torch.randn(2, 197, 384), torch.softmax(torch.randn(2, 6, 197, 197), -1))
        >>> x.shape  # 1 + ceil(0.7 * 196) + 1
        torch.Size([2, 140, 384])
    """

    def __init__(self, keep_rate: float, fuse: bool = True):
        super().__init__()
        if isinstance(keep_rate, bool) or not isinstance(keep_rate, (int, float)) or not 0.0 < float(keep_rate) <= 1.0:
            raise ParameterError(f"TokenKeepFuse: keep_rate: expected a number in (0, 1], got {keep_rate!r}", argument="keep_rate")
        self.keep_rate, self.fuse = float(keep_rate), fuse

    def forward(self, x: Tensor, attention: Tensor) -> tuple[Tensor, Tensor]:
        if x.dim() != 3 or x.shape[1] < 2:
            raise ShapeError(f"TokenKeepFuse: x: expected (B, N, C) with [CLS] first and N >= 2, got shape {tuple(x.shape)}", argument="x")
        b, n, c = x.shape
        cls_attn = self._attentiveness(attention, b, n)
        keep = math.ceil(self.keep_rate * (n - 1))
        order = torch.sort(cls_attn, dim=1, descending=True, stable=True).indices  # ties: lowest index first
        kept, rest = order[:, :keep], order[:, keep:]
        image = x[:, 1:]
        parts = [x[:, :1], image.gather(1, kept[..., None].expand(-1, -1, c))]
        if self.fuse and rest.shape[1]:
            weights = cls_attn.gather(1, rest)  # EViT: the inattentive tokens' own attentiveness, not renormalized
            parts.append((image.gather(1, rest[..., None].expand(-1, -1, c)) * weights[..., None].to(x.dtype)).sum(1, keepdim=True))
        return torch.cat(parts, dim=1), kept

    @staticmethod
    def _attentiveness(attention: Tensor, b: int, n: int) -> Tensor:
        if attention.dim() == 4 and attention.shape[0] == b and attention.shape[2:] == (n, n):
            return attention[:, :, 0, 1:].mean(1)
        if attention.dim() == 2 and tuple(attention.shape) == (b, n - 1):
            return attention
        raise ShapeError(f"TokenKeepFuse: attention: expected (B, H, {n}, {n}) probabilities or ({b}, {n - 1}), got {tuple(attention.shape)}", argument="attention")

    def extra_repr(self) -> str:
        return f"keep_rate={self.keep_rate}, fuse={self.fuse}"
