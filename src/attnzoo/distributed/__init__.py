"""Attention over a sequence split across processes (torch.distributed; gloo on CPU, NCCL on CUDA).

* :func:`ring_attention`: context-parallel exact softmax attention (ring of K/V blocks, or one
  all-gather), causal with zigzag load balancing, GQA, forward and backward, the LSE merged by
  :func:`attnzoo.merge_attention_states`.
* :func:`ulysses_attention`: head-parallel attention (DeepSpeed-Ulysses): all-to-all from
  sequence shards to head shards, any registered mechanism on the whole sequence, and back.
* :func:`state_passing_attention`: causal linear-family mechanisms (``linear``, ``retention``,
  ...) with the recurrent state passed from rank to rank, exact (bidirectional ``linear``: one
  all-reduce of the states).
* :func:`halo_attention`: ``sliding_window`` with only the halo keys exchanged with the neighbours.
* :func:`shard_sequence` / :func:`unshard_sequence`: the ``contiguous`` and ``zigzag`` layouts.

Where torch's own ``torch.distributed.tensor.experimental.context_parallel`` works (CUDA, SDPA's
flash / memory-efficient / cuDNN kernels, FlexAttention) it is the tool for plain softmax
training; this package adds CPU (gloo), the LSE, every registered mechanism (Ulysses), linear
state passing and sliding-window halos. ``attnzoo bench distributed`` measures them
(:mod:`attnzoo.bench.distributed`).

Example::

    import torch.distributed as dist
    from attnzoo.distributed import ring_attention, shard_sequence

    dist.init_process_group("gloo")                        # one process per rank (torchrun, mp.spawn)
    q, k, v = (shard_sequence(x, layout="zigzag") for x in (q_full, k_full, v_full))
    out = ring_attention(q, k, v, causal=True, layout="zigzag")
"""

from .halo import halo_attention
from .ring import COMMS, ring_attention, ring_plan
from .sharding import LAYOUTS, chunk_ids, local_positions, shard_sequence, unshard_sequence
from .state_passing import state_passing_attention
from .ulysses import heads_to_seq, seq_to_heads, ulysses_attention

__all__ = [
    "COMMS",
    "LAYOUTS",
    "chunk_ids",
    "halo_attention",
    "heads_to_seq",
    "local_positions",
    "ring_attention",
    "ring_plan",
    "seq_to_heads",
    "shard_sequence",
    "state_passing_attention",
    "ulysses_attention",
    "unshard_sequence",
]
