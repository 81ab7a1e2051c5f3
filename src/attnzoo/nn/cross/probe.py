"""Attentive probing (catalog X3): learned queries pool a backbone's tokens by cross-attention."""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor, nn

from ...errors import ParameterError
from .._checks import check_tokens, positive_int
from .._registry import ModuleExample, register_module
from ._common import cross_mechanism, padding_param

__all__ = ["AttentiveProbe"]

_OWNER = "AttentiveProbe"


@register_module(
    "X3",
    paper="Attention, Please! Revisiting Attentive Probing for Masked Image Modeling (Psomas et al., 2025)",
    layout="(B, N, C) -> (B, num_classes)",
    # bench: a ViT-B/16's 196 patch tokens probed for 1000 classes; num_classes is kept in the test (the output shape reads only the inputs)
    example=ModuleExample(
        dict(embed_dim=768, num_queries=32, num_classes=1000), inputs=[(8, 196, 768)], test_inputs=[(2, 17, 32)],
        test_kwargs=dict(embed_dim=32, num_queries=4), output=lambda shapes: (shapes[0][0], 1000),
    ),
)
class AttentiveProbe(nn.Module):
    """Multi-query cross-attention pooling of (B, N, C) tokens: attentive probing.

    ``M = num_queries`` learned queries ``q_m`` (C channels) attend to the tokens ``x_j``, which
    are the keys as they are (no key projection), and each query pools its own slice of
    ``C' / M`` channels of the projected values (Psomas et al.'s efficient probing, EP)::

        a_mj = softmax_j(q_m . x_j / sqrt(C))                      (padded tokens excluded)
        y    = concat_m  sum_j a_mj (W_v x_j)[m * C'/M : (m + 1) * C'/M]        (B, C')

    then, with ``num_classes``, a linear classifier on ``y``. ``key_proj=True`` projects the keys
    (``W_k x_j``), the conventional attentive probe's cross-attention (as in V-JEPA's or AIM's
    probes, without their MLP). The attention is one call of a registered mechanism
    (``mechanism=``, any with the ``noncausal_cross`` pattern, its parameters as keywords): the
    queries are its heads, q (B, M, 1, C), k = x broadcast to (B, M, N, C) (a view, no copy),
    v (B, M, N, C'/M). ``key_padding_mask`` (B, N) bool, True = ignore the token, for padded
    token sets (mechanisms that declare ``key_padding_mask``).

    Cost: O(N C C') for the value projection and O(M N C) for the scores (plus O(N C^2) with
    ``key_proj``); parameters M C + C C' (+ C^2, + C' x classes): no query/key/output projections,
    the point of EP against a multi-head attention block's 4 C^2.

    Paper: Psomas et al., "Attention, Please! Revisiting Attentive Probing for Masked Image
    Modeling" (2025).

    Example::

        >>> probe = AttentiveProbe(768, num_queries=32, num_classes=1000)
        >>> logits = probe(torch.randn(8, 196, 768))        # (8, 1000)
    """

    def __init__(
        self,
        embed_dim: int,
        num_queries: int = 32,
        *,
        value_dim: Optional[int] = None,
        num_classes: Optional[int] = None,
        key_proj: bool = False,
        bias: bool = False,
        mechanism: str = "softmax",
        backend: Optional[str] = None,
        **mechanism_params: Any,
    ):
        super().__init__()
        self.embed_dim = positive_int(_OWNER, "embed_dim", embed_dim)
        self.num_queries = positive_int(_OWNER, "num_queries", num_queries)
        self.value_dim = embed_dim if value_dim is None else positive_int(_OWNER, "value_dim", value_dim)
        if self.value_dim % num_queries:
            raise ParameterError(
                f"{_OWNER}: num_queries: each query pools value_dim / num_queries channels; expected a divisor of value_dim={self.value_dim}, got {num_queries}",
                argument="num_queries",
            )
        for name, value in (("key_proj", key_proj), ("bias", bias)):
            if not isinstance(value, bool):
                raise ParameterError(f"{_OWNER}: {name}: expected a bool, got {value!r}", argument=name)
        self.mechanism = cross_mechanism(_OWNER, mechanism, mechanism_params, reserved=("key_padding_mask",))
        self.mechanism_params, self.backend = dict(mechanism_params), backend
        self.queries = nn.Parameter(torch.randn(num_queries, embed_dim) * 0.02)  # EP's initialization
        self.k_proj = nn.Linear(embed_dim, embed_dim, bias=bias) if key_proj else None
        self.v_proj = nn.Linear(embed_dim, self.value_dim, bias=bias)
        self.classifier = None if num_classes is None else nn.Linear(self.value_dim, positive_int(_OWNER, "num_classes", num_classes))

    def pool(self, x: Tensor, key_padding_mask: Optional[Tensor] = None) -> Tensor:
        """(B, N, C) tokens -> (B, C') pooled features, before the classifier."""
        check_tokens(_OWNER, x, self.embed_dim)
        b, n, c = x.shape
        m = self.num_queries
        padding = padding_param(_OWNER, self.mechanism, key_padding_mask, b, n)
        keys = x if self.k_proj is None else self.k_proj(x)
        q = self.queries.view(1, m, 1, c).expand(b, m, 1, c)
        k = keys.unsqueeze(1).expand(b, m, n, c)  # every query reads the same keys: a view
        v = self.v_proj(x).view(b, n, m, self.value_dim // m).transpose(1, 2)  # query m's slice of channels
        out = self.mechanism(q, k, v, backend=self.backend, **self.mechanism_params, **padding)
        out = out[0] if isinstance(out, tuple) else out  # backends that also return an LSE
        return out.reshape(b, self.value_dim)

    def forward(self, x: Tensor, key_padding_mask: Optional[Tensor] = None) -> Tensor:
        """(B, N, C) tokens -> (B, num_classes) logits, or (B, C') pooled features without a classifier."""
        pooled = self.pool(x, key_padding_mask)
        return pooled if self.classifier is None else self.classifier(pooled)

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_queries={self.num_queries}, value_dim={self.value_dim}, mechanism={self.mechanism.name!r}"
