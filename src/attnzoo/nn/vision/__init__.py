"""Vision token mixers (catalog M) on ``(B, H, W, C)`` (channels last, as ViT code holds tokens)."""

from .channel_attention import ChannelGroupAttention
from .crossformer import DynamicPositionBias, LongShortDistanceAttention
from .crossvit import ClassTokenCrossAttention
from .fcaformer import ForwardCrossAttention
from .focal import FocalModulation
from .global_query import GlobalQueryAttention, GlobalQueryGenerator
from .halo import HaloAttention
from .hat import ConvChannelAttentionBlock, OverlappingCrossAttention
from .hilo import HiLoAttention
from .maxvit import MaxViTBlockAttention, MaxViTGridAttention
from .mixers import FFNifiedAttention, GLUMixer, NetworkInNetworkGating, RecursiveGatedConv, ScaleAwareModulation, SpectralGating
from .outlook import OutlookAttention
from .rgt import RecursiveGeneralizationAttention
from .strip import StripSelfAttention
from .styleswin import DoubleWindowAttention
from .swin import SwinWindowAttention
from .tnt import TNTBlock
from .transnext import AggregatedAttention, ConvolutionalGLU, LengthScaledCosineAttention

__all__: list[str] = []
__all__ += ["HiLoAttention", "LongShortDistanceAttention", "DynamicPositionBias"]
__all__ += ["DoubleWindowAttention", "ConvChannelAttentionBlock", "OverlappingCrossAttention"]
__all__ += ["StripSelfAttention", "AggregatedAttention", "ConvolutionalGLU", "LengthScaledCosineAttention"]
__all__ += ["RecursiveGeneralizationAttention", "ForwardCrossAttention"]
__all__ += ["ChannelGroupAttention"]
__all__ += ["ClassTokenCrossAttention"]
__all__ += ["SwinWindowAttention", "OutlookAttention", "FocalModulation", "MaxViTBlockAttention", "MaxViTGridAttention"]
__all__ += ["HaloAttention"]
__all__ += ["GlobalQueryAttention", "GlobalQueryGenerator"]
__all__ += ["TNTBlock"]
__all__ += ["SpectralGating", "RecursiveGatedConv", "ScaleAwareModulation", "GLUMixer", "FFNifiedAttention", "NetworkInNetworkGating"]
