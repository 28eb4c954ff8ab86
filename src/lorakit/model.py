"""Model-wide operations: convert a model, manage its adapters, merge and unmerge, unload.

A LoRA model is the user's own model object, converted in place: targeted modules are replaced by LoRA
layers wrapping them (`q_proj` becomes a `LoraLinear` whose `base_layer` is the original `nn.Linear`), and a
small `LoraState` object records each adapter's resolved config and which adapters are active. The model's
class does not change, so `generate()`, `Trainer` and `torch.compile` keep working. A model with a
`save_pretrained` method (transformers) gets one that writes its adapters in peft's format instead of base
weights under the LoRA layers' keys, which `from_pretrained` could not read back.
"""

from __future__ import annotations

import copy
import os
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import LoraConfig
from .distributed import is_sharded, process_group_size, sharded_parameters
from .errors import AdapterError, LoraError, MergeError, TargetError
from .layers import (
    AdapterModule,
    LoraLayer,
    LoraLinear,
    LoraParameters,
    LoraQuantizedLinear,
    lora_layer_type_for,
    weight_count,
)
from .layers.init_schemes import changes_base
from .layers.linear import is_transformers_conv1d
from .layers.modules_to_save import ModulesToSave
from .targets import (
    candidate_modules,
    find_parameter_targets,
    find_targets,
    is_module_to_save,
    parameter_owners,
    resolve_config,
)

BASE_ADAPTER_NAME = "__base__"  # reserved: "no adapter" in mixed batches
_STATE_ATTR = "_lorakit_state"


@dataclass
class LoraState:
    """The one owner of a LoRA model's adapter state: each adapter's resolved config, which adapters are active
    (in order), which train, and whether adapters are disabled. Layers hold what follows from it for them
    (their own rank, alpha, scaling and dropout per adapter, the adapters their forward runs), and only the
    functions of this module change it, pushing the result to every layer with `_apply_state`."""

    configs: dict[str, LoraConfig] = field(default_factory=dict)  # resolved: explicit target lists
    active: list[str] = field(default_factory=list)
    trainable: dict[str, bool] = field(default_factory=dict)
    disabled: bool = False  # inside `disable_adapters`
    frozen_load_check: Any = None  # the hook of `watch_frozen_load`, while it watches
    fused_path_hooks: dict[str, Any] = field(default_factory=dict)  # see `_keep_lora_forwards`


def check_module(model: object) -> nn.Module:
    """`model` itself; a `LoraError` if it is not an `nn.Module`."""
    if not isinstance(model, nn.Module):
        raise LoraError(f"expected a torch.nn.Module, got {type(model).__name__}")
    return model


def lora_state(model: nn.Module) -> LoraState:
    """The model's `LoraState`; `LoraError` if `model` is not a LoRA model."""
    state = getattr(check_module(model), _STATE_ATTR, None)
    if not isinstance(state, LoraState):
        raise LoraError(f"{type(model).__name__} is not a LoRA model; convert it with lorakit.get_lora_model")
    return state


def is_lora_model(model: nn.Module) -> bool:
    return isinstance(getattr(model, _STATE_ATTR, None), LoraState)


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLayer]]:
    """Every `(name, LoraLayer)` of the model, each layer once."""
    for name, module in check_module(model).named_modules():
        if isinstance(module, LoraLayer):
            yield name, module


def _adapter_modules(model: nn.Module) -> Iterator[AdapterModule]:
    """Every module of the model holding per-adapter parameters (LoRA layers and `modules_to_save` wrappers)."""
    for module in model.modules():
        if isinstance(module, (LoraLayer, ModulesToSave)):
            yield module


# ----- conversion ---------------------------------------------------------------------------------------


def get_lora_model(model: nn.Module, config: LoraConfig, adapter_name: str = "default") -> nn.Module:
    """Convert `model` in place to a LoRA model with one active, trainable adapter; return `model`.

    Every parameter of the model is frozen except the adapter's, the copies in `config.modules_to_save`
    and, per `config.bias`, biases. The model's class is unchanged.
    """
    if is_lora_model(check_module(model)):
        raise LoraError(f"{type(model).__name__} is already a LoRA model; use lorakit.add_adapter for another")
    config, targets = plan_targets(model, config)
    add_planned_adapter(model, adapter_name, config, targets, trainable=True)
    return model


