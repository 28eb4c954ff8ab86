"""`summary(model)`: what a LoRA model holds, per adapter and model-wide, as data and as a printable table.

It shows what peft's `print_trainable_parameters` prints (the same line, the same counts) and more: per
adapter its targets, rank, alpha, scaling, dropout, parameter count, `modules_to_save`, and whether it is
active, merged, trainable and disabled. The text is for people; the fields are plain data for programs.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

from torch import nn

from .errors import AdapterError
from .formats.peft import adapter_parameters
from .layers import LoraLayer
from .layers.modules_to_save import ModulesToSave
from .model import LoraState, lora_layers, lora_state, trainable_parameters

__all__ = ["AdapterSummary", "ModelSummary", "Span", "summary"]


@dataclass(frozen=True)
class Span:
    """The smallest and largest value of a per-layer setting (rank, alpha, scaling) of one adapter.

    `str()` is `"8"` when every layer has the same value, else `"4–16"`.
    """

    low: float
    high: float

    @property
    def uniform(self) -> bool:
        return self.low == self.high

    def __str__(self) -> str:
        return _number(self.low) if self.uniform else f"{_number(self.low)}–{_number(self.high)}"


@dataclass(frozen=True)
class AdapterSummary:
    """One adapter of a LoRA model.

    Attributes:
        name: the adapter's name.
        targets: the number of LoRA layers that carry it.
        module_kinds: `{base module class name: count}` over those layers, e.g. `{"Linear": 14}`.
        rank, lora_alpha, scaling: over those layers (`rank_pattern` / `alpha_pattern` make them vary).
        dropout: its `lora_dropout`.
        parameters: its parameter count, i.e. what `lorakit.lora_state_dict` saves: A and B (and `lora_B`
            biases), its `modules_to_save` copies, and the base biases its `bias` mode trains (those are
            shared with every other adapter that trains them, and counted for each).
        trainable_parameters: how many of `parameters` have `requires_grad`.
        modules_to_save: paths of the modules of which it has a full trainable copy.
        active: it is one of the model's active adapters.
        merged_layers: of its `targets` layers, how many have it merged into the base weights.
        disabled_layers: of its `targets` layers, how many are disabled (inside `lorakit.disable_adapters`).
    """

    name: str
    targets: int
    module_kinds: dict[str, int]
    rank: Span
    lora_alpha: Span
    scaling: Span
    dropout: float
    parameters: int
    trainable_parameters: int
    modules_to_save: tuple[str, ...]
    active: bool
    merged_layers: int
    disabled_layers: int

    @property
    def merged(self) -> str:
        """`"all"`, `"some"` or `"none"` of its layers have it merged."""
        return _extent(self.merged_layers, self.targets)

    @property
    def trainable(self) -> str:
        """`"all"`, `"some"` or `"none"` of its parameters have `requires_grad`."""
        return _extent(self.trainable_parameters, self.parameters)

    @property
    def disabled(self) -> str:
        """`"all"`, `"some"` or `"none"` of its layers are disabled."""
        return _extent(self.disabled_layers, self.targets)


@dataclass(frozen=True)
class ModelSummary:
    """A LoRA model's adapters and parameter counts; `str()` renders them as a table.

    Attributes:
        model: the model's class name.
        adapters: one `AdapterSummary` per adapter, in the order they were added.
        active: the active adapters, in their order (their outputs add up in it).
        lora_layers: the number of LoRA layers (each counted once, however many adapters it carries).
        trainable_parameters, total_parameters: over the whole model, each shared parameter counted once:
            the numbers peft's `print_trainable_parameters` prints.
        merge_residual_bytes: extra memory the merged layers hold to unmerge exactly (0 when none is merged).
    """

    model: str
    adapters: tuple[AdapterSummary, ...]
    active: tuple[str, ...]
    lora_layers: int
    trainable_parameters: int
    total_parameters: int
    merge_residual_bytes: int

    @property
    def trainable_percent(self) -> float:
        return 100 * self.trainable_parameters / self.total_parameters if self.total_parameters else 0.0

    @property
    def peft_line(self) -> str:
        """The line peft's `print_trainable_parameters` prints."""
        return (
            f"trainable params: {self.trainable_parameters:,d} || all params: {self.total_parameters:,d} "
            f"|| trainable%: {self.trainable_percent:.4f}"
        )

    def __getitem__(self, name: str) -> AdapterSummary:
        for adapter in self.adapters:
            if adapter.name == name:
                return adapter
        raise AdapterError(f"unknown adapter {name!r}; this model has {[a.name for a in self.adapters]}")

    def __str__(self) -> str:
        header = f"{self.model}: {self.lora_layers} LoRA layers, {len(self.adapters)} adapters"
        header += f", active: {', '.join(self.active) if self.active else 'none'}"
        if self.merge_residual_bytes:
            header += f", {self.merge_residual_bytes:,d} bytes held to unmerge"
        columns = ["adapter", "targets", "rank", "alpha", "scaling", "dropout", "params", "active", "merged"]
        columns += ["trainable", "disabled", "modules_to_save"]
        rows = [dict(zip(columns, _row(a), strict=True)) for a in self.adapters]
        # Columns that would say "no" / "-" on every row are left out: disabled, modules_to_save.
        if not any(a.disabled_layers for a in self.adapters):
            columns.remove("disabled")
        if not any(a.modules_to_save for a in self.adapters):
            columns.remove("modules_to_save")
        rows = [columns] + [[row[c] for c in columns] for row in rows]
        widths = [max(len(row[i]) for row in rows) for i in range(len(columns))]
        numeric = {"rank", "alpha", "scaling", "dropout", "params"}
        lines = [header]
        for row in rows:
            cells = [
                cell.rjust(width) if column in numeric else cell.ljust(width)
                for column, cell, width in zip(columns, row, widths, strict=True)
            ]
            lines.append("  ".join(cells).rstrip())
        lines.append(self.peft_line)
        return "\n".join(lines)


