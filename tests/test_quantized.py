"""LoRA on quantized bases (QLoRA), against peft 0.21 on the same quantized models.

Every quantized kind lorakit adapts (bitsandbytes 4-bit nf4/fp4 with and without double quantization, 8-bit,
torchao int8 weight-only) is loaded the way users load it, through transformers' `from_pretrained` with a
quantization config on the CPU, from one small saved Llama. peft and lorakit convert deep copies of it; peft's
random adapter (`init_lora_weights=False`) is copied into lorakit. Then forward outputs, gradients and merged
quantized weights must equal peft's, and unmerge must give back the original quantized bytes, which peft's
does not.

bitsandbytes 0.50 repacks a `Linear4bit` weight in place at its first inference forward on CPUs with AVX512-BF16,
after which peft's layer dequantizes it wrongly and passes no gradient to its input. lorakit's layer turns that
repacking off (`test_training_after_an_evaluation_pass`); peft's copies get the same setting here, so that the
comparison is of LoRA, not of that bug.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import lorakit
from lorakit import LoraConfig, TargetError

bnb = pytest.importorskip("bitsandbytes")
torchao_quantization = pytest.importorskip("torchao.quantization")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*(M|Unm)erge lora module to (4|8)-bit linear"),
    pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning"),
    pytest.mark.filterwarnings("ignore:.*gradient_checkpointing_enable.*:FutureWarning"),
    pytest.mark.filterwarnings("ignore:.*MatMul8bitLt. inputs will be cast"),
]

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# name → (transformers quantization config, dtype of the loaded model)
KINDS = {
    "nf4": lambda dtype: transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype
    ),
    "nf4-single": lambda dtype: transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=False, bnb_4bit_compute_dtype=dtype
    ),
    "fp4": lambda dtype: transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype
    ),
    "int8": lambda dtype: transformers.BitsAndBytesConfig(load_in_8bit=True),
    "torchao-int8": lambda dtype: transformers.TorchAoConfig(torchao_quantization.Int8WeightOnlyConfig()),
}
FOUR_BIT = ("nf4", "nf4-single", "fp4")
ALL_KINDS = (*FOUR_BIT, "int8", "torchao-int8")


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    """A saved 2-layer Llama (hidden 64), the float checkpoint every quantized model is loaded from."""
    directory = tmp_path_factory.mktemp("llama")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=False,
    )  # fmt: skip
    transformers.LlamaForCausalLM(config).save_pretrained(directory)
    return directory


def load(directory: Path, kind: str | None, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The checkpoint loaded in `dtype`, quantized as `kind` (None: not quantized), in training mode."""
    quantization = {} if kind is None else {"quantization_config": KINDS[kind](dtype), "device_map": "cpu"}
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, **quantization)
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False  # the bitsandbytes repacking bug (module doc)
    return model.train()


def pair(directory: Path, kind: str, dtype: torch.dtype = torch.float32, **options) -> tuple[nn.Module, nn.Module]:
    """(peft model, lorakit model) on copies of one quantized base, lorakit holding peft's random adapter."""
    base = load(directory, kind, dtype)
    options = {"r": 4, "lora_alpha": 8, "target_modules": TARGETS, **options}
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(init_lora_weights=False, **options))
    ours = lorakit.get_lora_model(base, LoraConfig(**options))
    copy_adapter(theirs, ours)
    return theirs, ours


def copy_adapter(theirs: nn.Module, ours: nn.Module) -> None:
    expected = {k.removeprefix("base_model.model."): v for k, v in theirs.state_dict().items() if "lora_" in k}
    mine = {k for k in ours.state_dict() if "lora_" in k}
    assert set(expected) == mine, "peft and lorakit name the adapter's tensors alike"
    ours.load_state_dict(expected, strict=False)


def quantized_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))} | {
        n: m for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and isinstance(m.weight, torchao_quantization.Int8Tensor)
    }  # fmt: skip


