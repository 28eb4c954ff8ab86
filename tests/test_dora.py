"""DoRA (`use_dora=True`) on Linear, transformers Conv1D, Embedding and Conv1d/2d/3d layers, against peft 0.21 on
the same models.

peft and lorakit convert deep copies of one model; peft's random adapter (`init_lora_weights=False`) and its
magnitudes are copied into lorakit. Forward outputs, every gradient (A, B and the magnitude), the merged
weights and the files (both ways) must equal peft's; unmerge must restore every bit.
"""

from __future__ import annotations

import copy
import re

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


class ConvNet(nn.Module):
    """Token ids through an embedding, every convolution kind (kernels 1 and 3, with and without a bias, a stride)
    and a linear head: `logits (batch, tokens, 64)`."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(64, 16, padding_idx=0)
        self.conv1d = nn.Conv1d(16, 16, 3, padding=1)
        self.conv2d = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.pointwise = nn.Conv2d(4, 4, 1)
        self.conv3d = nn.Conv3d(4, 4, (1, 3, 3), padding=(0, 1, 1))
        self.strided = nn.Conv1d(16, 16, 2, stride=2, padding=1)
        self.head = nn.Linear(16, 64)

    def forward(self, input_ids: torch.Tensor) -> transformers.modeling_outputs.BaseModelOutput:
        batch, tokens = input_ids.shape
        h = self.conv1d(self.embed(input_ids).transpose(1, 2)).tanh()  # (batch, 16, tokens)
        grid = h.reshape(batch, 4, 4, tokens)
        grid = self.pointwise(self.conv2d(grid).tanh())
        h = self.conv3d(grid.unsqueeze(2)).squeeze(2).reshape(batch, 16, tokens)
        h = h + self.strided(h).repeat_interleave(2, dim=2)[..., :tokens]
        return transformers.modeling_outputs.CausalLMOutput(logits=self.head(h.transpose(1, 2).tanh()))


def tiny_bert_without_dropout() -> nn.Module:
    model = tiny_bert()
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0  # the two libraries' training-mode forwards are compared
    return model


CONVS = ["embed", "conv1d", "conv2d", "pointwise", "conv3d", "strided", "head"]
MODELS = {  # name → (model, targets, LoRA options)
    "llama (Linear)": (tiny_llama, LLAMA_TARGETS, {}),
    "gpt2 (Conv1D)": (tiny_gpt2, ["c_attn", "c_proj"], {"fan_in_fan_out": True}),  # as peft wants it said
    "bert (Embedding)": (tiny_bert_without_dropout, ["word_embeddings", "query", "value"], {}),
    "convolutions": (ConvNet, CONVS, {}),
}
IDS = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(3))


def peft_key(name: str) -> str:
    """lorakit's in-memory parameter name as peft's: its magnitudes are modules with a `.weight`."""
    return "base_model.model." + re.sub(r"(lora_magnitude_vector\.[^.]+)$", r"\1.weight", name)


def pair(make, targets, options=None) -> tuple[nn.Module, nn.Module]:
    """(peft model, lorakit model) on copies of one base, lorakit holding peft's random DoRA adapter."""
    base = make()
    options = {"r": 4, "lora_alpha": 8, "target_modules": targets, "use_dora": True, **(options or {})}
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


@pytest.mark.parametrize("model", ["llama (Linear)", "convolutions"])
def test_hot_swapping_a_dora_adapter(model, tmp_path):
    """A DoRA adapter of a smaller rank and another scaling (4 against the slot's 2) swapped into a DoRA slot computes
    what it computes loaded afresh."""
    make, targets, _ = MODELS[model]
    donor = lorakit.get_lora_model(make(), LoraConfig(r=2, lora_alpha=8, target_modules=targets, use_dora=True,
                                                      init_lora_weights=False))  # fmt: skip
    lorakit.save_adapter(donor, tmp_path)
    model = lorakit.get_lora_model(make().eval(), LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                             use_dora=True))  # fmt: skip
    with torch.no_grad():
        before = logits(model)
        lorakit.hot_swap_adapter(model, tmp_path)
        swapped = logits(model)
        expected = logits(lorakit.load_adapter(make().eval(), tmp_path))
    assert ((swapped - before).norm() / before.norm()) > 1e-2
    torch.testing.assert_close(swapped, expected, rtol=RTOL, atol=ATOL)


def test_a_new_dora_adapter_starts_as_the_base_model():
    model = tiny_llama().eval()
    with torch.no_grad():
        before = logits(model)
        lorakit.get_lora_model(model, LoraConfig(r=4, target_modules=LLAMA_TARGETS, use_dora=True))
        torch.testing.assert_close(logits(model), before, rtol=1e-6, atol=1e-6)  # m = ‖W‖, B = 0


def test_a_replaced_adapter_gets_its_own_norms():
    """Deleting a DoRA adapter and adding another of the same name, or training it, never reuses stale norms."""
    model = tiny_llama().eval()
    config = LoraConfig(r=4, target_modules=["q_proj"], use_dora=True, init_lora_weights=False)
    lorakit.get_lora_model(model, config, adapter_name="a")
    lorakit.add_adapter(model, "b", config)
    lorakit.set_active_adapters(model, "b")
    with torch.no_grad():
        logits(model)
        lorakit.set_active_adapters(model, "a")
        lorakit.delete_adapter(model, "b")
        torch.manual_seed(5)
        lorakit.add_adapter(model, "b", config)
        lorakit.set_active_adapters(model, "b")
        fresh = copy.deepcopy(model)  # a copy computes its norms anew
        torch.testing.assert_close(logits(model), logits(fresh), rtol=0, atol=0)
        model.get_parameter("model.layers.0.self_attn.q_proj.lora_B.b.weight").mul_(3)
        fresh.get_parameter("model.layers.0.self_attn.q_proj.lora_B.b.weight").mul_(3)
        torch.testing.assert_close(logits(model), logits(copy.deepcopy(fresh)), rtol=0, atol=0)


