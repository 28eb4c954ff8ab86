"""LoRA on linear layers quantized by torchao to int8 weights (`quantize_(model, Int8WeightOnlyConfig())`).

The base stays an `nn.Linear` whose weight is a torchao `Int8Tensor`: int8 codes `(out, in)` and a float32 scale
per row (or one for the whole tensor), `deq(W) = codes · scale` in the model's dtype. The math, merge and unmerge
are those of `layers/quantized.py`; requantizing quantizes `deq(W) + ΔW` rounded to the model's dtype (what
quantizing a merged model of that dtype would see, and what peft does) with the same granularity.

This module imports torchao; `layers/__init__.py` loads it only for a layer with a torchao weight.
"""

from __future__ import annotations

import torch
from torch import nn
from torchao.quantization import Int8Tensor, PerRow, PerTensor

from ..errors import MergeError
from .quantized import LoraQuantizedLinear


def is_int8_weight_only(weight: torch.Tensor) -> bool:
    """Whether `weight` is a torchao int8 weight-only tensor (no activation quantization)."""
    return isinstance(weight, Int8Tensor) and weight.act_quant_kwargs is None


class LoraTorchaoInt8Linear(LoraQuantizedLinear):
    """LoRA around an `nn.Linear` whose weight torchao quantized to int8 (weight only)."""

    @property
    def dequantized_dtype(self) -> torch.dtype:
        return self.base_layer.weight.dtype  # a torchao tensor reports the dtype it was quantized from

    def dequantized_weight(self) -> torch.Tensor:
        return self.base_layer.weight.dequantize()

    def stored_tensors(self) -> list[torch.Tensor]:
        weight = self.base_layer.weight
        return [t for t in (weight.qdata, weight.scale, weight.zero_point) if t is not None]

    def _granularity(self) -> PerRow | PerTensor:
        weight = self.base_layer.weight
        block = list(weight.block_size)
        if block == [1, self.in_features]:
            return PerRow()
        if block == list(weight.shape):
            return PerTensor()
        raise MergeError(f"cannot requantize a torchao Int8Tensor with blocks of {block}: per row or per tensor only")

    def check_mergeable(self, name: str) -> None:
        super().check_mergeable(name)
        self._granularity()

    def quantized(self, weight: torch.Tensor) -> nn.Parameter:
        old = self.base_layer.weight
        new = Int8Tensor.from_hp(weight.to(old.dtype), granularity=self._granularity(), reduce_range=old.reduce_range)
        return nn.Parameter(new, requires_grad=False)
