"""The stacked primitive: several adapters of one layer in one forward, each row or token weighing them its own
way. It serves mixed batches (one-hot weights per row) and X-LoRA (a weight per token); docs/design.md §6.

For the adapters i of rank r_i and scaling s_i that a layer has among the model-wide slots:

    A_cat = concat_i A_i            (Σr × in)
    B_cat = concat_i s_i · B_i      (out × Σr)
    y = base(x) + ((x @ A_cat.T) ⊙ G[..., column_slot]) @ B_cat.T  (+ G[..., present_slot] @ s·b_B)

Layer kinds supply the stacked weights (`stacked_factors`) and the stacked output (`add_stacked_output`);
everything else is here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ..errors import LoraError

if TYPE_CHECKING:
    from .base import LoraLayer


def broadcast_gates(gates: torch.Tensor, ndim: int, channel_last: bool = True) -> torch.Tensor:
    """`gates` `(batch, c)` or `(batch, tokens, c)` viewed to multiply an `ndim`-dim activation whose channels
    are its last dim (Linear, Embedding: `(batch, …, c)`) or dim 1 (convs: `(batch, c, *spatial)`)."""
    if channel_last:
        return gates.view(gates.shape[0], *[1] * (ndim - gates.ndim), *gates.shape[1:])
    if gates.ndim != 2:
        raise LoraError(f"per-token weights {tuple(gates.shape)} do not apply to a convolution's output")
    return gates.view(*gates.shape, *[1] * (ndim - 2))


@dataclass
class AdapterStack:
    """Several adapters of one layer stacked for one forward in which each row (or token) weighs them its own
    way: the primitive behind mixed batches and X-LoRA (see the module docstring).

    Slots `0..n-1` are model-wide (slot j is the j-th adapter of a mixed batch, or X-LoRA's j-th expert).
    Of them, the adapters this layer has (i, of rank r_i and scaling s_i) are stacked:

        A_cat = concat_i A_i            (Σr × in)
        B_cat = concat_i s_i · B_i      (out × Σr)
        y = base(x) + ((x @ A_cat.T) ⊙ G[..., column_slot]) @ B_cat.T  (+ G[..., present_slot] @ s·b_B)

    `gates` G is `(batch, n)`, a weight per row (one-hot in a mixed batch; all zeros means no adapter), or
    `(batch, tokens, n)`, a weight per token (X-LoRA). `column_slot` `(Σr,)` gives each rank column's slot,
    `present_slot` each stacked adapter's; the gates expanded by them are kept, so a fixed G costs nothing
    per forward. With `one_per_row` (a mixed batch), `row_adapter` `(batch,)` also gives each row's stacked
    adapter (`len(present_slot)` for none): a layer may then gather each row's own A and B instead, which
    costs r_i per token rather than Σr (`LoraLinear` does, for many adapters).
    """

    owner: str  # the layer's name in the model, for error messages
    factors: dict[str, torch.Tensor]  # the layer kind's stacked weights, in the compute dtype
    column_slot: torch.Tensor
    present_slot: torch.Tensor
    eval_only: bool = True
    one_per_row: bool = False
    dropout: float = 0.0  # in training, on the input: the largest of the stacked adapters' lora_dropout
    skip: bool = False  # run the base layer only (X-LoRA's scaling pass with weights 0)
    column_gates: torch.Tensor | None = None
    present_gates: torch.Tensor | None = None
    row_adapter: torch.Tensor | None = None

    def gates_in(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """`(column_gates, present_gates)` in `dtype`."""
        assert self.column_gates is not None and self.present_gates is not None
        return self.column_gates.to(dtype), self.present_gates.to(dtype)

    def set_gates(self, gates: torch.Tensor) -> None:
        """Set the weights G, `(batch, n_slots)` or `(batch, tokens, n_slots)`."""
        if self.factors:
            gates = gates.to(device=self.column_slot.device, dtype=next(iter(self.factors.values())).dtype)
            self.column_gates = gates.index_select(-1, self.column_slot)
            self.present_gates = gates.index_select(-1, self.present_slot)
            if self.one_per_row:
                none = torch.full_like(self.present_slot[:1], len(self.present_slot))
                has_one = self.present_gates.any(-1)
                self.row_adapter = torch.where(has_one, self.present_gates.argmax(-1), none)


def build_stack(
    layer: LoraLayer, owner: str, slots: list[str], eval_only: bool, one_per_row: bool, with_grad: bool
) -> AdapterStack:
    """`layer`'s adapters among `slots` stacked (`layer.stacked_factors`). `one_per_row`: every gate row will be
    one-hot or zero (a mixed batch). `with_grad`: the stacked weights stay connected to the adapters'
    parameters (to train them; restack after every optimizer step)."""
    present = [name for name in slots if name in layer.r]
    column_slot = [slot for slot, name in enumerate(slots) if name in layer.r for _ in range(layer.r[name])]
    present_slot = [slot for slot, name in enumerate(slots) if name in layer.r]
    weight = next(iter(layer.base_layer.parameters()), None)
    device = weight.device if weight is not None else None
    dtype = weight.dtype if weight is not None and weight.is_floating_point() else torch.float32
    with torch.set_grad_enabled(with_grad and torch.is_grad_enabled()):
        factors = layer.stacked_factors(present, dtype, one_per_row) if present else {}
    return AdapterStack(
        owner, factors, torch.tensor(column_slot, dtype=torch.long, device=device),
        torch.tensor(present_slot, dtype=torch.long, device=device), eval_only, one_per_row,
        max((layer.lora_dropout_p[n] for n in present), default=0.0),
    )  # fmt: skip


def add_stacked_output(layer: LoraLayer, result: Any, x: torch.Tensor, stack: AdapterStack) -> Any:
    """`result` plus the stacked adapters' output, after checking the forward fits the stack."""
    if not stack.factors or stack.skip:  # no slot's adapter targets this layer, or told to skip
        return result
    if stack.eval_only and layer.training:
        raise LoraError(f"{stack.owner}: a mixed batch runs in eval mode only; call model.eval() first")
    gates = stack.present_gates
    if gates is None or x.shape[0] != gates.shape[0]:
        rows = "no gates are set" if gates is None else f"there are {gates.shape[0]} adapter names"
        raise LoraError(f"{stack.owner}: the batch has {x.shape[0]} rows (input shape {tuple(x.shape)}) but {rows}")
    return layer.add_stacked_output(result, x, stack)
