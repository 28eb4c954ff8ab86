"""lorakit against every LoRA row of peft's own custom-model test matrix.

peft tests its LoRA on small hand-written models (`TEST_CASES` in peft's `tests/test_custom_models.py`). Each
row whose config class is `LoraConfig` is reproduced here as data (`ROWS`), on models of our own with the same
layer structure as peft's test models (each class says which one it mirrors). For every row lorakit accepts:

1. peft makes the row's adapter on a seeded model: random A and B (`init_lora_weights=False`) where the row
   leaves the init at its default (B = 0 would prove nothing), the row's own scheme otherwise; then every
   trainable tensor is moved deterministically, as training would.
2. peft saves it; `lorakit.load_adapter` loads it onto a fresh copy of the base: same outputs (eval, no_grad).
3. `lorakit.get_lora_model` takes the row's config directly and adapts the same modules, with peft's keys.
4. `lorakit.merge` equals the unmerged model and peft's merge; `lorakit.unmerge` restores every bit. Grouped
   convs merge in neither library (`UNMERGEABLE`); where peft 0.21.2's merge fails (`PEFT_MERGE_BROKEN`),
   lorakit's merge is held to peft's unmerged output.
5. `lorakit.save_adapter` writes what `peft.PeftModel.from_pretrained` loads to the same outputs.
6. In train mode the gradient of `out.square().mean()` is peft's for every adapter tensor (the same seed before
   each forward gives both the same dropout masks, the row's lora_dropout and the base model's).

Rows lorakit cannot do are listed in `REFUSED` with the reason: creating them must raise a `LoraError`, and so
must loading peft's file of them where it would compute something else.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import lorakit

peft = pytest.importorskip("peft")
Conv1D = pytest.importorskip("transformers.pytorch_utils").Conv1D

from peft.tuners.lora import KasaConfig, LoraLayer, MontecloraConfig, VeloraConfig  # noqa: E402
from peft.tuners.lora.config import BdLoraConfig  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore:fan_in_fan_out is set to False"),
    pytest.mark.filterwarnings("ignore:LoRA adapter added to ConvNd layer with groups"),
    pytest.mark.filterwarnings("ignore:Adapter .*LoRA tensor"),
]

RTOL, ATOL = 1e-5, 1e-6
GRAD_RTOL, GRAD_ATOL = 1e-4, 1e-7

# ----- the rows ---------------------------------------------------------------------------------------------
# Every row of `TEST_CASES` whose config class is `LoraConfig`, in peft's order, as `(row id, model, kwargs)`:
# huggingface/peft, tests/test_custom_models.py at commit 0000e79db93dbe4b00b004a01a1f1800ce67894d (the stored
# version whose LoraConfig rows use exactly the fields of the installed peft 0.21.2: KaSA, MiCA, VeLoRA,
# MonteCLoRA, BD-LoRA). The peft sub-configs are built as in that file.
ROWS: list[tuple[str, str, dict]] = [
    ("Vanilla MLP 1 LoRA", "MLP", {"target_modules": "lin0"}),
    ("Vanilla MLP 2 LoRA", "MLP", {"target_modules": ["lin0"]}),
    ("Vanilla MLP 3 LoRA", "MLP", {"target_modules": ["lin1"]}),
    ("Vanilla MLP 4 LoRA", "MLP", {"target_modules": ["lin0", "lin1"]}),
    ("Vanilla MLP 5 LoRA", "MLP", {"target_modules": ["lin0"], "modules_to_save": ["lin1"]}),
    ("Vanilla MLP 6 LoRA", "MLP", {"target_modules": ["lin0"], "lora_alpha": 4, "lora_dropout": 0.1}),
    ("Vanilla MLP 7 LoRA with DoRA", "MLP", {"target_modules": ["lin0"], "use_dora": True}),
    ("Vanilla MLP 8 LoRA with DoRA", "MLP", {"target_modules": ["lin0", "lin1"], "use_dora": True}),
    ("Vanilla MLP 1 LoRA with KaSA", "MLP", {"target_modules": ["lin0"], "kasa_config": KasaConfig(), "r": 4}),
    ("Vanilla MLP 1 LoRA with MiCA", "MLP", {"target_modules": ["lin0"], "init_lora_weights": "mica", "r": 4}),
    ("Vanilla MLP 9 LoRA with DoRA", "MLP", {"target_modules": "lin1", "use_dora": True, "lora_alpha": 32}),
    (
        "Vanilla MLP 10 LoRA with VeLoRA random",
        "MLP",
        {"target_modules": ["lin0"], "velora_config": VeloraConfig(num_groups=2, init_type="random")},
    ),
    (
        "Vanilla MLP 11 LoRA with VeLoRA batch_average",
        "MLP",
        {"target_modules": ["lin0", "lin1"], "velora_config": VeloraConfig(num_groups=2, init_type="batch_average")},
    ),
    (
        "Vanilla MLP 12 LoRA with VeLoRA batch_average_once",
        "MLP",
        {"target_modules": ["lin0"], "velora_config": VeloraConfig(num_groups=2, init_type="batch_average_once")},
    ),
    ("Embedding + transformers Conv1D 1 LoRA", "EmbConv1D", {"target_modules": ["conv1d"]}),
    ("Embedding + transformers Conv1D 2 LoRA", "EmbConv1D", {"target_modules": ["emb"]}),
    ("Embedding + transformers Conv1D 3 LoRA", "EmbConv1D", {"target_modules": ["emb", "conv1d"]}),
    ("Embedding + transformers Conv1D 1 DoRA", "EmbConv1D", {"target_modules": ["conv1d"], "use_dora": True}),
    ("Embedding + transformers Conv1D 2 DoRA", "EmbConv1D", {"target_modules": ["emb"], "use_dora": True}),
    ("Embedding + transformers Conv1D 3 DoRA", "EmbConv1D", {"target_modules": ["emb", "conv1d"], "use_dora": True}),
    (
        "Embedding + transformers Conv1D 1 LoRA trainable_tokens",
        "EmbConv1D",
        {"target_modules": ["conv1d"], "trainable_token_indices": {"emb": [0, 10]}},
    ),
    ("Conv1d LoRA", "Conv1d", {"target_modules": ["conv1d"]}),
    ("Conv1d LoRA with DoRA", "Conv1d", {"target_modules": ["conv1d"], "use_dora": True}),
    ("Conv2d 1 LoRA", "Conv2d", {"target_modules": ["conv2d"]}),
    ("Conv2d 2 LoRA", "Conv2d", {"target_modules": ["conv2d", "lin0"]}),
    ("Conv2d 1 LoRA with DoRA", "Conv2d", {"target_modules": ["conv2d"], "use_dora": True}),
    ("Conv2d 2 LoRA with DoRA", "Conv2d", {"target_modules": ["conv2d", "lin0"], "use_dora": True}),
    ("Conv2d Groups LoRA", "Conv2dGroups", {"target_modules": ["conv2d"]}),
    ("Conv2d Groups2 LoRA", "Conv2dGroups2", {"target_modules": ["conv2d"]}),
    ("Conv2d Groups LoRA with DoRA", "Conv2dGroups", {"target_modules": ["conv2d"], "use_dora": True}),
    ("Conv2d Groups2 LoRA with DoRA", "Conv2dGroups2", {"target_modules": ["conv2d"], "use_dora": True}),
    ("Conv3d 1 LoRA", "Conv3d", {"target_modules": ["conv3d"]}),
    ("Conv3d 2 LoRA", "Conv3d", {"target_modules": ["conv3d", "lin0"]}),
    ("Conv3d 1 LoRA with DoRA", "Conv3d", {"target_modules": ["conv3d"], "use_dora": True}),
    ("Conv3d 2 LoRA with DoRA", "Conv3d", {"target_modules": ["conv3d", "lin0"], "use_dora": True}),
    ("Conv3d 1x1 LoRA", "Conv3d1x1", {"target_modules": ["conv3d"]}),
    ("Conv3d 1x1 LoRA with DoRA", "Conv3d1x1", {"target_modules": ["conv3d"], "use_dora": True}),
    (
        "Vanilla MLP 1 LoRA with lora_b bias",
        "MLP",
        {"target_modules": ["lin0", "lin1"], "lora_bias": True, "lora_alpha": 32},
    ),
    ("Conv2d 1 LoRA with lora_b bias", "Conv2d", {"target_modules": ["conv2d"], "lora_bias": True, "lora_alpha": 32}),
    ("Conv3d 1 LoRA with lora_b bias", "Conv3d", {"target_modules": ["conv3d"], "lora_bias": True, "lora_alpha": 32}),
    ("MHA 1 LoRA", "MHA", {"target_modules": ["mha"]}),
    ("MHA 2 LoRA", "MHA", {"target_modules": ["mha", "lin0"]}),
    ("MLP 1 using nn.Parameter LoRA", "MlpUsingParameters", {"target_parameters": ["lin0.weight"]}),
    ("MLP 2 using nn.Parameter LoRA", "MLP", {"target_modules": ["lin0"], "target_parameters": ["lin1.weight"]}),
    (
        "Vanilla MLP 1 LoRA with Monteclora",
        "MLP",
        {"target_modules": ["lin0"], "monteclora_config": MontecloraConfig(num_samples=2)},
    ),
    (
        "BD-LoRA A only",
        "MLP",
        {
            "target_modules": ["lin0", "lin1"],
            "use_bdlora": BdLoraConfig(target_modules_bd_a=["lin0"], match_strict=False),
        },
    ),
    (
        "BD-LoRA B only",
        "MLP",
        {
            "target_modules": ["lin0", "lin1"],
            "use_bdlora": BdLoraConfig(target_modules_bd_b=["lin1"], nblocks=2, match_strict=False),
        },
    ),
    (
        "BD-LoRA both A and B",
        "MLP",
        {
            "target_modules": ["lin0", "lin1"],
            "use_bdlora": BdLoraConfig(target_modules_bd_a=["lin0"], target_modules_bd_b=["lin1"], nblocks=2),
        },
    ),
]


# ----- the models -------------------------------------------------------------------------------------------


class MLP(nn.Module):
    """peft's `MLP`: lin0 Linear(10, 20), ReLU, Dropout(0.5), lin1 Linear(20, 2), LogSoftmax."""

    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(10, 20)
        self.relu = nn.ReLU()
        self.drop = nn.Dropout(0.5)
        self.lin1 = nn.Linear(20, 2)
        self.sm = nn.LogSoftmax(dim=-1)

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        return self.sm(self.lin1(self.drop(self.relu(self.lin0(X.float())))))


