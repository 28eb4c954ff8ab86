"""X-LoRA (Buehler & Buehler, 2024): a learned, token-level mixture of frozen LoRA experts (docs/design.md §7).

n experts (LoRA adapters) on L adapted layers, counted in module order. Every forward of the model runs:

1. the **scaling pass** (no grad): the model with every expert weight set to `scaling_pass_value` (0, the
   default, skips the experts: it is the base model; None means 1/n), giving the last hidden state
   `h (batch, tokens, hidden)`;
2. the **classifier**: `xlora_depth` Linear layers (ReLU and Dropout between them) map h to logits
   `(batch, tokens, n)`, or `(batch, tokens, L, n)` with `layerwise_scalings`, softmaxed over the experts
   with `softmax_temperature`: the scalings λ;
3. the **real pass**: each layer l computes `y = W x + Σ_i λ[b, t, l, i] · g · s_i · B_i A_i x`, with
   `g = global_scaling_weight`, after optionally keeping only the `top_k_lora` largest λ per token (no
   renormalisation), or softmaxing over the kept ones (`enable_softmax_topk`).

Both passes run on the stacked primitive (`AdapterStack`): one pair of GEMMs per layer for all experts,
with λ as per-token gates. `generate()` keeps a KV cache for each pass, which is exact for causal models:
the scaling pass of a new token only needs the earlier tokens' scaling-pass keys and values.

Only the classifier trains unless `use_trainable_adapters`; nothing flips `train()`/`eval()` or
`requires_grad` behind the user's back; inside `lorakit.disable_adapters(model)` the experts are off.
"""

from __future__ import annotations

import inspect
import itertools
import math
import os
import weakref
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .config import unknown_fields_error
from .errors import AdapterError, LoraConfigError, LoraError
from .layers import LoraLayer
from .model import (
    check_module,
    is_lora_model,
    lora_layers,
    lora_state,
    set_active_adapters,
    set_trainable,
    undo_on_failure,
)

_STATE_ATTR = "_lorakit_xlora"
_CACHE_KEYS = ("cache", "past_key_values")  # transformers 5 renames past_key_values to cache
CLASSIFIER_ATTR = "xlora_classifier"


@dataclass
class _XLoraFields:
    """The fields of `XLoraConfig` and their validation (see `XLoraConfig`)."""

    hidden_size: int | None = None
    adapters: dict[str, str | None] = field(default_factory=dict)
    enable_softmax: bool = True
    enable_softmax_topk: bool = False
    layerwise_scalings: bool = False
    xlora_depth: int = 1
    xlora_size: int = 2048
    xlora_dropout_p: float = 0.2
    use_trainable_adapters: bool = False
    softmax_temperature: float = 1.0
    top_k_lora: int | None = None
    scaling_pass_value: float | None = 0.0
    global_scaling_weight: float = 1.0

    def __post_init__(self) -> None:
        def positive_int(name: str, value: object) -> None:
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise LoraConfigError(f"XLoraConfig.{name} must be a positive integer, got {value!r}")

        if self.hidden_size is not None:
            positive_int("hidden_size", self.hidden_size)
        positive_int("xlora_depth", self.xlora_depth)
        positive_int("xlora_size", self.xlora_size)
        if self.top_k_lora is not None:
            positive_int("top_k_lora", self.top_k_lora)
        if not isinstance(self.adapters, Mapping):
            raise LoraConfigError(f"XLoraConfig.adapters must map expert names to paths, got {self.adapters!r}")
        self.adapters = dict(self.adapters)
        dropout = self.xlora_dropout_p
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not (0.0 <= dropout < 1.0):
            raise LoraConfigError(f"XLoraConfig.xlora_dropout_p must be in [0, 1), got {self.xlora_dropout_p!r}")
        for name in ("softmax_temperature", "global_scaling_weight"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise LoraConfigError(f"XLoraConfig.{name} must be a finite number, got {value!r}")
        if self.softmax_temperature <= 0:
            raise LoraConfigError(f"XLoraConfig.softmax_temperature must be > 0, got {self.softmax_temperature!r}")
        value = self.scaling_pass_value
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise LoraConfigError(f"XLoraConfig.scaling_pass_value must be a number or None, got {value!r}")
        if self.enable_softmax_topk and self.top_k_lora is None:
            raise LoraConfigError("XLoraConfig.enable_softmax_topk needs top_k_lora")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class XLoraConfig(_XLoraFields):
    """X-LoRA's settings, with peft's `XLoraConfig` field names and defaults (keyword arguments only; an
    unknown one is a `LoraConfigError` naming the closest field).

    `hidden_size` defaults to the model's `config.hidden_size`; `adapters` maps expert names to adapter
    directories (or to None for an adapter the model already has).
    """

    def __init__(self, **values: Any) -> None:
        known = {f.name for f in fields(_XLoraFields)}
        unknown = [key for key in values if key not in known]
        if unknown:
            raise unknown_fields_error("XLoraConfig", unknown, known)
        super().__init__(**values)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> XLoraConfig:
        """Read peft's or the original X-LoRA's config dict; fields of neither (peft_type, task_type…) are
        ignored."""
        known = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in values.items() if key in known})


