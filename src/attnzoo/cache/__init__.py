"""KV-cache eviction and compression policies (catalog K2-K6, TOVA, key-norm).

- :mod:`attnzoo.cache.policies`: the rules as pure tensor functions (kept indices per batch and
  kv head), each citing its paper; no transformers needed.
- :mod:`attnzoo.cache.quantized`: ZipCache-style mixed precision (K5): salient tokens in more
  bits, packed codes through torch's decomposed quantization ops.
- :mod:`attnzoo.cache.transformers`: the same rules as transformers 5.x caches for
  ``model.generate(..., cache=SnapKVCache(model, budget=...))``, imported lazily (the ``hf``
  extra).
"""

from __future__ import annotations

from . import policies, quantized

__all__ = [
    "policies",
    "quantized",
    "StreamingLLMCache",
    "KeyNormCache",
    "H2OCache",
    "SnapKVCache",
    "TOVACache",
    "ZipCacheCache",
    "PyramidKVCache",
    "PolicyCache",
    "CacheStateError",
    "unbind",
]

_LAZY = {"StreamingLLMCache", "KeyNormCache", "H2OCache", "SnapKVCache", "TOVACache", "ZipCacheCache", "PyramidKVCache", "PolicyCache", "CacheStateError", "unbind"}


def __getattr__(name: str):
    if name in _LAZY:
        from . import transformers as _hf

        return getattr(_hf, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
