"""Integrations with other libraries: ``attnzoo.integrations.timm``, ``attnzoo.integrations.transformers``.

Each submodule imports its library on first use of the submodule only, so ``import attnzoo``
never needs timm or transformers (install the ``timm`` / ``hf`` extras for them).
"""

from ._torchvision import ensure_importable as _ensure_torchvision_importable

# Both hosts may import torchvision (timm always, transformers for some models); its CUDA-built
# PyPI wheel fails at import beside a CPU torch unless this runs first. Imports nothing heavy.
_ensure_torchvision_importable()
