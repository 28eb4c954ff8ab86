"""`add_weighted_adapter`: a new adapter made from a weighted combination of a model's adapters.

The counterpart of peft 0.21's `LoraModel.add_weighted_adapter`, with its eleven combination types, its math, its
rank and alpha rules and its use of the random number generators, so that the same seed gives peft's adapter. Where
peft fails or silently builds a wrong adapter, lorakit either works (Conv1d and Conv3d with the SVD types, rsLoRA
sources) or refuses by name (DoRA, `lora_bias` and PiSSA/OLoRA sources); see `add_weighted_adapter`.

Shapes, per LoRA layer: Linear `A: (r, in)`, `B: (out, r)`; Embedding `A: (r, num)`, `B: (dim, r)`; convolutions
`A: (r, in, *k)`, `B: (out, r, 1, …)`. `ΔW_i` is source adapter i's update in the base weight's layout, scaling
included (`LoraLayer.delta_weights`).
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from .config import LoraConfig
from .errors import AdapterError, LoraConfigError, TargetError
from .layers import LoraConv, LoraEmbedding, LoraLayer, LoraLinear
from .layers.modules_to_save import ModulesToSave
from .model import (
    AdapterTarget,
    LoraState,
    _check_new_name,
    _existing,
    add_planned_adapter,
    lora_layers,
    lora_state,
    undo_on_failure,
)
from .targets import candidate_modules, is_plain_pattern, is_targeted

#: peft's combination types. `cat` and the `*_svd` ones take adapters of any ranks; the others need one rank.
COMBINATION_TYPES = (
    "svd",
    "linear",
    "cat",
    "ties",
    "ties_svd",
    "dare_ties",
    "dare_linear",
    "dare_ties_svd",
    "dare_linear_svd",
    "magnitude_prune",
    "magnitude_prune_svd",
)
_FACTOR_TYPES = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")  # combine the A's and the B's
_NEEDS_DENSITY = ("ties", "dare_linear", "dare_ties", "magnitude_prune")  # and their _svd forms
SIGN_METHODS = ("total", "frequency")


def add_weighted_adapter(
    model: nn.Module,
    adapters: Sequence[str],
    weights: Sequence[float],
    adapter_name: str,
    combination_type: str = "svd",
    svd_rank: int | None = None,
    svd_clamp: float | None = None,
    svd_full_matrices: bool = True,
    density: float | None = None,
    majority_sign_method: str = "total",
) -> None:
    """Add adapter `adapter_name`, the combination of `adapters` with `weights` (any sign), as peft's
    `add_weighted_adapter` makes it. It is added like `add_adapter` adds one: inactive, until
    `set_active_adapters` names it; it saves, loads (in peft too), merges and trains like any other.

    On each LoRA layer holding any of `adapters` (an adapter a layer lacks is left out there), with source i's
    weight `w_i`, scaling `s_i`, factors `A_i`, `B_i` and update `ΔW_i = s_i·B_i·A_i`:

    - `cat`: `A = [w_1·s_1·A_1; w_2·s_2·A_2; …]` `(Σr_i, in)`, `B = [B_1, B_2, …]` `(out, Σr_i)`, so that
      `B·A = Σ w_i·ΔW_i` exactly; rank `Σ r_i`.
    - `linear`: with `c_i = w_i·s_i`, `A = Σ sign(c_i)·√|c_i|·A_i` and `B = Σ √|c_i|·B_i` (shapes of one source).
      Cheap, but `B·A` has the cross terms `B_i·A_j`: an approximation, exact for a single adapter.
    - `ties`, `dare_linear`, `dare_ties`, `magnitude_prune`: as `linear`, the A's and the B's each merged by that
      method (below, with `λ_i = sign(c_i)·√|c_i|` for the A's, `√|c_i|` for the B's) instead of summed.
    - `svd`: `M = Σ w_i·ΔW_i` as an `(out, in·∏k)` matrix (an Embedding's `(dim, num)`), then its truncated SVD
      `M ≈ U_r·diag(S_r)·V_rᵀ`: `B = U_r·diag(S_r)` `(out, r)` and `A = V_rᵀ` `(r, in·∏k)`, both reshaped to the
      layer's A and B shapes; `r = svd_rank`, else the largest source rank. With `svd_clamp=q`, both are clamped to
      `±h`, h the q-quantile of their entries together. Where r exceeds the rank `M` can have, A and B get zero rows
      and columns (peft builds broken factors there). `ties_svd`, `dare_linear_svd`, `dare_ties_svd` and
      `magnitude_prune_svd` merge the `ΔW_i` by that method instead of summing them. `svd_full_matrices` is
      `torch.linalg.svd`'s `full_matrices`.

    The merging methods, on tensors `T_i` with weights `λ_i`:

    - task arithmetic (`linear`, `svd`): `Σ λ_i·T_i`;
    - `magnitude_prune`: of each `T_i` only its `int(density·numel)` entries of largest magnitude are kept, then
      `Σ λ_i·T_i`;
    - `ties`: the same pruning; per entry the majority sign is that of `Σ T_i` (`majority_sign_method="total"`)
      or of `Σ sign(T_i)` (`"frequency"`), 0 counting as +; the result is the mean of `λ_i·T_i` over the i whose
      entry has that sign (0 where none has);
    - `dare_linear`, `dare_ties`: each entry of each `T_i` is kept with probability `density`
      (`torch.bernoulli`) and divided by `density`; then `Σ λ_i·T_i`, or `ties`' signed mean.

    `density` (in (0, 1]; 1 prunes nothing) is required by the pruning methods. With a single adapter every type
    is `linear` (peft's rule: `w·ΔW` exactly), except an SVD type given an explicit `svd_rank`, which truncates it.

    The new adapter's config is `adapters[0]`'s with `r` as above (for the one-rank types, each layer keeps its
    sources' rank, written as `rank_pattern` where it differs from `r`), `lora_alpha = r` per layer (scaling 1:
    the sources' scalings are folded into A and B), `use_rslora=False`, no `rank_pattern`/`alpha_pattern` of the
    sources, and `target_modules` peft's union of the sources' (lists: their union; regexes: `"(a)|(b)"`), or the
    names of the modules it went on where that union would target other modules. Like peft it takes
    `adapters[0]`'s `modules_to_save`, as fresh copies of the original modules, and its `init_lora_weights` where
    that is True, False or "gaussian" (else True). It trains, once active, if every source adapter does.

    Random numbers are drawn from torch's generators as peft draws them, so that `torch.manual_seed(s)` before the
    call gives peft's adapter: first what peft's initialisation of the new adapter's A and B draws (on the CPU,
    layer by layer; lorakit's own initialisation of the adapter it then overwrites draws nothing from them), then
    the `dare` masks, per layer in module order: those of each source's A, then each B (or each `ΔW_i`). (For a
    first source initialised "orthogonal", peft draws that scheme's numbers; lorakit draws those of True.)

    Refused before anything changes (a `LoraError` naming what is at fault): a model that is not a LoRA model;
    unknown, repeated or no source adapters; weights that are not finite numbers, one per adapter; an existing
    `adapter_name`; an unknown `combination_type` or `majority_sign_method`; a missing or out-of-range `density`,
    `svd_rank` or `svd_clamp`; sources of different ranks on one layer for the one-rank types; DoRA, `lora_bias`
    and PiSSA/OLoRA sources, and two sources with copies of the same module to save (peft builds a wrong adapter
    from the first three, refuses the last); grouped convolutions with `cat` and the SVD types; layer types of your own
    (`register_lora_layer`); a model inside a mixed batch or turned into X-LoRA. peft returns silently when
    `adapter_name` exists; lorakit refuses.
    """
    state = lora_state(model)
    names = _check_sources(state, adapters)
    weights = _check_weights(weights, names)
    _check_new_name(state, adapter_name)
    _check_options(combination_type, svd_rank, svd_clamp, svd_full_matrices, density, majority_sign_method)
    kind = combination_type
    if len(names) == 1 and not (kind.endswith("svd") and svd_rank is not None):
        kind = "linear"
    _check_model(model, state, names)
    plans = _plan_layers(model, state, names, weights, kind, svd_rank)
    config = _new_config(model, state, names, plans, kind)
    targets = [AdapterTarget(plan.name, plan.layer, plan.rank, plan.rank) for plan in plans]
    trainable = all(state.trainable.get(name, False) for name in names)
    options = _Options(kind, svd_clamp, svd_full_matrices, density, majority_sign_method)
    with undo_on_failure(model):
        with _generators_untouched(plans):
            add_planned_adapter(model, adapter_name, config, targets, trainable)
        for plan in plans:  # peft creates every layer's new adapter at rank config.r (it has no rank_pattern)
            _draw_as_peft_initialises(plan.layer, config.r, config.init_lora_weights)
        with torch.no_grad():
            for plan in plans:
                a, b = _combined_factors(plan, options)
                new_a, new_b = _factors(plan.layer, adapter_name)
                new_a.copy_(a.reshape(new_a.shape))  # an SVD's (r, in·∏k) and (out, r) to a conv's shapes
                new_b.copy_(b.reshape(new_b.shape))


# ----- checks ---------------------------------------------------------------------------------------------------


def _check_sources(state: LoraState, adapters: object) -> list[str]:
    if adapters is None or (not isinstance(adapters, str) and not isinstance(adapters, Sequence)):
        raise AdapterError(f"adapters must be a list of adapter names, got {adapters!r}")
    names = _existing(state, adapters)  # unknown or repeated names are AdapterErrors naming them
    if not names:
        raise AdapterError("add_weighted_adapter needs at least one adapter to combine; adapters is empty")
    return names


def _check_weights(weights: object, names: list[str]) -> list[float]:
    if isinstance(weights, (str, bytes)) or not isinstance(weights, (Sequence, torch.Tensor)):
        raise LoraConfigError(f"weights must be a list of numbers, one per adapter, got {weights!r}")
    values = list(weights)
    if len(values) != len(names):
        raise LoraConfigError(f"weights {values} has {len(values)} numbers for the {len(names)} adapters {names}")
    checked = []
    for name, value in zip(names, values, strict=True):
        if isinstance(value, torch.Tensor) and value.numel() == 1 and value.dtype != torch.bool:
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise LoraConfigError(f"weight of adapter {name!r} must be a finite number, got {value!r}")
        checked.append(float(value))
    return checked


def _check_options(
    combination_type: object, svd_rank: object, svd_clamp: object, svd_full_matrices: object, density: object,
    majority_sign_method: object,
) -> None:  # fmt: skip
    if combination_type not in COMBINATION_TYPES or not isinstance(combination_type, str):
        raise LoraConfigError(f"combination_type must be one of {list(COMBINATION_TYPES)}, got {combination_type!r}")
    if svd_rank is not None and (isinstance(svd_rank, bool) or not isinstance(svd_rank, int) or svd_rank < 1):
        raise LoraConfigError(f"svd_rank must be a positive integer or None, got {svd_rank!r}")
    if svd_clamp is not None and not (_is_number(svd_clamp) and 0 <= svd_clamp <= 1):
        raise LoraConfigError(f"svd_clamp must be a quantile in [0, 1] or None, got {svd_clamp!r}")
    if not isinstance(svd_full_matrices, bool):
        raise LoraConfigError(f"svd_full_matrices must be True or False, got {svd_full_matrices!r}")
    if density is not None and not (_is_number(density) and 0 < density <= 1):
        raise LoraConfigError(f"density must be a number in (0, 1], the share of entries kept, got {density!r}")
    if density is None and combination_type.removesuffix("_svd") in _NEEDS_DENSITY:
        raise LoraConfigError(
            f"combination_type={combination_type!r} prunes: it needs density, the share of entries kept, in (0, 1]"
        )
    if majority_sign_method not in SIGN_METHODS or not isinstance(majority_sign_method, str):
        raise LoraConfigError(f"majority_sign_method must be one of {list(SIGN_METHODS)}, got {majority_sign_method!r}")


def _takes_from_base(init: bool | str) -> bool:
    """Whether init scheme `init` moves part of the base weight into the adapter (PiSSA, OLoRA)."""
    return isinstance(init, str) and (init in ("pissa", "olora") or init.startswith("pissa_niter_"))


def _is_number(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _check_model(model: nn.Module, state: LoraState, names: list[str]) -> None:
    for name in names:
        config = state.configs[name]
        if config.use_dora:
            raise AdapterError(
                f"adapter {name!r} is a DoRA adapter (use_dora=True): its magnitudes do not combine linearly, and "
                "peft's add_weighted_adapter silently builds a wrong adapter from one; combine plain LoRA adapters"
            )
        if _takes_from_base(config.init_lora_weights):
            raise AdapterError(
                f"adapter {name!r} was initialised with init_lora_weights={config.init_lora_weights!r}: its A and B "
                "hold part of the base weights, which keep only the rest, so its update does not combine with others. "
                "Convert it to a plain LoRA of the original weights first"
            )
        if config.lora_bias:
            raise AdapterError(
                f"adapter {name!r} has lora_bias=True: peft's add_weighted_adapter combines only A and B and leaves "
                "the new adapter's bias at its initial value; combine adapters without lora_bias"
            )
    for layer_name, layer in lora_layers(model):
        if layer.adapter_stack is not None:
            raise AdapterError(
                f"{layer_name!r} runs a mixed batch or X-LoRA; end the mixed batch (or remove_xlora) before combining "
                "adapters"
            )
        for name in names:
            if name in getattr(layer, "lora_magnitude_vector", {}):
                raise AdapterError(f"adapter {name!r} is a DoRA adapter on {layer_name!r}; combine plain LoRA adapters")
            if layer.lora_bias.get(name):
                raise AdapterError(
                    f"adapter {name!r} has a lora_B bias on {layer_name!r}; combine adapters without one"
                )
    for module_name, module in model.named_modules():
        if isinstance(module, ModulesToSave):
            holders = [name for name in names if name in module.modules_to_save]
            if len(holders) > 1:
                raise AdapterError(
                    f"adapters {holders} each keep a trained copy of {module_name!r} (modules_to_save), which cannot "
                    "be combined; combine adapters of which at most one saves that module (peft refuses this too)"
                )


@dataclass
class _LayerPlan:
    """One layer of the new adapter: its sources there, with their weights, and the new adapter's rank."""

    name: str
    layer: LoraLayer
    sources: list[tuple[str, float]]
    rank: int


def _config_rank(config: LoraConfig) -> int:
    """peft's rank of a source adapter: the largest it may have anywhere (`r` or a `rank_pattern` value)."""
    return max([config.r, *config.rank_pattern.values()])


def _plan_layers(
    model: nn.Module, state: LoraState, names: list[str], weights: list[float], kind: str, svd_rank: int | None
) -> list[_LayerPlan]:
    rank = 0  # the one-rank types take each layer's
    if kind == "cat":
        rank = sum(_config_rank(state.configs[name]) for name in names)
    elif kind.endswith("svd"):
        rank = svd_rank or max(_config_rank(state.configs[name]) for name in names)
    plans = []
    for layer_name, layer in lora_layers(model):
        sources = [(name, weight) for name, weight in zip(names, weights, strict=True) if name in layer.r]
        if not sources:
            continue
        if not isinstance(layer, (LoraLinear, LoraEmbedding, LoraConv)):
            raise TargetError(
                f"{layer_name!r} is a {type(layer).__name__}; add_weighted_adapter combines adapters on Linear, "
                "transformers Conv1D, Embedding and Conv1d/2d/3d layers only"
            )
        if isinstance(layer, LoraConv) and layer.base_layer.groups > 1 and kind not in _FACTOR_TYPES:
            raise LoraConfigError(
                f"combination_type={kind!r} cannot combine adapters on {layer_name!r}, a {layer.conv_type.__name__} "
                f"with groups={layer.base_layer.groups}: its adapters' B are grouped convolutions. Use one of "
                f"{list(_FACTOR_TYPES)}, or leave the layer out of the adapters"
            )
        if kind in _FACTOR_TYPES:
            ranks = {name: layer.r[name] for name, _ in sources}
            if len(set(ranks.values())) > 1:
                raise LoraConfigError(
                    f"combination_type={kind!r} needs adapters of one rank on each layer, and {layer_name!r} has "
                    f"ranks {ranks}; use 'cat' or an SVD type ('svd', 'ties_svd', …), which take any ranks"
                )
            layer_rank = next(iter(ranks.values()))
        else:
            layer_rank = rank
        plans.append(_LayerPlan(layer_name, layer, sources, layer_rank))
    if not plans:
        raise AdapterError(f"adapters {names} are on no LoRA layer of the model: there is nothing to combine")
    return plans


def _new_config(model: nn.Module, state: LoraState, names: list[str], plans: list[_LayerPlan], kind: str) -> LoraConfig:
    """`adapters[0]`'s config with the new rank and alpha (scaling 1), rsLoRA off, and peft's union of the targets
    (or the explicit module names, where that union would target other modules than those the adapter goes on)."""
    first = state.configs[names[0]]
    r = _config_rank(first) if kind in _FACTOR_TYPES else plans[0].rank
    differing = {re.escape(plan.name): plan.rank for plan in plans if plan.rank != r}
    # A and B are computed and written over what the init made: a scheme that reads the base weights or needs an
    # even rank (PiSSA, OLoRA, orthogonal) is not run for them, and recorded as the default
    init = first.init_lora_weights if first.init_lora_weights in (True, False, "gaussian") else True
    config = first.replace(
        r=r, lora_alpha=r, rank_pattern=differing, alpha_pattern=dict(differing), use_rslora=False, use_dora=False,
        lora_bias=False, init_lora_weights=init,
    )  # fmt: skip
    placed = {plan.name for plan in plans}
    union = _union_of_targets([state.configs[name].target_modules for name in names])
    if union is not None:
        candidate = config.replace(target_modules=union)
        if _targets_exactly(model, candidate, placed):
            return candidate
    return config.replace(
        target_modules=sorted(placed), layers_to_transform=None, layers_pattern=None, exclude_modules=None
    )


def _union_of_targets(targets: list[list[str] | str | None]) -> list[str] | str | None:
    """peft's union: of lists, their union (sorted); of regexes, `"(a)|(b)"`; None for a mix (peft refuses it)."""
    if all(isinstance(t, list) for t in targets):
        return sorted(set().union(*targets))
    if all(isinstance(t, str) for t in targets):
        return "|".join(f"({t})" for t in targets)
    return None


def _targets_exactly(model: nn.Module, config: LoraConfig, placed: set[str]) -> bool:
    """Whether `config` targets exactly the modules `placed`, told without running a pattern that may be slow."""
    layers_pattern = config.layers_pattern
    patterns = [p for p in (config.target_modules, config.exclude_modules) if isinstance(p, str)]
    patterns += [layers_pattern] if isinstance(layers_pattern, str) else list(layers_pattern or [])
    if not all(is_plain_pattern(pattern) for pattern in patterns):
        return False
    return {name for name, _ in candidate_modules(model) if is_targeted(config, name)} == placed


# ----- random numbers ------------------------------------------------------------------------------------------


@contextmanager
def _generators_untouched(plans: list[_LayerPlan]) -> Iterator[None]:
    """Run the block on forked copies of torch's CPU generator and those of the CUDA devices of the layers: what it
    draws, nobody else sees."""
    devices = {p.device for plan in plans for p in plan.layer.base_layer.parameters(recurse=False)}
    cuda = sorted({d.index or 0 for d in devices if d.type == "cuda"})
    with torch.random.fork_rng(devices=cuda):
        yield


def _draw_as_peft_initialises(layer: LoraLayer, r: int, init: bool | str) -> None:
    """Draw from torch's generators what peft 0.21 draws creating and initialising a rank-`r` adapter on `layer`
    (it builds the factors on the CPU in the default dtype, then moves them): each factor's constructor, then
    `init_lora_weights`' re-initialisation (True: A kaiming-uniform, B zero; "gaussian": A normal, B zero; an
    embedding's B normal for both; False: nothing more)."""
    if isinstance(layer, LoraEmbedding):
        torch.randn(r, layer.num_embeddings)
        b = torch.randn(layer.embedding_dim, r)
        if init is not False:
            nn.init.normal_(b)
        return
    if isinstance(layer, LoraConv):
        base = layer.base_layer
        a = layer.conv_type(base.in_channels, r, base.kernel_size, bias=False).weight
        layer.conv_type(r, base.out_channels, 1, groups=base.groups, bias=False)
    else:
        a = nn.Linear(layer.in_features, r, bias=False).weight
        nn.Linear(r, layer.out_features, bias=False)
    with torch.no_grad():
        if init is True:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        elif init == "gaussian":
            nn.init.normal_(a, std=1 / r)


# ----- the math -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Options:
    kind: str
    svd_clamp: float | None
    svd_full_matrices: bool
    density: float | None
    majority_sign_method: str

    @property
    def method(self) -> str:
        """The merging method: `linear` (task arithmetic), `ties`, `dare_linear`, `dare_ties`, `magnitude_prune`."""
        return "linear" if self.kind in ("svd", "cat") else self.kind.removesuffix("_svd")


def _factors(layer: LoraLayer, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Adapter `name`'s `(A, B)` tensors on `layer`."""
    if isinstance(layer, LoraEmbedding):
        return layer.lora_embedding_A[name], layer.lora_embedding_B[name]
    return layer.lora_A[name].weight, layer.lora_B[name].weight


def _combined_factors(plan: _LayerPlan, options: _Options) -> tuple[torch.Tensor, torch.Tensor]:
    """The new adapter's `(A, B)` of rank `plan.rank` on the layer of `plan`: in the sources' shapes, or for the SVD
    types as the matrices `(r, in·∏k)` and `(out, r)`."""
    layer = plan.layer
    dtype = torch.promote_types(_factors(layer, plan.sources[0][0])[0].dtype, torch.float32)
    if options.kind == "cat":
        a = torch.cat([_factors(layer, n)[0].to(dtype) * w * layer.scaling[n] for n, w in plan.sources])
        b = torch.cat([_factors(layer, n)[1].to(dtype) for n, _ in plan.sources], dim=1)
        return _pad_rank(a, b, plan.rank)
    if options.kind in _FACTOR_TYPES:
        a_tensors, b_tensors, a_weights, b_weights = [], [], [], []
        for name, weight in plan.sources:
            a, b = _factors(layer, name)
            c = weight * layer.scaling[name]
            root = math.sqrt(abs(c))
            a_tensors.append(a.to(dtype))
            b_tensors.append(b.to(dtype))
            a_weights.append(root if c >= 0 else -root)  # the sign on one side only
            b_weights.append(root)
        return _merge(a_tensors, a_weights, options), _merge(b_tensors, b_weights, options)
    deltas = [layer.delta_weights(name)["weight"].to(dtype) for name, _ in plan.sources]
    delta = _merge(deltas, [weight for _, weight in plan.sources], options)
    return _truncated_svd(layer, delta, plan.rank, options)


def _as_matrix(layer: LoraLayer, delta: torch.Tensor) -> torch.Tensor:
    """`ΔW` in the base weight's layout as the `(out, in·∏k)` matrix `B·A` (scaled) is."""
    if isinstance(layer, LoraEmbedding):
        return delta.T  # (num, dim) → (dim, num)
    if isinstance(layer, LoraConv):
        return delta.flatten(1)  # (out, in, *k) → (out, in·∏k)
    return delta.T if layer.fan_in_fan_out else delta


def _truncated_svd(
    layer: LoraLayer, delta: torch.Tensor, rank: int, options: _Options
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(A, B)` `(rank, in·∏k)` and `(out, rank)` with `B·A` the best rank-`rank` approximation of `delta` as a
    matrix: `A = V_rᵀ`, `B = U_r·diag(S_r)`, both clamped to `±h` (h their `svd_clamp`-quantile) if asked."""
    u, s, vh = torch.linalg.svd(_as_matrix(layer, delta), full_matrices=options.svd_full_matrices)
    kept = min(rank, s.numel())
    b = u[:, :kept] * s[:kept]
    a = vh[:kept]
    if options.svd_clamp is not None:
        high = torch.quantile(torch.cat([b.flatten(), a.flatten()]), options.svd_clamp)
        b, a = b.clamp(-high, high), a.clamp(-high, high)
    return _pad_rank(a, b, rank)


def _pad_rank(a: torch.Tensor, b: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`A` with zero rows and `B` with zero columns up to `rank` (the product unchanged)."""
    missing = rank - a.shape[0]
    if missing > 0:
        a = torch.cat([a, a.new_zeros(missing, *a.shape[1:])])
        b = torch.cat([b, b.new_zeros(b.shape[0], missing, *b.shape[2:])], dim=1)
    return a, b


def _merge(tensors: list[torch.Tensor], weights: list[float], options: _Options) -> torch.Tensor:
    """`tensors` merged with `weights` by `options.method` (see `add_weighted_adapter`), as peft's merge_utils."""
    method, density = options.method, options.density
    if method in ("ties", "magnitude_prune"):
        tensors = [_keep_largest(t, density) for t in tensors]
    elif method in ("dare_linear", "dare_ties"):
        tensors = [_keep_at_random(t, density) for t in tensors]
    stacked = torch.stack(tensors)
    lambdas = torch.tensor(weights, dtype=stacked.dtype, device=stacked.device)
    weighted = stacked * lambdas.view(-1, *(1,) * (stacked.ndim - 1))
    if method not in ("ties", "dare_ties"):
        return weighted.sum(dim=0)
    agrees = _agrees_with_majority_sign(stacked, options.majority_sign_method)
    return (weighted * agrees).sum(dim=0) / agrees.sum(dim=0).clamp(min=1)


def _keep_largest(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """`tensor` with all but its `int(density·numel)` entries of largest magnitude set to 0."""
    if density >= 1:
        return tensor
    keep = torch.zeros_like(tensor).reshape(-1)
    keep[torch.topk(tensor.abs().reshape(-1), k=int(density * tensor.numel())).indices] = 1
    return tensor * keep.reshape(tensor.shape)


def _keep_at_random(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """DARE: each entry kept with probability `density` (one `torch.bernoulli` draw), the kept ones / density."""
    if density >= 1:
        return tensor
    return tensor * torch.bernoulli(torch.full_like(tensor, density)) / density


def _agrees_with_majority_sign(stacked: torch.Tensor, method: str) -> torch.Tensor:
    """Per entry of `stacked` `(n, …)`: whether its sign is the majority's over the n tensors, which is that of
    their sum (`"total"`) or of the sum of their signs (`"frequency"`), 0 counting as +. A 0 entry never agrees."""
    signs = stacked.sign()
    votes = stacked.sum(dim=0) if method == "total" else signs.sum(dim=0)
    return signs == torch.where(votes >= 0, 1, -1)
