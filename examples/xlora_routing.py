"""X-LoRA learns to route: two LoRA experts, each trained on its own task, mixed per token by a classifier.

A tiny Llama with random weights; two synthetic tasks that a token's identity tells apart:
- "up":   tokens 2…31, each followed by the next one (17 18 19 …, wrapping from 31 to 2);
- "down": tokens 32…63, each followed by the previous one (50 49 48 …, wrapping from 32 to 63).
Expert "up" is a LoRA trained on the first task only, expert "down" on the second. Then the experts are
frozen and only the X-LoRA classifier trains, on batches that mix both tasks. The script prints, for each
task's tokens, the mean weight the classifier gives each expert, and the next-token loss on a held-out
mixed batch of each single expert and of the X-LoRA model.

Run: python examples/xlora_routing.py            (about a minute on 2 CPU cores)
     python examples/xlora_routing.py --quick    (fewer steps, for the tests)
"""

from __future__ import annotations

import argparse
import copy
import tempfile

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import lorakit

VOCAB, SEQ = 64, 12
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TASKS = {"up": (2, 32, +1), "down": (32, 64, -1)}  # token range [low, high) and step


def batch(task: str, size: int, generator: torch.Generator) -> torch.Tensor:
    low, high, step = TASKS[task]
    start = torch.randint(low, high, (size, 1), generator=generator)
    return low + (start - low + step * torch.arange(SEQ)) % (high - low)


def mixed_batch(size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """`size` sequences, half of each task, and which task each row is (0 up, 1 down)."""
    ids = torch.cat([batch("up", size // 2, generator), batch("down", size - size // 2, generator)])
    return ids, torch.tensor([0] * (size // 2) + [1] * (size - size // 2))


def train(model: nn.Module, make_batch, steps: int, lr: float) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    model.train()
    for _ in range(steps):
        ids = make_batch()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def loss(model: nn.Module, ids: torch.Tensor) -> float:
    with torch.no_grad():
        return model(input_ids=ids, labels=ids).loss.item()


def run(quick: bool = False) -> dict[str, object]:
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    base = LlamaForCausalLM(config).eval()
    expert_steps, classifier_steps = (60, 60) if quick else (150, 150)
    # the output projection too: with a frozen random lm_head, mapping a token to its successor needs it
    lora = lorakit.LoraConfig(r=8, lora_alpha=16, target_modules=[*PROJECTIONS, "lm_head"])
    with tempfile.TemporaryDirectory() as root:
        directories = {}
        for task in TASKS:
            expert = lorakit.get_lora_model(copy.deepcopy(base), lora)
            train(expert, lambda task=task: batch(task, 16, generator), expert_steps, lr=1e-2)
            directories[task] = lorakit.save_adapter(expert, f"{root}/{task}")
        model = lorakit.get_xlora_model(
            copy.deepcopy(base), lorakit.XLoraConfig(adapters=directories, xlora_depth=2, xlora_size=64)
        )
        train(model, lambda: mixed_batch(16, generator)[0], classifier_steps, lr=3e-3)

        held_out, task_of_row = mixed_batch(64, torch.Generator().manual_seed(1))
        losses = {"X-LoRA": loss(model, held_out)}
        with torch.no_grad():
            model(input_ids=held_out)
        scalings = lorakit.latest_scalings(model)[:, :, 0, :]  # (rows, tokens, experts): layer 0 (not layerwise)
        routing = {task: scalings[task_of_row == i].mean(dim=(0, 1)).tolist() for i, task in enumerate(TASKS)}
        for task, directory in directories.items():
            single = lorakit.load_adapter(copy.deepcopy(base), directory)
            losses[f"expert {task!r} alone"] = loss(single, held_out)
        losses["base model"] = loss(base, held_out)
    return {"routing": routing, "losses": losses, "experts": list(TASKS)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer training steps")
    result = run(parser.parse_args().quick)
    experts = result["experts"]
    print("mean classifier weight per expert, by the task of the token:")
    print(f"  {'task':<6}" + "".join(f"{name:>10}" for name in experts))
    for task, weights in result["routing"].items():
        print(f"  {task:<6}" + "".join(f"{w:>10.3f}" for w in weights))
    print("next-token loss on a held-out batch mixing both tasks:")
    for name, value in result["losses"].items():
        print(f"  {name:<20} {value:.3f}")


if __name__ == "__main__":
    main()