XLoraConfig.__signature__ = inspect.signature(_XLoraFields)  # help() and IDEs show the fields


class XLoraClassifier(nn.Module):
    """Maps hidden states `(batch, tokens, hidden)` to expert scalings `(batch, tokens, L, n)`.

    `inner[i]` are the `xlora_depth - 1` hidden Linear layers (width `xlora_size`, each followed by ReLU and
    Dropout), `last` the output Linear (n logits, or n·L with `layerwise_scalings`): the original X-LoRA's
    parameter names, which mistral.rs reads.
    """

    def __init__(self, config: XLoraConfig, hidden_size: int, n_experts: int, n_layers: int) -> None:
        super().__init__()
        self.config = config
        self.hidden_size, self.n_experts, self.n_layers = hidden_size, n_experts, n_layers
        widths = [hidden_size] + [config.xlora_size] * (config.xlora_depth - 1)
        self.inner = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(widths))
        outputs = n_experts * (n_layers if config.layerwise_scalings else 1)
        self.last = nn.Linear(widths[-1], outputs)
        self.dropout = nn.Dropout(config.xlora_dropout_p)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        x = hidden.to(self.last.weight.dtype)
        for layer in self.inner:
            x = self.dropout(F.relu(layer(x)))
        logits = self.last(x)
        batch, tokens = logits.shape[:2]
        if self.config.layerwise_scalings:
            scalings = logits.view(batch, tokens, self.n_layers, self.n_experts)
        else:
            scalings = logits.view(batch, tokens, 1, self.n_experts).expand(-1, -1, self.n_layers, -1)
        if self.config.enable_softmax:
            scalings = torch.softmax(scalings / self.config.softmax_temperature, dim=-1)
        return scalings


@dataclass
class _XLoraState:
    config: XLoraConfig
    experts: list[str]
    layers: list[tuple[str, LoraLayer]]  # the L adapted layers, in module order
    hook: Any = None
    latest_scalings: torch.Tensor | None = None
    scaling_cache: Any = None  # the scaling pass's KV cache while generating
    cache_owner: Any = None  # weakref to the real pass's cache that scaling_cache follows
    accepts_logits_to_keep: bool = False


