"""`ModulesToSave`: a full trainable copy of a module (a classifier head, say), one per adapter.

peft's `modules_to_save`: the original module stays frozen under `original_module`; each adapter that
lists it gets a deep copy under `modules_to_save[<adapter>]`, trained and saved with the adapter. The
forward runs the copy of the first active adapter that has one, else the original. In a mixed batch each row
runs its adapter's copy (or the original), one call per distinct copy on its rows.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from ..errors import LoraError


class ModulesToSave(nn.Module):
    """Wraps `original_module` with per-adapter trainable copies."""

    def __init__(self, original_module: nn.Module) -> None:
        super().__init__()
        self.original_module = original_module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapters: list[str] = []
        self.disabled = False
        self._current: str | None = None  # the adapter whose copy runs; None runs the original
        self._owner = "modules_to_save"  # the module's name in the model, for messages (set with the row adapters)
        self._row_groups: list[tuple[str | None, torch.Tensor]] | None = None  # mixed batch: (copy, its rows)

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
        self._update_current()

    def set_disabled(self, disabled: bool) -> None:
        self.disabled = disabled
        self._update_current()

    def _update_current(self) -> None:
        use_copy = self.active_adapters and not self.disabled
        self._current = self.active_adapters[0] if use_copy else None

    def set_row_adapters(self, owner: str, row_adapters: list[str] | None) -> None:
        """Run row i with adapter `row_adapters[i]`'s copy (the original if it has none); None ends that."""
        self._owner = owner
        if row_adapters is None:
            self._row_groups = None
            return
        groups: dict[str | None, list[int]] = {}
        for row, name in enumerate(row_adapters):
            groups.setdefault(name if name in self.modules_to_save else None, []).append(row)
        self._row_groups = [(name, torch.tensor(rows)) for name, rows in groups.items()]

    def _mixed_forward(self, groups: list[tuple[str | None, torch.Tensor]], x: Any, *args: Any, **kwargs: Any) -> Any:
        rows = sum(len(index) for _, index in groups)
        if not isinstance(x, torch.Tensor) or x.ndim == 0 or x.shape[0] != rows:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise LoraError(f"{self._owner}: a mixed batch of {rows} rows got an input of shape {shape}")
        out = None
        for name, index in groups:
            index = index.to(x.device)
            module = self.original_module if name is None else self.modules_to_save[name]
            part = module(x.index_select(0, index), *args, **kwargs)
            if not isinstance(part, torch.Tensor):
                raise LoraError(f"{self._owner}: a mixed batch needs a module that returns a tensor")
            if out is None:
                out = part.new_empty((rows, *part.shape[1:]))
            out.index_copy_(0, index, part)
        return out

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self._row_groups is not None:
            return self._mixed_forward(self._row_groups, *args, **kwargs)
        if self._current is None:
            return self.original_module(*args, **kwargs)
        return self.modules_to_save[self._current](*args, **kwargs)
