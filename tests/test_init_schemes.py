"""PiSSA, OLoRA and orthogonal initialisation (`init_lora_weights`), against peft 0.21.

The same seed must give peft's A, B and residual base weights bit for bit; after training (here: A and B moved
by hand) the model, its merge and its files must equal peft's; a PiSSA/OLoRA file must load onto the original
base in both libraries (each takes the start out of the base again), and its conversion to a plain LoRA of the
original weights (`convert_to_lora=True`, peft's `path_initial_model_for_weight_conversion`) must equal peft's.
Unlike peft, `unload` and `delete_adapter` give the original base weights back to the bit.
"""

from __future__ import annotations

import copy
import warnings

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
TARGETS = ["q_proj", "v_proj", "o_proj", "down_proj"]
IDS = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(3))
INITS = ["pissa", "pissa_niter_2", "olora", "orthogonal"]


def tiny_gpt2() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0
    )
    return transformers.GPT2LMHeadModel(config).eval()


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def base_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every non-LoRA tensor, keyed as in the plain model."""
    return {n.replace("base_layer.", ""): p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}


def pair(init: str, make=tiny_llama, targets=TARGETS, **options) -> tuple[nn.Module, nn.Module, dict]:
    """(peft model, lorakit model, the original base weights), both converted from the same seed."""
    options = {"r": 4, "lora_alpha": 8, "target_modules": targets, "init_lora_weights": init, **options}
    original = base_weights(make())
    torch.manual_seed(11)
    theirs = peft.get_peft_model(make(), peft.LoraConfig(**options))
    torch.manual_seed(11)
    ours = lorakit.get_lora_model(make(), LoraConfig(**options))
    return theirs, ours, original


def train_by_hand(*models: nn.Module) -> None:
    """Move every A and B (the same way in each model), as training would."""
    for model in models:
        generator = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for name, param in sorted(model.named_parameters()):
                if "lora_A" in name or "lora_B" in name:
                    param.add_(torch.randn(param.shape, generator=generator) * 0.05)


@pytest.mark.parametrize("init", INITS)
def test_the_same_seed_gives_peft_start_and_residual_bit_for_bit(init):
    theirs, ours, original = pair(init)
    ours_params = dict(ours.named_parameters())
    for name, param in theirs.named_parameters():
        name = name.removeprefix("base_model.model.")
        assert torch.equal(ours_params[name], param), name
    changed = base_weights(ours)
    moved = [n for n in original if not torch.equal(changed[n], original[n])]
    if init == "orthogonal":
        assert moved == [], "orthogonal leaves the base alone"
    else:
        assert sorted(moved) == sorted(f"{n}.weight" for n, _ in lorakit.lora_layers(ours)), "the residual"
    torch.testing.assert_close(logits(ours), logits(tiny_llama()), rtol=1e-4, atol=1e-5)  # same model at start
    if init != "orthogonal":
        assert (lorakit.trainable_parameters(ours)[0]) > 0
        a = ours.get_parameter("model.layers.0.self_attn.q_proj.lora_A.default.weight")
        assert (
            a.abs().sum() > 0
            and ours.get_parameter("model.layers.0.self_attn.q_proj.lora_B.default.weight").abs().sum() > 0
        )


def test_pissa_on_gpt2_conv1d_and_dora_on_top_equal_peft():
    """Conv1D (stored (in, out)) takes PiSSA as peft does; a DoRA adapter on a PiSSA start takes its magnitude from
    the residual, as peft's."""
    for make, targets, options in [
        (tiny_gpt2, ["c_attn", "c_proj"], {"fan_in_fan_out": True}),
        (tiny_llama, TARGETS, {"use_dora": True}),
    ]:
        theirs, ours, _ = pair("pissa", make, targets, **options)
        ours_params = dict(ours.named_parameters())
        for name, param in theirs.named_parameters():
            name = name.removeprefix("base_model.model.").replace("lora_magnitude_vector.default.weight",
                                                                  "lora_magnitude_vector.default")  # fmt: skip
            exact = "magnitude" not in name  # m = ‖W_res + s·B A‖ (to rounding: lorakit forms no B A)
            torch.testing.assert_close(ours_params[name], param, rtol=0 if exact else 1e-6, atol=0, msg=name)
        train_by_hand(theirs, ours)
        torch.testing.assert_close(logits(ours), logits(theirs), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("init", INITS)
def test_trained_forward_merge_unmerge_and_unload(init):
    theirs, ours, original = pair(init)
    train_by_hand(theirs, ours)
    expected = logits(theirs)
    before = logits(ours)
    torch.testing.assert_close(before, expected, rtol=RTOL, atol=ATOL)
    assert (before - logits(tiny_llama())).norm() / before.norm() > 1e-3, "the trained adapter must change the output"
    residual = base_weights(ours)
    with torch.no_grad():
        lorakit.merge(ours)
        theirs.merge_adapter()
        torch.testing.assert_close(logits(ours), expected, rtol=RTOL, atol=ATOL)
        merged_in_peft = base_weights(theirs)
        for name, value in base_weights(ours).items():
            torch.testing.assert_close(value, merged_in_peft[f"base_model.model.{name}"], rtol=RTOL, atol=ATOL)
        lorakit.unmerge(ours)
    assert all(torch.equal(v, residual[n]) for n, v in base_weights(ours).items()), "unmerge gives the residual back"
    lorakit.unload(ours)
    assert all(torch.equal(p, original[n]) for n, p in ours.named_parameters()), "unload gives the original back"


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_files_both_ways_load_onto_the_original_base(init, tmp_path):
    """A PiSSA/OLoRA file names its init; both libraries take the start out of the original base again on load."""
    theirs, ours, _ = pair(init)
    train_by_hand(theirs, ours)
    expected = logits(theirs)
    lorakit.save_adapter(ours, tmp_path / "lorakit")
    theirs.save_pretrained(tmp_path / "peft")
    ours_file = load_file(tmp_path / "lorakit" / "adapter_model.safetensors")
    peft_file = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert ours_file.keys() == peft_file.keys()
    assert all(torch.equal(ours_file[k], peft_file[k]) for k in ours_file)
    in_peft = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "lorakit")
    in_lorakit = lorakit.load_adapter(tiny_llama(), tmp_path / "peft")
    torch.testing.assert_close(logits(in_peft), expected, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(logits(in_lorakit), expected, rtol=RTOL, atol=ATOL)


PATTERNS = {"rank_pattern": {"v_proj": 2}, "alpha_pattern": {"o_proj": 4}}


@pytest.mark.parametrize(("init", "options"), [("pissa", {}), ("olora", {"use_rslora": True}), ("pissa", PATTERNS)])
def test_convert_to_lora_equals_peft_conversion(init, options, tmp_path):
    theirs, ours, _ = pair(init, **options)
    theirs.save_pretrained(tmp_path / "initial")  # peft needs the start saved before training; lorakit keeps it
    train_by_hand(theirs, ours)
    expected = logits(theirs)
    lorakit.save_adapter(ours, tmp_path / "lorakit", convert_to_lora=True)
    theirs.save_pretrained(tmp_path / "peft", path_initial_model_for_weight_conversion=tmp_path / "initial")
    ours_file = load_file(tmp_path / "lorakit" / "adapter_model.safetensors")
    peft_file = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert ours_file.keys() == peft_file.keys()
    for key in ours_file:
        torch.testing.assert_close(ours_file[key], peft_file[key], rtol=0, atol=0, msg=key)
    config = lorakit.read_adapter_config(tmp_path / "lorakit")
    assert config.init_lora_weights is True and config.r == 8
    assert config.rank_pattern == {key: 2 * r for key, r in options.get("rank_pattern", {}).items()}
    # a plain LoRA of the original weights: onto the unchanged base, in both libraries
    in_peft = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "lorakit")
    in_lorakit = lorakit.load_adapter(tiny_llama(), tmp_path / "lorakit")
    torch.testing.assert_close(logits(in_peft), expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logits(in_lorakit), expected, rtol=1e-4, atol=1e-5)


