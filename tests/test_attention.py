"""LoRA on `nn.MultiheadAttention`: the math against plain torch, merge and unload, files, what is refused.

peft is the oracle in `tests/test_peft_matrix.py` (its two MultiheadAttention rows, with peft 0.21.2's doubled
output-projection update accounted for); here lorakit's forward and gradients are checked against the module's
own forward on `W + ΔW`, computed independently: autograd on the merged weights, then the chain rule
`dA = s·Bᵀ·dW`, `dB = s·dW·Aᵀ`.
"""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import lorakit

EMBED, HEADS, R, ALPHA = 12, 3, 4, 8
OUT_PROJ = "base_layer.out_proj."


class Encoder(nn.Module):
    """Self-attention (sequence first, as nn.MultiheadAttention's default) and a head."""

    def __init__(self, batch_first: bool = False) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(EMBED, HEADS, batch_first=batch_first)
        self.head = nn.Linear(EMBED, 5)

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self.attn(x, x, x, key_padding_mask=key_padding_mask, need_weights=False)[0])


def encoder() -> Encoder:
    torch.manual_seed(0)
    return Encoder()


def inputs() -> torch.Tensor:
    return torch.randn(7, 2, EMBED, generator=torch.Generator().manual_seed(1))  # (tokens, batch, embed)


def converted(**config) -> Encoder:
    torch.manual_seed(2)
    model = lorakit.get_lora_model(
        encoder(), lorakit.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["attn"], init_lora_weights=False, **config)
    )
    return model


def factors(model: Encoder) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """`{base parameter: (A, B)}` of adapter "default"."""
    params = model.attn.adapter_parameters("default")
    return {
        "in_proj_weight": (params["lora_A.weight"], params["lora_B.weight"]),
        "out_proj.weight": (params[OUT_PROJ + "lora_A.weight"], params[OUT_PROJ + "lora_B.weight"]),
    }


