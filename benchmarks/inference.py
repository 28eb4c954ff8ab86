"""Inference time of the base model and of lorakit and peft, each unmerged and merged: a prefill and a
decoding step.

Under `torch.no_grad()` in eval mode. Prefill: one forward over the preset's tokens. Decode: one token per
row after a KV cache of those tokens (the cache is cut back to them, untimed, before every step). Contenders,
interleaved on the same inputs: the base model; lorakit with the adapter unmerged and merged
(`lorakit.merge`); peft unmerged and merged (`merge_adapter()`). All four LoRA models hold the same non-zero
adapter, so the unmerged branches compute real values. Each contender's time is reported with its per-round
ratio to the base.

"LoRA FLOP share" is the adapters' forward FLOPs over the base forward's (`workloads.forward_flops_per_token`).
The project's targets: merged ≤ 1.01× the base; unmerged overhead ≤ the FLOP share + 2 points.
"""

from __future__ import annotations

from collections.abc import Callable

import harness
import torch
from torch import nn
from workloads import (
    Preset,
    adapter_pair,
    build_base,
    cache_keyword,
    embeds,
    forward_flops_per_token,
    torch_dtype,
)

import lorakit

HEADERS = ("dtype", "contender", "ms", "/ base", "LoRA FLOP share")
DECODE_HEADERS = ("dtype", "contender", "ms per step", "/ base")
MERGED_TARGET = 1.01
UNMERGED_SLACK = 0.02
BRANCH_GEMMS = "branch GEMMs alone"


def prefill(model: nn.Module, inputs: torch.Tensor) -> Callable[[], None]:
    """One no-grad forward of `model` (put in eval mode) over `inputs`."""
    model.eval()

    def forward() -> None:
        with torch.no_grad():
            model(inputs_embeds=inputs)

    return forward


def branch_gemms(lora: nn.Module, inputs: torch.Tensor) -> Callable[[], None]:
    """The unmerged branch's GEMMs alone, at the prefill's shapes: for every adapted layer of `lora`,
    `h = x @ A.T` and then `y += h @ (s·B).T` in place (`addmm_`), on activation-sized tensors of its own.
    What these cost over the base forward is the least an eager unmerged forward can add."""
    rows = inputs.shape[0] * inputs.shape[1]
    dtype, device = inputs.dtype, inputs.device
    work = []
    for _, layer in lorakit.lora_layers(lora):
        name = layer.active_adapters[0]
        a = layer.lora_A[name].weight.detach().to(dtype)
        scaled_bt = (layer.lora_B[name].weight.detach() * layer.scaling[name]).T.to(dtype)
        x = torch.randn(rows, layer.in_features, dtype=dtype, device=device)
        y = torch.zeros(rows, layer.out_features, dtype=dtype, device=device)
        work.append((x, a, y, scaled_bt))

    def gemms() -> None:
        for x, a, y, scaled_bt in work:
            y.addmm_(x @ a.T, scaled_bt)

    return gemms


def decode_step(model: nn.Module, inputs: torch.Tensor) -> harness.Prepared:
    """A decoding step of `model` (put in eval mode), no grad: one token per row after a KV cache of
    `inputs`. Each call's untimed preparation cuts the cache back to `inputs`."""
    model.eval()
    keyword = cache_keyword(model)
    with torch.no_grad():
        cache = model(inputs_embeds=inputs, use_cache=True)[keyword]
    prompt = cache.get_seq_length()
    token = inputs[:, -1:]

    def prepare() -> None:
        if extra := cache.get_seq_length() - prompt:
            cache.crop(-extra)

    def step(_: None) -> None:
        with torch.no_grad():
            model(inputs_embeds=token, use_cache=True, **{keyword: cache})

    return harness.Prepared(prepare, step)