def add_adapter(model: nn.Module, adapter_name: str, config: LoraConfig, trainable: bool = True) -> None:
    """Add another adapter to a LoRA model. It is inactive until `set_active_adapters` names it."""
    lora_state(model)
    config, targets = plan_targets(model, config)
    add_planned_adapter(model, adapter_name, config, targets, trainable)


@dataclass(frozen=True)
class AdapterTarget:
    """A module an adapter goes on, with the rank and alpha it gets there; with `parameters`, the adapter goes on
    those parameters of the module (`target_parameters`), not on the module as a layer."""

    name: str
    module: nn.Module
    r: int
    lora_alpha: float
    parameters: tuple[str, ...] = ()


def plan_targets(model: nn.Module, config: LoraConfig) -> tuple[LoraConfig, list[AdapterTarget]]:
    """The resolved `config` (explicit targets) and its targets in `model`, from a config the user wrote: its
    patterns (`target_modules`, `rank_pattern`, …) are evaluated here. Loading a file plans from the file's
    tensors instead (`formats.peft`)."""
    if not isinstance(config, LoraConfig):
        raise LoraError(f"config must be a lorakit.LoraConfig, got {type(config).__name__}")
    config = resolve_config(model, config)
    targets = [
        AdapterTarget(n, module, config.rank_for(n), config.alpha_for(n)) for n, module in find_targets(model, config)
    ]
    for name, module, params in find_parameter_targets(model, config):
        r, alpha = parameter_rank_and_alpha(config, name, params)
        targets.append(AdapterTarget(name, module, r, alpha, tuple(params)))
    return config, targets


def parameter_rank_and_alpha(config: LoraConfig, module_name: str, params: Sequence[str]) -> tuple[int, float]:
    """The rank and alpha of the adapter on parameters `params` of `module_name`: `rank_pattern` and
    `alpha_pattern` match the parameters' full names, as in peft, and must give them all the same values."""
    keys = [f"{module_name}.{param}" for param in params]
    ranks, alphas = {config.rank_for(key) for key in keys}, {config.alpha_for(key) for key in keys}
    if len(ranks) > 1 or len(alphas) > 1:
        raise TargetError(
            f"rank_pattern/alpha_pattern give the parameters {list(params)} of {module_name!r} ranks {sorted(ranks)} "
            f"and alphas {sorted(alphas)}; lorakit gives the parameters of one module one rank and one alpha"
        )
    return ranks.pop(), alphas.pop()


def add_planned_adapter(
    model: nn.Module, adapter_name: str, config: LoraConfig, targets: list[AdapterTarget], trainable: bool
) -> None:
    """Add adapter `adapter_name` on exactly `targets` (and the `config.modules_to_save` copies). A plain model is
    converted: everything is frozen but the adapter, which becomes the active one; on a LoRA model the adapter
    is added inactive. On any failure the model is left as it was."""
    was_lora = is_lora_model(model)
    state = lora_state(model) if was_lora else LoraState()
    _check_new_name(state, adapter_name)
    # Recorded as peft records it: the saved config tells consumers whether weights are stored (in, out).
    uses_conv1d = any(is_transformers_conv1d(getattr(t.module, "base_layer", t.module)) for t in targets)
    if config.fan_in_fan_out != uses_conv1d:
        config = config.replace(fan_in_fan_out=uses_conv1d)
    changing = [n for n, c in [*state.configs.items(), (adapter_name, config)] if changes_base(c.init_lora_weights)]
    if changing and state.configs:
        warnings.warn(
            f"adapters {changing} (PiSSA/OLoRA) took their start out of the base weights, which the model's other "
            "adapters see too. Consider one such adapter per model, or save it converted to a plain LoRA "
            "(save_adapter(..., convert_to_lora=True))",
            stacklevel=3,
        )
    sharded = sharded_parameters(model)
    if sharded:
        raise LoraError(
            f"cannot add adapter {adapter_name!r}: the model is sharded ({sharded[0]} is a DTensor), and FSDP2 "
            "cannot take new parameters after fully_shard. Convert (get_lora_model, add_adapter, load_adapter) on "
            "every rank before sharding; to load weights into an adapter the sharded model has, use "
            "lorakit.hot_swap_adapter"
        )
    with undo_on_failure(model) as undo:
        parents = _parent_index(model)
        for target in targets:
            layer = target.module
            if not isinstance(layer, LoraLayer):
                if target.parameters:
                    layer = LoraParameters(target.module, list(target.parameters))
                else:
                    layer = lora_layer_type_for(target.module)(target.module)
                target.module.requires_grad_(False)
                _replace(parents, target.module, layer)
            else:
                _check_same_parameters(target, layer)
            layer.add_adapter(adapter_name, target.r, target.lora_alpha, config)
            layer.train(layer.base_layer.training)  # new modules start in training mode; follow the model's
        for module in _find_modules_to_save(model, config):
            if not isinstance(module, ModulesToSave):
                module.requires_grad_(False)
                wrapper = ModulesToSave(module).train(module.training)
                _replace(parents, module, wrapper)
                module = wrapper
            module.add_adapter(adapter_name)
        _keep_lora_forwards(model, state, undo)
        state.configs[adapter_name] = config
        state.trainable[adapter_name] = trainable
        if not was_lora:
            for param in model.parameters():
                param.requires_grad_(False)
            state.active = [adapter_name]
            setattr(model, _STATE_ATTR, state)  # a plain attribute: not a module, not in state_dict
            if callable(getattr(model, "save_pretrained", None)):
                model.save_pretrained = AdapterSavePretrained(model)
        _apply_state(model, state)


