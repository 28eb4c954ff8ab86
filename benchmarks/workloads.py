"""What the suite measures: the presets (model shape, tokens, rank, dtypes, rounds) and the helpers that build
the same models, adapters and inputs for every benchmark.

Every model is a Llama-shaped transformers `LlamaModel` with random weights, fed `inputs_embeds` (so the
vocabulary only costs memory), built directly on the preset's device in the benchmark's dtype. The LoRA
contenders use one config: rank `r`, `lora_alpha`, all linear layers.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
from collections.abc import Iterator
from dataclasses import dataclass

import peft
import torch
from torch import nn
from transformers import LlamaConfig, LlamaModel

import lorakit


@dataclass(frozen=True)
class LlamaShape:
    """The dimensions of a Llama-shaped model."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int

    def config(self) -> LlamaConfig:
        return LlamaConfig(
            vocab_size=self.vocab, hidden_size=self.hidden, intermediate_size=self.intermediate,
            num_hidden_layers=self.layers, num_attention_heads=self.heads, num_key_value_heads=self.kv_heads,
            max_position_embeddings=4096, attn_implementation="sdpa",
        )  # fmt: skip

    def describe(self) -> str:
        return (
            f"hidden {self.hidden}, intermediate {self.intermediate}, {self.layers} layers, {self.heads} heads "
            f"({self.kv_heads} KV), vocabulary {self.vocab}"
        )


@dataclass(frozen=True)
class Preset:
    """One configuration of the whole suite.

    `rounds` × `repeats` is the timing plan of the train, inference and merge benchmarks (each round keeps
    the median of `repeats` calls per contender), after `warmup` untimed calls each. The convert benchmark
    converts `convert_model` built on the meta device, `convert_rounds` rounds of one call each.
    """

    name: str
    device: str
    dtypes: tuple[str, ...]
    model: LlamaShape
    rank: int
    alpha: int
    batch: int
    seq: int
    rounds: int
    repeats: int
    warmup: int
    convert_model: LlamaShape
    convert_rounds: int
    convert_target_s: float | None  # the project's target for this convert shape, if it has one
    memory_steps: int = 3
    memory_jobs: int = 1  # memory subprocesses run at once (each measures itself; more only saves wall time)
    merge_cycles: tuple[int, int] = (1, 10)  # correctness is checked after this many merge+unmerge cycles

    def describe(self) -> str:
        return (
            f"Llama-shaped `LlamaModel` ({self.model.describe()}), LoRA r={self.rank}, lora_alpha={self.alpha} "
            f"on all linear layers, {self.batch}×{self.seq} tokens"
        )


LLAMA_70B = LlamaShape(hidden=8192, intermediate=28672, layers=80, heads=64, kv_heads=8, vocab=128256)

PRESETS: dict[str, Preset] = {
    "cpu": Preset(
        name="cpu", device="cpu", dtypes=("float32", "bfloat16"),
        model=LlamaShape(hidden=1024, intermediate=2816, layers=4, heads=16, kv_heads=16, vocab=1000),
        rank=16, alpha=32, batch=2, seq=256, rounds=7, repeats=3, warmup=2,
        convert_model=LLAMA_70B, convert_rounds=3, convert_target_s=0.5,
    ),
    "gpu": Preset(
        name="gpu", device="cuda", dtypes=("bfloat16",),
        model=LlamaShape(hidden=2048, intermediate=5632, layers=8, heads=16, kv_heads=16, vocab=32000),
        rank=16, alpha=32, batch=8, seq=1024, rounds=5, repeats=5, warmup=2,
        convert_model=LLAMA_70B, convert_rounds=3, convert_target_s=0.5,
    ),
    "tiny": Preset(
        name="tiny", device="cpu", dtypes=("float32", "bfloat16"),
        model=LlamaShape(hidden=128, intermediate=352, layers=2, heads=2, kv_heads=2, vocab=256),
        rank=8, alpha=16, batch=2, seq=32, rounds=2, repeats=1, warmup=1,
        convert_model=LlamaShape(hidden=256, intermediate=704, layers=2, heads=4, kv_heads=2, vocab=1000),
        convert_rounds=2, convert_target_s=None, memory_jobs=3,
    ),
}  # fmt: skip


