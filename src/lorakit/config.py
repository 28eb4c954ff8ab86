"""`LoraConfig`: what to adapt and how, with HuggingFace peft's field names and meanings.

Written in code, a config is strict: `LoraConfig(target_module=["q_proj"])` is a `LoraConfigError` that
names the closest real field (`target_modules`). Read from a file, it is lenient where a newer peft may have
added something: `LoraConfig.from_dict(json.load(f))` (what `lorakit.read_adapter_config` uses) drops peft
fields that lorakit does not model (silently when they hold peft's "off" value or only describe how the
adapter was initialised, with a warning for names it does not know). Either way, a peft field that would
change the adapter's math in a way lorakit does not implement raises a `LoraConfigError` instead of loading
an adapter that would compute something else.
"""

from __future__ import annotations

import copy
import difflib
import inspect
import math
import re
import sys
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from .errors import LoraConfigError

BIAS_MODES = ("none", "all", "lora_only")
INIT_MODES = (True, False, "gaussian", "pissa", "olora", "orthogonal")  # and "pissa_niter_<k>"
_PISSA_NITER = re.compile(r"pissa_niter_(0|[1-9][0-9]*)")

# peft 0.21 fields that lorakit does not model: the value peft writes when the feature is off (lorakit writes
# these into every adapter_config.json, as peft does), and whether a value other than that changes what the
# adapter computes (refused) or only how it was initialised or served (dropped).
PEFT_FIELDS_NOT_MODELED: dict[str, tuple[Any, bool]] = {
    "alora_invocation_tokens": (None, True),
    "arrow_config": (None, True),
    "auto_mapping": (None, False),
    "corda_config": (None, False),
    "ensure_weight_tying": (False, False),
    "eva_config": (None, False),
    "kasa_config": (None, True),
    "layer_replication": (None, True),
    "loftq_config": ({}, False),
    "lora_ga_config": (None, False),
    "megatron_config": (None, False),
    "megatron_core": ("megatron.core", False),
    "monteclora_config": (None, True),
    "qalora_group_size": (16, False),
    "revision": (None, False),
    "trainable_token_indices": (None, True),
    "use_bdlora": (None, True),
    "use_qalora": (False, True),
    "velora_config": (None, True),
}
# peft 0.21's other initialisations, which lorakit does not have: what each is, and what to do instead.
_INITS_NOT_SUPPORTED = {
    "loftq": "LoftQ: A and B fitted to a quantized base's error; peft's needs CUDA. An adapter file trained from "
    "a LoftQ start loads like any other, onto the base it was trained with",
    "eva": "EVA: A from the activations of data, which needs a data loader. A trained EVA adapter file loads like "
    "any other",
    "corda": "CorDA: A and B from the covariance of data, which needs a data loader and changes the base weights",
    "mica": "MiCA. A trained adapter file that names it loads like any other",
}


def _unsupported_init(value: object) -> str | None:
    """What peft's init scheme `value` is, if lorakit does not have it; else None."""
    if not isinstance(value, str):
        return None
    return _INITS_NOT_SUPPORTED.get(value)


# Written by peft into every config; checked (`peft_type`) or ignored (`peft_version`).
_PEFT_BOOKKEEPING = ("peft_type", "peft_version")


