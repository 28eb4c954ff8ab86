"""Every error lorakit raises on bad input is a `LoraError`, as the README promises: this walks the public API
with bad arguments (wrong types, unknown names, impossible requests) and checks the type of what comes back."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_llama
from torch import nn
from transformers import LlamaForCausalLM

import lorakit
from lorakit import LoraConfig, XLoraConfig
from lorakit.layers.exact import merge_exactly


def lora_llama() -> LlamaForCausalLM:
    return lorakit.get_lora_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))


CONFIG = LoraConfig(r=4, target_modules=["q_proj"])

# (what is wrong, the call); each call builds what it needs, so one failing case cannot leak into the next
BAD_CALLS: list[tuple[str, Callable[[Path], object]]] = [
    ("config: unknown field", lambda _: LoraConfig(rank=4)),
    ("config: r of the wrong type", lambda _: LoraConfig(r="4")),
    ("config: dropout out of range", lambda _: LoraConfig(lora_dropout=1.5)),
    ("config: target of the wrong type", lambda _: LoraConfig(target_modules=5)),
    ("config: from_dict of a list", lambda _: LoraConfig.from_dict(["r", 4])),
    ("config: an unsupported peft feature", lambda _: LoraConfig(use_qalora=True)),
    ("convert: not a module", lambda _: lorakit.get_lora_model("a model", CONFIG)),
    ("convert: not a config", lambda _: lorakit.get_lora_model(tiny_llama(), {"r": 4})),
    ("convert: adapter name of the wrong type", lambda _: lorakit.get_lora_model(tiny_llama(), CONFIG, 3)),
    ("convert: twice", lambda _: lorakit.get_lora_model(lora_llama(), CONFIG)),
    (
        "convert: a target that matches nothing",
        lambda _: lorakit.get_lora_model(tiny_llama(), LoraConfig(target_modules=["nope"])),
    ),
    (
        "convert: an unsupported module type",
        lambda _: lorakit.get_lora_model(tiny_llama(), LoraConfig(target_modules=["input_layernorm"])),
    ),
    ("add: to a plain model", lambda _: lorakit.add_adapter(tiny_llama(), "b", CONFIG)),
    ("add: an existing name", lambda _: lorakit.add_adapter(lora_llama(), "default", CONFIG)),
    ("add: the reserved name", lambda _: lorakit.add_adapter(lora_llama(), "__base__", CONFIG)),
    ("add: not a config", lambda _: lorakit.add_adapter(lora_llama(), "b", None)),
    ("activate: a number", lambda _: lorakit.set_active_adapters(lora_llama(), 5)),
    ("activate: an unknown name", lambda _: lorakit.set_active_adapters(lora_llama(), "nope")),
    ("activate: nothing", lambda _: lorakit.set_active_adapters(lora_llama(), [])),
    ("activate: a name twice", lambda _: lorakit.set_active_adapters(lora_llama(), ["default", "default"])),
    ("delete: a number", lambda _: lorakit.delete_adapter(lora_llama(), 5)),
    ("delete: an unknown name", lambda _: lorakit.delete_adapter(lora_llama(), "nope")),
    ("delete: the last adapter", lambda _: lorakit.delete_adapter(lora_llama(), "default")),
    ("merge: a number", lambda _: lorakit.merge(lora_llama(), 5)),
    ("merge: a plain model", lambda _: lorakit.merge(tiny_llama())),
    ("unmerge: a plain model", lambda _: lorakit.unmerge(tiny_llama())),
    ("merge_and_unload: a plain model", lambda _: lorakit.merge_and_unload(tiny_llama())),
    ("unload: a plain model", lambda _: lorakit.unload(tiny_llama())),
    ("dequantize: not a module", lambda _: lorakit.dequantize("a model")),
    ("dequantize: an integer dtype", lambda _: lorakit.dequantize(tiny_llama(), dtype=torch.int8)),
    ("dequantize: a dtype name", lambda _: lorakit.dequantize(tiny_llama(), dtype="bfloat16")),
    ("prepare for k-bit training: not a module", lambda _: lorakit.prepare_model_for_kbit_training(None)),
    ("LoRA+: a plain model", lambda _: lorakit.lora_plus_param_groups(tiny_llama(), lr=1e-3)),
    ("LoRA+: a learning rate of zero", lambda _: lorakit.lora_plus_param_groups(lora_llama(), lr=0.0)),
    ("weighted: a plain model", lambda _: lorakit.add_weighted_adapter(tiny_llama(), ["default"], [1.0], "mix")),
    (
        "weighted: an unknown adapter",
        lambda _: lorakit.add_weighted_adapter(lora_llama(), ["default", "nope"], [1.0, 1.0], "mix"),
    ),
    (
        "weighted: an unknown combination type",
        lambda _: lorakit.add_weighted_adapter(lora_llama(), ["default"], [1.0], "mix", combination_type="mean"),
    ),
    ("disable: a plain model", lambda _: lorakit.disable_adapters(tiny_llama()).__enter__()),
    (
        "merge_exactly: an integer weight",
        lambda _: merge_exactly(torch.zeros(2, 2, dtype=torch.int8), torch.ones(2, 2)),
    ),
    ("state dict: an unknown adapter", lambda _: lorakit.lora_state_dict(lora_llama(), "nope")),
    ("trainable parameters: not a module", lambda _: lorakit.trainable_parameters("a model")),
    ("lora layers: not a module", lambda _: list(lorakit.lora_layers(None))),
    ("summary: a plain model", lambda _: lorakit.summary(tiny_llama())),
    ("adapter names: a plain model", lambda _: lorakit.adapter_names(tiny_llama())),
    ("active adapters: a plain model", lambda _: lorakit.active_adapters(tiny_llama())),
    ("summary: an unknown adapter", lambda _: lorakit.summary(lora_llama())["nope"]),
    ("save: a path of the wrong type", lambda _: lorakit.save_adapter(lora_llama(), 5)),
    ("save: an unknown adapter", lambda tmp: lorakit.save_adapter(lora_llama(), tmp, "nope")),
    ("save: a plain model", lambda tmp: lorakit.save_adapter(tiny_llama(), tmp)),
    ("save: into a file", lambda tmp: lorakit.save_adapter(lora_llama(), (tmp / "f").write_text("x") and tmp / "f")),
    ("save_pretrained: a path of the wrong type", lambda _: lora_llama().save_pretrained(None)),
    ("save_pretrained: an unknown adapter", lambda tmp: lora_llama().save_pretrained(tmp, selected_adapters=["x"])),
    ("load: a path of the wrong type", lambda _: lorakit.load_adapter(tiny_llama(), 5)),
    ("load: a missing directory", lambda tmp: lorakit.load_adapter(tiny_llama(), tmp / "missing")),
    ("load: not a module", lambda tmp: lorakit.load_adapter("a model", lorakit.save_adapter(lora_llama(), tmp))),
    ("load: an existing name", lambda tmp: lorakit.load_adapter(lora_llama(), lorakit.save_adapter(lora_llama(), tmp))),
    ("read config: a path of the wrong type", lambda _: lorakit.read_adapter_config(3.5)),
    ("hot swap: an unknown slot", lambda tmp: lorakit.hot_swap_adapter(lora_llama(), tmp, "nope")),
    ("hot swap: a path of the wrong type", lambda _: lorakit.hot_swap_adapter(lora_llama(), 5)),
    ("mixed batch: not a list", lambda _: lorakit.mixed_batch(lora_llama().eval(), 5).__enter__()),
    ("mixed batch: an unknown name", lambda _: lorakit.mixed_batch(lora_llama().eval(), ["nope"]).__enter__()),
    ("mixed batch: training mode", lambda _: lorakit.mixed_batch(lora_llama().train(), ["default"]).__enter__()),
    ("register: not a module type", lambda _: lorakit.register_lora_layer(int, lorakit.LoraLinear)),
    ("register: not a LoRA layer type", lambda _: lorakit.register_lora_layer(nn.Linear, nn.Linear)),
    ("xlora config: unknown field", lambda _: XLoraConfig(depth=2)),
    ("xlora config: dropout of the wrong type", lambda _: XLoraConfig(xlora_dropout_p="0.1")),
    ("xlora config: adapters of the wrong type", lambda _: XLoraConfig(adapters=5)),
    ("xlora: not a config", lambda _: lorakit.get_xlora_model(tiny_llama(), {"xlora_depth": 1})),
    ("xlora: adapters of the wrong type", lambda _: lorakit.get_xlora_model(tiny_llama(), XLoraConfig(), adapters=5)),
    ("xlora: no experts", lambda _: lorakit.get_xlora_model(tiny_llama(), XLoraConfig())),
    ("xlora: not a module", lambda _: lorakit.get_xlora_model("a model", XLoraConfig(adapters={"a": None}))),
    ("save xlora: a plain model", lambda tmp: lorakit.save_xlora(tiny_llama(), tmp)),
    ("load xlora: a path of the wrong type", lambda _: lorakit.load_xlora(tiny_llama(), 5)),
    ("load xlora: an empty directory", lambda tmp: lorakit.load_xlora(tiny_llama(), tmp)),
    ("export xlora: a plain model", lambda tmp: lorakit.export_xlora_mistralrs(tiny_llama(), tmp, "base")),
    ("latest scalings: a plain model", lambda _: lorakit.latest_scalings(tiny_llama())),
    ("remove xlora: a plain model", lambda _: lorakit.remove_xlora(tiny_llama())),
    ("materialize: not a module", lambda tmp: lorakit.materialize("model", tmp)),
    ("materialize: nothing on meta", lambda tmp: lorakit.materialize(tiny_llama(), tmp)),
]


@pytest.mark.parametrize(("wrong", "call"), BAD_CALLS, ids=[wrong for wrong, _ in BAD_CALLS])
def test_bad_input_is_a_lora_error(wrong, call, tmp_path):
    with pytest.raises(Exception) as raised:  # any type: which one is what the test checks
        call(tmp_path)
    assert isinstance(raised.value, lorakit.LoraError), f"{wrong}: {type(raised.value).__name__}: {raised.value}"
    assert str(raised.value), f"{wrong}: an empty message"


def test_the_walk_covers_every_public_function():
    """A new public function must join the walk above (or this list, if it takes no input that can be wrong)."""
    takes_no_bad_input = {"is_lora_model"}  # any object: answers False
    source = Path(__file__).read_text()
    for name in lorakit.__all__:
        value = getattr(lorakit, name)
        if not callable(value) or isinstance(value, type) or name in takes_no_bad_input:
            continue
        assert f"lorakit.{name}(" in source, f"lorakit.{name} is not walked with bad input"
