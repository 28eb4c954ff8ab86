"""The errors lorakit raises. Every one derives from :class:`LoraError`."""

from __future__ import annotations


class LoraError(Exception):
    """Base class of every error lorakit raises on bad input or an impossible request."""


class LoraConfigError(LoraError, ValueError):
    """A `LoraConfig` field holds a value lorakit cannot use."""


class TargetError(LoraError, ValueError):
    """`target_modules` matched nothing, or matched a module lorakit cannot adapt."""


class AdapterError(LoraError, KeyError):
    """An adapter name is unknown, taken, or in a state that forbids the request."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class MergeError(LoraError, RuntimeError):
    """An adapter cannot be merged into, or unmerged from, the base weights."""
