"""`LoraLayer`: the state and operations every LoRA layer shares.

A LoRA layer wraps a frozen `base_layer` and holds any number of named adapters. Each kind of layer (one
short file each: `linear.py`, `embedding.py`, `conv.py`) supplies only its math:

- `create_adapter(name, r)`: make the adapter's parameters (float32 master weights on the base's device),
  stored under `name` in the containers listed in `adapter_containers` (`ModuleDict`/`ParameterDict`);
- `reset_adapter(name, init)`: initialise them (`True`, `"gaussian"` or `False`);
- `add_adapter_output(result, x, name)`: `result + s · branch(x)`, the branch computed in `x`'s dtype;
- `delta_weights(name)`: `{base parameter name: ΔW}`, what merging adds to the base parameters (a kind with
  DoRA subclasses `DoraLayer` of `dora.py` and names its plain LoRA update `lora_delta_weights`);
- optionally, for many adapters in one forward (mixed batches, X-LoRA): `stacked_factors(names, dtype,
  one_per_row)` and `add_stacked_output(result, x, stack)`, the stacked form of `layers/stack.py` (docs/design.md §6);
- optionally, `rank_layout(name)` when A and B do not keep the rank on axes 0 and 1 (for hot swapping).

Everything else (the adapter registry of the layer, activation, disabling, exact merge and unmerge)
lives here once. The parameter names follow peft (`lora_A.<adapter>.weight`), so a lorakit model's
`state_dict` reads like a peft model's.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from ..config import LoraConfig, lora_scaling
from ..errors import AdapterError, LoraError, MergeError
from .exact import merge_exactly, merged_value, unmerge_exactly
from .init_schemes import BaseChange
from .stack import AdapterStack, add_stacked_output, build_stack


def adapter_dtype(base_dtype: torch.dtype) -> torch.dtype:
    """Master-weight dtype of an adapter on a base of `base_dtype`: float32, or wider if the base is."""
    if not base_dtype.is_floating_point:
        return torch.float32
    return torch.promote_types(base_dtype, torch.float32)


def adapter_factory(base_weight: torch.Tensor) -> dict[str, Any]:
    """`{"device", "dtype"}` of a new adapter's parameters on a base of `base_weight`: `adapter_dtype`, on the base's
    device, or on the CPU when the base is on the meta device. There the adapter is initialised for real, drawing
    from the random generator as on a built model, and keeps its values when `lorakit.materialize` gives the base
    its weights."""
    device = torch.device("cpu") if base_weight.is_meta else base_weight.device
    return {"device": device, "dtype": adapter_dtype(base_weight.dtype)}


def reset_factors(a: nn.Module, b: nn.Module, init: bool | str, r: int) -> None:
    """Initialise one low-rank pair, modules with a `.weight` (B maybe a `.bias`), of rank `r`, as
    `LoraLayer.reset_adapter` says: `True` A kaiming-uniform(a=√5) and B = 0; `"gaussian"` A ~ N(0, 1/r) and
    B = 0; `False` both random."""
    if init is False:
        nn.init.kaiming_uniform_(a.weight, a=5**0.5)
        nn.init.kaiming_uniform_(b.weight, a=5**0.5)
        if getattr(b, "bias", None) is not None:
            nn.init.uniform_(b.bias, -0.1, 0.1)
        return
    if init == "gaussian":
        nn.init.normal_(a.weight, std=1 / r)
    else:
        nn.init.kaiming_uniform_(a.weight, a=5**0.5)
    nn.init.zeros_(b.weight)
    if getattr(b, "bias", None) is not None:
        nn.init.zeros_(b.bias)


@runtime_checkable
class AdapterModule(Protocol):
    """What the model-wide operations ask of a module that holds per-adapter parameters: a `LoraLayer`, or a
    `ModulesToSave` wrapper. The model's `LoraState` owns which adapters are active and whether they are
    disabled; these modules keep what follows from it for themselves."""

    disabled: bool
    active_adapters: list[str]

    @property
    def adapter_names(self) -> list[str]: ...

    def delete_adapter(self, name: str) -> None: ...

    def adapter_parameters(self, name: str) -> dict[str, nn.Parameter]:
        """The adapter's parameters keyed as in a saved file (peft's names without the module's path)."""
        ...

    def set_active(self, names: list[str]) -> None: ...

    def set_disabled(self, disabled: bool) -> None: ...


