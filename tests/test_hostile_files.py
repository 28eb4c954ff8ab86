"""Adapter files from strangers (design §4): corrupt safetensors, hostile configs, pickles, crashes mid-save.

`load_adapter` and `read_adapter_config` may only raise `LoraError`, must not hang or unpickle, and leave the
model exactly as it was when they fail; `save_adapter` never leaves a partial file under a final name.
The fuzz tests judge every outcome against `parse_adapter`, a small safetensors reader written here from the
format's specification, independent of the `safetensors` package that lorakit uses.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import json
import math
import os
import pickle
import random
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context
from safetensors.torch import save as safetensors_bytes
from torch import nn

import lorakit
from lorakit import LoraConfig, LoraError
from lorakit.model import AdapterTarget, add_planned_adapter
from lorakit.targets import expand_all_linear, find_targets, is_plain_pattern

PREFIX = "base_model.model."
WEIGHTS = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
BIN = "adapter_model.bin"
TEMP_PREFIX = ".lorakit-tmp-"

CONFIG = LoraConfig(r=2, lora_alpha=4, target_modules=["0", "1"], init_lora_weights=False)
OTHER_CONFIG = LoraConfig(r=3, lora_alpha=3, target_modules=["0"], init_lora_weights=False)
EXPECTED_SHAPES = {
    "0.lora_A.weight": (2, 8),
    "0.lora_B.weight": (8, 2),
    "1.lora_A.weight": (2, 8),
    "1.lora_B.weight": (4, 2),
}
FLOAT_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}
# LORAKIT_FUZZ_EXAMPLES raises the example count for a longer hunt; the deadline makes a hang a failure.
FUZZ = settings(
    max_examples=int(os.environ.get("LORAKIT_FUZZ_EXAMPLES", "150")),
    deadline=2000,
    suppress_health_check=[HealthCheck.too_slow],
    database=None,
)


def make_base(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4))


def make_lora(seed: int, config: LoraConfig = CONFIG) -> nn.Sequential:
    """A LoRA model whose adapter tensors are random (init_lora_weights=False) and depend on `seed`."""
    return lorakit.get_lora_model(make_base(seed), config)


def fresh_model(as_lora: bool) -> nn.Sequential:
    """The model a fuzzed file is loaded into: plain, or already a LoRA model with adapter "default"."""
    return make_lora(7, OTHER_CONFIG) if as_lora else make_base(0)


def _save_reference(directory: Path, seed: int, config: LoraConfig = CONFIG) -> Path:
    lorakit.save_adapter(make_lora(seed, config), directory)
    return directory


_REFERENCE = _save_reference(Path(tempfile.mkdtemp(prefix="lorakit-hostile-")), seed=1)
atexit.register(shutil.rmtree, _REFERENCE, True)
VALID_BYTES = (_REFERENCE / WEIGHTS).read_bytes()
CONFIG_TEXT = (_REFERENCE / CONFIG_FILE).read_bytes()
HEADER_LEN = int.from_bytes(VALID_BYTES[:8], "little")
HEADER = json.loads(VALID_BYTES[8 : 8 + HEADER_LEN])
DATA = VALID_BYTES[8 + HEADER_LEN :]


# ----- an independent reader of the safetensors format ---------------------------------------------------


class _Duplicate(ValueError):
    pass


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [key for key, _ in pairs]
    if len(set(keys)) != len(keys):
        raise _Duplicate("duplicate name in a JSON object")
    return dict(pairs)


def _no_constants(name: str) -> None:
    raise ValueError(name)


def parse_adapter(raw: bytes) -> dict[str, torch.Tensor] | None:
    """`{short key: tensor}` when `raw` is a well-formed safetensors file (per the format's specification,
    with unique JSON names) that holds exactly the adapter `EXPECTED_SHAPES` describes in floating dtypes;
    else None."""
    if len(raw) < 8:
        return None
    size = int.from_bytes(raw[:8], "little")
    if size > 100_000_000 or 8 + size > len(raw):
        return None
    try:
        header = json.loads(
            raw[8 : 8 + size].decode("utf-8"), object_pairs_hook=_unique_pairs, parse_constant=_no_constants
        )
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    if not isinstance(header, dict):
        return None
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        return None
    data = raw[8 + size :]
    entries: dict[str, tuple[torch.dtype, list[int], int, int]] = {}
    for key, info in header.items():
        if not isinstance(info, dict):
            return None
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not (isinstance(dtype, str) and dtype in FLOAT_DTYPES):
            return None  # a non-float dtype (or an unknown one) is never a valid adapter tensor
        if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
            return None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
            return None
        begin, end = offsets
        itemsize = FLOAT_DTYPES[dtype].itemsize
        if not 0 <= begin <= end or end - begin != math.prod(shape) * itemsize:
            return None
        short = key.removeprefix(PREFIX)
        if short in entries:
            return None  # the same tensor with and without the prefix
        entries[short] = (FLOAT_DTYPES[dtype], shape, begin, end)
    position = 0
    for _, _, begin, end in sorted(entries.values(), key=lambda e: (e[2], e[3])):
        if begin != position:
            return None  # a hole or an overlap
        position = end
    if position != len(data):
        return None
    if {short: tuple(shape) for short, (_, shape, _, _) in entries.items()} != EXPECTED_SHAPES:
        return None
    return {
        short: torch.frombuffer(bytearray(data[begin:end]), dtype=dtype).reshape(shape)
        for short, (dtype, shape, begin, end) in entries.items()
    }


def assert_same_values(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """Bit-for-bit equality after conversion to float32; NaN matches NaN whatever its payload."""
    expected = expected.to(torch.float32)
    assert actual.dtype == torch.float32 and actual.shape == expected.shape, what
    nan = torch.isnan(actual)
    assert torch.equal(nan, torch.isnan(expected)), f"{what}: NaNs differ"
    assert torch.equal(actual[~nan].view(torch.int32), expected[~nan].view(torch.int32)), f"{what}: values differ"


# ----- model snapshots ------------------------------------------------------------------------------------


def snapshot(model: nn.Module) -> dict[str, Any]:
    state = {
        "types": [(name, type(module)) for name, module in model.named_modules()],
        "params": [(name, id(p), p.requires_grad) for name, p in model.named_parameters()],
        "values": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "is_lora": lorakit.is_lora_model(model),
    }
    if state["is_lora"]:
        state["adapters"] = (lorakit.adapter_names(model), lorakit.active_adapters(model))
    return state


def assert_unchanged(model: nn.Module, before: dict[str, Any]) -> None:
    after = snapshot(model)
    assert after["is_lora"] == before["is_lora"]
    assert after["types"] == before["types"]
    assert after["params"] == before["params"], "parameters replaced or requires_grad flags changed"
    assert after.get("adapters") == before.get("adapters")
    assert after["values"].keys() == before["values"].keys()
    for key, value in before["values"].items():
        assert torch.equal(after["values"][key], value), f"{key} changed"


def write_adapter(directory: Path, weights: bytes | None = None, config: bytes = CONFIG_TEXT) -> Path:
    """`directory` emptied, then holding `config` and `weights` (the valid adapter's by default)."""
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    (directory / CONFIG_FILE).write_bytes(config)
    (directory / WEIGHTS).write_bytes(VALID_BYTES if weights is None else weights)
    return directory


def check_load(directory: Path, expected: dict[str, torch.Tensor] | None, as_lora: bool) -> bool:
    """Load `directory` into a fresh model. `expected` (the file's tensors) None: the load must raise
    `LoraError` and change nothing; else it must succeed with exactly those tensors. Returns success."""
    model = fresh_model(as_lora)
    before = snapshot(model)
    name = "other" if as_lora else "default"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            lorakit.load_adapter(model, directory, adapter_name=name)
    except LoraError as error:
        assert_unchanged(model, before)
        assert expected is None, f"a valid adapter was refused: {error}"
        _event("refused")
        return False
    assert expected is not None, "an invalid adapter file was loaded"
    assert lorakit.is_lora_model(model)
    assert lorakit.adapter_names(model) == (["default", "other"] if as_lora else ["default"])
    assert isinstance(model[0], lorakit.LoraLinear) and isinstance(model[1], lorakit.LoraLinear)
    loaded = lorakit.lora_state_dict(model, name)
    assert {k.removeprefix(PREFIX) for k in loaded} == set(expected)
    for key, tensor in loaded.items():
        assert_same_values(tensor, expected[key.removeprefix(PREFIX)], key)
    frozen = [p.requires_grad for n, p in model.named_parameters() if not as_lora or f".{name}." in n]
    assert frozen and not any(frozen)  # trainable=False: the loaded adapter (and on a plain model, all) frozen
    after = model.state_dict()
    for key, value in before["values"].items():  # base weights (and an existing adapter) untouched
        module, _, param = key.rpartition(".")
        assert torch.equal(after[key if key in after else f"{module}.base_layer.{param}"], value), key
    _event("loaded")
    return True


def _event(outcome: str) -> None:
    """Count outcomes for `pytest --hypothesis-show-statistics`, to see that fuzzing reaches both."""
    if currently_in_test_context():
        event(outcome)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("hostile")


# ----- 1. corrupted adapter_model.safetensors --------------------------------------------------------------


def test_the_oracle_accepts_the_pristine_file_and_it_loads(workdir: Path) -> None:
    expected = parse_adapter(VALID_BYTES)
    assert expected is not None
    reference = lorakit.lora_state_dict(make_lora(1))
    for key, tensor in reference.items():
        assert torch.equal(expected[key.removeprefix(PREFIX)], tensor)
    for as_lora in (False, True):
        assert check_load(write_adapter(workdir / "pristine"), expected, as_lora)


_HEADER_LENGTHS = [0, 1, 7, HEADER_LEN - 1, HEADER_LEN + 1, len(VALID_BYTES), 100_000_001, 10**9, 2**63, 2**64 - 1]


@st.composite
def byte_mutations(draw: st.DrawFn) -> bytes:
    raw = bytearray(VALID_BYTES)
    kind = draw(st.sampled_from(["flip", "overwrite", "truncate", "append", "header_length", "data_flip"]))
    if kind == "flip":
        for position, mask in draw(
            st.lists(st.tuples(st.integers(0, len(raw) - 1), st.integers(1, 255)), min_size=1, max_size=8)
        ):
            raw[position] ^= mask
    elif kind == "data_flip":  # inside the tensor bytes: still a valid file, with other values
        for position, mask in draw(
            st.lists(st.tuples(st.integers(8 + HEADER_LEN, len(raw) - 1), st.integers(1, 255)), min_size=1, max_size=8)
        ):
            raw[position] ^= mask
    elif kind == "overwrite":
        position = draw(st.integers(0, len(raw) - 1))
        junk = draw(st.binary(min_size=1, max_size=24))
        raw[position : position + len(junk)] = junk
    elif kind == "truncate":
        del raw[draw(st.integers(0, len(raw) - 1)) :]
    elif kind == "append":
        raw += draw(st.binary(min_size=1, max_size=64))
    else:
        length = draw(st.sampled_from(_HEADER_LENGTHS) | st.integers(0, 2**64 - 1))
        raw[:8] = length.to_bytes(8, "little")
    return bytes(raw)


@FUZZ
@given(raw=byte_mutations(), as_lora=st.booleans())
def test_corrupted_weights_raise_lora_error_or_load_exactly_what_the_file_holds(
    workdir: Path, raw: bytes, as_lora: bool
) -> None:
    check_load(write_adapter(workdir / "bytes", raw), parse_adapter(raw), as_lora)


_JSON_SCALARS = (
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8)
)
JSON_VALUES = st.recursive(
    _JSON_SCALARS,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
_DTYPES = [
    "F16",
    "BF16",
    "F32",
    "F64",
    "I64",
    "I32",
    "I16",
    "I8",
    "U8",
    "U64",
    "BOOL",
    "F8_E4M3",
    "F8_E5M2",
    "C64",
    "f32",
    "",
    "X",
]


def _header_text(pairs: list[tuple[str, Any]]) -> bytes:
    """A JSON object from `pairs`, duplicates kept."""
    return ("{" + ",".join(f"{json.dumps(k)}:{json.dumps(v)}" for k, v in pairs) + "}").encode()


@st.composite
def header_mutations(draw: st.DrawFn) -> bytes:
    """A new JSON header (and often a data section rebuilt to agree with it) in front of the tensor bytes."""
    if draw(st.integers(0, 9)) == 0:  # any JSON value at all as the header
        header = json.dumps(draw(JSON_VALUES)).encode()
        return len(header).to_bytes(8, "little") + header + DATA
    pairs = [(k, dict(v)) if isinstance(v, dict) else (k, v) for k, v in HEADER.items()]
    for _ in range(draw(st.integers(1, 3))):
        tensor_indices = [i for i, (k, v) in enumerate(pairs) if k != "__metadata__" and isinstance(v, dict)]
        op = draw(
            st.sampled_from(["dtype", "shape", "offsets", "field", "drop", "duplicate", "rename", "extra", "metadata"])
        )
        if not tensor_indices and op not in ("extra", "metadata"):
            continue
        index = draw(st.sampled_from(tensor_indices)) if tensor_indices else 0
        key, info = pairs[index] if tensor_indices else ("", {})
        if op == "dtype":
            info["dtype"] = draw(st.sampled_from(_DTYPES) | JSON_VALUES)
        elif op == "shape":
            info["shape"] = draw(
                st.lists(st.integers(-2, 10), max_size=3)
                | st.sampled_from([[8, 2], [2, 8], [16], [2, 8, 1], [2**40, 0], [2**64, 2], [2.0, 8], [True, 8]])
                | JSON_VALUES
            )
        elif op == "offsets":
            info["data_offsets"] = draw(
                st.lists(st.integers(-8, 240), min_size=0, max_size=3)
                | st.sampled_from([[0, 2**64], [0, 2**64 - 1], [224, 224], [64, 0], [0, 64]])
                | JSON_VALUES
            )
        elif op == "field":
            info.pop(draw(st.sampled_from(["dtype", "shape", "data_offsets"])), None)
            if draw(st.booleans()):
                info[draw(st.text(max_size=6))] = draw(JSON_VALUES)
        elif op == "drop":
            del pairs[index]
        elif op == "duplicate":
            twin = dict(info)
            if draw(st.booleans()):
                twin["data_offsets"] = draw(st.sampled_from([pairs[i][1].get("data_offsets") for i in tensor_indices]))
            pairs.insert(draw(st.integers(0, len(pairs))), (key, twin))
        elif op == "rename":
            new = draw(
                st.sampled_from(
                    [
                        key.removeprefix(PREFIX),
                        key + "x",
                        key.replace(".0.", ".2."),
                        key.replace("lora_A", "lora_C"),
                        "",
                    ]
                )
                | st.text(max_size=12)
            )
            pairs[index] = (new, info)
        elif op == "extra":
            pairs.insert(draw(st.integers(0, len(pairs))), (draw(st.text(max_size=12)), draw(JSON_VALUES)))
        else:
            meta = draw(st.sampled_from([None, {}, {"format": "pt"}, {"a": 1}, [], "pt"]) | JSON_VALUES)
            pairs = [p for p in pairs if p[0] != "__metadata__"] + [("__metadata__", meta)]
    data = DATA
    if draw(st.booleans()):  # make offsets and data agree with the new dtypes and shapes where possible
        position = 0
        for _, info in pairs:
            dtype = info.get("dtype") if isinstance(info, dict) else None
            if not (isinstance(dtype, str) and dtype in FLOAT_DTYPES and isinstance(info.get("shape"), list)):
                continue
            shape = info["shape"]
            if not all(type(d) is int and 0 <= d < 64 for d in shape):
                continue
            nbytes = math.prod(shape) * FLOAT_DTYPES[info["dtype"]].itemsize
            info["data_offsets"] = [position, position + nbytes]
            position += nbytes
        data = random.Random(draw(st.integers(0, 2**32 - 1))).randbytes(position)
    header = _header_text(pairs)
    header += b" " * draw(st.integers(0, 9))
    return len(header).to_bytes(8, "little") + header + data


@FUZZ
@given(raw=header_mutations(), as_lora=st.booleans())
def test_rewritten_headers_raise_lora_error_or_load_exactly_what_the_file_holds(
    workdir: Path, raw: bytes, as_lora: bool
) -> None:
    check_load(write_adapter(workdir / "header", raw), parse_adapter(raw), as_lora)


@pytest.mark.parametrize(
    ("pairs", "valid"),
    [
        # the same key twice: which tensor is "the" tensor depends on the reader; refuse the file
        ([*HEADER.items(), ("base_model.model.0.lora_A.weight", HEADER["base_model.model.0.lora_A.weight"])], False),
        (
            [
                (
                    "base_model.model.0.lora_A.weight",
                    {**HEADER["base_model.model.0.lora_A.weight"], "dtype": "F16", "shape": [2, 4]},
                ),
                *HEADER.items(),
            ],
            False,
        ),
        # the same tensor with and without the prefix
        ([*HEADER.items(), ("0.lora_A.weight", HEADER["base_model.model.0.lora_A.weight"])], False),
        # keys without the prefix, in another order: fine
        ([(k.removeprefix(PREFIX), v) for k, v in reversed(HEADER.items())], True),
    ],
    ids=["duplicate", "duplicate-first-differs", "with-and-without-prefix", "unprefixed-reordered"],
)
def test_duplicate_or_ambiguous_header_keys(workdir: Path, pairs: list[tuple[str, Any]], valid: bool) -> None:
    header = _header_text(pairs)
    raw = len(header).to_bytes(8, "little") + header + DATA
    assert (parse_adapter(raw) is not None) == valid
    for as_lora in (False, True):
        assert check_load(write_adapter(workdir / "dup", raw), parse_adapter(raw), as_lora) == valid


# ----- 2. hostile adapter_config.json -----------------------------------------------------------------------


def check_config(directory: Path, text: bytes, valid: bool | None = None) -> None:
    """`read_adapter_config` and `load_adapter` on `text` (with the valid weights) agree and raise nothing but
    `LoraError`; `valid` (when known) says which outcome is right."""
    write_adapter(directory, config=text)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            config = lorakit.read_adapter_config(directory)
        except LoraError:
            config = None
    if config is not None:
        assert isinstance(config, LoraConfig)
        assert LoraConfig(**config.to_dict()) == config  # what was accepted is a valid config
    loaded = check_load(directory, None if config is None else _maybe_valid(config), as_lora=False)
    if valid is not None:
        assert loaded == valid, f"{text[:200]!r}: expected {'success' if valid else 'LoraError'}"


def _maybe_valid(config: LoraConfig) -> dict[str, torch.Tensor] | None:
    """The tensors a successful load must give: the file's, when `config` asks for exactly the adapter
    tensors the file holds (found by converting a spare model as a file's config is read: its targets by
    peft's rules, without the checks of a config typed in code; a `target_modules` pattern lorakit does not
    evaluate stands for the modules the file's keys name, and any other such pattern is refused); else None."""
    patterns = [*config.rank_pattern, *config.alpha_pattern]
    if config.layers_to_transform not in (None, []):
        patterns += [config.layers_pattern] if isinstance(config.layers_pattern, str) else config.layers_pattern or []
    if not all(is_plain_pattern(pattern) for pattern in patterns):
        return None
    if isinstance(config.target_modules, str) and not is_plain_pattern(config.target_modules):
        config = config.replace(target_modules=["0", "1"])
    if any(config.rank_for(name) > 64 for name in ("0", "1")):
        return None
    model = make_base(0)
    try:
        config = expand_all_linear(model, config)
        targets = [AdapterTarget(n, m, config.rank_for(n), config.alpha_for(n)) for n, m in find_targets(model, config)]
        add_planned_adapter(model, "default", config, targets, trainable=True)
    except LoraError:
        return None
    shapes = {k.removeprefix(PREFIX): tuple(v.shape) for k, v in lorakit.lora_state_dict(model).items()}
    return parse_adapter(VALID_BYTES) if shapes == EXPECTED_SHAPES else None


@FUZZ
@given(payload=st.binary(max_size=300) | JSON_VALUES.map(lambda v: json.dumps(v).encode()))
def test_random_config_bytes_and_json_raise_only_lora_error(workdir: Path, payload: bytes) -> None:
    check_config(workdir / "config-random", payload, valid=False)


@FUZZ
@given(extra=st.dictionaries(st.text(max_size=12), JSON_VALUES, max_size=6))
def test_lora_config_with_random_fields_raises_only_lora_error(workdir: Path, extra: dict[str, Any]) -> None:
    check_config(workdir / "config-fields", json.dumps({"peft_type": "LORA", **extra}).encode())


_BASE_CONFIG = json.loads(CONFIG_TEXT)


def _valid_r(v: Any) -> bool:
    return type(v) is int and v == 2


def _valid_alpha(v: Any) -> bool:
    return type(v) in (int, float) and 0 < v <= sys.float_info.max  # an int too big for a float is no alpha


def _valid_dropout(v: Any) -> bool:
    return type(v) in (int, float) and 0 <= v < 1


# Fields whose right outcome is known for every value: does the file still load?
_FIELD_ORACLE = {
    "r": _valid_r,
    "lora_alpha": _valid_alpha,
    "lora_dropout": _valid_dropout,
    "bias": lambda v: v == "none",
    "use_rslora": lambda v: type(v) is bool,
    "fan_in_fan_out": lambda v: type(v) is bool,
    "inference_mode": lambda v: type(v) is bool,
    # True asks for tensors these files lack (lora_B.bias; lora_magnitude_vector): a missing-key error
    "lora_bias": lambda v: v is False,
    "use_dora": lambda v: v is False,
    "peft_type": lambda v: v == "LORA",
    "init_lora_weights": lambda v: (
        (type(v) is bool) or v in ("gaussian", "eva", "orthogonal", "loftq", "mica", "pissa", "olora")
    ),
}
_SPECIAL_VALUES = [
    0,
    -1,
    2,
    2.0,
    "2",
    True,
    None,
    [],
    {},
    [2],
    2**40,
    10**30,
    -0.5,
    0.5,
    1,
    1e308,
    "none",
    "LORA",
    "lora",
    "all",
    0.0,
    1.0,
    10**400,
]


@FUZZ
@given(
    field=st.sampled_from(sorted(_BASE_CONFIG)),
    value=st.sampled_from(_SPECIAL_VALUES) | JSON_VALUES,
)
def test_single_field_replaced_by_any_value(workdir: Path, field: str, value: Any) -> None:
    oracle = _FIELD_ORACLE.get(field)
    check_config(
        workdir / "config-field",
        json.dumps({**_BASE_CONFIG, field: value}).encode(),
        None if oracle is None else oracle(value),
    )


def _with(**changes: Any) -> bytes:
    return json.dumps({**_BASE_CONFIG, **changes}).encode()


def _literal(field: str, literal: str) -> bytes:
    return json.dumps({**_BASE_CONFIG, field: "@@"}).replace('"@@"', literal).encode()


BAD_CONFIGS = {
    "r=0": _with(r=0),
    "r='8'": _with(r="8"),
    "r=3": _with(r=3),
    "r=2**40": _with(r=2**40),  # would ask the allocator for terabytes
    "r=10**30": _with(r=10**30),  # does not fit a C long
    "rank_pattern-2**40": _with(rank_pattern={"0": 2**40}),
    "rank_pattern-bad-regex": _with(rank_pattern={"(": 2}),
    "alpha_pattern-negative": _with(alpha_pattern={"1": -1}),
    "lora_alpha=None": _with(lora_alpha=None),
    "lora_alpha=10**400": _with(lora_alpha=10**400),  # an int no float can hold
    "alpha_pattern-10**400": _with(alpha_pattern={"0": 10**400}),
    "init_lora_weights=0.0": _with(init_lora_weights=0.0),  # == False, but is not False
    "init_lora_weights=1.0": _with(init_lora_weights=1.0),
    # patterns that compile alone but not inside the regex lorakit embeds them in
    "rank_pattern-inline-flag": _with(rank_pattern={"(?i)0": 2}),
    "alpha_pattern-inline-flag": _with(alpha_pattern={"(?i)0": 2}),
    "modules_to_save-inline-flag": _with(modules_to_save=["(?i)0"]),
    "layers_pattern-inline-flag": _with(layers_pattern="(?i)layers", layers_to_transform=[0]),
    "target_modules=5": _with(target_modules=5),
    "target_modules-subset": _with(target_modules=["0"]),
    "target_modules-nothing": _with(target_modules="nothing"),
    "bias=x": _with(bias="x"),
    "use_rslora=yes": _with(use_rslora="yes"),
    "peft_type=LOHA": _with(peft_type="LOHA"),
    "use_dora": _with(use_dora=True),
    "pissa_niter_x": _with(init_lora_weights="pissa_niter_x"),
    "lora_bias": _with(lora_bias=True),
    "modules_to_save-missing": _with(modules_to_save=["missing"]),
    "layers_to_transform='0'": _with(layers_to_transform="0"),
    "NaN": _literal("lora_alpha", "NaN"),
    "Infinity": _literal("lora_alpha", "Infinity"),
    "-Infinity": _literal("lora_dropout", "-Infinity"),
    "1e400": _literal("lora_alpha", "1e400"),
    "5001-digit-r": _literal("r", "1" + "0" * 5000),  # beyond Python's int-parsing digit limit
    "deep-array": _literal("target_modules", "[" * 100_000 + "]" * 100_000),
    "deep-object": b'{"a":' * 100_000 + b"1" + b"}" * 100_000,
    "empty": b"",
    "bom-and-junk": b"\xff\xfe{}",
    "array": b"[]",
    "string": b'"LORA"',
    "unclosed": b"{" * 10_000,
    "self-kwarg": b'{"peft_type": "LORA", "self": 1}',
}


@pytest.mark.parametrize("text", list(BAD_CONFIGS.values()), ids=list(BAD_CONFIGS))
def test_bad_config_values_raise_lora_error(workdir: Path, text: bytes) -> None:
    check_config(workdir / "config-bad", text, valid=False)


GOOD_CONFIGS = {
    "saved": CONFIG_TEXT,
    "regex": _with(target_modules="[01]"),
    "rslora": _with(use_rslora=True, lora_alpha=0.5),
    "eva": _with(init_lora_weights="eva"),
    "loftq": _with(init_lora_weights="loftq"),
    "mica": _with(init_lora_weights="mica"),
    # ("pissa" and "olora" files load too, taking their start out of the base again as peft does, so the base
    # changes: test_init_schemes.py checks what they load to)
    "patterns": _with(rank_pattern={"1": 2}, alpha_pattern={"0": 16}),
    "unused-huge-r": _with(r=10**9, rank_pattern={"0": 2, "1": 2}),
    "minimal": b'{"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["0", "1"], "someday": null}',
    "unknown-dunder-field": b'{"peft_type": "LORA", "r": 2, "target_modules": ["0", "1"], "__class__": 1}',
}


@pytest.mark.parametrize("text", list(GOOD_CONFIGS.values()), ids=list(GOOD_CONFIGS))
def test_valid_config_variants_load(workdir: Path, text: bytes) -> None:
    check_config(workdir / "config-good", text, valid=True)


def test_non_utf8_and_oversized_configs(workdir: Path) -> None:
    check_config(workdir / "config-big", b'{"peft_type": "LORA", "x": "' + b"a" * (17 << 20) + b'"}', valid=False)
    latin1 = json.dumps({**_BASE_CONFIG, "base_model_name_or_path": "é"}, ensure_ascii=False).encode("latin-1")
    check_config(workdir / "config-latin1", latin1, valid=False)


# ----- 3. strictness, with messages that name the key --------------------------------------------------------


def _tensors(seed: int = 1) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in lorakit.lora_state_dict(make_lora(seed)).items()}


