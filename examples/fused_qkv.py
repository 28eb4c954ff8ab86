"""Adding LoRA to your own layer type: a fused QKV projection.

`FusedQKV` holds one weight `(3·d, d)` and returns three tensors (q, k, v). lorakit has no built-in layer
for it, so targeting it raises a `TargetError` that points to `register_lora_layer`. `LoraFusedQKV` below
is all it takes: one A `(r, d)` and one B `(3·d, r)`, the update split the same way as the base output.

    (q, k, v) = split(x @ W.T, d) + split(s · (x @ A.T) @ B.T, d)
    ΔW = s · B @ A                      (3·d, d), merged into W

Run: python examples/fused_qkv.py
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import lorakit


class FusedQKV(nn.Module):
    """One projection for queries, keys and values."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.weight = nn.Parameter(torch.randn(3 * dim, dim) / dim**0.5)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return F.linear(x, self.weight).split(self.dim, dim=-1)


class LoraFusedQKV(lorakit.LoraLayer):
    """LoRA for `FusedQKV`: the same low-rank update as a Linear, split into q, k and v."""

    def __init__(self, base_layer: FusedQKV) -> None:
        super().__init__(base_layer)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()

    def create_adapter(self, name: str, r: int, config: lorakit.LoraConfig) -> None:
        dim = self.base_layer.dim
        self.lora_A[name] = nn.Linear(dim, r, bias=False)  # reset_adapter's default init handles A and B
        self.lora_B[name] = nn.Linear(r, 3 * dim, bias=False)

    def add_adapter_output(self, result: tuple[torch.Tensor, ...], x: torch.Tensor, name: str) -> tuple:
        delta = self.lora_B[name](self.lora_A[name](x)) * self.scaling[name]
        return tuple(r + d for r, d in zip(result, delta.split(self.base_layer.dim, dim=-1), strict=True))

    def delta_weights(self, name: str) -> dict[str, torch.Tensor]:
        return {"weight": (self.lora_B[name].weight @ self.lora_A[name].weight) * self.scaling[name]}


lorakit.register_lora_layer(FusedQKV, LoraFusedQKV)


class Attention(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.qkv = FusedQKV(dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x)
        return self.out(F.scaled_dot_product_attention(q, k, v))


if __name__ == "__main__":
    torch.manual_seed(0)
    model = Attention(32)
    lorakit.get_lora_model(model, lorakit.LoraConfig(r=4, target_modules=["qkv", "out"], init_lora_weights=False))
    x = torch.randn(2, 10, 32)
    with torch.no_grad():
        unmerged = model(x)
        lorakit.merge(model)
        merged = model(x)
    print(type(model.qkv).__name__, "max |merged - unmerged| =", (merged - unmerged).abs().max().item())
    print("saved keys:", sorted(lorakit.lora_state_dict(model)))