def test_forward_and_gradients_are_those_of_the_merged_weights():
    model = converted()
    x = inputs()
    mask = torch.tensor([[False] * 6 + [True], [False] * 7])
    loss = model(x, key_padding_mask=mask).square().mean()
    loss.backward()

    reference = copy.deepcopy(encoder())
    s = ALPHA / R
    with torch.no_grad():
        for name, (a, b) in factors(model).items():
            reference.attn.get_parameter(name).add_(s * (b @ a))
    reference_loss = reference(x, key_padding_mask=mask).square().mean()
    reference_loss.backward()
    torch.testing.assert_close(loss, reference_loss, rtol=1e-6, atol=0)
    for name, (a, b) in factors(model).items():
        d_weight = reference.attn.get_parameter(name).grad
        torch.testing.assert_close(a.grad, s * b.detach().T @ d_weight, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(b.grad, s * d_weight @ a.detach().T, rtol=1e-5, atol=1e-7)
    frozen = [name for name, param in model.named_parameters() if "lora_" not in name]
    assert all(not model.get_parameter(name).requires_grad for name in frozen)
    assert all(model.get_parameter(name).grad is None for name in frozen)


def test_merge_unmerge_restore_every_bit_and_merge_and_unload_gives_the_plain_module():
    model = converted().eval()
    x = inputs()
    before = {name: param.detach().clone() for name, param in model.named_parameters()}
    with torch.no_grad():
        unmerged = model(x)
        lorakit.merge(model)
        merged = model(x)
        lorakit.unmerge(model)
        assert torch.equal(model(x), unmerged)
    torch.testing.assert_close(merged, unmerged, rtol=1e-5, atol=1e-6)
    for name, param in model.named_parameters():
        assert torch.equal(param, before[name]), name

    plain = lorakit.merge_and_unload(model)
    assert type(plain.attn) is nn.MultiheadAttention
    assert type(plain.attn.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    assert [name for name, _ in plain.named_parameters()] == [name for name, _ in encoder().named_parameters()]
    with torch.no_grad():
        torch.testing.assert_close(plain(x), unmerged, rtol=1e-5, atol=1e-6)


def test_two_active_adapters_add_up_and_disabling_gives_the_base():
    model = converted()
    torch.manual_seed(3)
    lorakit.add_adapter(model, "other", lorakit.LoraConfig(r=2, target_modules=["attn"], init_lora_weights=False))
    x = inputs()
    with torch.no_grad():
        base = encoder()(x)
        lorakit.set_active_adapters(model, ["default", "other"])
        both = model(x)
        reference = encoder()
        for adapter in ("default", "other"):
            for name, delta in model.attn.delta_weights(adapter).items():
                reference.attn.get_parameter(name).add_(delta)
        torch.testing.assert_close(both, reference(x), rtol=1e-5, atol=1e-6)
        with lorakit.disable_adapters(model):
            assert torch.equal(model(x), base)


def test_files_keep_peft_keys_and_load_back(tmp_path):
    model = converted().eval()
    lorakit.save_adapter(model, tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    prefix = "base_model.model.attn."
    assert {key: tuple(value.shape) for key, value in tensors.items()} == {
        prefix + "lora_A.weight": (R, EMBED),
        prefix + "lora_B.weight": (3 * EMBED, R),
        prefix + OUT_PROJ + "lora_A.weight": (R, EMBED),
        prefix + OUT_PROJ + "lora_B.weight": (EMBED, R),
    }
    reloaded = lorakit.load_adapter(encoder(), tmp_path).eval()
    x = inputs()
    with torch.no_grad():
        assert torch.equal(reloaded(x), model(x))

    swapped = converted(lora_dropout=0.0)  # another start, then the saved weights swapped into its slot
    with torch.no_grad():
        for param in swapped.attn.adapter_parameters("default").values():
            param.mul_(-1)
    lorakit.hot_swap_adapter(swapped, tmp_path, "default")
    with torch.no_grad():
        assert torch.equal(swapped.eval()(x), model(x))


def test_a_bfloat16_base_with_float32_adapters():
    model = encoder().to(torch.bfloat16)
    torch.manual_seed(2)
    lorakit.get_lora_model(model, lorakit.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["attn"],
                                                      init_lora_weights=False))  # fmt: skip
    assert all(p.dtype == torch.float32 for p in model.attn.adapter_parameters("default").values())
    x = inputs().to(torch.bfloat16)
    out = model(x)
    assert out.dtype == torch.bfloat16
    out.float().square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.attn.adapter_parameters("default").values())


def test_what_is_refused_or_warned():
    with pytest.raises(lorakit.LoraError, match=r"lora_bias=True is not supported on nn\.MultiheadAttention"):
        converted(lora_bias=True)
    with pytest.warns(UserWarning, match=r"lora_dropout=0\.1 does not apply to nn\.MultiheadAttention"):
        converted(lora_dropout=0.1)

    class CrossAttention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(EMBED, HEADS, kdim=6, vdim=6)

    with pytest.raises(lorakit.LoraError, match="kdim=6, vdim=6, embed_dim=12"):
        lorakit.get_lora_model(CrossAttention(), lorakit.LoraConfig(target_modules=["attn"]))

    # out_proj is read by the attention's forward, never called: LoRA there would do nothing, so it is no target
    with pytest.raises(lorakit.TargetError, match=r"\['out_proj'\] matched no module"):
        lorakit.get_lora_model(encoder(), lorakit.LoraConfig(target_modules=["out_proj"]))
    all_linear = lorakit.get_lora_model(encoder(), lorakit.LoraConfig(target_modules="all-linear"))
    assert [name for name, _ in lorakit.lora_layers(all_linear)] == ["head"]  # not attn.out_proj

    model = converted().eval()
    with (
        pytest.raises(lorakit.LoraError, match="does not support many adapters in one batch"),
        lorakit.mixed_batch(model, ["default", "default"]),
    ):
        model(inputs()[:, :2])


def test_a_transformer_encoder_layer_runs_its_lora_in_eval_mode_too():
    """torch's fused inference path of `nn.TransformerEncoderLayer` (eval, no grad) reads self_attn's, linear1's
    and linear2's weights without calling them; lorakit keeps it off while the layer holds LoRA, and gives it back
    at unload."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(EMBED, HEADS, dim_feedforward=24, batch_first=True).eval()
    base = copy.deepcopy(layer)
    torch.manual_seed(1)
    config = lorakit.LoraConfig(r=R, target_modules=["self_attn", "linear1"], init_lora_weights=False)
    lorakit.get_lora_model(layer, config).eval()
    reference = copy.deepcopy(base)
    with torch.no_grad():
        for name, module in (("self_attn", layer.self_attn), ("linear1", layer.linear1)):
            for param_name, delta in module.delta_weights("default").items():
                reference.get_submodule(name).get_parameter(param_name).add_(delta)
    x = inputs().transpose(0, 1)  # (batch, tokens, embed)
    with torch.no_grad():
        expected = reference(x)  # a plain layer: the fused path
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
        assert (expected - base(x)).abs().max() > 1e-2, "the adapter must change the output"
        plain = lorakit.merge_and_unload(layer)
        assert not plain._forward_pre_hooks  # the fused path is allowed again
        torch.testing.assert_close(plain(x), expected, rtol=1e-5, atol=1e-5)
