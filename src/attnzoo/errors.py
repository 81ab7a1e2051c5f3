"""The library's exceptions: one family, each naming the argument at fault.

Every error raised for bad input derives from :class:`AttnZooError` and from the built-in
exception a Python user would expect (``ValueError`` for a bad value, ``TypeError`` for a bad
dtype), so ``except ValueError`` keeps working in code that does not know attnzoo.
"""

from __future__ import annotations

__all__ = [
    "AttnZooError",
    "ShapeError",
    "DTypeError",
    "DeviceError",
    "ParameterError",
    "NonFiniteError",
    "UnknownMechanismError",
    "NoBackendError",
]


class AttnZooError(Exception):
    """Base class of every attnzoo error.

    ``argument`` names the argument at fault when there is one (``"q"``, ``"kernel_size"``).
    """

    def __init__(self, message: str, *, argument: str | None = None):
        super().__init__(message)
        self.argument = argument


class ShapeError(AttnZooError, ValueError):
    """A tensor's rank or sizes do not fit (wrong rank, head counts, lengths, head dims)."""


class DTypeError(AttnZooError, TypeError):
    """A tensor has a dtype the call cannot take, or the inputs' dtypes differ."""


class DeviceError(AttnZooError, ValueError):
    """The inputs live on different devices."""


class ParameterError(AttnZooError, ValueError):
    """A mechanism parameter is unknown, of the wrong type, or out of range."""


class NonFiniteError(AttnZooError, ValueError):
    """An input holds NaN or infinity and it reached the output."""


class UnknownMechanismError(AttnZooError, LookupError):
    """No mechanism (or backend) is registered under the given name."""

    def __str__(self) -> str:  # LookupError would quote the message like a key
        return str(self.args[0])


class NoBackendError(AttnZooError, RuntimeError):
    """No backend of the mechanism accepts these inputs; the message lists each one's reason."""
