"""lorakit against the LoRA rows of peft's multiple-active-adapters test matrix.

peft checks two adapters active at once with `MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES` in its
`tests/test_custom_models.py`. Every row of it whose config class is `LoraConfig` is reproduced here as data
(`ROWS`), on the models of `test_peft_matrix` (mirrors of peft's test models). For each row lorakit accepts:

1. peft makes "adapter_1" and "adapter_2" on a seeded model, random A and B (`init_lora_weights=False`), then
   moves every adapter tensor deterministically; both active differ from each alone (else nothing is tested).
2. peft saves them (one sub-directory each); `lorakit.load_adapter` loads both onto a fresh base and
   `lorakit.set_active_adapters` activates both: peft's outputs with both active and with each alone.
3. `lorakit.merge` merges both: equal to the unmerged model and to peft's `merge_adapter` of both;
   `lorakit.unmerge` restores every parameter bit for bit.
4. In train mode with both active, every adapter tensor's gradient of `out.square().mean()` is peft's (the same
   seed before each forward gives both the same dropout masks).
5. `lorakit.save_adapter` writes each adapter as peft did; peft loads both and, both active, computes the same.

Rows lorakit cannot do (`REFUSED`) must raise a `LoraError` naming the feature, from the config and from peft's
files of the row, leaving the model as it was. Where peft itself cannot build the pair (`PEFT_CANNOT_PAIR`), its
refusal is checked, and lorakit's pair of peft's two single adapters (saved apart) is held to peft applying them
one after the other (the first merged into the base, the second on top); merge and unmerge as in 3.
"""

from __future__ import annotations

import copy
import re

import pytest
import torch
from safetensors.torch import load_file
from test_peft_matrix import GRAD_ATOL, GRAD_RTOL, MODELS, assert_close, assert_differs, build, keyed_params, output

import lorakit

peft = pytest.importorskip("peft")

pytestmark = pytest.mark.filterwarnings("ignore:fan_in_fan_out is set to False")

# ----- the rows ---------------------------------------------------------------------------------------------
# Every row of `MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES` whose config class is `LoraConfig`, in peft's order, as
# (name, tuner name, config class, kwargs of adapter 1, kwargs of adapter 2): huggingface/peft,
# tests/test_custom_models.py at commit 0000e79db93dbe4b00b004a01a1f1800ce67894d.
_LIN0 = {"target_modules": ["lin0"], "init_lora_weights": False}
_PARAM0 = {"target_parameters": ["lin0.weight"], "init_lora_weights": False}
_PARAM1 = {"target_parameters": ["lin1.weight"], "init_lora_weights": False}
ROWS = [
    ("LoRA Same", "lora", peft.LoraConfig, _LIN0, _LIN0),
    ("LoRA Different", "lora", peft.LoraConfig, _LIN0, {"target_modules": ["lin1"], "init_lora_weights": False}),
    (
        "LoRA + trainable tokens Same",
        "lora+trainable_tokens",
        peft.LoraConfig,
        {**_LIN0, "trainable_token_indices": {"emb": [0, 1, 2]}},
        {**_LIN0, "trainable_token_indices": {"emb": [3, 4, 5, 6]}},
    ),
    (
        "LoRA + trainable tokens Different",
        "lora+trainable_tokens",
        peft.LoraConfig,
        {**_LIN0, "trainable_token_indices": {"emb": [0, 1, 2]}},
        {"target_modules": ["conv1d"], "init_lora_weights": False, "trainable_token_indices": {"emb": [3, 4, 5, 6]}},
    ),
    ("LoRA targeting nn.Parameter Same", "lora", peft.LoraConfig, _PARAM0, _PARAM0),
    ("LoRA targeting nn.Parameter Different", "lora", peft.LoraConfig, _PARAM0, _PARAM1),
]
# peft's test takes `ModelEmbConv1D` for trainable tokens (they need an embedding), `MLP` otherwise
MODEL_OF = {"lora": "MLP", "lora+trainable_tokens": "EmbConv1D"}
NAMES = ["adapter_1", "adapter_2"]

REFUSED = {  # row → what lorakit's error names (trainable tokens: not built in lorakit)
    "LoRA + trainable tokens Same": "trainable_token_indices=",
    "LoRA + trainable tokens Different": "trainable_token_indices=",
}
# rows whose pair peft 0.21.2 refuses to build (peft's own test skips both target_parameters rows): peft's refusal
# is checked, and lorakit's pair of peft's two single adapters is held to peft applying them one after the other
PEFT_CANNOT_PAIR = {"LoRA targeting nn.Parameter Different": "all adapters must target the same set of parameters"}

ACCEPTED = [row for row in ROWS if row[0] not in REFUSED and row[0] not in PEFT_CANNOT_PAIR]
REFUSED_ROWS = [row for row in ROWS if row[0] in REFUSED]
NO_PAIR_ROWS = [row for row in ROWS if row[0] in PEFT_CANNOT_PAIR]


def _ids(rows: list[tuple]) -> list[str]:
    return [row[0] for row in rows]


# ----- helpers ----------------------------------------------------------------------------------------------


