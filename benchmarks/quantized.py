"""LoRA on quantized bases (QLoRA): train-step time and peak training memory of lorakit and peft, with the
frozen quantized base as the floor.

The base is the preset's Llama-shaped model built in bfloat16 (whatever the preset's dtypes) with the linear
layers of its decoder layers quantized (`workloads.quantized_base`):
- nf4:          bitsandbytes `Linear4bit`, nf4, double quantization, bfloat16 compute dtype (transformers'
                usual QLoRA setting);
- bnb-int8:     bitsandbytes `Linear8bitLt`, int8 weights (`has_fp16_weights=False`), outlier threshold 0;
- torchao-int8: torchao's `quantize_(model, Int8WeightOnlyConfig())`.
Each base is built once; the floor runs it, lorakit and peft each a deep copy. Contenders per base, interleaved
on the same inputs, in training mode, the steps of the train benchmark:
- floor:   the frozen quantized base, forward + backward computing activation gradients only (`train.floor_step`);
- lorakit: `lorakit.get_lora_model(..., target_modules="all-linear")`, forward + backward + AdamW step
           (`train.lora_step`);
- peft:    `peft.get_peft_model(...)` with the same config, the same step.
Neither side calls `prepare_model_for_kbit_training` (no gradient checkpointing, no float32 norms).
Then the peak training memory of the three on the nf4 and torchao-int8 bases, each contender alone in a fresh
process (`memory.measure_in_subprocess`), as the memory benchmark measures it.
"""

from __future__ import annotations

import copy
from concurrent.futures import ThreadPoolExecutor

import harness
import memory
import torch
from train import RATIOS, floor_step, lora_step
from workloads import QUANTIZATIONS, Preset, embeds, lorakit_model, peft_model, quantized_base

TIME_BASES = ("nf4", "bnb-int8", "torchao-int8")
MEMORY_BASES = ("nf4", "torchao-int8")
DTYPE = torch.bfloat16
HEADERS = ("base", "floor ms", "lorakit ms", "peft ms", "lorakit / floor", "peft / floor", "lorakit / peft")
MEMORY_HEADERS = ("base", "measure", "floor MiB", "lorakit MiB", "peft MiB", "lorakit / peft", "lorakit / floor")


def measure(preset: Preset, quantization: str) -> dict[str, list[float]]:
    """Per-round median step seconds of floor, lorakit and peft on the `quantization` base."""
    base = quantized_base(preset, quantization)
    lk = lorakit_model(copy.deepcopy(base), preset).train()
    pf = peft_model(copy.deepcopy(base), preset).train()
    inputs = embeds(preset, DTYPE)
    contenders = {"floor": floor_step(base, inputs), "lorakit": lora_step(lk, inputs), "peft": lora_step(pf, inputs)}
    return harness.interleaved(
        contenders, rounds=preset.rounds, repeats=preset.repeats, warmup=preset.warmup, device=preset.device
    )


def memory_table(preset: Preset) -> tuple[str, str]:
    """The peak-memory table on `MEMORY_BASES` and the description of its peak."""
    jobs = [(quantization, name) for quantization in MEMORY_BASES for name in memory.CONTENDERS]
    with ThreadPoolExecutor(max_workers=preset.memory_jobs) as pool:
        futures = {job: pool.submit(memory.measure_in_subprocess, job[1], preset, "bfloat16", job[0]) for job in jobs}
        measured = {job: future.result() for job, future in futures.items()}
    rows = []
    for quantization in MEMORY_BASES:
        results = {name: measured[quantization, name] for name in memory.CONTENDERS}
        for what in ("peak", "peak − model"):
            mib = {
                name: (r["peak_bytes"] - (r["model_bytes"] if what != "peak" else 0)) / memory.MIB
                for name, r in results.items()
            }
            ratios = (mib["lorakit"] / mib["peft"], mib["lorakit"] / mib["floor"])
            rows.append([
                QUANTIZATIONS[quantization], what, *(f"{mib[n]:.1f}" for n in memory.CONTENDERS),
                *(f"{r:.3f}" for r in ratios),
            ])  # fmt: skip
    description = memory.peak_description(preset, list(measured.values()), quantized=True)
    return harness.table(MEMORY_HEADERS, rows), description


def run(preset: Preset) -> str:
    """The quantized-base section: a train-step table (one row per base) and a peak-memory table."""
    rows = []
    for quantization in TIME_BASES:
        times = measure(preset, quantization)
        harness.free_memory(preset.device)
        ratios = [harness.ratio(times[a], times[b]) for a, b in RATIOS]
        ms = [harness.fmt_ms(harness.median_ms(times[name])) for name in ("floor", "lorakit", "peft")]
        rows.append([QUANTIZATIONS[quantization], *ms, *ratios])
    peaks, peak = memory_table(preset)
    return (
        "### Quantized bases (QLoRA)\n\n"
        f"{preset.describe()}, bfloat16, with the linear layers of the decoder layers quantized: bitsandbytes "
        "nf4 (`Linear4bit`, double quantization, bfloat16 compute), bitsandbytes int8 (`Linear8bitLt`, int8 "
        "weights, threshold 0) or torchao int8 (`quantize_(model, Int8WeightOnlyConfig())`); no "
        "`prepare_model_for_kbit_training`. Train step (first table): floor = the frozen quantized base, forward "
        "+ backward to the input activations only; lorakit / peft = forward + backward + AdamW step; "
        f"{preset.rounds} rounds × {preset.repeats} steps, interleaved, lorakit and peft on deep copies of the "
        f"floor's quantized base. Peak training memory (second table, nf4 and torchao int8): each contender alone in "
        f"a fresh process, {preset.memory_steps} train steps; peak = {peak}.\n\n"
        + harness.table(HEADERS, rows)
        + "\n\n"
        + peaks
    )
