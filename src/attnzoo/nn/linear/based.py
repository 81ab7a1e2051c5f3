"""The Based layer mix (Arora et al., 2024): Taylor linear attention, sliding-window attention, gated short convolutions.

Based is not one layer but three kinds of sequence mixer, each a whole layer of the model
(pre-norm residual block, then an MLP), interleaved by layer index:

* :class:`TaylorLinearAttention`: global linear attention with the Taylor map
  (:func:`attnzoo.functional.based_attention`); q and k projected to ``feature_dim`` per head;
* :class:`SlidingWindowAttention`: exact softmax attention over the last ``window`` tokens
  (the registered ``sliding_window`` mechanism);
* :class:`BaseConv`: a gated short convolution (Zoology's BaseConv: a linear projection gated
  elementwise by a causal depthwise convolution of kernel 3), built on :class:`ShortConvolution`.

Which layer gets which mixer is a list in the official configs: Based's language models
(HazyResearch/based, ``GPT2MixerConfig``) put linear attention at layers ``alt_mixer_layers``,
sliding windows at ``alt_mixer_2_layers`` and BaseConv everywhere else; the paper's MQAR
experiments (HazyResearch/zoology, ``Hybrid``) give layer i the mixer ``configs[i % len(configs)]``
with configs ``[BaseConv, Based]`` (2 layers) or ``[BaseConv, Based, SlidingAttn]`` (3 layers).
:class:`BasedMixer` is that rule: ``BasedMixer(d_model, kind)`` builds one mixer, and
``BasedMixer.for_layer(d_model, layer_idx, kinds=("conv", "linear"))`` the one of a layer; the
recall benchmark's 2-layer model is ``[BasedMixer.for_layer(d, i) for i in range(2)]``.
The mixers are not summed inside one layer: that is not what Based does.

Every mixer maps (B, N, d_model) -> (B, N, d_model), causal by default, and reports
``state_size()``, the numbers it keeps per sequence when decoding (the x axis of the
paper's recall/state-size plots). Rotary embeddings of the LM's sliding-window layer are
left out, as in the MQAR configs (``max_position_embeddings=0``, no positions).
"""

from __future__ import annotations

from typing import Any, Optional

from torch import Tensor, nn

from ...errors import ParameterError
from ...functional import sliding_window_attention
from ...functional.linear.based import BASED, DEFAULT_FEATURE_DIM, based_attention
from .._checks import check_tokens, merge_heads, positive_int, split_heads
from .._registry import ModuleExample, register_module
from ..mha import ShortConvolution

__all__ = ["BaseConv", "TaylorLinearAttention", "SlidingWindowAttention", "BasedMixer", "MIXER_KINDS"]

#: the kinds of :class:`BasedMixer`, in the order of Zoology's 3-layer Based config.
MIXER_KINDS = ("conv", "linear", "window")




def _heads(owner: str, d_model: int, num_heads: Any) -> int:
    num_heads = positive_int(owner, "num_heads", num_heads)
    if d_model % num_heads:
        raise ParameterError(f"{owner}: num_heads: expected a divisor of d_model={d_model}, got {num_heads}", argument="num_heads")
    return num_heads








# --------------------------------------------------------------------------------------------
# short convolutions
# --------------------------------------------------------------------------------------------

@register_module(
    "F5",
    paper="Zoology: Measuring and Improving Recall in Efficient Language Models (Arora et al., ICLR 2024); Based (Arora et al., ICML 2024)",
    layout="(B, N, C)",
    example=ModuleExample(dict(d_model=512), inputs=[(1, 1024, 512)], test_inputs=[(2, 17, 32)], test_kwargs=dict(d_model=32)),
)
class BaseConv(nn.Module):
    """Zoology's gated short convolution, the conv layers of Based's MQAR models:
    ``y = ShortConvolution(u) * (u W + b)  (+ u)``.

    Arora et al. (2024) and Zoology (Arora et al., 2023) call it BaseConv; ``residual=True``
    (default) adds the input as their ``BaseConv.forward`` does (inside the mixer, besides the
    block's own residual). Based's language models use a wider variant (in/out projections
    and a SiLU); this is the one of the recall experiments. Tokens (B, N, C) -> (B, N, C);
    cost O(N C (C + K)).

    Example::

        >>> conv = BaseConv(64)
        >>> y = conv(torch.randn(2, 128, 64))           # (2, 128, 64)
    """

    def __init__(self, d_model: int, kernel_size: int = 3, *, residual: bool = True):
        super().__init__()
        self.d_model = positive_int("BaseConv", "d_model", d_model)
        self.residual = residual
        self.conv = ShortConvolution(d_model, kernel_size)
        self.projection = nn.Linear(d_model, d_model)

    def forward(self, x: Tensor) -> Tensor:
        check_tokens("BaseConv", x, self.d_model)
        y = self.conv(x) * self.projection(x)
        return y + x if self.residual else y

    def state_size(self) -> int:
        return self.conv.state_size()

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, kernel_size={self.conv.kernel_size}, residual={self.residual}"


