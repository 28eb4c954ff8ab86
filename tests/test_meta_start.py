"""A meta-device start: build on `torch.device("meta")`, convert, `lorakit.materialize` from the base checkpoint.

It must give the model an ordinary start gives, to the bit: the same base weights, buffers and ties, and the same
adapters from the same seed (they are made for real at conversion). Whatever would leave a tensor without a value
is refused before anything changes. The sharded (FSDP2) start is in tests/test_distributed.py.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import lorakit

FAMILIES = {
    # Conv1D layers and tied input/output embeddings, the checkpoint holding the tied tensor once
    "gpt2": (GPT2LMHeadModel, GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=96, n_positions=32), None),
    # rotary buffers (computed, in no checkpoint), a modules_to_save copy of lm_head
    "llama": (
        LlamaForCausalLM,
        LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4),
        ["lm_head"],
    ),
}


def lora_config(modules_to_save: list[str] | None, **fields) -> lorakit.LoraConfig:
    # init_lora_weights=False: B ≠ 0 as well, so the adapters change the outputs compared below
    return lorakit.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", modules_to_save=modules_to_save,
                              init_lora_weights=False, **fields)  # fmt: skip


def ordinary_and_meta_start(family: str, tmp_path, shard_size: str | None = None) -> tuple[nn.Module, nn.Module]:
    model_class, config, modules_to_save = FAMILIES[family]
    torch.manual_seed(0)
    ordinary = model_class(config)
    checkpoint = tmp_path / "base"
    ordinary.save_pretrained(checkpoint, **({"max_shard_size": shard_size} if shard_size else {}))
    torch.manual_seed(1)
    lorakit.get_lora_model(ordinary, lora_config(modules_to_save))

    with torch.device("meta"):
        meta = model_class(config)
    torch.manual_seed(1)
    lorakit.get_lora_model(meta, lora_config(modules_to_save))
    assert all(p.is_meta for n, p in meta.named_parameters() if "lora_" not in n)
    lorakit.materialize(meta, checkpoint)
    return ordinary.eval(), meta.eval()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_meta_start_is_an_ordinary_start_to_the_bit(family, tmp_path):
    ordinary, meta = ordinary_and_meta_start(family, tmp_path, shard_size="40KB" if family == "llama" else None)
    if family == "llama":
        assert json.loads((tmp_path / "base" / "model.safetensors.index.json").read_text())["weight_map"]
    expected, actual = ordinary.state_dict(), meta.state_dict()
    assert actual.keys() == expected.keys()
    for key in expected:
        assert torch.equal(actual[key], expected[key]), key
    for (name, buffer), (_, ordinary_buffer) in zip(meta.named_buffers(), ordinary.named_buffers(), strict=True):
        assert torch.equal(buffer, ordinary_buffer), name
    assert {n for n, p in meta.named_parameters() if p.requires_grad} == {
        n for n, p in ordinary.named_parameters() if p.requires_grad
    }
    if family == "gpt2":
        assert meta.lm_head.weight is meta.transformer.wte.weight
    ids = torch.arange(12).view(2, 6)
    with torch.no_grad():
        assert torch.equal(meta(input_ids=ids).logits, ordinary(input_ids=ids).logits)
        with lorakit.disable_adapters(meta):
            base_logits = meta(input_ids=ids).logits
    assert not torch.allclose(base_logits, ordinary(input_ids=ids).logits), "the adapters must change the outputs"


def test_a_checkpoint_that_lacks_a_parameter_is_refused_and_nothing_changes(tmp_path):
    model_class, config, modules_to_save = FAMILIES["llama"]
    torch.manual_seed(0)
    state = model_class(config).state_dict()
    del state["model.layers.1.mlp.down_proj.weight"]
    state["model.layers.0.self_attn.q_proj.weight"] = state["model.layers.0.self_attn.q_proj.weight"][:, :-1]
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "model.safetensors")
    with torch.device("meta"):
        meta = model_class(config)
    lorakit.get_lora_model(meta, lora_config(modules_to_save))
    with pytest.raises(lorakit.LoraError) as raised:
        lorakit.materialize(meta, tmp_path)
    message = str(raised.value)
    assert "lacks ['model.layers.1.mlp.down_proj.weight'], which would be left on the meta device" in message
    assert "'model.layers.0.self_attn.q_proj.weight' has shape [32, 31]" in message
    assert message.endswith("nothing was changed")
    assert meta.model.layers[0].self_attn.q_proj.base_layer.weight.is_meta


def test_a_buffer_no_checkpoint_holds_and_no_model_code_computes_is_refused(tmp_path):
    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(4, 4)
            self.register_buffer("scale", torch.full((4,), 2.0), persistent=False)

    torch.manual_seed(0)
    save_file(Scaled().state_dict(), tmp_path / "model.safetensors")
    with torch.device("meta"):
        meta = Scaled()
    lorakit.get_lora_model(meta, lorakit.LoraConfig(r=2, target_modules=["proj"]))
    with pytest.raises(lorakit.LoraError, match=r"lacks \['scale' \(a buffer\)\].*off the meta device"):
        lorakit.materialize(meta, tmp_path / "model.safetensors")

    with torch.device("meta"):  # built with the buffer real: it keeps its value
        meta = Scaled()
    meta.scale = torch.full((4,), 2.0)
    lorakit.get_lora_model(meta, lorakit.LoraConfig(r=2, target_modules=["proj"]))
    lorakit.materialize(meta, tmp_path / "model.safetensors")
    assert torch.equal(meta.scale, torch.full((4,), 2.0))


@pytest.mark.parametrize(
    "fields, needs",
    [
        ({"use_dora": True}, "use_dora=True"),
        ({"init_lora_weights": "pissa"}, "init_lora_weights='pissa'"),
        ({"init_lora_weights": "olora"}, "init_lora_weights='olora'"),
    ],
)
def test_adapters_that_start_from_the_base_weights_are_refused_on_meta(fields, needs):
    with torch.device("meta"):
        meta = nn.Sequential(nn.Linear(8, 8))
    config = lorakit.LoraConfig(r=2, target_modules=["0"], **fields)
    with pytest.raises(lorakit.LoraError, match=f"{needs}.*needs the base weights.*on the meta device"):
        lorakit.get_lora_model(meta, config)
    assert type(meta[0]) is nn.Linear, "the failed conversion is undone"


def test_a_custom_layer_that_makes_its_adapter_on_meta_is_refused():
    class Scale(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.ones(4, 4))

        def forward(self, x):
            return x @ self.weight

    class LoraScale(lorakit.LoraLayer):
        def __init__(self, base_layer):
            super().__init__(base_layer)
            self.lora_A, self.lora_B = nn.ModuleDict(), nn.ModuleDict()

        def create_adapter(self, name, r, config):
            self.lora_A[name] = nn.Linear(4, r, bias=False, device=self.base_layer.weight.device)
            self.lora_B[name] = nn.Linear(r, 4, bias=False, device=self.base_layer.weight.device)

    lorakit.register_lora_layer(Scale, LoraScale)
    with torch.device("meta"):
        meta = nn.Sequential(Scale())
    with pytest.raises(lorakit.LoraError, match=r"create_adapter made 'lora_A.weight'.*adapter_factory"):
        lorakit.get_lora_model(meta, lorakit.LoraConfig(r=2, target_modules=["0"]))


def test_bad_checkpoints_and_models_are_refused(tmp_path):
    with torch.device("meta"):
        meta = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(lorakit.LoraError, match=r"is neither a \.safetensors file nor a directory with"):
        lorakit.materialize(meta, tmp_path)
    index = {"metadata": {}, "weight_map": {"0.weight": "../elsewhere.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(lorakit.LoraError, match=r"names '\.\./elsewhere\.safetensors', not a \.safetensors file in"):
        lorakit.materialize(meta, tmp_path)
    index["weight_map"] = {"0.weight": "model-00001-of-00002.safetensors"}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(lorakit.LoraError, match=r"names \['model-00001-of-00002.safetensors'\], missing in"):
        lorakit.materialize(meta, tmp_path)
    (tmp_path / "model.safetensors.index.json").unlink()
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(lorakit.LoraError, match="is not a valid safetensors file"):
        lorakit.materialize(meta, tmp_path)
    with pytest.raises(lorakit.LoraError, match="no parameter or buffer of Sequential is on the meta device"):
        lorakit.materialize(nn.Sequential(nn.Linear(4, 4)), tmp_path)