def torch_dtype(name: str) -> torch.dtype:
    """`torch.<name>`, which must be a floating dtype."""
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"not a floating dtype of torch: {name!r}")
    return dtype


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Create floating tensors in `dtype` inside the block (how transformers builds a model in a dtype)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_base(preset: Preset, dtype: torch.dtype, seed: int = 0) -> LlamaModel:
    """The preset's base model with random weights, built on its device in `dtype` (no float32 detour)."""
    torch.manual_seed(seed)
    with torch.device(preset.device), default_dtype(dtype):
        return LlamaModel(preset.model.config())


#: The quantized bases of the quantized benchmark, by name: what `quantized_base` builds.
QUANTIZATIONS: dict[str, str] = {
    "nf4": "bitsandbytes nf4",
    "bnb-int8": "bitsandbytes int8",
    "torchao-int8": "torchao int8",
}


def _bnb_linear(linear: nn.Linear, quantization: str, device: torch.device | str) -> nn.Module:
    """A bitsandbytes copy of `linear` on `device`: `Linear4bit` (nf4, double quantization, bfloat16 compute) or
    `Linear8bitLt` (int8 weights, no outlier threshold). Moving it to the device quantizes its weight, which
    bitsandbytes' `Int8Params` only does from the CPU, hence the float weight's trip there."""
    import bitsandbytes as bnb

    weight = linear.weight.detach().to("cpu")
    has_bias = linear.bias is not None
    if quantization == "nf4":
        quantized = bnb.nn.Linear4bit(
            linear.in_features, linear.out_features, bias=has_bias, compute_dtype=torch.bfloat16,
            compress_statistics=True, quant_type="nf4", device="meta",
        )  # fmt: skip
        quantized.weight = bnb.nn.Params4bit(weight, requires_grad=False, compress_statistics=True, quant_type="nf4")
    elif quantization == "bnb-int8":
        quantized = bnb.nn.Linear8bitLt(
            linear.in_features, linear.out_features, bias=has_bias, has_fp16_weights=False, threshold=0.0,
            device="meta",
        )  # fmt: skip
        quantized.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    else:
        raise ValueError(f"not a bitsandbytes quantization: {quantization!r}")
    if has_bias:
        quantized.bias = nn.Parameter(linear.bias.detach().to("cpu"), requires_grad=linear.bias.requires_grad)
    return quantized.to(device)


def quantized_base(preset: Preset, quantization: str, seed: int = 0) -> LlamaModel:
    """The preset's bfloat16 base (`build_base`, the same `seed` giving the same float weights) with every linear
    layer of its decoder layers quantized, by `quantization` (a key of `QUANTIZATIONS`):

    - "nf4": bitsandbytes `Linear4bit`, nf4 with double quantization and a bfloat16 compute dtype (the usual
      QLoRA setting of transformers' `BitsAndBytesConfig`);
    - "bnb-int8": bitsandbytes `Linear8bitLt` with int8 weights (`has_fp16_weights=False`), outlier threshold 0;
    - "torchao-int8": torchao's `quantize_(model, Int8WeightOnlyConfig())`, int8 weights in an `nn.Linear`.

    The rest (embeddings, norms) stays bfloat16; the model is in training mode.
    """
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {quantization!r}; choose from {', '.join(QUANTIZATIONS)}")
    model = build_base(preset, torch.bfloat16, seed)
    if quantization == "torchao-int8":
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        quantize_(model, Int8WeightOnlyConfig())
    else:
        for parent in list(model.layers.modules()):
            for name, child in list(parent.named_children()):
                if type(child) is nn.Linear:
                    setattr(parent, name, _bnb_linear(child, quantization, preset.device))
    return model.train()