def _load_error(directory: Path, tensors: dict[str, torch.Tensor]) -> str:
    write_adapter(directory, safetensors_bytes(tensors, metadata={"format": "pt"}))
    model = make_base(0)
    before = snapshot(model)
    with pytest.raises(LoraError) as info:
        lorakit.load_adapter(model, directory)
    assert_unchanged(model, before)
    return str(info.value)


def test_missing_key_is_named(workdir: Path) -> None:
    tensors = _tensors()
    del tensors[PREFIX + "1.lora_B.weight"]
    message = _load_error(workdir / "missing", tensors)
    assert "missing" in message and "1.lora_B.weight" in message
    assert "0.lora_A.weight" not in message


def test_unexpected_key_is_named(workdir: Path) -> None:
    tensors = {**_tensors(), PREFIX + "0.lora_C.weight": torch.zeros(2, 8)}
    message = _load_error(workdir / "unexpected", tensors)
    assert "unexpected" in message and "0.lora_C.weight" in message


def test_misshaped_key_names_both_shapes(workdir: Path) -> None:
    tensors = {**_tensors(), PREFIX + "0.lora_A.weight": torch.zeros(3, 8)}
    message = _load_error(workdir / "misshaped", tensors)
    assert "0.lora_A.weight" in message and "[3, 8]" in message and "[2, 8]" in message