def moved(peft_model: torch.nn.Module, seed: int = 2) -> torch.nn.Module:
    """`peft_model` with every tensor of its adapters moved deterministically, as training would."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(peft_model.named_parameters()):
            if any(f".{adapter}" in name for adapter in NAMES):
                param.add_(0.1 * torch.randn(param.shape, generator=generator))
    return peft_model


def peft_pair(model: str, config_cls: type, kwargs_1: dict, kwargs_2: dict) -> torch.nn.Module:
    """peft's model of the row with both adapters."""
    torch.manual_seed(1)
    peft_model = peft.get_peft_model(build(model), config_cls(**kwargs_1), adapter_name=NAMES[0])
    peft_model.add_adapter(NAMES[1], config_cls(**kwargs_2))
    return moved(peft_model)


def peft_output(peft_model: torch.nn.Module, names: list[str], x: torch.Tensor) -> torch.Tensor:
    """peft's output with `names` active (they stay active)."""
    peft_model.base_model.set_adapter(names)
    return output(peft_model, x)


def assert_same_grads(theirs: torch.nn.Module, ours: torch.nn.Module, adapter: str) -> None:
    """Every tensor of `adapter` has a non-zero gradient, the same in both libraries (keyed by peft's names)."""
    theirs_params = keyed_params(
        list(theirs.parameters()), peft.get_peft_model_state_dict(theirs, adapter_name=adapter)
    )
    ours_params = keyed_params(list(ours.parameters()), lorakit.lora_state_dict(ours, adapter))
    assert theirs_params.keys() == ours_params.keys()
    for key, param in theirs_params.items():
        reference, grad = param.grad, ours_params[key].grad
        assert reference is not None and reference.abs().sum() > 0, f"peft's {adapter} {key} got no gradient"
        assert grad is not None, f"lorakit's {adapter} {key} got no gradient"
        atol = GRAD_ATOL * max(1.0, reference.abs().max().item())
        torch.testing.assert_close(grad, reference, rtol=GRAD_RTOL, atol=atol, msg=lambda m, k=key: f"{k}: {m}")


# ----- the tests --------------------------------------------------------------------------------------------


def test_the_rows_are_peft_lora_rows():
    assert len(ROWS) == 6 and len(set(_ids(ROWS))) == 6
    assert all(config_cls is peft.LoraConfig for _, _, config_cls, _, _ in ROWS)
    assert set(REFUSED) | set(PEFT_CANNOT_PAIR) <= set(_ids(ROWS)) and not set(REFUSED) & set(PEFT_CANNOT_PAIR)
    assert {tuner for _, tuner, *_ in ROWS} == set(MODEL_OF)


@pytest.mark.parametrize(("row", "tuner", "config_cls", "kwargs_1", "kwargs_2"), ACCEPTED, ids=_ids(ACCEPTED))
def test_two_active_adapters_equal_peft(row, tuner, config_cls, kwargs_1, kwargs_2, tmp_path):
    model = MODEL_OF[tuner]
    x = MODELS[model].inputs()
    theirs = peft_pair(model, config_cls, kwargs_1, kwargs_2)

    # 1. peft: each adapter alone, then both; all different, and different from the base
    alone = {name: peft_output(theirs, [name], x) for name in NAMES}
    both = peft_output(theirs, NAMES, x)
    base = output(build(model), x)
    assert_differs(alone["adapter_1"], alone["adapter_2"], "peft's two adapters must differ")
    for name, out in alone.items():
        assert_differs(out, base, f"peft's {name} must change the output")
        assert_differs(both, out, f"peft with both active must differ from {name} alone")
    theirs.save_pretrained(tmp_path / "peft")

    # 2. peft's files into lorakit, each adapter alone and both active
    ours = build(model)
    for name in NAMES:
        lorakit.load_adapter(ours, tmp_path / "peft" / name, adapter_name=name, trainable=True)
    assert lorakit.adapter_names(ours) == NAMES
    for name in NAMES:
        lorakit.set_active_adapters(ours, name)
        assert_close(output(ours, x), alone[name], f"lorakit vs peft, {name} alone")
    lorakit.set_active_adapters(ours, NAMES)
    assert lorakit.active_adapters(ours) == NAMES
    unmerged = output(ours, x)
    assert_close(unmerged, both, "lorakit vs peft, both active")

    # 3. merge both, unmerge bit for bit
    before = {name: param.detach().clone() for name, param in ours.named_parameters()}
    lorakit.merge(ours)
    for layer_name, layer in lorakit.lora_layers(ours):
        assert layer.merged_adapters == [a for a in NAMES if a in layer.r], f"{layer_name} merged something else"
    merged = output(ours, x)
    assert_close(merged, unmerged, "lorakit merged vs unmerged")
    peft_merged = copy.deepcopy(theirs)
    peft_merged.base_model.merge_adapter(NAMES)
    assert_close(output(peft_merged, x), both, "peft merged vs unmerged")
    assert_close(merged, output(peft_merged, x), "lorakit merged vs peft merged")
    lorakit.unmerge(ours)
    for name, param in ours.named_parameters():
        assert torch.equal(param, before[name]), f"{name} not restored bit for bit"
    assert torch.equal(output(ours, x), unmerged)

    # 4. gradients in train mode, both active (the same seed before each forward: the same dropout masks)
    for model_ in (theirs, ours):
        model_.train()
        torch.manual_seed(3)
        model_(x).square().mean().backward()
    saved = {name: lorakit.lora_state_dict(ours, name) for name in NAMES}
    assert sum(p.requires_grad for p in ours.parameters()) == sum(map(len, saved.values()))
    assert sum(p.requires_grad for p in theirs.parameters()) == sum(map(len, saved.values()))
    for name in NAMES:
        assert_same_grads(theirs, ours, name)

    # 5. lorakit's files: peft's tensors, and peft computes the same from them with both active
    for name in NAMES:
        lorakit.save_adapter(ours, tmp_path / "lorakit" / name, adapter_name=name)
        ours_file = load_file(tmp_path / "lorakit" / name / "adapter_model.safetensors")
        peft_file = load_file(tmp_path / "peft" / name / "adapter_model.safetensors")
        assert ours_file.keys() == peft_file.keys()
        assert all(torch.equal(ours_file[key], peft_file[key]) for key in peft_file), f"{name}: other tensors"
    in_peft = peft.PeftModel.from_pretrained(build(model), tmp_path / "lorakit" / NAMES[0], adapter_name=NAMES[0])
    in_peft.load_adapter(tmp_path / "lorakit" / NAMES[1], adapter_name=NAMES[1])
    for name in NAMES:
        assert_close(peft_output(in_peft, [name], x), alone[name], f"peft with lorakit's {name} alone")
    assert_close(peft_output(in_peft, NAMES, x), both, "peft with lorakit's files, both active")


