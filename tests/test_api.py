"""Model-wide behaviour: conversion, targets, adapters, merge semantics, training, errors."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import tiny_llama
from torch import nn
from transformers import BertConfig, BertForSequenceClassification, LlamaForCausalLM

import lorakit
from lorakit import AdapterError, LoraConfig, LoraConfigError, LoraError, MergeError, TargetError


def lora_names(model: nn.Module) -> list[str]:
    return [name for name, _ in lorakit.lora_layers(model)]


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(8, 16)
        self.act = nn.GELU()
        self.down = nn.Linear(16, 4)
        self.norm = nn.LayerNorm(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.down(self.act(self.up(x))))


# ----- LoraConfig ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"r": 0}, "r must be a positive integer, got 0"),
        ({"r": -3}, "r must be a positive integer, got -3"),
        ({"r": 2.5}, "r must be a positive integer, got 2.5"),
        ({"lora_alpha": 0}, "lora_alpha must be a positive finite number, got 0"),
        ({"lora_alpha": -1.0}, "lora_alpha must be a positive finite number"),
        ({"lora_dropout": 1.0}, "lora_dropout must be a number in [0, 1), got 1.0"),
        ({"lora_dropout": -0.1}, "lora_dropout must be a number in [0, 1)"),
        ({"init_lora_weights": "mica"}, "init_lora_weights='mica' (MiCA"),
        ({"init_lora_weights": "pissa_niter_four"}, "'pissa_niter_<k>' (k iterations of a randomized SVD)"),
        ({"init_lora_weights": "corda"}, "(CorDA: A and B from the covariance of data, which needs a data loader"),
        ({"init_lora_weights": "kaiming"}, "init_lora_weights must be True, False, 'gaussian', 'pissa', "),
        ({"bias": "some"}, "bias must be one of ('none', 'all', 'lora_only'), got 'some'"),
        ({"rank_pattern": {"q_proj": 0}}, "rank_pattern['q_proj'] must be a positive integer"),
        ({"alpha_pattern": {"q_proj": -2}}, "alpha_pattern['q_proj'] must be a positive finite number"),
        ({"target_modules": [1, 2]}, "target_modules must be a string, a list of strings or None"),
        ({"layers_to_transform": "0"}, "layers_to_transform must be an int or a list of ints"),
        ({"use_dora": "yes"}, "use_dora must be True or False, got 'yes'"),
        ({"peft_type": "LOHA"}, "peft_type is 'LOHA'"),
        ({"layer_replication": [[0, 2]]}, "layer_replication"),
    ],
)
def test_config_rejects_bad_values(fields, message):
    with pytest.raises(LoraConfigError) as raised:
        LoraConfig(**fields)
    assert message in str(raised.value)
    assert isinstance(raised.value, LoraError)


def test_config_reads_a_peft_adapter_config():
    import peft

    written = peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], use_rslora=True).to_dict()
    written["peft_type"] = "LORA"
    config = LoraConfig(**written)
    assert (config.r, config.lora_alpha, config.use_rslora) == (4, 16, True)
    assert config.target_modules == ["q_proj", "v_proj"]


def test_config_in_code_refuses_an_unknown_field_and_names_the_closest():
    with pytest.raises(LoraConfigError, match=r"no field 'target_module' \(did you mean 'target_modules'\?\)"):
        LoraConfig(target_module=["query"])
    with pytest.raises(LoraConfigError, match="no field 'shiny_new_feature'"):
        LoraConfig(shiny_new_feature=True)


def test_config_from_a_file_warns_on_unknown_meaningful_fields():
    with pytest.warns(UserWarning, match="unknown fields: shiny_new_feature"):
        config = LoraConfig.from_dict({"r": 4, "shiny_new_feature": True, "quiet_new_feature": None})
    assert config.r == 4
    with pytest.raises(LoraConfigError, match="use_qalora=True"):
        LoraConfig.from_dict({"use_qalora": True})


def test_rank_and_alpha_patterns_use_first_matching_key():
    config = LoraConfig(r=8, lora_alpha=16, rank_pattern={r"layers\.0\.q": 2, "q": 4}, alpha_pattern={"v": 3})
    assert config.rank_for("model.layers.0.q") == 2
    assert config.rank_for("model.layers.1.q") == 4
    assert config.rank_for("model.layers.1.k") == 8
    assert config.alpha_for("x.v") == 3 and config.alpha_for("x.q") == 16
    assert LoraConfig(r=16, lora_alpha=8, use_rslora=True).scaling_for("a") == pytest.approx(2.0)


# ----- conversion and targets -------------------------------------------------------------------------


def test_conversion_is_in_place_and_keeps_the_class():
    model = tiny_llama()
    out = lorakit.get_lora_model(model, LoraConfig(target_modules=["q_proj", "v_proj"]))
    assert out is model and type(model) is LlamaForCausalLM
    assert lora_names(model) == [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A.default." in n or ".lora_B.default." in n for n in trainable)
    assert model.model.layers[0].self_attn.q_proj.weight is model.model.layers[0].self_attn.q_proj.base_layer.weight


def test_new_layers_and_adapters_follow_the_models_mode():
    """A model converted in eval mode runs without dropout: the wrappers and their new modules start in eval."""
    model = tiny_llama().eval()
    lorakit.get_lora_model(model, LoraConfig(r=4, lora_dropout=0.5, target_modules=["q_proj"], init_lora_weights=False))
    lorakit.add_adapter(model, "b", LoraConfig(r=2, target_modules=["q_proj", "up_proj"], modules_to_save=["lm_head"]))
    assert not any(module.training for module in model.modules())
    ids = torch.randint(0, 64, (1, 6))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, model(ids).logits)  # dropout p=0.5 would differ
    model.train()
    lorakit.add_adapter(model, "c", LoraConfig(r=2, target_modules=["k_proj"]))
    assert all(module.training for module in model.modules())


def test_inference_never_writes_into_an_output_someone_else_holds():
    """Without autograd the branch is added into nn.Linear's fresh output in place, but not when a hook on the
    base layer (or a subclass's forward) may hold that tensor: what the hook saw stays the base output."""
    model = nn.Sequential(nn.Linear(8, 8))
    lorakit.get_lora_model(model, LoraConfig(r=2, target_modules=["0"], init_lora_weights=False))
    x = torch.randn(3, 8)
    seen = []
    model[0].base_layer.register_forward_hook(lambda module, args, output: seen.append(output))
    with torch.no_grad():
        out = model(x)
        base = nn.functional.linear(x, model[0].base_layer.weight, model[0].base_layer.bias)
    assert torch.equal(seen[0], base) and not torch.allclose(out, base)


def test_all_linear_skips_the_output_embedding_and_is_saved_expanded():
    model = tiny_llama()
    lorakit.get_lora_model(model, LoraConfig(target_modules="all-linear"))
    names = lora_names(model)
    assert len(names) == 14 and "lm_head" not in names
    config = lorakit.model.lora_state(model).configs["default"]
    assert config.target_modules == sorted(names)


def test_regex_suffix_exclude_and_layers_to_transform():
    model = tiny_llama()
    lorakit.get_lora_model(
        model, LoraConfig(target_modules=r".*\.(q|k)_proj", exclude_modules=["layers.1.self_attn.k_proj"])
    )
    assert lora_names(model) == [
        "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.1.self_attn.q_proj",
    ]  # fmt: skip
    model = tiny_llama()
    lorakit.get_lora_model(model, LoraConfig(target_modules=["down_proj"], layers_to_transform=[1]))
    assert lora_names(model) == ["model.layers.1.mlp.down_proj"]


def test_family_defaults_table():
    model = tiny_llama()
    lorakit.get_lora_model(model, LoraConfig(target_modules=None))
    assert {n.rsplit(".", 1)[-1] for n in lora_names(model)} == {"q_proj", "v_proj"}
    expected = {"llama", "mistral", "falcon", "bert", "stablelm", "t5", "dinov2", "resnet", "mpt", "blip"}
    assert expected | {"gpt_bigcode"} <= set(lorakit.DEFAULT_TARGET_MODULES)
    with pytest.raises(TargetError, match="model_type=None"):
        lorakit.get_lora_model(MLP(), LoraConfig(target_modules=None))


def test_target_that_matches_nothing_lists_close_names():
    with pytest.raises(TargetError) as raised:
        lorakit.get_lora_model(tiny_llama(), LoraConfig(target_modules=["qproj"]))
    message = str(raised.value)
    assert "matched no module" in message and "q_proj" in message


def test_unsupported_target_type_names_the_type_and_register_lora_layer():
    with pytest.raises(TargetError) as raised:
        lorakit.get_lora_model(MLP(), LoraConfig(target_modules=["norm"]))
    assert "torch.nn.modules.normalization.LayerNorm" in str(raised.value)
    assert "register_lora_layer" in str(raised.value)


def test_failed_conversion_leaves_the_model_untouched():
    model = nn.Sequential(nn.Linear(4, 4), nn.Conv2d(4, 4, 3, groups=2))
    before = copy.deepcopy(model)
    with pytest.raises(LoraConfigError, match="not divisible by the conv's groups=2"):
        lorakit.get_lora_model(model, LoraConfig(r=3, target_modules=["0", "1"]))
    assert not lorakit.is_lora_model(model)
    assert [type(m) for m in model] == [nn.Linear, nn.Conv2d]
    assert all(
        torch.equal(a, b) for a, b in zip(model.state_dict().values(), before.state_dict().values(), strict=True)
    )
    assert all(p.requires_grad for p in model.parameters())


def test_shared_module_is_replaced_everywhere():
    shared = nn.Linear(4, 4)
    model = nn.ModuleDict({"a": shared, "b": nn.Sequential(shared)})
    lorakit.get_lora_model(model, LoraConfig(target_modules=["a"]))
    assert model["a"] is model["b"][0] and isinstance(model["a"], lorakit.LoraLinear)


def test_converting_twice_is_an_error():
    model = lorakit.get_lora_model(MLP(), LoraConfig(target_modules=["up"]))
    with pytest.raises(LoraError, match="already a LoRA model"):
        lorakit.get_lora_model(model, LoraConfig(target_modules=["up"]))


# ----- adapters -----------------------------------------------------------------------------------------


def test_adapters_add_activate_delete():
    torch.manual_seed(0)
    model = lorakit.get_lora_model(MLP(), LoraConfig(target_modules=["up", "down"], init_lora_weights=False))
    lorakit.add_adapter(model, "other", LoraConfig(r=2, target_modules=["down"], init_lora_weights=False))
    x = torch.randn(3, 8)
    with lorakit.disable_adapters(model):
        base = model(x)
    first = model(x)
    lorakit.set_active_adapters(model, "other")
    second = model(x)
    lorakit.set_active_adapters(model, ["default", "other"])
    both = model(x)
    assert not torch.allclose(first, second) and not torch.allclose(both, first)
    assert base.shape == first.shape
    assert {n for n, p in model.named_parameters() if p.requires_grad} >= {"down.lora_A.other.weight"}
    lorakit.set_active_adapters(model, "default")
    assert not model.down.lora_A["other"].weight.requires_grad
    lorakit.delete_adapter(model, "other")
    assert lorakit.adapter_names(model) == ["default"] and "other" not in model.down.lora_A


def test_several_active_adapters_add_up():
    torch.manual_seed(0)
    model = lorakit.get_lora_model(
        nn.Sequential(nn.Linear(8, 4)), LoraConfig(target_modules=["0"], init_lora_weights=False)
    )
    lorakit.add_adapter(model, "b", LoraConfig(r=3, lora_alpha=5, target_modules=["0"], init_lora_weights=False))
    x = torch.randn(5, 8)
    outputs = {}
    for names in (["default"], ["b"], ["default", "b"]):
        lorakit.set_active_adapters(model, names)
        outputs[tuple(names)] = model(x)
    with lorakit.disable_adapters(model):
        base = model(x)
    delta_a, delta_b = outputs[("default",)] - base, outputs[("b",)] - base
    assert delta_a.abs().min() > 0 and delta_b.abs().min() > 0
    torch.testing.assert_close(outputs[("default", "b")] - base, delta_a + delta_b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["default", "", "a.b", "__base__", 3])
def test_bad_or_duplicate_adapter_names(name):
    model = lorakit.get_lora_model(MLP(), LoraConfig(target_modules=["up"]))
    with pytest.raises(AdapterError):
        lorakit.add_adapter(model, name, LoraConfig(target_modules=["up"]))


def test_unknown_adapter_names_are_errors():
    model = lorakit.get_lora_model(MLP(), LoraConfig(target_modules=["up"]))
    for call in (
        lambda: lorakit.set_active_adapters(model, "nope"),
        lambda: lorakit.delete_adapter(model, "nope"),
        lambda: lorakit.merge(model, ["nope"]),
    ):
        with pytest.raises(AdapterError, match="unknown adapter 'nope'; this model has \\['default'\\]"):
            call()


def test_disable_adapters_restores_state_on_exception():
    torch.manual_seed(0)
    model = lorakit.get_lora_model(MLP(), LoraConfig(target_modules=["up"], init_lora_weights=False))
    x = torch.randn(2, 8)
    adapted = model(x)
    with pytest.raises(RuntimeError, match="boom"), lorakit.disable_adapters(model):
        assert not torch.allclose(model(x), adapted)
        raise RuntimeError("boom")
    assert torch.equal(model(x), adapted)


def test_not_a_lora_model():
    with pytest.raises(LoraError, match="not a LoRA model"):
        lorakit.merge(MLP())


# ----- merge semantics ----------------------------------------------------------------------------------


def test_merge_is_idempotent_and_unmerge_is_a_no_op_when_unmerged():
    torch.manual_seed(0)
    model = lorakit.get_lora_model(MLP(), LoraConfig(target_modules=["up", "down"], init_lora_weights=False))
    original = {k: v.clone() for k, v in model.state_dict().items()}
    lorakit.unmerge(model)  # nothing merged: no-op
    lorakit.merge(model)
    merged = {k: v.clone() for k, v in model.state_dict().items()}
    lorakit.merge(model)  # already merged: no-op
    assert all(torch.equal(merged[k], v) for k, v in model.state_dict().items())
    lorakit.unmerge(model)
    lorakit.unmerge(model)
    assert all(torch.equal(original[k], v) for k, v in model.state_dict().items())


def test_merged_model_refuses_adapter_switch_and_delete():
    model = lorakit.get_lora_model(MLP(), LoraConfig(target_modules=["up"]))
    lorakit.merge(model)
    with pytest.raises(MergeError, match="unmerge it before"):
        lorakit.set_active_adapters(model, "default")
    with pytest.raises(AdapterError, match="'default' is merged"):
        lorakit.delete_adapter(model, "default")


def test_safe_merge_checks_everything_before_writing():
    torch.manual_seed(0)
    model = lorakit.get_lora_model(MLP(), LoraConfig(target_modules=["up", "down"], init_lora_weights=False))
    with torch.no_grad():
        model.down.lora_B["default"].weight.fill_(float("inf"))
    original = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(MergeError, match="non-finite values in 'weight'"):
        lorakit.merge(model, safe=True)
    assert all(torch.equal(original[k], v) for k, v in model.state_dict().items())
    assert not model.up.merged_adapters


def test_grouped_conv_trains_but_refuses_to_merge():
    model = nn.Sequential(nn.Conv2d(4, 8, 3, groups=2, padding=1))
    lorakit.get_lora_model(model, LoraConfig(r=4, target_modules=["0"], init_lora_weights=False))
    out = model(torch.randn(1, 4, 5, 5))
    out.sum().backward()
    assert model[0].lora_A["default"].weight.grad is not None
    with pytest.raises(MergeError, match="groups=2"):
        lorakit.merge(model)


def test_lora_bias_without_base_bias_refuses_to_merge():
    model = nn.Sequential(nn.Linear(4, 4, bias=False), nn.Linear(4, 4))
    lorakit.get_lora_model(model, LoraConfig(target_modules=["0", "1"], lora_bias=True))
    with pytest.raises(MergeError, match="has no bias"):
        lorakit.merge(model)
    assert not model[1].merged_adapters  # nothing half-merged


def test_tied_weights_refuse_to_merge():
    model = tiny_llama(tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    lorakit.get_lora_model(model, LoraConfig(target_modules=["embed_tokens", "q_proj"]))
    with pytest.raises(MergeError, match=r"embed_tokens\.weight: that parameter is shared with lm_head "):
        lorakit.merge(model)
    assert not any(layer.merged_adapters for _, layer in lorakit.lora_layers(model))


def test_merge_and_unload_and_unload():
    torch.manual_seed(0)
    model = tiny_llama()
    reference = copy.deepcopy(model)
    lorakit.get_lora_model(model, LoraConfig(target_modules="all-linear", init_lora_weights=False))
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
        plain = lorakit.merge_and_unload(copy.deepcopy(model))
        torch.testing.assert_close(plain(input_ids=ids).logits, adapted, rtol=1e-4, atol=1e-5)
        assert not lora_names(plain) and not lorakit.is_lora_model(plain)
        assert set(plain.state_dict()) == set(reference.state_dict())
        unloaded = lorakit.unload(model)
        assert all(torch.equal(v, reference.state_dict()[k]) for k, v in unloaded.state_dict().items())


# ----- training ----------------------------------------------------------------------------------------


def test_training_changes_only_adapters_and_lowers_the_loss():
    model = tiny_llama()
    lorakit.get_lora_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.1))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 64, (4, 16))
    losses = []
    model.train()
    for _ in range(5):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert any(model.model.layers[0].self_attn.q_proj.lora_B["default"].weight.abs().sum() > 0 for _ in [0])