def get_xlora_model(
    model: nn.Module, config: XLoraConfig, adapters: Mapping[str, str | os.PathLike | None] | None = None
) -> nn.Module:
    """Turn `model` into an X-LoRA model in place and return it.

    `adapters` (default: `config.adapters`) maps each expert's name to a peft-format adapter directory, which
    is loaded under that name, or to None for an adapter the model already has. The classifier is added as
    `model.xlora_classifier` (in the model's dtype and device; it trains by default, the experts do not
    unless `use_trainable_adapters`).
    """
    from .formats.peft import load_adapter

    if hasattr(check_module(model), _STATE_ATTR):
        raise LoraError("the model is already an X-LoRA model")
    if not isinstance(config, XLoraConfig):
        raise LoraConfigError(f"config must be a lorakit.XLoraConfig, got {type(config).__name__}")
    if adapters is not None and not isinstance(adapters, Mapping):
        raise LoraConfigError(f"adapters must map expert names to adapter directories, got {adapters!r}")
    sources = dict(config.adapters if adapters is None else adapters)
    if not sources:
        raise LoraConfigError("X-LoRA needs at least one expert adapter")
    if config.top_k_lora is not None and config.top_k_lora > len(sources):
        raise LoraConfigError(f"top_k_lora={config.top_k_lora} is more than the {len(sources)} experts")
    hidden_size = config.hidden_size or getattr(getattr(model, "config", None), "hidden_size", None)
    if not isinstance(hidden_size, int):
        raise LoraConfigError("XLoraConfig.hidden_size is not set and the model's config has no hidden_size")
    was_lora = is_lora_model(model)
    experts = list(sources)
    with undo_on_failure(model) as undo:
        for name, source in sources.items():
            if source is not None:
                load_adapter(model, source, name, trainable=config.use_trainable_adapters)
            elif not was_lora or name not in lora_state(model).configs:
                raise AdapterError(f"expert {name!r} has no directory and the model has no adapter of that name")
        set_trainable(model, experts, config.use_trainable_adapters)
        set_active_adapters(model, experts)
        layers = [(name, layer) for name, layer in lora_layers(model) if any(e in layer.r for e in experts)]
        weight = next(model.parameters())
        classifier = XLoraClassifier(config, hidden_size, len(experts), len(layers)).to(weight.device, weight.dtype)
        model.add_module(CLASSIFIER_ATTR, classifier)
        forward_params = inspect.signature(model.forward).parameters
        xstate = _XLoraState(config, experts, layers, accepts_logits_to_keep="logits_to_keep" in forward_params)
        setattr(model, _STATE_ATTR, xstate)
        for name, layer in layers:
            layer.stack(name, experts, eval_only=False)
            undo.append(layer.unstack)
        xstate.hook = model.register_forward_pre_hook(_run_scaling_pass, with_kwargs=True)
        undo.append(xstate.hook.remove)
    return model


def remove_xlora(model: nn.Module) -> nn.Module:
    """Undo `get_xlora_model`: the classifier and the scaling pass go; the experts stay, as active adapters."""
    state = xlora_state(model)
    state.hook.remove()
    for _, layer in state.layers:
        layer.unstack()
    delattr(model, CLASSIFIER_ATTR)
    delattr(model, _STATE_ATTR)
    return model


def is_xlora_model(model: nn.Module) -> bool:
    return isinstance(getattr(model, _STATE_ATTR, None), _XLoraState)


def xlora_state(model: nn.Module) -> _XLoraState:
    state = getattr(model, _STATE_ATTR, None)
    if not isinstance(state, _XLoraState):
        raise LoraError(f"{type(model).__name__} is not an X-LoRA model; build one with lorakit.get_xlora_model")
    return state


def latest_scalings(model: nn.Module) -> torch.Tensor | None:
    """The scalings of the latest forward, `(batch, tokens, L, n)` (detached), or None before any."""
    return xlora_state(model).latest_scalings


def route_scalings(scalings: torch.Tensor, config: XLoraConfig) -> torch.Tensor:
    """One layer's expert weights `(…, n)` after `top_k_lora` and `enable_softmax_topk`, times `g`."""
    if config.top_k_lora is not None:
        kept = torch.zeros_like(scalings, dtype=torch.bool)
        kept.scatter_(-1, torch.topk(scalings, k=config.top_k_lora, dim=-1).indices, True)
        scalings = scalings * kept.to(scalings.dtype)
    if config.enable_softmax_topk:
        nonzero = scalings != 0
        scalings = torch.softmax(scalings.masked_fill(~nonzero, float("-inf")), dim=-1).masked_fill(~nonzero, 0.0)
    return scalings * config.global_scaling_weight


