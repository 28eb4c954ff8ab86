"""`summary(model)`: per-adapter and model-wide counts and state, checked against independent counts."""

from __future__ import annotations

import dataclasses

import pytest
from tiny_models import tiny_llama
from torch import nn
from transformers import LlamaForCausalLM

import lorakit
from lorakit import AdapterError, LoraConfig, LoraError
from lorakit.summary import AdapterSummary, ModelSummary, Span, summary

SMALL = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.05, target_modules=["q_proj", "v_proj"])
BIG = LoraConfig(
    r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "embed_tokens"],
    rank_pattern={"o_proj": 16}, modules_to_save=["lm_head"],
)  # fmt: skip


def two_adapters() -> LlamaForCausalLM:
    """The docstring's model: "small" (active) and "big" (inactive, rank_pattern, embedding, lm_head copy)."""
    model = lorakit.get_lora_model(tiny_llama(), SMALL, "small")
    lorakit.add_adapter(model, "big", BIG)
    return model


def counted(model: nn.Module, adapter: str) -> tuple[int, int]:
    """(all, requires_grad) numel of the parameters whose name holds `adapter` as a path component."""
    params = [p for n, p in model.named_parameters() if adapter in n.split(".")]
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


def model_counts(model: nn.Module) -> tuple[int, int]:
    params = list(model.parameters())  # shared parameters once
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def test_two_adapters_fields():
    model = two_adapters()
    result = summary(model)
    assert isinstance(result, ModelSummary)
    assert result.model == "LlamaForCausalLM"
    assert [a.name for a in result.adapters] == ["small", "big"]
    assert result.active == ("small",)
    assert result.lora_layers == len(list(lorakit.lora_layers(model))) == 9  # 4 projections × 2 + embed_tokens
    assert (result.trainable_parameters, result.total_parameters) == model_counts(model)
    assert result.trainable_percent == pytest.approx(100 * result.trainable_parameters / result.total_parameters)
    assert result.merge_residual_bytes == 0

    small, big = result["small"], result["big"]
    # small: q_proj 32→32 and v_proj 32→16 (2 kv heads × 8), rank 4, in 2 layers
    assert small.parameters == 2 * (4 * 32 + 32 * 4 + 4 * 32 + 16 * 4) == 896
    assert (small.parameters, small.trainable_parameters) == counted(model, "small")
    assert (big.parameters, big.trainable_parameters) == counted(model, "big")
    assert big.trainable_parameters == 0 and big.trainable == "none"
    assert small.trainable == "all"
    assert result.trainable_parameters == small.parameters  # only the active adapter trains

    assert (small.targets, small.module_kinds) == (4, {"Linear": 4})
    assert (big.targets, big.module_kinds) == (9, {"Embedding": 1, "Linear": 8})
    assert small.rank == Span(4, 4) and small.rank.uniform
    assert big.rank == Span(8, 16) and not big.rank.uniform
    assert (small.lora_alpha, small.scaling) == (Span(8, 8), Span(2, 2))
    assert (big.lora_alpha, big.scaling) == (Span(16, 16), Span(1, 2))
    assert (small.dropout, big.dropout) == (0.05, 0.0)
    assert (small.modules_to_save, big.modules_to_save) == ((), ("lm_head",))
    assert (small.active, big.active) == (True, False)
    for adapter in (small, big):
        assert (adapter.merged_layers, adapter.merged) == (0, "none")
        assert (adapter.disabled_layers, adapter.disabled) == (0, "none")


def test_str_has_the_peft_line_and_every_adapter():
    model = two_adapters()
    trainable, total = model_counts(model)
    text = str(summary(model))
    lines = text.splitlines()
    percent = 100 * trainable / total
    assert lines[-1] == f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {percent:.4f}"
    assert lines[-1] == "trainable params: 896 || all params: 27,936 || trainable%: 3.2073"
    small = next(line for line in lines if line.startswith("small "))
    big = next(line for line in lines if line.startswith("big "))
    assert " 4 " in small and " 896 " in small
    assert "8–16" in big and "7,424" in big and "lm_head" in big and "Embedding×1, Linear×8" in big
    assert "disabled" not in lines[1]  # nothing is disabled: the column is left out
    widths = {len(line) for line in lines[1:-1]}
    assert len(widths) <= 3  # an aligned table (rows only differ by stripped trailing blanks)


def test_str_matches_peft_print_trainable_parameters(capsys):
    import peft

    base = tiny_llama()
    config = dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "embed_tokens"], modules_to_save=["lm_head"])
    reference = peft.get_peft_model(tiny_llama(), peft.LoraConfig(rank_pattern={"v_proj": 4}, **config))
    model = lorakit.get_lora_model(base, LoraConfig(rank_pattern={"v_proj": 4}, **config))
    reference.print_trainable_parameters()
    printed = capsys.readouterr().out.strip()
    result = summary(model)
    assert result.peft_line == printed
    assert str(result).splitlines()[-1] == printed
    assert result["default"].rank == Span(4, 8)


