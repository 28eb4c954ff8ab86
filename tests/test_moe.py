"""Mixture-of-experts families with LoRA on their experts: Mixtral, Qwen3-MoE and gpt-oss, from tiny configs.

transformers 5 stores each MoE layer's experts as fused 3-D parameters (`experts.gate_up_proj`, `experts.down_proj`),
not `nn.Linear`s, so the experts are adapted with `target_parameters` (each expert its own rank-r update), beside
the attention (`target_modules`: the family default, or `"all-linear"`). gpt-oss stores its experts transposed
(`is_transposed`), the others `(experts, out, in)`.

Per family, against peft 0.21 as the oracle: peft's adapter (random, non-zero) loads into lorakit with peft's
logits; lorakit's file loads into peft with the same logits and the same keys; the gradients of every adapter
tensor are peft's; merged outputs equal peft's merged ones, and unmerge restores every bit. And on lorakit alone,
as for the other families: training lowers the loss and moves the experts' adapters, greedy generation gives the
same tokens merged, unmerged and in peft with the saved adapter, and merge_and_unload gives the plain model.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import transformers as tf
from safetensors.torch import load_file
from torch import nn

import lorakit

peft = pytest.importorskip("peft")

VOCAB = 64
EXPERTS = ["experts.gate_up_proj", "experts.down_proj"]


def _mixtral() -> nn.Module:
    return tf.MixtralForCausalLM(
        tf.MixtralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                         max_position_embeddings=64)
    )  # fmt: skip


def _qwen3_moe() -> nn.Module:
    return tf.Qwen3MoeForCausalLM(
        tf.Qwen3MoeConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, moe_intermediate_size=24,
                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                          num_experts=4, num_experts_per_tok=2, max_position_embeddings=64)
    )  # fmt: skip


def _gpt_oss() -> nn.Module:
    return tf.GptOssForCausalLM(
        tf.GptOssConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=24, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=4,
                        num_experts_per_tok=2, max_position_embeddings=64)
    )  # fmt: skip


FAMILIES: dict[str, Callable[[], nn.Module]] = {"mixtral": _mixtral, "qwen3_moe": _qwen3_moe, "gpt_oss": _gpt_oss}


def build(family: str) -> nn.Module:
    torch.manual_seed(0)
    return FAMILIES[family]().eval()


def batch() -> torch.Tensor:
    starts = torch.randint(0, VOCAB, (2, 1), generator=torch.Generator().manual_seed(1))
    return (starts + torch.arange(10)) % VOCAB  # runs of consecutive tokens, which the random base cannot predict


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


def peft_model(family: str, attention: list[str]) -> nn.Module:
    """peft's adapter on attention and experts, random A and B, moved off its start as training would."""
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=attention, target_parameters=EXPERTS,
                             init_lora_weights=False)  # fmt: skip
    torch.manual_seed(2)
    model = peft.get_peft_model(build(family), config)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, param in sorted(model.named_parameters()):
            if param.requires_grad:
                param.add_(0.05 * torch.randn(param.shape, generator=generator))
    return model


def grads_by_peft_key(model: nn.Module) -> dict[str, torch.Tensor]:
    """The gradient of each adapter tensor, under its key in the saved file."""
    by_storage = {param.data_ptr(): param for param in model.parameters()}
    return {key: by_storage[tensor.data_ptr()].grad for key, tensor in lorakit.lora_state_dict(model).items()}


def expert_layers(model: nn.Module) -> list[str]:
    return [name for name, layer in lorakit.lora_layers(model) if isinstance(layer, lorakit.layers.LoraParameters)]


