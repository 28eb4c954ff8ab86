"""LoRA for `nn.Linear` and transformers' `Conv1D` (a linear layer whose weight is stored `(in, out)`).

Shapes: `x: (..., in)`, `A: (r, in)`, `B: (out, r)`, `s = alpha / r` (or `alpha / sqrt(r)`).

    y  = base(x) + s · (dropout(x) @ A.T) @ B.T  (+ s · b_B with lora_bias)
    ΔW = s · B @ A            for nn.Linear (weight `(out, in)`)
    ΔW = s · (B @ A).T        for Conv1D    (weight `(in, out)`, "fan_in_fan_out")

A and B are float32 master weights; the branch runs in the activation dtype, so a bfloat16 model runs a
bfloat16 branch (as autocast would) while the optimizer updates float32 values. s is applied inside a GEMM
(folded into B, out × r, or as `addmm`'s alpha), never as a pass over the output. Two paths were chosen
because they measured faster (benchmarks/run.py):

- with one active adapter on a plain float32 `nn.Linear`, the forward computes `s·B(A x) + b` first and
  lets the base GEMM accumulate into it (`addmm_`): the output is written once, by the small GEMM, and read
  back only inside the compute-bound base GEMM;
- on the CPU without autograd, a float16 branch, or a small bfloat16 one (at most
  `FLOAT32_BRANCH_MAX_MACS` multiply-adds, `rows·r·(in + out)`: decoding, small layers), runs in float32 on
  the master weights and is added into the base output (in place for a plain nn.Linear). CPU GEMMs in
  bfloat16 cost ~30 µs per call however small, float32's skinny GEMMs a few µs plus their work; float16
  GEMMs are slow at every size. The result is the float32 branch rounded once, as peft computes it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.module import _global_forward_hooks, _global_forward_pre_hooks

from ..config import LoraConfig
from .base import LoraLayer, adapter_dtype
from .stack import AdapterStack, broadcast_gates

# Where accumulating the base GEMM into the LoRA output measured faster (benchmarks/run.py --only train,inference):
# float32 gains 1-2 points per layer; in bfloat16 CPU GEMMs with a bfloat16 accumulator input are slower.
_FUSED_DTYPES = (torch.float32, torch.float64)
# Up to this many multiply-adds a bfloat16 branch on the CPU is faster in float32 (measured from 128 to 4096
# features, r 8-64, 1-1024 rows: float32 wins below ~1M, ties around it, loses from 2M); float16 always is.
FLOAT32_BRANCH_MAX_MACS = 2**20


def is_transformers_conv1d(module: nn.Module) -> bool:
    """Whether `module` is transformers' `Conv1D`, checked without importing transformers."""
    return any(cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers.") for cls in type(module).__mro__)


class LoraLinear(LoraLayer):
    """LoRA around an `nn.Linear` or a transformers `Conv1D`."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.fan_in_fan_out = is_transformers_conv1d(base_layer)
        weight = base_layer.weight
        self.in_features, self.out_features = (
            weight.shape if self.fan_in_fan_out else (weight.shape[1], weight.shape[0])
        )
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()

    def _is_plain_linear(self) -> bool:
        """Whether calling the base layer is exactly `F.linear(x, W, b)`: an `nn.Linear` whose forward is not
        overridden (by a subclass or an instance attribute, as accelerate's hooks do) and that no hook watches."""
        base = self.base_layer
        return (
            type(base).forward is nn.Linear.forward
            and "forward" not in base.__dict__
            and not (base._forward_hooks or base._forward_pre_hooks)
            and not (_global_forward_hooks or _global_forward_pre_hooks)
        )

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        adapters = self._forward_adapters
        if (
            len(adapters) == 1 and self.adapter_stack is None and not self.merged_adapters and not args and not kwargs
            and not torch.is_autocast_enabled(x.device.type) and self._is_plain_linear()
        ):  # fmt: skip
            return self._plain_single_forward(x, adapters[0])
        return super().forward(x, *args, **kwargs)

    def _plain_single_forward(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """The forward with one adapter on a plain nn.Linear (so `base(x)` is `F.linear(x, W, b)`)."""
        base = self.base_layer
        if x.dtype in _FUSED_DTYPES and x.dtype == base.weight.dtype:
            return self._fused_forward(x, name)
        # without autograd the branch may go into F.linear's fresh output, which nobody else holds
        return self._add_branch(F.linear(x, base.weight, base.bias), x, name, in_place=not torch.is_grad_enabled())

    def _fused_forward(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """`base(x) + s·B(A(dropout(x)))` for a plain nn.Linear base, computed the other way round: the LoRA
        output (plus the biases) first, then the base GEMM accumulating into it, so the large output is
        written once by the small GEMM and read only inside the compute-bound base GEMM."""
        base, b, s = self.base_layer, self.lora_B[name], self.scaling[name]
        dtype = x.dtype
        rows = x.reshape(-1, self.in_features)
        p = self.lora_dropout_p[name]
        hidden = F.linear(F.dropout(rows, p, training=True) if p and self.training else rows,
                          self.lora_A[name].weight.to(dtype))  # fmt: skip
        scaled_b = (b.weight * s).to(dtype)
        bias = base.bias
        if b.bias is not None:
            bias = (b.bias * s).to(dtype) if bias is None else bias + (b.bias * s).to(dtype)
        out = hidden @ scaled_b.T if bias is None else torch.addmm(bias, hidden, scaled_b.T)
        return out.addmm_(rows, base.weight.T).view(*x.shape[:-1], self.out_features)

    def create_adapter(self, name: str, r: int, config: LoraConfig) -> None:
        weight = self.base_layer.weight
        factory = {"device": weight.device, "dtype": adapter_dtype(weight.dtype)}
        self.lora_A[name] = nn.Linear(self.in_features, r, bias=False, **factory)
        self.lora_B[name] = nn.Linear(r, self.out_features, bias=config.lora_bias, **factory)

    def add_adapter_output(self, result: torch.Tensor, x: torch.Tensor, name: str) -> torch.Tensor:
        # without autograd, into the base output itself when it is nn.Linear's own fresh tensor (saves a copy)
        return self._add_branch(result, x, name, in_place=not torch.is_grad_enabled() and self._is_plain_linear())

    def _add_branch(self, result: torch.Tensor, x: torch.Tensor, name: str, in_place: bool) -> torch.Tensor:
        """`result + s·B(A(dropout(x)))`, into `result` itself if `in_place` (only without autograd)."""
        p = self.lora_dropout_p[name]
        if p and self.training:
            x = F.dropout(x, p, training=True)
        a, b, s = self.lora_A[name].weight, self.lora_B[name], self.scaling[name]
        dtype = result.dtype
        rows = x.numel() // self.in_features
        if not torch.is_grad_enabled() and self._float32_branch(dtype, rows, a.shape[0], result.device):
            # float32 GEMMs on the master weights; the in-place add rounds the float32 sum once
            branch = F.linear(F.linear(x.to(a.dtype), a), b.weight, b.bias)
            return (result if in_place else result.clone()).add_(branch, alpha=s)
        out_rows = result.reshape(rows, self.out_features)
        hidden = F.linear(x.reshape(rows, self.in_features).to(dtype), a.to(dtype))
        # s applied by the GEMM (alpha) rather than to the large output, and the sum fused into the GEMM
        out = (out_rows.addmm_ if in_place else out_rows.addmm)(hidden, b.weight.to(dtype).T, alpha=s)
        if b.bias is not None:
            scaled_bias = (b.bias * s).to(dtype)
            out = out.add_(scaled_bias) if in_place else out + scaled_bias
        return out.view(result.shape)

    def _float32_branch(self, dtype: torch.dtype, rows: int, rank: int, device: torch.device) -> bool:
        """Whether an inference branch in `dtype` over `rows` rows at rank `rank` is faster in float32 (see the
        module doc)."""
        if device.type != "cpu":
            return False
        macs = rows * rank * (self.in_features + self.out_features)
        return dtype is torch.float16 or (dtype is torch.bfloat16 and macs <= FLOAT32_BRANCH_MAX_MACS)

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

    def delta_weights(self, name: str) -> dict[str, torch.Tensor]:
        a, b = self.lora_A[name], self.lora_B[name]
        delta = (b.weight @ a.weight) * self.scaling[name]
        deltas = {"weight": delta.T if self.fan_in_fan_out else delta}
        if b.bias is not None:
            deltas["bias"] = b.bias * self.scaling[name]
        return deltas
