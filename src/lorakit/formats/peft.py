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
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import PEFT_FIELDS_NOT_MODELED, LoraConfig
from ..distributed import full_value, is_sharded, save_on_rank_zero, unsharded_class
from ..errors import AdapterError, LoraError
from ..layers import LoraEmbedding, LoraLayer, LoraParameters, lora_layer_type_for
from ..layers.init_schemes import changes_base
from ..layers.modules_to_save import ModulesToSave
from ..model import (
    AdapterTarget,
    add_planned_adapter,
    bias_parameters,
    check_module,
    lora_layers,
    lora_state,
    parameter_rank_and_alpha,
    undo_on_failure,
    watch_frozen_load,
)
from ..targets import (
    candidate_modules,
    check_adaptable,
    find_parameter_targets,
    is_plain_pattern,
    is_targeted,
    resolve_config,
)
from .files import as_path, replace_files
from .readers import (
    CONFIG_NAME,
    PEFT_PREFIX,
    TensorFile,
    match_keys_and_shapes,
    open_weights,
    quoted_list,
    read_json_object,
    resolve_adapter_dir,
)

WEIGHTS_NAME = "adapter_model.safetensors"

# init schemes that only shape the starting point of A and B: a trained adapter loads like any other.
_WEIGHT_ONLY_INITS = ("eva", "orthogonal", "loftq", "mica")


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
                "base_model_class": unsharded_class(model).__name__,
                "parent_library": unsharded_class(model).__module__,
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


