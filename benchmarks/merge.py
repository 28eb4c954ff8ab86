"""Whole-model merge + unmerge: the time of one cycle, and how exactly the base weights come back.

Contenders, interleaved, each holding the same non-zero adapter on the preset's model: lorakit
(`lorakit.merge(model)` then `lorakit.unmerge(model)`) and peft (`model.merge_adapter()` then
`model.unmerge_adapter()`), both under `torch.no_grad()`. Before any timing, each model goes through the
preset's cycle counts (1, then 10 in all); after each count, its adapted base weights are compared with
copies taken before the first merge: the fraction of elements whose bits differ, and the largest |drift|.
lorakit restores every bit by design; peft subtracts ΔW in the weight's dtype, which changes low bits in float32
and drifts visibly in bfloat16.
"""

from __future__ import annotations

from collections.abc import Callable

import harness
import torch
from torch import nn
from workloads import Preset, adapted_weights, adapter_pair, build_base, torch_dtype

import lorakit

TIME_HEADERS = ("dtype", "lorakit ms", "peft ms", "lorakit / peft")

_SAME_SIZE_INT = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def lorakit_cycle(model: nn.Module) -> Callable[[], None]:
    def cycle() -> None:
        with torch.no_grad():
            lorakit.merge(model)
            lorakit.unmerge(model)

    return cycle


def peft_cycle(model: nn.Module) -> Callable[[], None]:
    def cycle() -> None:
        with torch.no_grad():
            model.merge_adapter()
            model.unmerge_adapter()

    return cycle


def drift(weights: dict[str, torch.Tensor], originals: dict[str, torch.Tensor]) -> tuple[float, float]:
    """(fraction of elements whose bits differ from the originals, largest |difference|)."""
    changed = total = 0
    largest = 0.0
    for name, original in originals.items():
        weight = weights[name].detach()
        as_int = _SAME_SIZE_INT[weight.element_size()]
        changed += int((weight.view(as_int) != original.view(as_int)).sum())
        total += original.numel()
        largest = max(largest, float((weight.double() - original.double()).abs().max()))
    return changed / total, largest


def fmt_fraction(fraction: float) -> str:
    return "0 (bit-exact)" if fraction == 0 else f"{fraction:.3%}"


def run(preset: Preset) -> str:
    """The merge section: a timing table (one row per dtype) and a correctness table (per dtype and contender)."""
    first, last = preset.merge_cycles
    time_rows, exact_rows = [], []
    for dtype_name in preset.dtypes:
        base = build_base(preset, torch_dtype(dtype_name))
        models = dict(zip(("lorakit", "peft"), adapter_pair(base, preset), strict=True))
        del base
        cycles = {"lorakit": lorakit_cycle(models["lorakit"]), "peft": peft_cycle(models["peft"])}
        for name, model in models.items():
            originals = {key: weight.detach().clone() for key, weight in adapted_weights(model).items()}
            cycle = cycles[name]
            cells: list[str] = []
            done = 0
            for target in (first, last):
                for _ in range(target - done):
                    cycle()
                done = target
                fraction, largest = drift(adapted_weights(model), originals)
                cells += [fmt_fraction(fraction), f"{largest:.3g}"]
            exact_rows.append([dtype_name, name, *cells])
            del originals
        harness.free_memory(preset.device)
        times = harness.interleaved(
            cycles, rounds=preset.rounds, repeats=preset.repeats, warmup=preset.warmup, device=preset.device
        )
        del cycles, models
        harness.free_memory(preset.device)
        time_rows.append(
            [
                dtype_name,
                harness.fmt_ms(harness.median_ms(times["lorakit"])),
                harness.fmt_ms(harness.median_ms(times["peft"])),
                harness.ratio(times["lorakit"], times["peft"]),
            ]
        )
    exact_headers = (
        "dtype",
        "contender",
        f"weights changed, {first} cycle{'s' * (first != 1)}",
        f"max drift, {first} cycle{'s' * (first != 1)}",
        f"weights changed, {last} cycles",
        f"max drift, {last} cycles",
    )
    return (
        "### Merge + unmerge\n\n"
        f"{preset.describe()}; the same non-zero adapter (lora_B ~ N(0, 0.02²)) in both; one cycle = merge the "
        f"whole model + unmerge it. {preset.rounds} rounds × {preset.repeats} cycles, interleaved.\n\n"
        + harness.table(TIME_HEADERS, time_rows)
        + "\n\nBase weights after merge + unmerge cycles, against their values before the first merge "
        "(bit comparison; drift = largest |difference|):\n\n" + harness.table(exact_headers, exact_rows)
    )