@pytest.mark.parametrize(
    "dtype", [torch.int64, torch.bool, torch.uint8, torch.int8, torch.float8_e4m3fn, torch.complex64]
)
def test_non_float_tensor_is_named(workdir: Path, dtype: torch.dtype) -> None:
    tensors = _tensors()
    tensors[PREFIX + "1.lora_A.weight"] = torch.ones(2, 8).to(dtype)
    try:
        message = _load_error(workdir / "dtype", tensors)
    except TypeError:  # safetensors cannot store this dtype
        pytest.skip(f"safetensors cannot store {dtype}")
    assert "1.lora_A.weight" in message


def test_same_tensor_with_and_without_prefix_is_refused(workdir: Path) -> None:
    tensors = _tensors()
    tensors["0.lora_A.weight"] = tensors[PREFIX + "0.lora_A.weight"].clone()
    assert "0.lora_A.weight" in _load_error(workdir / "twice", tensors)


def test_failed_load_into_a_lora_model_unwraps_what_it_wrapped(workdir: Path) -> None:
    """OTHER_CONFIG adapts only module 0; the file's config also targets module 1, which the load wraps
    before it finds the missing key. The failure must put the plain module 1 back."""
    tensors = _tensors()
    del tensors[PREFIX + "1.lora_B.weight"]
    write_adapter(workdir / "lora-missing", safetensors_bytes(tensors, metadata={"format": "pt"}))
    model = fresh_model(as_lora=True)
    before = snapshot(model)
    with pytest.raises(LoraError, match=r"1\.lora_B\.weight"):
        lorakit.load_adapter(model, workdir / "lora-missing", adapter_name="other")
    assert_unchanged(model, before)
    assert type(model[1]) is nn.Linear


