"""Local attention with fixed patterns (catalog L).

Every mechanism here is softmax attention restricted to a fixed set of keys per query; the
pattern is a :mod:`attnzoo.masks` predicate, so the reference materializes it as a dense mask
(the spec) and the ``tiled`` backend visits only the key tiles the pattern touches
(:mod:`attnzoo.kernels.tiled`), forward and backward, in O(N * window) time.

``sliding_window`` (L2): query i, sitting at key position ``i' = i + Nk - Nq`` (bottom-right,
the default) or ``i' = i`` (top-left), sees keys ``i' - left <= j <= i' + right``; ``causal``
means ``right = 0``; ``sinks = S`` adds the first S keys to every query's set (StreamingLLM's
attention sinks, used by SinkLoRA and LongGen), still causally when causal.
"""

from .axial import AXIAL, AxialMask, axial_attention
from .combiner import COMBINER, combiner_attention
from .grid import GRID, GridMask, grid_attention
from .halo import HALO, HaloMask, halo_attention
from .neighborhood import NEIGHBORHOOD, NeighborhoodMask, neighborhood_attention
from .per_head import PER_HEAD, HeadPattern, PerHeadMask, per_head_patterns_attention
from .sliding_window import SLIDING_WINDOW, sliding_window_attention
from .varying_window import VARYING_WINDOW, varying_window_attention
from .window import WINDOW, WindowMask, window_attention

__all__ = [
    "sliding_window_attention",
    "SLIDING_WINDOW",
    "neighborhood_attention",
    "NEIGHBORHOOD",
    "NeighborhoodMask",
    "axial_attention",
    "AXIAL",
    "AxialMask",
    "window_attention",
    "WINDOW",
    "WindowMask",
    "grid_attention",
    "GRID",
    "GridMask",
    "halo_attention",
    "HALO",
    "HaloMask",
    "per_head_patterns_attention",
    "PER_HEAD",
    "HeadPattern",
    "PerHeadMask",
    "varying_window_attention",
    "VARYING_WINDOW",
    "combiner_attention",
    "COMBINER",
]