class EmbConv1D(nn.Module):
    """peft's `ModelEmbConv1D`: emb Embedding(100, 5), conv1d transformers Conv1D(nf=1, nx=5), ReLU, Flatten,
    lin0 Linear(10, 2), LogSoftmax; token ids (batch, 10) in."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(100, 5)
        self.conv1d = Conv1D(1, 5)
        self.relu = nn.ReLU()
        self.flat = nn.Flatten()
        self.lin0 = nn.Linear(10, 2)
        self.sm = nn.LogSoftmax(dim=-1)

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        return self.sm(self.lin0(self.flat(self.relu(self.conv1d(self.emb(X))))))


class _ConvHead(nn.Module):
    """A conv `conv` reshaping its input to `shape`, then ReLU, Flatten, lin0 Linear(features, 2), LogSoftmax."""

    def __init__(self, conv: nn.Module, shape: tuple[int, ...], features: int, name: str) -> None:
        super().__init__()
        self.shape, self.name = shape, name
        self.add_module(name, conv)
        self.relu = nn.ReLU()
        self.flat = nn.Flatten()
        self.lin0 = nn.Linear(features, 2)
        self.sm = nn.LogSoftmax(dim=-1)

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        conv = getattr(self, self.name)
        return self.sm(self.lin0(self.flat(self.relu(conv(X.float().reshape(-1, *self.shape))))))


class Conv1dModel(_ConvHead):
    """peft's `ModelConv1D`: conv1d Conv1d(1, 1, 2) on (batch, 1, 10), ReLU, Flatten, lin0 Linear(9, 2),
    LogSoftmax."""

    def __init__(self) -> None:
        super().__init__(nn.Conv1d(1, 1, 2), (1, 10), 9, "conv1d")


class Conv2dModel(_ConvHead):
    """peft's `ModelConv2D`: conv2d Conv2d(5, 10, 3) on (batch, 5, 3, 3), ReLU, Flatten, lin0 Linear(10, 2),
    LogSoftmax."""

    def __init__(self) -> None:
        super().__init__(nn.Conv2d(5, 10, 3), (5, 3, 3), 10, "conv2d")


class Conv3dModel(_ConvHead):
    """peft's `ModelConv3D`: conv3d Conv3d(5, 10, 3) on (batch, 5, 3, 3, 3), ReLU, Flatten, lin0 Linear(10, 2),
    LogSoftmax (peft stacks a 2-D input into the volume; here the input is the volume)."""

    def __init__(self) -> None:
        super().__init__(nn.Conv3d(5, 10, 3), (5, 3, 3, 3), 10, "conv3d")


class Conv3d1x1Model(_ConvHead):
    """peft's `ModelConv3D1x1`: pointwise conv3d Conv3d(5, 10, 1) on (batch, 5, 3, 3, 3), ReLU, Flatten,
    lin0 Linear(270, 2), LogSoftmax."""

    def __init__(self) -> None:
        super().__init__(nn.Conv3d(5, 10, kernel_size=1), (5, 3, 3, 3), 270, "conv3d")


class Conv2dGroupsModel(nn.Module):
    """peft's `ModelConv2DGroups`: the whole input flattened through lin0 Linear(90, 288), reshaped to
    (2, 16, 3, 3), conv2d Conv2d(16, 16, 3, groups=8) (the default r=8 is a multiple of the groups), ReLU,
    Flatten, lin1 Linear(16, 2), LogSoftmax."""

    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(90, 288)
        self.conv2d = nn.Conv2d(16, 16, 3, groups=8)
        self.relu = nn.ReLU()
        self.flat = nn.Flatten()
        self.lin1 = nn.Linear(16, 2)
        self.sm = nn.LogSoftmax(dim=-1)

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        X = self.lin0(X.float().flatten()).reshape(2, 16, 3, 3)
        return self.sm(self.lin1(self.flat(self.relu(self.conv2d(X)))))


class Conv2dGroups2Model(_ConvHead):
    """peft's `ModelConv2DGroups2`: conv2d Conv2d(16, 32, 3, padding=1, groups=2) on (batch, 16, 20, 20), ReLU,
    Flatten, lin0 Linear(12800, 2), LogSoftmax (peft feeds it a fixed arange; here the input is random)."""

    def __init__(self) -> None:
        super().__init__(nn.Conv2d(16, 32, 3, padding=1, groups=2), (16, 20, 20), 12800, "conv2d")


class MHAModel(nn.Module):
    """peft's `ModelMha`: mha MultiheadAttention(10, 2) as self-attention on an unbatched (tokens, 10) input,
    lin0 Linear(10, 2), LogSoftmax."""

    def __init__(self) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(10, 2)
        self.lin0 = nn.Linear(10, 2)
        self.sm = nn.LogSoftmax(dim=-1)

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        X = X.float()
        return self.sm(self.lin0(self.mha(X, X, X)[0]))


class _ParameterLinear(nn.Module):
    """`x @ weight + bias` with a bare `weight: (in, out)` parameter (peft's `_LinearUsingParameter`)."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(in_features, out_features))
        self.bias = nn.Parameter(torch.ones(out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight + self.bias


class MlpUsingParameters(nn.Module):
    """peft's `MlpUsingParameters`: `MLP` with lin0 and lin1 made of bare parameters, not nn.Linear (what
    `target_parameters` targets)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin0 = _ParameterLinear(10, 20)
        self.relu = nn.ReLU()
        self.drop = nn.Dropout(0.5)
        self.lin1 = _ParameterLinear(20, 2)
        self.sm = nn.LogSoftmax(dim=-1)

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        return self.sm(self.lin1(self.drop(self.relu(self.lin0(X.float())))))


def _randn(*shape: int) -> Callable[[], torch.Tensor]:
    return lambda: torch.randn(shape, generator=torch.Generator().manual_seed(1))


@dataclass(frozen=True)
class Model:
    make: type[nn.Module]
    inputs: Callable[[], torch.Tensor]


MODELS = {  # peft's model name → our model and its input
    "MLP": Model(MLP, _randn(4, 10)),
    "EmbConv1D": Model(EmbConv1D, lambda: torch.randint(0, 100, (4, 10), generator=torch.Generator().manual_seed(1))),
    "Conv1d": Model(Conv1dModel, _randn(4, 10)),
    "Conv2d": Model(Conv2dModel, _randn(3, 5, 3, 3)),
    "Conv2dGroups": Model(Conv2dGroupsModel, _randn(9, 10)),
    "Conv2dGroups2": Model(Conv2dGroups2Model, _randn(2, 16, 20, 20)),
    "Conv3d": Model(Conv3dModel, _randn(3, 5, 3, 3, 3)),
    "Conv3d1x1": Model(Conv3d1x1Model, _randn(3, 5, 3, 3, 3)),
    "MHA": Model(MHAModel, _randn(6, 10)),
    "MlpUsingParameters": Model(MlpUsingParameters, _randn(4, 10)),
}


def build(model: str) -> nn.Module:
    """peft's `MockTransformerWrapper.from_pretrained`: the model from seed 0."""
    torch.manual_seed(0)
    return MODELS[model].make()


# ----- what lorakit refuses ---------------------------------------------------------------------------------

REFUSED = {  # row id → why lorakit cannot do it (creating it raises a LoraError)
    "Vanilla MLP 1 LoRA with KaSA": "KaSA (kasa_config): a learned diagonal between A and B and an SVD truncation of "
    "the base weight; not built",
    "Vanilla MLP 1 LoRA with MiCA": "init_lora_weights='mica' (B from the smallest singular vectors, B frozen) is not "
    "built; its forward is plain LoRA, so peft's trained MiCA file loads (checked)",
    "Vanilla MLP 10 LoRA with VeLoRA random": "VeLoRA (velora_config): grouped sub-token compression of the input "
    "saved for backward; not built",
    "Vanilla MLP 11 LoRA with VeLoRA batch_average": "VeLoRA (velora_config); not built",
    "Vanilla MLP 12 LoRA with VeLoRA batch_average_once": "VeLoRA (velora_config); not built",
    "Embedding + transformers Conv1D 1 LoRA trainable_tokens": "trainable_token_indices (trainable embedding rows "
    "beside the LoRA); planned in another issue",
    "Conv2d Groups LoRA with DoRA": "DoRA on a grouped Conv2d (groups=8): lorakit's DoRA needs the update as a "
    "grouped convolution, which LoRA's is not",
    "Conv2d Groups2 LoRA with DoRA": "DoRA on a grouped Conv2d (groups=2): as above",
    "Vanilla MLP 1 LoRA with Monteclora": "MonteCLoRA (monteclora_config): sampled Monte-Carlo adapters; not built",
    "BD-LoRA A only": "BD-LoRA (use_bdlora): block-diagonal A or B; not built (refused even where nblocks=1)",
    "BD-LoRA B only": "BD-LoRA (use_bdlora): block-diagonal A or B; not built",
    "BD-LoRA both A and B": "BD-LoRA (use_bdlora): block-diagonal A or B; not built",
}
# what lorakit's error says when the row's config is given to it
SAYS = {
    "Vanilla MLP 1 LoRA with KaSA": "kasa_config=",
    "Vanilla MLP 1 LoRA with MiCA": "init_lora_weights='mica'",
    "Vanilla MLP 10 LoRA with VeLoRA random": "velora_config=",
    "Vanilla MLP 11 LoRA with VeLoRA batch_average": "velora_config=",
    "Vanilla MLP 12 LoRA with VeLoRA batch_average_once": "velora_config=",
    "Embedding + transformers Conv1D 1 LoRA trainable_tokens": "trainable_token_indices=",
    "Conv2d Groups LoRA with DoRA": "use_dora=True is not supported on a Conv2d with groups=8",
    "Conv2d Groups2 LoRA with DoRA": "use_dora=True is not supported on a Conv2d with groups=2",
    "Vanilla MLP 1 LoRA with Monteclora": "monteclora_config=",
    "BD-LoRA A only": "use_bdlora=",
    "BD-LoRA B only": "use_bdlora=",
    "BD-LoRA both A and B": "use_bdlora=",
}
# peft's file of these rows computes plain LoRA, so lorakit loads it (the others' files must be refused)
FILE_LOADS = {"Vanilla MLP 1 LoRA with MiCA"}
# rows lorakit does but cannot merge: grouped convs, whose LoRA update is no grouped weight (peft refuses as well)
UNMERGEABLE = {"Conv2d Groups LoRA", "Conv2d Groups2 LoRA"}
# rows whose merge peft 0.21.2 gets wrong: lorakit's merge is checked against peft's unmerged model instead
PEFT_MERGE_BROKEN = {
    "Conv3d 1x1 LoRA": "peft's conv get_delta_weight takes a Conv3d's (out, in, 1, 1, 1) kernel for a Conv2d 1x1 "
    "one (it tests weight.size()[2:4] == (1, 1)) and fails: RuntimeError, size of tensor a (10) must match the size "
    "of tensor b (8); the peft source read here fixes it (#3768), peft 0.21.2 does not",
    "Conv3d 1x1 LoRA with DoRA": "as above",
}
# rows where peft 0.21.2 adds the output projection's update of a MultiheadAttention twice, in its forward and
# its merge (W_out + 2·s·B'A'; peft PR #3774): lorakit, which adds it once, is held to a copy of peft's model whose
# out_proj B' is halved, which computes the file's update once; peft's own model of the file is checked to double
PEFT_DOUBLES_OUT_PROJ = {"MHA 1 LoRA", "MHA 2 LoRA"}
OUT_PROJ_A, OUT_PROJ_B = ".base_layer.out_proj.lora_A.", ".base_layer.out_proj.lora_B."

ACCEPTED = [row for row in ROWS if row[0] not in REFUSED]
REFUSED_ROWS = [row for row in ROWS if row[0] in REFUSED]


def _ids(rows: list[tuple[str, str, dict]]) -> list[str]:
    return [row[0] for row in rows]


# ----- helpers ----------------------------------------------------------------------------------------------


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=ATOL, msg=lambda m: f"{what}: {m}")


def assert_differs(actual: torch.Tensor, reference: torch.Tensor, what: str) -> None:
    relative = ((actual - reference).norm() / reference.norm()).item()
    assert relative > 1e-3, f"{what}: relative difference {relative:.2e} is too small to test anything"


def init_of(kwargs: dict) -> bool | str:
    """The row's own init scheme, else False (random A and B)."""
    return kwargs.get("init_lora_weights", False)


def peft_model_of(model: str, kwargs: dict) -> nn.Module:
    """peft's model of the row, its trainable tensors moved deterministically as training would."""
    config = peft.LoraConfig(**{**kwargs, "init_lora_weights": init_of(kwargs)})
    torch.manual_seed(1)
    peft_model = peft.get_peft_model(build(model), config)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for _, param in sorted(peft_model.named_parameters()):
            if param.requires_grad:
                param.add_(0.1 * torch.randn(param.shape, generator=generator))
    return peft_model


def with_out_proj_update_once(peft_model: nn.Module) -> nn.Module:
    """A copy of `peft_model` whose MultiheadAttention out_proj B' is halved: peft 0.21.2 adds 2·s·B'A', so this
    copy computes the update of `peft_model`'s tensors once, as they mean."""
    copied = copy.deepcopy(peft_model)
    with torch.no_grad():
        for name, param in copied.named_parameters():
            if OUT_PROJ_B in name:
                param.mul_(0.5)
    return copied


def output(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


def peft_lora_names(peft_model: nn.Module) -> set[str]:
    """Its LoRA layers, without those inside another (peft's MultiheadAttention layer wraps its out_proj in one:
    one layer in lorakit)."""
    inner = peft_model.base_model.model
    names = {name for name, module in inner.named_modules() if isinstance(module, LoraLayer)}
    return {name for name in names if not any(name.startswith(outer + ".") for outer in names)}


def keyed_params(params: list[nn.Parameter], state: dict[str, torch.Tensor]) -> dict[str, nn.Parameter]:
    """State-dict key → the parameter it is a view of."""
    by_ptr = {p.data_ptr(): p for p in params}
    assert all(t.data_ptr() in by_ptr for t in state.values()), "a state-dict tensor is no parameter's storage"
    return {key: by_ptr[t.data_ptr()] for key, t in state.items()}


# ----- the tests --------------------------------------------------------------------------------------------


def test_the_rows_are_peft_lora_rows():
    assert len(ROWS) == 48 and len(set(_ids(ROWS))) == len(ROWS)
    assert set(REFUSED) <= set(_ids(ROWS)) and SAYS.keys() == REFUSED.keys()
    assert set(REFUSED) >= FILE_LOADS
    assert set(_ids(ACCEPTED)) >= UNMERGEABLE | PEFT_MERGE_BROKEN.keys() | PEFT_DOUBLES_OUT_PROJ
    assert {model for _, model, _ in ROWS} == set(MODELS)


@pytest.mark.parametrize(("row", "model", "kwargs"), ACCEPTED, ids=_ids(ACCEPTED))
def test_row_equals_peft(row, model, kwargs, tmp_path):
    x = MODELS[model].inputs()
    base_out = output(build(model), x)
    theirs = peft_model_of(model, kwargs)
    peft_of_file = output(theirs, x)  # what peft computes from these tensors
    theirs.save_pretrained(tmp_path / "peft")
    if row in PEFT_DOUBLES_OUT_PROJ:
        theirs = with_out_proj_update_once(theirs)  # what the tensors mean; step 5 checks peft's doubling
    expected = output(theirs, x)
    assert_differs(expected, base_out, "peft's adapter must change the output")
    peft_names = peft_lora_names(theirs)
    assert peft_names

    # 2. peft's file into lorakit
    ours = lorakit.load_adapter(build(model), tmp_path / "peft", trainable=True)
    assert {name for name, _ in lorakit.lora_layers(ours)} == peft_names
    unmerged = output(ours, x)
    assert_close(unmerged, expected, "lorakit with peft's file vs peft")

    # 3. the row's config taken directly: the same modules, peft's keys and shapes
    direct = lorakit.get_lora_model(
        build(model), lorakit.LoraConfig(**{**kwargs, "init_lora_weights": init_of(kwargs)})
    )
    assert {name for name, _ in lorakit.lora_layers(direct)} == peft_names
    peft_state = peft.get_peft_model_state_dict(theirs)
    assert {k: v.shape for k, v in lorakit.lora_state_dict(direct).items()} == {
        k: v.shape for k, v in peft_state.items()
    }

    # 4. merge and unmerge
    before = {name: param.detach().clone() for name, param in ours.named_parameters()}
    if row in UNMERGEABLE:
        with pytest.raises(lorakit.MergeError):
            lorakit.merge(ours)
        with pytest.raises(NotImplementedError, match="groups > 1"):  # peft refuses too
            copy.deepcopy(theirs).merge_adapter()
    else:
        lorakit.merge(ours)
        assert all(layer.merged_adapters == ["default"] for _, layer in lorakit.lora_layers(ours))
        merged = output(ours, x)
        assert_close(merged, unmerged, "lorakit merged vs unmerged")
        peft_merged = copy.deepcopy(theirs)
        if row in PEFT_MERGE_BROKEN:
            with pytest.raises(RuntimeError, match="must match the size"):
                peft_merged.merge_adapter()
            assert_close(merged, expected, "lorakit merged vs peft unmerged")
        else:
            peft_merged.merge_adapter()
            assert_close(merged, output(peft_merged, x), "lorakit merged vs peft merged")
        lorakit.unmerge(ours)
    for name, param in ours.named_parameters():
        assert torch.equal(param, before[name]), f"{name} not restored bit for bit"
    assert torch.equal(output(ours, x), unmerged)

    # 5. lorakit's file into peft
    lorakit.save_adapter(ours, tmp_path / "lorakit")
    ours_file = load_file(tmp_path / "lorakit" / "adapter_model.safetensors")
    peft_file = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert ours_file.keys() == peft_file.keys()
    assert all(torch.equal(ours_file[key], peft_file[key]) for key in peft_file)
    in_peft = peft.PeftModel.from_pretrained(build(model), tmp_path / "lorakit")
    assert peft_lora_names(in_peft) == peft_names
    assert_close(output(in_peft, x), peft_of_file, "peft with lorakit's file vs peft")
    if row in PEFT_DOUBLES_OUT_PROJ:  # fails once peft adds the update once: then drop the row from the set
        assert_differs(peft_of_file, expected, "peft 0.21.2 doubles MultiheadAttention's out_proj update")

    # 6. gradients in train mode (the same seed before each forward: the same dropout masks)
    for model_ in (theirs, ours):
        model_.train()
        torch.manual_seed(3)
        model_(x).square().mean().backward()
    theirs_params = keyed_params(list(theirs.parameters()), peft_state)
    ours_params = keyed_params(list(ours.parameters()), lorakit.lora_state_dict(ours))
    trainable = {key for key, param in theirs_params.items() if param.requires_grad}
    assert trainable == {key for key, param in ours_params.items() if param.requires_grad}
    assert sum(p.requires_grad for p in ours.parameters()) == len(trainable), "lorakit trains a tensor it saves not"
    for key in sorted(trainable):
        reference, grad = theirs_params[key].grad, ours_params[key].grad
        if row in PEFT_DOUBLES_OUT_PROJ and OUT_PROJ_A in key:
            # peft's second add is on `.data`, outside autograd: the halved copy's graph holds s·(B'/2)·A' once,
            # so its d/dA' is half of lorakit's (and its d/d(B'/2) equals lorakit's d/dB')
            reference = reference * 2

        assert reference is not None and reference.abs().sum() > 0, f"peft's {key} got no gradient"
        assert grad is not None, f"lorakit's {key} got no gradient"
        # atol in units of the gradient's largest entry: float32 rounding is relative to the terms summed (with
        # lora_alpha=32 the gradients reach ~60, and both libraries are ~5e-6 off a float64 reference there)
        atol = GRAD_ATOL * max(1.0, reference.abs().max().item())
        torch.testing.assert_close(grad, reference, rtol=GRAD_RTOL, atol=atol, msg=lambda m, k=key: f"{k}: {m}")


@pytest.mark.parametrize(("row", "model", "kwargs"), REFUSED_ROWS, ids=_ids(REFUSED_ROWS))
def test_refused_row_raises(row, model, kwargs, tmp_path):
    with pytest.raises(lorakit.LoraError, match=re.escape(SAYS[row])):
        lorakit.get_lora_model(build(model), lorakit.LoraConfig(**{**kwargs, "init_lora_weights": init_of(kwargs)}))
    x = MODELS[model].inputs()
    theirs = peft_model_of(model, kwargs)
    expected = output(theirs, x)
    theirs.save_pretrained(tmp_path)
    fresh = build(model)
    original = copy.deepcopy(fresh.state_dict())
    if row in FILE_LOADS:
        assert_close(output(lorakit.load_adapter(fresh, tmp_path), x), expected, "lorakit with peft's file vs peft")
    else:
        with pytest.raises(lorakit.LoraError):
            lorakit.load_adapter(fresh, tmp_path)
        assert fresh.state_dict().keys() == original.keys()
        assert all(torch.equal(value, original[key]) for key, value in fresh.state_dict().items()), "model changed"
