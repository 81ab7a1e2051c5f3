"""Content-dependent sparse attention (catalog S1-S8): what a query attends is chosen from the data.

One selection engine (:mod:`._select`: top-k and cumulative-mass rules, row-level block
selections as fused-kernel plans) serves every method; each module is one method's scorer.
"""

from .block_gate import block_gate_attention
from .clustering import histogram_attention, kmeans_routing_attention, region_attention, token_centres_attention
from .core_context import core_context_attention
from .flexprefill import flexprefill_attention
from .hip import hip_attention
from .hyper import hyper_attention
from .landmark import landmark_attention
from .minference import vertical_slash_attention
from .moba import moba_attention
from .nsa import nsa_attention
from .permuted import paro_attention, pbs_attention
from .pyramid import pyramid_sparse_attention
from .routing import bilevel_routing_attention
from .sparsifiner import sparsifiner_attention
from .topk import topk_attention
from .xattention import xattention

__all__ = ["bilevel_routing_attention", "kmeans_routing_attention", "region_attention", "token_centres_attention", "histogram_attention", "block_gate_attention", "core_context_attention", "flexprefill_attention", "hip_attention", "hyper_attention", "landmark_attention", "moba_attention", "nsa_attention", "paro_attention", "pbs_attention", "pyramid_sparse_attention", "sparsifiner_attention", "topk_attention", "vertical_slash_attention", "xattention"]
