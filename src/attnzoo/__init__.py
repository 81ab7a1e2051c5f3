"""attnzoo: attention mechanisms behind one interface, exact against a readable reference.

    >>> import torch, attnzoo
    >>> q = k = v = torch.randn(1, 8, 1024, 64)
    >>> out = attnzoo.attention(q, k, v, "softmax", causal=True)
    >>> attnzoo.get("softmax").explain(q, k, v, causal=True)  # which backend, and why not the others
"""

from __future__ import annotations

from typing import Any, Optional

from . import cache, errors, masks, nn
from .functional import (
    HeadPattern,
    histogram_attention,
    kmeans_routing_attention,
    region_attention,
    token_centres_attention,
    core_context_attention,
    hip_attention,
    hyper_attention,
    landmark_attention,
    paro_attention,
    pbs_attention,
    pyramid_sparse_attention,
    sparsifiner_attention,
    combiner_attention,
    agent_attention,
    axial_attention,
    bilevel_routing_attention,
    block_gate_attention,
    flexprefill_attention,
    moba_attention,
    nsa_attention,
    topk_attention,
    vertical_slash_attention,
    xattention,
    based_attention,
    inline_attention,
    joint_chunk_attention,
    kernelized_rpe_attention,
    linfusion_attention,
    transnormer_attention,
    transnormer_diag_attention,
    flow_attention,
    grid_attention,
    halo_attention,
    linear_attention,
    neighborhood_attention,
    per_head_patterns_attention,
    retention,
    sliding_window_attention,
    differential_attention,
    relu_attention,
    sigmoid_attention,
    length_temperature_attention,
    position_temperature_attention,
    reversed_attention,
    selective_attention,
    softcap_attention,
    softplus_attention,
    softmax_attention,
    varying_window_attention,
    window_attention,
)
from .kernels.split_kv import merge_attention_states
from .registry import PATTERNS, Backend, Mechanism, Param, checks, get, list_mechanisms, set_checks

__version__ = "0.1.0"

__all__ = [
    "attention",
    "get",
    "list_mechanisms",
    "merge_attention_states",
    "set_checks",
    "checks",
    "softmax_attention",
    "histogram_attention",
    "kmeans_routing_attention",
    "region_attention",
    "token_centres_attention",
    "core_context_attention",
    "hip_attention",
    "hyper_attention",
    "landmark_attention",
    "paro_attention",
    "pbs_attention",
    "pyramid_sparse_attention",
    "sparsifiner_attention",
    "combiner_attention",
    "sigmoid_attention",
    "differential_attention",
    "relu_attention",
    "length_temperature_attention",
    "position_temperature_attention",
    "reversed_attention",
    "selective_attention",
    "softcap_attention",
    "softplus_attention",
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
    "topk_attention",
    "moba_attention",
    "xattention",
    "vertical_slash_attention",
    "nsa_attention",
    "bilevel_routing_attention",
    "flexprefill_attention",
    "block_gate_attention",
    "masks",
    "nn",
    "errors",
    "cache",
    "Mechanism",
    "Backend",
    "Param",
    "PATTERNS",
    "__version__",
]


def attention(q: Any, k: Any, v: Any, mechanism: str = "softmax", *, backend: Optional[str] = None, **params: Any) -> Any:
    """Run the registered ``mechanism`` on q, k, v (token layout (B, H, N, D)).

    Validates the inputs once, then runs the highest-priority backend that accepts them;
    ``backend="..."`` forces one. Parameters are the mechanism's (``attnzoo info NAME``).
    """
    return get(mechanism)(q, k, v, backend=backend, **params)
