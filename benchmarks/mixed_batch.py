"""Mixed batches: a batch whose rows use different adapters, lorakit's `mixed_batch` against peft's
`adapter_names`, at 1, 4, 16 and 64 distinct adapters, in a prefill and a decode shape.

The model is Llama-shaped with r-rank adapters on all linear layers, `rows` rows per batch; row i uses
adapter `i mod n`. Every LoRA model holds the same n non-zero adapters (lorakit's copied into peft's), and
the first round checks that lorakit's and peft's mixed outputs agree. Contenders, interleaved:

- base:    the plain model (no LoRA layers): the floor;
- single:  lorakit with one adapter active for every row: what one adapter costs;
- lorakit: `with lorakit.mixed_batch(model, names)`, its default path (all adapters stacked into one pair
           of GEMMs, or each row's own A and B gathered: `LoraLinear.use_gathered` picks by adapters and
           tokens per row);
- lorakit stacked / lorakit gathered: the two paths forced, which is how the default was chosen;
- peft:    `model(..., adapter_names=names)`, which loops over the distinct adapters.

"Decode" is one token per row (a plain forward of one position: the LoRA layers see what they see in a
KV-cached decode step); "prefill" is `prefill_tokens` per row.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import harness
import peft
import torch
from torch import nn
from transformers import LlamaModel
from workloads import LlamaShape, Preset, default_dtype, torch_dtype

import lorakit


@dataclass(frozen=True)
class MixedShape:
    model: LlamaShape
    dtype: str
    rows: int
    prefill_tokens: int
    adapter_counts: tuple[int, ...]


SHAPES = {
    "cpu": MixedShape(LlamaShape(hidden=512, intermediate=1408, layers=4, heads=8, kv_heads=8, vocab=1000),
                      "float32", rows=64, prefill_tokens=32, adapter_counts=(1, 4, 16, 64)),
    "gpu": MixedShape(LlamaShape(hidden=2048, intermediate=5632, layers=8, heads=16, kv_heads=16, vocab=32000),
                      "bfloat16", rows=64, prefill_tokens=128, adapter_counts=(1, 4, 16, 64)),
    "tiny": MixedShape(LlamaShape(hidden=64, intermediate=128, layers=2, heads=2, kv_heads=2, vocab=100),
                       "float32", rows=8, prefill_tokens=4, adapter_counts=(1, 8)),
}  # fmt: skip
HEADERS = ("shape", "adapters", "base ms", "single ms", "lorakit ms", "peft ms", "lorakit / peft",
           "lorakit / single", "lorakit / base", "stacked / gathered")  # fmt: skip


@contextmanager
def forced_path(gathered: bool | None) -> Iterator[None]:
    """Force `LoraLinear`'s choice between the stacked and the gathered path (None: its own choice)."""
    previous = lorakit.LoraLinear.__dict__["use_gathered"]
    if gathered is not None:
        lorakit.LoraLinear.use_gathered = staticmethod(lambda adapters, tokens_per_row: gathered)
    try:
        yield
    finally:
        lorakit.LoraLinear.use_gathered = previous


def build_models(shape: MixedShape, preset: Preset, count: int) -> tuple[nn.Module, nn.Module, nn.Module]:
    """The base model, and a lorakit and a peft copy with the same `count` non-zero adapters a0…a{count-1}."""
    torch.manual_seed(0)
    with torch.device(preset.device), default_dtype(torch_dtype(shape.dtype)):
        base = LlamaModel(shape.model.config()).eval()
    names = [f"a{i}" for i in range(count)]
    lk, pf = copy.deepcopy(base), copy.deepcopy(base)
    lk_config = lorakit.LoraConfig(r=preset.rank, lora_alpha=preset.alpha, target_modules="all-linear")
    pf_config = peft.LoraConfig(r=preset.rank, lora_alpha=preset.alpha, target_modules="all-linear")
    lorakit.get_lora_model(lk, lk_config, names[0])
    pf = peft.get_peft_model(pf, pf_config, adapter_name=names[0])
    for name in names[1:]:
        lorakit.add_adapter(lk, name, lk_config)
        pf.add_adapter(name, pf_config)
    peft_params = dict(pf.named_parameters())
    with torch.no_grad():
        for name, param in lk.named_parameters():
            if ".lora_" in name:
                if ".lora_B." in name:
                    nn.init.normal_(param, std=0.02)
                peft_params[f"base_model.model.{name}"].copy_(param)
    return base, lk.eval(), pf.eval()


