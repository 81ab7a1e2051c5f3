"""Modules: learnable state (projections, feature maps, routers, pooling) around the functional forms.

Grouped by catalog family, one subpackage each; every public name is also re-exported here, so
``attnzoo.nn.NeighborhoodAttention2D`` and ``attnzoo.nn.local.NeighborhoodAttention2D`` are the
same class:

* :mod:`~attnzoo.nn.mha`: :class:`MultiheadAttention` (any registered mechanism inside) and
  :class:`ShortConvolution`;
* :mod:`~attnzoo.nn.linear`, :mod:`~attnzoo.nn.local`, :mod:`~attnzoo.nn.sparse`,
  :mod:`~attnzoo.nn.variants`: the layers of the F, L, S and V families;
* :mod:`~attnzoo.nn.heads`: multi-head variants (H); :mod:`~attnzoo.nn.cross`: cross-attention
  and read-out heads (X);
* :mod:`~attnzoo.nn.vision`: vision token mixers on ``(B, H, W, C)`` (M);
  :mod:`~attnzoo.nn.cnn`: CNN attention blocks on ``(B, C, H, W)`` (C) and ``create_attn``.

Modules that implement a catalog entry register themselves (:func:`register_module`) with a
standard size; :func:`list_modules` lists them, ``attnzoo list --modules`` prints them and
``attnzoo bench modules`` times each.
"""

from . import cnn, cross, heads, linear, local, sparse, variants, vision
from ._registry import ModuleEntry, ModuleExample, get_module, list_modules, register_module
from .cnn import *  # noqa: F403
from .cross import *  # noqa: F403
from .heads import *  # noqa: F403
from .linear import *  # noqa: F403
from .local import *  # noqa: F403
from .mha import MultiheadAttention, ShortConvolution
from .sparse import *  # noqa: F403
from .variants import *  # noqa: F403
from .vision import *  # noqa: F403

__all__ = [
    "MultiheadAttention",
    "ShortConvolution",
    "ModuleEntry",
    "ModuleExample",
    "register_module",
    "list_modules",
    "get_module",
    *cnn.__all__,
    *cross.__all__,
    *heads.__all__,
    *linear.__all__,
    *local.__all__,
    *sparse.__all__,
    *variants.__all__,
    *vision.__all__,
]
