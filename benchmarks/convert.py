"""Conversion time: `lorakit.get_lora_model` against `peft.get_peft_model` on a model built on the meta device.

The preset's convert model (a 70B-shaped `LlamaForCausalLM` for the cpu and gpu presets) is built on the
meta device, so no weight is allocated and what is timed is the conversion's own work: finding the targets,
creating and initialising the adapters, swapping the modules. Every timed call converts a freshly built
model (building it, and collecting the previous one, is not timed); contenders interleaved, one call per
round, config r=16 (the preset's rank) on all linear layers.
"""

from __future__ import annotations

import gc

import harness
import torch
from torch import nn
from transformers import LlamaForCausalLM
from workloads import LlamaShape, Preset, lorakit_model, peft_model

import lorakit

HEADERS = ("model", "adapted layers", "lorakit s", "peft s", "lorakit / peft")


def build_meta(shape: LlamaShape) -> nn.Module:
    """A `LlamaForCausalLM` of `shape` on the meta device, after collecting garbage (both untimed)."""
    gc.collect()
    with torch.device("meta"):
        return LlamaForCausalLM(shape.config())


def run(preset: Preset) -> str:
    """The convert section: one row, and whether lorakit meets the preset's target."""
    shape = preset.convert_model
    contenders = {
        "lorakit": harness.Prepared(lambda: build_meta(shape), lambda model: lorakit_model(model, preset)),
        "peft": harness.Prepared(lambda: build_meta(shape), lambda model: peft_model(model, preset)),
    }
    times = harness.interleaved(contenders, rounds=preset.convert_rounds, repeats=1, warmup=1, device="meta")
    adapted = len(list(lorakit.lora_layers(lorakit_model(build_meta(shape), preset))))
    gc.collect()
    lk_s, pf_s = (harness.median_ms(times[name]) / 1e3 for name in ("lorakit", "peft"))
    row = [f"Llama {shape.hidden}×{shape.layers} layers", adapted, f"{lk_s:.3f}", f"{pf_s:.3f}"]
    row.append(harness.ratio(times["lorakit"], times["peft"]))
    if preset.convert_target_s is None:
        verdict = "No target for this shape (the project's target, ≤ 0.5 s, is for the 70B shape)."
    else:
        verdict = (
            f"Target: lorakit ≤ {preset.convert_target_s} s: {harness.met(lk_s <= preset.convert_target_s)} "
            f"({lk_s:.3f} s)."
        )
    return (
        "### Conversion on the meta device\n\n"
        f"`LlamaForCausalLM` on the meta device ({shape.describe()}), r={preset.rank} on all linear layers "
        f"(lm_head excluded); a fresh model per call, building it untimed. {preset.convert_rounds} rounds × 1 "
        "call, interleaved.\n\n" + harness.table(HEADERS, [row]) + f"\n\n{verdict}"
    )
