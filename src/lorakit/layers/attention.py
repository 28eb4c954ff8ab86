"""LoRA for `nn.MultiheadAttention`: a low-rank update of the packed input projection and one of the output
projection, as peft defines them, with peft's keys.

Shapes, with E = embed_dim (query, key and value of one size E):

    in_proj_weight  (3E, E):  ΔW_in  = s · B @ A,    A  (r, E),  B  (3E, r)
    out_proj.weight (E, E):   ΔW_out = s · B' @ A',  A' (r, E),  B' (E, r)

`nn.MultiheadAttention.forward` reads both weights directly and never calls `out_proj`, so an adapter cannot be
a branch beside the module: the forward runs the module's own forward on `W_in + ΔW_in` and `W_out + ΔW_out`
(`torch.func.functional_call`: gradients reach A and B, and no parameter is written). As in peft, each active
adapter's update is cast to the weight's dtype and added in turn, and LoRA dropout does not apply (the update is
on the weights, not on an input). In files: `<path>.lora_A.weight`, `<path>.lora_B.weight`,
`<path>.base_layer.out_proj.lora_A.weight` and `<path>.base_layer.out_proj.lora_B.weight` (peft wraps the output
projection in a LoRA Linear of its own).

peft 0.21 adds ΔW_out twice (`W_out + 2·ΔW_out`) in its forward and its merge (peft PR #3774), so a peft model and
a lorakit model of the same file agree on the input projection and differ on the output projection until peft
is fixed; lorakit computes the update once, which is what the file's A' and B' mean.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from ..config import LoraConfig
from ..errors import LoraError
from .base import LoraLayer, adapter_factory, reset_factors

# peft's key prefix of the output projection's adapter, inside the MultiheadAttention's LoRA layer
OUT_PROJ_PREFIX = "base_layer.out_proj."
_OUT_CONTAINERS = {"out_proj_lora_A": "lora_A", "out_proj_lora_B": "lora_B"}


class LoraMultiheadAttention(LoraLayer):
    """LoRA around an `nn.MultiheadAttention` whose query, key and value have the embedding's size."""

    adapter_containers = ("lora_A", "lora_B", "out_proj_lora_A", "out_proj_lora_B")

    def __init__(self, base_layer: nn.MultiheadAttention) -> None:
        if not base_layer.kdim == base_layer.vdim == base_layer.embed_dim:  # one packed in_proj_weight
            raise LoraError(
                f"LoRA on nn.MultiheadAttention needs query, key and value of the embedding's size (one packed "
                f"in_proj_weight); this one has kdim={base_layer.kdim}, vdim={base_layer.vdim}, "
                f"embed_dim={base_layer.embed_dim}"
            )
        super().__init__(base_layer)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.out_proj_lora_A = nn.ModuleDict()
        self.out_proj_lora_B = nn.ModuleDict()

    def create_adapter(self, name: str, r: int, config: LoraConfig) -> None:
        if config.lora_bias:
            raise LoraError("lora_bias=True is not supported on nn.MultiheadAttention (nor in peft)")
        if config.lora_dropout:
            warnings.warn(
                f"lora_dropout={config.lora_dropout} does not apply to nn.MultiheadAttention: its update is on the "
                "weights, not on an input (as in peft)",
                stacklevel=5,
            )
        embed = self.base_layer.embed_dim
        factory = adapter_factory(self.base_layer.in_proj_weight)
        self.lora_A[name] = nn.Linear(embed, r, bias=False, **factory)
        self.lora_B[name] = nn.Linear(r, 3 * embed, bias=False, **factory)
        self.out_proj_lora_A[name] = nn.Linear(embed, r, bias=False, **factory)
        self.out_proj_lora_B[name] = nn.Linear(r, embed, bias=False, **factory)

    def reset_adapter(self, name: str, init: bool | str) -> None:
        for a, b in ((self.lora_A, self.lora_B), (self.out_proj_lora_A, self.out_proj_lora_B)):
            reset_factors(a[name], b[name], init, self.r[name])

    def adapter_parameters(self, name: str) -> dict[str, nn.Parameter]:
        """As `LoraLayer.adapter_parameters`, the output projection's under peft's `base_layer.out_proj.lora_A…`."""
        params = {}
        for key, param in super().adapter_parameters(name).items():
            container, rest = key.split(".", 1)
            if container in _OUT_CONTAINERS:
                key = f"{OUT_PROJ_PREFIX}{_OUT_CONTAINERS[container]}.{rest}"
            params[key] = param
        return params

    @classmethod
    def owns_suffix(cls, suffix: str) -> bool:
        return suffix.removeprefix(OUT_PROJ_PREFIX).split(".", 1)[0] in ("lora_A", "lora_B")

    def rank_layout(self, name: str) -> dict[str, tuple[int | None, bool]]:
        return {key: (0, False) if "lora_A" in key else (1, True) for key in self.adapter_parameters(name)}

    def delta_weights(self, name: str) -> dict[str, torch.Tensor]:
        """`{"in_proj_weight": s·B@A (3E, E), "out_proj.weight": s·B'@A' (E, E)}`, in the adapters' dtype."""
        s = self.scaling[name]
        return {
            "in_proj_weight": (self.lora_B[name].weight @ self.lora_A[name].weight) * s,
            "out_proj.weight": (self.out_proj_lora_B[name].weight @ self.out_proj_lora_A[name].weight) * s,
        }

    def forward(self, query: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if self.merged_adapters and self.training and torch.is_grad_enabled():
            self._refuse_training_merged()
        if self.adapter_stack is not None and not self.disabled:
            raise LoraError("nn.MultiheadAttention does not support many adapters in one batch")
        if not self.forward_adapters:
            return self.base_layer(query, *args, **kwargs)
        weights = {param_name: self._base_param(param_name) for param_name in ("in_proj_weight", "out_proj.weight")}
        for name in self.forward_adapters:
            for param_name, delta in self.delta_weights(name).items():
                weights[param_name] = weights[param_name] + delta.to(weights[param_name].dtype)
        return torch.func.functional_call(self.base_layer, weights, (query, *args), kwargs)
