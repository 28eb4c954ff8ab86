"""Which modules an adapter goes on: peft's matching rules, `"all-linear"`, and per-family defaults."""

from __future__ import annotations

import difflib
import re

try:  # the standard library's regex parser, to inspect a pattern without running it
    from re import _parser as _regex_parser  # Python 3.11+
except ImportError:  # Python 3.10
    import sre_parse as _regex_parser  # type: ignore[no-redef]
from collections.abc import Iterator
from typing import Any

from torch import nn

from .config import LoraConfig
from .errors import TargetError
from .layers import QUANTIZED_BASES, LoraLayer, lora_layer_type_for, quantization_of
from .layers.linear import is_transformers_conv1d
from .layers.modules_to_save import ModulesToSave
from .layers.parameters import LoraParameters

ALL_LINEAR = "all-linear"

#: `target_modules=None` uses this table, keyed by `model.config.model_type`. Attention's query and value
#: projections are the LoRA paper's choice and peft's defaults; models that fuse q, k and v into one
#: projection get that projection; resnet (no attention) gets its convolutions.
DEFAULT_TARGET_MODULES: dict[str, list[str]] = {
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "falcon": ["query_key_value"],
    "bert": ["query", "value"],
    "stablelm": ["q_proj", "v_proj"],
    "t5": ["q", "v"],
    "dinov2": ["q_proj", "v_proj", "query", "value"],  # transformers 5 names; 4.x: query, value
    "resnet": ["convolution"],
    "mpt": ["Wqkv"],
    "blip": ["qkv", "query", "value"],
    "gpt_bigcode": ["c_attn"],
    # mixture-of-experts families: attention here; the experts' fused 3-D weights through target_parameters
    "mixtral": ["q_proj", "v_proj"],
    "qwen3_moe": ["q_proj", "v_proj"],
    "gpt_oss": ["q_proj", "v_proj"],
}

# Heads that "all-linear" leaves alone for sequence classification (peft's list).
_SEQ_CLS_HEADS = ("classifier", "score")


def _entry_matches(entry: str, name: str) -> bool:
    """peft's rule for one entry of a list: the module's full name, or its ending after a dot."""
    return name == entry or name.endswith("." + entry)


def _matches(pattern: list[str] | str, name: str) -> bool:
    if isinstance(pattern, str):
        return re.fullmatch(pattern, name) is not None
    return any(_entry_matches(entry, name) for entry in pattern)


def _layer_index(config: LoraConfig, name: str) -> int | None:
    patterns = config.layers_pattern
    if not patterns:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    else:
        patterns = [patterns] if isinstance(patterns, str) else patterns
        match = None
        for pattern in patterns:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", name)
            if match:
                break
    return int(match.group("idx")) if match else None


def _in_layers(config: LoraConfig, name: str) -> bool:
    layers = config.layers_to_transform
    if layers is None or (isinstance(layers, list) and not layers):
        return True
    index = _layer_index(config, name)
    if index is None:
        return False
    return index == layers if isinstance(layers, int) else index in layers


def is_module_to_save(config: LoraConfig, name: str) -> bool:
    """Whether module `name` is one of `config.modules_to_save` (named in full, or by its ending after a dot)."""
    return any(_entry_matches(entry, name) for entry in config.modules_to_save or [])


def _inside_module_to_save(config: LoraConfig, name: str) -> bool:
    """Whether module `name` is a module to save or inside one: it gets a full copy, not LoRA."""
    return any(f".{entry}." in f".{name}." for entry in config.modules_to_save or [])


def is_targeted(config: LoraConfig, name: str) -> bool:
    """peft's rule: excluded first; a regex fullmatches; a list matches exactly or as a suffix."""
    if config.exclude_modules and _matches(config.exclude_modules, name):
        return False
    if _inside_module_to_save(config, name):
        return False
    targets = config.target_modules
    if targets is None:
        return False
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    if name in targets:
        return True
    return _matches(targets, name) and _in_layers(config, name)


