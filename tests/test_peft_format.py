"""peft's format, both directions: lorakit save → peft load, peft save → lorakit load, same bytes on the wire."""

from __future__ import annotations

import copy
import json
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import peft
import pytest
import torch
from safetensors import safe_open
from torch import nn
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)

import lorakit

warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")
LLAMA_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def llama() -> nn.Module:
    return LlamaForCausalLM(
        LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=False)
    )  # fmt: skip


def gpt2() -> nn.Module:
    return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=4))


def bert() -> nn.Module:
    config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=48, max_position_embeddings=32, num_labels=3)  # fmt: skip
    return BertForSequenceClassification(config)


def t5() -> nn.Module:
    config = T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=2, num_heads=4,
                      decoder_start_token_id=0)  # fmt: skip
    return T5ForConditionalGeneration(config)


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.block = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.pointwise = nn.Conv2d(8, 16, 1)
        self.head = nn.Linear(16, 5)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        hidden = torch.relu(self.pointwise(torch.relu(self.block(torch.relu(self.stem(pixel_values))))))
        return self.head(hidden.mean(dim=(2, 3)))


def token_inputs() -> dict[str, torch.Tensor]:
    return {"input_ids": torch.randint(1, 64, (2, 9), generator=torch.Generator().manual_seed(1))}


def seq2seq_inputs() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return {
        "input_ids": torch.randint(1, 64, (2, 9), generator=generator),
        "decoder_input_ids": torch.randint(1, 64, (2, 5), generator=generator),
    }


def image_inputs() -> dict[str, torch.Tensor]:
    return {"pixel_values": torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(1))}


@dataclass
class Case:
    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[[], dict[str, torch.Tensor]]
    config: dict[str, Any]
    peft_extra: dict[str, Any] = field(default_factory=dict)


CASES = [
    Case("llama-seven-projections", llama, token_inputs,
         {"r": 4, "lora_alpha": 8, "target_modules": LLAMA_PROJECTIONS}),
    Case("gpt2-conv1d", gpt2, token_inputs, {"r": 4, "lora_alpha": 8, "target_modules": ["c_attn", "c_proj", "c_fc"]},
         {"fan_in_fan_out": True}),
    Case("bert-modules-to-save", bert, token_inputs,
         {"r": 4, "lora_alpha": 8, "target_modules": ["query", "value"], "modules_to_save": ["classifier"]}),
    Case("t5", t5, seq2seq_inputs, {"r": 4, "lora_alpha": 16, "target_modules": ["q", "k", "v", "o", "wi", "wo"]}),
    Case("embedding", llama, token_inputs, {"r": 4, "lora_alpha": 8, "target_modules": ["embed_tokens", "v_proj"]}),
    Case("conv2d", ConvNet, image_inputs, {"r": 4, "lora_alpha": 8, "target_modules": ["stem", "block", "pointwise"]}),
    Case("rank-alpha-pattern", llama, token_inputs,
         {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"],
          "rank_pattern": {r"layers\.1\.self_attn\.q_proj": 2, "down_proj": 6}, "alpha_pattern": {"v_proj": 3}}),
    Case("rslora", llama, token_inputs, {"r": 8, "lora_alpha": 4, "use_rslora": True, "target_modules": ["q_proj"]}),
    Case("lora-bias", bert, token_inputs,
         {"r": 4, "lora_alpha": 8, "target_modules": ["query", "dense"], "lora_bias": True}),
    Case("all-linear", llama, token_inputs, {"r": 2, "lora_alpha": 4, "target_modules": "all-linear"}),
]  # fmt: skip


def base_model(case: Case) -> nn.Module:
    torch.manual_seed(0)
    return case.build().eval()


