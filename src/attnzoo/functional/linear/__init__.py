"""Linear and kernel attention (catalog F): feature maps, recurrences, three exact forms each.

Every mechanism here computes ``out_i = sum_j w_ij (phi(q_i) . phi(k_j)) v_j`` (normalized or
not) with a feature map phi and weights w that are 1 (``linear``) or a per-head decay
(``retention``), causal or bidirectional, through one engine,
:mod:`attnzoo.kernels.linear_scan`, in three forms that agree to rounding: ``reference``
(parallel: the scores materialized), ``chunked`` (Lightning Attention-2: quadratic inside
chunks, a state across them, forward and backward) and ``recurrent`` (a state per token, the
decoding form). Decoding keeps that state, not a cache; ``Mechanism.state_size`` counts it.

Two members compute something else around the same engine: ``agent`` (F4) is two softmax
attentions through a few agent tokens (O(N n D)), and ``flow`` (F6, Flowformer) normalizes
sigmoid-feature linear attention by conserved flows; its final product runs on the engine.

A new mechanism of the family writes an ``operands`` and a ``finish`` function
(:mod:`._shared`) and its reference, and reuses the feature maps of :mod:`.feature_maps`.
"""

from . import feature_maps
from .feature_maps import FEATURE_MAPS, FeatureMap, feature_map_for
from .linear import LINEAR, linear_attention
from .retention import RETENTION, retention, retnet_gamma
from .agent import AGENT, agent_attention
from .flow import FLOW, flow_attention
from .based import BASED, based_attention
from .transnormer import TRANSNORMER, TRANSNORMER_DIAG, transnormer_attention, transnormer_diag_attention
from .linfusion import LINFUSION, linfusion_attention
from .mossformer import JOINT_CHUNK, joint_chunk_attention
from .inline import INLINE, inline_attention
from .kernelized_rpe import KERNELIZED_RPE, kernelized_rpe_attention

__all__ = [
    "linear_attention",
    "LINEAR",
    "retention",
    "RETENTION",
    "retnet_gamma",
    "agent_attention",
    "AGENT",
    "flow_attention",
    "FLOW",
    "based_attention",
    "BASED",
    "transnormer_attention",
    "TRANSNORMER",
    "transnormer_diag_attention",
    "TRANSNORMER_DIAG",
    "linfusion_attention",
    "LINFUSION",
    "joint_chunk_attention",
    "JOINT_CHUNK",
    "inline_attention",
    "INLINE",
    "kernelized_rpe_attention",
    "KERNELIZED_RPE",
    "feature_maps",
    "FEATURE_MAPS",
    "FeatureMap",
    "feature_map_for",
]
