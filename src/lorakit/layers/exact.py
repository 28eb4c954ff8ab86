"""Exact merge and unmerge of a weight update, at about one extra byte per weight element.

Adding `ΔW` to `W` in a low-precision dtype rounds: `(W + ΔW) − ΔW` is usually not `W` (in bfloat16 about
40% of the elements change after one cycle, and stay changed). To undo a merge bit for
bit, `merge_exactly` also records how the weight `unmerge_exactly` will compute, `u = round(W' − ΔW)`,
differs from the true `W`:

    W' = round(W + ΔW)          stored in the parameter while merged
    u  = round(W' − ΔW)         what a plain unmerge would give; within a few ulps of W
    d  = bits(W) − bits(u)      as integers; almost always tiny

`d` is kept as int8 (one byte per element). The rare elements whose difference does not fit (W and u on
opposite sides of zero, or |W| far below |ΔW|) are escaped: their index (8 bytes) and exact original value
are kept aside. Restoring is `bits(W) = bits(u) + d`, then the escaped values are written back.

The integer arithmetic is in the weight's own width (int16 for bfloat16, int32 for float32), half the
memory traffic of widening: elements whose W and u differ in sign are escaped first, and for the others
`bits(W) − bits(u)` cannot overflow.

The restore recomputes `ΔW`, so it is exact as long as the adapter weights are not changed while merged and
the unmerge runs on the same device as the merge (different devices may round `B @ A` differently).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import MergeError

_ESCAPE = -128  # int8 code meaning "look the value up in the escapes"
_BITS_VIEW = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@dataclass
class MergeResidual:
    """What `unmerge_exactly` needs to restore one merged tensor bit for bit."""

    codes: torch.Tensor  # int8, shape of the weight: bits(W) − bits(u), or _ESCAPE
    escape_index: torch.Tensor  # int64, flat indices of escaped elements
    escape_value: torch.Tensor  # the weight's dtype, their original values

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.escape_index, self.escape_value))


def _compute_dtype(weight: torch.Tensor) -> torch.dtype:
    return torch.promote_types(weight.dtype, torch.float32)


def merged_value(weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """`round(W + ΔW)` in the weight's dtype, computed in at least float32."""
    wide = _compute_dtype(weight)
    return (weight.to(wide) + delta.to(wide)).to(weight.dtype)


def _unmerged_value(merged: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    wide = _compute_dtype(merged)
    return (merged.to(wide) - delta.to(wide)).to(merged.dtype)


def merge_exactly(weight: torch.Tensor, delta: torch.Tensor) -> MergeResidual:
    """Add `delta` to `weight` in place and return what restores the original bits.

    Args:
        weight: a floating tensor (a parameter's `.data`), any shape.
        delta: same shape as `weight`, any floating dtype.
    """
    if not weight.is_floating_point():
        raise MergeError(f"cannot merge into a {weight.dtype} tensor: merging needs a floating-point weight")
    merged = merged_value(weight, delta)
    approx = _unmerged_value(merged, delta)
    bits = _BITS_VIEW[weight.element_size()]
    weight_bits, approx_bits = weight.view(bits), approx.view(bits)
    opposite = (weight_bits ^ approx_bits) < 0  # sign bits differ: the difference could overflow
    diff = (weight_bits - approx_bits).masked_fill_(opposite, 0)
    codes = diff.clamp(_ESCAPE + 1, 127).to(torch.int8)
    escaped = (codes != diff) | opposite  # out of int8's range (or exactly the escape code), or opposite signs
    codes.masked_fill_(escaped, _ESCAPE)
    escape_index = escaped.flatten().nonzero().squeeze(1)
    escape_value = weight.flatten()[escape_index].clone()
    weight.copy_(merged)
    return MergeResidual(codes, escape_index, escape_value)


def unmerge_exactly(weight: torch.Tensor, delta: torch.Tensor, residual: MergeResidual) -> None:
    """Undo `merge_exactly(weight, delta)` in place, restoring every bit of the original."""
    approx = _unmerged_value(weight, delta)
    bits = _BITS_VIEW[weight.element_size()]
    codes = residual.codes.to(approx.device)
    # contiguous(): elementwise ops keep a non-contiguous weight's layout (channels_last convs), and the
    # escape indices are positions in the row-major order of `flatten()`.
    restored = approx.view(bits).add(codes.to(bits)).view(weight.dtype).contiguous()
    flat = restored.view(-1)
    flat[residual.escape_index.to(flat.device)] = residual.escape_value.to(flat.device)
    weight.copy_(restored)
