"""LoRA for `nn.Embedding`.

Shapes: `ids: (...)` integers, `A: (r, num_embeddings)`, `B: (embedding_dim, r)`; no dropout.

    y  = base(ids) + s · embedding(ids, A.T) @ B.T      (padding_idx, max_norm… as the base)
    ΔW = s · (B @ A).T                                    (weight `(num_embeddings, embedding_dim)`)

Default init is the reverse of Linear's: A = 0, B ~ N(0, 1) (peft and the LoRA paper's reference code).

DoRA (`use_dora`, layers/dora.py) views the table transposed, `Wᵀ: (embedding_dim, num_embeddings)`, as peft
does: `m: (embedding_dim,)` and the norms run over the vocabulary, one per embedding feature.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import LoraConfig
from ..errors import LoraConfigError
from .base import adapter_factory
from .dora import DoraLayer
from .stack import AdapterStack, broadcast_gates


class LoraEmbedding(DoraLayer):
    """LoRA around an `nn.Embedding`; DoRA adapters too (`use_dora`)."""

    adapter_containers = ("lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")
    applies_dropout = False  # as peft's Embedding

    def __init__(self, base_layer: nn.Embedding) -> None:
        super().__init__(base_layer)
        self.num_embeddings, self.embedding_dim = base_layer.weight.shape
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()

    def create_adapter(self, name: str, r: int, config: LoraConfig) -> None:
        if config.lora_bias:
            raise LoraConfigError("lora_bias=True is not supported on an Embedding layer")
        weight = self.base_layer.weight
        factory = adapter_factory(weight)
        self.lora_embedding_A[name] = nn.Parameter(torch.empty(r, self.num_embeddings, **factory))
        self.lora_embedding_B[name] = nn.Parameter(torch.empty(self.embedding_dim, r, **factory))
        self.create_dora_magnitude(name, config, factory)

    def reset_adapter(self, name: str, init: bool | str) -> None:
        a, b = self.lora_embedding_A[name], self.lora_embedding_B[name]
        if init is False:
            nn.init.normal_(a)
        else:
            nn.init.zeros_(a)
        nn.init.normal_(b)

    def _lookup(self, ids: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """Rows of `table` `(num_embeddings, c)` for `ids`, with the base's padding_idx, max_norm, …"""
        base = self.base_layer
        return F.embedding(
            ids, table, padding_idx=base.padding_idx, max_norm=base.max_norm, norm_type=base.norm_type,
            scale_grad_by_freq=base.scale_grad_by_freq, sparse=base.sparse,
        )  # fmt: skip

    def forward(self, ids: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        if self.runs_dora():
            return self.forward_with_dora(ids, *args, **kwargs)
        return super().forward(ids, *args, **kwargs)

    def add_adapter_output(self, result: torch.Tensor, ids: torch.Tensor, name: str) -> torch.Tensor:
        dtype = result.dtype
        hidden = self._lookup(ids, self.lora_embedding_A[name].T.to(dtype))
        return result + (hidden @ self.lora_embedding_B[name].T.to(dtype)) * self.scaling[name]

    # ----- DoRA's view of the layer (layers/dora.py) ------------------------------------------------------

    def dora_matrices(self, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.base_layer.weight.T, self.lora_embedding_A[name], self.lora_embedding_B[name]

    def weight_from_matrix(self, delta: torch.Tensor) -> torch.Tensor:
        return delta.T

    def magnitude_shape(self) -> tuple[int, ...]:
        return (self.embedding_dim,)

    def output_bias(self, dtype: torch.dtype) -> None:
        return None

    def output_without_bias(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self._lookup(ids, self.base_layer.weight.to(dtype))

    def add_branch(self, base: torch.Tensor, ids: torch.Tensor, name: str) -> torch.Tensor:
        return self.add_adapter_output(base, ids, name)

    def stacked_factors(self, names: list[str], dtype: torch.dtype, one_per_row: bool) -> dict[str, torch.Tensor]:
        return {
            "A_T": torch.cat([self.lora_embedding_A[n] for n in names]).T.to(dtype).contiguous(),  # (num, Σr)
            "B": torch.cat([self.lora_embedding_B[n] * self.scaling[n] for n in names], dim=1).to(dtype),
        }

    def add_stacked_output(self, result: torch.Tensor, ids: torch.Tensor, stack: AdapterStack) -> torch.Tensor:
        column_gates, _ = stack.gates_in(result.dtype)
        hidden = self._lookup(ids, stack.factors["A_T"]) * broadcast_gates(column_gates, ids.ndim + 1)
        return result + hidden @ stack.factors["B"].T

    def lora_delta_weights(self, name: str) -> dict[str, torch.Tensor]:
        delta = self.lora_embedding_B[name] @ self.lora_embedding_A[name]
        return {"weight": delta.T * self.scaling[name]}