@pytest.mark.parametrize("family", FAMILIES)
def test_experts_and_attention_equal_peft(family, tmp_path):
    ids = batch()
    base_logits = logits(build(family), ids)
    theirs = peft_model(family, ["q_proj", "v_proj"])
    expected = logits(theirs, ids)
    assert (expected - base_logits).abs().max() > 1e-2, "peft's adapter must change the logits"
    theirs.save_pretrained(tmp_path / "peft")

    ours = lorakit.load_adapter(build(family), tmp_path / "peft", trainable=True)
    assert expert_layers(ours) == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    torch.testing.assert_close(logits(ours, ids), expected, rtol=1e-5, atol=1e-5)

    lorakit.save_adapter(ours, tmp_path / "lorakit")
    ours_file = load_file(tmp_path / "lorakit" / "adapter_model.safetensors")
    peft_file = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert ours_file.keys() == peft_file.keys()
    assert all(torch.equal(ours_file[key], peft_file[key]) for key in peft_file)
    in_peft = peft.PeftModel.from_pretrained(build(family), tmp_path / "lorakit")
    torch.testing.assert_close(logits(in_peft, ids), expected, rtol=1e-5, atol=1e-5)

    # gradients of every adapter tensor, in train mode (no dropout anywhere: equal forwards)
    for model in (theirs, ours):
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
    theirs_grads = {k.replace(".default", ""): p.grad for k, p in theirs.named_parameters() if p.requires_grad}
    ours_grads = grads_by_peft_key(ours)
    assert ours_grads.keys() == theirs_grads.keys() == ours_file.keys()
    for key, grad in theirs_grads.items():
        assert grad.abs().sum() > 0, key
        torch.testing.assert_close(ours_grads[key], grad, rtol=1e-4, atol=1e-7 * grad.abs().max().item())

    # merge: peft's merged model, and back bit for bit
    before = {name: param.detach().clone() for name, param in ours.named_parameters()}
    unmerged = logits(ours, ids)
    lorakit.merge(ours)
    merged = logits(ours, ids)
    torch.testing.assert_close(merged, unmerged, rtol=0, atol=1e-5 * unmerged.abs().max().item())
    theirs.merge_adapter()
    torch.testing.assert_close(merged, logits(theirs, ids), rtol=1e-5, atol=1e-5)
    lorakit.unmerge(ours)
    assert all(torch.equal(param, before[name]) for name, param in ours.named_parameters())


