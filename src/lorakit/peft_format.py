"""HuggingFace peft's adapter format (design §4): key names, `adapter_config.json`, save and load.

A directory holds `adapter_config.json` (peft's fields, `"peft_type": "LORA"`) and
`adapter_model.safetensors` (metadata `{"format": "pt"}`). A tensor of the adapter on the module at path
`P` is stored as `base_model.model.P.<suffix>`, the suffix being the parameter's name inside the LoRA
layer with the adapter name taken out: `lora_A.weight`, `lora_B.weight`, `lora_B.bias` (lora_bias),
`lora_embedding_A`, `lora_embedding_B`. A `modules_to_save` copy's parameters are stored as
`base_model.model.P.<param>`, and with `bias="all"` or `"lora_only"` the trained biases under their model
paths (`P.base_layer.bias` inside a LoRA layer).

Files are untrusted input: nothing is unpickled (`.bin` files go through `torch.load(weights_only=True)`),
every key, shape and dtype is checked against the model before any tensor is copied, and every failure is
a `LoraError` that leaves the model as it was.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._files import as_path, replace_files
from .config import PEFT_FIELDS_NOT_MODELED, LoraConfig
from .errors import AdapterError, LoraError
from .layers import LoraEmbedding, LoraLayer
from .layers.modules_to_save import ModulesToSave
from .model import (
    add_adapter,
    bias_parameters,
    check_module,
    delete_adapter,
    get_lora_model,
    is_lora_model,
    lora_state,
    unload,
    watch_frozen_load,
)
from .targets import find_targets, resolve_config

PEFT_PREFIX = "base_model.model."
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"

# init schemes that only shape the starting point of A and B: a trained adapter loads like any other.
_WEIGHT_ONLY_INITS = ("eva", "orthogonal")
_MAX_CONFIG_BYTES = 16 << 20


# ----- key names ----------------------------------------------------------------------------------------


def _adapter_parameters(model: nn.Module, adapter_name: str) -> dict[str, nn.Parameter]:
    """The model's parameters of adapter `adapter_name`, keyed by their peft name without the prefix."""
    state = lora_state(model)
    if adapter_name not in state.configs:
        raise AdapterError(f"unknown adapter {adapter_name!r}; this model has {sorted(state.configs)}")
    params: dict[str, nn.Parameter] = {}
    for path, module in model.named_modules():
        if isinstance(module, (LoraLayer, ModulesToSave)):
            for suffix, param in module.adapter_parameters(adapter_name).items():
                params[f"{path}.{suffix}"] = param
    params.update(bias_parameters(model, state.configs[adapter_name].bias))
    return params


def _base_embedding_parameters(model: nn.Module, adapter_name: str) -> dict[str, nn.Parameter]:
    """Base weights of the adapter's embedding layers, which peft also saves (`save_embedding_layers`, for
    resized vocabularies). lorakit does not write them, and loads them into the base when a file has them."""
    return {
        f"{path}.base_layer.weight": module.base_layer.weight
        for path, module in model.named_modules()
        if isinstance(module, LoraEmbedding) and adapter_name in module.r
    }