def candidate_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Named modules a target may be: LoRA layers themselves, never their insides or saved copies, and never the
    insides of an `nn.MultiheadAttention` (its forward reads `out_proj`'s weight and never calls it, so LoRA there
    would do nothing: target the attention module)."""
    skip: list[str] = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(prefix) for prefix in skip):
            continue
        if isinstance(module, (LoraLayer, ModulesToSave, nn.MultiheadAttention)):
            skip.append(name + ".")
            if isinstance(module, ModulesToSave):
                continue
        yield name, module


def _output_embedding_names(model: nn.Module, config: LoraConfig) -> set[str]:
    names: set[str] = set()
    get_output = getattr(model, "get_output_embeddings", None)
    output = get_output() if callable(get_output) else None
    heads = [output] if output is not None else []
    if output is None and str(config.task_type or "").upper() == "SEQ_CLS":
        heads = [getattr(model, h) for h in _SEQ_CLS_HEADS if isinstance(getattr(model, h, None), nn.Module)]
    for name, module in model.named_modules():
        if any(module is head for head in heads):
            names.add(name)
    return names


def parameter_owners(model: nn.Module) -> dict[int, list[str]]:
    """`id(parameter) → [name of each module holding it as its own]`, each module once. A parameter with two
    owners is tied (an output projection sharing the word embeddings' weight)."""
    owners: dict[int, list[str]] = {}
    for name, module in model.named_modules():
        for param in module.parameters(recurse=False):  # its own, not a LoRA layer's view of its base's
            owners.setdefault(id(param), []).append(name)
    return owners


def _tied_module_names(model: nn.Module) -> set[str]:
    """Modules whose weight is shared with another module."""
    tied = {name for names in parameter_owners(model).values() if len(names) > 1 for name in names}
    # a LoRA layer's name stands for its base layer's
    return tied | {name.removesuffix(".base_layer") for name in tied}


def expand_all_linear(model: nn.Module, config: LoraConfig) -> LoraConfig:
    """Replace `target_modules="all-linear"` by the explicit list of Linear/Conv1D names, as peft saves it.

    Left out, as in peft: the output embedding (`lm_head`), and for `task_type="SEQ_CLS"` the classifier
    head. Left out by lorakit too: any Linear whose weight is tied to another module's, which merging would
    change for both."""
    if not (isinstance(config.target_modules, str) and config.target_modules.lower() == ALL_LINEAR):
        return config
    excluded = _output_embedding_names(model, config) | _tied_module_names(model)
    names = sorted(
        name
        for name, module in candidate_modules(model)
        if name not in excluded
        and (
            isinstance(module, nn.Linear)
            or is_transformers_conv1d(module)
            or (isinstance(module, LoraLayer) and isinstance(module.base_layer, nn.Linear))
        )
    )
    if not names:
        raise TargetError(f"target_modules='all-linear' found no Linear layer in {type(model).__name__}")
    return config.replace(target_modules=names)


def resolve_config(model: nn.Module, config: LoraConfig) -> LoraConfig:
    """`config`, written by the user, with `target_modules` made explicit: the family default for None, the
    list for all-linear. An entry of a `target_modules` list that matches no module, or a `layers_to_transform`
    index the model does not have, is a `TargetError` naming them. (A config read from a file is checked
    against its tensors instead: `formats.peft.plan_from_file`.)"""
    if config.target_modules is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in DEFAULT_TARGET_MODULES and config.target_parameters:
            return config.replace(target_modules=[])  # peft's rule: then the parameters alone
        if model_type not in DEFAULT_TARGET_MODULES:
            known = ", ".join(sorted(DEFAULT_TARGET_MODULES))
            raise TargetError(
                f"target_modules=None needs a known model family, and {type(model).__name__} "
                f"(model_type={model_type!r}) is not one of: {known}. Pass target_modules explicitly."
            )
        # as listed: the table names both transformers 4's and 5's modules, some of which this model lacks
        return config.replace(target_modules=list(DEFAULT_TARGET_MODULES[model_type]))
    if isinstance(config.target_modules, list):
        names = [name for name, _ in candidate_modules(model)]
        _check_entries_match(model, config, names)
        _check_layers_exist(config, names)
    return expand_all_linear(model, config)


def _check_entries_match(model: nn.Module, config: LoraConfig, names: list[str]) -> None:
    unmatched = [entry for entry in config.target_modules if not any(_entry_matches(entry, name) for name in names)]
    if unmatched:
        raise TargetError(
            f"target_modules entries {unmatched} matched no module of {type(model).__name__} (an entry matches a "
            f"module's full name or its ending after a dot).{_closest_names(model, unmatched)}"
        )


def _check_layers_exist(config: LoraConfig, names: list[str]) -> None:
    wanted = config.layers_to_transform
    if wanted is None or wanted == []:
        return  # as in peft, layers_to_transform restricts list targets only
    have = _layer_indices(config, names)
    if not have:
        raise TargetError(
            f"layers_to_transform={wanted} needs layer indices in the names of the modules target_modules matches, "
            f"and layers_pattern={config.layers_pattern!r} finds none in them"
        )
    missing = sorted(set([wanted] if isinstance(wanted, int) else wanted) - have)
    if missing:
        raise TargetError(
            f"layers_to_transform={wanted}: the model has no layer {missing} among the modules target_modules "
            f"matches (layers_pattern={config.layers_pattern!r}); its layers are {_span(sorted(have))}"
        )


def _layer_indices(config: LoraConfig, names: list[str]) -> set[int]:
    """The layer indices, per `layers_pattern`, of the modules a `target_modules` list matches."""
    matched = [name for name in names if _matches(config.target_modules, name)]
    return {index for index in (_layer_index(config, name) for name in matched) if index is not None}


def _span(indices: list[int]) -> str:
    contiguous = indices == list(range(indices[0], indices[-1] + 1))
    return f"{indices[0]}–{indices[-1]}" if contiguous and len(indices) > 2 else ", ".join(map(str, indices))


def find_targets(model: nn.Module, config: LoraConfig) -> list[tuple[str, nn.Module]]:
    """The `(name, module)` pairs `config` targets; a clear `TargetError` if none or one is unsupported
    (`target_modules=[]` beside `target_parameters` targets no module)."""
    candidates = list(candidate_modules(model))
    targets = [(name, module) for name, module in candidates if is_targeted(config, name)]
    if not targets and config.target_parameters and config.target_modules == []:
        return []
    if not targets:
        raise TargetError(_nothing_matched(model, config, [name for name, _ in candidates]))
    for name, module in targets:
        check_adaptable(name, module)
    return targets


def find_parameter_targets(model: nn.Module, config: LoraConfig) -> list[tuple[str, nn.Module, list[str]]]:
    """`(module name, module, its parameter names)` for `config.target_parameters`: the parameters a module holds
    itself whose full name (`mlp.experts.down_proj`) is an entry or ends with `"." + entry`, as in peft. A
    `TargetError` for an entry that matches nothing and for a module that `target_modules` adapts as well."""
    entries = config.target_parameters or []
    found, matched = [], set()
    for name, module in candidate_modules(model):
        holder = module.base_layer if isinstance(module, LoraParameters) else module
        params = []
        for param_name, _ in holder.named_parameters(recurse=False):
            hits = [entry for entry in entries if _entry_matches(entry, f"{name}.{param_name}")]
            matched.update(hits)
            if hits:
                params.append(param_name)
        if not params:
            continue
        if is_targeted(config, name) or (isinstance(module, LoraLayer) and not isinstance(module, LoraParameters)):
            raise TargetError(
                f"module {name!r} is targeted as a module (target_modules, or an adapter already on it) and its "
                f"parameters {params} by target_parameters; target one or the other"
            )
        found.append((name, module, params))
    unmatched = [entry for entry in entries if entry not in matched]
    if unmatched:
        raise TargetError(
            f"target_parameters entries {unmatched} matched no parameter of {type(model).__name__}'s modules (an "
            "entry matches a parameter's full name, such as 'model.layers.0.mlp.experts.down_proj', or its ending "
            "after a dot; a parameter of the top-level module cannot be targeted)"
        )
    return found


def check_adaptable(name: str, module: nn.Module) -> None:
    """A `TargetError` naming module `name` and its type if lorakit cannot put LoRA on it."""
    if isinstance(module, LoraLayer) or lora_layer_type_for(module) is not None:
        return
    type_name = f"{type(module).__module__}.{type(module).__qualname__}"
    quantization = quantization_of(module)
    if quantization is not None:
        raise TargetError(
            f"module {name!r} is a quantized layer ({type_name}, {quantization}) that lorakit has no LoRA layer for. "
            f"lorakit adapts {QUANTIZED_BASES}. Target the model before quantizing it, leave this module out of "
            "target_modules, or add support with lorakit.register_lora_layer(YourType, YourLoraLayer)."
        )
    raise TargetError(
        f"module {name!r} of type {type_name} is targeted, but lorakit has no LoRA layer for that type. Target "
        "its Linear/Conv/Embedding children instead, or add support with "
        "lorakit.register_lora_layer(YourType, YourLoraLayer)."
    )


def is_plain_pattern(pattern: str) -> bool:
    """Whether matching `pattern` against a module name takes little time, whoever wrote it: no backreference
    or lookaround, every repeat over a single character (`.*`, `\\d+`, `[ab]?`), at most two unbounded repeats
    and at most 1,000 characters. Such a pattern cannot backtrack catastrophically (as `(.|.)*z` does); the
    usual peft patterns (`q_proj`, `layers\\.1\\.q_proj`, `.*\\.(q|v)_proj`) are plain. lorakit evaluates no
    other pattern from an adapter file."""
    if len(pattern) > 1000:
        return False
    try:
        parsed = _regex_parser.parse(pattern)
    except Exception:
        return False
    return _plain_items(parsed, [2])


def _plain_items(items: Any, unbounded_left: list[int]) -> bool:
    for op, arg in items:
        if op in _REPEATS:
            _, high, body = arg
            if len(body) != 1 or body[0][0] not in _SINGLE_CHARACTER:
                return False
            if high == _regex_parser.MAXREPEAT:
                unbounded_left[0] -= 1
                if unbounded_left[0] < 0:
                    return False
        elif op == _regex_parser.SUBPATTERN:
            if not _plain_items(arg[-1], unbounded_left):
                return False
        elif op == _regex_parser.BRANCH:
            if not all(_plain_items(branch, unbounded_left) for branch in arg[1]):
                return False
        elif op not in _SINGLE_CHARACTER and op != _regex_parser.AT:
            return False  # backreferences, lookarounds, conditionals, atomic groups
    return True


_REPEATS = {
    getattr(_regex_parser, name)
    for name in ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT")
    if hasattr(_regex_parser, name)
}
_SINGLE_CHARACTER = {getattr(_regex_parser, name) for name in ("LITERAL", "NOT_LITERAL", "ANY", "IN", "CATEGORY")}


def _nothing_matched(model: nn.Module, config: LoraConfig, names: list[str]) -> str:
    target = config.target_modules
    if isinstance(target, str):
        return (
            f"target_modules={target!r} matched no module. A string is a regular expression that must match a "
            f"module's whole name (such as {_example(names)!r}); to match modules by the end of their names, pass "
            f"a list: target_modules=[{target!r}].{_closest_names(model, [target])}"
        )
    if config.layers_to_transform not in (None, []) and any(_matches(target, name) for name in names):
        indices = _layer_indices(config, names)
        found = f"their layers are {_span(sorted(indices))}" if indices else "layers_pattern finds no index in them"
        return (
            f"layers_to_transform={config.layers_to_transform} (layers_pattern={config.layers_pattern!r}) "
            f"leaves none of the modules target_modules={target} matches: {found}"
        )
    return f"target_modules={target!r} matched no module of the model.{_closest_names(model, target or [])}"


def _example(names: list[str]) -> str:
    """A representative full module name: the deepest one."""
    return max(names, key=lambda name: (name.count("."), name), default="")


def _closest_names(model: nn.Module, entries: list[str]) -> str:
    """Module names close to `entries`, and the name endings of the modules lorakit can adapt."""
    adaptable = [name for name, module in candidate_modules(model) if _adaptable(module)]
    leaves = sorted({name.rsplit(".", 1)[-1] for name in adaptable})
    close: list[str] = []
    for entry in entries:
        close += difflib.get_close_matches(entry.rsplit(".", 1)[-1], leaves, n=5, cutoff=0.5)
        close += difflib.get_close_matches(entry, adaptable, n=3, cutoff=0.6)
    hint = f" Closest module names: {', '.join(dict.fromkeys(close))}." if close else ""
    shown = ", ".join(leaves[:30]) + (" …" if len(leaves) > 30 else "")
    return f"{hint} Name endings of the modules lorakit can adapt here: {shown}"


def _adaptable(module: nn.Module) -> bool:
    return isinstance(module, LoraLayer) or lora_layer_type_for(module) is not None