class LoraLayer(nn.Module):
    """Base class of LoRA layers: a frozen `base_layer` plus named low-rank adapters.

    Subclass it to add LoRA to a module type of your own, then `lorakit.register_lora_layer(YourModule,
    YourLoraLayer)`; see the README's "Your own layer types". The constructor takes the base module only.
    """

    #: Names of the per-adapter containers (`nn.ModuleDict` or `nn.ParameterDict`) a subclass creates.
    #: Their entries, keyed by adapter name, are the adapter's parameters; `lora_state_dict` saves them
    #: under `<module path>.<container>[.<param>]`, peft's key layout.
    adapter_containers: tuple[str, ...] = ("lora_A", "lora_B")
    #: Whether the kind has DoRA (`use_dora=True`); `add_adapter` refuses it by name elsewhere.
    supports_dora: bool = False
    #: Whether the kind has the initialisations of `init_schemes.py` ("pissa", "olora", "orthogonal").
    supports_weight_inits: bool = False

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.lora_dropout_p: dict[str, float] = {}
        self.lora_bias: dict[str, bool] = {}
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disabled = False
        # Adapters whose branch the forward computes: active, not merged, not disabled. Kept as a list
        # so the forward does no bookkeeping (and torch.compile guards on a plain list).
        self.forward_adapters: list[str] = []
        self._residuals: dict[str, Any] = {}  # base parameter → what restores it (a MergeResidual by default)
        # PiSSA/OLoRA adapters' starts taken out of the base weight, oldest first (layers/init_schemes.py)
        self.base_changes: list[BaseChange] = []
        self.adapter_stack: AdapterStack | None = None  # set while a mixed batch or X-LoRA runs the layer

    def __getattr__(self, name: str) -> Any:
        # Code written for the wrapped module (`layer.weight`, `layer.in_features`) keeps working.
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer":
                raise
            return getattr(self.base_layer, name)

    # ----- what a subclass provides -------------------------------------------------------------------

    def create_adapter(self, name: str, r: int, config: LoraConfig) -> None:
        """Create adapter `name`'s parameters of rank `r` in the `adapter_containers`."""
        raise NotImplementedError

    def reset_adapter(self, name: str, init: bool | str) -> None:
        """Initialise adapter `name`: `True` A kaiming-uniform(a=√5) and B = 0; `"gaussian"` A ~ N(0, 1/r)
        and B = 0; `False` both random. The default handles `lora_A`/`lora_B` modules with a `.weight`."""
        reset_factors(self.lora_A[name], self.lora_B[name], init, self.r[name])

    def add_adapter_output(self, result: Any, x: torch.Tensor, name: str) -> Any:
        """Return `result + s · B(A(dropout(x)))` for adapter `name`."""
        raise NotImplementedError

    def delta_weights(self, name: str) -> dict[str, torch.Tensor]:
        """`{base parameter name: ΔW}` for adapter `name`, in float32 (or wider), scaling included."""
        raise NotImplementedError

    def stacked_factors(self, names: list[str], dtype: torch.dtype, one_per_row: bool) -> dict[str, torch.Tensor]:
        """The adapters `names` (in slot order) stacked as in `AdapterStack`, scaling folded in, in `dtype`.
        `one_per_row`: the gates will be one-hot rows, so a per-row layout may be chosen instead."""
        raise LoraError(
            f"{type(self).__name__} does not support many adapters in one batch: it needs `stacked_factors` "
            "and `add_stacked_output`"
        )

    def stacked_lora_biases(self, names: list[str], dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """`{"bias": (n, out)}`, the adapters' `s·b_B` (zeros for those without), if any of `names` has a
        `lora_B` bias; else `{}`. For layers whose `lora_B[name]` is a module with an optional `.bias`."""
        biases = [self.lora_B[n].bias for n in names]
        if all(bias is None for bias in biases):
            return {}
        zeros = torch.zeros_like(next(bias for bias in biases if bias is not None))
        rows = [zeros if b is None else b * self.scaling[n] for n, b in zip(names, biases, strict=True)]
        return {"bias": torch.stack(rows).to(dtype)}

    def add_stacked_output(self, result: Any, x: torch.Tensor, stack: AdapterStack) -> Any:
        """`result + ((x @ A_cat.T) ⊙ column_gates) @ B_cat.T` with `stack.factors` (see `AdapterStack`);
        `stack.column_gates` is `(batch, Σr)` or `(batch, tokens, Σr)`, `stack.present_gates` the same with one
        column per stacked adapter."""
        raise NotImplementedError

    def rank_layout(self, name: str) -> dict[str, tuple[int | None, bool]]:
        """For hot swapping a smaller-rank adapter into adapter `name`'s slot: for each of its parameters (keyed
        as in `adapter_parameters`), the axis of length r (None if none) and whether it carries the scaling.
        The default: the first container is A `(r, …)`, the second B `(…, r, …)` whose weight and bias carry s,
        and DoRA's magnitude has neither."""
        first, second = self.adapter_containers[:2]
        layout: dict[str, tuple[int | None, bool]] = {}
        for key, param in self.adapter_parameters(name).items():
            container = key.split(".", 1)[0]
            if container == first:
                layout[key] = (0, False)
            elif container == second:
                layout[key] = (1 if param.ndim > 1 else None, True)
            elif container == "lora_magnitude_vector":  # DoRA's m (layers/dora.py): one per output, unscaled
                layout[key] = (None, False)
            else:
                raise LoraError(f"{type(self).__name__}: no rank layout for {key!r}; override rank_layout")
        return layout

    @classmethod
    def owns_suffix(cls, suffix: str) -> bool:
        """Whether a file tensor `<module path>.<suffix>` is one of this kind's adapter tensors (`suffix` as the
        keys of `adapter_parameters`). The default: its first part is one of the `adapter_containers`."""
        return suffix.split(".", 1)[0] in cls.adapter_containers

    @classmethod
    def rank_in_file(cls, shapes: dict[str, tuple[int, ...]]) -> int | None:
        """The rank of an adapter of this kind whose tensors in a file have `shapes` (keyed as in
        `adapter_parameters`), or None if the file lacks the tensor that tells. The default reads the first
        axis of the first container's tensor (A is `(r, …)`); a kind whose A keeps the rank elsewhere overrides
        this, as it overrides `rank_layout`."""
        first = cls.adapter_containers[0]
        shape = shapes.get(first) or shapes.get(f"{first}.weight")
        return shape[0] if shape else None

    def check_mergeable(self, name: str) -> None:
        """Raise `MergeError` if adapter `name` cannot be merged into this base layer."""
        for param_name, param in self.base_layer.named_parameters(recurse=False):
            if not param.is_floating_point():
                raise MergeError(
                    f"cannot merge adapter {name!r} into {type(self.base_layer).__name__}.{param_name}, a "
                    f"{param.dtype} tensor: merging needs floating-point base weights"
                )
        self.check_lora_bias_mergeable(name)

    def check_lora_bias_mergeable(self, name: str) -> None:
        """Raise `MergeError` if adapter `name` has a `lora_B` bias and the base layer no bias to merge it into."""
        if self.lora_bias.get(name) and getattr(self.base_layer, "bias", None) is None:
            raise MergeError(
                f"adapter {name!r} has lora_bias=True but the base {type(self.base_layer).__name__} has no bias "
                "to merge it into"
            )

    # ----- adapters -----------------------------------------------------------------------------------

    @property
    def adapter_names(self) -> list[str]:
        return list(self.r)

    def add_adapter(self, name: str, r: int, lora_alpha: float, config: LoraConfig) -> None:
        """Add adapter `name` of rank `r` (inactive) and initialise it per `config.init_lora_weights`."""
        if name in self.r:
            raise AdapterError(f"adapter {name!r} already exists on this {type(self).__name__}")
        if config.use_dora and not self.supports_dora:
            raise LoraError(
                f"use_dora=True (DoRA) is not supported on {type(self.base_layer).__name__} layers "
                f"({type(self).__name__}): leave this module out of target_modules, or use plain LoRA"
            )
        init = config.init_lora_weights
        if isinstance(init, str) and init != "gaussian" and not self.supports_weight_inits:
            raise LoraError(
                f"init_lora_weights={init!r} is not supported on {type(self.base_layer).__name__} layers "
                f"({type(self).__name__}), only on Linear and Conv1D ones: leave this module out of target_modules, "
                "or initialise with True or 'gaussian'"
            )
        self.r[name] = r
        self.lora_alpha[name] = lora_alpha
        self.scaling[name] = lora_scaling(lora_alpha, r, config.use_rslora)
        self.lora_dropout_p[name] = float(config.lora_dropout)
        self.lora_bias[name] = bool(config.lora_bias)
        if any(param.is_meta for param in self.base_layer.parameters()):
            _check_meta_startable(self, config)
        self.create_adapter(name, r, config)
        self.reset_adapter(name, config.init_lora_weights)
        on_meta = [key for key, param in self.adapter_parameters(name).items() if param.is_meta]
        if on_meta:
            raise LoraError(
                f"{type(self).__name__}.create_adapter made {on_meta[0]!r} of adapter {name!r} on the meta device, "
                "where it would have no value: create adapter parameters with "
                "lorakit.layers.adapter_factory(base weight)"
            )

    def check_deletable(self, name: str) -> None:
        """Raise `AdapterError` if adapter `name` cannot be deleted now: it is merged, or it took its start out of
        the base weight (PiSSA, OLoRA), which deleting gives back, and that needs nothing merged and no later such
        adapter on this layer."""
        if name in self.merged_adapters:
            raise AdapterError(f"adapter {name!r} is merged; unmerge it before deleting it")
        changed_by = [change.adapter for change in self.base_changes]
        if name in changed_by and (self.merged_adapters or changed_by[-1] != name):
            raise AdapterError(
                f"adapter {name!r} took its start out of this {type(self.base_layer).__name__}'s weight, which "
                "deleting it puts back: " + (f"unmerge {self.merged_adapters} first" if self.merged_adapters else
                f"delete {changed_by[changed_by.index(name) + 1:]}, which changed the weight after it, first")
            )  # fmt: skip

    def delete_adapter(self, name: str) -> None:
        self.check_deletable(name)
        if self.base_changes and self.base_changes[-1].adapter == name:
            self.restore_base_changes(keep=len(self.base_changes) - 1)
        for container in self.adapter_containers:
            holder = getattr(self, container)
            if name in holder:
                del holder[name]
        for table in (self.r, self.lora_alpha, self.scaling, self.lora_dropout_p, self.lora_bias):
            table.pop(name, None)
        self.set_active([a for a in self.active_adapters if a != name])

    def adapter_parameters(self, name: str) -> dict[str, nn.Parameter]:
        """Adapter `name`'s parameters keyed `<container>[.<param>]` (peft's names, adapter name removed)."""
        params: dict[str, nn.Parameter] = {}
        for container in self.adapter_containers:
            holder = getattr(self, container)
            if name not in holder:
                continue
            item = holder[name]
            if isinstance(item, nn.Parameter):
                params[container] = item
            else:
                for param_name, param in item.named_parameters():
                    params[f"{container}.{param_name}"] = param
        return params

    def moved_onto(self, lora_type: type[LoraLayer], base_layer: nn.Module) -> LoraLayer:
        """A `lora_type` layer around `base_layer` holding this layer's adapters (the same parameter objects),
        their settings and its active and disabled state. Nothing may be merged. `lorakit.dequantize` uses it to
        put a layer's adapters on the dequantized copy of its base."""
        if self.merged_adapters:
            raise MergeError(f"cannot move merged adapters {self.merged_adapters}; unmerge first")
        moved = lora_type(base_layer)
        for container in self.adapter_containers:
            setattr(moved, container, getattr(self, container))
        for table in ("r", "lora_alpha", "scaling", "lora_dropout_p", "lora_bias"):
            setattr(moved, table, dict(getattr(self, table)))
        moved.set_disabled(self.disabled)
        moved.set_active(self.active_adapters)
        return moved.train(self.training)

    def set_active(self, names: list[str]) -> None:
        """Make `names` (those this layer has) the active adapters, in order."""
        self.active_adapters = [n for n in names if n in self.r]
        self._update_forward_adapters()

    def set_disabled(self, disabled: bool) -> None:
        self.disabled = disabled
        self._update_forward_adapters()

    def _update_forward_adapters(self) -> None:
        self.forward_adapters = (
            [] if self.disabled else [n for n in self.active_adapters if n not in self.merged_adapters]
        )

    # ----- forward ------------------------------------------------------------------------------------

    def dropout_input(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """`x` through adapter `name`'s dropout (in training mode only)."""
        p = self.lora_dropout_p[name]
        return F.dropout(x, p, training=True) if p and self.training else x

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if self.merged_adapters and self.training and torch.is_grad_enabled():
            self._refuse_training_merged()
        result = self.base_layer(x, *args, **kwargs)
        if self.adapter_stack is not None and not self.disabled:
            return add_stacked_output(self, result, x, self.adapter_stack)
        for name in self.forward_adapters:
            result = self.add_adapter_output(result, x, name)
        return result

    def _refuse_training_merged(self) -> None:
        """A trainable adapter merged into the base weights gets no gradient from a forward: refuse to train it."""
        trainable = [
            n for n in self.merged_adapters if any(p.requires_grad for p in self.adapter_parameters(n).values())
        ]
        if trainable:
            raise LoraError(
                f"adapters {trainable} are merged into this {type(self.base_layer).__name__}'s weights, so a training "
                "forward would give them no gradient (and train only what is not merged). Call lorakit.unmerge(model) "
                "before training; for inference use model.eval() or torch.no_grad()."
            )

    # ----- many adapters in one forward ----------------------------------------------------------------

    def stack(
        self, owner: str, slots: list[str], eval_only: bool = True, one_per_row: bool = False, with_grad: bool = False
    ) -> None:
        """Stack this layer's adapters among `slots` (the model-wide slot order) for one forward in which rows
        or tokens weigh them their own way; `set_stack_gates` next. See `layers/stack.py`."""
        self.adapter_stack = build_stack(self, owner, slots, eval_only, one_per_row, with_grad)

    def set_stack_gates(self, gates: torch.Tensor) -> None:
        """Set the weights `(batch, n_slots)` or `(batch, tokens, n_slots)` of the stacked forward."""
        if self.adapter_stack is None:
            raise LoraError("set_stack_gates needs stack() first")
        self.adapter_stack.set_gates(gates)

    def unstack(self) -> None:
        self.adapter_stack = None

    # ----- merge --------------------------------------------------------------------------------------

    def _summed_deltas(self, names: list[str]) -> dict[str, torch.Tensor]:
        total: dict[str, torch.Tensor] = {}
        for name in names:
            for param_name, delta in self.delta_weights(name).items():
                total[param_name] = total[param_name] + delta if param_name in total else delta
        return total

    def _base_param(self, param_name: str) -> torch.Tensor:
        return self.base_layer.get_parameter(param_name)

    def check_merge_finite(self, names: list[str]) -> None:
        """Raise `MergeError` if merging `names` would put a non-finite value in a base parameter."""
        with torch.no_grad():
            for param_name, delta in self._summed_deltas(self.merged_adapters + names).items():
                if not torch.isfinite(self.merged_parameter(param_name, delta)).all():
                    raise MergeError(f"merging adapters {names} gives non-finite values in {param_name!r}")

    # How one base parameter takes an update and gives it back. A layer whose base stores a parameter in
    # another form (quantized weights, layers/quantized.py) overrides these three.

    def merged_parameter(self, param_name: str, delta: torch.Tensor) -> torch.Tensor:
        """The value base parameter `param_name` would hold with `delta` merged (nothing is written)."""
        return merged_value(self._base_param(param_name), delta)

    def merge_parameter(self, param_name: str, delta: torch.Tensor, names: list[str]) -> Any:
        """Add `delta`, the update of adapters `names`, to base parameter `param_name`; return what
        `restore_parameter` needs to undo it exactly."""
        return merge_exactly(self._base_param(param_name).data, delta)

    def restore_parameter(self, param_name: str, delta: torch.Tensor, residual: Any) -> None:
        """Undo `merge_parameter(param_name, delta)`, restoring every bit."""
        unmerge_exactly(self._base_param(param_name).data, delta, residual)

    def merge(self, names: list[str]) -> None:
        """Merge adapters `names` into the base parameters. Already merged ones are skipped (a no-op).

        The layer keeps one merged state, `W' = round(W + Σ ΔW_i)`, with one residual that restores `W`
        exactly; merging more adapters restores `W` first and merges the union.
        """
        names = [n for n in names if n in self.r and n not in self.merged_adapters]
        if not names:
            return
        for name in names:
            self.check_mergeable(name)
        with torch.no_grad():
            if self.merged_adapters:
                self._restore()
            merged = self.merged_adapters + names
            for param_name, delta in self._summed_deltas(merged).items():
                self._residuals[param_name] = self.merge_parameter(param_name, delta, merged)
        self.merged_adapters = merged
        self._update_forward_adapters()

    def unmerge(self) -> None:
        """Restore the base parameters bit for bit. A no-op when nothing is merged."""
        if not self.merged_adapters:
            return
        with torch.no_grad():
            self._restore()
        self.merged_adapters = []
        self._update_forward_adapters()

    def _restore(self) -> None:
        for param_name, delta in self._summed_deltas(self.merged_adapters).items():
            self.restore_parameter(param_name, delta, self._residuals[param_name])
            del self._residuals[param_name]  # only once restored: a failed restore can be retried

    def restore_base_changes(self, keep: int = 0) -> None:
        """Give the base weight back what PiSSA/OLoRA adapters took out of it at their start, newest first, down
        to the `keep` oldest: every bit of the weight as it was before them. Nothing may be merged."""
        if self.merged_adapters:
            raise MergeError(f"unmerge {self.merged_adapters} before restoring the base weights")
        with torch.no_grad():
            while len(self.base_changes) > keep:
                self.base_changes[-1].restore(self._base_param("weight").data)
                self.base_changes.pop()

    def initial_factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """`(A₀, B₀)` of adapter `name` if it took its start out of the base weight (PiSSA, OLoRA), else None."""
        for change in self.base_changes:
            if change.adapter == name:
                return change.a, change.b
        return None

    def drop_merge_residuals(self) -> None:
        """Forget what restores the base weights: the merge becomes permanent (`merge_and_unload`), and so do
        the residual weights PiSSA/OLoRA adapters left."""
        self._residuals.clear()
        self.base_changes.clear()
        self.merged_adapters = []
        self._update_forward_adapters()

    def merge_residual_bytes(self) -> int:
        """Extra memory held while merged, to restore the weights exactly."""
        return sum(r.nbytes for r in self._residuals.values())

    def extra_repr(self) -> str:
        return f"adapters={self.adapter_names}, active={self.active_adapters}, merged={self.merged_adapters}"


def _check_meta_startable(layer: LoraLayer, config: LoraConfig) -> None:
    """Refuse what an adapter on a base without values (the meta device) cannot start from."""
    init = config.init_lora_weights
    uses_weight = "use_dora=True (DoRA: m starts as the norm of W)" if config.use_dora else None
    if isinstance(init, str) and init not in ("gaussian", "orthogonal"):
        uses_weight = f"init_lora_weights={init!r} (it starts from an SVD or QR of W)"
    if uses_weight:
        raise LoraError(
            f"{uses_weight} needs the base weights, and this {type(layer.base_layer).__name__} is on the meta "
            "device: call lorakit.materialize first, then add the adapter (before sharding), or start from a "
            "built model"
        )
