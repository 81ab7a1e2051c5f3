"""Multi-head variants (catalog H): how heads are chosen, fed and combined."""

from .cascaded import CascadedGroupAttention
from .dual_head import SpatioTemporalDualHeadAttention
from .low_rank import LowRankFactorizedAttention
from .moh import MixtureOfHeadAttention
from .selective import SelectiveMultiHeadAttention
from .single_head import SingleHeadAttention

__all__: list[str] = ["CascadedGroupAttention", "SingleHeadAttention"]
__all__ += ["MixtureOfHeadAttention"]
__all__ += ["LowRankFactorizedAttention"]
__all__ += ["SpatioTemporalDualHeadAttention"]
__all__ += ["SelectiveMultiHeadAttention"]