@dataclass
class _LoraFields:
    """The fields of `LoraConfig` and their validation (see `LoraConfig`)."""

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: list[str] | str | None = None
    target_parameters: list[str] | None = None
    exclude_modules: list[str] | str | None = None
    bias: str = "none"
    use_rslora: bool = False
    init_lora_weights: bool | str = True
    modules_to_save: list[str] | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    fan_in_fan_out: bool = False
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    lora_bias: bool = False
    use_dora: bool = False
    task_type: str | None = None
    base_model_name_or_path: str | None = None
    inference_mode: bool = False

    def __post_init__(self) -> None:
        _check_rank("r", self.r)
        _check_alpha("lora_alpha", self.lora_alpha)
        if (
            not isinstance(self.lora_dropout, (int, float))
            or isinstance(self.lora_dropout, bool)
            or not (0.0 <= self.lora_dropout < 1.0)
        ):
            raise LoraConfigError(f"lora_dropout must be a number in [0, 1), got {self.lora_dropout!r}")
        if self.bias not in BIAS_MODES:
            raise LoraConfigError(f"bias must be one of {BIAS_MODES}, got {self.bias!r}")
        unsupported = _unsupported_init(self.init_lora_weights)
        if unsupported is not None:
            raise LoraConfigError(
                f"init_lora_weights={self.init_lora_weights!r} ({unsupported}) is not supported by lorakit; "
                "initialise with True, 'gaussian', 'pissa', 'olora' or 'orthogonal'"
            )
        init = self.init_lora_weights
        if not isinstance(init, (bool, str)) or not (  # 1 or 0.0 compare equal to True / False
            any(init is m or init == m for m in INIT_MODES) or _PISSA_NITER.fullmatch(str(init))
        ):
            raise LoraConfigError(
                "init_lora_weights must be True, False, 'gaussian', 'pissa', 'pissa_niter_<k>' (k iterations of a "
                f"randomized SVD), 'olora' or 'orthogonal', got {init!r}"
            )
        if self.lora_bias and init not in (True, False):
            raise LoraConfigError(f"lora_bias=True needs init_lora_weights True or False (as peft), got {init!r}")
        self.target_modules = _name_list("target_modules", self.target_modules)
        self._check_target_parameters()
        self.exclude_modules = _name_list("exclude_modules", self.exclude_modules)
        self.layers_pattern = _name_list("layers_pattern", self.layers_pattern)
        if self.modules_to_save is not None:
            self.modules_to_save = _name_list("modules_to_save", list(self.modules_to_save))
        if not isinstance(self.rank_pattern, dict) or not isinstance(self.alpha_pattern, dict):
            raise LoraConfigError("rank_pattern and alpha_pattern must be dicts of {pattern: value}")
        for key, value in self.rank_pattern.items():
            _check_rank(f"rank_pattern[{key!r}]", value)
        for key, value in self.alpha_pattern.items():
            _check_alpha(f"alpha_pattern[{key!r}]", value)
        layers = self.layers_to_transform
        if layers is not None and not (
            _is_int(layers) or (isinstance(layers, (list, tuple)) and all(_is_int(i) for i in layers))
        ):
            raise LoraConfigError(f"layers_to_transform must be an int or a list of ints, got {layers!r}")
        if isinstance(layers, tuple):
            self.layers_to_transform = list(layers)
        for name in ("use_rslora", "fan_in_fan_out", "lora_bias", "inference_mode", "use_dora"):
            if not isinstance(getattr(self, name), bool):
                raise LoraConfigError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.use_dora and self.lora_bias:
            raise LoraConfigError(
                "lora_bias=True is not supported for DoRA (use_dora=True): DoRA rescales the adapter's bias with the "
                "rest of its output, so it could not merge into the base bias (peft refuses it too)"
            )
        for name in ("task_type", "base_model_name_or_path"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise LoraConfigError(f"{name} must be a string or None, got {getattr(self, name)!r}")
        self._check_patterns_compile()

    def _check_target_parameters(self) -> None:
        if self.target_parameters is None:
            return
        names = self.target_parameters
        if isinstance(names, (set, frozenset, tuple)):
            names = sorted(names) if isinstance(names, (set, frozenset)) else list(names)
        if not isinstance(names, list) or not all(isinstance(name, str) and name for name in names):
            raise LoraConfigError(
                f"target_parameters must be a list of parameter names (or name endings, 'experts.down_proj'), got "
                f"{self.target_parameters!r}"
            )
        self.target_parameters = names or None
        for option in ("lora_dropout", "lora_bias", "use_dora"):
            if names and getattr(self, option):
                raise LoraConfigError(
                    f"{option}={getattr(self, option)!r} cannot apply to target_parameters (a weight update has no "
                    "input to drop out, no output bias, no magnitude); peft refuses it too"
                )

    def _check_patterns_compile(self) -> None:
        patterns = [("target_modules", self.target_modules), ("exclude_modules", self.exclude_modules)]
        # (field, value, the regex it is used in: `_pattern_key` and targets.py embed some values in larger
        # regexes, where e.g. an inline flag "(?i)" that compiles alone is an error)
        patterns = [(name, value, value) for name, value in patterns if isinstance(value, str)]
        patterns += [("rank_pattern", key, rf"(.*\.)?({key})$") for key in self.rank_pattern]
        patterns += [("alpha_pattern", key, rf"(.*\.)?({key})$") for key in self.alpha_pattern]
        layers = [self.layers_pattern] if isinstance(self.layers_pattern, str) else self.layers_pattern or []
        patterns += [("layers_pattern", v, rf"(?:^|.*?\.){v}\.(?P<idx>\d+)\.") for v in layers]
        patterns += [("modules_to_save", v, rf"(^|.*\.){v}($|\..*)") for v in self.modules_to_save or []]
        for name, pattern, used in patterns:
            try:
                re.compile(used)
            except re.error as error:
                raise LoraConfigError(f"{name} holds {pattern!r}, which is not a valid regex: {error}") from None

    def rank_for(self, module_name: str) -> int:
        """The rank of the adapter on `module_name` (`rank_pattern` first, else `r`)."""
        key = _pattern_key(self.rank_pattern, module_name)
        return self.r if key is None else self.rank_pattern[key]

    def alpha_for(self, module_name: str) -> float:
        """The alpha of the adapter on `module_name` (`alpha_pattern` first, else `lora_alpha`)."""
        key = _pattern_key(self.alpha_pattern, module_name)
        return self.lora_alpha if key is None else self.alpha_pattern[key]

    def scaling_for(self, module_name: str) -> float:
        """`s = alpha / r`, or `alpha / sqrt(r)` with `use_rslora`, for `module_name`."""
        return lora_scaling(self.alpha_for(module_name), self.rank_for(module_name), self.use_rslora)

    def to_dict(self) -> dict[str, Any]:
        """The fields as plain JSON-ready values."""
        return {f.name: copy.deepcopy(getattr(self, f.name)) for f in fields(self)}

    def replace(self, **changes: Any) -> LoraConfig:
        """A validated copy with `changes` applied."""
        values = self.to_dict()
        values.update(changes)
        return LoraConfig(**values)


def lora_scaling(lora_alpha: float, r: int, use_rslora: bool) -> float:
    """LoRA's scaling: `s = lora_alpha / r`, or `lora_alpha / sqrt(r)` with rsLoRA."""
    return lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r


def _pattern_key(patterns: dict[str, Any], module_name: str) -> str | None:
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module_name):
            return key
    return None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_rank(name: str, value: Any) -> None:
    if not _is_int(value) or value <= 0:
        raise LoraConfigError(f"{name} must be a positive integer, got {value!r}")


