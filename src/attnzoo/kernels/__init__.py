"""Compute engines shared across families (tiled online softmax, split-KV merge)."""

from .split_kv import merge_attention_states, split_kv_attention
from .tiled import BlockPlan, tiled_attention

__all__ = ["BlockPlan", "tiled_attention", "merge_attention_states", "split_kv_attention"]
