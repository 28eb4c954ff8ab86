"""Train-step time of lorakit, peft and the frozen-base floor on a Llama-shaped model, in one run.

Contenders, interleaved (A B C A B C ...) over several rounds on the same inputs:
- floor:   the frozen base model, forward + backward computing activation gradients only (no LoRA, no
           optimizer): what no LoRA train step can beat;
- lorakit: `lorakit.get_lora_model(..., target_modules="all-linear")`, forward + backward + AdamW step;
- peft:    `peft.get_peft_model(...)` with the same config, same step.
Each round times `--steps` steps per contender and keeps the median; the table reports the median over
rounds of each contender's time and of the per-round ratios, with the ratios' min–max spread.

Run: python benchmarks/train_step.py            (h=1024, 4 layers, r=16, 2x256 tokens, float32 and bfloat16)
     python benchmarks/train_step.py --tiny     (a seconds-long smoke run of the same code)
Run it on a quiet machine: anything else running skews the ratios.
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import time
from collections.abc import Callable

import torch
from transformers import LlamaConfig, LlamaModel

import lorakit


def build_base(hidden: int, layers: int, dtype: torch.dtype) -> LlamaModel:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=1000, hidden_size=hidden, intermediate_size=int(hidden * 2.75), num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 64),
        max_position_embeddings=4096, attn_implementation="sdpa",
    )  # fmt: skip
    return LlamaModel(config).to(dtype)


def loss_of(model: torch.nn.Module, embeds: torch.Tensor) -> torch.Tensor:
    return model(inputs_embeds=embeds).last_hidden_state.float().square().mean()


def floor_step(base: torch.nn.Module, embeds: torch.Tensor) -> Callable[[], None]:
    for param in base.parameters():
        param.requires_grad_(False)
    leaf = embeds.detach().clone().requires_grad_(True)

    def step() -> None:
        loss_of(base, leaf).backward()
        leaf.grad = None

    return step


def lora_step(model: torch.nn.Module, embeds: torch.Tensor) -> Callable[[], None]:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> None:
        loss_of(model, embeds).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def make_contenders(base: LlamaModel, rank: int) -> dict[str, Callable[[], None]]:
    import peft

    lk = lorakit.get_lora_model(
        copy.deepcopy(base), lorakit.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear")
    )
    pf = peft.get_peft_model(
        copy.deepcopy(base), peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear")
    )
    return {"floor": base, "lorakit": lk, "peft": pf}


def measure(dtype: torch.dtype, hidden: int, layers: int, rank: int, batch: int, seq: int, rounds: int, steps: int):
    base = build_base(hidden, layers, dtype)
    models = make_contenders(base, rank)
    embeds = torch.randn(batch, seq, hidden, dtype=dtype)
    runners = {
        "floor": floor_step(models["floor"], embeds),
        "lorakit": lora_step(models["lorakit"], embeds),
        "peft": lora_step(models["peft"], embeds),
    }
    for run in runners.values():  # warm up allocator, kernels, optimizer state
        run()
        run()
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(rounds):
        for name, run in runners.items():
            samples = []
            for _ in range(steps):
                start = time.perf_counter()
                run()
                samples.append(time.perf_counter() - start)
            times[name].append(statistics.median(samples))
    return times


def ratio_stats(num: list[float], den: list[float]) -> tuple[float, float, float]:
    ratios = [a / b for a, b in zip(num, den, strict=True)]
    return statistics.median(ratios), min(ratios), max(ratios)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="a small shape for a quick smoke run")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    args = parser.parse_args()
    shape = dict(hidden=1024, layers=4, rank=16, batch=2, seq=256)
    if args.tiny:
        shape = dict(hidden=128, layers=2, rank=8, batch=2, seq=32)
        args.rounds, args.steps = min(args.rounds, 3), min(args.steps, 2)
    import peft

    print(
        f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads; "
        f"torch {torch.__version__}, peft {peft.__version__}, lorakit {lorakit.__version__}"
    )
    print(
        f"shape: Llama h={shape['hidden']}, {shape['layers']} layers, r={shape['rank']} all-linear, "
        f"{shape['batch']}x{shape['seq']} tokens; {args.rounds} rounds x {args.steps} steps, interleaved"
    )
    print()
    print("| dtype | floor ms | lorakit ms | peft ms | lorakit / floor | peft / floor | lorakit / peft |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for dtype_name in args.dtypes.split(","):
        times = measure(getattr(torch, dtype_name), rounds=args.rounds, steps=args.steps, **shape)
        med = {name: statistics.median(values) * 1e3 for name, values in times.items()}
        cells = [
            ratio_stats(times["lorakit"], times["floor"]),
            ratio_stats(times["peft"], times["floor"]),
            ratio_stats(times["lorakit"], times["peft"]),
        ]
        ratio_text = " | ".join(f"{m:.3f} ({lo:.3f}–{hi:.3f})" for m, lo, hi in cells)
        print(f"| {dtype_name} | {med['floor']:.1f} | {med['lorakit']:.1f} | {med['peft']:.1f} | {ratio_text} |")


if __name__ == "__main__":
    main()