@pytest.mark.parametrize("targets", [None, "all-linear"], ids=["default", "all-linear"])
@pytest.mark.parametrize("family", FAMILIES)
def test_trains_generates_merges_and_unloads(family, targets, tmp_path):
    ids = batch()
    model = build(family)
    base_state = {key: value.clone() for key, value in model.state_dict().items()}
    torch.manual_seed(4)
    config = lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=targets, target_parameters=EXPERTS)
    lorakit.get_lora_model(model, config)
    adapted = {name for name, _ in lorakit.lora_layers(model)}
    assert {"model.layers.0.mlp.experts", "model.layers.1.mlp.experts"} <= adapted
    attention = {name.rsplit(".", 1)[-1] for name in adapted if ".self_attn." in name}
    assert attention == ({"q_proj", "v_proj"} if targets is None else {"q_proj", "k_proj", "v_proj", "o_proj"})

    experts = model.model.layers[0].mlp.experts
    start = {key: value.detach().clone() for key, value in experts.adapter_parameters("default").items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    model.train()
    losses = []
    for _ in range(6):
        loss = model(input_ids=ids, labels=ids).loss
        losses.append(loss.item())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert losses[-1] < losses[0], losses
    assert all(not torch.equal(value, start[key]) for key, value in experts.adapter_parameters("default").items())
    assert all(torch.equal(value, base_state[key]) for key, value in _base_state(model).items())

    model.eval()
    prompt = {"input_ids": ids[:, :4], "max_new_tokens": 5, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        tokens = model.generate(**prompt)
        unmerged = logits(model, ids)
        lorakit.merge(model)
        assert torch.equal(model.generate(**prompt), tokens)
        lorakit.unmerge(model)
    assert all(torch.equal(value, base_state[key]) for key, value in _base_state(model).items())

    lorakit.save_adapter(model, tmp_path)
    in_peft = peft.PeftModel.from_pretrained(build(family), tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(in_peft.generate(**prompt), tokens)
    swapped = lorakit.get_lora_model(build(family), config)  # another start, the trained weights swapped in
    lorakit.hot_swap_adapter(swapped, tmp_path, "default")
    assert torch.equal(logits(swapped, ids), unmerged)
    plain = lorakit.merge_and_unload(model)
    assert type(plain.model.layers[0].mlp.experts).__name__.endswith("Experts")
    assert plain.state_dict().keys() == base_state.keys()
    torch.testing.assert_close(logits(plain, ids), unmerged, rtol=0, atol=1e-5 * unmerged.abs().max().item())


def _base_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The converted model's base tensors under their unconverted names."""
    return {key.replace(".base_layer", ""): value for key, value in model.state_dict().items() if "lora_" not in key}


def test_what_parameter_targets_refuse():
    def convert(family: str, **config) -> nn.Module:
        return lorakit.get_lora_model(build(family), lorakit.LoraConfig(**config))

    with pytest.raises(lorakit.LoraConfigError, match=r"lora_dropout=0\.1 cannot apply to target_parameters"):
        lorakit.LoraConfig(target_parameters=EXPERTS, lora_dropout=0.1)
    with pytest.raises(lorakit.TargetError, match=r"entries \['experts\.up_proj'\] matched no parameter"):
        convert("mixtral", target_modules=[], target_parameters=["experts.up_proj"])
    with pytest.raises(lorakit.TargetError, match=r"targeted as a module .* and its parameters"):
        convert("mixtral", target_modules=["q_proj"], target_parameters=["q_proj.weight"])
    with pytest.raises(lorakit.LoraError, match=r"LoRA adapts 2-D weights and 3-D expert stacks"):
        convert("mixtral", target_modules=[], target_parameters=["0.input_layernorm.weight"])
    model = convert("mixtral", target_modules=[], target_parameters=EXPERTS)
    with pytest.raises(lorakit.TargetError, match="another adapter must target the same"):
        lorakit.add_adapter(model, "other", lorakit.LoraConfig(target_modules=[], target_parameters=EXPERTS[:1]))
    model.eval()
    with (
        pytest.raises(lorakit.LoraError, match="does not support many adapters in one batch"),
        lorakit.mixed_batch(model, ["default", "default"]),
    ):
        model(input_ids=batch())


def test_rank_and_alpha_patterns_match_the_parameters_full_names(tmp_path):
    """As in peft: `rank_pattern`/`alpha_pattern` keys match `….experts.gate_up_proj`, the parameter's name."""
    patterns = {"rank_pattern": {"experts.gate_up_proj": 6, "experts.down_proj": 6},
                "alpha_pattern": {"experts.gate_up_proj": 3, "experts.down_proj": 3}}  # fmt: skip
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], target_parameters=EXPERTS,
                             init_lora_weights=False, **patterns)  # fmt: skip
    torch.manual_seed(2)
    theirs = peft.get_peft_model(build("mixtral"), config)
    theirs.save_pretrained(tmp_path)
    ours = lorakit.load_adapter(build("mixtral"), tmp_path)
    experts = ours.model.layers[0].mlp.experts
    assert (experts.r["default"], experts.lora_alpha["default"]) == (6, 3)
    assert ours.model.layers[0].self_attn.q_proj.r["default"] == 4
    torch.testing.assert_close(logits(ours, batch()), logits(theirs, batch()), rtol=1e-5, atol=1e-5)
    direct = lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], target_parameters=EXPERTS, **patterns)
    assert lorakit.get_lora_model(build("mixtral"), direct).model.layers[1].mlp.experts.r["default"] == 6
    uneven = lorakit.LoraConfig(target_modules=[], target_parameters=EXPERTS, rank_pattern={"experts.down_proj": 2})
    with pytest.raises(lorakit.TargetError, match="one rank and one alpha"):
        lorakit.get_lora_model(build("mixtral"), uneven)