def test_loading_under_a_taken_adapter_name_keeps_the_existing_adapter(workdir: Path) -> None:
    model = fresh_model(as_lora=True)
    before = snapshot(model)
    with pytest.raises(LoraError, match="already exists"):
        lorakit.load_adapter(model, write_adapter(workdir / "taken"), adapter_name="default")
    assert_unchanged(model, before)


@pytest.mark.parametrize("prefixed", ["all", "none", "mixed"])
def test_keys_load_with_or_without_the_prefix(workdir: Path, prefixed: str) -> None:
    reference = make_lora(1)
    x = torch.randn(5, 8)
    expected = reference(x)
    tensors = {}
    for i, (key, value) in enumerate(_tensors().items()):
        keep = prefixed == "all" or (prefixed == "mixed" and i % 2 == 0)
        tensors[key if keep else key.removeprefix(PREFIX)] = value
    directory = write_adapter(workdir / f"prefix-{prefixed}", safetensors_bytes(tensors, metadata={"format": "pt"}))
    model = lorakit.load_adapter(make_base(1), directory)
    assert torch.equal(model(x), expected)


# ----- 4. pickles ---------------------------------------------------------------------------------------------


class _Payload:
    """Unpickling this calls `function(*args)`."""

    def __init__(self, function: Any, *args: Any) -> None:
        self.function, self.args = function, args

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return self.function, self.args


