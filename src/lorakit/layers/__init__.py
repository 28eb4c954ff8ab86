"""LoRA layers, one file per kind of base layer, and the table that picks one for a module."""

from __future__ import annotations

from torch import nn

from ..errors import LoraError
from .base import AdapterModule, LoraLayer, adapter_dtype
from .conv import LoraConv
from .embedding import LoraEmbedding
from .linear import LoraLinear, is_transformers_conv1d
from .stack import AdapterStack

__all__ = [
    "AdapterModule",
    "AdapterStack",
    "LoraConv",
    "LoraEmbedding",
    "LoraLayer",
    "LoraLinear",
    "adapter_dtype",
    "lora_layer_type_for",
    "register_lora_layer",
]

_LAYER_TYPES: dict[type[nn.Module], type[LoraLayer]] = {
    nn.Linear: LoraLinear,
    nn.Embedding: LoraEmbedding,
    nn.Conv1d: LoraConv,
    nn.Conv2d: LoraConv,
    nn.Conv3d: LoraConv,
}


def register_lora_layer(base_type: type[nn.Module], lora_type: type[LoraLayer]) -> None:
    """Teach lorakit to adapt modules of `base_type` with `lora_type`.

    `lora_type` subclasses `LoraLayer`, takes the base module as its only constructor argument and
    implements `create_adapter`, `add_adapter_output` and `delta_weights` (see `LoraLayer`). The most
    specific registered class in a module's MRO wins, so registering a subclass of `nn.Linear` overrides
    the built-in layer for it. Registering the same base type again replaces the earlier entry.
    """
    if not (isinstance(base_type, type) and issubclass(base_type, nn.Module)):
        raise LoraError(f"register_lora_layer: base_type must be an nn.Module subclass, got {base_type!r}")
    if not (isinstance(lora_type, type) and issubclass(lora_type, LoraLayer)):
        raise LoraError(f"register_lora_layer: lora_type must be a subclass of lorakit.LoraLayer, got {lora_type!r}")
    _LAYER_TYPES[base_type] = lora_type


def lora_layer_type_for(module: nn.Module) -> type[LoraLayer] | None:
    """The LoRA layer class for `module`, or None when lorakit cannot adapt it."""
    for cls in type(module).__mro__:
        if cls in _LAYER_TYPES:
            return _LAYER_TYPES[cls]
    if is_transformers_conv1d(module):
        return LoraLinear
    return None