def lora_state_dict(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """Adapter `adapter_name`'s tensors under peft's key names (detached; they share storage)."""
    return {PEFT_PREFIX + key: param.detach() for key, param in _adapter_parameters(model, adapter_name).items()}


# ----- config -------------------------------------------------------------------------------------------


def peft_config_dict(config: LoraConfig, model: nn.Module | None = None) -> dict[str, Any]:
    """`config` as peft writes `adapter_config.json`: every peft field, `inference_mode: true`."""
    fields = config.to_dict()
    fields["inference_mode"] = True
    if model is not None:
        if fields["base_model_name_or_path"] is None:
            fields["base_model_name_or_path"] = getattr(getattr(model, "config", None), "_name_or_path", None) or None
        if fields["task_type"] is None:  # peft records the model class when there is no task type
            fields["auto_mapping"] = {
                "base_model_class": type(model).__name__,
                "parent_library": type(model).__module__,
            }
    off = {name: copy.deepcopy(value) for name, (value, _) in PEFT_FIELDS_NOT_MODELED.items()}
    return dict(sorted({**off, **fields, "peft_type": "LORA"}.items()))


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON object from a regular file of at most 16 MiB, without NaN/Infinity; any problem is a `LoraError`."""
    if not path.is_file():  # also refuses FIFOs and devices, which could block or never end
        raise LoraError(f"{path} is missing or not a regular file")
    try:
        with open(path, "rb") as file:
            raw = file.read(_MAX_CONFIG_BYTES + 1)
    except OSError as error:
        raise LoraError(f"cannot read {path}: {error.strerror or error}") from None
    if len(raw) > _MAX_CONFIG_BYTES:
        raise LoraError(f"{path} is larger than {_MAX_CONFIG_BYTES >> 20} MiB; not an adapter config")
    try:
        data = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        raise LoraError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise LoraError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def read_adapter_config(directory: str | os.PathLike) -> LoraConfig:
    """Parse and validate `adapter_config.json` in `directory`; any problem is a `LoraError`."""
    path = as_path(directory, "directory") / CONFIG_NAME
    data = read_json_object(path)
    peft_type = data.get("peft_type")
    if peft_type != "LORA":
        raise LoraError(f"{path}: peft_type is {peft_type!r}, lorakit loads 'LORA' adapters")
    if data.get("init_lora_weights") in _WEIGHT_ONLY_INITS:
        data["init_lora_weights"] = True
    try:
        return LoraConfig.from_dict(data)
    except LoraError as error:
        raise type(error)(f"{path}: {error}") from None
    except (TypeError, ValueError, re.error) as error:
        raise LoraError(f"{path}: invalid field value: {error}") from None


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not allowed in an adapter config")


# ----- save ---------------------------------------------------------------------------------------------


def adapter_files(
    model: nn.Module, adapter_name: str = "default", state_dict: Mapping[str, torch.Tensor] | None = None
) -> dict[str, bytes]:
    """The bytes of `adapter_config.json` and `adapter_model.safetensors` for adapter `adapter_name`. With
    `state_dict` (keyed as `model.state_dict()`), the tensors come from it instead of the parameters."""
    from safetensors.torch import save as safetensors_bytes

    params = _adapter_parameters(model, adapter_name)
    if state_dict is not None:
        names = {id(param): name for name, param in model.named_parameters(remove_duplicate=False)}
        params = {key: state_dict.get(names.get(id(param), ""), param) for key, param in params.items()}
    tensors = {PEFT_PREFIX + key: value.detach().to("cpu", copy=True).contiguous() for key, value in params.items()}
    config = lora_state(model).configs[adapter_name]
    config_text = json.dumps(peft_config_dict(config, model), indent=2) + "\n"
    return {WEIGHTS_NAME: safetensors_bytes(tensors, metadata={"format": "pt"}), CONFIG_NAME: config_text.encode()}


def save_adapter(model: nn.Module, directory: str | os.PathLike, adapter_name: str = "default") -> Path:
    """Write adapter `adapter_name` to `directory` as peft does: `adapter_config.json` and
    `adapter_model.safetensors`. Each file is replaced atomically; returns the directory's path."""
    directory = as_path(directory, "directory")
    _write(directory, adapter_files(model, adapter_name))
    return directory


def save_pretrained(
    model: nn.Module, directory: str | os.PathLike, adapter_names: Sequence[str] | None = None,
    state_dict: Mapping[str, torch.Tensor] | None = None,
) -> Path:  # fmt: skip
    """Write the model's adapters (or those named) in the layout of peft's `PeftModel.save_pretrained`: adapter
    `"default"` in `directory`, every other one in `directory/<name>/`; an X-LoRA model as
    `save_xlora(layout="peft")`. What a converted transformers model's `save_pretrained` calls. Returns
    `directory`."""
    from .xlora import is_xlora_model

    directory = as_path(directory, "directory")
    if is_xlora_model(model):
        from .xlora_format import save_xlora

        return save_xlora(model, directory, layout="peft")
    state = lora_state(model)
    if adapter_names is None:
        names = list(state.configs)
    else:
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
    for name in names:
        if name not in state.configs:
            raise AdapterError(f"unknown adapter {name!r}; this model has {sorted(state.configs)}")
        if "/" in name or "\\" in name:
            raise AdapterError(f"adapter {name!r} cannot be saved in a directory of its name")
    files = {name: adapter_files(model, name, state_dict) for name in names}  # everything checked before writing
    for name, contents in files.items():
        _write(directory if name == "default" else directory / name, contents)
    return directory


def _write(directory: Path, files: dict[str, bytes]) -> None:
    """`replace_files`, with a path that cannot be a directory (it, or a parent, is a file) a `LoraError`; other
    I/O failures (a full disk) stay `OSError`s."""
    try:
        replace_files(directory, files)
    except (FileExistsError, NotADirectoryError) as error:
        raise LoraError(f"cannot write the adapter to {directory}: {error.strerror or error}") from None


# ----- load ---------------------------------------------------------------------------------------------


def load_adapter(
    model: nn.Module,
    path: str | os.PathLike,
    adapter_name: str = "default",
    trainable: bool = False,
) -> nn.Module:
    """Load a peft-format LoRA adapter from a local directory into `model`; return `model`.

    On a plain model the LoRA layers are created from the saved config and the adapter is made active (as
    `PeftModel.from_pretrained` does); on a LoRA model it is added as another, inactive adapter. Tensors
    go to the base layers' devices, as float32 master weights. `trainable=False` freezes the adapter.
    `path` is an adapter directory, a local hub-cache directory (`models--org--name` with `snapshots/`),
    or a hub id `org/name` already in the local hub cache; nothing is downloaded.

    Raises `LoraError` (nothing changed) for a missing, unexpected, mis-shaped or non-float tensor, a
    corrupt file, or an invalid config.
    """
    directory = resolve_adapter_dir(path)
    config = resolve_config(check_module(model), read_adapter_config(directory), strict=False)
    was_lora = is_lora_model(model)
    requires_grad = [(p, p.requires_grad) for p in model.parameters()]
    children = [(parent, name, child) for parent in model.modules() for name, child in parent._modules.items()]
    added = False
    with open_weights(directory) as weights:
        _check_ranks(model, config, weights, directory)
        try:
            if was_lora:
                add_adapter(model, adapter_name, config, trainable=trainable)
                added = True
            else:
                get_lora_model(model, config, adapter_name)
            params = _adapter_parameters(model, adapter_name)
            optional = _base_embedding_parameters(model, adapter_name)
            file_keys = match_keys_and_shapes(weights, params, optional, directory)
            params.update({key: optional[key] for key in file_keys if key in optional})
            tensors = {key: weights.tensor(file_keys[key]) for key in params}
        except BaseException:
            if not was_lora and is_lora_model(model):
                unload(model)
            elif added:  # not when add_adapter refused a name the model already has: that adapter is the user's
                delete_adapter(model, adapter_name)
                for parent, name, child in children:  # unwrap the modules add_adapter wrapped for it
                    parent._modules[name] = child
            for param, flag in requires_grad:
                param.requires_grad_(flag)
            raise
    with torch.no_grad():
        for key, param in params.items():
            param.copy_(tensors[key])
    if not was_lora and not trainable:
        lora_state(model).trainable[adapter_name] = False
        for param in model.parameters():
            param.requires_grad_(False)
        watch_frozen_load(model)
    return model


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
    config = resolve_config(model, read_adapter_config(directory), strict=False)
    layers = {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer) and adapter_name in m.r}
    _check_swappable(model, directory, config, slot_config, adapter_name, layers)
    params = _adapter_parameters(model, adapter_name)
    placements = {key: _Placement(tuple(param.shape)) for key, param in params.items()}
    for name, layer in layers.items():
        rank, slot_rank = config.rank_for(name), layer.r[adapter_name]
        if rank > slot_rank:
            raise LoraError(f"{directory}: {name!r} has rank {rank}, larger than the slot's {slot_rank}")
        scaling = config.alpha_for(name) / (rank**0.5 if config.use_rslora else rank)
        for key, (axis, scaled) in layer.rank_layout(adapter_name).items():
            placement = placements[f"{name}.{key}"]
            placement.factor = scaling / layer.scaling[adapter_name] if scaled else 1.0
            if axis is None or rank == slot_rank:
                continue
            if placement.shape[axis] != slot_rank:  # e.g. a grouped conv's B, (out, r/groups, 1, 1)
                raise LoraError(f"{directory}: {name!r} has rank {rank}; its slot of rank {slot_rank} cannot pad it")
            placement.axis, placement.shape = axis, (*placement.shape[:axis], rank, *placement.shape[axis + 1 :])
    with open_weights(directory) as weights:
        file_keys = match_keys_and_shapes(weights, {k: p.shape for k, p in placements.items()}, {}, directory)
        tensors = {key: weights.tensor(file_keys[key]) for key in params}
    with torch.no_grad():
        for key, param in params.items():
            placement = placements[key]
            value = tensors[key].to(device=param.device, dtype=param.dtype) * placement.factor
            if placement.axis is None:
                param.copy_(value)
            else:
                param.zero_()
                param.narrow(placement.axis, 0, placement.shape[placement.axis]).copy_(value)
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
    model: nn.Module, directory: Path, config: LoraConfig, slot_config: LoraConfig, adapter_name: str,
    layers: dict[str, LoraLayer],
) -> None:  # fmt: skip
    for name, layer in layers.items():
        if adapter_name in layer.merged_adapters or layer._stack is not None:
            raise LoraError(f"hot_swap_adapter: {adapter_name!r} is merged or in a mixed batch in {name!r}")
    targets = {name for name, _ in find_targets(model, config)}
    if targets != set(layers):
        raise LoraError(
            f"{directory} targets other modules than adapter {adapter_name!r}: only in the file "
            f"{listing(sorted(targets - set(layers)))}, only in the slot {listing(sorted(set(layers) - targets))}"
        )
    for field_name in ("lora_bias", "bias", "modules_to_save"):
        new, old = getattr(config, field_name), getattr(slot_config, field_name)
        if new != old:
            raise LoraError(
                f"{directory} has {field_name}={new!r} but adapter {adapter_name!r} has {old!r}; "
                "a hot swap needs the same"
            )


