"""X-LoRA: lorakit's `get_xlora_model` against peft's `XLoraModel`, at 4 and 16 experts.

A Llama-shaped `LlamaForCausalLM` with n non-zero experts (rank r on all linear layers) and the default
classifier (depth 1, scaling pass value 0). Contenders, interleaved:

- forward: one no-grad forward over `batch × seq` tokens of the base model, of lorakit's X-LoRA (scaling
  pass, classifier, real pass: one pair of stacked GEMMs per layer) and of peft's (a loop over the experts);
- generation: greedy `generate()` of `new_tokens` tokens after a `prompt`-token prompt: lorakit keeps a KV
  cache for each pass; peft turns the cache off, re-running both passes over the whole prefix per token.

The project's targets: lorakit's forward ≤ 2.5× the base forward; its generation ≥ 5× peft's tokens/s.
"""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Callable
from dataclasses import dataclass

import harness
import peft
import torch
from torch import nn
from transformers import LlamaForCausalLM
from workloads import LlamaShape, Preset, default_dtype, torch_dtype

import lorakit

FORWARD_TARGET = 2.5
GENERATION_TARGET = 5.0


@dataclass(frozen=True)
class XLoraShape:
    model: LlamaShape
    dtype: str
    batch: int
    seq: int
    prompt: int
    new_tokens: int
    expert_counts: tuple[int, ...]


SHAPES = {
    "cpu": XLoraShape(LlamaShape(hidden=1024, intermediate=2816, layers=4, heads=16, kv_heads=16, vocab=1000),
                      "float32", batch=2, seq=128, prompt=128, new_tokens=32, expert_counts=(4, 16)),
    "gpu": XLoraShape(LlamaShape(hidden=2048, intermediate=5632, layers=8, heads=16, kv_heads=16, vocab=32000),
                      "bfloat16", batch=8, seq=1024, prompt=64, new_tokens=32, expert_counts=(4, 16)),
    "tiny": XLoraShape(LlamaShape(hidden=64, intermediate=128, layers=2, heads=2, kv_heads=2, vocab=100),
                       "float32", batch=2, seq=8, prompt=4, new_tokens=3, expert_counts=(2,)),
}  # fmt: skip
HEADERS = ("experts", "work", "base", "lorakit", "peft", "lorakit / base", "lorakit / peft")


def build_models(shape: XLoraShape, preset: Preset, count: int, root: str) -> tuple[nn.Module, nn.Module, nn.Module]:
    """The base model and lorakit's and peft's X-LoRA models on copies of it, with the same experts."""
    torch.manual_seed(0)
    with torch.device(preset.device), default_dtype(torch_dtype(shape.dtype)):
        base = LlamaForCausalLM(shape.model.config()).eval()
    experts = copy.deepcopy(base)
    config = lorakit.LoraConfig(r=preset.rank, lora_alpha=preset.alpha, target_modules="all-linear")
    directories = {}
    for i in range(count):
        name = str(i)  # peft needs the experts named "0".."n-1"
        if i == 0:
            lorakit.get_lora_model(experts, config, name)
        else:
            lorakit.add_adapter(experts, name, config)
        with torch.no_grad():
            for param_name, param in experts.named_parameters():
                if f".lora_B.{name}." in param_name:
                    nn.init.normal_(param, std=0.02)
        directories[name] = str(lorakit.save_adapter(experts, f"{root}/{name}", adapter_name=name))
    ours = lorakit.get_xlora_model(copy.deepcopy(base), lorakit.XLoraConfig(adapters=directories)).eval()
    plain = copy.deepcopy(base)
    plain.config.use_cache = False  # peft refuses a caching model
    theirs = peft.get_peft_model(
        plain, peft.XLoraConfig(task_type="CAUSAL_LM", hidden_size=shape.model.hidden, adapters=directories)
    ).eval()
    their_layers = [m for m in theirs.base_model.internal_xlora_classifier.layers if isinstance(m, nn.Linear)]
    with torch.no_grad():  # the same classifier in both, so that their outputs can be compared
        for our_layer, their_layer in zip([*ours.xlora_classifier.inner, ours.xlora_classifier.last], their_layers,
                                          strict=True):  # fmt: skip
            our_layer.weight.copy_(their_layer.weight)
            our_layer.bias.copy_(their_layer.bias)
    return base, ours, theirs