def _saved_tensors(
    model: nn.Module, adapter_name: str, state_dict: Mapping[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """The tensors a save of adapter `adapter_name` writes, keyed by peft name without the prefix: its parameters,
    or with `state_dict` (keyed as `model.state_dict()`) their values in it."""
    params = adapter_parameters(model, adapter_name)
    if state_dict is None:
        return dict(params)
    names = {id(param): name for name, param in model.named_parameters(remove_duplicate=False)}
    return {key: state_dict.get(names.get(id(param), ""), param) for key, param in params.items()}


def saving_gathers(
    model: nn.Module, adapter_names: Sequence[str], state_dict: Mapping[str, torch.Tensor] | None = None
) -> bool:
    """Whether saving these adapters gathers shards (some tensor to write is a `DTensor`), which makes the save a
    collective that every rank must call."""
    return any(
        is_sharded(tensor) for name in adapter_names for tensor in _saved_tensors(model, name, state_dict).values()
    )


def adapter_files(
    model: nn.Module, adapter_name: str = "default", state_dict: Mapping[str, torch.Tensor] | None = None,
    convert_to_lora: bool = False,
) -> dict[str, bytes]:  # fmt: skip
    """The bytes of `adapter_config.json` and `adapter_model.safetensors` for adapter `adapter_name`. With
    `state_dict` (keyed as `model.state_dict()`), the tensors come from it instead of the parameters; with
    `convert_to_lora`, a PiSSA/OLoRA adapter is written as the plain LoRA of the original weights it equals."""
    from safetensors.torch import save as safetensors_bytes

    params = _saved_tensors(model, adapter_name, state_dict)
    # whole tensors on the CPU; a sharded one is gathered from every rank (a collective, in this order everywhere)
    params = {key: full_value(value.detach()).to("cpu", copy=True) for key, value in params.items()}
    config = lora_state(model).configs[adapter_name]
    if convert_to_lora:
        config, params = _as_plain_lora(model, adapter_name, config, params)
    tensors = {PEFT_PREFIX + key: value.contiguous() for key, value in params.items()}
    config_text = json.dumps(peft_config_dict(config, model), indent=2) + "\n"
    return {WEIGHTS_NAME: safetensors_bytes(tensors, metadata={"format": "pt"}), CONFIG_NAME: config_text.encode()}


def _as_plain_lora(
    model: nn.Module, adapter_name: str, config: LoraConfig, params: dict[str, torch.Tensor]
) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """A PiSSA/OLoRA adapter as the plain LoRA of the original base weights that it equals, as peft converts it
    (`path_initial_model_for_weight_conversion`): on each layer, with `A₀, B₀` its start,
    `s·B A − s·B₀ A₀ = s·[B, −B₀] [A; A₀]`, so A' = `[A; A₀]` `(2r, in)`, B' = `[B, −B₀]` `(out, 2r)`, and the
    ranks and alphas doubled (alphas ×√2 with rsLoRA) to keep every scaling."""
    if not changes_base(config.init_lora_weights):
        raise LoraError(
            f"convert_to_lora=True converts PiSSA/OLoRA adapters; {adapter_name!r} was initialised with "
            f"init_lora_weights={config.init_lora_weights!r} and is a plain LoRA already"
        )
    if config.use_dora:
        raise LoraError(f"adapter {adapter_name!r} is a DoRA adapter, whose update is not linear in A and B: "
                        "it cannot be converted to a plain LoRA")  # fmt: skip
    params = dict(params)
    for path, layer in lora_layers(model):
        if adapter_name not in layer.r:
            continue
        start = layer.initial_factors(adapter_name)
        if start is None:
            raise LoraError(f"{path!r} holds no start of adapter {adapter_name!r} (loaded from a file without one?)")
        a0, b0 = start
        a_key, b_key = f"{path}.lora_A.weight", f"{path}.lora_B.weight"
        params[a_key] = torch.cat([params[a_key], full_value(a0).cpu()], dim=0)
        params[b_key] = torch.cat([params[b_key], -full_value(b0).cpu()], dim=1)
    alpha_factor = 2**0.5 if config.use_rslora else 2
    converted = config.replace(
        init_lora_weights=True,
        r=2 * config.r,
        lora_alpha=alpha_factor * config.lora_alpha,
        rank_pattern={key: 2 * r for key, r in config.rank_pattern.items()},
        alpha_pattern={key: alpha_factor * alpha for key, alpha in config.alpha_pattern.items()},
    )
    return converted, params


def save_adapter(
    model: nn.Module, directory: str | os.PathLike, adapter_name: str = "default", convert_to_lora: bool = False
) -> Path:
    """Write adapter `adapter_name` to `directory` as peft does: `adapter_config.json` and
    `adapter_model.safetensors`. Each file is replaced atomically; returns the directory's path. In a process
    group rank 0 writes: for an FSDP2-sharded adapter every rank must call it (it gathers the shards) and returns
    once the files are on disk; for an unsharded one (DDP) the other ranks write nothing and return at once.

    `convert_to_lora=True`, for a PiSSA/OLoRA adapter (whose base keeps a residual): write it as the plain LoRA
    of the original base weights that it equals (rank 2r), which loads onto the unchanged base model anywhere
    (peft's `path_initial_model_for_weight_conversion`; lorakit keeps the start it needs in memory)."""
    directory = as_path(directory, "directory")
    if not isinstance(convert_to_lora, bool):
        raise LoraError(f"convert_to_lora must be True or False, got {convert_to_lora!r}")
    save_on_rank_zero(
        lambda: adapter_files(model, adapter_name, convert_to_lora=convert_to_lora),
        lambda files: _write(directory, files),
        f"save_adapter to {directory}",
        gathers=saving_gathers(model, [adapter_name]),
    )
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

    def write(files: dict[str, dict[str, bytes]]) -> None:
        for name, contents in files.items():
            _write(directory if name == "default" else directory / name, contents)

    # everything built (and on several ranks, agreed) before anything is written
    save_on_rank_zero(lambda: {name: adapter_files(model, name, state_dict) for name in names}, write,
                      f"save_pretrained to {directory}", gathers=saving_gathers(model, names, state_dict))  # fmt: skip
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

    On a plain model the LoRA layers are created and the adapter is made active (as
    `PeftModel.from_pretrained` does); on a LoRA model it is added as another, inactive adapter. Tensors
    go to the base layers' devices, as float32 master weights. `trainable=False` freezes the adapter.
    `path` is an adapter directory, a local hub-cache directory (`models--org--name` with `snapshots/`),
    or a hub id `org/name` already in the local hub cache; nothing is downloaded.

    The modules and ranks come from the weights file's keys and shapes, checked against the config
    (`plan_from_file`): nothing from the file is evaluated as a regular expression. Raises `LoraError`
    (nothing changed) for a missing, unexpected, mis-shaped or non-float tensor, a corrupt file, an invalid
    config, or one whose tensors and fields disagree.
    """
    directory = resolve_adapter_dir(path)
    config = read_adapter_config(directory)
    check_module(model)
    if str(config.init_lora_weights).startswith("pissa_niter_"):
        warnings.warn(
            f"{directory}: a PiSSA adapter from a randomized SVD ({config.init_lora_weights}); loading it takes the "
            "start out of the base weights again, as peft does, and a randomized SVD gives the residual it trained "
            "on only with the same random state. Save PiSSA adapters with convert_to_lora=True to load them exactly",
            stacklevel=2,
        )
    with open_weights(directory) as weights, undo_on_failure(model):
        config, targets = plan_from_file(model, config, weights, directory)
        add_planned_adapter(model, adapter_name, config, targets, trainable)
        params = adapter_parameters(model, adapter_name)
        optional = _base_embedding_parameters(model, adapter_name)
        file_keys = match_keys_and_shapes(weights, params, optional, directory)
        params.update({key: optional[key] for key in file_keys if key in optional})
        tensors = {key: weights.tensor(file_keys[key]) for key in params}
    with torch.no_grad():
        for key, param in params.items():
            param.copy_(tensors[key])
    if not trainable and lora_state(model).configs.keys() == {adapter_name}:
        watch_frozen_load(model)
    return model


def plan_from_file(
    model: nn.Module, config: LoraConfig, weights: TensorFile, directory: Path
) -> tuple[LoraConfig, list[AdapterTarget]]:
    """The adapter's targets, ranks and alphas as a weights file gives them, checked against its config.

    Targets and ranks come from the file's keys and shapes (`<module path>.<container>…`, A's first axis);
    alphas from `lora_alpha`, or `alpha_pattern`. The config's patterns are only matched when they are
    plain (`targets.is_plain_pattern`: quick to match whoever wrote them), to check that the file's targets
    are the ones the config names and that none is missing; a `target_modules` regular expression is not
    checked (the keys are the truth), and a `rank_pattern`, `alpha_pattern` or `layers_pattern` that is not a
    plain name is refused, since lorakit would have to evaluate it. Returns the config (targets made
    explicit where they can be) and the targets in module order.
    """
    candidates = dict(candidate_modules(model))
    # the file's config names its parameter targets; their tensors are checked against them like the others'
    parameter_targets = {name: params for name, _, params in find_parameter_targets(model, config)}
    found: dict[str, dict[str, tuple[int, ...]]] = {}  # module path → {tensor suffix: shape}
    file_keys: dict[tuple[str, str], str] = {}  # (module path, suffix) → the key in the file, for messages
    for key, shape in weights.shapes.items():
        located = _lora_tensor_of(key.removeprefix(PEFT_PREFIX), candidates, parameter_targets)
        if located is not None:
            found.setdefault(located[0], {})[located[1]] = shape
            file_keys[located] = key
    _refuse_patterns_lorakit_would_need(config, directory)
    if config.target_modules is None or (
        isinstance(config.target_modules, str) and config.target_modules.lower() == "all-linear"
    ):
        config = resolve_config(model, config)  # the family table or the model's linear layers: no file pattern
    expected = _expected_targets(config, candidates)
    if expected is not None:
        expected |= parameter_targets.keys()
    problems = []
    if expected is not None:
        if found.keys() - expected:
            problems.append(
                f"tensors for modules the config does not target: {quoted_list(sorted(found.keys() - expected))}"
            )
        if expected - found.keys():
            problems.append(f"no tensors for targeted modules {quoted_list(sorted(expected - found.keys()))}")
    if not found and not problems:
        problems.append(f"no tensor names a module of {type(model).__name__} that LoRA can adapt")
    if problems:
        raise LoraError(f"adapter in {directory} does not fit the model: " + "; ".join(problems))
    targets = []
    for name, module in candidates.items():
        if name not in found:
            continue
        if name in parameter_targets:
            targets.append(_parameter_target(name, module, parameter_targets[name], found[name], config, directory))
            continue
        check_adaptable(name, module)
        layer_type = type(module) if isinstance(module, LoraLayer) else lora_layer_type_for(module)
        rank = layer_type.rank_in_file(found[name])
        if rank is None or rank < 1:
            raise LoraError(f"adapter in {directory} does not fit the model: no usable A tensor for {name!r}")
        if config.rank_for(name) != rank:
            suffix = next(k for k in found[name] if k.split(".")[0] == layer_type.adapter_containers[0])
            key, shape = file_keys[(name, suffix)], found[name][suffix]
            wanted = [config.rank_for(name), *shape[1:]]
            raise LoraError(
                f"adapter in {directory} does not fit the model: {key!r} has shape {list(shape)}, the model expects "
                f"{wanted} (the config gives {name!r} rank {config.rank_for(name)})"
            )
        targets.append(AdapterTarget(name, module, rank, config.alpha_for(name)))
    return config, targets


def _parameter_target(
    name: str, module: nn.Module, params: list[str], shapes: dict[str, tuple[int, ...]], config: LoraConfig,
    directory: Path,
) -> AdapterTarget:  # fmt: skip
    """The target of a file's adapter on parameters `params` of module `name`, its rank read from the tensors."""
    layer = module if isinstance(module, LoraParameters) else LoraParameters(module, params)
    rank = layer.rank_in_module(shapes)
    wanted, alpha = parameter_rank_and_alpha(config, name, layer.parameter_names)
    if rank != wanted:
        first = layer.key_prefix(layer.parameter_names[0]) + "lora_A.weight"
        raise LoraError(
            f"adapter in {directory} does not fit the model: {name}.{first} has shape {list(shapes.get(first, []))}, "
            f"and {name}'s parameter targets need {layer.shapes[layer.parameter_names[0]].experts}·r rows with "
            f"r={wanted}"
        )
    return AdapterTarget(name, module, rank, alpha, tuple(layer.parameter_names))


def _lora_tensor_of(
    key: str, candidates: dict[str, nn.Module], parameter_targets: dict[str, list[str]]
) -> tuple[str, str] | None:
    """`(module path, suffix)` when `key` is a LoRA tensor of a module LoRA can adapt (`<path>.<container>…`) or
    of a module whose parameters the adapter targets, else None (a saved copy's or a trained bias's tensor, or a
    key the model does not know)."""
    parts = key.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        module = candidates.get(".".join(parts[:cut]))
        if module is None:
            continue
        if ".".join(parts[:cut]) in parameter_targets:
            layer_type = LoraParameters
        else:
            layer_type = type(module) if isinstance(module, LoraLayer) else lora_layer_type_for(module)
        if layer_type is not None and layer_type.owns_suffix(".".join(parts[cut:])):
            return ".".join(parts[:cut]), ".".join(parts[cut:])
        return None  # the deepest module the key names: its tensor is not a LoRA one
    return None


def _expected_targets(config: LoraConfig, candidates: dict[str, nn.Module]) -> set[str] | None:
    """The modules `config` targets, where that can be told without evaluating a pattern from the file."""
    targets, exclude = config.target_modules, config.exclude_modules
    unplain = [p for p in (targets, exclude) if isinstance(p, str) and not is_plain_pattern(p)]
    if unplain or targets is None:
        return None
    return {name for name in candidates if is_targeted(config, name)}


def _refuse_patterns_lorakit_would_need(config: LoraConfig, directory: Path) -> None:
    """A `LoraError` for a pattern that decides a rank, an alpha or a layer and is not plain."""
    needed = [("rank_pattern", key) for key in config.rank_pattern]
    needed += [("alpha_pattern", key) for key in config.alpha_pattern]
    if config.layers_to_transform not in (None, []):
        layers = [config.layers_pattern] if isinstance(config.layers_pattern, str) else config.layers_pattern or []
        needed += [("layers_pattern", pattern) for pattern in layers]
    for field_name, pattern in needed:
        if not is_plain_pattern(pattern):
            raise LoraError(
                f"{directory}: {field_name} holds {pattern!r}, a regular expression; lorakit evaluates no pattern "
                "from an adapter file (a stranger's pattern can take minutes to match) and would need this one. "
                "Write it as the module names it stands for."
            )
