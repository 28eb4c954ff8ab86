"""Inference (prefill) time of the base model and of lorakit and peft, each unmerged and merged.

Under `torch.no_grad()` in eval mode, one forward over the preset's tokens. Contenders, interleaved on the
same inputs: the base model; lorakit with the adapter unmerged and merged (`lorakit.merge`); peft unmerged and
merged (`merge_adapter()`). All four LoRA models hold the same non-zero adapter, so the unmerged branches
compute real values. Each contender's time is reported with its per-round ratio to the base.

"LoRA FLOP share" is the adapters' forward FLOPs over the base forward's (`workloads.forward_flops_per_token`).
The project's targets: merged ≤ 1.01× the base; unmerged overhead ≤ the FLOP share + 2 points.
"""

from __future__ import annotations

from collections.abc import Callable

import harness
import torch
from torch import nn
from workloads import Preset, adapter_pair, build_base, embeds, forward_flops_per_token, torch_dtype

import lorakit

HEADERS = ("dtype", "contender", "ms", "/ base", "LoRA FLOP share")
MERGED_TARGET = 1.01
UNMERGED_SLACK = 0.02


def prefill(model: nn.Module, inputs: torch.Tensor) -> Callable[[], None]:
    """One no-grad forward of `model` (put in eval mode) over `inputs`."""
    model.eval()

    def forward() -> None:
        with torch.no_grad():
            model(inputs_embeds=inputs)

    return forward


def measure(preset: Preset, dtype: torch.dtype) -> tuple[dict[str, list[float]], float]:
    """Per-round median forward seconds of every contender, and the LoRA FLOP share."""
    base = build_base(preset, dtype)
    lk, pf = adapter_pair(base, preset)
    lk_merged, pf_merged = adapter_pair(base, preset)
    with torch.no_grad():
        lorakit.merge(lk_merged)
        pf_merged.merge_adapter()
    base_flops, lora_flops = forward_flops_per_token(base, lk, preset.seq)
    inputs = embeds(preset, dtype)
    contenders = {
        "base": prefill(base, inputs),
        "lorakit unmerged": prefill(lk, inputs),
        "lorakit merged": prefill(lk_merged, inputs),
        "peft unmerged": prefill(pf, inputs),
        "peft merged": prefill(pf_merged, inputs),
    }
    times = harness.interleaved(
        contenders, rounds=preset.rounds, repeats=preset.repeats, warmup=preset.warmup, device=preset.device
    )
    return times, lora_flops / base_flops


def run(preset: Preset) -> str:
    """The inference section: one row per (dtype, contender), then whether lorakit meets the targets."""
    rows: list[list[object]] = []
    verdicts = []
    for dtype_name in preset.dtypes:
        times, share = measure(preset, torch_dtype(dtype_name))
        harness.free_memory(preset.device)
        ratios = {name: harness.ratio(times[name], times["base"]) for name in times if name != "base"}
        for name, seconds in times.items():
            rows.append(
                [
                    dtype_name,
                    name,
                    harness.fmt_ms(harness.median_ms(seconds)),
                    ratios.get(name, "—"),
                    f"{share:.2%}" if name.endswith("unmerged") else "—",
                ]
            )
        merged = ratios["lorakit merged"].median
        overhead = ratios["lorakit unmerged"].median - 1
        verdicts.append(
            f"- {dtype_name}: lorakit merged {merged:.3f}× the base (target ≤ {MERGED_TARGET}×): "
            f"{harness.met(merged <= MERGED_TARGET)}; lorakit unmerged overhead {overhead:+.1%} (target ≤ FLOP "
            f"share {share:.1%} + {UNMERGED_SLACK:.0%} = {share + UNMERGED_SLACK:.1%}): "
            f"{harness.met(overhead <= share + UNMERGED_SLACK)}."
        )
    return (
        "### Inference (prefill)\n\n"
        f"{preset.describe()}; eval mode, `torch.no_grad()`, one forward; the same non-zero adapter "
        f"(lora_B ~ N(0, 0.02²)) in every LoRA model. {preset.rounds} rounds × {preset.repeats} forwards, "
        "interleaved.\n\n"
        + harness.table(HEADERS, rows)
        + "\n\nTargets (medians of the per-round ratios):\n\n"
        + "\n".join(verdicts)
    )
