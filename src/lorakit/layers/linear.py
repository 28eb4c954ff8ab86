"""LoRA for `nn.Linear` and transformers' `Conv1D` (a linear layer whose weight is stored `(in, out)`).

Shapes: `x: (..., in)`, `A: (r, in)`, `B: (out, r)`, `s = alpha / r` (or `alpha / sqrt(r)`).

    y  = base(x) + s · (dropout(x) @ A.T) @ B.T  (+ s · b_B with lora_bias)
    ΔW = s · B @ A            for nn.Linear (weight `(out, in)`)
    ΔW = s · (B @ A).T        for Conv1D    (weight `(in, out)`, "fan_in_fan_out")

A and B are float32 master weights; the branch runs in the activation dtype, so a bfloat16 model runs a
bfloat16 branch (as autocast would) while the optimizer updates float32 values. `add_adapter_output` is the
plain computation; `linear_fast.py` holds the optional shortcuts that measured faster (docs/design.md §8).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import LoraConfig
from ..errors import LoraError
from . import init_schemes, linear_fast
from .base import adapter_factory
from .dora import DoraLayer
from .init_schemes import BaseChange
from .stack import AdapterStack, broadcast_gates


def is_transformers_conv1d(module: nn.Module) -> bool:
    """Whether `module` is transformers' `Conv1D`, checked without importing transformers."""
    return any(cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers.") for cls in type(module).__mro__)


class LoraLinear(DoraLayer):
    """LoRA around an `nn.Linear` or a transformers `Conv1D`; DoRA adapters too (`use_dora`, layers/dora.py)."""

    adapter_containers = ("lora_A", "lora_B", "lora_magnitude_vector")
    supports_weight_inits = True

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.fan_in_fan_out = is_transformers_conv1d(base_layer)
        self.in_features, self.out_features = self.base_features(base_layer)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()

    def base_features(self, base_layer: nn.Module) -> tuple[int, int]:
        """`(in, out)` of the base layer, read from its weight's shape (`(in, out)` for Conv1D)."""
        weight = base_layer.weight
        return tuple(weight.shape) if self.fan_in_fan_out else (weight.shape[1], weight.shape[0])

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.runs_dora():
            return self.forward_with_dora(x, *args, **kwargs)
        if not args and not kwargs:
            out = linear_fast.single_adapter_forward(self, x)  # None where no shortcut applies
            if out is not None:
                return out
        return super().forward(x, *args, **kwargs)

    def create_adapter(self, name: str, r: int, config: LoraConfig) -> None:
        weight = self.base_layer.weight
        factory = adapter_factory(weight)
        self.lora_A[name] = nn.Linear(self.in_features, r, bias=False, **factory)
        self.lora_B[name] = nn.Linear(r, self.out_features, bias=config.lora_bias, **factory)
        self.create_dora_magnitude(name, config, factory)

    def reset_adapter(self, name: str, init: bool | str) -> None:
        """As `LoraLayer.reset_adapter`, plus `"pissa"`, `"pissa_niter_<k>"`, `"olora"` (the base weight keeps the
        residual) and `"orthogonal"` (layers/init_schemes.py)."""
        if init not in ("pissa", "olora", "orthogonal") and not init_schemes.changes_base(init):
            return super().reset_adapter(name, init)
        weight, r, s = self.base_layer.weight, self.r[name], self.scaling[name]
        if init == "orthogonal":
            a, b = init_schemes.orthogonal_factors(self.in_features, self.out_features, r)
            a, b = a.to(weight.dtype), b.to(weight.dtype)  # peft keeps them in the base's dtype
        else:
            if weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
                raise LoraError(
                    f"init_lora_weights={init!r} needs a float32, float16 or bfloat16 weight, got {weight.dtype}"
                )
            matrix = self.weight_out_in().detach().float()
            if init == "olora":
                a, b = init_schemes.olora_factors(matrix, r)
            else:
                a, b = init_schemes.pissa_factors(matrix, r, s, init_schemes.pissa_niter(init))
        lora_a, lora_b = self.lora_A[name].weight, self.lora_B[name].weight
        with torch.no_grad():
            lora_a.copy_(a)
            lora_b.copy_(b)
            if init_schemes.changes_base(init):
                self.base_changes.append(BaseChange.apply(weight.data, name, lora_a, lora_b, s, self.fan_in_fan_out))

    def weight_out_in(self) -> torch.Tensor:
        """The base weight as `(out, in)` (a view; Conv1D stores it `(in, out)`)."""
        weight = self.base_layer.weight
        return weight.T if self.fan_in_fan_out else weight

    # ----- DoRA's view of the layer (layers/dora.py) ------------------------------------------------------

    def dora_matrices(self, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.weight_out_in(), self.lora_A[name].weight, self.lora_B[name].weight

    def weight_from_matrix(self, delta: torch.Tensor) -> torch.Tensor:
        return delta.T if self.fan_in_fan_out else delta

    def magnitude_shape(self) -> tuple[int, ...]:
        return (self.out_features,)

    def output_bias(self, dtype: torch.dtype) -> torch.Tensor | None:
        bias = getattr(self.base_layer, "bias", None)
        return None if bias is None else bias.to(dtype)

    def output_without_bias(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return F.linear(x.to(dtype), self.weight_out_in().to(dtype))

    def add_branch(self, base: torch.Tensor, x: torch.Tensor, name: str) -> torch.Tensor:
        """`base + s·B(A x)`: the branch's second GEMM accumulates into `base` (s as `addmm`'s alpha)."""
        a, b, s, dtype = self.lora_A[name].weight, self.lora_B[name], self.scaling[name], base.dtype
        hidden = F.linear(x.reshape(-1, self.in_features).to(dtype), a.to(dtype))
        combined = base.reshape(-1, self.out_features).addmm(hidden, b.weight.to(dtype).T, alpha=s)
        if b.bias is not None:
            combined = combined + (b.bias * s).to(dtype)
        return combined.view(base.shape)

    def add_adapter_output(self, result: torch.Tensor, x: torch.Tensor, name: str) -> torch.Tensor:
        """`result + s·B(A(dropout(x)))` in `result`'s dtype: `h = dropout(x) @ A.T` `(rows, r)`, then one GEMM
        adds `s · h @ B.T` into the base output (s as `addmm`'s alpha, not a pass over the output)."""
        if not torch.is_grad_enabled():
            return linear_fast.add_branch_without_grad(self, result, x, name)
        a, b, s = self.lora_A[name].weight, self.lora_B[name], self.scaling[name]
        dtype = result.dtype
        hidden = F.linear(self.dropout_input(x, name).reshape(-1, self.in_features).to(dtype), a.to(dtype))
        out = result.reshape(-1, self.out_features).addmm(hidden, b.weight.to(dtype).T, alpha=s)
        if b.bias is not None:
            out = out + (b.bias * s).to(dtype)
        return out.view(result.shape)

    @staticmethod
    def use_gathered(adapters: int, tokens_per_row: int) -> bool:
        """With one adapter per row: whether each row gathers its own A and B (cost r per token, plus a copy
        of the used adapters) rather than multiplying by all of them (cost Σr per token). The thresholds are
        where gathering measured faster on CPU (benchmarks/mixed_batch.py): from 4 adapters for prompts of
        8 tokens or more per row, from 16 for decoding."""
        return adapters >= 16 or (adapters >= 4 and tokens_per_row >= 8)

    def stacked_factors(self, names: list[str], dtype: torch.dtype, one_per_row: bool) -> dict[str, torch.Tensor]:
        factors: dict[str, torch.Tensor] = {}
        if one_per_row:
            # (n + 1, r_max, in) and (n + 1, r_max, out): A and (s·B).T zero-padded to the largest rank, plus a
            # zero adapter for rows without one. Their first n entries, reshaped, are A_cat and B_cat.T.
            r_max = max(self.r[n] for n in names)
            a_rows = self.lora_A[names[0]].weight.new_zeros(len(names) + 1, r_max, self.in_features)
            bt_rows = self.lora_B[names[0]].weight.new_zeros(len(names) + 1, r_max, self.out_features)
            for i, n in enumerate(names):
                a_rows[i, : self.r[n]] = self.lora_A[n].weight
                bt_rows[i, : self.r[n]] = (self.lora_B[n].weight * self.scaling[n]).T
            factors["A_rows"], factors["Bt_rows"] = a_rows.to(dtype), bt_rows.to(dtype)
        else:
            factors["A"] = torch.cat([self.lora_A[n].weight for n in names]).to(dtype)
            factors["B"] = torch.cat([self.lora_B[n].weight * self.scaling[n] for n in names], dim=1).to(dtype)
        return factors | self.stacked_lora_biases(names, dtype)  # "bias": (n, out)

    def add_stacked_output(self, result: torch.Tensor, x: torch.Tensor, stack: AdapterStack) -> torch.Tensor:
        factors = stack.factors
        x = x.to(result.dtype)
        if stack.dropout and self.training:
            x = F.dropout(x, stack.dropout, training=True)
        column_gates, gates = stack.gates_in(result.dtype)
        if "A_rows" in factors:
            out = self._one_adapter_per_row(result, x, factors["A_rows"], factors["Bt_rows"], gates, stack.row_adapter)
        else:
            hidden = F.linear(x, factors["A"]) * broadcast_gates(column_gates, x.ndim)
            out = torch.addmm(result.reshape(-1, self.out_features), hidden.reshape(-1, hidden.shape[-1]),
                              factors["B"].T).view(result.shape)  # fmt: skip
        if "bias" in factors:
            out = out + broadcast_gates(gates @ factors["bias"], x.ndim)
        return out

    def _one_adapter_per_row(
        self, result: torch.Tensor, x: torch.Tensor, a_rows: torch.Tensor, bt_rows: torch.Tensor,
        gates: torch.Tensor, row_adapter: torch.Tensor,
    ) -> torch.Tensor:  # fmt: skip
        n, r_max = a_rows.shape[0] - 1, a_rows.shape[1]
        rows = x.reshape(x.shape[0], -1, self.in_features)  # (batch, tokens, in)
        if self.use_gathered(n, rows.shape[1]):  # row i: result_i + (x_i @ A_k.T) @ (s·B_k).T, k its adapter
            hidden = torch.bmm(rows, a_rows.index_select(0, row_adapter).transpose(1, 2))
            out = torch.baddbmm(result.reshape(rows.shape[0], -1, self.out_features), hidden,
                                bt_rows.index_select(0, row_adapter))  # fmt: skip
            return out.view(result.shape)
        # all adapters at once: ((x @ A_cat.T) ⊙ S) @ B_cat.T, S one-hot per row over each adapter's r_max columns
        hidden = F.linear(x, a_rows[:n].reshape(n * r_max, self.in_features))
        hidden = hidden * broadcast_gates(gates.repeat_interleave(r_max, dim=-1), x.ndim)
        out = torch.addmm(result.reshape(-1, self.out_features), hidden.reshape(-1, n * r_max),
                          bt_rows[:n].reshape(n * r_max, self.out_features))  # fmt: skip
        return out.view(result.shape)

    def lora_delta_weights(self, name: str) -> dict[str, torch.Tensor]:
        a, b = self.lora_A[name], self.lora_B[name]
        delta = (b.weight @ a.weight) * self.scaling[name]
        deltas = {"weight": delta.T if self.fan_in_fan_out else delta}
        if b.bias is not None:
            deltas["bias"] = b.bias * self.scaling[name]
        return deltas