def _payload(kind: str, marker: Path) -> _Payload:
    if kind == "system":
        return _Payload(os.system, f"touch {marker}")
    if kind == "open":
        return _Payload(open, str(marker), "w")
    return _Payload(eval, f"__import__('pathlib').Path({str(marker)!r}).touch()")


def _write_bin(directory: Path, obj: Any, writer: str) -> Path:
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    (directory / CONFIG_FILE).write_bytes(CONFIG_TEXT)
    with open(directory / BIN, "wb") as file:
        if writer == "torch":
            torch.save(obj, file)
        else:
            pickle.dump(obj, file, protocol=2)
    return directory


@pytest.mark.parametrize("writer", ["torch", "pickle"])
@pytest.mark.parametrize("kind", ["system", "open", "eval"])
@pytest.mark.parametrize("where", ["whole", "value"])
def test_pickle_with_a_code_payload_is_refused_and_never_runs(
    workdir: Path, writer: str, kind: str, where: str
) -> None:
    marker = workdir / f"pwned-{writer}-{kind}-{where}"
    payload = _payload(kind, marker)
    obj = payload if where == "whole" else {**_tensors(), PREFIX + "0.lora_A.weight": payload}
    directory = _write_bin(workdir / "evil", obj, writer)
    model = make_base(0)
    before = snapshot(model)
    with pytest.raises(LoraError, match="weights_only"):
        lorakit.load_adapter(model, directory)
    assert not marker.exists(), "the pickle's payload ran"
    assert_unchanged(model, before)
    # control: the payload is live, an unrestricted unpickler runs it
    with contextlib.suppress(Exception):
        torch.load(directory / BIN, weights_only=False)
    assert marker.exists()
    marker.unlink()


def test_benign_bin_loads_like_the_safetensors_file(workdir: Path) -> None:
    x = torch.randn(5, 8)
    from_safetensors = lorakit.load_adapter(make_base(0), write_adapter(workdir / "st"))
    directory = _write_bin(workdir / "bin", _tensors(), "torch")
    assert not (directory / WEIGHTS).exists()
    model = make_base(0)
    lorakit.load_adapter(model, directory)
    assert torch.equal(model(x), from_safetensors(x))
    for key, tensor in lorakit.lora_state_dict(model).items():
        assert torch.equal(tensor, lorakit.lora_state_dict(from_safetensors)[key])


@pytest.mark.filterwarnings("ignore::UserWarning")  # TypedStorage deprecation, from the qint8 case
@pytest.mark.parametrize(
    "kind", ["meta", "sparse_coo", "sparse_csr", "nested", "complex", "qint8", "not_a_dict", "int_key"]
)
def test_bin_with_tensors_that_are_not_plain_floats_is_refused(workdir: Path, kind: str) -> None:
    tensors = _tensors()
    key = PREFIX + "0.lora_A.weight"
    value = tensors[key]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        obj: Any = {
            "meta": lambda: {**tensors, key: torch.empty(2, 8, device="meta")},
            "sparse_coo": lambda: {**tensors, key: value.to_sparse()},
            "sparse_csr": lambda: {**tensors, key: value.to_sparse_csr()},
            "nested": lambda: {**tensors, key: torch.nested.nested_tensor([value[0], value[1]])},
            "complex": lambda: {**tensors, key: value.to(torch.complex64)},
            "qint8": lambda: {**tensors, key: torch.quantize_per_tensor(value, 0.1, 0, torch.qint8)},
            "not_a_dict": lambda: list(tensors.values()),
            "int_key": lambda: {**tensors, 5: value},
        }[kind]()
    directory = _write_bin(workdir / "exotic", obj, "torch")
    model = make_base(0)
    before = snapshot(model)
    with pytest.raises(LoraError):
        lorakit.load_adapter(model, directory)
    assert_unchanged(model, before)