# --------------------------------------------------------------------------------------------
# attention layers
# --------------------------------------------------------------------------------------------
@register_module(
    "F5",
    paper="Simple linear attention language models balance the recall-throughput tradeoff (Based; Arora et al., ICML 2024)",
    layout="(B, N, C)",
    example=ModuleExample(
        dict(d_model=512, num_heads=8, feature_dim=16), inputs=[(1, 1024, 512)], test_inputs=[(2, 17, 32)],
        test_kwargs=dict(d_model=32, num_heads=2, feature_dim=4),
    ),
)
class TaylorLinearAttention(nn.Module):
    """Based's linear-attention layer: q, k projected to ``feature_dim`` per head, v to ``head_dim``,
    :func:`~attnzoo.functional.based_attention` (normalized, causal by default), output projection.

    As the official layer (HazyResearch/based ``LinearAttention``, zoology ``Based``): no biases,
    ``head_dim = d_model // num_heads``, eps 1e-12, scale ``feature_dim^-0.5`` (their TaylorExp
    map's exp(q.k / sqrt d)). ``num_heads=1`` is the MQAR configs' value (the LMs use 16).
    Tokens (B, N, C) -> (B, N, C); cost O(N H feature_dim^2 head_dim) (the Taylor state).

    Example::

        >>> layer = TaylorLinearAttention(512, num_heads=8, feature_dim=16)
        >>> y = layer(torch.randn(2, 1024, 512))        # causal, (2, 1024, 512)
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int = 1,
        *,
        feature_dim: int = DEFAULT_FEATURE_DIM,
        head_dim: Optional[int] = None,
        causal: bool = True,
        eps: float = 1e-12,
        chunk_size: int = 64,
        backend: Optional[str] = None,
    ):
        super().__init__()
        name = "TaylorLinearAttention"
        self.d_model = positive_int(name, "d_model", d_model)
        self.num_heads = _heads(name, d_model, num_heads) if head_dim is None else positive_int(name, "num_heads", num_heads)
        self.feature_dim = positive_int(name, "feature_dim", feature_dim)
        self.head_dim = d_model // self.num_heads if head_dim is None else positive_int(name, "head_dim", head_dim)
        self.causal, self.eps, self.chunk_size, self.backend = causal, eps, chunk_size, backend
        self.proj_q = nn.Linear(d_model, self.num_heads * self.feature_dim, bias=False)
        self.proj_k = nn.Linear(d_model, self.num_heads * self.feature_dim, bias=False)
        self.proj_v = nn.Linear(d_model, self.num_heads * self.head_dim, bias=False)
        self.out_proj = nn.Linear(self.num_heads * self.head_dim, d_model, bias=False)

    def project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q, k (B, H, N, feature_dim) and v (B, H, N, head_dim): what the functional form takes."""
        check_tokens("TaylorLinearAttention", x, self.d_model)
        return tuple(split_heads(proj(x), self.num_heads) for proj in (self.proj_q, self.proj_k, self.proj_v))  # type: ignore[return-value]

    def attention_params(self) -> dict[str, Any]:
        return {"feature_dim": self.feature_dim, "causal": self.causal, "eps": self.eps, "chunk_size": self.chunk_size, "backend": self.backend}

    def forward(self, x: Tensor, key_padding_mask: Optional[Tensor] = None) -> Tensor:
        """(B, N, d_model) -> (B, N, d_model); ``key_padding_mask`` (B, N) bool, True = a padded token (ignored as a key)."""
        q, k, v = self.project(x)
        return self.out_proj(merge_heads(based_attention(q, k, v, key_padding_mask=key_padding_mask, **self.attention_params())))

    def state_size(self) -> int:
        """H x (1 + d + d(d+1)/2) x (head_dim + 1): the Taylor state and its normalizer."""
        return self.num_heads * BASED.state_size(self.feature_dim, self.head_dim, feature_dim=self.feature_dim)

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, num_heads={self.num_heads}, feature_dim={self.feature_dim}, head_dim={self.head_dim}, causal={self.causal}"


