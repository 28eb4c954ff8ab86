"""Optional shortcuts for `LoraLinear`, each taken only where it computes what the plain forward computes and
measured faster (`python benchmarks/run.py --only train,inference`; docs/design.md §8). Nothing here is
needed to understand the math: `LoraLinear.add_adapter_output` is the reference.

- **Fused, one adapter, float32** (`single_adapter_forward`): on a plain `nn.Linear`, compute `s·B(A x) + b`
  first and let the base GEMM accumulate into it (`addmm_`): the large output is written once, by the small
  GEMM, and read back only inside the compute-bound base GEMM. It gained 1-2 points per layer in float32; in
  bfloat16, CPU GEMMs with a bfloat16 accumulator input measured slower, so it is float32/float64 only.
- **Without autograd** (`add_branch_without_grad`): the branch goes into the base output in place when that
  output is `nn.Linear`'s own fresh tensor, which nobody else holds (no hook or subclass may see it).
- **A float32 branch for small half-precision inference on the CPU**: a float16 branch, or a bfloat16 one of
  at most `FLOAT32_BRANCH_MAX_MACS` multiply-adds (`rows·r·(in + out)`: decoding, small layers), runs in
  float32 on the master weights and is rounded once into the output, as peft computes every branch. CPU
  bfloat16 GEMMs cost ~30 µs per call however small, float32's skinny GEMMs a few µs plus their work;
  float16 GEMMs are slow at every size. Measured from 128 to 4096 features, r 8-64, 1-1024 rows: float32
  wins below ~1M multiply-adds, ties around it, loses from 2M.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.module import _global_forward_hooks, _global_forward_pre_hooks

if TYPE_CHECKING:
    from .linear import LoraLinear

_FUSED_DTYPES = (torch.float32, torch.float64)
FLOAT32_BRANCH_MAX_MACS = 2**20


def is_plain_linear(base: nn.Module) -> bool:
    """Whether calling `base` is exactly `F.linear(x, W, b)`: an `nn.Linear` whose forward is not overridden (by
    a subclass or an instance attribute, as accelerate's hooks do) and that no hook watches."""
    return (
        type(base).forward is nn.Linear.forward
        and "forward" not in base.__dict__
        and not (base._forward_hooks or base._forward_pre_hooks)
        and not (_global_forward_hooks or _global_forward_pre_hooks)
    )


def single_adapter_forward(layer: LoraLinear, x: torch.Tensor) -> torch.Tensor | None:
    """The whole forward with exactly one adapter on a plain `nn.Linear`, or None where that does not apply
    (several adapters, a stack, a merge, autocast, a hooked or subclassed base)."""
    adapters = layer.forward_adapters
    if (
        len(adapters) != 1 or layer.adapter_stack is not None or layer.merged_adapters
        or torch.is_autocast_enabled(x.device.type) or not is_plain_linear(layer.base_layer)
    ):  # fmt: skip
        return None
    base = layer.base_layer
    if x.dtype in _FUSED_DTYPES and x.dtype == base.weight.dtype:
        return fused_forward(layer, x, adapters[0])
    result = F.linear(x, base.weight, base.bias)
    if torch.is_grad_enabled():
        return layer.add_adapter_output(result, x, adapters[0])
    return add_branch_without_grad(layer, result, x, adapters[0], in_place=True)  # F.linear's fresh output


def fused_forward(layer: LoraLinear, x: torch.Tensor, name: str) -> torch.Tensor:
    """`base(x) + s·B(A(dropout(x)))` for a plain nn.Linear base, the other way round: the LoRA output plus the
    biases first, then the base GEMM accumulating into it."""
    base, b, s = layer.base_layer, layer.lora_B[name], layer.scaling[name]
    dtype = x.dtype
    rows = x.reshape(-1, layer.in_features)
    hidden = F.linear(layer.dropout_input(rows, name), layer.lora_A[name].weight.to(dtype))
    scaled_b = (b.weight * s).to(dtype)
    bias = base.bias
    if b.bias is not None:
        bias = (b.bias * s).to(dtype) if bias is None else bias + (b.bias * s).to(dtype)
    out = hidden @ scaled_b.T if bias is None else torch.addmm(bias, hidden, scaled_b.T)
    return out.addmm_(rows, base.weight.T).view(*x.shape[:-1], layer.out_features)


def add_branch_without_grad(
    layer: LoraLinear, result: torch.Tensor, x: torch.Tensor, name: str, in_place: bool | None = None
) -> torch.Tensor:
    """`result + s·B(A(dropout(x)))` without autograd: into `result` itself when `in_place` (default: when the
    base is a plain nn.Linear, whose output is a fresh tensor), in float32 where that is faster."""
    if in_place is None:
        in_place = is_plain_linear(layer.base_layer)
    x = layer.dropout_input(x, name)
    a, b, s = layer.lora_A[name].weight, layer.lora_B[name], layer.scaling[name]
    dtype = result.dtype
    rows = x.numel() // layer.in_features
    if _float32_is_faster(layer, dtype, rows, a.shape[0], result.device):
        # float32 GEMMs on the master weights; the in-place add rounds the float32 sum once
        branch = F.linear(F.linear(x.to(a.dtype), a), b.weight, b.bias)
        return (result if in_place else result.clone()).add_(branch, alpha=s)
    out_rows = result.reshape(rows, layer.out_features)
    hidden = F.linear(x.reshape(rows, layer.in_features).to(dtype), a.to(dtype))
    out = (out_rows.addmm_ if in_place else out_rows.addmm)(hidden, b.weight.to(dtype).T, alpha=s)
    if b.bias is not None:
        scaled_bias = (b.bias * s).to(dtype)
        out = out.add_(scaled_bias) if in_place else out + scaled_bias
    return out.view(result.shape)


def _float32_is_faster(layer: LoraLinear, dtype: torch.dtype, rows: int, rank: int, device: torch.device) -> bool:
    """Whether an inference branch in `dtype` over `rows` rows at rank `rank` is faster in float32 (module doc)."""
    if device.type != "cpu":
        return False
    macs = rows * rank * (layer.in_features + layer.out_features)
    return dtype is torch.float16 or (dtype is torch.bfloat16 and macs <= FLOAT32_BRANCH_MAX_MACS)
