"""LoRA for `nn.Conv1d`, `nn.Conv2d` and `nn.Conv3d`.

A is a convolution `in → r` with the base's kernel size, stride, padding, dilation and padding mode; B is a
1×1 convolution `r → out` (with the base's `groups`). Shapes for a base weight `W: (out, in/groups, *k)`:
`A: (r, in, *k)`, `B: (out, r/groups, 1, …)`.

    y  = base(x) + s · B(A(dropout(x)))
    ΔW = s · (B.flatten(1) @ A.flatten(1)).view_as(W)          when every kernel size is 1
    ΔW = s · convNd(A.transpose(0, 1), B).transpose(0, 1)      otherwise

`B ∘ A` is itself a convolution with A's stride, padding and dilation, so ΔW merges exactly into W. With
`groups > 1` it is not of W's grouped shape: training, saving and loading work, merging raises.

DoRA (`use_dora`, layers/dora.py) views W as `(out, in·k…)` and B·A flattened as its update; `m` is
`(1, out, 1, …)`, peft's shape, and broadcasts over the output's channel axis. Not with `groups > 1`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import LoraConfig
from ..errors import LoraConfigError, LoraError, MergeError
from .base import adapter_factory
from .dora import DoraLayer
from .stack import AdapterStack, broadcast_gates

_CONV_FN = {nn.Conv1d: F.conv1d, nn.Conv2d: F.conv2d, nn.Conv3d: F.conv3d}


class LoraConv(DoraLayer):
    """LoRA around an `nn.Conv1d`, `nn.Conv2d` or `nn.Conv3d`; DoRA adapters too (`use_dora`)."""

    adapter_containers = ("lora_A", "lora_B", "lora_magnitude_vector")

    def __init__(self, base_layer: nn.Conv1d | nn.Conv2d | nn.Conv3d) -> None:
        super().__init__(base_layer)
        self.conv_type = next(t for t in _CONV_FN if isinstance(base_layer, t))
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()

    def create_adapter(self, name: str, r: int, config: LoraConfig) -> None:
        base = self.base_layer
        if r % base.groups:
            raise LoraConfigError(
                f"rank {r} is not divisible by the conv's groups={base.groups}; choose a multiple of {base.groups}"
            )
        if config.use_dora and base.groups > 1:
            raise LoraConfigError(
                f"use_dora=True is not supported on a {self.conv_type.__name__} with groups={base.groups}: its "
                "update is not a grouped convolution"
            )
        factory = adapter_factory(base.weight)
        self.lora_A[name] = self.conv_type(
            base.in_channels, r, base.kernel_size, stride=base.stride, padding=base.padding,
            dilation=base.dilation, padding_mode=base.padding_mode, bias=False, **factory,
        )  # fmt: skip
        self.lora_B[name] = self.conv_type(
            r, base.out_channels, 1, groups=base.groups, bias=config.lora_bias, **factory
        )
        self.create_dora_magnitude(name, config, factory)

    def _with_channel_axis(self, vector: torch.Tensor) -> torch.Tensor:
        """`vector: (out,)` as `(1, out, 1, …)`, broadcastable against the output `(batch, out, *spatial)`."""
        return vector.view(1, -1, *(1,) * (self.base_layer.weight.ndim - 2))

    # ----- DoRA's view of the layer (layers/dora.py) ------------------------------------------------------

    def dora_matrices(self, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return (
            self.base_layer.weight.flatten(1),
            self.lora_A[name].weight.flatten(1),
            self.lora_B[name].weight.flatten(1),
        )

    def weight_from_matrix(self, delta: torch.Tensor) -> torch.Tensor:
        return delta.view(self.base_layer.weight.shape)

    def magnitude_shape(self) -> tuple[int, ...]:
        return (1, self.base_layer.out_channels, *(1,) * (self.base_layer.weight.ndim - 2))

    def output_bias(self, dtype: torch.dtype) -> torch.Tensor | None:
        bias = self.base_layer.bias
        return None if bias is None else self._with_channel_axis(bias.to(dtype))

    def output_without_bias(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.base_layer._conv_forward(x.to(dtype), self.base_layer.weight.to(dtype), None)

    def add_branch(self, base: torch.Tensor, x: torch.Tensor, name: str) -> torch.Tensor:
        return self.add_adapter_output(base, x, name, dropout=False)

    def forward(self, x: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        if self.runs_dora():
            return self.forward_with_dora(x, *args, **kwargs)
        return super().forward(x, *args, **kwargs)

    def add_adapter_output(
        self, result: torch.Tensor, x: torch.Tensor, name: str, dropout: bool = True
    ) -> torch.Tensor:
        """`result + s·B(A(dropout(x)))` (without the dropout when `dropout` is False)."""
        if dropout:
            x = self.dropout_input(x, name)
        a, b = self.lora_A[name], self.lora_B[name]
        hidden = a._conv_forward(x, a.weight.to(x.dtype), None)
        out = b._conv_forward(hidden, b.weight.to(x.dtype), None if b.bias is None else b.bias.to(x.dtype))
        return result + out * self.scaling[name]

    def stacked_factors(self, names: list[str], dtype: torch.dtype, one_per_row: bool) -> dict[str, torch.Tensor]:
        if self.base_layer.groups > 1:
            raise LoraError(
                f"a {self.conv_type.__name__} with groups={self.base_layer.groups} cannot run several adapters in "
                "one batch: its adapters' B are grouped convolutions that do not stack"
            )
        factors = {
            "A": torch.cat([self.lora_A[n].weight for n in names]).to(dtype),  # (Σr, in, *k)
            "B": torch.cat([self.lora_B[n].weight * self.scaling[n] for n in names], dim=1).to(dtype),  # (out, Σr, 1…)
        }
        return factors | self.stacked_lora_biases(names, dtype)  # "bias": (n, out)

    def add_stacked_output(self, result: torch.Tensor, x: torch.Tensor, stack: AdapterStack) -> torch.Tensor:
        factors = stack.factors
        if stack.dropout and self.training:
            x = F.dropout(x, stack.dropout, training=True)
        column_gates, gates = stack.gates_in(result.dtype)
        # A has the base's kernel, stride, padding, dilation and padding mode (and groups=1, checked above)
        hidden = self.base_layer._conv_forward(x, factors["A"], None)
        hidden = hidden * broadcast_gates(column_gates, hidden.ndim, channel_last=False)
        out = _CONV_FN[self.conv_type](hidden, factors["B"])
        if "bias" in factors:
            out = out + broadcast_gates(gates @ factors["bias"], out.ndim, channel_last=False)
        return result + out

    def check_mergeable(self, name: str) -> None:
        super().check_mergeable(name)
        if self.base_layer.groups > 1:
            raise MergeError(
                f"adapter {name!r} cannot be merged into a {self.conv_type.__name__} with "
                f"groups={self.base_layer.groups}: its update is not a grouped convolution"
            )

    def lora_delta_weights(self, name: str) -> dict[str, torch.Tensor]:
        a, b = self.lora_A[name].weight, self.lora_B[name].weight
        s = self.scaling[name]
        weight = self.base_layer.weight
        if all(k == 1 for k in weight.shape[2:]):
            delta = (b.flatten(1) @ a.flatten(1)).view(weight.shape) * s
        else:
            delta = _CONV_FN[self.conv_type](a.transpose(0, 1), b).transpose(0, 1) * s
        deltas = {"weight": delta}
        if self.lora_B[name].bias is not None:
            deltas["bias"] = self.lora_B[name].bias * s
        return deltas