@register_module(
    "L2",
    "F5",
    paper="Simple linear attention language models balance the recall-throughput tradeoff (Based; Arora et al., ICML 2024)",
    layout="(B, N, C)",
    example=ModuleExample(
        dict(d_model=512, num_heads=8, window=64), inputs=[(1, 1024, 512)], test_inputs=[(2, 17, 32)],
        test_kwargs=dict(d_model=32, num_heads=2, window=4),
    ),
)
class SlidingWindowAttention(nn.Module):
    """Exact softmax attention over a sliding window: query t sees keys t - window .. t.

    qkv projection, the registered ``sliding_window`` mechanism
    (:func:`~attnzoo.functional.sliding_window_attention`, ``window=(window, 0)``, causal),
    output projection. ``window=64`` is the paper's (Sec. 4; the official layer passes
    FlashAttention ``window_size // 2`` keys back, 64 for its default 128). ``causal=False``
    gives the two-sided window (window keys each side). Tokens (B, N, C) -> (B, N, C); cost
    O(N window C).

    Example::

        >>> layer = SlidingWindowAttention(512, num_heads=8, window=64)
        >>> y = layer(torch.randn(2, 1024, 512))        # (2, 1024, 512)
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int = 1,
        *,
        window: int = 64,
        causal: bool = True,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        backend: Optional[str] = None,
    ):
        super().__init__()
        name = "SlidingWindowAttention"
        self.d_model = positive_int(name, "d_model", d_model)
        self.num_heads = _heads(name, d_model, num_heads)
        self.window = positive_int(name, "window", window)
        self.causal, self.backend = causal, backend
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=qkv_bias)
        self.out_proj = nn.Linear(d_model, d_model, bias=proj_bias)

    def forward(self, x: Tensor) -> Tensor:
        check_tokens("SlidingWindowAttention", x, self.d_model)
        q, k, v = (split_heads(t, self.num_heads) for t in self.qkv(x).chunk(3, dim=-1))
        window = (self.window, 0) if self.causal else self.window
        out = sliding_window_attention(q, k, v, window=window, causal=self.causal, backend=self.backend)
        return self.out_proj(merge_heads(out))

    def state_size(self) -> int:
        """The last ``window`` keys and values (decoding drops older ones)."""
        return 2 * self.window * self.d_model

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, num_heads={self.num_heads}, window={self.window}, causal={self.causal}"


# --------------------------------------------------------------------------------------------
# one layer's mixer
# --------------------------------------------------------------------------------------------
_BUILDERS = {"conv": BaseConv, "linear": TaylorLinearAttention, "window": SlidingWindowAttention}
_OPTIONS = {
    "conv": ("kernel_size", "residual"),
    "linear": ("num_heads", "feature_dim", "head_dim", "causal", "eps", "chunk_size", "backend"),
    "window": ("num_heads", "window", "causal", "qkv_bias", "proj_bias", "backend"),
}


class BasedMixer(nn.Module):
    """One layer's sequence mixer of Based: ``kind`` = ``"conv"`` (:class:`BaseConv`),
    ``"linear"`` (:class:`TaylorLinearAttention`) or ``"window"`` (:class:`SlidingWindowAttention`).

    Options go to the chosen mixer; options of the other kinds are ignored, so one set of
    options (``feature_dim=8, window=64, kernel_size=3``) serves every layer of a model.
    (B, N, d_model) -> (B, N, d_model).

    Example::

        >>> layers = [BasedMixer.for_layer(64, i, feature_dim=16) for i in range(2)]  # conv, linear
        >>> y = layers[1](layers[0](torch.randn(2, 128, 64)))
    """

    def __init__(self, d_model: int, kind: str = "linear", **options: Any):
        super().__init__()
        if kind not in _BUILDERS:
            raise ParameterError(f"BasedMixer: kind: expected one of {', '.join(map(repr, _BUILDERS))}, got {kind!r}", argument="kind")
        known = {name for names in _OPTIONS.values() for name in names}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ParameterError(f"BasedMixer: {unknown[0]}: unknown option; it accepts: {', '.join(sorted(known))}", argument=unknown[0])
        self.kind = kind
        self.mixer = _BUILDERS[kind](d_model, **{n: v for n, v in options.items() if n in _OPTIONS[kind]})

    @classmethod
    def for_layer(cls, d_model: int, layer_idx: int, kinds: tuple[str, ...] = ("conv", "linear"), **options: Any) -> "BasedMixer":
        """The mixer of layer ``layer_idx``: ``kinds[layer_idx % len(kinds)]`` (Zoology's ``Hybrid``).

        The default ``("conv", "linear")`` is the paper's 2-layer MQAR model; ``MIXER_KINDS``
        gives its 3-layer one with a sliding window.
        """
        if not kinds:
            raise ParameterError("BasedMixer: kinds: expected at least one kind", argument="kinds")
        return cls(d_model, kinds[layer_idx % len(kinds)], **options)

    def forward(self, x: Tensor) -> Tensor:
        return self.mixer(x)

    def state_size(self) -> int:
        return self.mixer.state_size()

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}"
