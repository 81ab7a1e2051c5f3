"""Make ``import torchvision`` (and so ``import timm``) work beside a CPU-only torch.

timm requires torchvision, and PyPI's torchvision wheels are CUDA builds: their C++ library
``torchvision/_C.so`` links ``libc10_cuda.so``, which a CPU torch does not ship, so it fails to
load. torchvision survives that (``extension._has_ops()`` is False and its ops raise a clear
error when called), except for one thing: ``torchvision/_meta_registrations.py`` calls
``torch.library.register_fake("torchvision::nms")`` and ``("torchvision::qnms")``
unconditionally at import, and registering a fake for an operator that was never defined is a
``RuntimeError: operator torchvision::nms does not exist``. That breaks ``import torchvision``,
``import timm``, and every transformers model whose module touches torchvision.

Chosen fix (of the two in issue 11): pin ``torchvision==0.28.0``, whose wheel requires exactly
``torch==2.13.0`` (so pip never swaps our CPU torch for a CUDA one), and, before torchvision is
first imported, *define* the two operator schemas (as torchvision's C++ would have) when its C++
library cannot be loaded. The fakes then register on a defined operator; calling
``torchvision.ops.nms`` still raises torchvision's own "Couldn't load custom C++ ops" error,
because the definitions have no kernel. Where the library loads (a CUDA machine with a matching
torch) nothing is defined here, so torchvision's own registrations stand.

Call :func:`ensure_importable` before the first ``import torchvision``/``import timm``;
``attnzoo.integrations.timm`` and ``tests/conftest.py`` do.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
from pathlib import Path

__all__ = ["ensure_importable"]

# The schemas of torchvision's csrc/ops/nms.cpp (qnms is the quantized variant, same signature).
_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}

_library = None  # the torch.library fragment holding the definitions; kept alive for the process


def _extension_path() -> Path | None:
    """Where torchvision's ``_C`` library lies, found without importing torchvision (None: not installed)."""
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations)))
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        candidate = folder / f"_C{suffix}"
        if candidate.exists():
            return candidate
    return None


def _ops_defined() -> bool:
    import torch

    try:
        return all(hasattr(torch.ops.torchvision, name) for name in _SCHEMAS)
    except RuntimeError:
        return False


def ensure_importable() -> bool:
    """Define ``torchvision::nms``/``qnms`` if torchvision's C++ ops cannot load; True if it defined them.

    A no-op when torchvision is not installed, already imported, or its library loads. Idempotent.
    """
    global _library
    if _library is not None or "torchvision" in sys.modules:
        return False
    path = _extension_path()
    if path is None or _ops_defined():
        return False
    import torch

    try:
        # What torchvision.extension does first; success defines the real operators.
        torch.ops.load_library(str(path))
    except (ImportError, OSError):
        pass
    if _ops_defined():
        return False
    _library = torch.library.Library("torchvision", "FRAGMENT")
    for name, schema in _SCHEMAS.items():
        if not hasattr(torch.ops.torchvision, name):
            _library.define(schema)
    return True
