"""Text-conditioned channel gating (Khoshsirat & Kambhamettu, "Sentence Attention Blocks for Answer
Grounding", ICCV 2023).

The block "re-calibrates channel-wise image feature-maps by explicitly modeling inter-dependencies between the
image feature-maps and sentence embedding", starting from squeeze-and-excitation (Hu et al., CVPR 2018, Eq. 2-4)
with minor changes. Our reading, with the SE squeeze and excitation around a sentence embedding t:

    z = GAP(X) in R^C                           (squeeze, SE Eq. 2)
    s = sigmoid(W_2 ReLU(W_1 [z ; t] + b_1) + b_2) in (0, 1)^C   (excitation on the image AND sentence, SE Eq. 3)
    Y = s (.) X                                  (scale, SE Eq. 4)

No code was published (none found) and only the abstract was available here: the concatenation point and the
bottleneck width (C / reduction, as SE) are our choices, stated here; ``use_image=False`` gates from the
sentence alone (s = sigmoid(W_2 ReLU(W_1 t))), the variant the abstract's "filters out irrelevant channels
based on sentence embedding" would also fit.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ...errors import ShapeError
from .._checks import check_image, positive_int
from .._registry import ModuleExample, register_module

__all__ = ["SentenceAttentionBlock"]


@register_module(
    "C9",
    paper="Sentence Attention Blocks for Answer Grounding (Khoshsirat & Kambhamettu, ICCV 2023)",
    layout="(B, C, H, W) + text (B, T_dim)",
    example=ModuleExample(dict(channels=64, text_dim=768), inputs=[(1, 64, 56, 56), (1, 768)], test_inputs=[(2, 16, 8, 8), (2, 12)],
                          test_kwargs=dict(channels=16, text_dim=12, reduction=4)),
)
class SentenceAttentionBlock(nn.Module):
    """Sentence attention block: SE-style channel gates computed from the pooled image AND a sentence embedding.

    ``s = sigmoid(W_2 ReLU(W_1 [GAP(X) ; t]))``, ``Y = s * X``; ``forward(x, text)`` with ``text`` (B, T_dim)
    (e.g. a BERT [CLS] or mean-pooled embedding). With ``use_image=False`` the gates read ``t`` only.

    Cost: O(N C) for N = H W, plus O((C + T_dim) C / r); (C + T_dim) C / r + C^2 / r parameters.
    Layout: (B, C, H, W) and text (B, T_dim). Paper: Sentence Attention Blocks (Khoshsirat & Kambhamettu, 2023);
    the paper's exact wiring was not available (see the module docstring for our reading).

    Args:
        channels: C. text_dim: T_dim. reduction: r, the bottleneck is C // r (16, as SE). use_image: concatenate GAP(X).

    Example::

        >>> sab = SentenceAttentionBlock(256, text_dim=768)
        >>> y = sab(torch.randn(2, 256, 14, 14), torch.randn(2, 768))
    """

    def __init__(self, channels: int, text_dim: int, reduction: int = 16, *, use_image: bool = True):
        super().__init__()
        name = type(self).__name__
        self.channels = positive_int(name, "channels", channels)
        self.text_dim = positive_int(name, "text_dim", text_dim)
        positive_int(name, "reduction", reduction)
        self.use_image = use_image
        hidden = max(channels // reduction, 1)
        self.fc1 = nn.Linear(text_dim + (channels if use_image else 0), hidden)
        self.fc2 = nn.Linear(hidden, channels)

    def gate(self, x: Tensor, text: Tensor) -> Tensor:
        """s (B, C) in (0, 1)."""
        u = torch.cat([x.mean(dim=(2, 3)), text.to(x.dtype)], dim=1) if self.use_image else text.to(x.dtype)
        return torch.sigmoid(self.fc2(torch.relu(self.fc1(u))))

    def forward(self, x: Tensor, text: Tensor) -> Tensor:
        name = type(self).__name__
        check_image(name, x, self.channels)
        if text.dim() != 2 or text.shape != (x.shape[0], self.text_dim):
            raise ShapeError(f"{name}: text: expected (B={x.shape[0]}, T_dim={self.text_dim}), got shape {tuple(text.shape)}", argument="text")
        return x * self.gate(x, text)[:, :, None, None]

    def extra_repr(self) -> str:
        return f"channels={self.channels}, text_dim={self.text_dim}, use_image={self.use_image}"
