"""DoRA (`use_dora=True`): train-step and inference time of lorakit and peft, against the frozen base.

On the preset's Llama-shaped model in float32, DoRA on every linear layer, each contender on its own copy of
one base, interleaved on the same inputs:
- train step: floor (the frozen base, forward + backward to the input activations only, `train.floor_step`),
  lorakit and peft (forward + backward + AdamW step, `train.lora_step`);
- inference: a no-grad prefill (`inference.prefill`) of the base, lorakit and peft unmerged, and lorakit merged.
Every lora_B is drawn from N(0, 0.02²) first, so the branches compute real values (the magnitudes stay the
norms at initialisation). The project's targets: DoRA train step ≤ 1.15× the floor, unmerged DoRA inference
≤ 1.15× the base, merged = the base.
"""

from __future__ import annotations

import copy

import harness
import torch
from inference import prefill
from torch import nn
from train import floor_step, lora_step
from workloads import Preset, build_base, embeds, lorakit_model, peft_model

import lorakit

DTYPE = torch.float32
TRAIN_HEADERS = ("contender", "ms", "/ floor", "/ peft")
INFERENCE_HEADERS = ("contender", "ms", "/ base")
TRAIN_TARGET, UNMERGED_TARGET = 1.15, 1.15


def _nonzero_b(model: nn.Module, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_B." in name:
                nn.init.normal_(param, std=0.02)
    return model


def _pair(preset: Preset, base: nn.Module) -> tuple[nn.Module, nn.Module]:
    lk = _nonzero_b(lorakit_model(copy.deepcopy(base), preset, use_dora=True), seed=2)
    pf = _nonzero_b(peft_model(copy.deepcopy(base), preset, use_dora=True), seed=2)
    return lk, pf


def run(preset: Preset) -> str:
    """The DoRA section: a train-step table and a prefill table."""
    base = build_base(preset, DTYPE)
    inputs = embeds(preset, DTYPE)
    lk, pf = _pair(preset, base)
    train_times = harness.interleaved(
        {"floor": floor_step(copy.deepcopy(base), inputs), "lorakit": lora_step(lk.train(), inputs),
         "peft": lora_step(pf.train(), inputs)},
        rounds=preset.rounds, repeats=preset.repeats, warmup=preset.warmup, device=preset.device,
    )  # fmt: skip
    lk, pf = _pair(preset, base)
    merged = copy.deepcopy(lk)
    lorakit.merge(merged)
    inference_times = harness.interleaved(
        {"base": prefill(base, inputs), "lorakit": prefill(lk, inputs), "peft": prefill(pf, inputs),
         "lorakit merged": prefill(merged, inputs)},
        rounds=preset.rounds, repeats=preset.repeats, warmup=preset.warmup, device=preset.device,
    )  # fmt: skip
    train_rows = [
        [name, harness.fmt_ms(harness.median_ms(train_times[name])), harness.ratio(train_times[name],
         train_times["floor"]), harness.ratio(train_times[name], train_times["peft"])]
        for name in ("floor", "lorakit", "peft")
    ]  # fmt: skip
    inference_rows = [
        [name, harness.fmt_ms(harness.median_ms(inference_times[name])),
         harness.ratio(inference_times[name], inference_times["base"])]
        for name in ("base", "lorakit", "peft", "lorakit merged")
    ]  # fmt: skip
    return (
        "### DoRA\n\n"
        f"{preset.describe()}, float32, `use_dora=True` on every linear layer; lora_B ~ N(0, 0.02²). Train step: "
        "floor = the frozen base, forward + backward to the input activations only; lorakit / peft = forward + "
        "backward + AdamW step. Inference: a no-grad prefill, unmerged, and lorakit merged. "
        f"{preset.rounds} rounds × {preset.repeats}, interleaved. Targets: train step ≤ {TRAIN_TARGET}× the floor, "
        f"unmerged ≤ {UNMERGED_TARGET}× the base.\n\n"
        + harness.table(TRAIN_HEADERS, train_rows)
        + "\n\n"
        + harness.table(INFERENCE_HEADERS, inference_rows)
    )
