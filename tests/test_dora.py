"""DoRA (`use_dora=True`) on Linear and transformers Conv1D layers, against peft 0.21 on the same models.

peft and lorakit convert deep copies of one model; peft's random adapter (`init_lora_weights=False`) and its
magnitudes are copied into lorakit. Forward outputs, every gradient (A, B and the magnitude), the merged
weights and the files (both ways) must equal peft's; unmerge must restore every bit.
"""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import tiny_bert, tiny_llama
from torch import nn

import lorakit
from lorakit import LoraConfig

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

RTOL, ATOL = 1e-5, 1e-6
LLAMA_TARGETS = ["q_proj", "v_proj", "o_proj", "down_proj"]


def tiny_gpt2() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=4, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0
    )  # no dropout: the two libraries' training-mode forwards are compared
    return transformers.GPT2LMHeadModel(config)


MODELS = {
    "llama (Linear)": (tiny_llama, LLAMA_TARGETS),
    "gpt2 (Conv1D)": (tiny_gpt2, ["c_attn", "c_proj"]),
}
IDS = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(3))


def peft_key(name: str) -> str:
    """lorakit's in-memory parameter name as peft's: its magnitudes are modules with a `.weight`."""
    name = name.replace("lora_magnitude_vector.default", "lora_magnitude_vector.default.weight")
    return f"base_model.model.{name}"


def pair(make, targets, **options) -> tuple[nn.Module, nn.Module]:
    """(peft model, lorakit model) on copies of one base, lorakit holding peft's random DoRA adapter."""
    base = make()
    options = {"r": 4, "lora_alpha": 8, "target_modules": targets, "use_dora": True, **options}
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(init_lora_weights=False, **options))
    ours = lorakit.get_lora_model(base, LoraConfig(**options))
    with torch.no_grad():
        for name, param in ours.named_parameters():
            if "lora_" in name:
                param.copy_(theirs.get_parameter(peft_key(name)))
    return theirs, ours


def logits(model: nn.Module) -> torch.Tensor:
    return model(input_ids=IDS).logits


@pytest.mark.parametrize("model", list(MODELS))
def test_forward_gradients_merge_and_unmerge_equal_peft(model):
    theirs, ours = pair(*MODELS[model])
    expected, actual = logits(theirs), logits(ours)
    with lorakit.disable_adapters(ours):
        base = logits(ours)
    assert ((actual - base).norm() / base.norm()) > 1e-2, "the adapter must change the output"
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=ATOL)

    expected.square().mean().backward()
    actual.square().mean().backward()
    trainable = {n: p for n, p in ours.named_parameters() if p.requires_grad}
    assert sum("lora_magnitude_vector" in n for n in trainable) == len(trainable) // 3
    for name, param in trainable.items():
        reference = theirs.get_parameter(peft_key(name)).grad
        assert param.grad is not None and param.grad.abs().sum() > 0, name
        torch.testing.assert_close(param.grad, reference, rtol=1e-4, atol=1e-7, msg=name)

    originals = {n: p.detach().clone() for n, p in ours.named_parameters() if "base_layer" in n}
    with torch.no_grad():
        lorakit.merge(ours)
        theirs.merge_adapter()
        torch.testing.assert_close(logits(ours), logits(theirs), rtol=RTOL, atol=ATOL)
        for name in originals:
            merged = ours.get_parameter(name)
            torch.testing.assert_close(merged, theirs.get_parameter(f"base_model.model.{name}"), rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(logits(ours), actual, rtol=RTOL, atol=ATOL)  # merged = unmerged
        lorakit.unmerge(ours)
    assert all(torch.equal(ours.get_parameter(n), original) for n, original in originals.items())
    assert torch.equal(logits(ours), actual)


@pytest.mark.parametrize("model", list(MODELS))
def test_files_both_ways(model, tmp_path):
    theirs, ours = pair(*MODELS[model])
    lorakit.save_adapter(ours, tmp_path / "lorakit")
    theirs.save_pretrained(tmp_path / "peft")
    ours_file = load_file(tmp_path / "lorakit" / "adapter_model.safetensors")
    peft_file = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert {k: v.shape for k, v in ours_file.items()} == {k: v.shape for k, v in peft_file.items()}
    assert any(key.endswith("lora_magnitude_vector") for key in ours_file)
    make = MODELS[model][0]
    with torch.no_grad():
        expected = logits(theirs.eval())
        in_peft = peft.PeftModel.from_pretrained(make(), tmp_path / "lorakit").eval()
        in_lorakit = lorakit.load_adapter(make().eval(), tmp_path / "peft")
        torch.testing.assert_close(logits(in_peft), expected, rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(logits(in_lorakit), expected, rtol=RTOL, atol=ATOL)


def test_a_new_dora_adapter_starts_as_the_base_model():
    model = tiny_llama().eval()
    with torch.no_grad():
        before = logits(model)
        lorakit.get_lora_model(model, LoraConfig(r=4, target_modules=LLAMA_TARGETS, use_dora=True))
        torch.testing.assert_close(logits(model), before, rtol=1e-6, atol=1e-6)  # m = ‖W‖, B = 0


def test_dora_beside_plain_lora_and_disabled():
    theirs, ours = pair(tiny_llama, LLAMA_TARGETS)
    plain = {"r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "k_proj"]}
    theirs.add_adapter("plain", peft.LoraConfig(init_lora_weights=False, **plain))
    lorakit.add_adapter(ours, "plain", LoraConfig(**plain))
    with torch.no_grad():
        for name, param in ours.named_parameters():
            if ".plain" in name:
                param.copy_(theirs.get_parameter(f"base_model.model.{name}"))
    theirs.base_model.set_adapter(["default", "plain"])
    lorakit.set_active_adapters(ours, ["default", "plain"])
    with torch.no_grad():
        torch.testing.assert_close(logits(ours), logits(theirs), rtol=RTOL, atol=ATOL)
        both = logits(ours)
        lorakit.merge(ours)
        torch.testing.assert_close(logits(ours), both, rtol=RTOL, atol=ATOL)
        with lorakit.disable_adapters(ours), theirs.disable_adapter():
            torch.testing.assert_close(logits(ours), logits(theirs), rtol=RTOL, atol=ATOL)
        lorakit.unmerge(ours)
        assert torch.equal(logits(ours), both)


def test_dora_where_lorakit_does_not_have_it_is_refused():
    with pytest.raises(lorakit.LoraError, match=r"DoRA\) is not supported on Embedding layers"):
        lorakit.get_lora_model(tiny_bert(), LoraConfig(r=2, target_modules=["word_embeddings"], use_dora=True))
    model = lorakit.get_lora_model(tiny_llama().eval(), LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    stacked = lorakit.mixed_batch(model, ["default", "__base__"])
    with pytest.raises(lorakit.LoraError, match=r"DoRA adapters \['default'\] cannot run in a mixed batch"):
        stacked.__enter__()
    bnb = pytest.importorskip("bitsandbytes")
    layer = bnb.nn.Linear4bit(64, 64, compute_dtype=torch.float32)
    layer.weight = bnb.nn.Params4bit(torch.randn(64, 64), requires_grad=False, quant_type="nf4")
    quantized = nn.ModuleDict({"proj": layer.to("cpu")})
    with pytest.raises(lorakit.LoraError, match=r"DoRA\) is not supported on Linear4bit layers"):
        lorakit.get_lora_model(quantized, LoraConfig(r=2, target_modules=["proj"], use_dora=True))
