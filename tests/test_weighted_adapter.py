"""`lorakit.add_weighted_adapter` against peft 0.21's `LoraModel.add_weighted_adapter`, the oracle.

peft and lorakit convert deep copies of one model with the same source adapters (random A and B, written into
lorakit and copied into peft by parameter name) and combine them with the same seed: the new adapter's tensors
must be peft's (dare's random masks included) and so must the outputs with it active. Where peft crashes (the SVD
types on Conv1d and Conv3d, peft issue #3769) lorakit is checked against peft on a Conv2d of the same weights
reshaped, and against the math itself (`cat` and untruncated `svd` give `Σ w_i·ΔW_i`; a truncated `svd` the best
rank-r approximation of it). The new adapter also saves, loads in peft and lorakit, merges, and every refusal
leaves the model as it was.
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from tiny_models import tiny_llama
from torch import nn

import lorakit
from lorakit import AdapterError, LoraConfig, LoraConfigError, LoraError
from lorakit.weighted import COMBINATION_TYPES

peft = pytest.importorskip("peft")
Conv1D = pytest.importorskip("transformers.pytorch_utils").Conv1D

# peft warns that fan_in_fan_out (needed for its Conv1D) does not apply to nn.Linear, and about density=1
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

RTOL, ATOL = 1e-5, 1e-6
SOURCES = [("a", 8), ("b", 3), ("c", 5)]  # (name, lora_alpha): three different scalings
NAMES = [name for name, _ in SOURCES]
WEIGHTS = [0.7, -1.3, 0.4]  # one negative: subtracting an adapter
SVD_TYPES = [t for t in COMBINATION_TYPES if t.endswith("svd")]
NEEDS_EQUAL_RANKS = ["linear", "ties", "dare_linear", "dare_ties", "magnitude_prune"]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, msg: str = "", atol: float = ATOL) -> None:
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=atol, msg=(lambda m: f"{msg}: {m}") if msg else None)


def assert_same_update(actual: torch.Tensor, expected: torch.Tensor, msg: str = "") -> None:
    """Two ΔW reached by different float32 computations (an SVD and its product, a sum of products): entries of
    order 1, so an absolute 1e-5 (the float32 rounding of a few operations) on top of the relative one."""
    assert_close(actual, expected, msg, atol=1e-5)


# ----- models ----------------------------------------------------------------------------------------------------


class Zoo(nn.Module):
    """One layer of every kind lorakit adapts; the forward runs each on its own input."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 6)
        self.emb = nn.Embedding(12, 8)
        self.proj = Conv1D(6, 8)  # transformers' Conv1D: weight (in, out) = (8, 6)
        self.c1 = nn.Conv1d(3, 4, 3, padding=1)
        self.c2 = nn.Conv2d(3, 5, 3, padding=1)
        self.c2x1 = nn.Conv2d(4, 5, 1)
        self.c3 = nn.Conv3d(2, 4, 3, padding=1)
        self.head = nn.Linear(6, 2)

    def forward(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name)(x) for name, x in inputs.items()}


_g = torch.Generator().manual_seed(7)
INPUTS = {
    "fc": torch.randn(3, 8, generator=_g),
    "emb": torch.randint(0, 12, (3, 5), generator=_g),
    "proj": torch.randn(3, 8, generator=_g),
    "c1": torch.randn(2, 3, 7, generator=_g),
    "c2": torch.randn(2, 3, 5, 5, generator=_g),
    "c2x1": torch.randn(2, 4, 3, 3, generator=_g),
    "c3": torch.randn(1, 2, 4, 4, 4, generator=_g),
    "head": torch.randn(3, 6, generator=_g),
}
ALL_KINDS = ["fc", "emb", "proj", "c1", "c2", "c2x1", "c3"]
PEFT_SVD_KINDS = ["fc", "emb", "proj", "c2", "c2x1"]  # peft's SVD types crash on Conv1d and Conv3d
IDS = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(3))


def zoo_outputs(model: nn.Module) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return model(INPUTS)


