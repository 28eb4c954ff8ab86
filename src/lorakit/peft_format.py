"""HuggingFace peft's naming of adapter tensors (design §4).

A tensor of adapter `name` on the module at path `P` is saved as `base_model.model.P.<suffix>`, where the
suffix is the parameter's name inside the LoRA layer with the adapter name taken out:
`lora_A.weight`, `lora_B.weight`, `lora_B.bias` (lora_bias), `lora_embedding_A`, `lora_embedding_B`; a
`modules_to_save` copy's parameters are saved as `base_model.model.P.<param>`, and with `bias="all"` or
`"lora_only"` the trained biases under their model paths (`P.base_layer.bias` inside a LoRA layer).
"""

from __future__ import annotations

import torch
from torch import nn

from .errors import AdapterError
from .layers import LoraLayer
from .layers.modules_to_save import ModulesToSave
from .model import lora_state

PEFT_PREFIX = "base_model.model."


def lora_state_dict(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """Adapter `adapter_name`'s tensors under peft's key names (detached; they share storage)."""
    state = lora_state(model)
    if adapter_name not in state.configs:
        raise AdapterError(f"unknown adapter {adapter_name!r}; this model has {sorted(state.configs)}")
    tensors: dict[str, torch.Tensor] = {}
    for path, module in model.named_modules():
        if isinstance(module, (LoraLayer, ModulesToSave)):
            for suffix, param in module.adapter_parameters(adapter_name).items():
                tensors[f"{PEFT_PREFIX}{path}.{suffix}"] = param.detach()
    bias = state.configs[adapter_name].bias
    if bias != "none":
        for path, param in model.named_parameters():
            if path.rsplit(".", 1)[-1] != "bias" or ".lora_" in path or "modules_to_save." in path:
                continue
            if (bias == "all" and ".original_module." not in f".{path}") or path.endswith(".base_layer.bias"):
                tensors[f"{PEFT_PREFIX}{path}"] = param.detach()
    return tensors
