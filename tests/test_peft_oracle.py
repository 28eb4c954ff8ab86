"""HuggingFace peft 0.21 as the numerical oracle for lorakit (design §2-§4).

For every layer kind lorakit supports, one seeded model is deep-copied twice: peft converts one copy with
random A and B (`init_lora_weights=False`), lorakit the other; peft's adapter tensors are then copied into
lorakit through the two libraries' state dicts (same key names by design, so the key sets must be equal).
Forward outputs, delta weights, merged outputs, exact unmerge and gradients must then agree in float32.

Every comparison is preceded by a check that the LoRA contribution is non-trivial, so a LoRA branch that is
silently skipped (or B left at zero) fails instead of comparing base against base.

peft ignores a conv's dilation (its A conv gets dilation 1), so the dilated Conv2d case is checked against a
hand-computed reference instead.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lorakit
from lorakit.layers.linear_fast import FLOAT32_BRANCH_MAX_MACS

peft = pytest.importorskip("peft")
pytorch_utils = pytest.importorskip("transformers.pytorch_utils")
Conv1D = pytorch_utils.Conv1D

from peft.tuners.lora import LoraLayer as PeftLoraLayer  # noqa: E402
from peft.utils.other import ModulesToSaveWrapper  # noqa: E402

# peft warns that a 1-D `lora_B.bias` looks like an ungathered ZeRO-3 shard; it is lora_bias, as intended.
# peft also warns that a grouped conv adapter cannot be merged; lorakit's MergeError for that is tested here.
pytestmark = [
    pytest.mark.filterwarnings("ignore:Adapter .*LoRA tensor"),
    pytest.mark.filterwarnings("ignore:LoRA adapter added to ConvNd layer with groups"),
]

RTOL, ATOL = 1e-5, 1e-6
MIN_RELATIVE_EFFECT = 1e-3


def assert_close(actual: torch.Tensor, expected: torch.Tensor, msg: str = "") -> None:
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=ATOL, msg=(lambda m: f"{msg}: {m}") if msg else None)


def assert_differs(actual: torch.Tensor, reference: torch.Tensor, what: str) -> None:
    """`actual` differs from `reference` by more than MIN_RELATIVE_EFFECT (relative, Frobenius norm)."""
    assert actual.shape == reference.shape, what
    relative = ((actual - reference).norm() / reference.norm()).item()
    assert relative > MIN_RELATIVE_EFFECT, f"{what}: relative difference {relative:.2e} is too small to test anything"


# ----- cases ------------------------------------------------------------------------------------------------


def _seq(**layers: nn.Module) -> nn.Sequential:
    return nn.Sequential(OrderedDict(layers))


def _embedding_ids() -> torch.Tensor:
    ids = torch.randint(0, 20, (4, 7))
    ids[:, 0] = 3  # the padding index
    ids[1, 4] = 3
    return ids


@dataclass(frozen=True)
class Case:
    id: str
    build: Callable[[], nn.Module]
    inputs: Callable[[], torch.Tensor]
    config: dict[str, Any]
    peft_only: dict[str, Any] = field(default_factory=dict)  # fields only peft needs (fan_in_fan_out)
    second: dict[str, Any] | None = None  # config of a second adapter "b", made active with "default"
    perturb_saved: bool = False  # make the modules_to_save copies differ from the originals
    dropout: bool = False
    mergeable: bool = True  # False: lorakit.merge must raise MergeError (grouped conv)


CASES = [
    Case(
        "linear_bias",
        lambda: _seq(fc=nn.Linear(16, 12)),
        lambda: torch.randn(3, 5, 16),
        {"r": 4, "lora_alpha": 8, "target_modules": ["fc"]},
    ),
    Case(
        "linear_no_bias",
        lambda: _seq(fc=nn.Linear(16, 12, bias=False)),
        lambda: torch.randn(3, 5, 16),
        {"r": 4, "lora_alpha": 6, "target_modules": ["fc"]},
    ),
    Case(
        "transformers_conv1d",
        lambda: _seq(c_attn=Conv1D(12, 16)),  # nf=12 outputs, nx=16 inputs; weight stored (16, 12)
        lambda: torch.randn(3, 5, 16),
        {"r": 4, "lora_alpha": 8, "target_modules": ["c_attn"]},
        peft_only={"fan_in_fan_out": True},
    ),
    Case(
        "conv1d",
        lambda: _seq(conv=nn.Conv1d(3, 6, 3, padding=1)),
        lambda: torch.randn(2, 3, 10),
        {"r": 4, "lora_alpha": 8, "target_modules": ["conv"]},
    ),
    Case(
        "conv2d_3x3_stride2_pad1",
        lambda: _seq(conv=nn.Conv2d(3, 6, 3, stride=2, padding=1)),
        lambda: torch.randn(2, 3, 9, 9),
        {"r": 4, "lora_alpha": 8, "target_modules": ["conv"]},
    ),
    Case(
        "conv2d_1x1",
        lambda: _seq(conv=nn.Conv2d(4, 6, 1)),
        lambda: torch.randn(2, 4, 5, 5),
        {"r": 3, "lora_alpha": 6, "target_modules": ["conv"]},
    ),
    Case(
        "conv3d",
        lambda: _seq(conv=nn.Conv3d(2, 4, 3, padding=1)),
        lambda: torch.randn(2, 2, 5, 5, 5),
        {"r": 2, "lora_alpha": 4, "target_modules": ["conv"]},
    ),
    Case(
        "embedding_padding_idx",
        lambda: _seq(emb=nn.Embedding(20, 8, padding_idx=3)),
        _embedding_ids,
        {"r": 4, "lora_alpha": 8, "target_modules": ["emb"]},
    ),
    Case(
        "linear_rslora",
        lambda: _seq(fc=nn.Linear(16, 12)),
        lambda: torch.randn(3, 5, 16),
        {"r": 4, "lora_alpha": 8, "use_rslora": True, "target_modules": ["fc"]},
    ),
    Case(
        "conv2d_rslora",
        lambda: _seq(conv=nn.Conv2d(3, 6, 3, padding=1)),
        lambda: torch.randn(2, 3, 6, 6),
        {"r": 4, "lora_alpha": 3, "use_rslora": True, "target_modules": ["conv"]},
    ),
    Case(
        "rank_and_alpha_pattern",
        lambda: _seq(fc1=nn.Linear(16, 12), act=nn.Tanh(), fc2=nn.Linear(12, 10)),
        lambda: torch.randn(3, 5, 16),
        {
            "r": 2,
            "lora_alpha": 4,
            "target_modules": ["fc1", "fc2"],
            "rank_pattern": {"fc2": 5},
            "alpha_pattern": {"fc2": 3},
        },
    ),
    Case(
        "linear_lora_bias",
        lambda: _seq(fc=nn.Linear(16, 12)),
        lambda: torch.randn(3, 5, 16),
        {"r": 4, "lora_alpha": 8, "lora_bias": True, "target_modules": ["fc"]},
    ),
    Case(
        "conv2d_lora_bias",
        lambda: _seq(conv=nn.Conv2d(3, 6, 3, padding=1)),
        lambda: torch.randn(2, 3, 6, 6),
        {"r": 4, "lora_alpha": 8, "lora_bias": True, "target_modules": ["conv"]},
    ),
    Case(
        "two_active_adapters",
        lambda: _seq(fc1=nn.Linear(16, 12), act=nn.Tanh(), fc2=nn.Linear(12, 10)),
        lambda: torch.randn(3, 5, 16),
        {"r": 2, "lora_alpha": 4, "target_modules": ["fc1", "fc2"]},
        second={"r": 3, "lora_alpha": 5, "target_modules": ["fc1"]},
    ),
    Case(
        "two_active_adapters_embedding_conv1d",
        lambda: _seq(emb=nn.Embedding(20, 16, padding_idx=3), c_fc=Conv1D(12, 16)),
        _embedding_ids,
        {"r": 2, "lora_alpha": 4, "target_modules": ["emb", "c_fc"]},
        peft_only={"fan_in_fan_out": True},
        second={"r": 4, "lora_alpha": 2, "use_rslora": True, "target_modules": ["emb", "c_fc"]},
    ),
    Case(
        "lora_dropout",
        lambda: _seq(fc=nn.Linear(16, 12)),
        lambda: torch.randn(3, 5, 16),
        {"r": 4, "lora_alpha": 8, "lora_dropout": 0.3, "target_modules": ["fc"]},
        dropout=True,
    ),
    Case(
        "modules_to_save_head",
        lambda: _seq(fc=nn.Linear(16, 12), act=nn.Tanh(), classifier=nn.Linear(12, 3)),
        lambda: torch.randn(3, 5, 16),
        {"r": 4, "lora_alpha": 8, "target_modules": ["fc"], "modules_to_save": ["classifier"]},
        perturb_saved=True,
    ),
    Case(
        "bias_all",
        lambda: _seq(fc1=nn.Linear(16, 12), act=nn.Tanh(), fc2=nn.Linear(12, 10)),
        lambda: torch.randn(3, 5, 16),
        {"r": 4, "lora_alpha": 8, "target_modules": ["fc1"], "bias": "all"},
    ),
    Case(
        "bias_lora_only",
        lambda: _seq(fc1=nn.Linear(16, 12), act=nn.Tanh(), fc2=nn.Linear(12, 10)),
        lambda: torch.randn(3, 5, 16),
        {"r": 4, "lora_alpha": 8, "target_modules": ["fc1"], "bias": "lora_only"},
    ),
    Case(
        "conv2d_grouped",
        lambda: _seq(conv=nn.Conv2d(4, 6, 3, padding=1, groups=2)),
        lambda: torch.randn(2, 4, 6, 6),
        {"r": 4, "lora_alpha": 8, "target_modules": ["conv"]},
        mergeable=False,
    ),
]
NO_DROPOUT_CASES = [c for c in CASES if not c.dropout]
MERGEABLE_CASES = [c for c in CASES if c.mergeable]
UNMERGEABLE_CASES = [c for c in CASES if not c.mergeable]


def _ids(cases: list[Case]) -> list[str]:
    return [c.id for c in cases]


# ----- building a peft / lorakit pair -------------------------------------------------------------------


@dataclass
class Pair:
    base: nn.Module  # the unconverted model
    peft_model: nn.Module
    lk_model: nn.Module
    x: torch.Tensor
    adapters: list[str]


def _peft_keyed_params(peft_model: nn.Module, adapter: str) -> dict[str, nn.Parameter]:
    """peft state-dict key -> the peft parameter it holds (matched by storage)."""
    by_ptr = {p.data_ptr(): p for p in peft_model.parameters()}
    keyed = {}
    for key, tensor in peft.get_peft_model_state_dict(peft_model, adapter_name=adapter).items():
        assert tensor.data_ptr() in by_ptr, f"peft key {key} is not a view of a peft parameter"
        keyed[key] = by_ptr[tensor.data_ptr()]
    return keyed


def _lk_keyed_params(lk_model: nn.Module, adapter: str) -> dict[str, nn.Parameter]:
    """lorakit state-dict key -> the lorakit parameter it holds (matched by storage)."""
    by_ptr = {p.data_ptr(): p for p in lk_model.parameters()}
    keyed = {}
    for key, tensor in lorakit.lora_state_dict(lk_model, adapter).items():
        assert tensor.data_ptr() in by_ptr, f"lorakit key {key} is not a view of a lorakit parameter"
        keyed[key] = by_ptr[tensor.data_ptr()]
    return keyed


def _copy_adapter(peft_model: nn.Module, lk_model: nn.Module, adapter: str) -> None:
    source = peft.get_peft_model_state_dict(peft_model, adapter_name=adapter)
    target = lorakit.lora_state_dict(lk_model, adapter)
    assert set(target) == set(source), f"key sets differ: lorakit-only {set(target) - set(source)}, " + (
        f"peft-only {set(source) - set(target)}"
    )
    with torch.no_grad():
        for key, value in source.items():
            assert target[key].shape == value.shape, f"{key}: lorakit {target[key].shape} vs peft {value.shape}"
            assert target[key].dtype == value.dtype == torch.float32, key
            target[key].copy_(value)
    for key, value in lorakit.lora_state_dict(lk_model, adapter).items():
        assert torch.equal(value, source[key]), f"{key} did not reach the lorakit parameter"


def _perturb_saved_copies(peft_model: nn.Module) -> None:
    wrappers = [m for m in peft_model.modules() if isinstance(m, ModulesToSaveWrapper)]
    assert wrappers, "the case has modules_to_save but peft wrapped nothing"
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for wrapper in wrappers:
            for name, param in wrapper.modules_to_save["default"].named_parameters():
                param.add_(torch.randn(param.shape, generator=gen))
                original = wrapper.original_module.get_parameter(name)
                assert_differs(param, original, f"saved copy of {name}")


def make_pair(case: Case) -> Pair:
    torch.manual_seed(0)
    base = case.build().eval()
    x = case.inputs()
    peft_model = peft.get_peft_model(
        copy.deepcopy(base), peft.LoraConfig(**case.config, **case.peft_only, init_lora_weights=False)
    )
    # lorakit keeps its default init (B = 0): only the copy from peft makes its adapters non-trivial.
    lk_model = lorakit.get_lora_model(copy.deepcopy(base), lorakit.LoraConfig(**case.config))
    adapters = ["default"]
    if case.second is not None:
        peft_model.add_adapter("b", peft.LoraConfig(**case.second, **case.peft_only, init_lora_weights=False))
        peft_model.base_model.set_adapter(["default", "b"])
        lorakit.add_adapter(lk_model, "b", lorakit.LoraConfig(**case.second))
        lorakit.set_active_adapters(lk_model, ["default", "b"])
        adapters.append("b")
    if case.perturb_saved:
        _perturb_saved_copies(peft_model)
    for adapter in adapters:
        _copy_adapter(peft_model, lk_model, adapter)
    return Pair(base, peft_model, lk_model, x, adapters)


def _layer_pairs(pair: Pair) -> list[tuple[str, PeftLoraLayer, lorakit.LoraLayer]]:
    inner = pair.peft_model.base_model.model
    peft_names = {n for n, m in inner.named_modules() if isinstance(m, PeftLoraLayer)}
    lk_layers = dict(lorakit.lora_layers(pair.lk_model))
    assert set(lk_layers) == peft_names
    return [(name, inner.get_submodule(name), layer) for name, layer in lk_layers.items()]


# ----- the comparisons ----------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=_ids(CASES))
def test_adapter_keys_layers_and_scaling_match(case: Case) -> None:
    pair = make_pair(case)  # asserts the key sets per adapter
    for name, peft_layer, lk_layer in _layer_pairs(pair):
        assert lk_layer.adapter_names == list(peft_layer.r), name
        # peft lists every active adapter name, also those this layer does not have
        assert lk_layer.active_adapters == [a for a in peft_layer.active_adapters if a in peft_layer.r], name
        for adapter in lk_layer.adapter_names:
            assert lk_layer.r[adapter] == peft_layer.r[adapter], (name, adapter)
            assert lk_layer.scaling[adapter] == pytest.approx(peft_layer.scaling[adapter], rel=1e-12), (name, adapter)
    lk_trainable = {id(p) for p in pair.lk_model.parameters() if p.requires_grad}
    peft_trainable = {id(p) for p in pair.peft_model.parameters() if p.requires_grad}
    lk_keys = {
        (a, k) for a in pair.adapters for k, p in _lk_keyed_params(pair.lk_model, a).items() if id(p) in lk_trainable
    }
    peft_keys = {
        (a, k)
        for a in pair.adapters
        for k, p in _peft_keyed_params(pair.peft_model, a).items()
        if id(p) in peft_trainable
    }
    assert lk_keys == peft_keys
    assert len(lk_keys) == len(lk_trainable), "lorakit trains a parameter that is not in the adapter state dict"


@pytest.mark.parametrize("case", CASES, ids=_ids(CASES))
def test_forward_matches_peft(case: Case) -> None:
    pair = make_pair(case)
    pair.peft_model.eval()
    pair.lk_model.eval()
    with torch.no_grad():
        base_out = pair.base(pair.x)
        peft_out = pair.peft_model(pair.x)
        lk_out = pair.lk_model(pair.x)
    assert_differs(peft_out, base_out, "peft output vs base")
    assert_close(lk_out, peft_out)


def test_lora_dropout_is_active_in_train_mode_only() -> None:
    (case,) = [c for c in CASES if c.dropout]
    pair = make_pair(case)
    with torch.no_grad():
        pair.lk_model.eval()
        eval_out = pair.lk_model(pair.x)
        assert torch.equal(pair.lk_model(pair.x), eval_out)
        pair.lk_model.train()
        torch.manual_seed(5)
        train_out = pair.lk_model(pair.x)
    assert_differs(train_out, eval_out, "train-mode output with dropout vs eval")


@pytest.mark.parametrize("case", MERGEABLE_CASES, ids=_ids(MERGEABLE_CASES))
def test_delta_weights_match_peft(case: Case) -> None:
    pair = make_pair(case)
    with torch.no_grad():
        for name, peft_layer, lk_layer in _layer_pairs(pair):
            weight = lk_layer.base_layer.weight
            for adapter in lk_layer.adapter_names:
                deltas = lk_layer.delta_weights(adapter)
                expected = peft_layer.get_delta_weight(adapter)
                assert deltas["weight"].shape == weight.shape, (name, adapter)
                assert_differs(weight + expected, weight, f"{name}/{adapter} ΔW vs W")
                assert_close(deltas["weight"], expected, f"{name}/{adapter} ΔW")
                if peft_layer.lora_bias[adapter]:
                    expected_bias = peft_layer.lora_B[adapter].bias * peft_layer.scaling[adapter]
                    assert_close(deltas["bias"], expected_bias, f"{name}/{adapter} Δbias")
                else:
                    assert "bias" not in deltas


@pytest.mark.parametrize("case", MERGEABLE_CASES, ids=_ids(MERGEABLE_CASES))
def test_merge_matches_peft_and_unmerge_is_exact(case: Case) -> None:
    pair = make_pair(case)
    pair.peft_model.eval()
    pair.lk_model.eval()
    before = {n: p.detach().clone() for n, p in pair.lk_model.named_parameters()}
    with torch.no_grad():
        base_out = pair.base(pair.x)
        unmerged_out = pair.lk_model(pair.x)
        pair.peft_model.merge_adapter()
        lorakit.merge(pair.lk_model)
        peft_merged = pair.peft_model(pair.x)
        lk_merged = pair.lk_model(pair.x)
    assert_differs(peft_merged, base_out, "peft merged output vs base")
    assert_close(lk_merged, peft_merged, "merged outputs")
    for name, peft_layer, lk_layer in _layer_pairs(pair):
        assert lk_layer.merged_adapters == peft_layer.merged_adapters != [], name
        for param_name, param in lk_layer.base_layer.named_parameters():
            assert_close(param, peft_layer.base_layer.get_parameter(param_name), f"merged {name}.{param_name}")
    lorakit.unmerge(pair.lk_model)
    for name, param in pair.lk_model.named_parameters():
        assert torch.equal(param, before[name]), f"{name} not restored bit for bit"
    for name, param in pair.base.named_parameters():
        module_path, param_name = name.rsplit(".", 1)
        candidates = [name] + [f"{module_path}.{inner}.{param_name}" for inner in ("base_layer", "original_module")]
        (lk_name,) = [c for c in candidates if c in before]
        assert torch.equal(before[lk_name], param), f"{name} differs from the unconverted model"
    with torch.no_grad():
        assert torch.equal(pair.lk_model(pair.x), unmerged_out)


@pytest.mark.parametrize("case", UNMERGEABLE_CASES, ids=_ids(UNMERGEABLE_CASES))
def test_unmergeable_layer_raises_and_changes_nothing(case: Case) -> None:
    pair = make_pair(case)
    pair.lk_model.eval()
    before = {n: p.detach().clone() for n, p in pair.lk_model.named_parameters()}
    with torch.no_grad():
        out = pair.lk_model(pair.x)
    assert_differs(out, pair.base(pair.x), "LoRA output vs base")
    with pytest.raises(lorakit.MergeError):
        lorakit.merge(pair.lk_model)
    for name, param in pair.lk_model.named_parameters():
        assert torch.equal(param, before[name]), f"{name} changed by a failed merge"
    assert all(not layer.merged_adapters for _, layer in lorakit.lora_layers(pair.lk_model))
    with torch.no_grad():
        assert torch.equal(pair.lk_model(pair.x), out)


@pytest.mark.parametrize("case", NO_DROPOUT_CASES, ids=_ids(NO_DROPOUT_CASES))
def test_gradients_match_peft(case: Case) -> None:
    pair = make_pair(case)
    for model in (pair.peft_model, pair.lk_model):
        model.train()
        model(pair.x).square().mean().backward()
    compared = 0
    for adapter in pair.adapters:
        peft_params = _peft_keyed_params(pair.peft_model, adapter)
        lk_params = _lk_keyed_params(pair.lk_model, adapter)
        assert set(peft_params) == set(lk_params)
        for key, peft_param in peft_params.items():
            lk_param = lk_params[key]
            assert peft_param.grad is not None, f"peft {key} got no gradient"
            assert lk_param.grad is not None, f"lorakit {key} got no gradient"
            assert peft_param.grad.norm() > 0, f"peft {key} has a zero gradient"
            assert_close(lk_param.grad, peft_param.grad, f"grad of {key} ({adapter})")
            compared += 1
    assert compared >= 2 * len(pair.adapters)
    trainable = [n for n, p in pair.lk_model.named_parameters() if p.requires_grad]
    with_grad = [n for n, p in pair.lk_model.named_parameters() if p.grad is not None]
    assert with_grad == trainable


# ----- half precision on the CPU: the branch peft computes, where it is faster --------------------------


@pytest.mark.parametrize(
    ("layer", "dtype", "rows", "float32_branch"),
    [
        ("Linear", torch.bfloat16, 1, True),
        ("Linear", torch.bfloat16, FLOAT32_BRANCH_MAX_MACS // (8 * (96 + 80)), True),  # the most rows in float32
        ("Linear", torch.bfloat16, FLOAT32_BRANCH_MAX_MACS // (8 * (96 + 80)) + 1, False),
        ("Linear", torch.float16, 1, True),
        ("Linear", torch.float16, 64, True),
        ("Conv1D", torch.bfloat16, 3, True),  # not a plain nn.Linear: the sum goes to a new tensor
        ("Conv1D", torch.bfloat16, 1024, False),
    ],
)
def test_half_precision_inference_branch(layer: str, dtype: torch.dtype, rows: int, float32_branch: bool) -> None:
    """On the CPU without autograd, a float16 branch, or a small bfloat16 one (decoding), runs in float32 and
    is rounded once (it is faster there; see `LoraLinear`). That is how peft computes every branch, so lorakit's
    output is peft's up to the order of float32 rounding; a larger bfloat16 branch is not."""
    torch.manual_seed(0)
    base = _seq(lin=nn.Linear(96, 80) if layer == "Linear" else Conv1D(80, 96)).to(dtype).eval()
    config = {"r": 8, "lora_alpha": 16, "target_modules": ["lin"], "lora_bias": True}
    peft_config = peft.LoraConfig(**config, init_lora_weights=False, fan_in_fan_out=layer == "Conv1D")
    peft_model = peft.get_peft_model(copy.deepcopy(base), peft_config).eval()
    lk_model = lorakit.get_lora_model(copy.deepcopy(base), lorakit.LoraConfig(**config)).eval()
    _copy_adapter(peft_model, lk_model, "default")
    x = torch.randn(rows, 96).to(dtype)
    with torch.no_grad():
        base_out, peft_out, lk_out = base(x), peft_model(x), lk_model(x)
    assert lk_out.dtype == dtype
    assert_differs(peft_out.float(), base_out.float(), "peft output vs base")
    error = (lk_out.float() - peft_out.float()).abs()
    equal = (lk_out == peft_out).float().mean().item()
    eps = torch.finfo(dtype).eps
    if float32_branch:
        # within one rounding of peft's everywhere; bit-equal but where the two float32 sums straddle a rounding
        # boundary (a few elements in a thousand at most)
        assert (error <= eps * peft_out.float().abs()).all()
        assert equal >= 0.99, f"only {equal:.1%} of the outputs equal peft's"
    else:  # the branch rounded in bfloat16 (design §3): close, but often not peft's bits
        assert error.max() <= 2 * eps * peft_out.float().abs().max()
        assert equal < 0.99, f"{equal:.1%} of the outputs equal peft's: is the bfloat16 branch running in float32?"


