"""HuggingFace peft's adapter format (docs/design.md §5): key names, `adapter_config.json`, save and load.

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
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._files import as_path, replace_files
from ..config import PEFT_FIELDS_NOT_MODELED, LoraConfig
from ..errors import AdapterError, LoraError
from ..layers import LoraEmbedding, LoraLayer
from ..layers.modules_to_save import ModulesToSave
from ..model import (
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
from ..targets import find_targets, resolve_config
from .readers import (
    CONFIG_NAME,
    PEFT_PREFIX,
    TensorFile,
    match_keys_and_shapes,
    open_weights,
    read_json_object,
    resolve_adapter_dir,
)

WEIGHTS_NAME = "adapter_model.safetensors"

# init schemes that only shape the starting point of A and B: a trained adapter loads like any other.
_WEIGHT_ONLY_INITS = ("eva", "orthogonal")


# ----- key names ----------------------------------------------------------------------------------------


def adapter_parameters(model: nn.Module, adapter_name: str) -> dict[str, nn.Parameter]:
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
    return {PEFT_PREFIX + key: param.detach() for key, param in adapter_parameters(model, adapter_name).items()}


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


# ----- save ---------------------------------------------------------------------------------------------


def adapter_files(
    model: nn.Module, adapter_name: str = "default", state_dict: Mapping[str, torch.Tensor] | None = None
) -> dict[str, bytes]:
    """The bytes of `adapter_config.json` and `adapter_model.safetensors` for adapter `adapter_name`. With
    `state_dict` (keyed as `model.state_dict()`), the tensors come from it instead of the parameters."""
    from safetensors.torch import save as safetensors_bytes

    params = adapter_parameters(model, adapter_name)
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
    from ..xlora import is_xlora_model

    directory = as_path(directory, "directory")
    if is_xlora_model(model):
        from .xlora import save_xlora

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
            params = adapter_parameters(model, adapter_name)
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


def _check_ranks(model: nn.Module, config: LoraConfig, weights: TensorFile, directory: Path) -> None:
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
