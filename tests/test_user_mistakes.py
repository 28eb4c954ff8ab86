"""Mistakes a new user makes, each answered by one documented rule and a `LoraError` that says what to do.

Found by trying lorakit as a newcomer would; every test here failed on the code before the fix.
"""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

import lorakit
from lorakit import LoraConfig, LoraConfigError, TargetError


def tiny_bert() -> BertForSequenceClassification:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        max_position_embeddings=32, num_labels=3,
    )  # fmt: skip
    return BertForSequenceClassification(config)


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32,
    )  # fmt: skip
    return LlamaForCausalLM(config)


# ----- what the user typed ---------------------------------------------------------------------------------


def test_a_misspelt_field_is_an_error_naming_the_right_one():
    with pytest.raises(LoraConfigError, match="did you mean 'target_modules'"):
        LoraConfig(target_module=["query"])


def test_every_entry_of_a_target_list_must_match_a_module():
    model = tiny_bert()
    with pytest.raises(TargetError, match=r"entries \['v_proj'\] matched no module") as raised:
        lorakit.get_lora_model(model, LoraConfig(target_modules=["query", "v_proj"]))
    endings = "classifier, dense, key, position_embeddings, query, token_type_embeddings, value, word_embeddings"
    assert f"Name endings of the modules lorakit can adapt here: {endings}" in str(raised.value)
    assert not lorakit.is_lora_model(model) and not list(lorakit.lora_layers(model))


def test_a_string_target_is_explained_as_a_whole_name_regex():
    with pytest.raises(TargetError) as raised:
        lorakit.get_lora_model(tiny_bert(), LoraConfig(target_modules="query"))
    message = str(raised.value)
    assert "regular expression that must match a module's whole name" in message
    assert "target_modules=['query']" in message
    assert "bert.encoder.layer." in message  # an example of a whole name


@pytest.mark.parametrize("layers", [[99], [0, 99], 7])
def test_layers_to_transform_errors_name_the_field_and_the_layers(layers):
    with pytest.raises(TargetError) as raised:
        lorakit.get_lora_model(tiny_bert(), LoraConfig(target_modules=["query"], layers_to_transform=layers))
    message = str(raised.value)
    assert message.startswith(f"layers_to_transform={layers}")
    assert "its layers are 0–2" in message
    assert "target_modules=" not in message.split(":")[0]


def test_layers_pattern_that_finds_no_index_is_named():
    with pytest.raises(TargetError, match="layers_pattern='blocks' finds none"):
        lorakit.get_lora_model(
            tiny_bert(), LoraConfig(target_modules=["query"], layers_to_transform=[0], layers_pattern="blocks")
        )


def test_a_file_config_written_for_a_sibling_model_still_loads(tmp_path):
    """Lenient where a file came from: entries and layers that select nothing here are dropped, not refused."""
    source = lorakit.get_lora_model(tiny_bert(), LoraConfig(target_modules=["query"], layers_to_transform=[0, 1]))
    lorakit.save_adapter(source, tmp_path)
    config_path = tmp_path / "adapter_config.json"
    import json

    written = json.loads(config_path.read_text())
    written["target_modules"] = ["query", "q_proj"]  # q_proj: a Llama name, nothing here
    written["layers_to_transform"] = [0, 1, 5]
    config_path.write_text(json.dumps(written))
    model = lorakit.load_adapter(tiny_bert(), tmp_path)
    assert sorted(name for name, _ in lorakit.lora_layers(model)) == [
        "bert.encoder.layer.0.attention.self.query",
        "bert.encoder.layer.1.attention.self.query",
    ]
