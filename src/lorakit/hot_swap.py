"""Hot swapping: another adapter's weights into an existing adapter's tensors, in place.

Nothing a compiled graph depends on changes (modules, shapes, Python numbers), so a `torch.compile`d model
serves the new adapter without recompiling; the same in-place copy restores a `Trainer` checkpoint into the
parameters an optimizer already holds.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .config import LoraConfig, lora_scaling
from .distributed import write_full
from .errors import AdapterError, LoraError
from .formats.files import as_path
from .formats.peft import adapter_parameters, plan_from_file, read_adapter_config
from .formats.readers import CONFIG_NAME, match_keys_and_shapes, open_weights, quoted_list, resolve_adapter_dir
from .layers import LoraLayer
from .layers.init_schemes import changes_base
from .model import lora_state


def hot_swap_adapter(model: nn.Module, path: str | os.PathLike, adapter_name: str = "default") -> nn.Module:
    """Load another adapter's weights into adapter `adapter_name`'s existing tensors, in place; return `model`.

    The new adapter (a peft-format directory, as for `load_adapter`) must target the same modules. Its rank
    may be smaller than the slot's: A's extra rows and B's extra columns are zeroed, which adds exactly
    nothing. Its scaling s' is folded into B (`B_slot = (s' / s) · B'`), so the slot's rank, alpha and
    scaling stay as they are. Because no module, shape or Python number changes, a `torch.compile`d model
    serves the new adapter without recompiling. The slot keeps its dropout; training state is not touched.

    Raises `LoraError` (nothing changed) for different targets, a larger rank, a mismatch in `lora_bias`,
    `bias` or `modules_to_save`, a merged or stacked (mixed batch) slot, and anything `load_adapter` refuses.
    """
    state = lora_state(model)
    slot_config = state.configs.get(adapter_name)
    if slot_config is None:
        raise AdapterError(f"unknown adapter {adapter_name!r}; this model has {sorted(state.configs)}")
    directory = resolve_adapter_dir(path)
    layers = {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer) and adapter_name in m.r}
    with open_weights(directory) as weights:
        config, targets = plan_from_file(model, read_adapter_config(directory), weights, directory)
        _check_swappable(directory, config, slot_config, adapter_name, layers, {t.name for t in targets})
        params = adapter_parameters(model, adapter_name)
        placements = {key: _Placement(tuple(param.shape)) for key, param in params.items()}
        for target in targets:
            layer, rank = layers[target.name], target.r
            slot_rank = layer.r[adapter_name]
            if rank > slot_rank:
                raise LoraError(f"{directory}: {target.name!r} has rank {rank}, larger than the slot's {slot_rank}")
            scaling = lora_scaling(target.lora_alpha, rank, config.use_rslora)
            for key, (axis, scaled) in layer.rank_layout(adapter_name).items():
                placement = placements[f"{target.name}.{key}"]
                placement.factor = scaling / layer.scaling[adapter_name] if scaled else 1.0
                if axis is None or rank == slot_rank:
                    continue
                if placement.shape[axis] != slot_rank:  # e.g. a grouped conv's B, (out, r/groups, 1, 1)
                    raise LoraError(
                        f"{directory}: {target.name!r} has rank {rank}; its slot of rank {slot_rank} cannot pad it"
                    )
                placement.axis, placement.shape = axis, (*placement.shape[:axis], rank, *placement.shape[axis + 1 :])
        file_keys = match_keys_and_shapes(weights, {k: p.shape for k, p in placements.items()}, {}, directory)
        tensors = {key: weights.tensor(file_keys[key]) for key in params}
    with torch.no_grad():
        for key, param in params.items():
            placement = placements[key]
            value = tensors[key].to(dtype=param.dtype) * placement.factor
            if placement.axis is not None:  # zero-padded to the slot's rank
                padded = value.new_zeros(param.shape)
                padded.narrow(placement.axis, 0, placement.shape[placement.axis]).copy_(value)
                value = padded
            write_full(param, value)  # into this rank's shard if the model is sharded (FSDP2)
    return model


def load_pretrained_weights(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Put the weights of every adapter of `model` back from a directory `save_pretrained` wrote (a `Trainer`
    checkpoint, say), in place: the same parameter objects, so an optimizer holding them keeps working.
    Adapter `"default"` comes from `directory`, any other from `directory/<name>/`; each must match its slot
    as `hot_swap_adapter` requires. Returns `model`."""
    directory = as_path(directory, "directory")
    for name in lora_state(model).configs:
        source = directory if name == "default" else directory / name
        if not (source / CONFIG_NAME).is_file():
            raise LoraError(f"{directory} holds no adapter {name!r} (looked for {source / CONFIG_NAME})")
        hot_swap_adapter(model, source, name)
    return model


@dataclass
class _Placement:
    """Where a file tensor of `shape` goes in a slot parameter: its first entries along `axis` (all of it if
    None), times `factor`."""

    shape: tuple[int, ...]
    axis: int | None = None
    factor: float = 1.0


def _check_swappable(
    directory: Path, config: LoraConfig, slot_config: LoraConfig, adapter_name: str, layers: dict[str, LoraLayer],
    targets: set[str],
) -> None:  # fmt: skip
    for name, layer in layers.items():
        if adapter_name in layer.merged_adapters or layer.adapter_stack is not None:
            raise LoraError(f"hot_swap_adapter: {adapter_name!r} is merged or in a mixed batch in {name!r}")
    for which, init in (("the file's", config.init_lora_weights), ("the slot's", slot_config.init_lora_weights)):
        if changes_base(init):
            raise LoraError(
                f"hot_swap_adapter: {which} adapter was initialised with {init!r}, which takes its start out of the "
                "base weights, so its weights alone do not say what it computes; swap a plain LoRA (save PiSSA/OLoRA "
                "adapters with convert_to_lora=True)"
            )
    if targets != set(layers):
        raise LoraError(
            f"{directory} targets other modules than adapter {adapter_name!r}: only in the file "
            f"{quoted_list(sorted(targets - set(layers)))}, "
            f"only in the slot {quoted_list(sorted(set(layers) - targets))}"
        )
    for field_name in ("lora_bias", "bias", "modules_to_save"):
        new, old = getattr(config, field_name), getattr(slot_config, field_name)
        if new != old:
            raise LoraError(
                f"{directory} has {field_name}={new!r} but adapter {adapter_name!r} has {old!r}; "
                "a hot swap needs the same"
            )