def test_dora_beside_plain_lora_and_disabled():
    theirs, ours = pair(*MODELS["llama (Linear)"])
    plain = {"r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "k_proj"]}
    theirs.add_adapter("plain", peft.LoraConfig(init_lora_weights=False, **plain))
    lorakit.add_adapter(ours, "plain", LoraConfig(**plain))
    with torch.no_grad():
        for name, param in ours.named_parameters():
            if ".plain" in name:
                param.copy_(theirs.get_parameter(f"base_model.model.{name}"))
    for order in (["default", "plain"], ["plain", "default"]):  # DoRA after plain LoRA rescales its branch
        theirs.base_model.set_adapter(order)
        lorakit.set_active_adapters(ours, order)
        with torch.no_grad():
            torch.testing.assert_close(logits(ours), logits(theirs), rtol=RTOL, atol=ATOL)
            with lorakit.disable_adapters(ours), theirs.disable_adapter():
                torch.testing.assert_close(logits(ours), logits(theirs), rtol=RTOL, atol=ATOL)
    before = {n: p.detach().clone() for n, p in ours.named_parameters() if "base_layer" in n}
    with pytest.raises(lorakit.MergeError, match="runs a DoRA adapter beside others"):
        lorakit.merge(ours)
    assert all(torch.equal(ours.get_parameter(n), p) for n, p in before.items()), "nothing merged"


def test_two_dora_adapters_at_once_and_dropout():
    """Two active DoRA adapters (each relative to the base output, as peft computes them), and a training forward
    with dropout, whose DoRA term recomputes the base output on the dropped-out input."""
    theirs, ours = pair(*MODELS["llama (Linear)"])
    second = {"r": 2, "lora_alpha": 2, "target_modules": ["q_proj", "down_proj"], "use_dora": True}
    theirs.add_adapter("second", peft.LoraConfig(init_lora_weights=False, **second))
    lorakit.add_adapter(ours, "second", LoraConfig(**second))
    with torch.no_grad():
        for name, param in ours.named_parameters():
            if ".second" in name:
                param.copy_(theirs.get_parameter(peft_key(name)))
    theirs.base_model.set_adapter(["default", "second"])
    lorakit.set_active_adapters(ours, ["default", "second"])
    expected, actual = logits(theirs), logits(ours)
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=ATOL)
    expected.square().mean().backward()
    actual.square().mean().backward()
    for name, param in ours.named_parameters():
        if param.requires_grad:
            reference = theirs.get_parameter(peft_key(name)).grad
            torch.testing.assert_close(param.grad, reference, rtol=1e-4, atol=1e-7, msg=name)

    # dropout: the same mask in both libraries is out of reach, so check the math on one layer by hand
    layer = lorakit.LoraLinear(nn.Linear(16, 8))
    layer.add_adapter("d", 4, 8.0, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.5, use_dora=True,
                                              init_lora_weights=False))  # fmt: skip
    layer.set_active(["d"])
    x = torch.randn(5, 16)
    torch.manual_seed(7)
    out = layer.train()(x)
    torch.manual_seed(7)
    dropped = torch.nn.functional.dropout(x, 0.5, training=True)
    w, a, b, m, s = (
        layer.weight,
        layer.lora_A["d"].weight,
        layer.lora_B["d"].weight,
        layer.lora_magnitude_vector["d"],
        2.0,
    )
    f = m / (w + s * b @ a).norm(dim=1)
    by_hand = x @ w.T + layer.bias + (f - 1) * (dropped @ w.T) + f * s * (dropped @ a.T @ b.T)
    torch.testing.assert_close(out, by_hand, rtol=1e-5, atol=1e-6)


def test_dora_where_lorakit_does_not_have_it_is_refused():
    grouped = nn.ModuleDict({"conv": nn.Conv2d(4, 4, 3, groups=2)})
    with pytest.raises(lorakit.LoraError, match=r"use_dora=True is not supported on a Conv2d with groups=2"):
        lorakit.get_lora_model(grouped, LoraConfig(r=2, target_modules=["conv"], use_dora=True))
    with pytest.raises(lorakit.LoraError, match=r"lora_bias=True is not supported for DoRA"):
        LoraConfig(r=2, use_dora=True, lora_bias=True)
    model = lorakit.get_lora_model(tiny_llama().eval(), LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    stacked = lorakit.mixed_batch(model, ["default", "__base__"])
    with pytest.raises(lorakit.LoraError, match=r"DoRA adapters \['default'\] cannot run in a mixed batch"):
        stacked.__enter__()
    lorakit.add_adapter(model, "plain", LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(lorakit.LoraError, match=r"cannot run in a mixed batch or as X-LoRA experts"):
        lorakit.get_xlora_model(model, lorakit.XLoraConfig(), adapters={"default": None, "plain": None})
    assert not hasattr(model, "xlora_classifier"), "nothing left behind"
    bnb = pytest.importorskip("bitsandbytes")
    layer = bnb.nn.Linear4bit(64, 64, compute_dtype=torch.float32)
    layer.weight = bnb.nn.Params4bit(torch.randn(64, 64), requires_grad=False, quant_type="nf4")
    quantized = nn.ModuleDict({"proj": layer.to("cpu")})
    with pytest.raises(lorakit.LoraError, match=r"DoRA\) is not supported on Linear4bit layers"):
        lorakit.get_lora_model(quantized, LoraConfig(r=2, target_modules=["proj"], use_dora=True))
