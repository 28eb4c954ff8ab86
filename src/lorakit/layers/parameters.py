"""LoRA on a module's own parameters (peft's `target_parameters`): the experts of mixture-of-experts models, whose
weights are 3-D tensors and not `nn.Linear`s, or any 2-D weight the module uses however it likes.

One layer wraps the module and adapts the named parameters it holds (`recurse=False`), each with its own A and B,
as peft defines them. With s = alpha / r:

    2-D parameter W (out, in):            A (r, in), B (out, r),        ΔW = s · B @ A
    3-D parameter W (E, out, in):         A (E·r, in), B (out, E·r),    ΔW[e] = s · B_e @ A_e
        A_e = A.reshape(E, r, in)[e] (rows e·r … e·r + r − 1), B_e = B.reshape(out, r, E)[:, :, e]
    3-D with the module's `is_transposed` (W (E, in, out)): the same A_e, B_e, ΔW[e] = s · (B_e @ A_e)ᵀ

The module's forward reads its parameters however it likes (indexing one expert, a grouped matmul), so the forward
runs the module's own forward on `W + ΔW` (`torch.func.functional_call`: gradients reach A and B, and no parameter
is written), each active adapter's update added in turn by one fused `baddbmm` (`addmm` for a 2-D weight) in the
parameter's dtype, as peft does; merging adds ΔW computed in float32. Dropout cannot
apply to a weight update (peft refuses `lora_dropout` here, and so does lorakit), nor can `lora_bias` or DoRA.

peft wraps the module once per parameter, the first registered parameter innermost, so its keys are
`<path>.lora_A.weight` for the last parameter, `<path>.base_layer.lora_A.weight` for the one before it, and so on;
`adapter_parameters` gives those keys.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..config import LoraConfig
from ..errors import LoraError
from .base import LoraLayer, adapter_factory, reset_factors


class ParameterShape:
    """How a targeted parameter's update is laid out: `experts` E (1 for a 2-D weight), `in_features`,
    `out_features`, and whether the weight is stored `(E, in, out)` (`transposed`)."""

    def __init__(self, module: nn.Module, parameter_name: str, param: torch.Tensor) -> None:
        if param.ndim == 2:
            self.experts, (self.out_features, self.in_features), self.transposed = 1, param.shape, False
        elif param.ndim == 3:
            self.experts, self.transposed = param.shape[0], bool(getattr(module, "is_transposed", False))
            first, second = param.shape[1:]
            self.in_features, self.out_features = (first, second) if self.transposed else (second, first)
        else:
            raise LoraError(
                f"target_parameters: {parameter_name!r} of {type(module).__name__} has {param.ndim} dimensions "
                f"(shape {list(param.shape)}); LoRA adapts 2-D weights and 3-D expert stacks"
            )
        self.ndim = param.ndim

    def per_expert(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`(B_e, A_e)` stacked over the experts: `(E, out, r)` and `(E, r, in)`."""
        per_expert_a = a.reshape(self.experts, -1, a.shape[-1])
        per_expert_b = b.reshape(b.shape[0], -1, self.experts).permute(2, 0, 1)
        return per_expert_b, per_expert_a

    def delta(self, a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
        """ΔW from A `(E·r, in)` and B `(out, E·r)`, in the parameter's layout."""
        if self.ndim == 2:
            return (b @ a) * scaling
        per_expert_b, per_expert_a = self.per_expert(a, b)
        delta = (per_expert_b @ per_expert_a) * scaling  # (E, out, in)
        return delta.transpose(1, 2) if self.transposed else delta

    def added(self, weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
        """`weight + ΔW` in one fused GEMM (`addmm`/`baddbmm`, the factors in the weight's dtype, as peft), which
        never forms ΔW on its own: the forward's way, where ΔW would be as large as the expert stack."""
        a, b = a.to(weight.dtype), b.to(weight.dtype)
        if self.ndim == 2:
            return torch.addmm(weight, b, a, alpha=scaling)
        per_expert_b, per_expert_a = self.per_expert(a, b)
        if self.transposed:  # weight (E, in, out) + (B_e A_e)ᵀ = A_eᵀ B_eᵀ
            return torch.baddbmm(weight, per_expert_a.transpose(1, 2), per_expert_b.transpose(1, 2), alpha=scaling)
        return torch.baddbmm(weight, per_expert_b, per_expert_a, alpha=scaling)


class LoraParameters(LoraLayer):
    """LoRA on named parameters of a module (`parameter_names`, in the module's registration order)."""

    adapter_containers = ("lora_A", "lora_B")

    def __init__(self, base_layer: nn.Module, parameter_names: list[str]) -> None:
        super().__init__(base_layer)
        own = dict(base_layer.named_parameters(recurse=False))
        missing = [name for name in parameter_names if name not in own]
        if missing or not parameter_names:
            raise LoraError(f"{type(base_layer).__name__} has no parameters {missing or parameter_names} of its own")
        self.parameter_names = [name for name in own if name in parameter_names]  # registration order, as peft
        self.shapes = {name: ParameterShape(base_layer, name, own[name]) for name in self.parameter_names}
        self.lora_A = nn.ModuleDict()  # adapter → {parameter name: A}
        self.lora_B = nn.ModuleDict()

    def create_adapter(self, name: str, r: int, config: LoraConfig) -> None:
        for option, value in (("lora_dropout", config.lora_dropout), ("lora_bias", config.lora_bias),
                              ("use_dora", config.use_dora)):  # fmt: skip
            if value:
                raise LoraError(f"{option}={value!r} cannot apply to a parameter target (nor in peft)")
        a, b = nn.ModuleDict(), nn.ModuleDict()
        for parameter_name, shape in self.shapes.items():
            factory = adapter_factory(self.base_layer.get_parameter(parameter_name))
            a[parameter_name] = nn.Linear(shape.in_features, shape.experts * r, bias=False, **factory)
            b[parameter_name] = nn.Linear(shape.experts * r, shape.out_features, bias=False, **factory)
        self.lora_A[name], self.lora_B[name] = a, b

    def reset_adapter(self, name: str, init: bool | str) -> None:
        for parameter_name in self.parameter_names:
            reset_factors(self.lora_A[name][parameter_name], self.lora_B[name][parameter_name], init, self.r[name])

    def key_prefix(self, parameter_name: str) -> str:
        """peft's prefix of `parameter_name`'s adapter keys: one `base_layer.` per parameter wrapped after it."""
        return "base_layer." * (len(self.parameter_names) - 1 - self.parameter_names.index(parameter_name))

    def adapter_parameters(self, name: str) -> dict[str, nn.Parameter]:
        """`{<prefix>lora_A.weight: A, <prefix>lora_B.weight: B}` per parameter, peft's keys (see `key_prefix`)."""
        if name not in self.lora_A:
            return {}
        params = {}
        for parameter_name in self.parameter_names:
            prefix = self.key_prefix(parameter_name)
            params[prefix + "lora_A.weight"] = self.lora_A[name][parameter_name].weight
            params[prefix + "lora_B.weight"] = self.lora_B[name][parameter_name].weight
        return params

    @classmethod
    def owns_suffix(cls, suffix: str) -> bool:
        while suffix.startswith("base_layer."):
            suffix = suffix.removeprefix("base_layer.")
        return suffix.split(".", 1)[0] in cls.adapter_containers

    def rank_in_module(self, shapes: dict[str, tuple[int, ...]]) -> int | None:
        """The rank of a file's adapter on this layer, from its tensors' `shapes` (keyed as in
        `adapter_parameters`): the first parameter's A has E·r rows."""
        first = self.parameter_names[0]
        shape = shapes.get(self.key_prefix(first) + "lora_A.weight")
        experts = self.shapes[first].experts
        return shape[0] // experts if shape and shape[0] % experts == 0 else None

    def rank_layout(self, name: str) -> dict[str, tuple[int | None, bool]]:
        # A's rows interleave the experts' ranks, so a smaller rank is no prefix of it: the same rank only
        return {key: (None, "lora_B" in key) for key in self.adapter_parameters(name)}

    def delta_weights(self, name: str) -> dict[str, torch.Tensor]:
        """`{parameter name: ΔW}` in the parameter's layout, in the adapters' dtype."""
        s = self.scaling[name]
        return {
            parameter_name: shape.delta(self.lora_A[name][parameter_name].weight,
                                        self.lora_B[name][parameter_name].weight, s)
            for parameter_name, shape in self.shapes.items()
        }  # fmt: skip

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.merged_adapters and self.training and torch.is_grad_enabled():
            self._refuse_training_merged()
        if not self.forward_adapters:
            return self.base_layer(*args, **kwargs)
        weights = {name: self._base_param(name) for name in self.parameter_names}
        for adapter in self.forward_adapters:
            s = self.scaling[adapter]
            for name, shape in self.shapes.items():
                a, b = self.lora_A[adapter][name].weight, self.lora_B[adapter][name].weight
                weights[name] = shape.added(weights[name], a, b, s)
        return torch.func.functional_call(self.base_layer, weights, args, kwargs)

    def extra_repr(self) -> str:
        return f"parameters={self.parameter_names}, " + super().extra_repr()