def randomize_saved_copies(model: nn.Module) -> None:
    """Make modules_to_save copies differ from the original head (else saving them proves nothing)."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "modules_to_save" in name:
                param.add_(torch.randn_like(param))


def outputs(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs)
    return out if isinstance(out, torch.Tensor) else out.logits


def assert_adapter_matters(adapted: torch.Tensor, base: torch.Tensor) -> None:
    assert (adapted - base).abs().max() > 1e-3 * base.abs().max()


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_lorakit_save_loads_in_peft(case, tmp_path):
    base = base_model(case)
    inputs = case.inputs()
    reference = outputs(base, inputs)
    model = lorakit.get_lora_model(copy.deepcopy(base), lorakit.LoraConfig(**case.config, init_lora_weights=False))
    randomize_saved_copies(model)
    expected = outputs(model, inputs)
    assert_adapter_matters(expected, reference)
    lorakit.save_adapter(model, tmp_path)
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    torch.testing.assert_close(outputs(loaded, inputs), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_peft_save_loads_in_lorakit(case, tmp_path):
    base = base_model(case)
    inputs = case.inputs()
    reference = outputs(base, inputs)
    config = peft.LoraConfig(**case.config, **case.peft_extra, init_lora_weights=False)
    peft_model = peft.get_peft_model(copy.deepcopy(base), config).eval()
    randomize_saved_copies(peft_model)
    expected = outputs(peft_model, inputs)
    assert_adapter_matters(expected, reference)
    peft_model.save_pretrained(tmp_path)
    model = lorakit.load_adapter(copy.deepcopy(base), tmp_path)
    assert not any(p.requires_grad for p in model.parameters())  # trainable=False by default
    torch.testing.assert_close(outputs(model, inputs), expected, rtol=1e-5, atol=1e-6)


def saved_layout(directory: Path) -> tuple[dict[str, Any], dict[str, list[int]]]:
    config = json.loads((directory / "adapter_config.json").read_text())
    with safe_open(str(directory / "adapter_model.safetensors"), "pt") as file:
        assert file.metadata() == {"format": "pt"}
        shapes = {key: file.get_slice(key).get_shape() for key in file.keys()}  # noqa: SIM118
    return config, shapes


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_same_keys_shapes_and_config_fields_as_peft(case, tmp_path):
    base = base_model(case)
    peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**case.config, **case.peft_extra)).save_pretrained(
        tmp_path / "peft"
    )
    lorakit.save_adapter(
        lorakit.get_lora_model(copy.deepcopy(base), lorakit.LoraConfig(**case.config)), tmp_path / "lk"
    )
    peft_config, peft_shapes = saved_layout(tmp_path / "peft")
    lk_config, lk_shapes = saved_layout(tmp_path / "lk")
    # With an embedding target peft also stores the whole base embedding (its save_embedding_layers="auto",
    # meant for resized vocabularies); lorakit leaves it out of the file and accepts it when loading.
    base_embeddings = {k for k in peft_shapes if k.endswith("embed_tokens.base_layer.weight")}
    assert bool(base_embeddings) == (case.name == "embedding")
    assert lk_shapes == {k: v for k, v in peft_shapes.items() if k not in base_embeddings}
    peft_config.pop("peft_version")  # lorakit does not claim to be a peft version
    assert set(lk_config) == set(peft_config)
    for key, value in peft_config.items():
        if key == "target_modules" and isinstance(value, list):  # peft writes a set: order is arbitrary
            assert sorted(lk_config[key]) == sorted(value)
        else:
            assert lk_config[key] == value, key


def test_round_trip_through_lorakit_keeps_training_state(tmp_path):
    base = base_model(CASES[0])
    model = lorakit.get_lora_model(copy.deepcopy(base), lorakit.LoraConfig(r=4, target_modules=["q_proj"]))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.normal_()
    lorakit.save_adapter(model, tmp_path)
    resumed = lorakit.load_adapter(copy.deepcopy(base), tmp_path, trainable=True)
    trainable = {n for n, p in resumed.named_parameters() if p.requires_grad}
    assert trainable == {n for n, p in model.named_parameters() if p.requires_grad}
    inputs = token_inputs()
    torch.testing.assert_close(outputs(resumed, inputs), outputs(model, inputs), rtol=0, atol=0)


def test_load_as_second_adapter_and_hub_cache_layout(tmp_path, monkeypatch):
    base = base_model(CASES[0])
    inputs = token_inputs()
    first = lorakit.get_lora_model(copy.deepcopy(base), lorakit.LoraConfig(r=4, target_modules=["q_proj"],
                                                                            init_lora_weights=False))  # fmt: skip
    snapshot = tmp_path / "hub" / "models--someone--tiny-adapter" / "snapshots" / "0123abcd"
    lorakit.save_adapter(first, snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0123abcd")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))

    model = lorakit.get_lora_model(copy.deepcopy(base), lorakit.LoraConfig(r=2, target_modules=["v_proj"]))
    lorakit.load_adapter(model, "someone/tiny-adapter", adapter_name="hub")
    assert lorakit.adapter_names(model) == ["default", "hub"]
    assert lorakit.active_adapters(model) == ["default"]  # added inactive, as peft's load_adapter
    lorakit.set_active_adapters(model, "hub")
    torch.testing.assert_close(outputs(model, inputs), outputs(first, inputs), rtol=1e-6, atol=1e-6)
    lorakit.load_adapter(copy.deepcopy(base), snapshot.parents[1])  # the cache entry's directory works too
    with pytest.raises(lorakit.LoraError, match=r"no adapter_config\.json"):
        lorakit.load_adapter(copy.deepcopy(base), tmp_path / "nowhere")


def test_config_field_of_wrong_type_is_a_lora_error(tmp_path):
    base = base_model(CASES[0])
    lorakit.save_adapter(lorakit.get_lora_model(copy.deepcopy(base), lorakit.LoraConfig(target_modules=["q_proj"])),
                         tmp_path)  # fmt: skip
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["lora_alpha"] = "eight"
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(lorakit.LoraError, match="lora_alpha must be a positive finite number, got 'eight'"):
        lorakit.load_adapter(copy.deepcopy(base), tmp_path)


def test_saved_files_get_the_usual_permissions(tmp_path):
    model = lorakit.get_lora_model(base_model(CASES[0]), lorakit.LoraConfig(target_modules=["q_proj"]))
    umask = os.umask(0o022)
    try:
        lorakit.save_adapter(model, tmp_path)
    finally:
        os.umask(umask)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o644
