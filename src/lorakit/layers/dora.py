"""DoRA (Liu et al., 2024): weight-decomposed LoRA, for `LoraLinear` (`nn.Linear` and transformers `Conv1D`).

DoRA splits the adapted weight into a direction and a trained magnitude `m: (out,)`, one per output:

    W_dora = m ⊙ (W + s·B A) / n,          n_j = ‖W_j + s·(B A)_j‖     (the norm of output row j, over inputs)

and, as the paper advises and peft does, treats `n` as a constant in the backward (it is detached). With
`W: (out, in)`, `A: (r, in)`, `B: (out, r)` and `f = m / n: (out,)` the layer computes

    y = base(x) + (f − 1) ⊙ (x Wᵀ) + f ⊙ s·(x Aᵀ) Bᵀ

where `x Wᵀ` is the base output without its bias (recomputed on the dropped-out input when dropout is on, as
peft does). Merging adds `ΔW = (f − 1) ⊙ W + f ⊙ s·B A` (row-wise factors), so merged and unmerged agree.

With several adapters active, peft runs them in order and a DoRA adapter rescales all the layer computed
before it (the base output and the earlier adapters' branches, without the bias): `y ← f ⊙ (y + s·B A x)`.
Their updates then do not add up, so a layer merges a DoRA adapter only when it is its one active adapter.

`n` is computed without forming `B A` (out × in):

    n_j² = ‖W_j‖² + 2s·⟨(W Aᵀ)_j, B_j⟩ + s²·B_j (A Aᵀ) B_jᵀ

from one GEMM `W Aᵀ` (out × r) and the r × r Gram `A Aᵀ`, in float32 (or wider). At initialisation `m = n`, so
a DoRA adapter starts as the base model when B = 0.
"""

from __future__ import annotations

import torch


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
    """`ΔW = (f − 1) ⊙ W + f ⊙ s·B A`, `(out, in)`, with `f = m / n` per row."""
    dtype = torch.promote_types(weight.dtype, torch.float32)
    factor = (magnitude.to(dtype) / weight_norm(weight, a, b, scaling)).unsqueeze(1)
    return (factor - 1) * weight.to(dtype) + factor * (scaling * (b.to(dtype) @ a.to(dtype)))