def contenders(
    base: nn.Module, lk: nn.Module, pf: nn.Module, inputs: torch.Tensor, names: list[str]
) -> dict[str, Callable[[], object]]:
    def plain(model: nn.Module, **kwargs: object) -> Callable[[], object]:
        def forward() -> object:
            with torch.no_grad():
                return model(inputs_embeds=inputs, **kwargs).last_hidden_state

        return forward

    def mixed(gathered: bool | None) -> Callable[[], object]:
        def forward() -> object:
            with torch.no_grad(), forced_path(gathered), lorakit.mixed_batch(lk, names):
                return lk(inputs_embeds=inputs).last_hidden_state

        return forward

    lorakit.set_active_adapters(lk, names[0])
    return {
        "base": plain(base),
        "single": plain(lk),
        "lorakit": mixed(None),
        "lorakit stacked": mixed(False),
        "lorakit gathered": mixed(True),
        "peft": plain(pf, adapter_names=names),
    }


def run(preset: Preset) -> str:
    """The mixed-batch section: one row per (shape, adapter count)."""
    shape = SHAPES[preset.name]
    rows: list[list[object]] = []
    notes = []
    for count in shape.adapter_counts:
        base, lk, pf = build_models(shape, preset, count)
        names = [f"a{i % count}" for i in range(shape.rows)]
        for label, tokens in (("prefill", shape.prefill_tokens), ("decode", 1)):
            torch.manual_seed(1)
            inputs = torch.randn(shape.rows, tokens, shape.model.hidden, device=preset.device,
                                 dtype=torch_dtype(shape.dtype))  # fmt: skip
            runs = contenders(base, lk, pf, inputs, names)
            ours, theirs = runs["lorakit"](), runs["peft"]()
            scale = theirs.abs().max().item()
            difference = (ours.float() - theirs.float()).abs().max().item() / scale
            notes.append(difference)
            times = harness.interleaved(
                runs, rounds=preset.rounds, repeats=preset.repeats, warmup=preset.warmup, device=preset.device
            )
            ms = {name: harness.fmt_ms(harness.median_ms(values)) for name, values in times.items()}
            rows.append([
                f"{label} {shape.rows}×{tokens}", count, ms["base"], ms["single"], ms["lorakit"], ms["peft"],
                harness.ratio(times["lorakit"], times["peft"]), harness.ratio(times["lorakit"], times["single"]),
                harness.ratio(times["lorakit"], times["base"]),
                harness.ratio(times["lorakit stacked"], times["lorakit gathered"]),
            ])  # fmt: skip
        del base, lk, pf
        harness.free_memory(preset.device)
    return (
        "### Mixed batches (many adapters in one batch)\n\n"
        f"Llama-shaped `LlamaModel` ({shape.model.describe()}), {shape.dtype}, LoRA r={preset.rank} on all "
        f"linear layers, non-zero adapters; {shape.rows} rows, row i uses adapter i mod n. {preset.rounds} rounds "
        f"× {preset.repeats} forwards, interleaved. `lorakit` is its default path (`LoraLinear.use_gathered`: "
        "gathered from 16 adapters on, or from 4 with 8 or more tokens per row); the last column compares the "
        "two paths forced. lorakit's mixed outputs agree with peft's to a relative "
        f"{max(notes):.1e} at most.\n\n" + harness.table(HEADERS, rows)
    )
