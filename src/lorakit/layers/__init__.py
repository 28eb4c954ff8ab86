"""LoRA layers, one file per kind of base layer, and the table that picks one for a module."""

from __future__ import annotations

import importlib

from torch import nn

from ..errors import LoraError
from .attention import LoraMultiheadAttention
from .base import AdapterModule, LoraLayer, adapter_dtype, adapter_factory
from .conv import LoraConv
from .embedding import LoraEmbedding
from .linear import LoraLinear, is_transformers_conv1d
from .parameters import LoraParameters
from .quantized import QUANTIZED_BASES, LoraQuantizedLinear, UpdateRetention, quantization_of, weight_count
from .stack import AdapterStack

__all__ = [
    "QUANTIZED_BASES",
    "AdapterModule",
    "AdapterStack",
    "LoraConv",
    "LoraEmbedding",
    "LoraLayer",
    "LoraLinear",
    "LoraMultiheadAttention",
    "LoraParameters",
    "LoraQuantizedLinear",
    "UpdateRetention",
    "adapter_dtype",
    "adapter_factory",
    "lora_layer_type_for",
    "quantization_of",
    "register_lora_layer",
    "weight_count",
]

_LAYER_TYPES: dict[type[nn.Module], type[LoraLayer]] = {
    nn.Linear: LoraLinear,
    nn.Embedding: LoraEmbedding,
    nn.Conv1d: LoraConv,
    nn.Conv2d: LoraConv,
    nn.Conv3d: LoraConv,
    nn.MultiheadAttention: LoraMultiheadAttention,
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
    found: type[LoraLayer] | None = None
    for cls in type(module).__mro__:
        if cls in _LAYER_TYPES:
            found = _LAYER_TYPES[cls]
            break
        optional = _OPTIONAL_LAYER_TYPES.get(f"{cls.__module__}.{cls.__qualname__}")
        if optional is not None:
            return _import_layer_type(*optional)
    else:
        if is_transformers_conv1d(module):
            found = LoraLinear
    if found in _FLOAT_LAYER_TYPES and quantization_of(module) is not None:
        return _quantized_weight_layer_type(module)
    return found


# LoRA layers for quantized layers of optional libraries, by the base class's qualified name: their module
# (importing the library) is loaded only when a model has such a layer.
_OPTIONAL_LAYER_TYPES: dict[str, tuple[str, str]] = {
    "bitsandbytes.nn.modules.Linear4bit": ("bnb", "LoraLinear4bit"),
    "bitsandbytes.nn.modules.Linear8bitLt": ("bnb", "LoraLinear8bitLt"),
}
_FLOAT_LAYER_TYPES = (LoraLinear, LoraEmbedding, LoraConv)


def _import_layer_type(module_name: str, class_name: str) -> type[LoraLayer]:
    return getattr(importlib.import_module(f"{__name__}.{module_name}"), class_name)


def _quantized_weight_layer_type(module: nn.Module) -> type[LoraLayer] | None:
    """For a built-in module kind whose weight is quantized: torchao's int8 weight-only `nn.Linear`, else None."""
    weight_library = type(module._parameters.get("weight")).__module__.split(".")[0]
    if weight_library != "torchao" or not isinstance(module, nn.Linear):
        return None
    from .torchao import LoraTorchaoInt8Linear, is_int8_weight_only

    return LoraTorchaoInt8Linear if is_int8_weight_only(module.weight) else None
