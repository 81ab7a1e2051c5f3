"""The functional forms, one module per mechanism family; importing registers them."""

from .dense import softmax_attention
from .linear import (
    agent_attention,
    based_attention,
    flow_attention,
    inline_attention,
    joint_chunk_attention,
    kernelized_rpe_attention,
    linear_attention,
    linfusion_attention,
    retention,
    transnormer_attention,
    transnormer_diag_attention,
)
from .sparse import bilevel_routing_attention, block_gate_attention, flexprefill_attention, moba_attention, nsa_attention, topk_attention, vertical_slash_attention, xattention
from .variants import relu_attention, sigmoid_attention
from .local import (
    HeadPattern,
    axial_attention,
    grid_attention,
    halo_attention,
    neighborhood_attention,
    per_head_patterns_attention,
    sliding_window_attention,
    varying_window_attention,
    window_attention,
)

__all__ = [
    "softmax_attention",
    "sigmoid_attention",
    "relu_attention",
    "topk_attention",
    "moba_attention",
    "bilevel_routing_attention",
    "xattention",
    "vertical_slash_attention",
    "nsa_attention",
    "flexprefill_attention",
    "block_gate_attention",
    "sliding_window_attention",
    "neighborhood_attention",
    "axial_attention",
    "window_attention",
    "grid_attention",
    "halo_attention",
    "per_head_patterns_attention",
    "varying_window_attention",
    "HeadPattern",
    "linear_attention",
    "retention",
    "agent_attention",
    "flow_attention",
    "based_attention",
    "transnormer_attention",
    "transnormer_diag_attention",
    "linfusion_attention",
    "joint_chunk_attention",
    "inline_attention",
    "kernelized_rpe_attention",
]
