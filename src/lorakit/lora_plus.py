"""LoRA+ (Hayou, Ghosh and Yu, 2024): B learns faster than A. Optimizer parameter groups, as peft makes them.

In a LoRA layer `y = W x + s · B A x`, B starts at zero and A at random, and the paper shows that updating B with
a learning rate `lr_ratio` times A's (16 by default) trains faster and better. `lora_plus_param_groups` returns the
groups peft's `create_loraplus_optimizer` builds, in its order, for any torch optimizer:

- A (`lr`, `weight_decay`): the trainable matrices other than B: every `lora_A`, the weights of
  `modules_to_save` copies;
- embedding (`lr_embedding`, `weight_decay`): the adapters of LoRA embedding layers;
- B (`lr · lr_ratio`, `weight_decay`): every `lora_B` and every other trainable vector (1-D) that is neither
  a bias nor inside an `nn.LayerNorm`;
- B without decay (`lr · lr_ratio`, weight decay 0): the other `lora_B` and vectors (biases, LayerNorm
  parameters).
"""

from __future__ import annotations

import math
from typing import Any

from torch import nn

from .errors import LoraError
from .layers import LoraEmbedding
from .model import lora_state


def lora_plus_param_groups(
    model: nn.Module, lr: float, lr_ratio: float = 16.0, lr_embedding: float = 1e-6, weight_decay: float = 0.0
) -> list[dict[str, Any]]:
    """The LoRA+ parameter groups of `model`'s trainable parameters (module doc): pass them to any optimizer,
    `torch.optim.AdamW(lorakit.lora_plus_param_groups(model, lr=2e-4))`."""
    lora_state(model)
    for name, value in (("lr", lr), ("lr_ratio", lr_ratio), ("lr_embedding", lr_embedding)):
        _check_number(name, value, positive=True)
    _check_number("weight_decay", weight_decay, positive=False)
    outside_layer_norms = set(_names_outside_layer_norms(model))
    embedding_adapters = {
        id(param) for module in model.modules() if isinstance(module, LoraEmbedding) for param in module.parameters()
    }
    groups: dict[str, list[nn.Parameter]] = {"A": [], "embedding": [], "B": [], "B, no decay": []}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if id(param) in embedding_adapters:
            groups["embedding"].append(param)
        elif "lora_B" in name or param.ndim == 1:
            decays = name in outside_layer_norms and "bias" not in name
            groups["B" if decays else "B, no decay"].append(param)
        else:
            groups["A"].append(param)
    return [
        {"params": groups["A"], "weight_decay": weight_decay, "lr": lr},
        {"params": groups["embedding"], "weight_decay": weight_decay, "lr": lr_embedding},
        {"params": groups["B"], "weight_decay": weight_decay, "lr": lr * lr_ratio},
        {"params": groups["B, no decay"], "weight_decay": 0.0, "lr": lr * lr_ratio},
    ]


def _names_outside_layer_norms(module: nn.Module, prefix: str = "") -> list[str]:
    """The names of the parameters of `module` that no `nn.LayerNorm` on their path holds."""
    names = [prefix + name for name in module._parameters]
    for child_name, child in module.named_children():
        if not isinstance(child, nn.LayerNorm):
            names += _names_outside_layer_norms(child, f"{prefix}{child_name}.")
    return names


def _check_number(name: str, value: object, positive: bool) -> None:
    valid = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not valid or (value <= 0 if positive else value < 0):
        raise LoraError(f"{name} must be a {'positive' if positive else 'non-negative'} number, got {value!r}")