def summary(model: nn.Module) -> ModelSummary:
    """What LoRA model `model` holds: per adapter its targets, rank, parameters and state; model-wide the
    trainable and total parameter counts. `print(lorakit.summary(model))` shows a table; `LoraError` if
    `model` is not a LoRA model.

    Columns that would say "no" or "-" on every row (disabled, modules_to_save) are left out of the table.
    A tiny Llama (`hidden_size=32`, two layers) with adapter "small" (r=4 on `q_proj`, `v_proj`) active and
    merged, and adapter "big" (r=8, `rank_pattern={"o_proj": 16}` on the attention projections and
    `embed_tokens`, `modules_to_save=["lm_head"]`):

    >>> print(lorakit.summary(model))
    LlamaForCausalLM: 9 LoRA layers, 2 adapters, active: small, 3,072 bytes held to unmerge
    adapter  targets                rank  alpha  scaling  dropout  params  active  merged  trainable  modules_to_save
    small    Linear×4                  4      8        2     0.05     896  yes     yes     yes        -
    big      Embedding×1, Linear×8  8–16     16      1–2        0   7,424  no      no      no         lm_head
    trainable params: 896 || all params: 27,936 || trainable%: 3.2073
    """
    state = lora_state(model)
    layers = list(lora_layers(model))
    trainable, total = trainable_parameters(model)
    adapters = tuple(_adapter_summary(model, state, name, layers) for name in state.configs)
    return ModelSummary(
        model=type(model).__name__,
        adapters=adapters,
        active=tuple(state.active),
        lora_layers=len(layers),
        trainable_parameters=trainable,
        total_parameters=total,
        merge_residual_bytes=sum(layer.merge_residual_bytes() for _, layer in layers),
    )


def _adapter_summary(
    model: nn.Module, state: LoraState, name: str, layers: list[tuple[str, LoraLayer]]
) -> AdapterSummary:
    config = state.configs[name]
    own = [layer for _, layer in layers if name in layer.r]
    params = {id(p): p for p in adapter_parameters(model, name).values()}.values()  # each shared one once
    return AdapterSummary(
        name=name,
        targets=len(own),
        module_kinds=dict(sorted(Counter(type(layer.base_layer).__name__ for layer in own).items())),
        rank=_span(layer.r[name] for layer in own),
        lora_alpha=_span(layer.lora_alpha[name] for layer in own),
        scaling=_span(layer.scaling[name] for layer in own),
        dropout=float(config.lora_dropout),
        parameters=sum(p.numel() for p in params),
        trainable_parameters=sum(p.numel() for p in params if p.requires_grad),
        modules_to_save=tuple(
            path
            for path, module in model.named_modules()
            if isinstance(module, ModulesToSave) and name in module.adapter_names
        ),
        active=name in state.active,
        merged_layers=sum(name in layer.merged_adapters for layer in own),
        disabled_layers=sum(bool(layer.disabled) for layer in own),
    )


def _span(values: Iterable[float]) -> Span:
    values = list(values)
    return Span(min(values), max(values)) if values else Span(0, 0)


def _extent(part: int, whole: int) -> str:
    if whole and part == whole:
        return "all"
    return "some" if part else "none"


def _number(value: float) -> str:
    return f"{value:.4g}"


def _state(part: int, whole: int, unit: str) -> str:
    extent = _extent(part, whole)
    return {"all": "yes", "none": "no"}.get(extent, f"{part} of {whole} {unit}")


def _row(adapter: AdapterSummary) -> list[str]:
    kinds = ", ".join(f"{kind}×{count}" for kind, count in adapter.module_kinds.items())
    return [
        adapter.name,
        kinds or "-",
        str(adapter.rank),
        str(adapter.lora_alpha),
        str(adapter.scaling),
        _number(adapter.dropout),
        f"{adapter.parameters:,d}",
        "yes" if adapter.active else "no",
        _state(adapter.merged_layers, adapter.targets, "layers"),
        _state(adapter.trainable_parameters, adapter.parameters, "params"),
        _state(adapter.disabled_layers, adapter.targets, "layers"),
        ", ".join(adapter.modules_to_save) or "-",
    ]
