"""LoRA on bitsandbytes' quantized linear layers: `Linear4bit` (nf4 or fp4, with or without double quantization
of the block scales, any compute dtype) and `Linear8bitLt` (int8 rows with a float32 scale per row).

The math, merge and unmerge are those of `layers/quantized.py`. Per kind:

- 4-bit: `W` is stored packed, two 4-bit codes a byte, `(out·in/2, 1)`, with one absmax per block of
  `blocksize` weights (itself 8-bit quantized with double quantization). `deq(W)` is bitsandbytes'
  `dequantize_4bit`, in the dtype the weight had before quantizing; requantizing quantizes the float32 sum
  with the same block size, data type, storage type and double quantization.
- 8-bit: `W ≈ CB · SCB / 127` row by row, `CB` int8 `(out, in)`, `SCB` float32 `(out,)`; requantizing goes
  through float16, as bitsandbytes does. The layer keeps `CB` and `SCB` in its matmul state after its first
  forward, so taking and putting back the weight moves both.

This module imports bitsandbytes; `layers/__init__.py` loads it only for a bitsandbytes layer.
"""

from __future__ import annotations

import bitsandbytes as bnb
import bitsandbytes.functional as bnb_functional
import torch
from torch import nn

from ..errors import LoraError
from .quantized import LoraQuantizedLinear, QuantizedOriginal, tensor_bytes


class LoraLinear4bit(LoraQuantizedLinear):
    """LoRA around a bitsandbytes `Linear4bit` (and its `LinearNF4`/`LinearFP4` subclasses)."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        # On CPUs with AVX512-BF16, bitsandbytes 0.50 repacks a 4-bit weight in place at the first inference
        # forward. From then on `dequantize_4bit` reads it wrongly (a merge would be garbage) and the layer
        # passes no gradient to its input (training after an evaluation silently stops the adapters below it).
        # Keep the weight in its standard layout. One that is already repacked is converted back, which
        # bitsandbytes does whenever the layer's state is saved (its one public way back); the repacking rounded
        # its block scales to bfloat16, though, so that base computes with weights ~0.1% off a fresh load's.
        base_layer.support_avx512bf16_for_cpu = False
        if getattr(base_layer.weight.quant_state, "packing_format_for_cpu", False):
            base_layer.state_dict()

    @property
    def dequantized_dtype(self) -> torch.dtype:
        return self.base_layer.weight.quant_state.dtype

    def dequantized_weight(self) -> torch.Tensor:
        weight = self.base_layer.weight
        return bnb_functional.dequantize_4bit(weight.data, weight.quant_state)

    def quantized(self, weight: torch.Tensor) -> nn.Parameter:
        old = self.base_layer.weight
        new = bnb.nn.Params4bit(
            weight.to("cpu"), requires_grad=False, blocksize=old.blocksize, compress_statistics=old.compress_statistics,
            quant_type=old.quant_type, quant_storage=old.quant_storage, module=self.base_layer,
        ).to(old.device)  # fmt: skip
        new.quant_state.dtype = old.quant_state.dtype  # dequantize to the model's dtype, as before the merge
        return new

    def stored_tensors(self) -> list[torch.Tensor]:
        weight = self.base_layer.weight
        state = weight.quant_state.as_dict(packed=True)  # absmax, the code table, nested statistics
        return [weight.data, *(value for value in state.values() if isinstance(value, torch.Tensor))]

    def put_weight(self, original: QuantizedOriginal) -> None:
        self.base_layer.weight = original.weight
        self.base_layer.quant_state = original.weight.quant_state  # Linear4bit keeps a reference of its own


class LoraLinear8bitLt(LoraQuantizedLinear):
    """LoRA around a bitsandbytes `Linear8bitLt` with int8 weights (`has_fp16_weights=False`)."""

    def __init__(self, base_layer: nn.Module) -> None:
        if base_layer.state.has_fp16_weights:
            raise LoraError(
                "a bitsandbytes Linear8bitLt with has_fp16_weights=True keeps (and trains) float16 weights: lorakit "
                "adapts the int8 layers that has_fp16_weights=False (transformers' load_in_8bit) gives"
            )
        super().__init__(base_layer)

    @property
    def dequantized_dtype(self) -> torch.dtype:
        bias = self.base_layer.bias
        return bias.dtype if bias is not None else torch.float16  # bitsandbytes quantizes from float16

    def _codes_and_scales(self) -> tuple[torch.Tensor, torch.Tensor]:
        base = self.base_layer
        scales = base.state.SCB if base.state.SCB is not None else base.weight.SCB
        return base.weight.data, scales  # the int8 codes are the weight's data before and after a forward

    def dequantized_weight(self) -> torch.Tensor:
        codes, scales = self._codes_and_scales()
        return bnb_functional.int8_vectorwise_dequant(codes, scales)  # float32

    def quantized(self, weight: torch.Tensor) -> nn.Parameter:
        old = self.base_layer.weight
        return bnb.nn.Int8Params(weight.to("cpu"), requires_grad=False, has_fp16_weights=old.has_fp16_weights).to(
            old.device
        )

    def stored_tensors(self) -> list[torch.Tensor]:
        return list(self._codes_and_scales())

    def take_weight(self) -> QuantizedOriginal:
        codes, scales = self._codes_and_scales()
        return QuantizedOriginal(self.base_layer.weight, {"SCB": scales}, tensor_bytes([codes, scales]))

    def put_weight(self, original: QuantizedOriginal) -> None:
        weight = original.weight
        if "SCB" in original.extra:  # a taken weight: its codes and scales go back where a forward looks first
            weight.CB, weight.SCB = weight.data, original.extra["SCB"]
        self.base_layer.weight = weight
        self.base_layer.state.reset_grads()  # the next forward takes CB and SCB from the weight
