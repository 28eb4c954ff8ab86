"""Initialisations of A and B computed from the base weight or from orthogonal matrices, as peft 0.21 computes
them (the same seed gives the same values). For `LoraLinear` (`nn.Linear`, transformers `Conv1D`), with the
base weight viewed as `W: (out, in)`, rank r and scaling s:

- `"pissa"` (Meng et al., 2024): the SVD `W = U S Vᵀ`; with `S_r = S[:r] / s`, `A = √S_r · Vᵀ[:r]` `(r, in)` and
  `B = U[:, :r] · √S_r` `(out, r)`, so `s·B A` is W's best rank-r part. `"pissa_niter_<k>"`: the same from
  `torch.svd_lowrank(W, r, niter=k)` (randomized: it draws from torch's generator).
- `"olora"` (Büyükakyüz, 2024): the QR decomposition `W = Q R`; `A = R[:r]`, `B = Q[:, :r]`.
- `"orthogonal"`: A and B from the rows of one random orthogonal `r × r` matrix (odd rows for A, even for B),
  each times a Gaussian matrix, divided by 10; r must be even. It leaves W alone.

PiSSA and OLoRA take their start out of the base, which keeps the residual `W_res = round(W − s·B₀ A₀)`, so the
model computes what it did before. `BaseChange` records that subtraction exactly (layers/exact.py) with copies
of `A₀` and `B₀`, so the original W can be put back bit for bit and the adapter converted to a plain LoRA of
the original weights: `s·B A − s·B₀ A₀ = s·[B, −B₀] [A; A₀]`, rank 2r.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import LoraConfigError
from .exact import MergeResidual, merge_exactly, unmerge_exactly


def changes_base(init: bool | str) -> bool:
    """Whether init scheme `init` moves part of the base weight into the adapter (PiSSA, OLoRA)."""
    return isinstance(init, str) and (init in ("pissa", "olora") or init.startswith("pissa_niter_"))


def pissa_niter(init: str) -> int | None:
    """k of `"pissa_niter_<k>"`; None for `"pissa"` (the full SVD)."""
    return int(init.removeprefix("pissa_niter_")) if init.startswith("pissa_niter_") else None


def pissa_factors(weight: torch.Tensor, r: int, scaling: float, niter: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """`(A (r, in), B (out, r))` from the SVD of `weight: (out, in)` (float32)."""
    if niter is None:
        u, s, vh = torch.linalg.svd(weight, full_matrices=False)
        u, s, vh = u[:, :r], s[:r], vh[:r]
    else:
        u, s, v = torch.svd_lowrank(weight, r, niter=niter)
        vh = v.T
    root = torch.diag(torch.sqrt(s / scaling))
    return root @ vh, u @ root


def olora_factors(weight: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`(A (r, in), B (out, r))` from the QR decomposition of `weight: (out, in)` (float32)."""
    q, upper = torch.linalg.qr(weight)
    return upper[:r].contiguous(), q[:, :r].contiguous()


def orthogonal_factors(in_features: int, out_features: int, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`(A (r, in), B (out, r))`, float32 on the CPU, drawn as peft draws them."""
    if r % 2:
        raise LoraConfigError(f"init_lora_weights='orthogonal' needs an even rank, got r={r}")
    q, _ = torch.linalg.qr(torch.randn(r, r))
    a = torch.randn(in_features, r // 2).mm(q[0::2]).T / 10.0
    b = torch.randn(r // 2, out_features).T.mm(q[1::2]) / 10.0
    return a.contiguous(), b.contiguous()


@dataclass
class BaseChange:
    """Adapter `adapter`'s start taken out of a base weight: `W ← round(W − s·B₀ A₀)`, undone exactly by `restore`.
    `a: (r, in)`, `b: (out, r)`: copies of A₀ and B₀; `transposed`: the weight is stored `(in, out)`."""

    adapter: str
    a: torch.Tensor
    b: torch.Tensor
    scaling: float
    transposed: bool
    residual: MergeResidual | None = None

    @classmethod
    def apply(cls, weight: torch.Tensor, adapter: str, a: torch.Tensor, b: torch.Tensor, scaling: float,
              transposed: bool) -> BaseChange:  # fmt: skip
        """Subtract `s·B A` from `weight` (a parameter's data, in place) and return the record."""
        change = cls(adapter, a.detach().clone(), b.detach().clone(), scaling, transposed)
        change.residual = merge_exactly(weight, -change.delta())
        return change

    def delta(self) -> torch.Tensor:
        """`s·B₀ A₀` in the weight's layout, computed as peft computes it (`(s·B₀) @ A₀`)."""
        delta = (self.scaling * self.b) @ self.a
        return delta.T if self.transposed else delta

    def restore(self, weight: torch.Tensor) -> None:
        """Put the original weight back, bit for bit (the weight must hold the residual it was left with)."""
        unmerge_exactly(weight, -self.delta(), self.residual)

    @property
    def nbytes(self) -> int:
        return self.residual.nbytes + sum(t.numel() * t.element_size() for t in (self.a, self.b))
