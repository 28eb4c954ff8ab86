"""mistral.rs's X-LoRA layout: a flat directory and an ordering file, as mistral.rs 0.9.5 reads them."""

from __future__ import annotations

import json
import os
from pathlib import Path

from torch import nn

from ..errors import LoraError
from ..layers import LoraLinear
from ..xlora import CLASSIFIER_ATTR, xlora_state
from .files import as_path, replace_files
from .peft import adapter_files
from .xlora import CLASSIFIER_NAME, XLORA_CONFIG_NAME, check_expert_name, classifier_tensors

MISTRALRS_ORDERING_NAME = "ordering.json"


def export_xlora_mistralrs(model: nn.Module, directory: str | os.PathLike, base_model_id: str) -> Path:
    """Write an X-LoRA model in the flat layout mistral.rs 0.9.5 reads; return the ordering file's path.

    `directory` gets `xlora_config.json`, `xlora_classifier.safetensors` and, per expert,
    `<name>-adapter_config.json` and `<name>-adapter_model.safetensors`; `ordering.json` lists the experts
    and numbers the adapted layers in module order. `base_model_id` is the base model's directory exactly as
    it will be given to mistral.rs (it must match, as a string). Serve it with
    `mistralrs.Which.XLora(model_id=base_model_id, xlora_model_id=str(directory), order=<returned path>, …)`.

    Raises `LoraError` for what mistral.rs 0.9.5 cannot serve: `enable_softmax_topk`; an expert name that is
    part of another expert's or of a file name (it reads every file whose name contains an expert's name);
    a depth-2 classifier whose `xlora_size` is not the hidden size; experts on layers other than Linear.
    """
    from safetensors.torch import save as safetensors_bytes

    state = xlora_state(model)
    config = state.config
    classifier = getattr(model, CLASSIFIER_ATTR)
    experts = [check_expert_name(name) for name in state.experts]
    _check_servable(model, experts)
    tensors = classifier_tensors(model, "xlora")
    if config.xlora_depth >= 3:  # mistral.rs numbers the hidden layers from 1 at depth 3 and more
        tensors = {_renumber_inner(key): value for key, value in tensors.items()}
    fields = {
        **config.to_dict(),
        "hidden_size": classifier.hidden_size,
        "adapters": {name: name for name in experts},
        "base_model_id": base_model_id,
        "enable_relu_and_dropout": config.xlora_depth > 1,
        "use_bias": True,
        "xlora_dropout_p": 0.0,  # mistral.rs applies the classifier's dropout at inference too
        "xlora_size": config.xlora_size,
    }
    ordering = {
        "order": experts,
        "layers": {name: index for index, (name, _) in enumerate(state.layers)},
        "base_model_id": base_model_id,
    }
    files = {
        XLORA_CONFIG_NAME: json.dumps(fields, indent=2).encode() + b"\n",
        CLASSIFIER_NAME: safetensors_bytes(tensors, metadata={"format": "pt"}),
        MISTRALRS_ORDERING_NAME: json.dumps(ordering, indent=2).encode() + b"\n",
    }
    for name in experts:
        for file_name, data in adapter_files(model, name).items():
            files[f"{name}-{file_name}"] = data
    directory = as_path(directory, "directory")
    replace_files(directory, files)
    return directory / MISTRALRS_ORDERING_NAME


def _check_servable(model: nn.Module, experts: list[str]) -> None:
    """A `LoraError` for what mistral.rs 0.9.5 cannot serve (see `export_xlora_mistralrs`)."""
    state = xlora_state(model)
    config, classifier = state.config, getattr(model, CLASSIFIER_ATTR)
    own_files = (XLORA_CONFIG_NAME, CLASSIFIER_NAME, MISTRALRS_ORDERING_NAME)
    if config.enable_softmax_topk:
        raise LoraError("mistral.rs 0.9.5 refuses enable_softmax_topk; export a config without it")
    for name in experts:
        clashes = [other for other in [*experts, *own_files] if other != name and name in other]
        if clashes:
            raise LoraError(
                f"expert name {name!r} is part of {clashes}: mistral.rs reads every file whose name contains an "
                "expert's name; rename the experts"
            )
    if config.xlora_depth == 2 and config.xlora_size != classifier.hidden_size:
        raise LoraError(
            f"mistral.rs 0.9.5 needs xlora_size == hidden_size ({classifier.hidden_size}) for a depth-2 "
            f"classifier, got {config.xlora_size}"
        )
    for name, layer in state.layers:
        if not isinstance(layer, LoraLinear):
            raise LoraError(f"mistral.rs serves X-LoRA experts on linear layers; {name!r} is a {type(layer).__name__}")


def _renumber_inner(key: str) -> str:
    if not key.startswith("inner."):
        return key
    _, index, rest = key.split(".", 2)
    return f"inner.{int(index) + 1}.{rest}"