def _check_same_parameters(target: AdapterTarget, layer: LoraLayer) -> None:
    """A new adapter on a LoRA layer targets what its adapters target: the module, or the same parameters."""
    has = layer.parameter_names if isinstance(layer, LoraParameters) else []
    if list(target.parameters) != has:
        what = f"its parameters {has}" if has else "the module"
        wanted = f"its parameters {list(target.parameters)}" if target.parameters else "the module"
        raise TargetError(
            f"{target.name!r} has adapters on {what}; another adapter must target the same, not {wanted} (as in peft)"
        )


def _keep_lora_forwards(model: nn.Module, state: LoraState, undo: list[Callable[[], object]]) -> None:
    """Turn off torch's fused inference path of every `nn.TransformerEncoderLayer` that holds a LoRA layer.

    That path (eval mode, no grad) reads the weights of the layer's `self_attn`, `linear1` and `linear2` and never
    calls them, so their LoRA would be skipped without a word. torch does not take it while a forward hook is
    attached to the layer or to one of its modules, so each such layer gets a no-op pre-hook, removed at unload."""
    for name, module in model.named_modules():
        if name in state.fused_path_hooks or not isinstance(module, nn.TransformerEncoderLayer):
            continue
        if any(isinstance(inner, LoraLayer) for inner in module.modules()):
            hook = module.register_forward_pre_hook(_runs_the_lora_forwards)
            state.fused_path_hooks[name] = hook
            undo.append(hook.remove)


def _runs_the_lora_forwards(module: nn.Module, args: tuple[Any, ...]) -> None:
    """A forward pre-hook that does nothing: its presence keeps torch on the module's plain forward."""


@contextmanager
def undo_on_failure(model: nn.Module) -> Iterator[list[Callable[[], object]]]:
    """Run a block that changes `model`'s adapters; if it raises, put everything back as it was: the module tree,
    every `requires_grad` flag, the adapters of existing LoRA layers, lorakit's attributes on the model and its
    LoRA state. The one rollback of every operation that can fail half-way (converting, adding, loading, X-LoRA).
    The block may append undo steps of its own (removing a hook it registered) to the list it is given."""
    children = {parent: dict(parent._modules) for parent in model.modules()}
    flags = [(param, param.requires_grad) for param in model.parameters()]
    adapters = {module: set(module.adapter_names) for module in _adapter_modules(model)}
    attributes = {name: value for name, value in model.__dict__.items() if _is_lorakit_attribute(name, value)}
    state = getattr(model, _STATE_ATTR, None)
    kept = {key: copy.copy(value) for key, value in state.__dict__.items()} if state is not None else {}
    extra_undo: list[Callable[[], object]] = []
    try:
        yield extra_undo
    except BaseException:
        for undo in reversed(extra_undo):
            undo()
        new_state = getattr(model, _STATE_ATTR, None)
        if new_state is not None and new_state is not state and new_state.frozen_load_check is not None:
            new_state.frozen_load_check.remove()
        for module, names in adapters.items():
            for name in set(module.adapter_names) - names:
                module.delete_adapter(name)  # which gives back what a PiSSA/OLoRA start took from the base
        for module in _adapter_modules(model):
            if module not in adapters and isinstance(module, LoraLayer):
                module.restore_base_changes()  # a new layer, dropped below: its base module stays
        for parent, before in children.items():
            for name in set(parent._modules) - set(before):
                delattr(parent, name)
            for name, child in before.items():
                setattr(parent, name, child)
        for param, flag in flags:
            param.requires_grad_(flag)
        for name in [name for name, value in model.__dict__.items() if _is_lorakit_attribute(name, value)]:
            del model.__dict__[name]
        model.__dict__.update(attributes)
        if state is not None:
            state.__dict__.update(kept)
            _apply_state(model, state)
        raise