def test_deleting_a_pissa_adapter_gives_the_base_back(tmp_path):
    _, model, original = pair("pissa")
    plain = base_weights(model)
    with pytest.warns(UserWarning, match="took their start out of the base weights"):
        lorakit.add_adapter(model, "second", LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights="olora"))
    with pytest.raises(lorakit.AdapterError, match=r"delete \['second'\], which changed the weight after it, first"):
        lorakit.delete_adapter(model, "default")
    lorakit.set_active_adapters(model, "default")
    lorakit.delete_adapter(model, "second")
    assert all(torch.equal(v, plain[n]) for n, v in base_weights(model).items()), "olora's change given back"
    with pytest.warns(UserWarning):
        lorakit.add_adapter(model, "plain", LoraConfig(r=2, target_modules=["q_proj"]))
    lorakit.set_active_adapters(model, "plain")
    lorakit.delete_adapter(model, "default")
    assert all(torch.equal(v, original[n]) for n, v in base_weights(model).items()), "pissa's change given back"


def test_a_failed_load_leaves_the_base_as_it_was(tmp_path):
    _, model, original = pair("pissa")
    lorakit.save_adapter(model, tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    key = next(k for k in tensors if k.endswith("lora_B.weight"))
    tensors[key] = tensors[key][:, :2].contiguous()  # a mis-shaped tensor: found after the start was taken
    from safetensors.torch import save_file

    save_file(tensors, tmp_path / "adapter_model.safetensors")
    fresh = tiny_llama()
    with pytest.raises(lorakit.LoraError):
        lorakit.load_adapter(fresh, tmp_path)
    assert all(torch.equal(p, original[n]) for n, p in fresh.named_parameters())


def test_what_cannot_be_done_is_refused(tmp_path):
    with pytest.raises(lorakit.LoraError, match="'pissa' is not supported on Embedding layers"):
        lorakit.get_lora_model(
            tiny_bert(), LoraConfig(r=2, target_modules=["word_embeddings"], init_lora_weights="pissa")
        )
    with pytest.raises(lorakit.LoraConfigError, match="needs an even rank, got r=3"):
        lorakit.get_lora_model(tiny_llama(), LoraConfig(r=3, target_modules=["q_proj"], init_lora_weights="orthogonal"))
    with pytest.raises(lorakit.LoraConfigError, match="lora_bias=True needs init_lora_weights True or False"):
        LoraConfig(lora_bias=True, init_lora_weights="olora")
    with pytest.raises(lorakit.LoraConfigError, match="pissa_niter_<k>"):
        LoraConfig(init_lora_weights="pissa_niter_x")
    plain = lorakit.get_lora_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(lorakit.LoraError, match="is a plain LoRA already"):
        lorakit.save_adapter(plain, tmp_path / "plain", convert_to_lora=True)
    _, pissa, _ = pair("pissa")
    lorakit.save_adapter(pissa, tmp_path / "pissa")
    with pytest.raises(lorakit.LoraError, match="takes its start out of the base weights"):
        lorakit.hot_swap_adapter(pissa, tmp_path / "pissa")
    assert not (tmp_path / "plain").exists()
    bnb = pytest.importorskip("bitsandbytes")
    layer = bnb.nn.Linear4bit(64, 64, compute_dtype=torch.float32)
    layer.weight = bnb.nn.Params4bit(torch.randn(64, 64), requires_grad=False, quant_type="nf4")
    quantized = nn.ModuleDict({"proj": layer.to("cpu")})
    with pytest.raises(lorakit.LoraError, match="'olora' is not supported on Linear4bit layers"):
        lorakit.get_lora_model(quantized, LoraConfig(r=2, target_modules=["proj"], init_lora_weights="olora"))


def test_a_randomized_pissa_file_warns_on_load(tmp_path):
    _, model, _ = pair("pissa_niter_2")
    lorakit.save_adapter(model, tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lorakit.load_adapter(tiny_llama(), tmp_path)
    assert any("randomized SVD" in str(w.message) for w in caught)


def test_unload_gives_the_original_where_peft_keeps_the_residual():
    theirs, ours, original = pair("pissa")
    train_by_hand(theirs, ours)
    peft_unloaded = base_weights(theirs.unload())
    lorakit.unload(ours)
    assert all(torch.equal(p, original[n]) for n, p in ours.named_parameters())
    assert not all(torch.equal(peft_unloaded[n], original[n]) for n in original), "peft keeps the residual"
    copy.deepcopy(ours)  # a plain model again
