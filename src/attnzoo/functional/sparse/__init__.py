"""Content-dependent sparse attention (catalog S1-S3): what a query attends is chosen from the data.

One selection engine (:mod:`._select`: top-k and cumulative-mass rules, row-level block
selections as fused-kernel plans) serves every method; each module is one method's scorer.
"""

from .block_gate import block_gate_attention
from .flexprefill import flexprefill_attention
from .minference import vertical_slash_attention
from .moba import moba_attention
from .nsa import nsa_attention
from .routing import bilevel_routing_attention
from .topk import topk_attention
from .xattention import xattention

__all__ = ["bilevel_routing_attention", "block_gate_attention", "flexprefill_attention", "moba_attention", "nsa_attention", "topk_attention", "vertical_slash_attention", "xattention"]
