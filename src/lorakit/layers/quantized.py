"""LoRA on linear layers whose weights are stored quantized (QLoRA), and the recognition of quantized layers.

The base layer stays as it is, frozen and quantized; the adapter is the one of `layers/linear.py`: float32
master weights `A: (r, in)` and `B: (out, r)`, the branch computed in the dtype of the base's output (the
activation dtype), `s = alpha / r`:

    y = base(x) + s · (dropout(x) @ A.T) @ B.T          base(x) ≈ x @ deq(W).T + b

where `deq(W)` is the weight the quantized base computes with. The kinds (one file each): bitsandbytes'
`Linear4bit` and `Linear8bitLt` (`layers/bnb.py`), torchao's int8 weight-only tensors (`layers/torchao.py`).

**Merging** cannot add `ΔW = s · B @ A` to a quantized tensor. It dequantizes, adds in float32 and quantizes
again with the layer's own settings (block size, data type, double quantization), as peft does:

    W' = Q(deq(W) + ΔW)

Quantizing again rounds `ΔW` to the quantization grid, and a small update can largely vanish. The layer
measures, per merge, how much of the update the merged weights carry (`update_retention`):

    ΔW_q     = deq(W') − deq(W)                   the update the quantized model actually got
    retained = ⟨ΔW_q, ΔW⟩ / ‖ΔW‖²                 1: all of it, 0: none
    error    = ‖ΔW_q − ΔW‖ / ‖ΔW‖                 0: exact; 1: as far off as not merging at all

`lorakit.merge` warns, naming the worst layers, when a layer keeps less than half of its update.
`lorakit.merge_and_unload(model, dequantize=True)` avoids the loss: a plain floating-point model with
`deq(W) + ΔW` merged exactly.

**Unmerging** does not subtract: the layer keeps the original quantized parameter (its packed values and
quantization state: about half a byte per weight for 4-bit, one byte for 8-bit) and puts it back, bit for
bit. Subtracting again (`Q(deq(W') − ΔW)`, peft's unmerge) does not give `W` back.

A kind supplies `dequantized_weight()`, `quantized(weight)` and, where the base keeps more state than its
weight parameter, `take_weight()`/`put_weight()`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .base import LoraLayer
from .linear import LoraLinear

# Libraries whose layers store weights quantized, by the top of their module path, and how to name them.
QUANTIZING_LIBRARIES = {
    "bitsandbytes": "bitsandbytes",
    "torchao": "torchao",
    "auto_gptq": "GPTQ (auto-gptq)",
    "gptqmodel": "GPTQ (gptqmodel)",
    "awq": "AWQ",
    "hqq": "HQQ",
    "aqlm": "AQLM",
    "eetq": "EETQ",
    "optimum": "optimum-quanto",
    "quanto": "optimum-quanto",
}
QUANTIZED_BASES = "bitsandbytes Linear4bit (nf4, fp4) and Linear8bitLt, and torchao int8 weight-only linears"
_TORCH_QUANTIZATION = ("torch.ao.nn.quantized", "torch.nn.quantized", "torch.ao.nn.intrinsic.quantized")


def quantization_of(module: nn.Module) -> str | None:
    """What quantizes `module`'s weight (a library's name, "torch quantization", or the weight's integer dtype),
    or None for a layer with a plain floating weight."""
    module_path = type(module).__module__
    top = module_path.split(".")[0]
    if top in QUANTIZING_LIBRARIES and (top != "optimum" or ".quanto" in module_path):
        return QUANTIZING_LIBRARIES[top]
    if module_path.startswith(_TORCH_QUANTIZATION):
        return "torch quantization"
    weight = module._parameters.get("weight")
    if weight is None:
        return None
    if type(weight).__module__.split(".")[0] == "torchao":  # a torchao tensor subclass (int8, int4, float8…)
        return "torchao"
    if not weight.is_floating_point():
        return f"{weight.dtype} weights"
    return None


def weight_count(param: torch.Tensor) -> int:
    """How many weights `param` holds: its element count, or for bitsandbytes' packed 4-bit weights two per
    byte of their storage type."""
    if type(param).__name__ == "Params4bit":
        return param.numel() * 2 * param.element_size()
    return param.numel()


@dataclass(frozen=True)
class UpdateRetention:
    """How much of an adapter's update `ΔW` a requantized merge kept (module doc): `retained` is
    `⟨ΔW_q, ΔW⟩ / ‖ΔW‖²`, `error` is `‖ΔW_q − ΔW‖ / ‖ΔW‖`."""

    retained: float
    error: float

    @classmethod
    def of(cls, realized: torch.Tensor, delta: torch.Tensor) -> UpdateRetention:
        realized, delta = realized.double(), delta.double()
        norm2 = float((delta * delta).sum())
        if norm2 == 0.0:  # nothing to keep
            return cls(1.0, 0.0)
        retained = float((realized * delta).sum()) / norm2
        error = float(torch.linalg.vector_norm(realized - delta)) / norm2**0.5
        return cls(retained, error)


@dataclass
class QuantizedOriginal:
    """A quantized base weight as it was before a merge, with whatever else its layer needs to compute with it
    (`extra`, per kind): what `unmerge` puts back. `nbytes` counts the tensors it keeps alive."""

    weight: nn.Parameter
    extra: dict[str, Any]
    nbytes: int = 0


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class LoraQuantizedLinear(LoraLinear):
    """LoRA around a linear layer with a quantized weight. Subclasses supply the quantization (module doc)."""

    supports_dora = False  # DoRA's norm and base output would need deq(W) in every forward: not yet
    supports_weight_inits = False  # PiSSA's residual would be requantized: not yet

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.update_retention: UpdateRetention | None = None  # of the current merge, if merged

    def base_features(self, base_layer: nn.Module) -> tuple[int, int]:
        return base_layer.in_features, base_layer.out_features  # the stored weight's shape is the packed one

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        # The plain path: LoraLinear's shortcuts compute with the base weight directly, which is quantized here.
        return LoraLayer.forward(self, x, *args, **kwargs)

    # ----- what a quantized kind provides ---------------------------------------------------------------

    @property
    def dequantized_dtype(self) -> torch.dtype:
        """The dtype of the model's floating weights: that of `dequantized_base`."""
        raise NotImplementedError

    def dequantized_weight(self) -> torch.Tensor:
        """`deq(W)`, `(out, in)`, as the library dequantizes it (a floating dtype wide enough to hold it exactly)."""
        raise NotImplementedError

    def quantized(self, weight: torch.Tensor) -> nn.Parameter:
        """`weight` `(out, in)` quantized with the base's settings, as a parameter the base can hold."""
        raise NotImplementedError

    def stored_tensors(self) -> list[torch.Tensor]:
        """The tensors that hold the base's quantized weight: its values and quantization state."""
        raise NotImplementedError

    def take_weight(self) -> QuantizedOriginal:
        """The base's current quantized weight and state, before a new weight replaces it."""
        return QuantizedOriginal(self.base_layer.weight, {}, tensor_bytes(self.stored_tensors()))

    def put_weight(self, original: QuantizedOriginal) -> None:
        """Make the base compute with `original` (or a new `QuantizedOriginal(self.quantized(…), {})`)."""
        self.base_layer.weight = original.weight

    # ----- merge ------------------------------------------------------------------------------------------

    def check_mergeable(self, name: str) -> None:
        self.check_lora_bias_mergeable(name)  # the weight is requantized; a bias is a plain floating tensor

    def merged_parameter(self, param_name: str, delta: torch.Tensor) -> torch.Tensor:
        if param_name != "weight":
            return super().merged_parameter(param_name, delta)
        return self.dequantized_weight().float() + delta  # before quantizing: what `safe=True` checks

    def merge_parameter(self, param_name: str, delta: torch.Tensor, names: list[str]) -> Any:
        if param_name != "weight":
            return super().merge_parameter(param_name, delta, names)
        before = self.dequantized_weight().float()
        original = self.take_weight()
        self.put_weight(QuantizedOriginal(self.quantized(before + delta), {}))
        self.update_retention = UpdateRetention.of(self.dequantized_weight().float() - before, delta)
        return original

    def restore_parameter(self, param_name: str, delta: torch.Tensor, residual: Any) -> None:
        if param_name != "weight":
            return super().restore_parameter(param_name, delta, residual)
        self.put_weight(residual)
        self.update_retention = None

    def drop_merge_residuals(self) -> None:
        super().drop_merge_residuals()
        self.update_retention = None

    def dequantized_base(self, dtype: torch.dtype | None = None) -> nn.Linear:
        """A plain `nn.Linear` computing with `deq(W)` (and the base's bias), in `dtype` (default
        `dequantized_dtype`)."""
        weight = self.dequantized_weight().to(dtype or self.dequantized_dtype)
        bias = getattr(self.base_layer, "bias", None)
        linear = nn.Linear(self.in_features, self.out_features, bias=bias is not None, device="meta")
        linear.weight = nn.Parameter(weight, requires_grad=False)
        if bias is not None:
            linear.bias = nn.Parameter(bias.detach().to(weight.dtype).clone(), requires_grad=bias.requires_grad)
        return linear.train(self.base_layer.training)
