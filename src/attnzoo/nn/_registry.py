"""The registry of modules: every ``attnzoo.nn`` layer with its catalog ids and a standard size.

Mechanisms are registered functions (:mod:`attnzoo.registry`); many catalog entries are layers
instead (vision token mixers, CNN attention blocks, head variants). They register here, so
``attnzoo list`` counts them, ``attnzoo bench modules`` times every one at its standard size, and
the module suite (``tests/unit/test_module_registry.py``) checks every one for shape, dtype,
gradient flow and bad input without per-module code::

    @register_module(
        "C1", paper="ECA-Net (Wang et al., CVPR 2020)", layout="(B, C, H, W)",
        example=ModuleExample(dict(channels=64), inputs=[(8, 64, 56, 56)], test_inputs=[(2, 64, 7, 7)]),
    )
    class EfficientChannelAttention(nn.Module): ...

``example.kwargs`` builds the module; ``inputs`` are the bench's input shapes (a standard size of
the module's field), ``test_inputs`` small shapes for the unit suite (with ``test_kwargs`` merged
over ``kwargs``). ``output`` says how the
output's shape relates to the first input: ``"same"`` (a token mixer), or a callable from the input
shapes to the output shape.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence, Union

from torch import nn

from ..errors import ParameterError

__all__ = ["ModuleExample", "ModuleEntry", "register_module", "list_modules", "get_module"]

Shape = tuple[int, ...]


@dataclass(frozen=True)
class ModuleExample:
    """How to build and feed a module: constructor kwargs and input shapes (bench size, test size)."""

    kwargs: dict[str, Any]
    inputs: Sequence[Shape]
    test_inputs: Optional[Sequence[Shape]] = None
    #: Constructor kwargs changed for the test size (e.g. a smaller ``dim``), merged over ``kwargs``.
    test_kwargs: dict[str, Any] = field(default_factory=dict)
    #: ``"same"``: the output has the first input's shape; else a function of the input shapes.
    output: Union[str, Callable[[Sequence[Shape]], Shape]] = "same"
    #: Parameters that legitimately get no gradient in this configuration (e.g. a branch switched off).
    no_grad: tuple[str, ...] = ()

    def shapes(self, size: str) -> list[Shape]:
        """Input shapes for ``size`` ``"bench"`` or ``"test"`` (test falls back to bench)."""
        if size == "test" and self.test_inputs is not None:
            return [tuple(s) for s in self.test_inputs]
        return [tuple(s) for s in self.inputs]

    def build_kwargs(self, size: str) -> dict[str, Any]:
        return {**self.kwargs, **self.test_kwargs} if size == "test" else dict(self.kwargs)

    def output_shape(self, shapes: Sequence[Shape]) -> Shape:
        return tuple(shapes[0]) if self.output == "same" else tuple(self.output(shapes))


@dataclass(frozen=True)
class ModuleEntry:
    """One registered module class."""

    name: str
    cls: type
    catalog: tuple[str, ...]
    family: str
    paper: str
    layout: str
    example: Optional[ModuleExample] = None
    summary: str = field(default="")

    @property
    def has_from_timm(self) -> bool:
        return callable(getattr(self.cls, "from_timm", None))

    def build(self, size: str = "bench", **overrides: Any) -> nn.Module:
        """The module at its ``"bench"`` (standard) or ``"test"`` (small) size."""
        if self.example is None:
            raise ParameterError(f"module {self.name!r} declares no example size")
        return self.cls(**{**self.example.build_kwargs(size), **overrides})


_MODULES: dict[str, ModuleEntry] = {}


def _family_of(cls: type) -> str:
    # attnzoo.nn.<family>.<file>: the subpackage names the family; top-level files are "core"
    parts = cls.__module__.split(".")
    return parts[2] if len(parts) > 3 else "core"


def register_module(
    *catalog: str,
    paper: str,
    layout: str,
    example: Optional[ModuleExample] = None,
    name: Optional[str] = None,
) -> Callable[[type], type]:
    """Class decorator: register ``cls`` under its class name with its catalog ids.

    ``catalog`` may be empty for a layer the catalog does not list (e.g. differential attention,
    which issue 15 adds beside V1-V10).
    """
    def wrap(cls: type) -> type:
        key = name or cls.__name__
        if key in _MODULES and _MODULES[key].cls is not cls:
            raise ParameterError(f"module {key!r} is already registered by {_MODULES[key].cls.__module__}")
        doc = (cls.__doc__ or "").strip().splitlines()
        _MODULES[key] = ModuleEntry(
            name=key,
            cls=cls,
            catalog=tuple(catalog),
            family=_family_of(cls),
            paper=paper,
            layout=layout,
            example=example,
            summary=doc[0].rstrip(".") if doc else "",
        )
        return cls

    return wrap


def list_modules(family: Optional[str] = None) -> list[ModuleEntry]:
    """Registered modules (all, or one family), ordered by family then name."""
    entries = [e for e in _MODULES.values() if family is None or e.family == family]
    return sorted(entries, key=lambda e: (e.family, e.name))


def get_module(name: str) -> ModuleEntry:
    list_modules()
    try:
        return _MODULES[name]
    except KeyError:
        raise ParameterError(f"no module named {name!r}; `attnzoo list --modules` prints them") from None