def stored(layer: nn.Module) -> list[torch.Tensor]:
    """Every tensor a quantized layer computes with: packed or int8 values and the quantization state."""
    weight = layer.weight
    if isinstance(weight, torchao_quantization.Int8Tensor):
        return [weight.qdata.clone(), weight.scale.clone()]
    if isinstance(layer, bnb.nn.Linear8bitLt):
        scales = layer.state.SCB if layer.state.SCB is not None else weight.SCB
        return [weight.data.clone(), scales.clone()]
    state = weight.quant_state.as_dict()
    return [weight.data.clone(), *[v.clone() for v in state.values() if isinstance(v, torch.Tensor)]]


def relative(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.float() - expected.float()).norm() / expected.float().norm()).item()


IDS = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(3))


def logits(model: nn.Module) -> torch.Tensor:
    return model(input_ids=IDS).logits


# ----- the oracle: forward, gradients, merged weights ------------------------------------------------------------


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_forward_gradients_and_merge_equal_peft(llama_dir, kind):
    theirs, ours = pair(llama_dir, kind)
    expected, actual = logits(theirs), logits(ours)
    with lorakit.disable_adapters(ours):
        base = logits(ours)
    assert relative(actual, base) > 1e-2, "the adapter must change the output for the comparison to mean anything"
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)

    expected.square().mean().backward()
    actual.square().mean().backward()
    their_params = {n.removeprefix("base_model.model."): p for n, p in theirs.named_parameters() if p.requires_grad}
    our_params = dict((n, p) for n, p in ours.named_parameters() if p.requires_grad)
    assert set(our_params) == set(their_params) and len(our_params) == 2 * len(TARGETS) * 2
    for name, param in our_params.items():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
        torch.testing.assert_close(param.grad, their_params[name].grad, rtol=1e-5, atol=1e-7, msg=name)

    originals = {name: stored(layer) for name, layer in quantized_layers(ours).items()}
    with torch.no_grad():
        lorakit.merge(ours)
        theirs.merge_adapter()
        torch.testing.assert_close(logits(ours), logits(theirs), rtol=1e-5, atol=1e-6)
    mine, peft_merged = quantized_layers(ours), quantized_layers(theirs.base_model.model)
    assert set(mine) == set(peft_merged) and len(mine) == 2 * len(TARGETS)
    for name, layer in mine.items():
        for ours_tensor, theirs_tensor in zip(stored(layer), stored(peft_merged[name]), strict=True):
            assert torch.equal(ours_tensor, theirs_tensor), f"{name}: merged quantized weights differ from peft's"

    lorakit.unmerge(ours)
    theirs.unmerge_adapter()
    for name, layer in quantized_layers(ours).items():
        assert all(torch.equal(a, b) for a, b in zip(stored(layer), originals[name], strict=True)), name
    restored_by_peft = [
        all(torch.equal(a, b) for a, b in zip(stored(layer), originals[name], strict=True))
        for name, layer in quantized_layers(theirs.base_model.model).items()
    ]
    assert not all(restored_by_peft), "peft's unmerge requantizes W' - ΔW, which is not W"
    torch.testing.assert_close(logits(ours), actual, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["nf4", "torchao-int8"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_compute_matches_peft_to_rounding(llama_dir, kind, dtype):
    """In bfloat16/float16 lorakit runs the branch in the compute dtype (peft upcasts it to float32), so outputs
    and gradients agree to that dtype's rounding, and the merged weights exactly. Measured here: outputs within
    about 3 ulps (ε, relative), gradients within 3-10 ε at the median and 80 ε at worst (the smallest gradients,
    after a half-precision backward through both decoder layers); a wrong or missing branch is off by ~1."""
    eps = torch.finfo(dtype).eps
    theirs, ours = pair(llama_dir, kind, dtype)
    expected, actual = logits(theirs), logits(ours)
    with lorakit.disable_adapters(ours):
        assert relative(actual, logits(ours)) > 0.5
    assert relative(actual, expected) < 8 * eps
    expected.float().square().mean().backward()
    actual.float().square().mean().backward()
    errors = []
    for name, param in ours.named_parameters():
        if param.requires_grad:
            assert param.dtype == torch.float32, "float32 master weights on a half-precision quantized base"
            errors.append(relative(param.grad, theirs.get_parameter(f"base_model.model.{name}").grad))
    assert sorted(errors)[len(errors) // 2] < 32 * eps and max(errors) < 0.1, errors
    lorakit.merge(ours)
    theirs.merge_adapter()
    for name, layer in quantized_layers(ours).items():
        peft_layer = theirs.base_model.model.get_submodule(name)
        assert all(torch.equal(a, b) for a, b in zip(stored(layer), stored(peft_layer), strict=True)), name


def test_training_after_an_evaluation_pass(llama_dir):
    """An inference pass (as Trainer's evaluation runs between training steps) changes nothing in lorakit's
    4-bit layers: the next training step gets the gradients it got before. A base evaluated before conversion,
    whose weights bitsandbytes repacked already, is converted back to the standard layout and trains."""
    config = LoraConfig(r=4, target_modules=TARGETS, init_lora_weights=False)

    def model_and_gradient(evaluate_first: bool) -> tuple[nn.Module, callable]:
        model = load(llama_dir, "nf4")
        for module in model.modules():
            if isinstance(module, bnb.nn.Linear4bit):
                module.support_avx512bf16_for_cpu = True  # bitsandbytes' own default on this CPU
        if evaluate_first:
            with torch.no_grad():
                logits(model.eval())
            model.train()
        torch.manual_seed(0)
        lorakit.get_lora_model(model, config)
        a = model.get_parameter("model.layers.0.self_attn.q_proj.lora_A.default.weight")

        def gradient() -> torch.Tensor:
            logits(model).square().mean().backward()
            grad, a.grad = a.grad.clone(), None
            return grad

        return model, gradient

    model, gradient = model_and_gradient(evaluate_first=False)
    before = gradient()
    assert before.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        logits(model)
    model.train()
    assert torch.equal(gradient(), before)
    _, gradient_after_evaluating_the_base = model_and_gradient(evaluate_first=True)
    # bitsandbytes' repacking rounds the block scales to bfloat16, so that base computes with weights 0.1% off
    # (91% of them changed): the gradients agree to that, where the repacked layer would give none at all.
    assert relative(gradient_after_evaluating_the_base(), before) < 0.05


# ----- transformers paths: all-linear, family defaults, gradient checkpointing, prepare -------------------------


@pytest.mark.parametrize("targets", ["all-linear", None])
def test_all_linear_and_family_defaults_on_a_4bit_model(llama_dir, targets):
    model = load(llama_dir, "nf4")
    lorakit.get_lora_model(model, LoraConfig(r=4, target_modules=targets))
    layers = dict(lorakit.lora_layers(model))
    expected = 2 * len(TARGETS) if targets == "all-linear" else 2 * 2  # Llama's default: q_proj, v_proj
    assert len(layers) == expected and all(type(layer).__name__ == "LoraLinear4bit" for layer in layers.values())
    assert "lm_head" not in layers


def test_gradient_checkpointing_gives_the_same_gradients(llama_dir):
    def grads(checkpointing: bool) -> dict[str, torch.Tensor]:
        model = lorakit.prepare_model_for_kbit_training(load(llama_dir, "nf4"), checkpointing)
        lorakit.get_lora_model(model, LoraConfig(r=4, target_modules=TARGETS, init_lora_weights="gaussian"))
        torch.manual_seed(0)
        for param in model.parameters():
            if param.requires_grad:
                nn.init.normal_(param, std=0.1)
        logits(model).square().mean().backward()
        assert model.is_gradient_checkpointing == checkpointing
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    plain, checkpointed = grads(False), grads(True)
    assert plain.keys() == checkpointed.keys() and all(g.abs().sum() > 0 for g in checkpointed.values())
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("kind", ["nf4", "int8", "torchao-int8"])
def test_prepare_model_for_kbit_training_does_what_peft_does(llama_dir, kind):
    theirs = peft.prepare_model_for_kbit_training(load(llama_dir, kind, torch.bfloat16))
    ours = lorakit.prepare_model_for_kbit_training(load(llama_dir, kind, torch.bfloat16))
    their_params, our_params = dict(theirs.named_parameters()), dict(ours.named_parameters())
    assert their_params.keys() == our_params.keys()
    for name, param in our_params.items():
        if kind == "torchao-int8" and param.dtype != their_params[name].dtype:
            # peft casts nothing on a torchao model; lorakit casts what is not quantized, as for bitsandbytes
            assert param.dtype == torch.float32 and "weight" in name and not name.endswith("proj.weight"), name
            continue
        assert (param.dtype, param.requires_grad) == (their_params[name].dtype, False), name
    assert ours.is_gradient_checkpointing and theirs.is_gradient_checkpointing
    norm = ours.get_parameter("model.norm.weight")
    assert norm.dtype == torch.float32  # the convention: norms (and every other unquantized weight) in float32


def test_mixed_batches_on_a_4bit_base(llama_dir):
    """Each row of a batch runs its own adapter on the quantized base: what that adapter alone gives the row."""
    model = load(llama_dir, "nf4").eval()
    config = LoraConfig(r=4, target_modules=TARGETS, init_lora_weights=False)
    lorakit.get_lora_model(model, config, adapter_name="a")
    lorakit.add_adapter(model, "b", config.replace(r=2))
    with torch.no_grad():
        expected = []
        for adapter in ["a", "b", "__base__"]:
            if adapter == "__base__":
                with lorakit.disable_adapters(model):
                    expected.append(model(input_ids=IDS[:1]).logits[0])
            else:
                lorakit.set_active_adapters(model, adapter)
                expected.append(model(input_ids=IDS[:1]).logits[0])
        with lorakit.mixed_batch(model, ["a", "b", "__base__"]):
            mixed = model(input_ids=IDS[:1].expand(3, -1)).logits
    assert relative(expected[0], expected[1]) > 1e-2
    torch.testing.assert_close(mixed, torch.stack(expected), rtol=1e-5, atol=1e-5)


def test_summary_counts_the_4bit_weights_as_peft_does(llama_dir, capsys):
    theirs, ours = pair(llama_dir, "nf4")
    theirs.print_trainable_parameters()
    assert str(lorakit.summary(ours)).splitlines()[-1] == capsys.readouterr().out.strip()


# ----- merge: what requantizing keeps, exactness, dequantize --------------------------------------------------


def test_merge_warns_when_requantizing_loses_most_of_the_update(llama_dir):
    model = load(llama_dir, "nf4")
    lorakit.get_lora_model(model, LoraConfig(r=4, target_modules=TARGETS, init_lora_weights="gaussian"))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(param, std=1e-5)  # far below the 4-bit grid's spacing
    with pytest.warns(UserWarning, match=r"layers kept less than 50% of the adapter's update: model\.layers"):
        lorakit.merge(model)
    retention = [layer.update_retention for _, layer in lorakit.lora_layers(model)]
    assert all(kept.retained < 0.5 and kept.error > 0.5 for kept in retention)
    lorakit.unmerge(model)
    assert all(layer.update_retention is None for _, layer in lorakit.lora_layers(model))

    for name, param in model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(param, std=0.3)  # an update well above the grid
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lorakit.merge(model)
    assert all(layer.update_retention.retained > 0.8 for _, layer in lorakit.lora_layers(model))


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_merge_cycles_restore_the_quantized_bytes(llama_dir, kind):
    _, model = pair(llama_dir, kind)
    originals = {name: stored(layer) for name, layer in quantized_layers(model).items()}
    unmerged = logits(model).detach()
    for _ in range(3):
        lorakit.merge(model)
        lorakit.merge(model)  # idempotent
        lorakit.unmerge(model)
    for name, layer in quantized_layers(model).items():
        assert all(torch.equal(a, b) for a, b in zip(stored(layer), originals[name], strict=True)), name
    assert torch.equal(logits(model), unmerged)


def _linear4bit(double_quant: bool) -> nn.Module:
    layer = bnb.nn.Linear4bit(1024, 512, compute_dtype=torch.float32, compress_statistics=double_quant)
    layer.weight = bnb.nn.Params4bit(torch.randn(512, 1024), requires_grad=False, compress_statistics=double_quant)
    return layer.to("cpu")


def _linear8bit() -> nn.Module:
    layer = bnb.nn.Linear8bitLt(1024, 512, has_fp16_weights=False, threshold=0.0)
    layer.weight = bnb.nn.Int8Params(torch.randn(512, 1024), requires_grad=False, has_fp16_weights=False)
    return layer.to("cpu")


def _torchao_int8() -> nn.Module:
    holder = nn.Sequential(nn.Linear(1024, 512))
    torchao_quantization.quantize_(holder, torchao_quantization.Int8WeightOnlyConfig())
    return holder[0]


@pytest.mark.parametrize(
    ("make", "low", "high"),
    [
        # half a byte per weight + one int8 absmax per block of 64 (+ their float32 scales and code tables)
        (lambda: _linear4bit(True), 0.5 + 1 / 64, 0.5 + 1.5 / 64),
        (lambda: _linear4bit(False), 0.5 + 4 / 64, 0.5 + 4.1 / 64),  # + one float32 absmax per block
        (_linear8bit, 1 + 4 / 1024, 1 + 4.1 / 1024),  # a byte + one float32 scale per row of 1024
        (_torchao_int8, 1 + 5 / 1024, 1 + 5.1 / 1024),  # a byte + a float32 scale and an int8 zero point per row
    ],
)
@pytest.mark.filterwarnings("ignore:merging into quantized weights")  # a random adapter, small on the 4-bit grid
def test_a_merged_quantized_layer_keeps_its_packed_original(make, low, high):
    model = nn.ModuleDict({"proj": make()})
    lorakit.get_lora_model(model, LoraConfig(r=8, target_modules=["proj"], init_lora_weights=False))
    x = torch.randn(3, 1024)
    with torch.no_grad():
        expected = model["proj"](x)
        lorakit.merge(model)
        assert low <= model["proj"].merge_residual_bytes() / (1024 * 512) <= high
        lorakit.unmerge(model)
        assert model["proj"].merge_residual_bytes() == 0
        assert torch.equal(model["proj"](x), expected)


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_merge_and_unload_dequantize_gives_a_float_model_with_the_adapter_merged_exactly(llama_dir, kind, tmp_path):
    _, model = pair(llama_dir, kind, lora_dropout=0.0)
    expected = logits(model).detach()
    merged = lorakit.merge_and_unload(model, dequantize=True)
    assert not quantized_layers(merged) and not lorakit.is_lora_model(merged)
    assert all(
        type(m) is nn.Linear and m.weight.dtype == torch.float32 for m in merged.modules() if isinstance(m, nn.Linear)
    )
    torch.testing.assert_close(logits(merged), expected, rtol=1e-4, atol=1e-5)
    assert getattr(merged.config, "quantization_config", None) is None
    merged.save_pretrained(tmp_path)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)  # a plain float checkpoint
    torch.testing.assert_close(logits(reloaded.train()), expected, rtol=1e-4, atol=1e-5)


def test_merge_and_unload_dequantize_refuses_before_changing_anything(llama_dir):
    plain = load(llama_dir, "nf4")
    with pytest.raises(lorakit.LoraError, match="not a LoRA model"):
        lorakit.merge_and_unload(plain, dequantize=True)
    _, model = pair(llama_dir, "nf4")
    with pytest.raises(lorakit.AdapterError, match="nope"):
        lorakit.merge_and_unload(model, "nope", dequantize=True)
    for quantized in (plain, model):
        assert len(quantized_layers(quantized)) == 2 * len(TARGETS)
    with pytest.raises(lorakit.LoraError, match="has_fp16_weights=True"):
        lorakit.get_lora_model(nn.ModuleDict({"proj": bnb.nn.Linear8bitLt(8, 8, has_fp16_weights=True)}),
                               LoraConfig(r=2, target_modules=["proj"]))  # fmt: skip


def test_dequantize_keeps_the_adapters_and_their_training(llama_dir):
    _, model = pair(llama_dir, "nf4")
    expected = logits(model.eval()).detach()
    lorakit.merge(model)  # requantized: dequantize unmerges first, then gives the exact deq(W)
    a = model.get_parameter("model.layers.1.mlp.down_proj.lora_A.default.weight")
    assert lorakit.dequantize(model) is model
    layer = model.get_submodule("model.layers.1.mlp.down_proj")
    assert type(layer) is lorakit.LoraLinear and type(layer.base_layer) is nn.Linear and not layer.merged_adapters
    assert model.get_parameter("model.layers.1.mlp.down_proj.lora_A.default.weight") is a and a.requires_grad
    torch.testing.assert_close(logits(model), expected, rtol=1e-4, atol=1e-5)
    with pytest.raises(lorakit.LoraError, match=r"dtype must be a floating torch\.dtype"):
        lorakit.dequantize(model, dtype=torch.int8)


# ----- files: an adapter trained on a 4-bit base, served on the full-precision base ----------------------------


def train_a_few_steps(model: nn.Module) -> None:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    model.train()
    for _ in range(4):
        model(input_ids=IDS, labels=IDS).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def test_an_adapter_trained_on_4bit_loads_on_the_dequantized_base(llama_dir, tmp_path):
    """Saved in peft's format, the adapter reproduces the dequantized training model's outputs on a float base,
    in lorakit and in peft."""
    model = load(llama_dir, "nf4")
    lorakit.get_lora_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    train_a_few_steps(model)
    lorakit.save_adapter(model, tmp_path / "adapter")
    model.eval()
    with torch.no_grad():
        trained = logits(model)
        lorakit.dequantize(model)
        dequantized = logits(model)
        with lorakit.disable_adapters(model):
            assert relative(dequantized, logits(model)) > 1e-2
    torch.testing.assert_close(dequantized, trained, rtol=1e-4, atol=1e-5)
    lorakit.unload(model).save_pretrained(tmp_path / "dequantized")  # the float base of the 4-bit model

    float_base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "dequantized").eval()
    lorakit.load_adapter(float_base, tmp_path / "adapter")
    in_peft = peft.PeftModel.from_pretrained(
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "dequantized"), tmp_path / "adapter"
    ).eval()
    with torch.no_grad():
        torch.testing.assert_close(logits(float_base), dequantized, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(logits(in_peft), dequantized, rtol=1e-5, atol=1e-6)
        quantized_again = lorakit.load_adapter(load(llama_dir, "nf4").eval(), tmp_path / "adapter")
        torch.testing.assert_close(logits(quantized_again), trained, rtol=1e-5, atol=1e-6)


# ----- what lorakit refuses ------------------------------------------------------------------------------------


def _torchao_dynamic_int8() -> nn.Module:
    holder = nn.Sequential(nn.Linear(64, 64))
    torchao_quantization.quantize_(holder, torchao_quantization.Int8DynamicActivationInt8WeightConfig())
    return holder[0]


def _torch_dynamic_int8() -> nn.Module:
    return torch.ao.quantization.quantize_dynamic(nn.Sequential(nn.Linear(64, 64)), {nn.Linear}, dtype=torch.qint8)[0]


@pytest.mark.parametrize(
    ("make", "kind"), [(_torchao_dynamic_int8, "torchao"), (_torch_dynamic_int8, "torch quantization")]
)
def test_unsupported_quantized_layers_are_refused_naming_the_type(make, kind):
    model = nn.ModuleDict({"proj": make(), "head": nn.Linear(64, 4)})
    with pytest.raises(TargetError) as raised:
        lorakit.get_lora_model(model, LoraConfig(r=4, target_modules=["proj", "head"]))
    message = str(raised.value)
    assert f"module 'proj' is a quantized layer ({type(model['proj']).__module__}" in message and kind in message
    assert "register_lora_layer" in message and "bitsandbytes Linear4bit" in message
    assert not lorakit.is_lora_model(model)


def test_loftq_is_refused_by_name_and_a_loftq_adapter_file_loads(llama_dir, tmp_path):
    with pytest.raises(lorakit.LoraConfigError, match="init_lora_weights='loftq'"):
        LoraConfig(init_lora_weights="loftq")
    model = load(llama_dir, None)
    lorakit.get_lora_model(model, LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    lorakit.save_adapter(model, tmp_path)
    config_path = tmp_path / "adapter_config.json"
    config = config_path.read_text().replace('"init_lora_weights": false', '"init_lora_weights": "loftq"')
    assert '"loftq"' in config
    config_path.write_text(config)
    loaded = lorakit.load_adapter(load(llama_dir, None).eval(), tmp_path)
    torch.testing.assert_close(logits(loaded), logits(model.eval()))
