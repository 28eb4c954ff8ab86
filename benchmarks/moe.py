"""Mixture of experts: the train step of lorakit and peft with the experts targeted, against the frozen base.

A Mixtral-shaped `MixtralModel` (transformers 5 stores each layer's experts as fused 3-D parameters) sized from the
preset: its hidden size, heads and vocabulary, half its layers, 8 experts of a quarter of its intermediate size,
top-2 routing. LoRA r and alpha of the preset on all linear layers (the attention) and, through
`target_parameters`, on every expert (`experts.gate_up_proj`, `experts.down_proj`). Contenders, interleaved on the
same inputs: floor (the frozen base, forward + backward to the input activations only), lorakit and peft
(forward + backward + AdamW step).
"""

from __future__ import annotations

import copy

import harness
import peft
import torch
from torch import nn
from train import HEADERS, rows_per_dtype, time_steps
from transformers import MixtralConfig, MixtralModel
from workloads import Preset, default_dtype, embeds

import lorakit

EXPERTS, TOP_K = 8, 2
TARGET_PARAMETERS = ["experts.gate_up_proj", "experts.down_proj"]


def config_of(preset: Preset) -> MixtralConfig:
    shape = preset.model
    return MixtralConfig(
        vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate // 4,
        num_hidden_layers=max(1, shape.layers // 2), num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads, num_local_experts=EXPERTS, num_experts_per_tok=TOP_K,
        max_position_embeddings=4096, attn_implementation="sdpa",
    )  # fmt: skip


def build_moe(preset: Preset, dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    with torch.device(preset.device), default_dtype(dtype):
        return MixtralModel(config_of(preset))


def measure(preset: Preset, dtype: torch.dtype) -> dict[str, list[float]]:
    """Per-round median step seconds of floor, lorakit and peft in `dtype`."""
    base = build_moe(preset, dtype)
    options = {"r": preset.rank, "lora_alpha": preset.alpha, "target_modules": "all-linear",
               "target_parameters": TARGET_PARAMETERS}  # fmt: skip
    lk = lorakit.get_lora_model(copy.deepcopy(base), lorakit.LoraConfig(**options))
    pf = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**options))
    return time_steps(preset, base, lk, pf, embeds(preset, dtype))


def run(preset: Preset) -> str:
    """The MoE section: one train-step row per dtype of the preset."""
    config = config_of(preset)
    return (
        "### Mixture of experts: train step with the experts targeted\n\n"
        f"`MixtralModel` (hidden {config.hidden_size}, {config.num_hidden_layers} layers, {EXPERTS} experts of "
        f"intermediate {config.intermediate_size}, top-{TOP_K}), LoRA r={preset.rank}, lora_alpha={preset.alpha} on "
        f"all linear layers and `target_parameters={TARGET_PARAMETERS}`, {preset.batch}×{preset.seq} tokens; loss = "
        "mean square of the last hidden state. floor = frozen base, forward + backward to the input activations "
        f"only; lorakit / peft = forward + backward + AdamW step. {preset.rounds} rounds × {preset.repeats} steps, "
        "interleaved.\n\n" + harness.table(HEADERS, rows_per_dtype(preset, measure))
    )