def _check_alpha(name: str, value: Any) -> None:
    # `value > sys.float_info.max`, not math.isinf: an int beyond any float overflows isinf
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (value > 0) or value > sys.float_info.max:
        raise LoraConfigError(f"{name} must be a positive finite number, got {value!r}")


def _name_list(name: str, value: Any) -> list[str] | str | None:
    """Normalise a target-like field: None, a regex string, or a sorted-as-given list of strings."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (set, frozenset)):
        value = sorted(value)
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return list(value)
    raise LoraConfigError(f"{name} must be a string, a list of strings or None, got {value!r}")


def _is_off(value: Any) -> bool:
    """Whether a peft field holds its "feature off" value (None, False, empty)."""
    return value is None or value is False or (isinstance(value, (str, list, dict, tuple)) and len(value) == 0)


_FIELD_NAMES = frozenset(f.name for f in fields(_LoraFields))


class LoraConfig(_LoraFields):
    """How to add one LoRA adapter to a model (peft's `LoraConfig` fields and meanings).

    Attributes:
        r: rank of the update `ΔW = s·B·A`, `A: (r, in)`, `B: (out, r)`.
        lora_alpha: numerator of the scaling `s = lora_alpha / r` (`lora_alpha / sqrt(r)` with rsLoRA).
        lora_dropout: dropout probability on the LoRA branch's input, in [0, 1).
        target_modules: which modules to adapt. A string is a regex `re.fullmatch`ed against full module
            names; a list matches names exactly or by a `"." + entry` suffix; `"all-linear"` means every
            `Linear`/`Conv1D` except the output embedding. `None` uses the per-family defaults table.
        target_parameters: parameters to adapt directly (peft's field), by full name or a `"." + entry`
            ending (`"experts.gate_up_proj"`): 2-D weights and the 3-D expert stacks of mixture-of-experts
            models, each expert with its own rank-r update (`layers/parameters.py`). No `lora_dropout`,
            `lora_bias` or DoRA there. To adapt these parameters only, pass `target_modules=[]`: None still
            means the family's default modules where lorakit knows the family (elsewhere none), as in peft.
        exclude_modules: same forms as `target_modules`; checked first.
        bias: `"none"`, `"all"` (train every bias) or `"lora_only"` (train the biases of adapted layers).
        use_rslora: use `s = lora_alpha / sqrt(r)`.
        init_lora_weights: `True` (A kaiming-uniform, B = 0), `"gaussian"` (A ~ N(0, 1/r), B = 0), `False`
            (both random; for tests), or on Linear/Conv1D layers `"pissa"`, `"pissa_niter_<k>"` and `"olora"`
            (A and B from the SVD or QR of W, the base keeping the residual) or `"orthogonal"`
            (`layers/init_schemes.py`).
        modules_to_save: modules (names or suffixes) that get a full trainable copy, e.g. a classifier head.
        rank_pattern, alpha_pattern: per-module overrides of `r` / `lora_alpha`; the first key (in dict
            order) with `re.match(rf"(.*\\.)?({key})$", name)` wins.
        fan_in_fan_out: the base weight is stored `(in, out)`. lorakit detects this from the layer type
            (transformers `Conv1D`), so the field is kept only for peft compatibility.
        layers_to_transform, layers_pattern: restrict list targets to these layer indices.
        lora_bias: give B a bias (peft's `lora_bias`).
        use_dora: DoRA (a trained magnitude per output, `layers/dora.py`), on Linear, Conv1D, Conv1d/2d/3d and
            Embedding layers.
        task_type, base_model_name_or_path, inference_mode: carried for peft compatibility.

    Keyword arguments only. An unknown field is a `LoraConfigError` naming the closest real one; peft's own
    fields that lorakit does not model are accepted while they hold peft's "off" value, so
    `LoraConfig(**peft_config.to_dict())` works. For a config read from a file use `LoraConfig.from_dict`.
    """

    def __init__(self, **values: Any) -> None:
        super().__init__(**_modeled_fields(values, strict=True))

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], strict: bool = False) -> LoraConfig:
        """A config from a dict as peft writes `adapter_config.json`. Unlike the constructor, fields that no
        peft version lorakit knows has written only warn (`strict=False`): they come from a newer peft."""
        if not isinstance(values, Mapping):
            raise LoraConfigError(f"LoraConfig.from_dict needs a mapping of field names to values, got {values!r}")
        config = cls.__new__(cls)
        _LoraFields.__init__(config, **_modeled_fields(dict(values), strict=strict))
        return config


LoraConfig.__signature__ = inspect.signature(_LoraFields)  # help() and IDEs show the fields, not **values


def _modeled_fields(values: dict[str, Any], strict: bool) -> dict[str, Any]:
    """`values` without the peft fields lorakit does not model, after checking that dropping them changes
    nothing an adapter computes. An unknown name raises (`strict`) or warns."""
    extra = {key: values.pop(key) for key in list(values) if key not in _FIELD_NAMES}
    peft_type = extra.pop("peft_type", None)
    if peft_type is not None and str(peft_type).upper() not in ("LORA", "PEFTTYPE.LORA"):
        raise LoraConfigError(f"peft_type is {peft_type!r}; lorakit's LoraConfig reads 'LORA' adapters only")
    unknown = []
    for key, value in extra.items():
        if key in _PEFT_BOOKKEEPING:
            continue
        if key not in PEFT_FIELDS_NOT_MODELED:
            unknown.append(key)
            continue
        off, changes_math = PEFT_FIELDS_NOT_MODELED[key]
        if changes_math and not (value == off or _is_off(value)):
            raise LoraConfigError(f"{key}={value!r} is a peft feature lorakit does not support yet")
    if unknown and strict:
        raise unknown_fields_error("LoraConfig", unknown, _FIELD_NAMES | PEFT_FIELDS_NOT_MODELED.keys())
    meaningful = sorted(key for key in unknown if not _is_off(extra[key]))
    if meaningful:
        warnings.warn(f"LoraConfig ignores unknown fields: {', '.join(meaningful)}", stacklevel=3)
    return values


def unknown_fields_error(class_name: str, unknown: list[str], known: Iterable[str]) -> LoraConfigError:
    """The error for fields `unknown` given to `class_name`, naming the closest of the `known` ones."""
    hints = []
    for key in unknown:
        close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
        hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    return LoraConfigError(f"{class_name} has no field {', '.join(hints)}")
