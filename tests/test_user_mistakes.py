"""Mistakes a new user makes, each answered by one documented rule and a `LoraError` that says what to do.

Found by trying lorakit as a newcomer would; every test here failed on the code before the fix.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from tiny_models import tiny_bert, tiny_llama
from transformers import LlamaForCausalLM

import lorakit
from lorakit import AdapterError, LoraConfig, LoraConfigError, LoraError, TargetError

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


# ----- adapter state ------------------------------------------------------------------------------------------


def two_adapter_llama() -> LlamaForCausalLM:
    model = lorakit.get_lora_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    lorakit.add_adapter(model, "other", LoraConfig(r=2, target_modules=["v_proj"], init_lora_weights=False))
    return model


def test_deleting_the_only_active_adapter_is_refused_and_names_the_fix():
    model = two_adapter_llama()
    with pytest.raises(AdapterError, match=r"only active adapter.*set_active_adapters\(model, 'other'\)"):
        lorakit.delete_adapter(model, "default")
    assert lorakit.adapter_names(model) == ["default", "other"] and lorakit.active_adapters(model) == ["default"]


def test_deleting_the_last_adapter_is_refused_and_points_to_unload():
    model = lorakit.get_lora_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(AdapterError, match=r"last adapter; lorakit.unload\(model\)"):
        lorakit.delete_adapter(model, "default")
    assert lorakit.adapter_names(model) == ["default"]


def test_deleting_one_of_several_active_adapters_keeps_the_others():
    model = two_adapter_llama()
    lorakit.set_active_adapters(model, ["default", "other"])
    lorakit.delete_adapter(model, "default")
    assert lorakit.active_adapters(model) == ["other"]
    ids = torch.randint(0, 64, (1, 5))
    with torch.no_grad():
        with_other = model(input_ids=ids).logits
        with lorakit.disable_adapters(model):
            assert not torch.allclose(model(input_ids=ids).logits, with_other)  # "other" still runs


@pytest.mark.parametrize("train_head", [False, True])
def test_a_training_forward_while_merged_is_refused(train_head):
    model = lorakit.get_lora_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    if train_head:
        model.lm_head.weight.requires_grad_(True)  # before, only the head trained and nothing said so
    lorakit.merge(model)
    model.train()
    with pytest.raises(LoraError, match=r"merged into this Linear's weights.*lorakit.unmerge\(model\)"):
        model(input_ids=torch.randint(0, 64, (1, 5)))
    with torch.no_grad():
        model(input_ids=torch.randint(0, 64, (1, 5)))  # inference while merged is what merging is for
    lorakit.unmerge(model)
    model(input_ids=torch.randint(0, 64, (1, 5))).logits.sum().backward()


def test_a_frozen_merged_adapter_under_a_trained_head_is_allowed():
    model = lorakit.get_lora_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"]))
    lorakit.add_adapter(model, "frozen", LoraConfig(r=2, target_modules=["v_proj"]), trainable=False)
    lorakit.set_active_adapters(model, "frozen")
    lorakit.merge(model)
    model.lm_head.weight.requires_grad_(True)
    model.train()
    model(input_ids=torch.randint(0, 64, (1, 5))).logits.sum().backward()
    assert model.lm_head.weight.grad is not None


def test_training_a_model_loaded_frozen_names_trainable_true(tmp_path):
    source = lorakit.get_lora_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"]))
    lorakit.save_adapter(source, tmp_path)
    model = lorakit.load_adapter(tiny_llama(), tmp_path)  # trainable=False, the default
    model.train()
    torch.optim.AdamW(model.parameters(), lr=1e-3)  # holds only frozen parameters: torch says nothing
    with pytest.warns(UserWarning, match=r"load_adapter\(\.\.\., trainable=False\), the default.*trainable=True"):
        loss = model(input_ids=torch.randint(0, 64, (1, 5))).logits.sum()
    with pytest.raises(RuntimeError, match="does not require grad"):
        loss.backward()  # torch's own words, which the warning above explains
    trained = lorakit.load_adapter(tiny_llama(), tmp_path, trainable=True).train()
    trained(input_ids=torch.randint(0, 64, (1, 5))).logits.sum().backward()


def test_the_frozen_load_check_steps_aside_once_something_trains(tmp_path):
    source = lorakit.get_lora_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"]))
    lorakit.save_adapter(source, tmp_path)
    model = lorakit.load_adapter(tiny_llama(), tmp_path).train()
    model.lm_head.weight.requires_grad_(True)  # a head trained on a frozen adapter
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(input_ids=torch.randint(0, 64, (1, 5))).logits.sum().backward()
        model.lm_head.weight.requires_grad_(False)  # the user's own choice from here on
        model(input_ids=torch.randint(0, 64, (1, 5)))


# ----- files, dtypes ---------------------------------------------------------------------------------------------


def test_saving_to_a_path_that_is_a_file_is_a_lora_error(tmp_path):
    model = lorakit.get_lora_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"]))
    blocker = tmp_path / "adapter"
    blocker.write_text("not a directory")
    with pytest.raises(LoraError, match="cannot write the adapter"):
        lorakit.save_adapter(model, blocker)
    with pytest.raises(LoraError, match="cannot write the adapter"):
        lorakit.save_adapter(model, blocker / "inside")
    assert blocker.read_text() == "not a directory"


def test_casting_the_model_casts_the_adapters_and_converting_after_keeps_float32_masters():
    model = lorakit.get_lora_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    model.to(torch.bfloat16)  # torch casts every parameter; lorakit follows, as the README says
    assert {p.dtype for p in lorakit.lora_state_dict(model).values()} == {torch.bfloat16}
    ids = torch.randint(0, 64, (1, 5))
    with torch.no_grad():
        before = model(input_ids=ids).logits
        lorakit.merge(model)
        torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=0.05, atol=0.05)
        lorakit.unmerge(model)
        assert torch.equal(model(input_ids=ids).logits, before)

    cast_first = lorakit.get_lora_model(tiny_llama().to(torch.bfloat16), LoraConfig(r=4, target_modules=["q_proj"]))
    assert {p.dtype for p in lorakit.lora_state_dict(cast_first).values()} == {torch.float32}