# ----- never hang on special files ------------------------------------------------------------------------------


def _load_with_timeout(directory: Path, unblock: Path | None, seconds: float = 10.0) -> BaseException | None:
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            lorakit.load_adapter(make_base(0), directory)
            outcome.append(None)
        except BaseException as error:
            outcome.append(error)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    hung = thread.is_alive()
    if hung and unblock is not None:  # release a reader blocked on the FIFO so the thread ends, then fail
        with contextlib.suppress(OSError):
            os.close(os.open(unblock, os.O_WRONLY | os.O_NONBLOCK))
        thread.join(5)
    assert not hung and outcome, "load_adapter hung"
    return outcome[0]


@pytest.mark.skipif(os.name != "posix", reason="FIFOs and /dev/zero")
@pytest.mark.parametrize("name", [WEIGHTS, CONFIG_FILE])
@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "directory"])
def test_special_files_do_not_hang(workdir: Path, name: str, kind: str) -> None:
    directory = write_adapter(workdir / f"special-{kind}-{name}")
    target = directory / name
    target.unlink()
    if kind == "fifo":
        os.mkfifo(target)
    elif kind == "dev-zero":
        target.symlink_to("/dev/zero")
    else:
        target.mkdir()
    error = _load_with_timeout(directory, target if kind == "fifo" else None)
    assert isinstance(error, LoraError), repr(error)


# ----- 5. crash safety ------------------------------------------------------------------------------------------

# The child saves models[0] (loaded from the first source) to `target`. A "step" of the save is each fsync and each
# rename or removal (seen through audit hooks, before it happens; lorakit audits its renameat2 calls). Mode "step":
# hang at the stop_at-th step (0: never) until killed, or print DONE and the trace of fsyncs and renames. Mode
# "between": hang at the first step after the first rename. Mode "loop": save the models one after another forever.
_CHILD = r"""
import json, os, sys, time
from torch import nn
import lorakit

target, mode, stop_at, *sources = sys.argv[1:]
models = [lorakit.load_adapter(nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4)), s) for s in sources]
if mode == "loop":
    print("READY", flush=True)
    while True:
        for model in models:
            lorakit.save_adapter(model, target)
RENAMES = {"os.rename", "lorakit.renameat2"}
STEPS = RENAMES | {"os.remove", "os.rmdir", "shutil.rmtree"}
steps, renamed, trace = [0], [False], []

def step():
    steps[0] += 1
    if (mode == "step" and steps[0] == int(stop_at)) or (mode == "between" and renamed[0]):
        print("STOPPED", flush=True)
        while True:
            time.sleep(60)

def audit(event, args):
    if event in STEPS:
        step()
        if event in RENAMES:
            renamed[0] = True
            trace.append(["rename", os.fsdecode(os.fspath(args[0])), os.fsdecode(os.fspath(args[1]))])

real_fsync = os.fsync
def fsync(fd):
    step()
    info = os.fstat(fd)
    real_fsync(fd)
    trace.append(["fsync", info.st_dev, info.st_ino])

sys.addaudithook(audit)
os.fsync = fsync
lorakit.save_adapter(models[0], target)
print("DONE", json.dumps(trace), flush=True)
"""


def _start_child(workdir: Path, *args: str, code: str = _CHILD) -> tuple[subprocess.Popen[str], Path]:
    stderr = workdir / f"child-stderr-{time.monotonic_ns()}"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(stderr, "w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-c", code, *args], stdout=subprocess.PIPE, stderr=err, text=True, env=env
        )
    return proc, stderr


def _wait_for_line(proc: subprocess.Popen[str], stderr: Path, timeout: float = 60.0) -> str:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    line = proc.stdout.readline().strip() if ready else ""
    assert line, f"the child said nothing (exit {proc.poll()}): {stderr.read_text()[-2000:]}"
    return line


def _kill(proc: subprocess.Popen[str]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    if proc.stdout is not None:
        proc.stdout.close()


def _run_child(workdir: Path, target: Path, mode: str, stop_at: int, *sources: Path) -> str:
    """Start the child, wait for its first line (STOPPED, DONE, READY), SIGKILL it; the line."""
    proc, stderr = _start_child(workdir, str(target), mode, str(stop_at), *map(str, sources))
    try:
        return _wait_for_line(proc, stderr)
    finally:
        _kill(proc)


def _adapter_tensors(directory: Path) -> dict[str, torch.Tensor]:
    return lorakit.lora_state_dict(lorakit.load_adapter(make_base(0), directory))


def _final_files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in directory.iterdir() if not p.name.startswith(TEMP_PREFIX)}


def _strays(directory: Path) -> list[str]:
    """What a save to `directory` may leave behind: hidden entries inside it (temporaries: no adapter file's name
    starts with a dot) and beside it, entries named `.<its name>.*` (new directories, `.<name>.lorakit-new-*`)."""
    inside = sorted(p.name for p in directory.iterdir() if p.name.startswith(".")) if directory.is_dir() else []
    beside = sorted(f"../{p.name}" for p in directory.parent.iterdir() if p.name.startswith(f".{directory.name}."))
    return inside + beside


def _reset(directory: Path, reference: Path) -> Path:
    """`directory` holding a copy of `reference` (strays of an earlier save beside it stay)."""
    shutil.rmtree(directory, ignore_errors=True)
    shutil.copytree(reference, directory)
    return directory