def test_docstring_example_is_real():
    model = two_adapters()
    lorakit.merge(model)
    doc = summary.__doc__
    expected = doc[doc.index(">>> print(lorakit.summary(model))") :].splitlines()[1:]
    expected = "\n".join(line.strip() for line in expected if line.strip())
    assert str(summary(model)) == expected


def test_merged_all_and_some():
    model = two_adapters()
    lorakit.merge(model)
    result = summary(model)
    assert (result["small"].merged, result["small"].merged_layers) == ("all", 4)
    assert result["big"].merged == "none"
    assert result.merge_residual_bytes == sum(layer.merge_residual_bytes() for _, layer in lorakit.lora_layers(model))
    assert result.merge_residual_bytes > 0
    assert next(line for line in str(result).splitlines() if line.startswith("small ")).split()[-3] == "yes"

    lorakit.unmerge(model)
    _, layer = next((n, layer) for n, layer in lorakit.lora_layers(model) if "small" in layer.r)
    layer.merge(["small"])  # one layer of four
    small = summary(model)["small"]
    assert (small.merged, small.merged_layers, small.targets) == ("some", 1, 4)
    assert "1 of 4 layers" in str(summary(model))


def test_active_trainable_and_disabled_states():
    model = two_adapters()
    lorakit.set_active_adapters(model, ["big", "small"])
    result = summary(model)
    assert result.active == ("big", "small")
    assert all(a.active and a.trainable == "all" for a in result.adapters)
    assert result.trainable_parameters == model_counts(model)[0] == 896 + 7424
    assert "active: big, small" in str(result)

    with lorakit.disable_adapters(model):
        inside = summary(model)
        assert all(a.disabled == "all" and a.disabled_layers == a.targets for a in inside.adapters)
        assert "disabled" in str(inside).splitlines()[1]
    assert all(a.disabled == "none" for a in summary(model).adapters)

    frozen = lorakit.get_lora_model(tiny_llama(), SMALL, "small")
    lorakit.add_adapter(frozen, "fixed", SMALL, trainable=False)
    lorakit.set_active_adapters(frozen, ["small", "fixed"])
    fixed = summary(frozen)["fixed"]
    assert (fixed.active, fixed.trainable, fixed.trainable_parameters) == (True, "none", 0)
    assert fixed.parameters == 896

    layer = next(layer for _, layer in lorakit.lora_layers(model) if "small" in layer.r)
    layer.adapter_parameters("small")["lora_A.weight"].requires_grad_(False)
    partly = summary(model)["small"]
    assert partly.trainable == "some"
    assert partly.trainable_parameters == counted(model, "small")[1] < partly.parameters
    assert "of 896 params" in str(summary(model))


def test_trained_biases_count_with_the_adapter():
    model = lorakit.get_lora_model(tiny_llama(attention_bias=True), SMALL.replace(bias="lora_only"), "small")
    small = summary(model)["small"]
    biases = sum(p.numel() for n, p in model.named_parameters() if n.endswith("base_layer.bias"))
    assert biases == 2 * (32 + 16)
    assert small.parameters == 896 + biases
    assert small.trainable == "all"
    assert summary(model).trainable_parameters == model_counts(model)[0] == 896 + biases


def test_shared_parameters_count_once():
    model = lorakit.get_lora_model(tiny_llama(tie_word_embeddings=True), SMALL)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    result = summary(model)
    every = sum(p.numel() for _, p in model.named_parameters(remove_duplicate=False))
    assert result.total_parameters == model_counts(model)[1] == every - 64 * 32
    assert (result.trainable_parameters, result.total_parameters) == lorakit.trainable_parameters(model)


def test_span_and_data():
    assert (str(Span(4, 4)), str(Span(4, 16)), str(Span(0.5, 2.0)), str(Span(1 / 3, 1 / 3))) == (
        "4", "4–16", "0.5–2", "0.3333",
    )  # fmt: skip
    result = summary(two_adapters())
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.total_parameters = 0
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.adapters[0].name = "other"
    assert isinstance(result.adapters[0], AdapterSummary)
    with pytest.raises(AdapterError, match="unknown adapter 'nope'"):
        result["nope"]


def test_not_a_lora_model():
    with pytest.raises(LoraError, match="not a LoRA model"):
        summary(tiny_llama())
    model = lorakit.get_lora_model(tiny_llama(), SMALL)
    lorakit.unload(model)
    with pytest.raises(LoraError, match="not a LoRA model"):
        summary(model)