def _check_ranks(model: nn.Module, config: LoraConfig, weights: Weights, directory: Path) -> None:
    """Refuse, before any layer is built, a rank larger than every tensor in the file (an adapter tensor has
    at least r elements): a hostile `r` must not make the conversion allocate r × features floats. `config`
    is resolved (`resolve_config`)."""
    largest = max((math.prod(shape) for shape in weights.shapes.values()), default=0)
    for name, _ in find_targets(model, config):
        if config.rank_for(name) > largest:
            raise LoraError(
                f"{directory}: the config gives {name!r} rank {config.rank_for(name)}, but the largest tensor "
                f"in the weights file has {largest} elements"
            )


def resolve_adapter_dir(path: str | os.PathLike) -> Path:
    """The directory holding `adapter_config.json` for a local path or a hub id in the local cache."""
    candidate = as_path(path, "path")
    if not candidate.exists() and isinstance(path, str) and path.count("/") == 1 and not path.startswith("."):
        candidate = _hub_cache() / f"models--{path.replace('/', '--')}"
    if (candidate / CONFIG_NAME).is_file():
        return candidate
    snapshots = candidate / "snapshots"
    if snapshots.is_dir():
        ref = candidate / "refs" / "main"
        if ref.is_file():
            snapshot = snapshots / ref.read_text().strip()
            if (snapshot / CONFIG_NAME).is_file():
                return snapshot
        found = [d for d in sorted(snapshots.iterdir()) if (d / CONFIG_NAME).is_file()]
        if len(found) == 1:
            return found[0]
        if found:
            raise LoraError(f"{candidate} has several snapshots and no refs/main: {[d.name for d in found]}")
    raise LoraError(f"no {CONFIG_NAME} in {candidate} (an adapter directory or a local hub-cache entry)")


