"""A meta-device start: a model built without memory gets its base weights from a safetensors checkpoint.

For a model too big to build in memory first (each rank of an FSDP2 job holds a shard of it):

1. build it on the meta device (`with torch.device("meta"):`);
2. `lorakit.get_lora_model`: the adapters are made and initialised for real, on the CPU, drawing from the random
   generator exactly as a conversion of a built model does (their size is the adapter's, not the model's);
3. shard it (`fully_shard`), or not;
4. `lorakit.materialize(model, checkpoint)`: every tensor on the meta device gets memory on `device` and its value
   from the checkpoint, each rank writing only its shard; the adapters keep their values.

A checkpoint key is a parameter's name in the unconverted model: `q_proj.base_layer.weight` reads `q_proj.weight`,
and the `modules_to_save` copies of `lm_head` (with its `original_module`) read `lm_head.weight`. Buffers that a
module computes when built and no checkpoint holds (rotary `inv_freq`) are computed again by a transformers model's
own initialisation; other models must build those buffers off the meta device.
"""

from __future__ import annotations

import copy
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from ..distributed import is_sharded, write_full
from ..errors import LoraError
from .files import as_path
from .readers import FLOAT_DTYPES, TensorFile, quoted_list, read_json_object

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
# the wrappers lorakit (and checkpointing) puts between a module and its parameters; a checkpoint has none of them
_WRAPPER_SEGMENT = re.compile(r"\.(base_layer|original_module|modules_to_save\.[^.]+|_checkpoint_wrapped_module)(?=\.)")


class Owner(NamedTuple):
    """One name of a parameter or buffer (a tied tensor has several)."""

    name: str  # in the model
    module: nn.Module  # the module that holds it
    tensor: torch.Tensor
    attribute: str  # its name in `module`
    is_buffer: bool


def checkpoint_key(name: str) -> str:
    """The key in an unconverted model's checkpoint of the converted model's tensor `name`."""
    return _WRAPPER_SEGMENT.sub("", f".{name}")[1:]


class Entry(NamedTuple):
    """A checkpoint tensor, from its file's header."""

    path: Path
    shape: tuple[int, ...]
    dtype: str


def checkpoint_entries(checkpoint: Path) -> dict[str, Entry]:
    """`{tensor key: Entry}` of a `.safetensors` file, or of a directory holding `model.safetensors` or a sharded
    `model.safetensors.index.json`: headers only, every file checked."""
    if checkpoint.is_file():
        files = [checkpoint]
    elif (checkpoint / INDEX_NAME).is_file():
        index = read_json_object(checkpoint / INDEX_NAME)
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise LoraError(f"{checkpoint / INDEX_NAME}: 'weight_map' must be an object of tensor name → file name")
        names = sorted(set(weight_map.values()))
        bad = [name for name in names if Path(name).name != name or not name.endswith(".safetensors")]
        if bad:
            raise LoraError(f"{checkpoint / INDEX_NAME} names {bad[0]!r}, not a .safetensors file in that directory")
        missing = [name for name in names if not (checkpoint / name).is_file()]
        if missing:
            raise LoraError(f"{checkpoint / INDEX_NAME} names {quoted_list(missing)}, missing in {checkpoint}")
        files = [checkpoint / name for name in names]
    elif (checkpoint / SINGLE_NAME).is_file():
        files = [checkpoint / SINGLE_NAME]
    else:
        raise LoraError(
            f"{checkpoint} is neither a .safetensors file nor a directory with {SINGLE_NAME} or {INDEX_NAME}"
        )
    entries: dict[str, Entry] = {}
    for path in files:
        if path.suffix != ".safetensors":
            raise LoraError(f"{path} is not a .safetensors file (base weights are never unpickled)")
        with TensorFile(path) as weights:
            for key, shape in weights.shapes.items():
                if key in entries:
                    raise LoraError(f"tensor {key!r} is in both {entries[key].path.name} and {path.name}")
                entries[key] = Entry(path, shape, weights.dtypes[key])
    return entries


