"""DoRA (Liu et al., 2024): weight-decomposed LoRA, for the LoRA layers whose update is a flat low-rank product:
`LoraLinear` (`nn.Linear`, transformers `Conv1D`), `LoraConv` (`nn.Conv1d/2d/3d`) and `LoraEmbedding`.

Each kind views its base weight as a matrix `W: (out, in)` with `ΔW = s·B A`, `A: (r, in)`, `B: (out, r)`:
Linear as is (Conv1D transposed), a convolution flattened to `(out, in·k…)` (B is 1×1, so `B·A` flattened is
the kernel update), an embedding transposed, `(embedding_dim, num_embeddings)`. DoRA splits the adapted weight
into a direction and a trained magnitude `m`, one per output (row of that matrix):

    W_dora = m ⊙ (W + s·B A) / n,          n_j = ‖W_j + s·(B A)_j‖     (the norm of row j, over inputs)

and, as the paper advises and peft does, treats `n` as a constant in the backward (it is detached). With
`f = m / n` the layer computes

    y = base(x) + (f − 1) ⊙ base₀(x) + f ⊙ s·B(A x)

where `base₀(x)` is the base output without its bias (recomputed on the dropped-out input when dropout is on, as
peft does). Merging adds `ΔW = (f − 1) ⊙ W + f ⊙ s·B A` (row-wise factors), so merged and unmerged agree. `m` is
stored in peft's shape: `(out,)` for Linear, `(embedding_dim,)` for Embedding, `(1, out, 1, …)` for a
convolution (it broadcasts over the output's channel axis).

With several adapters active, peft runs them in order and a DoRA adapter rescales all the layer computed
before it (the base output and the earlier adapters' branches, without the bias): `y ← f ⊙ (y + s·B A x)`.
Their updates then do not add up, so a layer merges a DoRA adapter only when it is its one active adapter.

`n` is computed without forming `B A` (out × in):

    n_j² = ‖W_j‖² + 2s·⟨(W Aᵀ)_j, B_j⟩ + s²·B_j (A Aᵀ) B_jᵀ

from one GEMM `W Aᵀ` (out × r) and the r × r Gram `A Aᵀ`, in float32 (or wider). At initialisation `m = n`, so
a DoRA adapter starts as the base model when B = 0.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..config import LoraConfig
from ..errors import LoraError, MergeError
from .base import LoraLayer
from .exact import merged_value


def weight_norm(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """`n: (out,)`, the row norms of `W + s·B A` for `weight: (out, in)`, `a: (r, in)`, `b: (out, r)`, detached,
    in at least float32."""
    dtype = torch.promote_types(weight.dtype, torch.float32)
    with torch.no_grad():
        a, b = a.to(dtype), b.to(dtype)
        weight_a = (weight @ a.to(weight.dtype).T).to(dtype)  # (out, r), in the weight's dtype: no copy of W
        squared = (
            torch.linalg.vector_norm(weight, dim=1, dtype=dtype).square()
            + 2 * scaling * (weight_a * b).sum(1)
            + scaling**2 * ((b @ (a @ a.T)) * b).sum(1)
        )
        return squared.clamp_min(0).sqrt()


def delta_weight(
    weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float, magnitude: torch.Tensor
) -> torch.Tensor:
    """`ΔW = (f − 1) ⊙ W + f ⊙ s·B A`, `(out, in)`, with `f = m / n` per row (`magnitude: (out,)`)."""
    dtype = torch.promote_types(weight.dtype, torch.float32)
    factor = (magnitude.to(dtype) / weight_norm(weight, a, b, scaling)).unsqueeze(1)
    return (factor - 1) * weight.to(dtype) + factor * (scaling * (b.to(dtype) @ a.to(dtype)))


class DoraLayer(LoraLayer):
    """A LoRA layer kind with DoRA adapters (`use_dora=True`). The kind subclasses this instead of `LoraLayer`,
    calls `create_dora_magnitude` in its `create_adapter`, and supplies its matrix view and output shapes:

    - `dora_matrices(name)`: `(W, A, B)` as `(out, in)`, `(r, in)`, `(out, r)` views;
    - `weight_from_matrix(delta)`: a `(out, in)` update in the base weight's own shape;
    - `magnitude_shape()`: peft's shape of `m`, which broadcasts against the layer's output;
    - `output_bias(dtype)`: the base's bias broadcastable to the output, or None;
    - `output_without_bias(x, dtype)`: `base₀(x)`, the base's output without its bias;
    - `add_branch(base, x, name)`: `base + s·B(A x)` in `base`'s dtype (the LoRA branch, no dropout);
    - `lora_delta_weights(name)`: the plain LoRA update, what `delta_weights` is for a `LoraLayer` (here
      `delta_weights` turns it into DoRA's for the adapters that have a magnitude).
    """

    supports_dora = True
    #: Whether the kind applies `lora_dropout` (peft's Embedding does not).
    applies_dropout = True

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.lora_magnitude_vector = nn.ParameterDict()  # DoRA's m, for the adapters that have one
        self._dora_norms: dict[str, tuple[tuple, torch.Tensor]] = {}  # adapter → (what it was computed from, n)

    # ----- what a kind provides -----------------------------------------------------------------------

    def dora_matrices(self, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def weight_from_matrix(self, delta: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def magnitude_shape(self) -> tuple[int, ...]:
        raise NotImplementedError

    def output_bias(self, dtype: torch.dtype) -> torch.Tensor | None:
        raise NotImplementedError

    def output_without_bias(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        raise NotImplementedError

    def add_branch(self, base: torch.Tensor, x: torch.Tensor, name: str) -> torch.Tensor:
        raise NotImplementedError

    def lora_delta_weights(self, name: str) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    # ----- adapters -----------------------------------------------------------------------------------

    def create_dora_magnitude(self, name: str, config: LoraConfig, factory: dict[str, Any]) -> None:
        """With `config.use_dora`, create adapter `name`'s `m` (`factory`: its dtype and device; its value is set
        by `reset_adapter`)."""
        if config.use_dora:
            self.lora_magnitude_vector[name] = nn.Parameter(torch.ones(self.magnitude_shape(), **factory))
            self._dora_norms.pop(name, None)  # of an earlier adapter of that name

    def add_adapter(self, name: str, r: int, lora_alpha: float, config: LoraConfig) -> None:
        super().add_adapter(name, r, lora_alpha, config)
        if name in self.lora_magnitude_vector:  # m = n (after the init, which may change W): the adapter starts
            with torch.no_grad():  # as its LoRA part alone would
                norm = weight_norm(*self.dora_matrices(name), self.scaling[name])
                self.lora_magnitude_vector[name].copy_(norm.view(self.magnitude_shape()))

    def delete_adapter(self, name: str) -> None:
        super().delete_adapter(name)
        self._dora_norms.pop(name, None)

    def dora_norm(self, name: str) -> torch.Tensor:
        """DoRA adapter `name`'s `n: (out,)` (detached), kept while W, A and B are unchanged: at inference it
        costs nothing after the first forward; in training the optimizer's step changes A and B. A write through
        `.data`, which torch does not count as a change, is not seen (lorakit writes none)."""
        matrices = self.dora_matrices(name)
        # torch counts every in-place change of a tensor in `_version` (an optimizer step, copy_, a merge)
        key = (*(t.data_ptr() for t in matrices), *(t._version for t in matrices), self.scaling[name])
        cached = self._dora_norms.get(name)
        if cached is None or cached[0] != key:
            cached = self._dora_norms[name] = (key, weight_norm(*matrices, self.scaling[name]))
        return cached[1]

    def dora_factor(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        """`f = m / n` in `m`'s shape (it broadcasts against the output), in `dtype`."""
        magnitude = self.lora_magnitude_vector[name]
        return (magnitude / self.dora_norm(name).view(magnitude.shape)).to(dtype)

    # ----- forward ------------------------------------------------------------------------------------

    def runs_dora(self) -> bool:
        """Whether this forward runs a DoRA adapter (not in a stacked forward, which refuses them)."""
        return (
            bool(self.lora_magnitude_vector)
            and self.adapter_stack is None
            and any(name in self.lora_magnitude_vector for name in self.forward_adapters)
        )

    def forward_with_dora(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The forward when a DoRA adapter runs, adapters in their active order as peft runs them. A DoRA adapter
        rescales what the layer computed so far without its bias, `y`, and adds its branch:

            y ← f ⊙ (y + s·B(A x))           (with dropout on: y ← y + (f − 1) ⊙ base₀(x') + f ⊙ s·B(A x'),
                                               x' the dropped-out input, as peft computes it)

        then adds the bias back (one fused pass). Plain LoRA adapters add their branch as always."""
        if self.merged_adapters and self.training and torch.is_grad_enabled():
            self._refuse_training_merged()
        result = self.base_layer(x, *args, **kwargs)
        bias = self.output_bias(result.dtype)
        for name in self.forward_adapters:
            if name not in self.lora_magnitude_vector:
                result = self.add_adapter_output(result, x, name)
                continue
            factor = self.dora_factor(name, result.dtype)
            if self.applies_dropout and self.lora_dropout_p[name] and self.training:
                dropped = self.dropout_input(x, name)
                own_base = self.output_without_bias(dropped, result.dtype)
                result = result + (self.add_branch(own_base, dropped, name) * factor - own_base)
            else:
                combined = self.add_branch(result if bias is None else result - bias, x, name)
                result = combined * factor if bias is None else torch.addcmul(bias, combined, factor)
        return result

    # ----- many adapters in one forward ----------------------------------------------------------------

    def stack(
        self, owner: str, slots: list[str], eval_only: bool = True, one_per_row: bool = False, with_grad: bool = False
    ) -> None:
        dora_adapters = [n for n in slots if n in self.lora_magnitude_vector]
        if dora_adapters:
            raise LoraError(
                f"DoRA adapters {dora_adapters} cannot run in a mixed batch or as X-LoRA experts: DoRA rescales the "
                "whole layer output per adapter, which the stacked forward cannot express"
            )
        super().stack(owner, slots, eval_only, one_per_row, with_grad)

    # ----- merge --------------------------------------------------------------------------------------

    def delta_weights(self, name: str) -> dict[str, torch.Tensor]:
        deltas = self.lora_delta_weights(name)
        if name in self.lora_magnitude_vector:
            magnitude = self.lora_magnitude_vector[name].reshape(-1)
            delta = delta_weight(*self.dora_matrices(name), self.scaling[name], magnitude)
            deltas["weight"] = self.weight_from_matrix(delta)
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
            weight = self._base_param("weight").data
            original = weight.clone()
            weight.copy_(merged_value(weight, delta))
            return original
        return super().merge_parameter(param_name, delta, names)

    def restore_parameter(self, param_name: str, delta: torch.Tensor, residual: Any) -> None:
        if isinstance(residual, torch.Tensor):
            self._base_param(param_name).data.copy_(residual)
            return
        super().restore_parameter(param_name, delta, residual)
