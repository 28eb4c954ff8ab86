"""`register_lora_layer`: the fused-QKV example from the README and examples/fused_qkv.py."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from torch import nn

import lorakit
from lorakit import LoraConfig, LoraError, TargetError

_spec = importlib.util.spec_from_file_location(
    "fused_qkv_example", Path(__file__).resolve().parents[1] / "examples" / "fused_qkv.py"
)
example = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(example)  # registers FusedQKV -> LoraFusedQKV


def test_unregistered_type_points_to_register_lora_layer():
    class OtherFused(example.FusedQKV):
        pass

    class Holder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.qkv = OtherFused(4)

    # a subclass of a registered type is covered by its parent's entry...
    lorakit.get_lora_model(Holder(), LoraConfig(target_modules=["qkv"]))

    class Unrelated(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.zeros(2, 2))

    holder = nn.ModuleDict({"odd": Unrelated()})
    with pytest.raises(TargetError, match=r"Unrelated.*register_lora_layer"):
        lorakit.get_lora_model(holder, LoraConfig(target_modules=["odd"]))


@pytest.mark.parametrize(
    ("base", "lora"), [(int, lorakit.LoraLinear), (nn.Linear, nn.Linear), (example.FusedQKV, "LoraFusedQKV")]
)
def test_register_validates_its_arguments(base, lora):
    with pytest.raises(LoraError, match="register_lora_layer"):
        lorakit.register_lora_layer(base, lora)


def test_fused_qkv_trains_merges_unmerges_and_saves():
    torch.manual_seed(0)
    model = example.Attention(16)
    lorakit.get_lora_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["qkv"], init_lora_weights=False))
    assert isinstance(model.qkv, example.LoraFusedQKV)
    x = torch.randn(2, 6, 16)
    with lorakit.disable_adapters(model):
        base = model(x)
    adapted = model(x)
    assert (adapted - base).abs().max() > 1e-3

    # the adapter's forward equals the base with ΔW merged by hand
    layer = model.qkv
    delta = layer.lora_B["default"].weight @ layer.lora_A["default"].weight * layer.scaling["default"]
    q, k, v = torch.nn.functional.linear(x, layer.base_layer.weight + delta).split(16, dim=-1)
    expected = model.out(torch.nn.functional.scaled_dot_product_attention(q, k, v))
    torch.testing.assert_close(adapted, expected, rtol=1e-5, atol=1e-6)

    weight = layer.base_layer.weight.detach().clone()
    lorakit.merge(model)
    with torch.no_grad():  # a training-mode forward with grad while merged is refused: it would train nothing
        torch.testing.assert_close(model(x), adapted, rtol=1e-5, atol=1e-6)
    lorakit.unmerge(model)
    assert torch.equal(layer.base_layer.weight, weight)

    assert set(lorakit.lora_state_dict(model)) == {
        "base_model.model.qkv.lora_A.weight",
        "base_model.model.qkv.lora_B.weight",
    }
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    loss = model(x).square().mean()
    loss.backward()
    optimizer.step()
    assert model(x).square().mean() < loss
    assert torch.equal(layer.base_layer.weight, weight)
