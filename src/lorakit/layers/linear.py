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
from ..errors import LoraError, MergeError
from . import dora, linear_fast
from .base import LoraLayer, adapter_dtype
from .exact import merged_value
from .stack import AdapterStack, broadcast_gates


def is_transformers_conv1d(module: nn.Module) -> bool:
    """Whether `module` is transformers' `Conv1D`, checked without importing transformers."""
    return any(cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers.") for cls in type(module).__mro__)


class LoraLinear(LoraLayer):
    """LoRA around an `nn.Linear` or a transformers `Conv1D`; DoRA adapters too (`use_dora`, layers/dora.py)."""

    adapter_containers = ("lora_A", "lora_B", "lora_magnitude_vector")
    supports_dora = True

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.fan_in_fan_out = is_transformers_conv1d(base_layer)
        self.in_features, self.out_features = self.base_features(base_layer)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ParameterDict()  # DoRA's m: (out,), for the adapters that have one
        self._dora_norms: dict[str, tuple[tuple, torch.Tensor]] = {}  # adapter → (what it was computed from, n)

    def base_features(self, base_layer: nn.Module) -> tuple[int, int]:
        """`(in, out)` of the base layer, read from its weight's shape (`(in, out)` for Conv1D)."""
        weight = base_layer.weight
        return tuple(weight.shape) if self.fan_in_fan_out else (weight.shape[1], weight.shape[0])

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        dora_runs = self.lora_magnitude_vector and self.adapter_stack is None
        if dora_runs and any(name in self.lora_magnitude_vector for name in self.forward_adapters):
            return self._forward_with_dora(x, *args, **kwargs)
        if not args and not kwargs:
            out = linear_fast.single_adapter_forward(self, x)  # None where no shortcut applies
            if out is not None:
                return out
        return super().forward(x, *args, **kwargs)

    def _dora_norm(self, name: str) -> torch.Tensor:
        """DoRA adapter `name`'s `n = ‖W + s·B A‖` per output (detached), kept while W, A and B are unchanged: at
        inference it costs nothing after the first forward; in training the optimizer's step changes A and B.
        A write through `.data`, which torch does not count as a change, is not seen (lorakit writes none)."""
        weight, a, b = self.weight_out_in(), self.lora_A[name].weight, self.lora_B[name].weight
        # torch counts every in-place change of a tensor in `_version` (an optimizer step, copy_, a merge)
        key = (*(t.data_ptr() for t in (weight, a, b)), weight._version, a._version, b._version, self.scaling[name])
        cached = self._dora_norms.get(name)
        if cached is None or cached[0] != key:
            cached = self._dora_norms[name] = (key, dora.weight_norm(weight, a, b, self.scaling[name]))
        return cached[1]

    def create_adapter(self, name: str, r: int, config: LoraConfig) -> None:
        weight = self.base_layer.weight
        factory = {"device": weight.device, "dtype": adapter_dtype(weight.dtype)}
        self.lora_A[name] = nn.Linear(self.in_features, r, bias=False, **factory)
        self.lora_B[name] = nn.Linear(r, self.out_features, bias=config.lora_bias, **factory)
        if config.use_dora:
            self.lora_magnitude_vector[name] = nn.Parameter(torch.ones(self.out_features, **factory))
            self._dora_norms.pop(name, None)  # of an earlier adapter of that name

    def delete_adapter(self, name: str) -> None:
        super().delete_adapter(name)
        self._dora_norms.pop(name, None)

    def reset_adapter(self, name: str, init: bool | str) -> None:
        super().reset_adapter(name, init)
        if name in self.lora_magnitude_vector:  # m = n: the adapter starts as its LoRA part alone would
            with torch.no_grad():
                a, b = self.lora_A[name].weight, self.lora_B[name].weight
                self.lora_magnitude_vector[name].copy_(dora.weight_norm(self.weight_out_in(), a, b, self.scaling[name]))

    def weight_out_in(self) -> torch.Tensor:
        """The base weight as `(out, in)` (a view; Conv1D stores it `(in, out)`)."""
        weight = self.base_layer.weight
        return weight.T if self.fan_in_fan_out else weight

    def _forward_with_dora(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The forward when a DoRA adapter runs, adapters in their active order as peft runs them. A DoRA adapter
        rescales what the layer computed so far without its bias, `y`, and adds its branch (layers/dora.py):

            y ← f ⊙ (y + s·B(A x))             (with dropout on: y ← y + (f − 1) ⊙ (x' Wᵀ) + f ⊙ s·B(A x'),
                                                 x' the dropped-out input, as peft computes it)

        the branch accumulating into `y` in its GEMM and one fused pass scaling and adding the bias back. Plain
        LoRA adapters add their branch as always."""
        if self.merged_adapters and self.training and torch.is_grad_enabled():
            self._refuse_training_merged()
        result = self.base_layer(x, *args, **kwargs)
        bias = getattr(self.base_layer, "bias", None)
        for name in self.forward_adapters:
            if name not in self.lora_magnitude_vector:
                result = self.add_adapter_output(result, x, name)
            elif self.lora_dropout_p[name] and self.training:
                dropped = self.dropout_input(x, name).to(result.dtype)
                own_base = F.linear(dropped, self.weight_out_in().to(result.dtype))
                factor, combined = self._dora_parts(dropped, name, own_base)
                result = result + (combined * factor - own_base)
            else:
                factor, combined = self._dora_parts(x, name, result if bias is None else result - bias)
                result = combined * factor if bias is None else torch.addcmul(bias.to(result.dtype), combined, factor)
        return result

    def _dora_parts(self, x: torch.Tensor, name: str, base: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`f = m / n` `(out,)` and `base + s·B(A x)` for DoRA adapter `name`, in `base`'s dtype."""
        a, b, s, dtype = self.lora_A[name].weight, self.lora_B[name], self.scaling[name], base.dtype
        factor = (self.lora_magnitude_vector[name] / self._dora_norm(name)).to(dtype)
        hidden = F.linear(x.reshape(-1, self.in_features).to(dtype), a.to(dtype))
        combined = base.reshape(-1, self.out_features).addmm(hidden, b.weight.to(dtype).T, alpha=s)
        if b.bias is not None:
            combined = combined + (b.bias * s).to(dtype)
        return factor, combined.view(base.shape)

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
        dora_adapters = [n for n in names if n in self.lora_magnitude_vector]
        if dora_adapters:
            raise LoraError(
                f"DoRA adapters {dora_adapters} cannot run in a mixed batch or as X-LoRA experts: DoRA rescales the "
                "whole layer output per adapter, which the stacked forward cannot express"
            )
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

    def delta_weights(self, name: str) -> dict[str, torch.Tensor]:
        a, b = self.lora_A[name], self.lora_B[name]
        if name in self.lora_magnitude_vector:
            magnitude = self.lora_magnitude_vector[name]
            delta = dora.delta_weight(self.weight_out_in(), a.weight, b.weight, self.scaling[name], magnitude)
        else:
            delta = (b.weight @ a.weight) * self.scaling[name]
        deltas = {"weight": delta.T if self.fan_in_fan_out else delta}
        if b.bias is not None:
            deltas["bias"] = b.bias * self.scaling[name]
        return deltas

    def check_mergeable(self, name: str) -> None:
        super().check_mergeable(name)
        if len(self.active_adapters) > 1 and any(n in self.lora_magnitude_vector for n in self.active_adapters):
            raise MergeError(
                f"cannot merge adapter {name!r}: this layer runs a DoRA adapter beside others "
                f"({self.active_adapters}), and a DoRA adapter rescales what the adapters before it computed, so "
                "their updates do not add up. Activate the DoRA adapter alone to merge it"
            )

    def merge_parameter(self, param_name: str, delta: torch.Tensor, names: list[str]) -> Any:
        # A DoRA update depends on W itself, so while merged it cannot be recomputed for the exact residual of
        # layers/exact.py: keep a copy of W instead (its size, in its dtype).
        if param_name == "weight" and any(n in self.lora_magnitude_vector for n in names):
            weight = self.base_layer.weight.data
            original = weight.clone()
            weight.copy_(merged_value(weight, delta))
            return original
        return super().merge_parameter(param_name, delta, names)

    def restore_parameter(self, param_name: str, delta: torch.Tensor, residual: Any) -> None:
        if isinstance(residual, torch.Tensor):
            self._base_param(param_name).data.copy_(residual)
            return
        super().restore_parameter(param_name, delta, residual)

    def rank_layout(self, name: str) -> dict[str, tuple[int | None, bool]]:
        layout: dict[str, tuple[int | None, bool]] = {"lora_A.weight": (0, False), "lora_B.weight": (1, True)}
        if self.lora_B[name].bias is not None:
            layout["lora_B.bias"] = (None, True)
        if name in self.lora_magnitude_vector:
            layout["lora_magnitude_vector"] = (None, False)  # one per output: no rank axis, no scaling
        return layout