def forward(model: nn.Module, ids: torch.Tensor) -> Callable[[], object]:
    def run() -> object:
        with torch.no_grad():
            return model(input_ids=ids).logits

    return run


def generation(model: nn.Module, ids: torch.Tensor, new_tokens: int) -> Callable[[], object]:
    def run() -> object:
        with torch.no_grad():
            return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                  min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)  # fmt: skip

    return run


def _shown(seconds: list[float], unit: str, new_tokens: int) -> str:
    median = harness.median_ms(seconds) / 1e3
    return f"{median * 1e3:.1f} ms" if unit == "ms" else f"{new_tokens / median:.1f} tok/s"


def _verdict(count: int, unit: str, vs_base: harness.Ratio, vs_peft: harness.Ratio, same: bool) -> str:
    if unit == "ms":
        ok = vs_base.median <= FORWARD_TARGET
        return (
            f"- {count} experts: forward {vs_base.median:.2f}× the base (target ≤ {FORWARD_TARGET}×): {harness.met(ok)}"
        )
    speedup = 1 / vs_peft.median
    return (
        f"- {count} experts: generation {speedup:.1f}× peft's tokens/s (target ≥ {GENERATION_TARGET}×): "
        f"{harness.met(speedup >= GENERATION_TARGET)}; greedy tokens {'equal' if same else '**differ**'} to peft's"
    )


def run(preset: Preset) -> str:
    """The X-LoRA section: forward time and generation throughput per expert count."""
    shape = SHAPES[preset.name]
    rows: list[list[object]] = []
    verdicts = []
    for count in shape.expert_counts:
        with tempfile.TemporaryDirectory() as root:
            base, ours, theirs = build_models(shape, preset, count, root)
        torch.manual_seed(1)
        ids = torch.randint(0, shape.model.vocab, (shape.batch, shape.seq), device=preset.device)
        prompt = ids[:1, : shape.prompt]
        ours_tokens = generation(ours, prompt, shape.new_tokens)()
        same = torch.equal(ours_tokens, generation(theirs, prompt, shape.new_tokens)())
        plan = {"rounds": preset.rounds, "repeats": max(1, preset.repeats - 1), "warmup": 1, "device": preset.device}
        work = {
            f"forward {shape.batch}×{shape.seq}": (forward, (ids,), "ms"),
            f"generate {shape.new_tokens} after {shape.prompt}": (generation, (prompt, shape.new_tokens), "tok/s"),
        }
        for label, (make, args, unit) in work.items():
            contenders = {"base": make(base, *args), "lorakit": make(ours, *args), "peft": make(theirs, *args)}
            times = harness.interleaved(contenders, **plan)
            vs_base = harness.ratio(times["lorakit"], times["base"])
            vs_peft = harness.ratio(times["lorakit"], times["peft"])
            cells = [_shown(times[name], unit, shape.new_tokens) for name in contenders]
            rows.append([count, label, *cells, vs_base, vs_peft])
            verdicts.append(_verdict(count, unit, vs_base, vs_peft, same))
        del base, ours, theirs
        harness.free_memory(preset.device)
    return (
        "### X-LoRA\n\n"
        f"Llama-shaped `LlamaForCausalLM` ({shape.model.describe()}), {shape.dtype}, experts of rank {preset.rank} "
        "on all linear layers (lora_B ~ N(0, 0.02²)), default classifier; eval mode, no grad. "
        f"{preset.rounds} rounds, interleaved. Ratios are of times (below 1: lorakit faster).\n\n"
        + harness.table(HEADERS, rows)
        + "\n\nTargets:\n\n"
        + "\n".join(verdicts)
    )