def _is_lorakit_attribute(name: str, value: object) -> bool:
    return name.startswith("_lorakit") or isinstance(value, AdapterSavePretrained)


class AdapterSavePretrained:
    """`model.save_pretrained` of a converted model that had one (a transformers `PreTrainedModel`): writes the
    adapters as peft's `PeftModel.save_pretrained` does (adapter `"default"` in the directory, each other one in
    `<directory>/<name>/`, `base_model_name_or_path` from the model) and no base weights. `trainer.save_model`
    and every `Trainer` checkpoint go through it. A merged model writes its adapters all the same (merging is
    a state of the loaded model, not of the adapter); for a plain checkpoint with the adapters baked in, call
    `lorakit.merge_and_unload(model)` first, which gives the model its own `save_pretrained` back.

    Arguments are transformers' (`state_dict`, when given, supplies the adapter tensors, as `Trainer` does
    under FSDP or DeepSpeed; `is_main_process=False` writes nothing, though on an FSDP2-sharded model that rank
    still joins the gathering of the shards, a collective) and peft's `selected_adapters`; weights
    are always safetensors, and `push_to_hub` is refused (save, then upload the directory).
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __call__(
        self, save_directory: str | os.PathLike, is_main_process: bool = True,
        state_dict: Mapping[str, torch.Tensor] | None = None, push_to_hub: bool = False,
        selected_adapters: Sequence[str] | None = None, **ignored: Any,
    ) -> Path:  # fmt: skip
        from .formats.files import as_path
        from .formats.peft import save_pretrained

        if push_to_hub:
            raise LoraError("save_pretrained(push_to_hub=True) is not supported on a lorakit model: save, then upload")
        directory = as_path(save_directory, "save_directory")
        if is_main_process or self._joins_a_gather(selected_adapters, state_dict):
            save_pretrained(self.model, directory, selected_adapters, state_dict)
        return directory

    def _joins_a_gather(
        self, selected_adapters: Sequence[str] | str | None, state_dict: Mapping[str, torch.Tensor] | None
    ) -> bool:
        """Whether a rank that does not write must still join the save: it gathers FSDP2 shards, a collective."""
        from .formats.peft import saving_gathers

        if process_group_size() == 1:
            return False
        if selected_adapters is None:
            names = list(lora_state(self.model).configs)
        else:
            names = [selected_adapters] if isinstance(selected_adapters, str) else list(selected_adapters)
        return saving_gathers(self.model, names, state_dict)


def _check_new_name(state: LoraState, name: object) -> None:
    if not isinstance(name, str) or not name or "." in name:
        raise AdapterError(f"adapter name must be a non-empty string without '.', got {name!r}")
    if name == BASE_ADAPTER_NAME:
        raise AdapterError(f"adapter name {BASE_ADAPTER_NAME!r} is reserved for 'no adapter'")
    if name in state.configs:
        raise AdapterError(f"adapter {name!r} already exists; choose another name or delete_adapter it first")


def _find_modules_to_save(model: nn.Module, config: LoraConfig) -> list[nn.Module]:
    if not config.modules_to_save:
        return []
    found = [
        module
        for name, module in model.named_modules()
        if not isinstance(module, LoraLayer) and is_module_to_save(config, name)
    ]
    # a module inside another that is saved whole, or a wrapper's own insides, is not a module of its own
    found = [m for m in found if not any(m is not o and _contains(o, m) for o in found)]
    if not found:
        raise LoraError(f"modules_to_save={config.modules_to_save} matched no module of the model")
    return found


def _contains(outer: nn.Module, inner: nn.Module) -> bool:
    return any(inner is module for module in outer.modules())


def _parent_index(model: nn.Module) -> dict[int, list[tuple[nn.Module, str]]]:
    """`id(child) → [(parent, attribute)]` over every path, so a module shared by two parents is replaced
    in both."""
    index: dict[int, list[tuple[nn.Module, str]]] = {}
    for parent in model.modules():
        for attr, child in parent._modules.items():  # every name, also of a child shared under two
            if child is not None:
                index.setdefault(id(child), []).append((parent, attr))
    return index


def _replace(parents: dict[int, list[tuple[nn.Module, str]]], old: nn.Module, new: nn.Module) -> None:
    for parent, attr in parents.get(id(old), []):
        setattr(parent, attr, new)
    parents[id(new)] = parents.pop(id(old), [])


# ----- adapters -----------------------------------------------------------------------------------------


def _existing(state: LoraState, names: str | Sequence[str]) -> list[str]:
    """`names` (one name or a sequence of names) as a list, each an adapter of the model, none twice."""
    if isinstance(names, str):
        names = [names]
    elif not (isinstance(names, Sequence) and all(isinstance(name, str) for name in names)):
        raise AdapterError(f"adapter names must be a string or a list of strings, got {names!r}")
    names = list(names)
    for name in names:
        if name not in state.configs:
            raise AdapterError(f"unknown adapter {name!r}; this model has {sorted(state.configs)}")
    if len(set(names)) != len(names):
        raise AdapterError(f"adapter names {names} repeat a name")
    return names


def set_active_adapters(model: nn.Module, adapter_names: str | Sequence[str]) -> None:
    """Make one adapter, or several (their outputs add up, in this order), the active ones.

    Active trainable adapters get `requires_grad=True`, the others `False`.
    """
    state = lora_state(model)
    names = _existing(state, adapter_names)
    if not names:
        raise AdapterError("set_active_adapters needs an adapter; lorakit.disable_adapters runs the base model")
    if any(layer.merged_adapters for _, layer in lora_layers(model)):
        raise MergeError("the model has merged adapters; unmerge it before changing the active adapters")
    state.active = names
    _apply_state(model, state)


def set_trainable(model: nn.Module, adapter_names: str | Sequence[str], trainable: bool) -> None:
    """Whether adapters train when active (their parameters' `requires_grad`)."""
    state = lora_state(model)
    for name in _existing(state, adapter_names):
        state.trainable[name] = bool(trainable)
    _update_trainable(model, state)


def _apply_state(model: nn.Module, state: LoraState) -> None:
    """Push the model's adapter state to every adapter module: the active adapters, disabled, and which
    parameters require grad (an active adapter's, if it trains, and the biases its `bias` mode trains)."""
    for module in _adapter_modules(model):
        module.set_active(state.active)
        module.set_disabled(state.disabled)
    _update_trainable(model, state)


def _update_trainable(model: nn.Module, state: LoraState) -> None:
    for module in _adapter_modules(model):
        for name in module.adapter_names:
            train = name in state.active and state.trainable.get(name, False)
            for param in module.adapter_parameters(name).values():
                param.requires_grad_(train)
    for name in state.active:
        if state.trainable.get(name):
            for param in bias_parameters(model, state.configs[name].bias).values():
                param.requires_grad_(True)


def bias_parameters(model: nn.Module, bias: str) -> dict[str, nn.Parameter]:
    """The base biases a `bias` mode trains (and peft saves with the adapter), by parameter name:
    none for `"none"`, those of LoRA-wrapped layers for `"lora_only"`, every base bias for `"all"`."""
    if bias == "none":
        return {}
    found: dict[str, nn.Parameter] = {}
    for name, param in model.named_parameters():
        if name.rsplit(".", 1)[-1] != "bias" or ".lora_" in f".{name}" or "modules_to_save." in name:
            continue  # adapter tensors (lora_B.bias, saved copies) belong to their adapter, not to `bias`
        if ".original_module." in f".{name}":
            continue
        if bias == "all" or name.endswith(".base_layer.bias"):
            found[name] = param
    return found


@contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model only, inside the `with` block; restore the previous state after, also on errors.

    Merged layers are unmerged (exactly) on entry and merged again on exit.
    """
    state = lora_state(model)
    was_disabled = state.disabled
    merged = [(layer, list(layer.merged_adapters)) for _, layer in lora_layers(model) if layer.merged_adapters]
    for layer, _ in merged:
        layer.unmerge()
    state.disabled = True
    for module in _adapter_modules(model):
        module.set_disabled(True)
    try:
        yield model
    finally:
        state.disabled = was_disabled
        for module in _adapter_modules(model):
            module.set_disabled(was_disabled)
        for layer, names in merged:
            layer.merge(names)


def delete_adapter(model: nn.Module, adapter_name: str) -> None:
    """Remove an adapter and its parameters. Nothing else changes: the other active adapters stay active.

    `AdapterError`, with nothing changed, for an adapter that is merged (unmerge first), the model's last
    adapter (`lorakit.unload(model)` removes the LoRA layers altogether), or its only active one (activate
    another first: lorakit does not pick one for you, and a model without active adapters would silently run
    as the base model). A PiSSA/OLoRA adapter gives back, to the bit, what it took out of the base weights
    (`AdapterError` if another such adapter changed them after it: delete that one first).
    """
    state = lora_state(model)
    _existing(state, adapter_name)
    for name, layer in lora_layers(model):
        if adapter_name in layer.merged_adapters:
            raise AdapterError(f"adapter {adapter_name!r} is merged (in {name!r}); unmerge before deleting it")
        try:
            layer.check_deletable(adapter_name)
        except AdapterError as error:
            raise AdapterError(f"{name!r}: {error}") from None
        if layer.adapter_stack is not None:
            raise AdapterError(f"{name!r} runs a mixed batch or X-LoRA; end it (remove_xlora) before deleting adapters")
    if list(state.configs) == [adapter_name]:
        raise AdapterError(
            f"adapter {adapter_name!r} is the model's last adapter; lorakit.unload(model) removes the LoRA layers "
            "(or add another adapter first)"
        )
    if state.active == [adapter_name]:
        others = [name for name in state.configs if name != adapter_name]
        raise AdapterError(
            f"adapter {adapter_name!r} is the only active adapter; activate another first, e.g. "
            f"lorakit.set_active_adapters(model, {others[0]!r}), then delete it"
        )
    for module in _adapter_modules(model):
        module.delete_adapter(adapter_name)
    del state.configs[adapter_name]
    state.trainable.pop(adapter_name, None)
    state.active = [n for n in state.active if n != adapter_name]


def watch_frozen_load(model: nn.Module) -> None:
    """After loading an adapter frozen (`load_adapter(..., trainable=False)`, the default) onto a plain model:
    the first training-mode forward with autograd on while nothing in the model requires grad warns, naming
    `trainable=True` (torch only says "element 0 of tensors does not require grad" at backward). A warning,
    not an error: a module in its default training mode run without `torch.no_grad()` may just be inference."""
    state = lora_state(model)

    def check(module: nn.Module, args: tuple) -> None:
        if not (module.training and torch.is_grad_enabled()):
            return
        state.frozen_load_check.remove()  # once: it has said what it had to, or training is set up
        state.frozen_load_check = None
        if not any(param.requires_grad for param in module.parameters()):
            warnings.warn(
                "the model runs in training mode with autograd on, but none of its parameters requires grad: its "
                "adapter was loaded with lorakit.load_adapter(..., trainable=False), the default. To train it, load "
                "it with trainable=True; for inference, call model.eval() or use torch.no_grad().",
                stacklevel=3,
            )

    state.frozen_load_check = model.register_forward_pre_hook(check)


def adapter_names(model: nn.Module) -> list[str]:
    """The model's adapters, in the order they were added."""
    return list(lora_state(model).configs)


def active_adapters(model: nn.Module) -> list[str]:
    return list(lora_state(model).active)


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """`(trainable, total)` parameter counts (each shared parameter counted once; a packed 4-bit weight counts the
    weights it holds, as peft counts them)."""
    params = list(check_module(model).parameters())
    return sum(weight_count(p) for p in params if p.requires_grad), sum(weight_count(p) for p in params)


# ----- merge ----------------------------------------------------------------------------------------------


def merge(model: nn.Module, adapter_names: Sequence[str] | str | None = None, safe: bool = False) -> None:
    """Merge adapters (the active ones by default) into the base weights; the forward then costs the base's.

    Already merged adapters are skipped: merging is idempotent. Everything that could fail is checked
    before any weight is written: a merge that cannot be represented (a grouped conv, `lora_bias` on a
    layer without bias), a weight shared with another module (tied weights), and with `safe=True` any
    non-finite result. While merged, each merged weight element costs about one extra byte, kept so that
    `unmerge` restores the original bits exactly.
    """
    state = lora_state(model)
    names = state.active if adapter_names is None else _existing(state, adapter_names)
    layers = [(n, layer) for n, layer in lora_layers(model) if any(a in layer.r for a in names)]
    owners = parameter_owners(model)
    for layer_name, layer in layers:
        if layer.adapter_stack is not None:
            raise MergeError(f"{layer_name!r} runs a mixed batch or X-LoRA, whose weights vary per row or token")
        _refuse_sharded(layer_name, layer, "merge")
        layer_names = [a for a in names if a in layer.r and a not in layer.merged_adapters]
        for adapter in layer_names:
            layer.check_mergeable(adapter)
        if layer_names:
            _check_not_tied(layer_name, layer, owners)
        if safe and layer_names:
            layer.check_merge_finite(layer_names)
    for _, layer in layers:
        layer.merge([a for a in names if a in layer.r])
    _warn_if_requantizing_lost_updates(layers)


_SHARDED_ADVICE = {
    "merge": "Save the adapter (lorakit.save_adapter, on every rank) and merge it into an unsharded model in one "
    "process, or merge before sharding",
    "unmerge": "Unmerge before sharding; a model merged and then sharded can only be used as it is",
}


def _refuse_sharded(layer_name: str, layer: LoraLayer, what: str) -> None:
    """Refuse `what` ("merge", "unmerge") on a layer whose parameters are sharded (FSDP2's DTensors): it writes
    whole weights."""
    sharded = [n for n, p in layer.named_parameters() if is_sharded(p)]
    if sharded:
        raise MergeError(
            f"cannot {what} {layer_name!r}: its parameters are sharded (FSDP2 DTensors: {sharded[0]}, ...), and "
            f"{what} writes whole weights. {_SHARDED_ADVICE[what]}"
        )


# A requantized merge that keeps less than this share of a layer's update is warned about.
MIN_RETAINED_UPDATE = 0.5


def _warn_if_requantizing_lost_updates(layers: list[tuple[str, LoraLayer]]) -> None:
    retention = [
        (name, layer.update_retention)
        for name, layer in layers
        if isinstance(layer, LoraQuantizedLinear) and layer.update_retention is not None
    ]
    lossy = sorted((kept.retained, name, kept) for name, kept in retention if kept.retained < MIN_RETAINED_UPDATE)
    if lossy:
        worst = "; ".join(f"{name} kept {kept.retained:.0%} (error {kept.error:.0%})" for _, name, kept in lossy[:5])
        warnings.warn(
            f"merging into quantized weights requantized them, and {len(lossy)} of {len(retention)} layers kept less "
            f"than {MIN_RETAINED_UPDATE:.0%} of the adapter's update: {worst}. The merged model computes something "
            "else than the adapter; keep the adapter unmerged, or merge into floating-point weights with "
            "lorakit.merge_and_unload(model, dequantize=True).",
            stacklevel=3,
        )


def _check_not_tied(layer_name: str, layer: LoraLayer, owners: dict[int, list[str]]) -> None:
    for param_name, param in layer.base_layer.named_parameters(recurse=False):
        others = [n for n in owners.get(id(param), []) if n != f"{layer_name}.base_layer"]
        if others:
            raise MergeError(
                f"cannot merge into {layer_name}.{param_name}: that parameter is shared with {', '.join(others)} "
                "(tied weights), which merging would silently change too. Untie the weights first or keep "
                "this adapter unmerged."
            )


def unmerge(model: nn.Module) -> None:
    """Restore every merged weight bit for bit. A no-op on a model with nothing merged."""
    lora_state(model)
    layers = list(lora_layers(model))
    for layer_name, layer in layers:
        if layer.merged_adapters:
            _refuse_sharded(layer_name, layer, "unmerge")
    for _, layer in layers:
        layer.unmerge()


def merge_and_unload(
    model: nn.Module, adapter_names: Sequence[str] | str | None = None, dequantize: bool = False
) -> nn.Module:
    """Merge adapters into the base weights and replace every LoRA layer by its plain base module.

    `modules_to_save` wrappers become the active adapter's trained copy. Returns `model`, a plain model again.
    A quantized base is requantized with the update, which may lose much of it (`merge` warns); with
    `dequantize=True` the model is dequantized first (`lorakit.dequantize`) and the adapters merge exactly into
    floating-point weights: the usual way to ship a model fine-tuned on a quantized base.
    """
    if dequantize:
        state = lora_state(model)  # what merge would refuse is refused before anything is dequantized
        if adapter_names is not None:
            _existing(state, adapter_names)
        _dequantize(model, dtype=None)
    merge(model, adapter_names)
    return _unwrap(model, keep_trained_copies=True)


def dequantize(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every quantized linear layer lorakit adapts (bitsandbytes 4-bit and 8-bit, torchao int8) by a plain
    `nn.Linear` computing with its dequantized weight `deq(W)`; return `model`.

    LoRA layers on such bases keep their adapters, the same parameter objects, on the new base (a merged adapter
    is unmerged first), so training, saving and merging go on exactly. `dtype` is that of the new weights; by
    default the model's own (a transformers model's `config.dtype`, else the dtype each layer was quantized from).
    A transformers model forgets its quantization config, so `save_pretrained` writes a plain checkpoint.
    """
    check_module(model)
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise LoraError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    return _dequantize(model, dtype)


def _dequantize(model: nn.Module, dtype: torch.dtype | None) -> nn.Module:
    if dtype is None:
        configured = getattr(getattr(model, "config", None), "dtype", None)
        dtype = configured if isinstance(configured, torch.dtype) and configured.is_floating_point else None
    parents = _parent_index(model)
    for _, module in list(candidate_modules(model)):
        if isinstance(module, LoraQuantizedLinear):
            module.unmerge()
            _replace(parents, module, module.moved_onto(LoraLinear, module.dequantized_base(dtype)))
        elif not isinstance(module, LoraLayer):
            layer_type = lora_layer_type_for(module)
            if layer_type is not None and issubclass(layer_type, LoraQuantizedLinear):
                _replace(parents, module, layer_type(module).dequantized_base(dtype))
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and callable(getattr(quantizer, "remove_quantization_config", None)):
        quantizer.remove_quantization_config(model)
    return model


def unload(model: nn.Module) -> nn.Module:
    """Drop every adapter (unmerging first) and put the original modules back, with every bit of their weights:
    what PiSSA/OLoRA adapters took out of the base weights is given back. Returns `model`."""
    unmerge(model)
    for _, layer in lora_layers(model):
        layer.restore_base_changes()
    return _unwrap(model, keep_trained_copies=False)


def _unwrap(model: nn.Module, keep_trained_copies: bool) -> nn.Module:
    state = lora_state(model)
    if state.frozen_load_check is not None:
        state.frozen_load_check.remove()
    for hook in state.fused_path_hooks.values():
        hook.remove()
    parents = _parent_index(model)
    for wrapper in list(_adapter_modules(model)):
        if isinstance(wrapper, LoraLayer):
            replacement = wrapper.base_layer
            wrapper.drop_merge_residuals()  # merged for good: nothing will be unmerged
        elif keep_trained_copies and wrapper.active_adapters:
            replacement = wrapper.modules_to_save[wrapper.active_adapters[0]]
        else:
            replacement = wrapper.original_module
        _replace(parents, wrapper, replacement)
    delattr(model, _STATE_ATTR)
    if isinstance(model.__dict__.get("save_pretrained"), AdapterSavePretrained):
        del model.save_pretrained  # the class's own again: a plain model saves its weights
    return model