# ----- dilation: peft ignores it, so compare with a hand-computed reference ------------------------------


@pytest.mark.parametrize(
    ("stride", "padding_mode"), [(1, "zeros"), (2, "zeros"), (1, "reflect"), (2, "circular"), (1, "replicate")]
)
def test_conv2d_dilation_matches_hand_reference(stride: int, padding_mode: str) -> None:
    torch.manual_seed(0)
    base = _seq(conv=nn.Conv2d(3, 5, 3, stride=stride, padding=2, dilation=2, padding_mode=padding_mode)).eval()
    x = torch.randn(2, 3, 11, 11)
    r, alpha = 4, 6.0
    s = alpha / r
    lk_model = lorakit.get_lora_model(
        copy.deepcopy(base),
        lorakit.LoraConfig(r=r, lora_alpha=alpha, target_modules=["conv"], init_lora_weights=False),
    ).eval()
    layer = dict(lorakit.lora_layers(lk_model))["conv"]
    a = layer.lora_A["default"].weight.detach().clone()
    b = layer.lora_B["default"].weight.detach().clone()
    assert a.shape == (r, 3, 3, 3)
    assert b.shape == (5, r, 1, 1)
    weight, bias = base.conv.weight.detach(), base.conv.bias.detach()

    def conv(
        inp: torch.Tensor, w: torch.Tensor, bb: torch.Tensor | None = None, dilation: int = 2, mode: str = padding_mode
    ) -> torch.Tensor:
        # padding = dilation keeps the output size, so the dilation-1 variant is comparable element-wise
        if mode == "zeros":
            return F.conv2d(inp, w, bb, stride=stride, padding=dilation, dilation=dilation)
        return F.conv2d(F.pad(inp, (dilation,) * 4, mode=mode), w, bb, stride=stride, dilation=dilation)

    with torch.no_grad():
        base_out = base(x)
        out = lk_model(x)
    expected = conv(x, weight, bias) + s * F.conv2d(conv(x, a), b)
    ignoring_dilation = conv(x, weight, bias) + s * F.conv2d(conv(x, a, dilation=1), b)
    assert_differs(expected, base_out, "LoRA output vs base")
    assert_differs(expected, ignoring_dilation, "dilation-2 vs dilation-1 LoRA branch")
    if padding_mode != "zeros":
        zero_padded = conv(x, weight, bias) + s * F.conv2d(conv(x, a, mode="zeros"), b)
        assert_differs(expected, zero_padded, f"{padding_mode} vs zero padding in the LoRA branch")
    assert_close(out, expected, "forward")

    delta = s * torch.einsum("or,rikl->oikl", b[:, :, 0, 0], a)
    assert_close(layer.delta_weights("default")["weight"], delta, "ΔW")
    merged_expected = conv(x, weight + delta, bias)
    assert_differs(merged_expected, conv(x, weight + delta, bias, dilation=1), "merged dilation-2 vs dilation-1")
    before = {n: p.detach().clone() for n, p in lk_model.named_parameters()}
    lorakit.merge(lk_model)
    with torch.no_grad():
        merged_out = lk_model(x)
    assert_close(merged_out, merged_expected, "merged forward")
    lorakit.unmerge(lk_model)
    for name, param in lk_model.named_parameters():
        assert torch.equal(param, before[name]), f"{name} not restored bit for bit"

    lk_model.train()
    lk_model(x).square().mean().backward()
    a_ref, b_ref = a.clone().requires_grad_(True), b.clone().requires_grad_(True)
    (conv(x, weight, bias) + s * F.conv2d(conv(x, a_ref), b_ref)).square().mean().backward()
    assert a_ref.grad.norm() > 0 and b_ref.grad.norm() > 0
    assert_close(layer.lora_A["default"].weight.grad, a_ref.grad, "grad A")
    assert_close(layer.lora_B["default"].weight.grad, b_ref.grad, "grad B")