def embeds(preset: Preset, dtype: torch.dtype, seed: int = 1) -> torch.Tensor:
    """The input of every forward: `inputs_embeds` of shape (batch, seq, hidden)."""
    torch.manual_seed(seed)
    return torch.randn(preset.batch, preset.seq, preset.model.hidden, dtype=dtype, device=preset.device)


def cache_keyword(model: nn.Module) -> str:
    """The keyword (and output field) of a KV cache in this transformers version's model calls: `cache` since
    transformers 5.x renamed it, `past_key_values` before."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft's wrapper takes **kwargs
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def loss_of(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """The training loss: mean square of the last hidden state, in float32."""
    return model(inputs_embeds=inputs).last_hidden_state.float().square().mean()


def lorakit_model(model: nn.Module, preset: Preset, **options: object) -> nn.Module:
    """`model` converted in place by `lorakit.get_lora_model` with the preset's config (and `options`, such as
    `use_dora=True`)."""
    config = lorakit.LoraConfig(r=preset.rank, lora_alpha=preset.alpha, target_modules="all-linear", **options)
    return lorakit.get_lora_model(model, config)


def peft_model(model: nn.Module, preset: Preset, **options: object) -> nn.Module:
    """`model` wrapped by `peft.get_peft_model` with the same config as `lorakit_model`."""
    config = peft.LoraConfig(r=preset.rank, lora_alpha=preset.alpha, target_modules="all-linear", **options)
    return peft.get_peft_model(model, config)


def adapter_pair(base: nn.Module, preset: Preset, seed: int = 2) -> tuple[nn.Module, nn.Module]:
    """A lorakit and a peft model on copies of `base`, holding the very same non-zero adapter.

    Every lora_B is drawn from N(0, 0.02²) (a fresh adapter's B is zero, which would make the LoRA branch
    compute nothing), then all of lorakit's LoRA parameters are copied into peft's, name by name. Calls with
    the same `seed` return the same adapter.
    """
    torch.manual_seed(seed)  # lorakit's A and B: the same adapter on every call with the same seed
    lk = lorakit_model(copy.deepcopy(base), preset)
    pf = peft_model(copy.deepcopy(base), preset)
    peft_params = dict(pf.named_parameters())
    copied = 0
    with torch.no_grad():
        for name, param in lk.named_parameters():
            if ".lora_" not in name:
                continue
            if ".lora_B." in name:
                nn.init.normal_(param, std=0.02)
            peft_params[f"base_model.model.{name}"].copy_(param)
            copied += 1
    peft_lora = sum(1 for name in peft_params if ".lora_" in name)
    if copied == 0 or copied != peft_lora:
        raise RuntimeError(f"lorakit has {copied} LoRA parameters, peft {peft_lora}: the configs differ")
    return lk, pf


def adapted_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base weights the adapters merge into, by name (lorakit and peft both name them `*.base_layer.weight`)."""
    return {name: param for name, param in model.named_parameters() if name.endswith(".base_layer.weight")}


def forward_flops_per_token(base: nn.Module, lora: nn.Module, seq: int) -> tuple[float, float]:
    """Forward FLOPs per token of the base model and of the LoRA branches of its converted copy `lora`.

    Base: Σ over its Linear layers of 2·in·out, plus attention's 4·seq·hidden per layer (scores and
    weighted sum, causal masking ignored). LoRA: Σ over the adapted linear layers of 2·r·(in + out).
    """
    config = base.config
    linear = sum(2 * m.in_features * m.out_features for m in base.modules() if isinstance(m, nn.Linear))
    attention = 4 * seq * config.hidden_size * config.num_hidden_layers
    adapters = 0
    for _, layer in lorakit.lora_layers(lora):
        for rank in layer.r.values():
            adapters += 2 * rank * (layer.base_layer.in_features + layer.base_layer.out_features)
    return float(linear + attention), float(adapters)
