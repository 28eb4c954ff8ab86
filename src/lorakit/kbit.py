"""Training set-up for a quantized base (QLoRA): `prepare_model_for_kbit_training`, as peft names and does it."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .layers import quantization_of
from .model import check_module


def prepare_model_for_kbit_training(
    model: nn.Module,
    use_gradient_checkpointing: bool = True,
    gradient_checkpointing_kwargs: dict[str, Any] | None = None,
) -> nn.Module:
    """Prepare a model with a quantized base for LoRA training, as peft's function of the same name does; call it
    before `get_lora_model`. Returns `model`.

    1. Freezes every parameter.
    2. Casts every float16 or bfloat16 parameter that is not part of a quantized layer's weight to float32: the
       norms, embeddings, head and biases (peft's convention, for stable training in half precision; it costs
       their memory twice over). Quantized layers still compute in their own compute dtype.
    3. With `use_gradient_checkpointing`, on a model that has it (transformers): makes the input embeddings' output
       require grad, which reentrant checkpointing needs to pass gradients through frozen layers (unless
       `gradient_checkpointing_kwargs` says `use_reentrant=False`), then enables gradient checkpointing with
       `gradient_checkpointing_kwargs`.
    """
    check_module(model)
    kwargs = dict(gradient_checkpointing_kwargs or {})
    for param in model.parameters():
        param.requires_grad_(False)
    for module in model.modules():
        quantized_weight = quantization_of(module) is not None
        for name, param in module.named_parameters(recurse=False):
            if param.dtype in (torch.float16, torch.bfloat16) and not (quantized_weight and name == "weight"):
                param.data = param.data.to(torch.float32)
    if use_gradient_checkpointing and callable(getattr(model, "gradient_checkpointing_enable", None)):
        if kwargs.get("use_reentrant", True) and callable(getattr(model, "enable_input_require_grads", None)):
            model.enable_input_require_grads()
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable(kwargs or None)  # None: the model's default (transformers: use_reentrant=False)
    return model