@pytest.fixture(scope="module")
def versions(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Reference adapters: v1 and v2 (same config, other tensors), v2b (another config too)."""
    root = tmp_path_factory.mktemp("versions")
    return {
        "v1": _save_reference(root / "v1", seed=11),
        "v2": _save_reference(root / "v2", seed=12),
        "v2b": _save_reference(root / "v2b", seed=13, config=CONFIG.replace(lora_alpha=16)),
    }


def _assert_is(directory: Path, reference: Path) -> None:
    assert _final_files(directory) == _final_files(reference), "a file under its final name is not the reference's"
    expected = _adapter_tensors(reference)
    for key, tensor in _adapter_tensors(directory).items():
        assert torch.equal(tensor, expected[key]), key
    x = torch.randn(3, 8)
    with torch.no_grad():  # the loaded adapters are frozen
        assert torch.equal(
            lorakit.load_adapter(make_base(0), directory)(x), lorakit.load_adapter(make_base(0), reference)(x)
        )


def _which(directory: Path, versions: dict[str, Path], names: tuple[str, ...]) -> str:
    """The one of `names` whose files `directory` holds exactly; fails on anything else (a partial file, a mix)."""
    files = _final_files(directory)
    match = [name for name in names if files == _final_files(versions[name])]
    assert match, f"the directory holds none of {names} exactly (a partial file, or a mix of two versions)"
    _assert_is(directory, versions[match[0]])
    return match[0]


def _has_renameat2() -> bool:
    """Whether the C library has renameat2 (glibc >= 2.28), which the atomic swap of directories needs."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        ctypes.CDLL(None).renameat2  # noqa: B018
    except (OSError, AttributeError):
        return False
    return True


# where the C library has no renameat2 (not Linux), a save of two changed files keeps the window these tests close
needs_exchange = pytest.mark.skipif(not _has_renameat2(), reason="the directory swap needs Linux's renameat2")


@pytest.mark.parametrize("new", ["v2", pytest.param("v2b", marks=needs_exchange)], ids=["same-config", "new-config"])
def test_kill_at_every_step_of_a_save_leaves_the_previous_or_the_new_adapter(
    workdir: Path, versions: dict[str, Path], new: str
) -> None:
    """Killed at each fsync, rename and removal of the save in turn: the directory holds v1 or the new adapter,
    exactly. Controls: a kill at the first step (an fsync of a new file) leaves v1 and something to clean up; at
    the last, the new adapter (a step comes after the swap: the fsync that makes it durable); once the new
    adapter is in place it stays; and the next save removes whatever the killed one left, inside or beside."""
    directory = workdir / f"crash-steps-{new}"
    new_model = lorakit.load_adapter(make_base(0), versions[new])
    survivors = []
    for stop_at in range(1, 60):
        _reset(directory, versions["v1"])
        line = _run_child(workdir, directory, "step", stop_at, versions[new])
        if line.startswith("DONE"):
            break
        assert line == "STOPPED"
        survivor = _which(directory, versions, ("v1", new))
        if survivor == "v1":
            assert _strays(directory), f"killed at step {stop_at}, the save left nothing: not killed mid-save"
        survivors.append(survivor)
        lorakit.save_adapter(new_model, directory)
        assert _strays(directory) == []
        _assert_is(directory, versions[new])
    else:
        pytest.fail("the save never finished")
    _assert_is(directory, versions[new])
    assert _strays(directory) == []
    assert survivors[0] == "v1" and survivors[-1] == new, survivors
    assert survivors == sorted(survivors, key=("v1", new).index), f"the new adapter came and went: {survivors}"


@needs_exchange
@pytest.mark.parametrize("link", [False, True], ids=["plain", "symlinked"])
def test_kill_between_the_renames_of_a_new_config_and_weights(
    workdir: Path, versions: dict[str, Path], link: bool
) -> None:
    """The gap this test was an xfail for: killed right after the save's first rename, a new config and new
    weights (two files) must not be left half-renamed: v1's or v2b's files, not v2b's weights with v1's config.
    Through a symlinked directory too: the real directory changes, the link stays."""
    real = _reset(workdir / f"crash-between-{link}", versions["v1"])
    directory = real
    if link:
        directory = workdir / "crash-between-link"
        with contextlib.suppress(FileNotFoundError):
            directory.unlink()
        directory.symlink_to(real, target_is_directory=True)
    assert _run_child(workdir, directory, "between", 0, versions["v2b"]) == "STOPPED"
    files = _final_files(directory)
    assert files in (_final_files(versions["v1"]), _final_files(versions["v2b"])), "a mix of v1 and v2"
    _which(directory, versions, ("v1", "v2b"))
    lorakit.save_adapter(lorakit.load_adapter(make_base(0), versions["v2b"]), directory)
    assert directory.is_symlink() == link and (not link or directory.resolve() == real.resolve())
    assert _strays(directory) == [] and _strays(real) == []
    _assert_is(real, versions["v2b"])


@needs_exchange
def test_kill_at_random_times_leaves_v1_or_v2b(workdir: Path, versions: dict[str, Path]) -> None:
    """A child saving v1, v2b, v1, ... (two files change each time) killed at random moments: v1 or v2b, exactly,
    and whatever each kill left behind is removed by the saves that follow it."""
    directory = _reset(workdir / "crash-random", versions["v1"])
    rng = random.Random(20240611)
    for _ in range(6):
        proc, stderr = _start_child(workdir, str(directory), "loop", "0", str(versions["v1"]), str(versions["v2b"]))
        try:
            assert _wait_for_line(proc, stderr) == "READY"
            time.sleep(rng.uniform(0.0, 0.08))
        finally:
            _kill(proc)
        _which(directory, versions, ("v1", "v2b"))
    lorakit.save_adapter(lorakit.load_adapter(make_base(0), versions["v2b"]), directory)
    assert _strays(directory) == []
    _assert_is(directory, versions["v2b"])


@pytest.mark.parametrize("new", ["v2", "v2b"], ids=["same-config", "new-config"])
def test_each_new_file_is_fsynced_before_any_rename_and_the_renamed_entry_after(
    workdir: Path, versions: dict[str, Path], new: str
) -> None:
    """Durability against power loss, which a SIGKILL cannot show: every file whose bytes changed is fsynced
    before the first rename (so no rename can publish unwritten data), the directory holding the files is
    fsynced, and the directory whose entry the last rename changed is fsynced after it."""
    directory = _reset(workdir / f"durable-{new}", versions["v1"])
    line = _run_child(workdir, directory, "step", 0, versions[new])
    assert line.startswith("DONE ")
    trace = json.loads(line.removeprefix("DONE "))
    _assert_is(directory, versions[new])
    renames = [i for i, event in enumerate(trace) if event[0] == "rename"]
    assert renames, "nothing was renamed into place"
    synced_before = {(dev, ino) for kind, dev, ino in trace[: renames[0]] if kind == "fsync"}
    old = _final_files(versions["v1"])
    changed = [name for name, data in _final_files(directory).items() if old.get(name) != data]
    assert changed
    for name in changed:
        info = os.stat(directory / name)
        assert (info.st_dev, info.st_ino) in synced_before, f"{name} was not fsynced before the first rename"
    info = os.stat(directory)
    assert ["fsync", info.st_dev, info.st_ino] in trace, "the directory holding the files was not fsynced"
    renamed_in = os.stat(Path(trace[renames[-1]][2]).parent)
    assert ["fsync", renamed_in.st_dev, renamed_in.st_ino] in trace[renames[-1] :], "the last rename is not durable"


# ----- 6. no temporary left behind, no write through the final path ---------------------------------------------


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def stat_mode(path: Path) -> int:
    return path.stat().st_mode & 0o7777


def test_successful_saves_leave_no_temporary_files(workdir: Path) -> None:
    directory = workdir / "clean"
    for seed in (1, 2, 2, 3):
        lorakit.save_adapter(make_lora(seed), directory)
        assert _strays(directory) == []
        assert sorted(p.name for p in directory.iterdir()) == [CONFIG_FILE, WEIGHTS]
        assert stat_mode(directory) == 0o777 & ~_umask()
        assert all(stat_mode(p) == 0o666 & ~_umask() for p in directory.iterdir())
    (directory / f"{TEMP_PREFIX}{WEIGHTS}.stale").write_bytes(b"junk")
    lorakit.save_adapter(make_lora(4), directory)
    assert _strays(directory) == []
    # what a save killed mid-way leaves beside the directory: a partial new one, or the old one after the swap
    for name in (".clean.lorakit-new-partial", ".clean.lorakit-new-old"):
        (workdir / name).mkdir()
        (workdir / name / WEIGHTS).write_bytes(b"junk")
    (directory / f"{TEMP_PREFIX}{CONFIG_FILE}.stale").write_bytes(b"junk")
    lorakit.save_adapter(make_lora(5), directory)
    assert _strays(directory) == []
    assert sorted(p.name for p in directory.iterdir()) == [CONFIG_FILE, WEIGHTS]
    directory.chmod(0o750)  # an existing directory's mode is kept
    lorakit.save_adapter(make_lora(6), directory)
    assert stat_mode(directory) == 0o750
    assert _strays(directory) == []


def test_load_then_save_reproduces_the_bytes(workdir: Path) -> None:
    directory = workdir / "roundtrip"
    lorakit.save_adapter(lorakit.load_adapter(make_base(0), _REFERENCE), directory)
    assert _final_files(directory) == _final_files(_REFERENCE)


@pytest.mark.parametrize("link", ["hard", "symbolic"])
def test_save_replaces_links_instead_of_writing_through_them(workdir: Path, link: str) -> None:
    directory = workdir / f"links-{link}"
    victim = workdir / f"victim-{link}"
    lorakit.save_adapter(make_lora(1), directory)
    shutil.copy(directory / WEIGHTS, victim)
    original = victim.read_bytes()
    (directory / WEIGHTS).unlink()
    if link == "hard":
        os.link(victim, directory / WEIGHTS)
    else:
        (directory / WEIGHTS).symlink_to(victim)
    lorakit.save_adapter(make_lora(2), directory)
    assert victim.read_bytes() == original
    assert not (directory / WEIGHTS).is_symlink()
    assert parse_adapter((directory / WEIGHTS).read_bytes()) is not None
    assert _strays(directory) == []


def test_save_through_a_symlinked_directory_keeps_the_link(workdir: Path, versions: dict[str, Path]) -> None:
    real = _reset(workdir / "symlinked-real", versions["v1"])
    link = workdir / "symlinked-link"
    link.symlink_to(real, target_is_directory=True)
    lorakit.save_adapter(lorakit.load_adapter(make_base(0), versions["v2b"]), link)
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert not real.is_symlink()
    _assert_is(real, versions["v2b"])
    assert _strays(link) == [] and _strays(real) == []


def test_save_keeps_every_other_entry_of_the_directory(workdir: Path, versions: dict[str, Path]) -> None:
    """A Trainer's output directory: checkpoints, a tokenizer, another adapter. The save replaces the adapter's
    files and touches nothing else (and so cannot swap the directory: it falls back to per-file renames)."""
    directory = _reset(workdir / "trainer-output", versions["v1"])
    (directory / "checkpoint-1").mkdir()
    (directory / "checkpoint-1" / "optimizer.pt").write_bytes(b"optimizer state")
    (directory / "tokenizer.json").write_bytes(b'{"model": {}}')
    lorakit.save_adapter(lorakit.load_adapter(make_base(0), versions["v1"]), directory / "other")
    lorakit.save_adapter(lorakit.load_adapter(make_base(0), versions["v2b"]), directory)
    assert (directory / "checkpoint-1" / "optimizer.pt").read_bytes() == b"optimizer state"
    assert (directory / "tokenizer.json").read_bytes() == b'{"model": {}}'
    assert sorted(p.name for p in directory.iterdir()) == [
        CONFIG_FILE,
        WEIGHTS,
        "checkpoint-1",
        "other",
        "tokenizer.json",
    ]
    assert {name: (directory / name).read_bytes() for name in (CONFIG_FILE, WEIGHTS)} == _final_files(versions["v2b"])
    _assert_is(directory / "other", versions["v1"])
    assert _strays(directory) == [] and _strays(directory / "other") == []


@pytest.mark.parametrize("why", ["no-renameat2", "EINVAL", "EXDEV"])
def test_save_falls_back_where_the_directories_cannot_be_swapped(
    workdir: Path, versions: dict[str, Path], monkeypatch: pytest.MonkeyPatch, why: str
) -> None:
    """Without renameat2 (not Linux, an old C library), or on a filesystem that refuses RENAME_EXCHANGE, the save
    still writes the new adapter, and leaves no new directory beside it."""
    from lorakit.formats import files as _files

    directory = _reset(workdir / f"fallback-{why}", versions["v1"])
    monkeypatch.setattr(_files, "_no_exchange_devices", set())
    if why == "no-renameat2":
        monkeypatch.setattr(_files, "_renameat2_function", lambda: None)
    else:
        code = getattr(errno, why)

        def refuse(source: Path, target: Path, flags: int) -> None:
            raise OSError(code, os.strerror(code), str(source), None, str(target))

        monkeypatch.setattr(_files, "_renameat2", refuse)
    lorakit.save_adapter(lorakit.load_adapter(make_base(0), versions["v2b"]), directory)
    assert _strays(directory) == []
    _assert_is(directory, versions["v2b"])


def test_failed_save_leaves_the_old_adapter_and_no_temporary(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    directory = workdir / "failed-save"
    lorakit.save_adapter(make_lora(1), directory)
    before = _final_files(directory)
    calls = []

    def failing_fsync(fd: int) -> None:
        calls.append(fd)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError):
        lorakit.save_adapter(make_lora(2, CONFIG.replace(lora_alpha=16)), directory)
    monkeypatch.undo()
    assert calls
    assert _strays(directory) == []
    assert _final_files(directory) == before


@needs_exchange
def test_a_failure_at_any_fsync_leaves_the_old_adapter_and_no_temporary(
    workdir: Path, versions: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each fsync of the save in turn fails (ENOSPC, EIO: the data may not be on disk): the save raises that
    error and the directory holds v1 exactly, nothing left inside or beside it; the fsync that makes the swap
    durable included, the old directory is put back. Control: with no failure the save writes v2b."""
    directory = workdir / "failed-fsync"
    model = lorakit.load_adapter(make_base(0), versions["v2b"])
    real_fsync = os.fsync
    for fail_at in range(1, 30):
        _reset(directory, versions["v1"])
        calls = [0]

        def fsync(fd: int, fail_at: int = fail_at, calls: list[int] = calls) -> None:
            calls[0] += 1
            if calls[0] == fail_at:
                raise OSError(errno.ENOSPC, "No space left on device")
            real_fsync(fd)

        monkeypatch.setattr(os, "fsync", fsync)
        try:
            lorakit.save_adapter(model, directory)
        except OSError as error:
            assert error.errno == errno.ENOSPC
            monkeypatch.undo()
            assert _strays(directory) == [], f"fsync {fail_at} failed"
            _assert_is(directory, versions["v1"])
            continue
        finally:
            monkeypatch.undo()
        assert calls[0] < fail_at  # no fsync failed: the save went through
        break
    else:
        pytest.fail("the save never finished")
    assert fail_at > 2
    _assert_is(directory, versions["v2b"])
    assert _strays(directory) == []