def _hub_cache() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    return Path(home) / "hub"


class Weights:
    """Read-only view of an adapter weights file: keys, shapes and dtypes first, tensors on demand."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._handle: Any = None
        self._tensors: dict[str, torch.Tensor] | None = None

    def __enter__(self) -> Weights:
        if self.path.suffix == ".safetensors":
            from safetensors import safe_open

            try:
                self._handle = safe_open(str(self.path), framework="pt", device="cpu")
                self._handle.__enter__()
                self.shapes = {k: tuple(self._handle.get_slice(k).get_shape()) for k in self._handle.keys()}  # noqa: SIM118
                self.dtypes = {k: self._handle.get_slice(k).get_dtype() for k in self.shapes}
                _reject_duplicate_names(self.path)
            except Exception as error:
                raise LoraError(f"{self.path} is not a valid safetensors file: {error}") from None
        else:
            try:
                loaded = torch.load(self.path, map_location="cpu", weights_only=True)
            except Exception as error:
                raise LoraError(
                    f"{self.path} could not be read as plain tensors (torch.load with weights_only=True; "
                    f"lorakit never unpickles arbitrary objects): {error}"
                ) from None
            if not isinstance(loaded, Mapping) or not all(
                isinstance(k, str)
                and isinstance(v, torch.Tensor)
                and v.layout == torch.strided
                and not v.is_nested
                and v.device.type == "cpu"  # not meta (no data), sparse or nested: they cannot be copied in
                for k, v in loaded.items()
            ):
                raise LoraError(f"{self.path} must hold a dict of name → dense CPU tensor")
            self._tensors = dict(loaded)
            self.shapes = {k: tuple(v.shape) for k, v in self._tensors.items()}
            self.dtypes = {k: str(v.dtype).removeprefix("torch.") for k, v in self._tensors.items()}
        return self

    def __exit__(self, *exc: object) -> None:
        if self._handle is not None:
            self._handle.__exit__(None, None, None)

    def tensor(self, key: str) -> torch.Tensor:
        if self._tensors is not None:
            return self._tensors[key]
        try:
            return self._handle.get_tensor(key)
        except Exception as error:
            raise LoraError(f"{self.path}: cannot read tensor {key!r}: {error}") from None


def _reject_duplicate_names(path: Path) -> None:
    """Raise if a JSON object in the (already validated) safetensors header repeats a name: safetensors keeps
    the last entry, another reader may keep the first, and a file whose tensors depend on the reader is refused."""

    def unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        names = [name for name, _ in pairs]
        if len(set(names)) != len(names):
            raise ValueError(f"the header repeats the name {next(n for n in names if names.count(n) > 1)!r}")
        return dict(pairs)

    with open(path, "rb") as file:
        json.loads(file.read(int.from_bytes(file.read(8), "little")), object_pairs_hook=unique)


def open_weights(directory: Path) -> Weights:
    for name in (WEIGHTS_NAME, PICKLE_WEIGHTS_NAME):
        if (directory / name).is_file():
            return Weights(directory / name)
    raise LoraError(f"no {WEIGHTS_NAME} (or {PICKLE_WEIGHTS_NAME}) in {directory}")


_FLOAT_DTYPES = {"F16", "BF16", "F32", "F64", "float16", "bfloat16", "float32", "float64"}


def match_keys_and_shapes(
    weights: Weights,
    params: Mapping[str, nn.Parameter | tuple[int, ...]],
    optional: Mapping[str, nn.Parameter | tuple[int, ...]],
    directory: Path,
) -> dict[str, str]:
    """`{parameter key: file key}` when the file holds exactly the model's adapter tensors (plus any of the
    `optional` ones) with the right shapes (a parameter's, or the shape given) and float dtypes; otherwise a
    `LoraError` naming every problem."""
    found: dict[str, str] = {}
    for key in weights.shapes:
        short = key.removeprefix(PEFT_PREFIX)
        if short in found:
            raise LoraError(f"{directory}: tensor {short!r} appears twice (with and without {PEFT_PREFIX!r})")
        found[short] = key
    missing = sorted(set(params) - set(found))
    unexpected = sorted(set(found) - set(params) - set(optional))
    params = {**params, **{key: optional[key] for key in found if key in optional}}
    problems = []
    if missing:
        problems.append(f"missing keys {listing(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {listing(unexpected)} (the model has no such adapter tensor)")
    for short in sorted(set(params) & set(found)):
        key = found[short]
        want = tuple(params[short].shape if isinstance(params[short], torch.Tensor) else params[short])
        if weights.shapes[key] != want:
            problems.append(f"{key!r} has shape {list(weights.shapes[key])}, the model expects {list(want)}")
        elif weights.dtypes[key] not in _FLOAT_DTYPES:
            problems.append(f"{key!r} has dtype {weights.dtypes[key]}, expected a floating dtype")
    if problems:
        raise LoraError(f"adapter in {directory} does not fit the model: " + "; ".join(problems))
    return found


def listing(keys: list[str], limit: int = 10) -> str:
    shown = ", ".join(repr(k) for k in keys[:limit])
    return f"[{shown}{f', … ({len(keys)} in all)' if len(keys) > limit else ''}]"