def materialize(
    model: nn.Module, checkpoint: str | os.PathLike, device: str | torch.device = "cpu", progress: bool = True
) -> nn.Module:
    """Give every tensor of `model` on the meta device memory on `device` and its value from `checkpoint` (a
    `.safetensors` file, or a directory with `model.safetensors` or a sharded index), in place; returns `model`.

    Sharded parameters (FSDP2's `DTensor`s) get their rank's shard of the checkpoint's tensor, with no
    communication: every rank reads the same files, one tensor at a time. Tensors not on the meta device (the
    adapters, buffers built for real) keep their values and move to `device`; tied parameters stay tied. Keys of
    the checkpoint that no meta tensor reads are ignored.

    Everything is checked before any memory is given: a meta tensor whose key the checkpoint lacks, a shape that
    differs, or a non-float tensor for a float parameter is a `LoraError` naming it, and the model is left as it was.
    """
    if not isinstance(model, nn.Module):
        raise LoraError(f"expected a torch.nn.Module, got {type(model).__name__}")
    checkpoint = as_path(checkpoint, "checkpoint")
    device = torch.device(device)
    owners = _tensor_owners(model)
    on_meta = [names for names in owners.values() if names[0].tensor.is_meta]
    if not on_meta:
        raise LoraError(
            f"no parameter or buffer of {type(model).__name__} is on the meta device; nothing to materialize"
        )
    plan = _plan(model, on_meta, checkpoint_entries(checkpoint), checkpoint)

    _give_memory(model, device, owners)
    bar = _progress_bar(len(plan.from_checkpoint), progress, f"materialize from {checkpoint.name}")
    with torch.no_grad():
        for name, value in plan.computed.items():
            _tensor_named(model, name).copy_(value)
        by_file: dict[Path, list[tuple[str, str]]] = {}
        for name, key, entry in plan.from_checkpoint:
            by_file.setdefault(entry.path, []).append((name, key))
        for path, items in by_file.items():  # each file opened once
            with TensorFile(path) as weights:
                for name, key in items:
                    target = _tensor_named(model, name)
                    write_full(target, weights.tensor(key).to(target.dtype))
                    bar.update()
    bar.close()
    left = sorted(names[0].name for names in _tensor_owners(model).values() if names[0].tensor.is_meta)
    if left:  # the plan covers every meta tensor: a guard against a silent garbage value all the same
        raise LoraError(f"{quoted_list(left)} are still on the meta device after materialize")
    return model


def _tensor_owners(model: nn.Module) -> dict[int, list[Owner]]:
    """`{id(tensor): [(full name, owning module, tensor, attribute), ...]}` for every parameter and buffer, tied
    ones listed under every name they have."""
    owners: dict[int, list[Owner]] = {}
    for prefix, module in model.named_modules(remove_duplicate=False):
        tensors = [(attribute, tensor, False) for attribute, tensor in module.named_parameters(recurse=False)]
        tensors += [(attribute, tensor, True) for attribute, tensor in module.named_buffers(recurse=False)]
        for attribute, tensor, is_buffer in tensors:
            name = f"{prefix}.{attribute}" if prefix else attribute
            owners.setdefault(id(tensor), []).append(Owner(name, module, tensor, attribute, is_buffer))
    return owners


class Plan(NamedTuple):
    """Where each meta tensor's value comes from."""

    from_checkpoint: list[tuple[str, str, Entry]]  # (the tensor's name, its checkpoint key, that key's entry)
    computed: dict[str, torch.Tensor]  # buffer name → its value, computed by the model's own initialisation


def _plan(model: nn.Module, on_meta: list[list[Owner]], entries: dict[str, Entry], checkpoint: Path) -> Plan:
    """A value for every meta tensor: its checkpoint entry, or (a buffer the checkpoint lacks) computed by the model's
    code; a `LoraError` naming every problem."""
    plan, uncomputed, missing, problems = Plan([], {}), [], [], []
    for names in on_meta:
        keys = [checkpoint_key(owner.name) for owner in names]
        key = next((key for key in keys if key in entries), None)
        name, tensor = names[0].name, names[0].tensor
        if key is None:
            (uncomputed if names[0].is_buffer else missing).append(names[0])
            continue
        shape, dtype = entries[key].shape, entries[key].dtype
        if shape != tuple(tensor.shape):
            problems.append(f"{key!r} has shape {list(shape)}, {name!r} is {list(tensor.shape)}")
        elif tensor.dtype.is_floating_point and dtype not in FLOAT_DTYPES:
            problems.append(f"{key!r} has dtype {dtype}, {name!r} is {tensor.dtype}")
        plan.from_checkpoint.append((name, key, entries[key]))
    if uncomputed:
        plan.computed.update(_computed_buffers(model, uncomputed))
        missing += [owner for owner in uncomputed if owner[0] not in plan.computed]
    if missing:
        lacking = [f"{checkpoint_key(owner.name)!r}{' (a buffer)' * owner.is_buffer}" for owner in missing]
        shown = ", ".join(lacking[:10]) + (f", … ({len(lacking)} in all)" if len(lacking) > 10 else "")
        problems.insert(0, f"it lacks [{shown}], which would be left on the meta device")
        if any(owner.is_buffer for owner in missing):
            problems.append(
                "a buffer that a module computes when built, in no checkpoint, is computed again only by a "
                "transformers model's own initialisation (_init_weights): build other models with their buffers off "
                "the meta device"
            )
    if problems:
        raise LoraError(f"cannot materialize from {checkpoint}: " + "; ".join(problems) + "; nothing was changed")
    return plan