def test_modules_to_save_and_bias_modes():
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37, num_labels=3
    )
    model = BertForSequenceClassification(config)
    lorakit.get_lora_model(model, LoraConfig(target_modules=["query", "value"], modules_to_save=["classifier"]))
    assert isinstance(model.classifier, lorakit.ModulesToSave)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"classifier.modules_to_save.default.weight", "classifier.modules_to_save.default.bias"} <= trainable
    assert "classifier.original_module.weight" not in trainable
    keys = set(lorakit.lora_state_dict(model))
    assert {"base_model.model.classifier.weight", "base_model.model.classifier.bias"} <= keys
    assert model.classifier.weight is model.classifier.original_module.weight  # attribute access falls through

    model = BertForSequenceClassification(config)
    lorakit.get_lora_model(model, LoraConfig(target_modules=["query"], bias="lora_only"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "bert.encoder.layer.0.attention.self.query.base_layer.bias" in trainable
    assert "bert.encoder.layer.0.attention.self.key.bias" not in trainable
    assert "base_model.model.bert.encoder.layer.0.attention.self.query.base_layer.bias" in lorakit.lora_state_dict(
        model
    )

    model = BertForSequenceClassification(config)
    lorakit.get_lora_model(model, LoraConfig(target_modules=["query"], bias="all"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "bert.encoder.layer.0.attention.self.key.bias" in trainable


def test_meta_device_conversion_allocates_only_the_adapters():
    """The base stays on meta; the adapters are made on the CPU with their initial values (lorakit.materialize gives
    the base its weights later; tests/test_meta_start.py)."""
    with torch.device("meta"):
        model = tiny_llama()
    lorakit.get_lora_model(model, LoraConfig(target_modules="all-linear"))
    adapters = {n for n, _ in model.named_parameters() if ".lora_" in n}
    assert adapters
    for name, param in model.named_parameters():
        assert param.device.type == ("cpu" if name in adapters else "meta"), name


def test_init_modes():
    torch.manual_seed(0)
    model = nn.ModuleDict({"lin": nn.Linear(256, 64), "emb": nn.Embedding(100, 32), "conv": nn.Conv2d(8, 8, 3)})
    lorakit.get_lora_model(model, LoraConfig(r=8, target_modules=["lin", "emb", "conv"]))
    lin, emb, conv = model["lin"], model["emb"], model["conv"]
    bound = 1 / 256**0.5  # kaiming_uniform(a=√5) on a fan-in of 256
    a = lin.lora_A["default"].weight
    assert a.abs().max() <= bound and a.abs().max() > 0.9 * bound
    assert not lin.lora_B["default"].weight.any() and not conv.lora_B["default"].weight.any()
    assert not emb.lora_embedding_A["default"].any()
    assert emb.lora_embedding_B["default"].std().item() == pytest.approx(1.0, abs=0.15)

    model = nn.ModuleDict({"lin": nn.Linear(256, 64)})
    lorakit.get_lora_model(model, LoraConfig(r=8, target_modules=["lin"], init_lora_weights="gaussian"))
    assert model["lin"].lora_A["default"].weight.std().item() == pytest.approx(1 / 8, rel=0.1)
    assert not model["lin"].lora_B["default"].weight.any()

    model = nn.ModuleDict({"lin": nn.Linear(256, 64)})
    lorakit.get_lora_model(model, LoraConfig(r=8, target_modules=["lin"], init_lora_weights=False))
    assert model["lin"].lora_B["default"].weight.abs().min() > 0


def test_bfloat16_model_keeps_float32_master_weights_and_a_bf16_branch():
    model = tiny_llama().to(torch.bfloat16)
    lorakit.get_lora_model(model, LoraConfig(target_modules="all-linear"))
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.lora_A["default"].weight.dtype == torch.float32
    assert layer.base_layer.weight.dtype == torch.bfloat16
    logits = model(input_ids=torch.randint(0, 64, (2, 5))).logits
    assert logits.dtype == torch.bfloat16
    logits.float().square().mean().backward()
    assert layer.lora_A["default"].weight.grad.dtype == torch.float32


@pytest.mark.parametrize("adapters", [1, 2])
def test_cpu_autocast_runs_every_path_in_bfloat16(adapters: int):
    """Under `torch.autocast("cpu", bfloat16)` a float32 model's LoRA layers compute in bfloat16 like its base
    layers: forward with and without grad, backward into float32 master weights. (The float32 single-adapter
    path, which accumulates the base GEMM into the LoRA output, must step aside for it.)"""
    model = tiny_llama()
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    lorakit.get_lora_model(model, config)
    if adapters == 2:
        lorakit.add_adapter(model, "second", config)
        lorakit.set_active_adapters(model, ["default", "second"])
    ids = torch.randint(0, 64, (2, 6))
    with torch.no_grad():
        reference = model(input_ids=ids).logits
    for grad in (False, True):
        with torch.set_grad_enabled(grad), torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(input_ids=ids).logits
        assert logits.dtype == torch.bfloat16
        # bfloat16 rounding through two blocks: within a few eps of the largest float32 logit
        atol = 8 * torch.finfo(torch.bfloat16).eps * reference.abs().max().item()
        torch.testing.assert_close(logits.float(), reference, rtol=0.0, atol=atol)
    logits.float().square().mean().backward()
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.lora_A["default"].weight.grad.dtype == torch.float32
    assert layer.lora_B["default"].weight.grad.abs().sum() > 0


def test_lora_state_dict_of_unknown_adapter():
    model = lorakit.get_lora_model(MLP(), LoraConfig(target_modules=["up"]))
    with pytest.raises(AdapterError, match="unknown adapter 'x'"):
        lorakit.lora_state_dict(model, "x")


def test_all_linear_leaves_out_tied_layers_and_works_on_a_lora_model():
    model = nn.ModuleDict({"embed": nn.Embedding(10, 4), "proj": nn.Linear(4, 4), "out": nn.Linear(4, 10)})
    model["out"].weight = model["embed"].weight  # tied, as an output projection to the vocabulary
    lorakit.get_lora_model(model, LoraConfig(target_modules="all-linear"))
    assert lora_names(model) == ["proj"]
    lorakit.add_adapter(model, "second", LoraConfig(target_modules="all-linear"))
    assert model["proj"].adapter_names == ["default", "second"] and lora_names(model) == ["proj"]
