"""FlexAttention (torch.nn.attention.flex_attention) as a backend engine.

The pattern arrives as a ``BlockMask`` (``attnzoo.masks.flex_block_mask``) and the score
modification as a ``score_mod``; an additive bias becomes part of the ``score_mod``. The function
is compiled once per shape (on CPU about 5-20 s cold). What it cannot do on a device is declared
in :func:`decline_reason` (CPU: :func:`cpu_decline_reason`; CUDA: small head dims), so dispatch
never sends it there.

On CUDA it runs forward and backward (gradients of q, k, v and of tensors a ``score_mod``
captures, e.g. a learnable bias table) and returns a differentiable LSE; on CPU torch has no
FlexAttention backward and the compiled CPU kernel gives no LSE, so it is forward only there.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from .tiled import score_mod_grad_captures

__all__ = [
    "FLEX_CAPABILITIES",
    "FLEX_CPU_MIN_HEAD_DIM",
    "FLEX_CUDA_MIN_HEAD_DIM",
    "FLEX_RECOMPILE_LIMIT",
    "flex_forward",
    "cpu_decline_reason",
    "cuda_decline_reason",
    "decline_reason",
]

#: torch 2.13's compiled CPU FlexAttention returned wrong values (even NaN) for head dims 8 and
#: 16 in our sweeps, depending on what had been compiled before in the process; 32+ was exact.
FLEX_CPU_MIN_HEAD_DIM = 32
#: The Triton kernel's tl.dot needs head dims of at least 16 (torch raises "NYI: embedding
#: dimension ... must be at least 16" while compiling, for q/k and for v alike).
FLEX_CUDA_MIN_HEAD_DIM = 16
#: Compiled graphs kept for the one compiled flex_attention (one per shape, dtype, pattern type
#: and score_mod). Past torch's default limit of 8, dynamo silently runs flex_attention
#: *uncompiled*: an implementation that materializes the Nq x Nk scores (one UserWarning per
#: process), which a benchmark or a suite covering many shapes and patterns reaches at once.
FLEX_RECOMPILE_LIMIT = 256


#: What a flex backend declares (``Backend(**FLEX_CAPABILITIES)``): no float64, compiled per
#: shape, below tiled on CPU (forward only there) and above it on CUDA.
FLEX_CAPABILITIES: dict[str, Any] = dict(
    dtypes=frozenset({torch.float16, torch.bfloat16, torch.float32}),
    priority=10,
    device_priority={"cuda": 40},
    compiles=True,
)


@functools.lru_cache(maxsize=1)
def _compiled() -> Callable:
    from torch.nn.attention.flex_attention import flex_attention

    if "recompile_limit" in inspect.signature(torch.compile).parameters:  # torch 2.13 has it; older ones take the config patch
        return torch.compile(flex_attention, dynamic=False, recompile_limit=FLEX_RECOMPILE_LIMIT)
    compiled = torch.compile(flex_attention, dynamic=False)

    @functools.wraps(flex_attention)
    def call(*args: Any, **kwargs: Any) -> Any:
        if torch.compiler.is_compiling():  # inside an outer torch.compile: no config change while tracing
            return compiled(*args, **kwargs)
        with torch._dynamo.config.patch(recompile_limit=FLEX_RECOMPILE_LIMIT):
            return compiled(*args, **kwargs)

    return call


def cpu_decline_reason(problem: Any, *, score_mod: Optional[Callable], return_lse: bool) -> Optional[str]:
    """Why compiled FlexAttention cannot take this call on CPU (``problem``: an attnzoo Problem)."""
    if problem.device_type != "cpu":
        return None
    if min(problem.head_dim, problem.value_dim) < FLEX_CPU_MIN_HEAD_DIM:
        return f"head dim >= {FLEX_CPU_MIN_HEAD_DIM} on CPU (smaller ones gave wrong results in torch's CPU kernel)"
    if problem.requires_grad or (score_mod is not None and torch.is_grad_enabled() and score_mod_grad_captures(score_mod)):
        return "forward only on CPU (FlexAttention has no CPU backward): use tiled for training"
    if return_lse:
        return "cannot return the LSE on CPU (FlexAttention under compile on CPU)"
    return None


def cuda_decline_reason(problem: Any) -> Optional[str]:
    """Why compiled FlexAttention cannot take this call on CUDA: only head dims below 16
    (gradients, captured-tensor gradients and the LSE are all supported there)."""
    if problem.device_type != "cuda":
        return None
    if min(problem.head_dim, problem.value_dim) < FLEX_CUDA_MIN_HEAD_DIM:
        return f"head dims >= {FLEX_CUDA_MIN_HEAD_DIM} on CUDA (the Triton kernel's minimum), got {problem.head_dim} and {problem.value_dim}"
    return None


def decline_reason(problem: Any, *, score_mod: Optional[Callable] = None, return_lse: bool = False) -> Optional[str]:
    """Why compiled FlexAttention cannot take this call on its device, or None (every flex backend's ``accepts``)."""
    return cpu_decline_reason(problem, score_mod=score_mod, return_lse=return_lse) or cuda_decline_reason(problem)


def flex_forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    block_mask: Any,
    scale: Optional[float],
    score_mod: Optional[Callable] = None,
    bias: Optional[Tensor] = None,
    return_lse: bool = False,
) -> Any:
    """Compiled FlexAttention; returns ``out`` or ``(out, lse)`` with lse in float32."""
    b, h, nq = q.shape[:3]
    nk = k.shape[2]
    mod = score_mod
    if bias is not None:
        full_bias = bias.to(q.dtype).expand(b, h, nq, nk)

        def mod(score, bi, hi, qi, ki):
            s = score + full_bias[bi, hi, qi, ki]
            return s if score_mod is None else score_mod(s, bi, hi, qi, ki)

    result = _compiled()(
        q, k, v, score_mod=mod, block_mask=block_mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1], return_lse=return_lse
    )
    if return_lse:
        out, lse = result
        return out, lse.float()
    return result
