"""Integrations with other libraries: ``attnzoo.integrations.timm``, ``attnzoo.integrations.transformers``.

Each submodule imports its library on first use of the submodule only, so ``import attnzoo``
never needs timm or transformers (install the ``timm`` / ``hf`` extras for them).
"""
