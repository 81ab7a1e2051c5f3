"""Cross-attention modules (catalog X): reading a task's answer off attention (X3, X4).

* :class:`AttentiveProbe` (X3): learned queries pool a frozen backbone's tokens by
  cross-attention (attentive probing; EP, Psomas et al. 2025);
* :class:`PointerHead` (X4): attention over the input positions is the output distribution
  (Pointer Networks, Vinyals et al. 2015).

Both compute their attention through a registered mechanism (``mechanism=``, softmax by default)
and take ``key_padding_mask`` (B, N) bool, True = ignore that token/position.
"""

from .global_local import GlobalLocalCrossAttention, PairwiseCrossAttention, attention_rollout
from .pointer import PointerHead
from .probe import AttentiveProbe

__all__ = ["AttentiveProbe", "PointerHead", "GlobalLocalCrossAttention", "PairwiseCrossAttention", "attention_rollout"]
