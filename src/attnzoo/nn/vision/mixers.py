"""Attention-free comparison mixers (catalog M16): the token mixers that papers set against attention.

Each is the official code's arithmetic as a module (the official repositories were read, not copied):

* :class:`SpectralGating`: SpectFormer's / GFNet's spectral gating, ``irfft2(W * rfft2(x))`` (B, H, W, C);
* :class:`RecursiveGatedConv`: HorNet's g^n Conv, recursive gating of depthwise-conv features (B, C, H, W);
* :class:`ScaleAwareModulation`: SMT's multi-head mixed convolution + scale-aware aggregation (B, H, W, C);
* :class:`GLUMixer`: Activator's GLU unit in place of attention (B, N, C);
* :class:`FFNifiedAttention`: MetaMixer's / FFNet's token mixer, DWConv(GELU(DWConv(Conv1x1 x))) (B, C, H, W);
* :class:`NetworkInNetworkGating`: NiNformer's gate, ``Linear(x) * MLPMixerBlock(x)`` (B, N, C).

Layouts: the convolutional ones (HorNet, FFNet) keep the official channels-first (B, C, H, W), as
their backbones do; SpectFormer and SMT take the (B, H, W, C) grids of the vision family; the two
MLP-style ones (Activator, NiNformer) take token sequences (B, N, C).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...errors import ParameterError, ShapeError
from .._checks import check_tokens, odd_kernel, positive_int
from .._registry import ModuleExample, register_module

__all__ = [
    "SpectralGating",
    "RecursiveGatedConv",
    "ScaleAwareModulation",
    "GLUMixer",
    "FFNifiedAttention",
    "NetworkInNetworkGating",
]


def _check_nhwc(owner: str, x: Tensor, dim: int) -> None:
    if x.dim() != 4 or x.shape[-1] != dim:
        raise ShapeError(f"{owner}: x: expected (B, H, W, C={dim}), got shape {tuple(x.shape)}", argument="x")


def _check_nchw(owner: str, x: Tensor, dim: int) -> None:
    if x.dim() != 4 or x.shape[1] != dim:
        raise ShapeError(f"{owner}: x: expected (B, C={dim}, H, W), got shape {tuple(x.shape)}", argument="x")


def _pair(owner: str, name: str, value) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value, value)
    ok = isinstance(value, (tuple, list)) and len(value) == 2 and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value)
    if not ok:
        raise ParameterError(f"{owner}: {name}: expected a positive int or a pair (H, W) of them, got {value!r}", argument=name)
    return int(value[0]), int(value[1])


# ------------------------------------------------------------------------------------------------ SpectFormer


@register_module(
    "M16",
    paper="SpectFormer: Frequency and Attention is what you need in a Vision Transformer (Patro et al., 2023); GFNet (Rao et al., NeurIPS 2021)",
    layout="(B, H, W, C)",
    example=ModuleExample(
        dict(dim=96, grid_size=(56, 56)), inputs=[(1, 56, 56, 96)],
        test_inputs=[(2, 8, 7, 16)], test_kwargs=dict(dim=16, grid_size=(8, 7)),
    ),
)
class SpectralGating(nn.Module):
    """SpectFormer's spectral gating network: a learnable complex filter on the 2D spectrum, per channel.

    SpectFormer (Patro et al., Sec. 3, "spectral block"; the GFNet global filter, Rao et al., Eq. 3-4)::

        X_hat = F[x]                    rfft2 over (H, W), orthonormal (official ``norm='ortho'``)
        X_out = F^{-1}[W_c * X_hat]     W_c in C^{H x (W//2+1) x C}, elementwise, then irfft2 to (H, W)

    Cost: O(N C log N) for the FFTs plus O(N C) for the gating, N = H W; parameters H (W//2+1) C 2.
    The filter is laid on a fixed grid (``grid_size``), as in the official code (``h``, ``w = W//2+1``
    fixed at build time); inputs must have that grid. W is initialised N(0, 0.02) as there; set it to
    1 + 0i and the layer is the identity. The official code computes in float32 whatever the input;
    here float64 stays float64 and lower precisions are computed in float32 and cast back.

    Layout: (B, H, W, C) (the official takes (B, N, C) with N = a * a and reshapes to this).

    Example::

        >>> layer = SpectralGating(96, grid_size=(56, 56))
        >>> y = layer(torch.randn(2, 56, 56, 96))
    """

    def __init__(self, dim: int, grid_size=(14, 14)):
        super().__init__()
        name = type(self).__name__
        self.dim = positive_int(name, "dim", dim)
        self.grid_size = _pair(name, "grid_size", grid_size)
        h, w = self.grid_size
        self.complex_weight = nn.Parameter(torch.randn(h, w // 2 + 1, dim, 2) * 0.02)

    def forward(self, x: Tensor) -> Tensor:
        name = type(self).__name__
        _check_nhwc(name, x, self.dim)
        if tuple(x.shape[1:3]) != self.grid_size:
            raise ShapeError(f"{name}: x: expected the filter's grid (H, W) = {self.grid_size}, got shape {tuple(x.shape)}", argument="x")
        dtype = x.dtype
        work = x if dtype == torch.float64 else x.float()
        spec = torch.fft.rfft2(work, dim=(1, 2), norm="ortho")
        spec = spec * torch.view_as_complex(self.complex_weight.to(work.dtype).contiguous())
        return torch.fft.irfft2(spec, s=self.grid_size, dim=(1, 2), norm="ortho").to(dtype)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, grid_size={self.grid_size}"


# ------------------------------------------------------------------------------------------------ HorNet


@register_module(
    "M16",
    paper="HorNet: Efficient High-Order Spatial Interactions with Recursive Gated Convolutions (Rao et al., NeurIPS 2022)",
    layout="(B, C, H, W)",
    example=ModuleExample(
        dict(dim=64, order=2), inputs=[(1, 64, 56, 56)],  # HorNet-T stage 1: 64 channels, order 2
        test_inputs=[(2, 16, 8, 8)], test_kwargs=dict(dim=16, order=3),
    ),
)
class RecursiveGatedConv(nn.Module):
    """HorNet's recursive gated convolution g^n Conv over (B, C, H, W).

    Rao et al., Sec. 3.1, Eq. 3.3-3.5, with C_k = C / 2^{n-1-k}::

        [p_0, q_0, ..., q_{n-1}] = phi_in(x)                      1x1 conv to C_0 + sum_k C_k channels
        [q_0, ..., q_{n-1}]     = s * f(concat q)                 f: one 7x7 depthwise conv (official: s = 1/3 in the
                                                                  HorNet configs; ``scale``)
        p_{k+1} = g_k(p_k) * q_k,   k = 0..n-1                    g_0 = identity, g_k a 1x1 conv C_{k-1} -> C_k
        y       = phi_out(p_n)                                    1x1 conv C -> C

    The order n = 1 form is ``y = phi_out(p_0 * s f(q_0))`` (the gated conv, Eq. 3.1-3.2).
    Cost: O(N C (2C + k^2 (2 - 2^{1-n}) + ...)), i.e. O(N C^2) for the 1x1 convs plus O(N C k^2) for the
    depthwise conv, N = H W; at most 2x the FLOPs of a conv of the same kernel (Sec. 3.1).

    Layout: (B, C, H, W), as HorNet (its blocks are channels-first ConvNeXt-style). The global-filter
    variant ``gflayer`` (HorNet-GF) is not built; ``kernel_size`` picks the depthwise kernel (7 as the paper).

    Example::

        >>> layer = RecursiveGatedConv(64, order=3)
        >>> y = layer(torch.randn(2, 64, 56, 56))
    """

    def __init__(self, dim: int, order: int = 5, *, kernel_size: int = 7, scale: float = 1.0 / 3.0):
        super().__init__()
        name = type(self).__name__
        self.dim = positive_int(name, "dim", dim)
        self.order = positive_int(name, "order", order)
        odd_kernel(name, kernel_size, optional=False)
        if dim % (2 ** (order - 1)):
            raise ParameterError(f"{name}: order: expected 2^(order-1) to divide dim={dim}, got order={order}", argument="order")
        self.dims = [dim // 2 ** i for i in range(order)][::-1]  # C_0 (smallest) .. C_{n-1} = C
        self.kernel_size, self.scale = kernel_size, float(scale)
        self.proj_in = nn.Conv2d(dim, 2 * dim, 1)
        self.dwconv = nn.Conv2d(sum(self.dims), sum(self.dims), kernel_size, padding=kernel_size // 2, groups=sum(self.dims))
        self.pws = nn.ModuleList(nn.Conv2d(self.dims[i], self.dims[i + 1], 1) for i in range(order - 1))
        self.proj_out = nn.Conv2d(dim, dim, 1)

    def forward(self, x: Tensor) -> Tensor:
        _check_nchw(type(self).__name__, x, self.dim)
        p, q = torch.split(self.proj_in(x), (self.dims[0], sum(self.dims)), dim=1)
        qs = torch.split(self.dwconv(q) * self.scale, self.dims, dim=1)
        p = p * qs[0]
        for k, pw in enumerate(self.pws):
            p = pw(p) * qs[k + 1]
        return self.proj_out(p)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, order={self.order}, dims={self.dims}, kernel_size={self.kernel_size}, scale={self.scale:.4g}"


# ------------------------------------------------------------------------------------------------ SMT


@register_module(
    "M16",
    paper="Scale-Aware Modulation Meet Transformer (Lin et al., ICCV 2023)",
    layout="(B, H, W, C)",
    example=ModuleExample(
        dict(dim=64, num_heads=4, expand_ratio=2), inputs=[(1, 56, 56, 64)],  # SMT-T stage 1: 64 channels, 4 heads
        test_inputs=[(2, 8, 8, 16)], test_kwargs=dict(dim=16),
    ),
)
class ScaleAwareModulation(nn.Module):
    """SMT's scale-aware modulation (SAM): multi-head mixed convolution, scale-aware aggregation, modulation.

    Lin et al., Sec. 3.1-3.2 (Eq. 1-4), in the official ``Attention(ca_attention=1)`` arithmetic::

        V = x W_v,   S = x W_s,   S = [S_1, ..., S_h]                 h = ``num_heads`` channel groups of C/h
        MHMC:  S_i <- DWConv_{k_i}(S_i),   k_i = 3 + 2(i - 1)            (Eq. 1-2; kernels 3, 5, 7, ...)
        SAA:   Z = [S_1^1, S_2^1, ..., S_h^1, S_1^2, ...]              channel j of every head grouped together
               M = W_2 GELU(BN(W_1^{grouped} Z))                         W_1: 1x1 conv in C/h groups (h -> r h
                                                                        channels each), W_2: 1x1 conv r C -> C
        out = (M * V) W_o                                               (Eq. 4: modulation of the value)

    Cost: O(N C^2) for the projections plus O(N C sum_i k_i^2 / h) for MHMC, N = H W; no attention map.
    BatchNorm follows train/eval mode. The official SMT switches some stage-3 blocks to plain MSA
    (``ca_attention=0``); that branch is ordinary attention and is not built here.

    Layout: (B, H, W, C) (the official takes (B, N, C) plus H, W).

    Example::

        >>> layer = ScaleAwareModulation(64, num_heads=4)
        >>> y = layer(torch.randn(2, 56, 56, 64))
    """

    def __init__(self, dim: int, num_heads: int = 4, *, expand_ratio: int = 2, qkv_bias: bool = False):
        super().__init__()
        name = type(self).__name__
        self.dim = positive_int(name, "dim", dim)
        self.num_heads = positive_int(name, "num_heads", num_heads)
        self.expand_ratio = positive_int(name, "expand_ratio", expand_ratio)
        if dim % num_heads:
            raise ParameterError(f"{name}: num_heads: expected a divisor of dim={dim}, got {num_heads}", argument="num_heads")
        self.split_groups = dim // num_heads
        g = self.split_groups
        self.v = nn.Linear(dim, dim, bias=qkv_bias)
        self.s = nn.Linear(dim, dim, bias=qkv_bias)
        self.local_convs = nn.ModuleList(nn.Conv2d(g, g, 3 + 2 * i, padding=1 + i, groups=g) for i in range(num_heads))
        self.proj0 = nn.Conv2d(dim, dim * expand_ratio, 1, groups=g)
        self.bn = nn.BatchNorm2d(dim * expand_ratio)
        self.proj1 = nn.Conv2d(dim * expand_ratio, dim, 1)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        _check_nhwc(type(self).__name__, x, self.dim)
        b, hh, ww, c = x.shape
        v = self.v(x)
        s = self.s(x).permute(0, 3, 1, 2)  # (B, C, H, W), head i = channels [i C/h, (i+1) C/h)
        heads = [conv(part) for conv, part in zip(self.local_convs, s.split(self.split_groups, dim=1))]
        # interleave: output channel j * h + i is channel j of head i (the official reshape + cat)
        z = torch.stack(heads, dim=2).reshape(b, c, hh, ww)
        m = self.proj1(F.gelu(self.bn(self.proj0(z)))).permute(0, 2, 3, 1)
        return self.proj(m * v)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, expand_ratio={self.expand_ratio}"


# ------------------------------------------------------------------------------------------------ Activator


@register_module(
    "M16",
    paper="Activator: GLU Activations as the Core Functions of a Vision Transformer (Abdullah and Aydin, 2024)",
    layout="(B, N, C)",
    example=ModuleExample(
        dict(dim=512, hidden_dim=1024), inputs=[(1, 1024, 512)],
        test_inputs=[(2, 17, 32)], test_kwargs=dict(dim=32, hidden_dim=48),
    ),
)
class GLUMixer(nn.Module):
    """Activator's gating unit: a GLU with normalised branches, used where a Transformer has attention.

    Activator (Abdullah and Aydin, 2024; official ``ActivatorGatingUnit``)::

        u = LN(GELU(x W_1 + b_1)),   v = LN(x W_2 + b_2),   out = (u * v) W_3 + b_3

    with ONE LayerNorm (over the hidden width) applied to both branches, as in the official code.
    This is the paper's form (the GEGLU variant, ``activator_only_GEGLU.py``, is the same unit; the
    block around it, pre-norm + residual + an MLP, is left to the caller). It mixes channels only:
    tokens do not interact (the paper's claim is that this suffices in place of attention).

    Cost: O(N C D) for D = ``hidden_dim``; linear in N.

    Example::

        >>> layer = GLUMixer(384, hidden_dim=768)
        >>> y = layer(torch.randn(2, 197, 384))
    """

    def __init__(self, dim: int, hidden_dim: Optional[int] = None):
        super().__init__()
        name = type(self).__name__
        self.dim = positive_int(name, "dim", dim)
        self.hidden_dim = positive_int(name, "hidden_dim", 4 * dim if hidden_dim is None else hidden_dim)
        self.proj_1 = nn.Linear(dim, self.hidden_dim)
        self.proj_2 = nn.Linear(dim, self.hidden_dim)
        self.proj_3 = nn.Linear(self.hidden_dim, dim)
        self.norm = nn.LayerNorm(self.hidden_dim)

    def forward(self, x: Tensor) -> Tensor:
        check_tokens(type(self).__name__, x, self.dim)
        u = self.norm(F.gelu(self.proj_1(x)))
        v = self.norm(self.proj_2(x))
        return self.proj_3(u * v)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, hidden_dim={self.hidden_dim}"


# ------------------------------------------------------------------------------------------------ MetaMixer / FFNet


class _ConvBN(nn.Sequential):
    """Conv2d (no bias) + BatchNorm2d, the official ``Conv2d_BN``."""

    def __init__(self, cin: int, cout: int, kernel_size: int = 1, groups: int = 1):
        super().__init__()
        self.add_module("c", nn.Conv2d(cin, cout, kernel_size, padding=kernel_size // 2, groups=groups, bias=False))
        self.add_module("bn", nn.BatchNorm2d(cout))


class _RepDW(nn.Module):
    """The official ``RepVGGDW``: a k x k and a (k//2) x (k//2) depthwise Conv-BN, summed."""

    def __init__(self, dim: int, kernel_size: int):
        super().__init__()
        self.conv = _ConvBN(dim, dim, kernel_size, groups=dim)
        self.conv1 = _ConvBN(dim, dim, kernel_size // 2, groups=dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x) + self.conv1(x)


def _dw(dim: int, kernel_size: int) -> nn.Module:
    return _RepDW(dim, kernel_size) if kernel_size == 7 else nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)


@register_module(
    "M16",
    paper="MetaMixer Is All You Need (Yun et al., 2024; FFNet)",
    layout="(B, C, H, W)",
    example=ModuleExample(
        dict(dim=64, kernel_sizes=(7, 7)), inputs=[(1, 64, 56, 56)],
        test_inputs=[(2, 16, 8, 8)], test_kwargs=dict(dim=16),
    ),
)
class FFNifiedAttention(nn.Module):
    """MetaMixer's FFNified attention (FFNet's token mixer): query-key-value with convolutions.

    Yun et al., Sec. 3-4: attention's query-key matching becomes a convolution whose kernel plays the
    keys, the softmax becomes GELU, and the value aggregation a second convolution whose kernel plays
    the values; in the official ``Token_Mixer``::

        q   = BN(Conv1x1(x))                 the query projection (``fc``, Conv-BN, no bias)
        a   = GELU(DWConv_{k1}(q))           "keys": a large-kernel depthwise conv, GELU for the softmax
        out = DWConv_{k2}(a)                 "values": a second depthwise conv

    A 7 x 7 depthwise conv is the official ``RepVGGDW``: DWConv-BN 7x7 + DWConv-BN 3x3 (re-parameterisable
    into one 7x7 conv for inference); other kernels are a plain depthwise conv with bias. FFNet uses
    (3, 3) in stages 1-2 and (7, 7) in stages 3-4; the block's residual and layer scale are the caller's.

    Cost: O(N C^2) for the 1x1 conv plus O(N C (k1^2 + k2^2)), N = H W; no attention map.
    BatchNorm follows train/eval mode.

    Layout: (B, C, H, W), as FFNet.

    Example::

        >>> layer = FFNifiedAttention(64, kernel_sizes=(7, 7))
        >>> y = layer(torch.randn(2, 64, 56, 56))
    """

    def __init__(self, dim: int, kernel_sizes=(7, 7), *, use_gelu: bool = True):
        super().__init__()
        name = type(self).__name__
        self.dim = positive_int(name, "dim", dim)
        ks = _pair(name, "kernel_sizes", kernel_sizes)
        for k in ks:
            if k % 2 == 0:
                raise ParameterError(f"{name}: kernel_sizes: expected odd kernels, got {kernel_sizes!r}", argument="kernel_sizes")
        self.kernel_sizes = ks
        self.fc = _ConvBN(dim, dim)
        self.conv1 = _dw(dim, ks[0])
        self.act = nn.GELU() if use_gelu else nn.ReLU()
        self.conv2 = _dw(dim, ks[1])

    def forward(self, x: Tensor) -> Tensor:
        _check_nchw(type(self).__name__, x, self.dim)
        return self.conv2(self.act(self.conv1(self.fc(x))))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, kernel_sizes={self.kernel_sizes}"


# ------------------------------------------------------------------------------------------------ NiNformer


class _MLP(nn.Sequential):
    def __init__(self, dim: int, hidden: int):
        super().__init__(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))


@register_module(
    "M16",
    paper="NiNformer: A Network in Network Transformer with Token Mixing Generated Gating Function (Abdullah and Aydin, 2024)",
    layout="(B, N, C)",
    example=ModuleExample(
        dict(dim=512, seq_len=1024, hidden_dim=1024), inputs=[(1, 1024, 512)],
        test_inputs=[(2, 17, 32)], test_kwargs=dict(dim=32, seq_len=17, hidden_dim=24),
    ),
)
class NetworkInNetworkGating(nn.Module):
    """NiNformer's network-in-network gating unit: an MLP-Mixer block makes the dynamic gate of a linear path.

    NiNformer (official ``MixerGatingUnit``)::

        z   = x + MLP_tok(LN_1(x)^T)^T          token mixing over the N tokens (fixed N = ``seq_len``)
        g   = z + MLP_ch(LN_2(z))               channel mixing: g = MLPMixerBlock(x)
        out = (x W + b) * g                     the gate g is generated from the whole sequence

    MLP = Linear-GELU-Linear; the token MLP is N -> ``token_dim`` -> N, the channel MLP C -> ``hidden_dim`` -> C
    (the official block passes its d_ffn to both). Cost: O(N C (token_dim + hidden_dim + C)); linear in N but
    tied to a fixed N, as MLP-Mixer.

    Example::

        >>> layer = NetworkInNetworkGating(256, seq_len=64, hidden_dim=512)
        >>> y = layer(torch.randn(2, 64, 256))
    """

    def __init__(self, dim: int, seq_len: int, hidden_dim: Optional[int] = None, *, token_dim: Optional[int] = None):
        super().__init__()
        name = type(self).__name__
        self.dim = positive_int(name, "dim", dim)
        self.seq_len = positive_int(name, "seq_len", seq_len)
        self.hidden_dim = positive_int(name, "hidden_dim", 4 * dim if hidden_dim is None else hidden_dim)
        self.token_dim = positive_int(name, "token_dim", self.hidden_dim if token_dim is None else token_dim)
        self.norm_tok = nn.LayerNorm(dim)
        self.token_mlp = _MLP(seq_len, self.token_dim)
        self.norm_ch = nn.LayerNorm(dim)
        self.channel_mlp = _MLP(dim, self.hidden_dim)
        self.proj = nn.Linear(dim, dim)

    def mixer(self, x: Tensor) -> Tensor:
        """The MLP-Mixer block (token then channel mixing, each with its residual): the gate."""
        z = x + self.token_mlp(self.norm_tok(x).transpose(1, 2)).transpose(1, 2)
        return z + self.channel_mlp(self.norm_ch(z))

    def forward(self, x: Tensor) -> Tensor:
        name = type(self).__name__
        check_tokens(name, x, self.dim)
        if x.shape[1] != self.seq_len:
            raise ShapeError(f"{name}: x: expected N = seq_len = {self.seq_len} tokens (the token MLP's width), got shape {tuple(x.shape)}", argument="x")
        return self.proj(x) * self.mixer(x)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, seq_len={self.seq_len}, hidden_dim={self.hidden_dim}, token_dim={self.token_dim}"

