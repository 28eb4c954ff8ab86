"""`ModulesToSave`: a full trainable copy of a module (a classifier head, say), one per adapter.

peft's `modules_to_save`: the original module stays frozen under `original_module`; each adapter that
lists it gets a deep copy under `modules_to_save[<adapter>]`, trained and saved with the adapter. The
forward runs the copy of the first active adapter that has one, else the original.
"""

from __future__ import annotations

import copy
from typing import Any

from torch import nn


class ModulesToSave(nn.Module):
    """Wraps `original_module` with per-adapter trainable copies."""

    def __init__(self, original_module: nn.Module) -> None:
        super().__init__()
        self.original_module = original_module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapters: list[str] = []
        self.disabled = False
        self._current: str | None = None  # the adapter whose copy runs; None runs the original

    def __getattr__(self, name: str) -> Any:
        # Code written for the wrapped module (`layer.weight`, `layer.in_features`) keeps working.
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "original_module":
                raise
            return getattr(self.original_module, name)

    @property
    def adapter_names(self) -> list[str]:
        return list(self.modules_to_save)

    def add_adapter(self, name: str) -> None:
        copied = copy.deepcopy(self.original_module)
        for param in copied.parameters():
            param.requires_grad_(True)
        self.modules_to_save[name] = copied

    def delete_adapter(self, name: str) -> None:
        if name in self.modules_to_save:
            del self.modules_to_save[name]
        self.set_active([a for a in self.active_adapters if a != name])

    def adapter_parameters(self, name: str) -> dict[str, nn.Parameter]:
        """The copy's parameters, keyed by their names inside the module (peft's saved key suffixes)."""
        if name not in self.modules_to_save:
            return {}
        return dict(self.modules_to_save[name].named_parameters())

    def set_active(self, names: list[str]) -> None:
        self.active_adapters = [n for n in names if n in self.modules_to_save]
        self._refresh()

    def set_disabled(self, disabled: bool) -> None:
        self.disabled = disabled
        self._refresh()

    def _refresh(self) -> None:
        use_copy = self.active_adapters and not self.disabled
        self._current = self.active_adapters[0] if use_copy else None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self._current is None:
            return self.original_module(*args, **kwargs)
        return self.modules_to_save[self._current](*args, **kwargs)