def _computed_buffers(model: nn.Module, buffers: list[Owner]) -> dict[str, torch.Tensor]:
    """Values of meta `buffers` (rotary `inv_freq`, say) that the nearest transformers model around their module
    computes with its `_init_weights`, run on an empty copy of that module whose buffers start as a sentinel: a
    buffer that keeps the sentinel was not computed and is left out."""
    computed: dict[str, torch.Tensor] = {}
    by_module: dict[str, tuple[nn.Module, list[str]]] = {}
    for owner in buffers:
        by_module.setdefault(owner.name.rpartition(".")[0], (owner.module, []))[1].append(owner.attribute)
    for prefix, (module, attributes) in by_module.items():
        init = _init_weights_around(model, prefix)
        if init is None or not all(p.is_meta for p in module.parameters(recurse=False)):
            continue
        twin = copy.deepcopy(module).to_empty(device="cpu")
        for buffer in twin.buffers(recurse=False):
            buffer.fill_(_sentinel(buffer.dtype))
        with torch.no_grad():
            init(twin)
        for attribute in attributes:
            value = twin.get_buffer(attribute)
            if value.numel() and not bool((value == _sentinel(value.dtype)).any() | value.isnan().any()):
                computed[f"{prefix}.{attribute}" if prefix else attribute] = value
    return computed


def _init_weights_around(model: nn.Module, prefix: str) -> Callable[[nn.Module], None] | None:
    """`_init_weights` of the innermost transformers model on the path to module `prefix` (a class attribute, so
    lorakit's wrappers, which pass unknown attributes to the module they wrap, are not mistaken for one)."""
    parts = prefix.split(".") if prefix else []
    path = [model] + [model.get_submodule(".".join(parts[: i + 1])) for i in range(len(parts))]
    inits = [module._init_weights for module in path if callable(getattr(type(module), "_init_weights", None))]
    return inits[-1] if inits else None


def _sentinel(dtype: torch.dtype) -> float | int | bool:
    """A value no computed buffer holds: NaN, or the smallest integer."""
    if dtype.is_floating_point or dtype.is_complex:
        return float("nan")
    return False if dtype == torch.bool else torch.iinfo(dtype).min


def _give_memory(model: nn.Module, device: torch.device, owners: dict[int, list[Owner]]) -> None:
    """Uninitialised memory on `device` for every meta tensor, the others moved there (sharded ones stay on their
    mesh's device); then every tied name points at one tensor again (`nn.Module._apply` makes one per name)."""

    def moved(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.is_meta:
            return torch.empty_like(tensor, device=device)
        return tensor if is_sharded(tensor) else tensor.to(device)

    model._apply(moved)  # FSDP2 modules re-register their shards in their own `_apply`
    for names in owners.values():
        if len(names) > 1:
            kept = getattr(names[0].module, names[0].attribute)
            for owner in names[1:]:
                setattr(owner.module, owner.attribute, kept)  # a registered name: the parameter or buffer is replaced


def _tensor_named(model: nn.Module, name: str) -> torch.Tensor:
    module_name, _, attribute = name.rpartition(".")
    return getattr(model.get_submodule(module_name), attribute)


def _progress_bar(total: int, shown: bool, description: str) -> Any:
    """A tqdm bar on rank 0's terminal when tqdm is installed, else one that shows nothing."""
    import torch.distributed as dist

    rank0 = not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, desc=description, unit="tensor", disable=not (shown and rank0 and sys.stderr.isatty()))


class _NoBar:
    def update(self) -> None:
        pass

    def close(self) -> None:
        pass
