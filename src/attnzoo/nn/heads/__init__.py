"""Multi-head variants (catalog H): how heads are chosen, fed and combined."""

from .cascaded import CascadedGroupAttention
from .single_head import SingleHeadAttention
from .moh import MixtureOfHeadAttention
from .low_rank import LowRankFactorizedAttention
from .dual_head import SpatioTemporalDualHeadAttention
from .selective import SelectiveMultiHeadAttention

__all__: list[str] = ["CascadedGroupAttention", "SingleHeadAttention"]
__all__ += ["MixtureOfHeadAttention"]
__all__ += ["LowRankFactorizedAttention"]
__all__ += ["SpatioTemporalDualHeadAttention"]
__all__ += ["SelectiveMultiHeadAttention"]