@pytest.mark.parametrize(("row", "tuner", "config_cls", "kwargs_1", "kwargs_2"), REFUSED_ROWS, ids=_ids(REFUSED_ROWS))
def test_refused_row_raises(row, tuner, config_cls, kwargs_1, kwargs_2, tmp_path):
    model = MODEL_OF[tuner]
    says = re.escape(REFUSED[row])
    for kwargs in (kwargs_1, kwargs_2):
        with pytest.raises(lorakit.LoraError, match=says):
            lorakit.get_lora_model(build(model), lorakit.LoraConfig(**kwargs))
    peft_pair(model, config_cls, kwargs_1, kwargs_2).save_pretrained(tmp_path)
    for name in NAMES:
        fresh = build(model)
        original = copy.deepcopy(fresh.state_dict())
        with pytest.raises(lorakit.LoraError, match=says):
            lorakit.load_adapter(fresh, tmp_path / name, adapter_name=name)
        assert not lorakit.is_lora_model(fresh) and fresh.state_dict().keys() == original.keys()
        assert all(torch.equal(value, original[key]) for key, value in fresh.state_dict().items()), "model changed"


@pytest.mark.parametrize(("row", "tuner", "config_cls", "kwargs_1", "kwargs_2"), NO_PAIR_ROWS, ids=_ids(NO_PAIR_ROWS))
def test_pair_peft_cannot_build(row, tuner, config_cls, kwargs_1, kwargs_2, tmp_path):
    model = MODEL_OF[tuner]
    with pytest.raises(ValueError, match=re.escape(PEFT_CANNOT_PAIR[row])):  # once peft can: move the row
        peft_pair(model, config_cls, kwargs_1, kwargs_2)
    x = MODELS[model].inputs()
    torch.manual_seed(1)
    alone = {}
    for seed, (name, kwargs) in enumerate(zip(NAMES, (kwargs_1, kwargs_2), strict=True)):
        single = moved(peft.get_peft_model(build(model), config_cls(**kwargs), adapter_name=name), seed)
        alone[name] = output(single, x)
        single.save_pretrained(tmp_path)
    # peft's oracle: adapter_1 merged into the base, adapter_2 on top
    first = peft.PeftModel.from_pretrained(build(model), tmp_path / NAMES[0], adapter_name=NAMES[0])
    both = output(peft.PeftModel.from_pretrained(first.merge_and_unload(), tmp_path / NAMES[1]), x)
    for name in NAMES:
        assert_differs(both, alone[name], f"peft's composition must differ from {name} alone")

    ours = build(model)
    for name in NAMES:
        lorakit.load_adapter(ours, tmp_path / name, adapter_name=name)
        lorakit.set_active_adapters(ours, name)
        assert_close(output(ours, x), alone[name], f"lorakit vs peft, {name} alone")
    lorakit.set_active_adapters(ours, NAMES)
    unmerged = output(ours, x)
    assert_close(unmerged, both, "lorakit with both active vs peft's composition")
    before = {name: param.detach().clone() for name, param in ours.named_parameters()}
    lorakit.merge(ours)
    assert [layer.merged_adapters for _, layer in lorakit.lora_layers(ours)] == [[name] for name in NAMES]
    assert_close(output(ours, x), unmerged, "lorakit merged vs unmerged")
    lorakit.unmerge(ours)
    assert all(torch.equal(param, before[name]) for name, param in ours.named_parameters()), "unmerge not exact"