def llama_outputs(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def randomize(ours: nn.Module, theirs: nn.Module | None, seed: int = 1) -> None:
    """Fill lorakit's adapter tensors with random values (B non-zero) and copy them into peft's twin."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in ours.named_parameters():
            if ".lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
                if theirs is not None:
                    theirs.get_parameter(f"base_model.model.{name}").copy_(param)


def build(make, configs: list[tuple[str, dict]], peft_only: dict | None = None, with_peft: bool = True):
    """(lorakit model, peft model or None) on copies of one base, with adapters `configs` [(name, fields)]."""
    base = make()
    twin = copy.deepcopy(base) if with_peft else None
    ours = theirs = None
    for name, fields in configs:
        fields = {"init_lora_weights": False, **fields}
        if ours is None:
            ours = lorakit.get_lora_model(base, LoraConfig(**fields), name)
            if with_peft:
                theirs = peft.get_peft_model(twin, peft.LoraConfig(**fields, **(peft_only or {})), adapter_name=name)
        else:
            lorakit.add_adapter(ours, name, LoraConfig(**fields))
            if with_peft:
                theirs.add_adapter(name, peft.LoraConfig(**fields, **(peft_only or {})))
    randomize(ours, theirs)
    return ours, theirs


def make_zoo() -> Zoo:
    torch.manual_seed(0)
    return Zoo()


def zoo_pair(targets=ALL_KINDS, ranks=(4, 4, 4), with_peft=True, **fields):
    configs = [
        (name, {"r": r, "lora_alpha": alpha, "target_modules": targets, **fields})
        for (name, alpha), r in zip(SOURCES, ranks, strict=True)
    ]
    return build(make_zoo, configs, {"fan_in_fan_out": "proj" in targets}, with_peft)


def combine_both(ours, theirs, adapters, weights, name="new", seed=0, **options) -> None:
    """Both libraries' add_weighted_adapter with the same seed right before; their generators end equal too."""
    torch.manual_seed(seed)
    lorakit.add_weighted_adapter(ours, adapters, weights, name, **options)
    after_ours = torch.random.get_rng_state()
    torch.manual_seed(seed)
    theirs.add_weighted_adapter(adapters, weights, name, **options)
    assert torch.equal(torch.random.get_rng_state(), after_ours), "lorakit drew other random numbers than peft"


def assert_new_adapter_equals_peft(ours, theirs, name="new") -> None:
    new = {n: p for n, p in ours.named_parameters() if f".{name}." in f"{n}." and ".lora_" in n}
    assert new, "the new adapter has no tensors"
    for key, param in new.items():
        reference = theirs.get_parameter(f"base_model.model.{key}")
        assert param.shape == reference.shape, key
        assert param.abs().sum() > 0, f"{key} is all zeros"
        assert_close(param, reference, key)


def activate_both(ours, theirs, name="new") -> None:
    lorakit.set_active_adapters(ours, name)
    theirs.set_adapter(name)


def delta_matrix(layer: lorakit.LoraLayer, name: str) -> torch.Tensor:
    """Adapter `name`'s ΔW on `layer` as the (out, in·∏k) matrix that B·A is."""
    with torch.no_grad():
        delta = layer.delta_weights(name)["weight"]
    if isinstance(layer, lorakit.LoraEmbedding):
        return delta.T
    if isinstance(layer, lorakit.LoraConv):
        return delta.flatten(1)
    return delta.T if layer.fan_in_fan_out else delta


def snapshot(model: nn.Module) -> tuple:
    """Everything add_weighted_adapter could change: adapters, configs, state, module tree and tensors."""
    state = lorakit.model.lora_state(model)
    return (
        lorakit.adapter_names(model),
        lorakit.active_adapters(model),
        {name: config.to_dict() for name, config in state.configs.items()},
        dict(state.trainable),
        [(name, type(module).__name__) for name, module in model.named_modules()],
        {name: (param.detach().clone(), param.requires_grad) for name, param in model.named_parameters()},
    )


def assert_same_snapshot(before: tuple, after: tuple) -> None:
    assert before[:5] == after[:5]
    assert before[5].keys() == after[5].keys()
    for name, (value, grad) in before[5].items():
        assert torch.equal(value, after[5][name][0]) and grad == after[5][name][1], name


# ----- against peft: every combination type -------------------------------------------------------------------

CASES = [(t, {"density": 0.5}) for t in COMBINATION_TYPES] + [
    ("ties", {"density": 0.6, "majority_sign_method": "frequency"}),
    ("dare_ties", {"density": 0.3, "majority_sign_method": "frequency"}),
    ("ties_svd", {"density": 0.7, "majority_sign_method": "frequency", "svd_rank": 3}),
    ("dare_ties_svd", {"density": 0.4, "majority_sign_method": "frequency"}),
    ("dare_linear", {"density": 1.0}),  # keeps everything: no pruning, no random numbers
    ("magnitude_prune_svd", {"density": 0.8, "svd_rank": 2}),
    ("svd", {"svd_rank": 2, "svd_clamp": 0.9}),
    ("svd", {"svd_rank": 3, "svd_full_matrices": False}),
    ("dare_linear_svd", {"density": 0.5, "svd_clamp": 0.75}),
]


def case_id(case) -> str:
    kind, options = case
    return "-".join([kind, *(f"{k}={v}" for k, v in options.items())])


@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_every_layer_kind_equals_peft(case):
    kind, options = case
    targets = PEFT_SVD_KINDS if kind.endswith("svd") else ALL_KINDS
    ours, theirs = zoo_pair(targets)
    combine_both(ours, theirs, NAMES, WEIGHTS, combination_type=kind, **options)
    assert_new_adapter_equals_peft(ours, theirs)
    config = lorakit.model.lora_state(ours).configs["new"]
    theirs_config = theirs.peft_config["new"]
    assert (config.r, config.lora_alpha) == (theirs_config.r, theirs_config.lora_alpha)
    assert config.target_modules == sorted(theirs_config.target_modules)
    assert lorakit.active_adapters(ours) == ["a"] == theirs.active_adapters  # added inactive, as peft does

    with lorakit.disable_adapters(ours):
        base = zoo_outputs(ours)
    activate_both(ours, theirs)
    actual, expected = zoo_outputs(ours), zoo_outputs(theirs.base_model.model)
    for key in actual:
        changed = (actual[key] - base[key]).abs().max() > 1e-3
        assert changed == (key in targets), f"{key}: the new adapter changes {'nothing' if key in targets else 'it'}"
        assert_close(actual[key], expected[key], key)


@pytest.mark.parametrize("kind", COMBINATION_TYPES)
def test_llama_with_different_targets_equals_peft(kind):
    """Sources on different modules (q/v/embed_tokens, q/k, v/down): a layer combines the sources it has."""
    targets = [["q_proj", "v_proj", "embed_tokens"], ["q_proj", "k_proj"], ["v_proj", "down_proj"]]
    configs = [
        (name, {"r": 4, "lora_alpha": alpha, "target_modules": t})
        for (name, alpha), t in zip(SOURCES, targets, strict=True)
    ]
    ours, theirs = build(tiny_llama, configs)
    combine_both(ours, theirs, NAMES, WEIGHTS, combination_type=kind, density=0.5, seed=11)
    assert_new_adapter_equals_peft(ours, theirs)
    layers = {name for name, layer in lorakit.lora_layers(ours) if "new" in layer.r}
    assert len(layers) == 1 + 2 * 4  # embed_tokens, and q, k, v, down in each of the 2 layers
    activate_both(ours, theirs)
    assert_close(llama_outputs(ours), llama_outputs(theirs))


@pytest.mark.parametrize("kind", ["cat", *SVD_TYPES])
def test_different_ranks_equal_peft(kind):
    ours, theirs = zoo_pair(PEFT_SVD_KINDS, ranks=(2, 4, 3))
    combine_both(ours, theirs, NAMES, WEIGHTS, combination_type=kind, density=0.6)
    assert_new_adapter_equals_peft(ours, theirs)
    assert lorakit.model.lora_state(ours).configs["new"].r == (9 if kind == "cat" else 4)
    activate_both(ours, theirs)
    for key, value in zoo_outputs(ours).items():
        assert_close(value, zoo_outputs(theirs.base_model.model)[key], key)


@pytest.mark.parametrize("kind", NEEDS_EQUAL_RANKS)
def test_different_ranks_refused_where_peft_needs_one_rank(kind):
    ours, theirs = zoo_pair(["fc", "c2"], ranks=(2, 4, 2))
    before = snapshot(ours)
    with pytest.raises(LoraConfigError, match=r"one rank on each layer.*'fc'.*\{'a': 2, 'b': 4, 'c': 2\}"):
        lorakit.add_weighted_adapter(ours, NAMES, WEIGHTS, "new", combination_type=kind, density=0.5)
    assert_same_snapshot(before, snapshot(ours))
    with pytest.raises(ValueError, match="same r value"):
        theirs.add_weighted_adapter(NAMES, WEIGHTS, "new", combination_type=kind, density=0.5)


@pytest.mark.parametrize("init", [True, "gaussian", False])
@pytest.mark.parametrize("kind", ["dare_ties", "dare_linear_svd"])
def test_dare_masks_follow_peft_whatever_the_init(kind, init):
    """peft draws its initialisation of the new adapter before the masks: lorakit draws the same, whatever
    `init_lora_weights` the first source has (it is the new adapter's)."""
    ours, theirs = zoo_pair(PEFT_SVD_KINDS if kind.endswith("svd") else ALL_KINDS, init_lora_weights=init)
    combine_both(ours, theirs, NAMES, WEIGHTS, combination_type=kind, density=0.5, seed=123)
    assert_new_adapter_equals_peft(ours, theirs)


def test_dare_draws_differ_from_seed_to_seed():
    """The masks do come from the generator (two seeds, two adapters)."""
    ours, _ = zoo_pair(["fc"], with_peft=False)
    for seed, name in [(1, "one"), (2, "two")]:
        torch.manual_seed(seed)
        lorakit.add_weighted_adapter(ours, NAMES, WEIGHTS, name, combination_type="dare_linear", density=0.5)
    layer = ours.fc
    assert not torch.equal(layer.lora_A["one"].weight, layer.lora_A["two"].weight)


def test_rank_pattern_sources_keep_their_rank_per_layer(tmp_path):
    """One-rank types on sources with rank_pattern: each layer keeps its rank (peft writes a config its own
    loader cannot read back, r=4 for rank-2 tensors); outputs equal peft's, and the saved adapter loads in peft."""
    fields = {"r": 4, "target_modules": ["q_proj", "v_proj"], "rank_pattern": {"v_proj": 2}}
    configs = [(name, {**fields, "lora_alpha": alpha}) for name, alpha in SOURCES[:2]]
    ours, theirs = build(tiny_llama, configs)
    combine_both(ours, theirs, NAMES[:2], WEIGHTS[:2], combination_type="ties", density=0.5)
    assert_new_adapter_equals_peft(ours, theirs)
    config = lorakit.model.lora_state(ours).configs["new"]
    assert config.r == 4 and config.rank_pattern == config.alpha_pattern
    assert ours.model.layers[1].self_attn.v_proj.r["new"] == 2
    assert ours.model.layers[1].self_attn.v_proj.scaling["new"] == 1.0
    activate_both(ours, theirs)
    expected = llama_outputs(theirs)
    assert_close(llama_outputs(ours), expected)
    lorakit.save_adapter(ours, tmp_path, "new")
    assert_close(llama_outputs(peft.PeftModel.from_pretrained(tiny_llama(), tmp_path)), expected)
    assert_close(llama_outputs(lorakit.load_adapter(tiny_llama(), tmp_path)), expected)


# ----- Conv1d and Conv3d, where peft's SVD types crash ------------------------------------------------------------


class Conv2dTwin(nn.Module):
    """A Conv2d holding a Conv1d's or Conv3d's weights with the kernel reshaped to 2 axes: (k,) as (k, 1), (k1, k2,
    k3) as (k1, k2·k3). Its weight flattened to (out, in·∏k) is the same matrix, which is what peft's SVD takes."""

    def __init__(self, conv: nn.Conv1d | nn.Conv3d) -> None:
        super().__init__()
        k = conv.kernel_size
        kernel = (k[0], 1) if len(k) == 1 else (k[0], k[1] * k[2])
        self.conv = nn.Conv2d(conv.in_channels, conv.out_channels, kernel)
        with torch.no_grad():
            self.conv.weight.copy_(conv.weight.reshape(self.conv.weight.shape))


@pytest.mark.parametrize("kind", SVD_TYPES)
@pytest.mark.parametrize("conv", ["conv1d", "conv3d"])
def test_svd_types_on_conv1d_and_conv3d_equal_peft_on_a_conv2d_twin(conv, kind):
    torch.manual_seed(0)
    base = nn.Sequential()
    base.conv = nn.Conv1d(3, 5, 3) if conv == "conv1d" else nn.Conv3d(2, 5, (2, 3, 2))
    twin = Conv2dTwin(base.conv)
    configs = [(name, {"r": 4, "lora_alpha": alpha, "target_modules": ["conv"]}) for name, alpha in SOURCES]
    ours, _ = build(lambda: base, configs, with_peft=False)
    theirs = peft.get_peft_model(twin, peft.LoraConfig(**configs[0][1], init_lora_weights=False), adapter_name="a")
    for name, fields in configs[1:]:
        theirs.add_adapter(name, peft.LoraConfig(**fields, init_lora_weights=False))
    with torch.no_grad():
        for name, param in ours.named_parameters():
            if ".lora_" in name:
                reference = theirs.get_parameter(f"base_model.model.{name}")
                reference.copy_(param.reshape(reference.shape))
    options = {"combination_type": kind, "density": 0.5, "svd_rank": 3}
    torch.manual_seed(4)
    lorakit.add_weighted_adapter(ours, NAMES, WEIGHTS, "new", **options)
    torch.manual_seed(4)
    theirs.add_weighted_adapter(NAMES, WEIGHTS, "new", **options)
    layer, reference = ours.conv, theirs.base_model.model.conv
    a, b = layer.lora_A["new"].weight, layer.lora_B["new"].weight
    assert a.shape == (3, *layer.base_layer.weight.shape[1:]) and b.shape == (5, 3, *[1] * (a.ndim - 2))
    assert_close(a.reshape(reference.lora_A["new"].weight.shape), reference.lora_A["new"].weight, "A")
    assert_close(b.reshape(reference.lora_B["new"].weight.shape), reference.lora_B["new"].weight, "B")
    with torch.no_grad():
        assert_close(delta_matrix(layer, "new"), reference.get_delta_weight("new").flatten(1), "ΔW")


@pytest.mark.parametrize("layer_name", ALL_KINDS)
def test_cat_and_full_rank_svd_give_the_weighted_sum_of_updates(layer_name):
    """`cat` and an `svd` of full rank are exact: their ΔW is Σ w_i·ΔW_i (independent of peft)."""
    ours, _ = zoo_pair(ALL_KINDS, ranks=(2, 3, 2), with_peft=False)
    lorakit.add_weighted_adapter(ours, NAMES, WEIGHTS, "cat", combination_type="cat")
    lorakit.add_weighted_adapter(ours, NAMES, WEIGHTS, "svd", combination_type="svd", svd_rank=7)
    layer = getattr(ours, layer_name)
    expected = sum(w * delta_matrix(layer, n) for n, w in zip(NAMES, WEIGHTS, strict=True))
    assert_same_update(delta_matrix(layer, "cat"), expected, "cat")
    assert_same_update(delta_matrix(layer, "svd"), expected, "svd")
    assert layer.r["cat"] == 7 and layer.scaling["cat"] == layer.scaling["svd"] == 1.0


@pytest.mark.parametrize("layer_name", ["c1", "c3", "emb", "proj"])
def test_truncated_svd_is_the_best_low_rank_approximation(layer_name):
    ours, _ = zoo_pair(ALL_KINDS, with_peft=False)
    lorakit.add_weighted_adapter(ours, NAMES, WEIGHTS, "new", combination_type="svd", svd_rank=2)
    layer = getattr(ours, layer_name)
    target = sum(w * delta_matrix(layer, n) for n, w in zip(NAMES, WEIGHTS, strict=True))
    u, s, vh = torch.linalg.svd(target)
    best = u[:, :2] @ torch.diag(s[:2]) @ vh[:2]
    assert_same_update(delta_matrix(layer, "new"), best)
    assert (delta_matrix(layer, "new") - target).norm() > 1e-3  # truncated: not the full sum


def test_linear_combines_the_factors_as_peft_defines_it():
    """`linear`: A = Σ sign(c_i)·√|c_i|·A_i, B = Σ √|c_i|·B_i with c_i = w_i·s_i (independent of peft)."""
    ours, _ = zoo_pair(["fc", "emb", "c3"], with_peft=False)
    lorakit.add_weighted_adapter(ours, NAMES, WEIGHTS, "new", combination_type="linear")
    for layer in (ours.fc, ours.emb, ours.c3):

        def factors(n: str, layer=layer) -> tuple[torch.Tensor, torch.Tensor]:
            if isinstance(layer, lorakit.LoraEmbedding):
                return layer.lora_embedding_A[n], layer.lora_embedding_B[n]
            return layer.lora_A[n].weight, layer.lora_B[n].weight

        c = [w * layer.scaling[n] for n, w in zip(NAMES, WEIGHTS, strict=True)]
        a = sum(math.copysign(math.sqrt(abs(ci)), ci) * factors(n)[0] for n, ci in zip(NAMES, c, strict=True))
        b = sum(math.sqrt(abs(ci)) * factors(n)[1] for n, ci in zip(NAMES, c, strict=True))
        assert_close(factors("new")[0], a)
        assert_close(factors("new")[1], b)


def test_svd_rank_beyond_a_layers_rank_pads_with_zeros():
    """svd_rank 6 on c3 (out=4): 4 singular directions and zero rows and columns after (peft's factors would not
    even multiply); the update is still exactly the weighted sum."""
    ours, _ = zoo_pair(["c3", "fc"], with_peft=False)
    lorakit.add_weighted_adapter(ours, NAMES, WEIGHTS, "new", combination_type="svd", svd_rank=6)
    layer = ours.c3
    assert layer.lora_A["new"].weight.shape == (6, 2, 3, 3, 3)
    assert torch.equal(layer.lora_A["new"].weight[4:], torch.zeros(2, 2, 3, 3, 3))
    expected = sum(w * delta_matrix(layer, n) for n, w in zip(NAMES, WEIGHTS, strict=True))
    assert_same_update(delta_matrix(layer, "new"), expected)


# ----- one adapter, rsLoRA ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["svd", "cat", "ties"])
def test_one_adapter_is_linear_as_in_peft(kind):
    ours, theirs = zoo_pair(ALL_KINDS)
    combine_both(ours, theirs, ["b"], [-0.6], combination_type=kind, density=0.5)
    assert_new_adapter_equals_peft(ours, theirs)
    for layer_name in ALL_KINDS:
        layer = getattr(ours, layer_name)
        assert_same_update(delta_matrix(layer, "new"), -0.6 * delta_matrix(layer, "b"), layer_name)


def test_one_adapter_with_an_svd_rank_is_truncated():
    """Deliberately not peft (which ignores svd_rank for one adapter): compressing one adapter to a lower rank."""
    ours, _ = zoo_pair(ALL_KINDS, with_peft=False)
    lorakit.add_weighted_adapter(ours, ["a"], [1.0], "small", combination_type="svd", svd_rank=2)
    assert ours.fc.r["small"] == 2
    u, s, vh = torch.linalg.svd(delta_matrix(ours.fc, "a"))
    assert_same_update(delta_matrix(ours.fc, "small"), u[:, :2] @ torch.diag(s[:2]) @ vh[:2])


@pytest.mark.parametrize("kind", ["cat", "svd", "linear"])
def test_rslora_sources_give_the_weighted_update(kind):
    """peft keeps use_rslora from the first source, so its new adapter is √r times too large (peft issue #3761);
    lorakit turns rsLoRA off for it (lora_alpha = r: scaling 1)."""
    ours, _ = zoo_pair(["fc", "c2"], with_peft=False, use_rslora=True)
    weights = [1.0] if kind == "linear" else WEIGHTS
    names = NAMES[: len(weights)]
    lorakit.add_weighted_adapter(ours, names, weights, "new", combination_type=kind, svd_rank=12)
    assert lorakit.model.lora_state(ours).configs["new"].use_rslora is False
    for layer in (ours.fc, ours.c2):
        assert layer.scaling["new"] == 1.0
        expected = sum(w * delta_matrix(layer, n) for n, w in zip(names, weights, strict=True))
        assert_same_update(delta_matrix(layer, "new"), expected)


# ----- the new adapter is a normal adapter --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["svd", "cat", "dare_ties"])
def test_saved_adapter_loads_in_peft_and_lorakit(kind, tmp_path):
    targets = [["q_proj", "v_proj"], ["q_proj", "k_proj", "embed_tokens"], ["v_proj"]]
    configs = [
        (name, {"r": r, "lora_alpha": alpha, "target_modules": t})
        for (name, alpha), t, r in zip(SOURCES, targets, (4, 4 if kind == "dare_ties" else 2, 4), strict=True)
    ]
    ours, _ = build(tiny_llama, configs, with_peft=False)
    lorakit.add_weighted_adapter(ours, NAMES, WEIGHTS, "mix", combination_type=kind, density=0.5)
    lorakit.set_active_adapters(ours, "mix")
    expected = llama_outputs(ours)
    with lorakit.disable_adapters(ours):
        assert (expected - llama_outputs(ours)).abs().max() > 1e-3
    lorakit.save_adapter(ours, tmp_path, "mix")
    assert_close(llama_outputs(peft.PeftModel.from_pretrained(tiny_llama(), tmp_path)), expected)
    assert_close(llama_outputs(lorakit.load_adapter(tiny_llama(), tmp_path)), expected)


def test_merging_the_new_adapter(tmp_path):
    ours, _ = zoo_pair(ALL_KINDS, ranks=(2, 3, 4), with_peft=False)
    lorakit.add_weighted_adapter(ours, NAMES, WEIGHTS, "new", combination_type="svd")
    lorakit.set_active_adapters(ours, "new")
    unmerged = zoo_outputs(ours)
    weights = {n: p.detach().clone() for n, p in ours.named_parameters() if "base_layer" in n}
    lorakit.merge(ours)
    for key, value in zoo_outputs(ours).items():
        assert_close(value, unmerged[key], key)
    lorakit.unmerge(ours)
    assert all(torch.equal(ours.get_parameter(n), w) for n, w in weights.items())


def test_inactive_frozen_until_activated_and_trainable_like_its_sources():
    ours, _ = zoo_pair(["fc", "emb"], with_peft=False)
    lorakit.add_weighted_adapter(ours, NAMES, WEIGHTS, "new", combination_type="cat")
    assert lorakit.active_adapters(ours) == ["a"]
    new = [p for n, p in ours.named_parameters() if ".new" in n]
    assert len(new) == 4 and not any(p.requires_grad for p in new)
    lorakit.set_active_adapters(ours, "new")
    assert all(p.requires_grad for p in new)
    lorakit.model.set_trainable(ours, "b", False)
    lorakit.add_weighted_adapter(ours, NAMES, WEIGHTS, "frozen", combination_type="cat")
    assert lorakit.model.lora_state(ours).trainable["frozen"] is False  # a frozen source: a frozen combination


def test_target_modules_follow_peft():
    # lists: their union
    ours, theirs = build(
        tiny_llama, [("a", {"target_modules": ["q_proj"]}), ("b", {"target_modules": ["v_proj", "q_proj"]})]
    )
    combine_both(ours, theirs, ["a", "b"], [1.0, 1.0], combination_type="cat")
    assert lorakit.model.lora_state(ours).configs["new"].target_modules == ["q_proj", "v_proj"]
    assert theirs.peft_config["new"].target_modules == {"q_proj", "v_proj"}
    # regexes: "(a)|(b)"
    regexes = [r".*\.q_proj", r".*layers\.1\.mlp\.up_proj"]
    ours, theirs = build(tiny_llama, [("a", {"target_modules": regexes[0]}), ("b", {"target_modules": regexes[1]})])
    combine_both(ours, theirs, ["a", "b"], [1.0, -1.0], combination_type="svd")
    assert lorakit.model.lora_state(ours).configs["new"].target_modules == theirs.peft_config["new"].target_modules
    assert theirs.peft_config["new"].target_modules == rf"({regexes[0]})|({regexes[1]})"


def test_target_modules_a_union_cannot_say_become_module_names(tmp_path):
    """A list and a regex (peft refuses to combine them), or a first source restricted to a layer the others are
    not on: the config names the modules the adapter went on, and the saved adapter reloads."""
    ours, _ = build(
        tiny_llama,
        [
            ("a", {"target_modules": ["q_proj"], "layers_to_transform": [0]}),
            ("b", {"target_modules": r".*layers\.1\.self_attn\.v_proj"}),
        ],
        with_peft=False,
    )
    lorakit.add_weighted_adapter(ours, ["a", "b"], [1.0, 0.5], "new", combination_type="cat")
    config = lorakit.model.lora_state(ours).configs["new"]
    assert config.target_modules == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    assert config.layers_to_transform is None
    lorakit.set_active_adapters(ours, "new")
    lorakit.save_adapter(ours, tmp_path, "new")
    assert_close(llama_outputs(peft.PeftModel.from_pretrained(tiny_llama(), tmp_path)), llama_outputs(ours))


def test_modules_to_save_as_peft():
    """The new adapter takes the first source's modules_to_save, as fresh copies of the original module (peft's
    behaviour); two sources with copies of one module are refused, as peft refuses them."""
    ours, theirs = zoo_pair(["fc"], modules_to_save=None)
    lorakit.add_adapter(ours, "d", LoraConfig(r=4, target_modules=["fc"], modules_to_save=["head"]))
    theirs.add_adapter("d", peft.LoraConfig(r=4, target_modules=["fc"], modules_to_save=["head"]))
    randomize(ours, theirs, seed=5)
    with torch.no_grad():
        ours.head.modules_to_save["d"].weight.add_(1.0)
        theirs.base_model.model.head.modules_to_save["d"].weight.add_(1.0)
    combine_both(ours, theirs, ["d", "a"], [1.0, 0.5], combination_type="linear")
    assert lorakit.model.lora_state(ours).configs["new"].modules_to_save == ["head"]
    assert torch.equal(ours.head.modules_to_save["new"].weight, ours.head.original_module.weight)
    assert torch.equal(
        ours.head.modules_to_save["new"].weight, theirs.base_model.model.head.modules_to_save["new"].weight
    )

    lorakit.add_adapter(ours, "e", LoraConfig(r=4, target_modules=["fc"], modules_to_save=["head"]))
    before = snapshot(ours)
    with pytest.raises(AdapterError, match=r"\['d', 'e'\] each keep a trained copy of 'head'"):
        lorakit.add_weighted_adapter(ours, ["d", "e"], [1.0, 1.0], "two", combination_type="linear")
    assert_same_snapshot(before, snapshot(ours))


# ----- refusals ----------------------------------------------------------------------------------------------------


def _call(**changes):
    arguments = {"adapters": NAMES, "weights": WEIGHTS, "adapter_name": "new", "combination_type": "svd"}
    return {**arguments, **changes}


BAD = [
    ("unknown adapter", _call(adapters=["a", "nope"]), AdapterError, "unknown adapter 'nope'"),
    ("repeated adapter", _call(adapters=["a", "a"], weights=[1, 1]), AdapterError, "repeat"),
    ("no adapters", _call(adapters=[], weights=[]), AdapterError, "at least one adapter"),
    ("adapters not names", _call(adapters=5), AdapterError, "list of adapter names"),
    ("fewer weights", _call(weights=[1.0, 2.0]), LoraConfigError, "2 numbers for the 3 adapters"),
    ("weights a string", _call(weights="123"), LoraConfigError, "list of numbers"),
    ("weight not a number", _call(weights=[1.0, "2", 3.0]), LoraConfigError, "adapter 'b'.*'2'"),
    ("weight nan", _call(weights=[1.0, 2.0, float("nan")]), LoraConfigError, "adapter 'c'.*nan"),
    ("weight a bool", _call(weights=[True, 1.0, 1.0]), LoraConfigError, "adapter 'a'.*True"),
    ("existing name", _call(adapter_name="b"), AdapterError, "'b' already exists"),
    ("reserved name", _call(adapter_name="__base__"), AdapterError, "reserved"),
    ("unknown type", _call(combination_type="mean"), LoraConfigError, r"one of \['svd', 'linear', 'cat'.*got 'mean'"),
    ("density missing", _call(combination_type="ties"), LoraConfigError, "'ties' prunes: it needs density"),
    ("density missing (svd)", _call(combination_type="dare_ties_svd"), LoraConfigError, "needs density"),
    ("density zero", _call(combination_type="dare_linear", density=0.0), LoraConfigError, r"density.*\(0, 1\].*0.0"),
    ("density above 1", _call(combination_type="ties", density=1.5), LoraConfigError, "got 1.5"),
    ("sign method", _call(combination_type="ties", density=0.5, majority_sign_method="sum"), LoraConfigError, "'sum'"),
    ("svd_rank zero", _call(svd_rank=0), LoraConfigError, "svd_rank must be a positive integer"),
    ("svd_rank float", _call(svd_rank=2.0), LoraConfigError, "svd_rank"),
    ("svd_clamp above 1", _call(svd_clamp=1.5), LoraConfigError, "svd_clamp must be a quantile"),
    ("svd_full_matrices", _call(svd_full_matrices="yes"), LoraConfigError, "svd_full_matrices"),
]


@pytest.mark.parametrize(("what", "arguments", "error", "message"), BAD, ids=[b[0] for b in BAD])
def test_bad_arguments_are_refused_and_change_nothing(what, arguments, error, message):
    ours, _ = zoo_pair(["fc", "emb", "c2"], with_peft=False)
    before = snapshot(ours)
    with pytest.raises(error, match=message):
        lorakit.add_weighted_adapter(ours, **arguments)
    assert_same_snapshot(before, snapshot(ours))


def test_a_plain_model_is_refused():
    with pytest.raises(LoraError, match="not a LoRA model"):
        lorakit.add_weighted_adapter(make_zoo(), ["a"], [1.0], "new")


@pytest.mark.parametrize("feature", ["use_dora", "lora_bias"])
def test_dora_and_lora_bias_sources_are_refused(feature):
    """peft builds a wrong adapter from these (peft issue #3761): the magnitudes, or B's bias, are not combined."""
    ours, _ = build(
        tiny_llama,
        [("a", {"target_modules": ["q_proj"]}), ("b", {"target_modules": ["q_proj"], feature: True})],
        with_peft=False,
    )
    before = snapshot(ours)
    with pytest.raises(AdapterError, match="DoRA" if feature == "use_dora" else "lora_bias"):
        lorakit.add_weighted_adapter(ours, ["a", "b"], [1.0, 1.0], "new", combination_type="cat")
    assert_same_snapshot(before, snapshot(ours))


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_sources_that_took_part_of_the_base_are_refused(init):
    """A PiSSA/OLoRA adapter's A and B hold part of W (the base keeps the rest): its update means nothing alone."""
    try:
        LoraConfig(init_lora_weights=init)
    except LoraConfigError:
        pytest.skip(f"this lorakit has no init_lora_weights={init!r}")
    ours, _ = build(
        tiny_llama,
        [("a", {"target_modules": ["q_proj"]}), ("b", {"target_modules": ["q_proj"], "init_lora_weights": init})],
        with_peft=False,
    )
    before = snapshot(ours)
    with pytest.raises(AdapterError, match=rf"adapter 'b' was initialised with init_lora_weights='{init}'"):
        lorakit.add_weighted_adapter(ours, ["a", "b"], [1.0, 1.0], "new", combination_type="cat")
    assert_same_snapshot(before, snapshot(ours))


@pytest.mark.parametrize("kind", ["cat", "svd"])
def test_grouped_conv_is_refused_for_cat_and_svd(kind):
    base = nn.Sequential()
    base.conv = nn.Conv2d(4, 6, 3, groups=2)
    ours, _ = build(lambda: base, [(n, {"r": 2, "target_modules": ["conv"]}) for n in ("a", "b")], with_peft=False)
    before = snapshot(ours)
    with pytest.raises(LoraConfigError, match=rf"'{kind}'.*'conv'.*groups=2"):
        lorakit.add_weighted_adapter(ours, ["a", "b"], [1.0, 1.0], "new", combination_type=kind)
    assert_same_snapshot(before, snapshot(ours))
    lorakit.add_weighted_adapter(ours, ["a", "b"], [1.0, 1.0], "new", combination_type="linear")  # factor-wise: fine
    assert ours.conv.lora_B["new"].weight.shape == (6, 1, 1, 1)


def test_inside_a_mixed_batch_is_refused():
    ours, _ = build(tiny_llama, [("a", {"target_modules": ["q_proj"]}), ("b", {"target_modules": ["q_proj"]})])
    ours.eval()
    with lorakit.mixed_batch(ours, ["a", "b"]), pytest.raises(AdapterError, match="mixed batch or X-LoRA"):
        lorakit.add_weighted_adapter(ours, ["a", "b"], [1.0, 1.0], "new", combination_type="cat")
    assert "new" not in lorakit.adapter_names(ours)


def test_a_failure_half_way_leaves_the_model_as_it_was(monkeypatch):
    """Everything checkable is checked first; should the math still fail (say, out of memory on the third layer),
    the adapter already created is removed: the model is as it was."""
    from lorakit import weighted

    ours, _ = zoo_pair(ALL_KINDS, with_peft=False)
    before = snapshot(ours)
    calls = []
    real = weighted._combined_factors

    def failing(plan, options):
        calls.append(plan.name)
        if len(calls) == 3:
            raise torch.OutOfMemoryError("no memory left")
        return real(plan, options)

    monkeypatch.setattr(weighted, "_combined_factors", failing)
    with pytest.raises(torch.OutOfMemoryError):
        lorakit.add_weighted_adapter(ours, NAMES, WEIGHTS, "new", combination_type="svd")
    assert len(calls) == 3
    assert_same_snapshot(before, snapshot(ours))
    monkeypatch.undo()
    lorakit.add_weighted_adapter(ours, NAMES, WEIGHTS, "new", combination_type="svd")  # and it can be done after


def test_lorakit_refuses_what_peft_silently_skips():
    """peft returns without a word when adapter_name exists; lorakit says so."""
    ours, theirs = zoo_pair(["fc"])
    theirs.add_weighted_adapter(NAMES, WEIGHTS, "b", combination_type="cat")  # nothing happens
    with pytest.raises(AdapterError, match="already exists"):
        lorakit.add_weighted_adapter(ours, NAMES, WEIGHTS, "b", combination_type="cat")


def test_no_warnings_on_the_usual_path():
    ours, _ = zoo_pair(ALL_KINDS, with_peft=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lorakit.add_weighted_adapter(ours, NAMES, WEIGHTS, "new", combination_type="dare_ties", density=1.0)
