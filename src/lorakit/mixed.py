"""Mixed batches: every row of a batch runs its own adapter, in one forward (docs/design.md §6).

Inside `with mixed_batch(model, names):` each LoRA layer holds the adapters named in `names` stacked
(`AdapterStack`: `A_cat (Σr × in)`, `B_cat (out × Σr)` with the scalings folded in) and a one-hot weight per
row, so one pair of GEMMs serves every adapter: `y = base(x) + ((x @ A_cat.T) ⊙ S) @ B_cat.T`, where row i
of `S` is 1 on the columns of adapter `names[i]` and 0 elsewhere (all 0 for `"__base__"`). A row's result
equals running its adapter alone, to float rounding; rows of an adapter that does not target a layer get
the base output there, as they would alone.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from .errors import AdapterError, LoraError, MergeError
from .layers import LoraLayer
from .layers.modules_to_save import ModulesToSave
from .model import BASE_ADAPTER_NAME, lora_state

__all__ = ["BASE_ADAPTER_NAME", "mixed_batch"]


@contextmanager
def mixed_batch(model: nn.Module, adapter_names: Sequence[str]) -> Iterator[nn.Module]:
    """Inside the `with` block, row i of every batch the model runs uses adapter `adapter_names[i]`.

    `"__base__"` runs a row on the base model. Works for `forward` and `generate()` (with the KV cache) as
    long as the batch keeps `len(adapter_names)` rows; inference only (the model must be in eval mode).
    Adapters may differ in rank, alpha and targets, whichever adapters are active. A `modules_to_save` copy
    runs on the rows of its adapter.

    Raises `LoraError` for an unknown name, a model in training mode, merged or disabled adapters, a
    nested mixed batch, and (at forward time) a batch whose row count differs from `len(adapter_names)`.
    """
    state = lora_state(model)
    if isinstance(adapter_names, str) or not isinstance(adapter_names, Sequence):
        raise LoraError(f"mixed_batch needs a list of adapter names, one per row; got {adapter_names!r}")
    rows = list(adapter_names)
    if not rows:
        raise LoraError("mixed_batch needs at least one adapter name (one per row of the batch)")
    for name in rows:
        if name != BASE_ADAPTER_NAME and name not in state.configs:
            raise AdapterError(
                f"mixed_batch: unknown adapter {name!r}; this model has {sorted(state.configs)} "
                f"(and {BASE_ADAPTER_NAME!r} for no adapter)"
            )
    if model.training:
        raise LoraError("mixed_batch runs in eval mode only; call model.eval() first")
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, LoraLayer)]
    saved = [(name, m) for name, m in model.named_modules() if isinstance(m, ModulesToSave)]
    for name, layer in layers:
        if layer.merged_adapters:
            raise MergeError(f"mixed_batch: {name!r} has merged adapters {layer.merged_adapters}; unmerge first")
        if layer.disabled:
            raise LoraError("mixed_batch: adapters are disabled (inside disable_adapters)")
        if layer.adapter_stack is not None:
            raise LoraError(f"mixed_batch: {name!r} already runs a mixed batch or X-LoRA; they do not nest")

    slots = list(dict.fromkeys(name for name in rows if name != BASE_ADAPTER_NAME))
    gates = torch.zeros(len(rows), len(slots))
    for row, name in enumerate(rows):
        if name != BASE_ADAPTER_NAME:
            gates[row, slots.index(name)] = 1.0
    try:
        for name, layer in layers:
            layer.stack(name, slots, one_per_row=True)
            layer.set_stack_gates(gates)
        for name, module in saved:
            module.set_row_adapters(name, rows)
        yield model
    finally:
        for _, layer in layers:
            layer.unstack()
        for name, module in saved:
            module.set_row_adapters(name, None)
