"""`hot_swap_adapter`: another adapter's weights into an existing slot, in place, without recompiling.

The oracle is the swapped-in adapter loaded the ordinary way (`load_adapter` on a fresh copy of the base):
outputs must agree to float32 rounding, for a smaller rank (zero-padded), another alpha and rsLoRA (the
scaling ratio folded into B), on Linear, Embedding and Conv2d targets with lora_bias.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import transformers as tf
from torch import nn

import lorakit
from lorakit import LoraConfig, LoraError


def _tiny_llama() -> nn.Module:
    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    return tf.LlamaForCausalLM(config).eval()


def _saved(base: nn.Module, config: LoraConfig, directory: Path, seed: int) -> Path:
    """Train-free stand-in for a trained adapter: random non-zero A and B (and lora_B biases), saved."""
    model = copy.deepcopy(base)
    torch.manual_seed(seed)
    lorakit.get_lora_model(model, config.replace(init_lora_weights=False))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_B." in name and name.endswith("bias"):
                param.normal_()
    lorakit.save_adapter(model, directory)
    return directory


def _reference(base: nn.Module, directory: Path, run: Callable[[nn.Module], torch.Tensor]) -> torch.Tensor:
    model = lorakit.load_adapter(copy.deepcopy(base), directory)
    with torch.no_grad():
        return run(model)


def _close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


def test_compiled_model_serves_swapped_adapters_without_recompiling(tmp_path: Path) -> None:
    base = _tiny_llama()
    targets = ["q_proj", "v_proj", "embed_tokens"]
    smaller = _saved(base, LoraConfig(r=4, lora_alpha=32, use_rslora=True, target_modules=targets), tmp_path / "x", 1)
    same = _saved(base, LoraConfig(r=8, lora_alpha=8, target_modules=targets), tmp_path / "y", 2)
    model = lorakit.get_lora_model(copy.deepcopy(base), LoraConfig(r=8, lora_alpha=16, target_modules=targets))
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    compiled = torch.compile(model)
    with torch.no_grad():
        before = compiled(ids).logits
        with torch._dynamo.config.patch(error_on_recompile=True):
            for directory in (smaller, same, smaller):
                lorakit.hot_swap_adapter(model, directory)
                swapped = compiled(ids).logits
                _close(swapped, _reference(base, directory, lambda m: m(ids).logits))
    assert not torch.allclose(before, swapped)
    assert lorakit.read_adapter_config(smaller).r == 4 and model.model.layers[0].self_attn.q_proj.r["default"] == 8


class _ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.conv = nn.Conv2d(4, 6, 3, padding=1)
        self.head = nn.Linear(6, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.conv(self.embed(ids).permute(0, 3, 1, 2)).relu()
        return self.head(x.mean((2, 3)))


def test_embedding_conv_and_lora_bias(tmp_path: Path) -> None:
    torch.manual_seed(0)
    base = _ConvNet().eval()
    targets = ["embed", "conv", "head"]
    config = LoraConfig(r=6, lora_alpha=3, lora_bias=True, target_modules=["conv", "head"])
    directory = _saved(base, config.replace(r=2, lora_alpha=7), tmp_path / "x", 1)
    model = lorakit.get_lora_model(copy.deepcopy(base), config)
    ids = torch.randint(0, 10, (3, 4, 4))
    lorakit.hot_swap_adapter(model, directory)
    with torch.no_grad():
        _close(model(ids), _reference(base, directory, lambda m: m(ids)))
    embed_dir = _saved(base, LoraConfig(r=3, lora_alpha=5, target_modules=targets[:1]), tmp_path / "e", 2)
    model = lorakit.get_lora_model(copy.deepcopy(base), LoraConfig(r=5, target_modules=targets[:1]))
    lorakit.hot_swap_adapter(model, embed_dir)
    with torch.no_grad():
        _close(model(ids), _reference(base, embed_dir, lambda m: m(ids)))
    assert torch.count_nonzero(model.embed.lora_embedding_A["default"][3:]) == 0  # the padding rows


def test_refusals_change_nothing(tmp_path: Path) -> None:
    base = _tiny_llama()
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    model = lorakit.get_lora_model(copy.deepcopy(base), config.replace(init_lora_weights=False))
    before = {k: v.clone() for k, v in lorakit.lora_state_dict(model).items()}
    cases = [
        (_saved(base, config.replace(target_modules=["q_proj"]), tmp_path / "t", 1), "targets other modules"),
        (_saved(base, config.replace(r=8), tmp_path / "r", 2), "rank 8, larger than the slot's 4"),
        (_saved(base, config.replace(lora_bias=True), tmp_path / "b", 3), "lora_bias=True"),
    ]
    broken = _saved(base, config.replace(r=2), tmp_path / "k", 4)
    from safetensors.torch import load_file, save_file

    tensors = load_file(broken / "adapter_model.safetensors")
    tensors.pop(next(k for k in tensors if "v_proj.lora_B" in k))
    save_file(tensors, broken / "adapter_model.safetensors")
    cases.append((broken, "missing keys"))
    for directory, message in cases:
        with pytest.raises(LoraError, match=message):
            lorakit.hot_swap_adapter(model, directory)
    with pytest.raises(LoraError, match="unknown adapter 'other'"):
        lorakit.hot_swap_adapter(model, cases[0][0], "other")
    good = _saved(base, config, tmp_path / "g", 5)
    lorakit.merge(model)
    with pytest.raises(LoraError, match="merged"):
        lorakit.hot_swap_adapter(model, good)
    lorakit.unmerge(model)
    model.eval()
    with pytest.raises(LoraError, match="mixed batch"), lorakit.mixed_batch(model, ["default"]):
        lorakit.hot_swap_adapter(model, good)
    after = lorakit.lora_state_dict(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
