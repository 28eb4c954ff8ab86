"""lorakit quick start: LoRA-fine-tune a small Llama, merge, and check merged == unmerged.

The model is a 2-layer Llama built from a config with random weights (nothing is downloaded). The task is
to learn "each token is followed by the next one" (t → t+1 mod vocab), which the random base model cannot
do. Only the LoRA adapters train; the base weights stay frozen.

Run: python examples/quickstart.py
"""

from __future__ import annotations

import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import lorakit


def next_token_accuracy(model: torch.nn.Module, ids: torch.Tensor) -> float:
    with torch.no_grad():
        predicted = model(input_ids=ids).logits[:, :-1].argmax(-1)
    return (predicted == ids[:, 1:]).float().mean().item()


def main() -> None:
    torch.manual_seed(0)
    started = time.perf_counter()
    config = LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.2,
    )  # fmt: skip
    model = LlamaForCausalLM(config)

    lora_config = lorakit.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear")
    lorakit.get_lora_model(model, lora_config)
    trainable, total = lorakit.trainable_parameters(model)
    print(f"LoRA on {len(list(lorakit.lora_layers(model)))} layers: {trainable:,} of {total:,} parameters trainable "
          f"({100 * trainable / total:.1f}%)")  # fmt: skip

    starts = torch.randint(0, config.vocab_size, (32, 1))
    ids = (starts + torch.arange(24)) % config.vocab_size  # rows like 17, 18, 19, ...
    print(f"next-token accuracy before training: {next_token_accuracy(model, ids):.1%}")

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for step in range(1, 101):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step == 1 or step % 25 == 0:
            print(f"  step {step:3d}  loss {loss.item():.3f}")
    model.eval()
    print(f"next-token accuracy after training:  {next_token_accuracy(model, ids):.1%}")

    original = {name: p.detach().clone() for name, p in model.named_parameters() if "base_layer" in name}
    with torch.no_grad():
        unmerged_logits = model(input_ids=ids).logits
        lorakit.merge(model)
        merged_logits = model(input_ids=ids).logits
        lorakit.unmerge(model)
    difference = (merged_logits - unmerged_logits).abs().max().item()
    scale = unmerged_logits.abs().max().item()
    print(f"merged vs unmerged logits: max |difference| = {difference:.1e} (logits up to {scale:.0f})")
    restored = all(torch.equal(p, original[name]) for name, p in model.named_parameters() if name in original)
    print(f"unmerge restored every base weight bit for bit: {restored}")
    assert difference <= 1e-5 * scale and restored

    plain = lorakit.merge_and_unload(model)
    print(f"merge_and_unload -> {type(plain).__name__} with no LoRA layers left, "
          f"accuracy {next_token_accuracy(plain, ids):.1%}")  # fmt: skip
    print(f"done in {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