def measure(preset: Preset, dtype: torch.dtype) -> tuple[dict[str, list[float]], dict[str, list[float]], float]:
    """Per-round median seconds of every contender, prefill and decode, and the LoRA FLOP share (prefill)."""
    base = build_base(preset, dtype)
    lk, pf = adapter_pair(base, preset)
    lk_merged, pf_merged = adapter_pair(base, preset)
    with torch.no_grad():
        lorakit.merge(lk_merged)
        pf_merged.merge_adapter()
    base_flops, lora_flops = forward_flops_per_token(base, lk, preset.seq)
    inputs = embeds(preset, dtype)
    models = {
        "base": base,
        "lorakit unmerged": lk,
        "lorakit merged": lk_merged,
        "peft unmerged": pf,
        "peft merged": pf_merged,
    }
    timing = {"rounds": preset.rounds, "repeats": preset.repeats, "warmup": preset.warmup, "device": preset.device}
    prefills = harness.interleaved(
        {name: prefill(model, inputs) for name, model in models.items()} | {BRANCH_GEMMS: branch_gemms(lk, inputs)},
        **timing,
    )
    decodes = harness.interleaved({name: decode_step(model, inputs) for name, model in models.items()}, **timing)
    return prefills, decodes, lora_flops / base_flops


def run(preset: Preset) -> str:
    """The inference sections, prefill and decode: one row per (dtype, contender), then whether lorakit meets
    the prefill targets."""
    rows: list[list[object]] = []
    decode_rows: list[list[object]] = []
    verdicts = []
    for dtype_name in preset.dtypes:
        times, decodes, share = measure(preset, torch_dtype(dtype_name))
        harness.free_memory(preset.device)
        ratios = {name: harness.ratio(times[name], times["base"]) for name in times if name != "base"}
        for name, seconds in times.items():
            rows.append(
                [
                    dtype_name,
                    name,
                    harness.fmt_ms(harness.median_ms(seconds)),
                    ratios.get(name, "—"),
                    f"{share:.2%}" if name.endswith("unmerged") or name == BRANCH_GEMMS else "—",
                ]
            )
        for name, seconds in decodes.items():
            step_ratio = "—" if name == "base" else harness.ratio(seconds, decodes["base"])
            decode_rows.append([dtype_name, name, harness.fmt_ms(harness.median_ms(seconds)), step_ratio])
        merged = ratios["lorakit merged"].median
        overhead = ratios["lorakit unmerged"].median - 1
        verdicts.append(
            f"- {dtype_name}: lorakit merged {merged:.3f}× the base (target ≤ {MERGED_TARGET}×): "
            f"{harness.met(merged <= MERGED_TARGET)}; lorakit unmerged overhead {overhead:+.1%} (target ≤ FLOP "
            f"share {share:.1%} + {UNMERGED_SLACK:.0%} = {share + UNMERGED_SLACK:.1%}): "
            f"{harness.met(overhead <= share + UNMERGED_SLACK)}; the branch's GEMMs alone cost "
            f"{ratios[BRANCH_GEMMS].median:.1%} of the base forward."
        )
    timing = f"{preset.rounds} rounds × {preset.repeats} calls, interleaved"
    return (
        "### Inference (prefill)\n\n"
        f"{preset.describe()}; eval mode, `torch.no_grad()`, one forward; the same non-zero adapter "
        f'(lora_B ~ N(0, 0.02²)) in every LoRA model. {timing}. "{BRANCH_GEMMS}" is every adapted layer\'s '
        "`x @ A.T` and in-place `y += h @ (s·B).T` at the forward's shapes, nothing else: the least an eager "
        "unmerged forward adds to the base, as a fraction of it.\n\n"
        + harness.table(HEADERS, rows)
        + "\n\nTargets (medians of the per-round ratios):\n\n"
        + "\n".join(verdicts)
        + "\n\n### Inference (decode)\n\n"
        f"The same models; one decoding step of one token per row after a KV cache of the prefill's "
        f"{preset.seq} tokens (cut back to them, untimed, before each step). {timing}. No target: shown for "
        "serving with the adapter unmerged.\n\n" + harness.table(DECODE_HEADERS, decode_rows)
    )
