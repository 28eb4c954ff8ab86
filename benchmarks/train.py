"""Train-step time of lorakit, peft and the frozen-base floor on the preset's Llama-shaped model.

Contenders, interleaved on the same inputs:
- floor:   the frozen base model, forward + backward computing activation gradients only (the input
           embeddings are a leaf that requires grad; no LoRA, no optimizer): what no LoRA train step can beat;
- lorakit: `lorakit.get_lora_model(..., target_modules="all-linear")`, forward + backward + AdamW step;
- peft:    `peft.get_peft_model(...)` with the same config, the same step (default AdamW options for both).
One row per dtype: each contender's median step time and the per-round ratios.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import harness
import torch
from torch import nn
from workloads import Preset, build_base, embeds, lorakit_model, loss_of, peft_model, torch_dtype

RATIOS = (("lorakit", "floor"), ("peft", "floor"), ("lorakit", "peft"))
HEADERS = ("dtype", "floor ms", "lorakit ms", "peft ms", "lorakit / floor", "peft / floor", "lorakit / peft")


def floor_step(base: nn.Module, inputs: torch.Tensor) -> Callable[[], None]:
    """One floor step: forward + backward of the frozen base down to a leaf copy of `inputs`."""
    for param in base.parameters():
        param.requires_grad_(False)
    leaf = inputs.detach().clone().requires_grad_(True)

    def step() -> None:
        loss_of(base, leaf).backward()
        leaf.grad = None

    return step


def lora_step(model: nn.Module, inputs: torch.Tensor) -> Callable[[], None]:
    """One LoRA train step: forward + backward + AdamW step over the trainable parameters."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> None:
        loss_of(model, inputs).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def measure(preset: Preset, dtype: torch.dtype) -> dict[str, list[float]]:
    """Per-round median step seconds of floor, lorakit and peft in `dtype`."""
    base = build_base(preset, dtype)
    lk = lorakit_model(copy.deepcopy(base), preset)
    pf = peft_model(copy.deepcopy(base), preset)
    return time_steps(preset, base, lk, pf, embeds(preset, dtype))


def time_steps(
    preset: Preset, base: nn.Module, lk: nn.Module, pf: nn.Module, inputs: torch.Tensor
) -> dict[str, list[float]]:
    """Per-round median step seconds of the floor on `base` and the LoRA steps of `lk` and `pf`, interleaved."""
    contenders = {"floor": floor_step(base, inputs), "lorakit": lora_step(lk, inputs), "peft": lora_step(pf, inputs)}
    return harness.interleaved(
        contenders, rounds=preset.rounds, repeats=preset.repeats, warmup=preset.warmup, device=preset.device
    )


def rows_per_dtype(
    preset: Preset, measure_dtype: Callable[[Preset, torch.dtype], dict[str, list[float]]]
) -> list[list[object]]:
    """One `HEADERS` row per dtype of the preset, from `measure_dtype(preset, dtype)`'s times."""
    rows = []
    for dtype_name in preset.dtypes:
        times = measure_dtype(preset, torch_dtype(dtype_name))
        harness.free_memory(preset.device)
        ratios = [harness.ratio(times[a], times[b]) for a, b in RATIOS]
        ms = [harness.fmt_ms(harness.median_ms(times[name])) for name in ("floor", "lorakit", "peft")]
        rows.append([dtype_name, *ms, *ratios])
    return rows


def run(preset: Preset) -> str:
    """The train-step section: one table row per dtype of the preset."""
    return (
        "### Train step\n\n"
        f"{preset.describe()}; loss = mean square of the last hidden state. floor = frozen base, forward + "
        "backward to the input activations only; lorakit / peft = forward + backward + AdamW step. "
        f"{preset.rounds} rounds × {preset.repeats} steps, interleaved.\n\n"
        + harness.table(HEADERS, rows_per_dtype(preset, measure))
    )