def _batch_shape(args: tuple, kwargs: dict) -> tuple[int, int]:
    for value in (kwargs.get("input_ids"), kwargs.get("inputs_embeds"), *(a for a in args[:1])):
        if isinstance(value, torch.Tensor):
            return value.shape[0], value.shape[1]
    raise LoraError("X-LoRA needs input_ids or inputs_embeds of shape (batch, tokens, …)")


def _scaling_pass_cache(state: _XLoraState, model: nn.Module, cache: Any) -> Any:
    """The scaling pass's own KV cache, following the real pass's `cache` (None: no cache)."""
    if cache is None:
        return None
    if cache.get_seq_length() == 0:  # a new sequence
        state.scaling_cache = type(cache)(config=model.config)
        state.cache_owner = weakref.ref(cache)
    elif state.cache_owner is None or state.cache_owner() is not cache:
        raise LoraError(
            "X-LoRA got a KV cache its scaling pass has not followed from the start; start the sequence again "
            "(an empty cache) or run without one"
        )
    if state.scaling_cache.get_seq_length() != cache.get_seq_length():
        raise LoraError(
            f"X-LoRA's scaling-pass cache holds {state.scaling_cache.get_seq_length()} tokens, the model's cache "
            f"{cache.get_seq_length()}; start the sequence again"
        )
    return state.scaling_cache


def _run_scaling_pass(model: nn.Module, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook: the scaling pass and the classifier, then the layers' gates for the real pass."""
    state = xlora_state(model)
    if not state.layers or lora_state(model).disabled:
        return None
    config = state.config
    batch, tokens = _batch_shape(args, kwargs)
    n = len(state.experts)
    value = 1.0 / n if config.scaling_pass_value is None else float(config.scaling_pass_value)
    classifier = getattr(model, CLASSIFIER_ATTR)
    scaling_pass_gates = None  # the same for every layer: routed once
    if value != 0.0:
        weights = torch.full((batch, tokens, n), value, device=classifier.last.weight.device)
        scaling_pass_gates = route_scalings(weights, config)
    for _, layer in state.layers:
        layer.adapter_stack.skip = scaling_pass_gates is None
        if scaling_pass_gates is not None:
            layer.set_stack_gates(scaling_pass_gates)
    pass_kwargs = {key: arg for key, arg in kwargs.items() if key not in ("labels", "num_items_in_batch")}
    pass_kwargs.update(output_hidden_states=True, return_dict=True)
    if state.accepts_logits_to_keep:
        pass_kwargs["logits_to_keep"] = 1  # only the hidden states are used
    cache_key = next((key for key in _CACHE_KEYS if kwargs.get(key) is not None), None)
    if cache_key is not None:
        pass_kwargs[cache_key] = _scaling_pass_cache(state, model, kwargs[cache_key])
    else:
        pass_kwargs["use_cache"] = False
    try:
        with torch.no_grad():
            output = model.forward(*args, **pass_kwargs)
    finally:
        for _, layer in state.layers:
            layer.adapter_stack.skip = False
    scalings = classifier(output.hidden_states[-1])
    state.latest_scalings = scalings.detach()
    # without layerwise scalings every layer gets the same gates: routed once
    gates_for_all = None if config.layerwise_scalings else route_scalings(scalings[:, :, 0, :], config)
    for index, (name, layer) in enumerate(state.layers):
        if config.use_trainable_adapters:
            layer.stack(name, state.experts, eval_only=False, with_grad=True)  # fresh: the experts train
        gates = route_scalings(scalings[:, :, index, :], config) if gates_for_all is None else gates_for_all
        layer.set_stack_gates(gates)
    return None
