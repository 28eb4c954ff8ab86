"""Property tests of merging: merged outputs match unmerged ones, and unmerging restores every bit.

Design reference: docs §3 "Exact unmerge". A merge writes `W' = round(W + ΔW)` into the base weight; an
unmerge must give back `W` bit for bit, however many cycles run, whatever the dtype, and also for weights
that hold `-0.0`, subnormals, infinities or NaNs with payloads. `src/lorakit/layers/exact.py` does it by
keeping an int8 bit difference per element plus escapes for the rare elements that do not fit.

Bits are compared through integer views (`_bits`), never with float `==`: that way `-0.0` vs `0.0` and NaN
payloads count as differences.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn
from transformers.pytorch_utils import Conv1D

import lorakit
from lorakit.layers.exact import MergeResidual, merge_exactly, merged_value, unmerge_exactly

MODEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ALL_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
KINDS = ("linear", "embedding", "conv2d", "hf_conv1d")

_INT_VIEW = {2: torch.int16, 4: torch.int32, 8: torch.int64}

# A few special bit patterns per dtype (as signed integers of the same width): NaNs with payloads (quiet and
# signalling, both signs), infinities and the smallest subnormals. Exact zeros are added separately.
_SPECIAL_BITS = {
    torch.bfloat16: [0x7FC1, 0xFF81 - 0x10000, 0x7F80, 0xFF80 - 0x10000, 0x0001, 0x8001 - 0x10000],
    torch.float16: [0x7E01, 0xFC01 - 0x10000, 0x7C00, 0xFC00 - 0x10000, 0x0001, 0x8001 - 0x10000],
    torch.float32: [0x7FC00001, 0xFF800001 - 2**32, 0x7F800000, 0xFF800000 - 2**32, 0x00000001, -(2**31) + 1],
    torch.float64: [0x7FF8000000000001, 0xFFF4000000000001 - 2**64, 0x7FF0000000000000, 0x1, -(2**63) + 1],
}

FAST = settings(deadline=None, max_examples=25, suppress_health_check=[HealthCheck.too_slow])


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bit patterns as integers of the same width."""
    return t.detach().contiguous().view(_INT_VIEW[t.element_size()])


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(_bits(a), _bits(b))


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def _assert_same_bits(before: dict[str, torch.Tensor], model: nn.Module) -> None:
    after = dict(model.named_parameters())
    assert after.keys() == before.keys()
    for name, old in before.items():
        new = after[name]
        if not _bits_equal(old, new):
            changed = (_bits(old) != _bits(new)).sum().item() if old.shape == new.shape else "shape"
            raise AssertionError(f"{name}: {changed} of {old.numel()} elements changed bits")


# ----- tiny models ---------------------------------------------------------------------------------------


class Holder(nn.Module):
    """A model holding one layer, named `layer` (the adapter's target)."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


@dataclass
class Case:
    kind: str
    model: Holder
    make_input: Callable[[torch.dtype], torch.Tensor]  # the model's input for a given float dtype
    n_acc: int  # the longest dot product of the base and LoRA paths (for the accumulation error bound)
    r: int
    lora_alpha: float
    lora_bias: bool
    channels_last: bool = False  # a conv weight stored channels_last: non-contiguous

    def cast(self, dtype: torch.dtype) -> None:
        self.model.to(dtype)
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
            assert not self.model.layer.weight.is_contiguous()


@st.composite
def cases(draw: st.DrawFn, kinds: tuple[str, ...] = KINDS) -> Case:
    """A tiny model around one layer of a random kind and shape (float32; cast it after), with its input."""
    kind = draw(st.sampled_from(kinds))
    seed = draw(st.integers(0, 2**31 - 1))
    torch.manual_seed(seed)
    r = draw(st.integers(1, 4))
    # s = alpha / r in {8, 16}: with init_lora_weights=False the update ΔW is then larger than W, so the LoRA
    # branch's contribution is far above the low-precision tolerance. At least 4 batch rows, 2 inputs and 2
    # outputs (2×2 positions for convs) make it very unlikely that random cancellation hides it everywhere.
    lora_alpha = float(r * draw(st.sampled_from([8, 16])))
    batch = draw(st.integers(4, 6))
    gen = torch.Generator().manual_seed(seed + 1)
    if kind == "linear":
        n_in, n_out = draw(st.integers(2, 12)), draw(st.integers(2, 12))
        bias = draw(st.booleans())
        layer: nn.Module = nn.Linear(n_in, n_out, bias=bias)

        def make_input(dtype: torch.dtype) -> torch.Tensor:
            return torch.randn(batch, n_in, generator=gen.manual_seed(seed + 1)).to(dtype)

        n_acc = n_in + r
    elif kind == "hf_conv1d":
        n_in, n_out, seq = draw(st.integers(2, 12)), draw(st.integers(2, 12)), draw(st.integers(1, 3))
        layer = Conv1D(n_out, n_in)  # weight (in, out); normal(0, 0.02) init, zero bias
        bias = True

        def make_input(dtype: torch.dtype) -> torch.Tensor:
            return torch.randn(batch, seq, n_in, generator=gen.manual_seed(seed + 1)).to(dtype)

        n_acc = n_in + r
    elif kind == "embedding":
        num, dim, seq = draw(st.integers(2, 12)), draw(st.integers(2, 8)), draw(st.integers(1, 4))
        padding_idx = draw(st.none() | st.integers(0, num - 1))
        layer = nn.Embedding(num, dim, padding_idx=padding_idx)
        bias = False

        def make_input(dtype: torch.dtype) -> torch.Tensor:
            return torch.randint(0, num, (batch, seq), generator=gen.manual_seed(seed + 1))

        n_acc = r
    else:
        c_in, c_out = draw(st.integers(1, 4)), draw(st.integers(2, 4))
        kernel = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
        stride = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
        dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
        padding = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
        padding_mode = draw(st.sampled_from(["zeros", "reflect", "replicate", "circular"]))
        bias = draw(st.booleans())
        layer = nn.Conv2d(
            c_in, c_out, kernel, stride=stride, padding=padding, dilation=dilation, padding_mode=padding_mode, bias=bias
        )
        # Big enough for ≥ 2 output positions per dimension (reach d·(k−1)+1, plus a stride) and for reflect
        # padding (p < size).
        size = [
            max(d * (k - 1) + 1 + st_, p + 1) + draw(st.integers(0, 2))
            for k, d, p, st_ in zip(kernel, dilation, padding, stride, strict=True)
        ]

        def make_input(dtype: torch.dtype) -> torch.Tensor:
            return torch.randn(batch, c_in, *size, generator=gen.manual_seed(seed + 1)).to(dtype)

        n_acc = c_in * kernel[0] * kernel[1] + r
    lora_bias = bias and draw(st.booleans())
    channels_last = (
        kind == "conv2d" and draw(st.booleans()) and not layer.weight.is_contiguous(memory_format=torch.channels_last)
    )  # (with 1×1 kernels or one channel both layouts coincide)
    return Case(kind, Holder(layer), make_input, n_acc, r, lora_alpha, lora_bias, channels_last)


def _to_lora(case: Case, dtype: torch.dtype, adapter_name: str = "default") -> nn.Module:
    """Cast the base to `dtype` first, so the adapters are float32 master weights beside a low-precision base."""
    case.cast(dtype)
    config = lorakit.LoraConfig(
        r=case.r,
        lora_alpha=case.lora_alpha,
        target_modules=["layer"],
        init_lora_weights=False,
        lora_bias=case.lora_bias,
    )
    return lorakit.get_lora_model(case.model, config, adapter_name=adapter_name)


@dataclass
class Reference:
    """Float64 values and magnitudes of each output element of the unmerged model (all one adapter's or more)."""

    y: torch.Tensor  # base + LoRA branches
    base: torch.Tensor  # the base layer alone
    mag: torch.Tensor  # M: Σ|terms| of y
    mag_lora: torch.Tensor  # M_lora: Σ|terms| of the LoRA branches

    @property
    def lora(self) -> torch.Tensor:
        return self.y - self.base


def _reference(model: nn.Module, x: torch.Tensor) -> Reference:
    """Run an unmerged float64 copy of `model`; then again on |x| with |every parameter| for the magnitudes.

    Base and LoRA branches are sums of products of input elements with weights (plus biases); replacing each
    factor by its absolute value gives Σ|terms|, the quantity floating point error bounds are proportional to.
    Zero padding stays zero; reflect/replicate/circular padding copy input elements, |x| then too.
    """
    ref = copy.deepcopy(model).to(torch.float64)
    x64 = x.to(torch.float64) if x.is_floating_point() else x
    with torch.no_grad():
        y = ref(x64)
        with lorakit.disable_adapters(ref):
            base = ref(x64)
        for p in ref.parameters():
            p.abs_()
        x_abs = x64.abs() if x.is_floating_point() else x
        mag = ref(x_abs)
        with lorakit.disable_adapters(ref):
            mag_base = ref(x_abs)
    return Reference(y, base, mag, mag - mag_base)


def _tolerance(dtype: torch.dtype, ref: Reference, n_acc: int, n_adapters: int = 1) -> torch.Tensor:
    """Elementwise bound on |merged − unmerged| output (both computed in `dtype`), by first-order error analysis.

    With unit roundoff u = eps/2 of the dtype, rounding a value v to the dtype costs at most u·|v|. An error made
    in an intermediate propagates to the output scaled by the (absolute) weights after it, so:
      - rounding W' = round(W + ΔW) (merged path)                       costs ≤ u·|x|·|W + ΔW| ≤ u·M
      - casting A and B to the dtype, rounding the hidden activations    cost ≤ u·M_lora each
      - rounding an output-level value v (merged output and its bias add; base output and its bias add; the
        branch output, its lora bias add and its scaling; the final sum) costs u·|v|:
        2u·|y| + 2u·|base| + 3u·|lora| + u·|y|
    so |merged − unmerged| ≤ u·(M + 3·M_lora + 3|y| + 2|base| + 3|lora|) + O(u²); we allow 25% for the O(u²)
    terms and for the values of the dtype computation differing from the float64 reference at first order.
    CPU kernels accumulate 16-bit dot products in float32: the accumulation adds at most γ_n ≈ n·u32 per path
    (Higham) over the longest dot product n ≤ n_acc, so 2·n_acc·u32·M. For float32 the bound is of the same
    form and still far above the differences seen (different summation orders).

    With several adapters the output-level terms of each branch are not bounded by |their sum|; there we use
    the plain bound "every rounding costs ≤ u·M": 3 (merged) + 2 (base) + 7 per adapter roundings.
    Observed over thousands of random cases: at most ≈ 0.35 of the single-adapter bound.
    """
    u = torch.finfo(dtype).eps / 2
    u32 = torch.finfo(torch.float32).eps / 2
    accumulation = 2 * n_acc * u32 * ref.mag
    if n_adapters > 1:
        return (3 + 2 + 7 * n_adapters) * u * ref.mag + accumulation
    first_order = ref.mag + 3 * ref.mag_lora + 3 * ref.y.abs() + 2 * ref.base.abs() + 3 * ref.lora.abs()
    return 1.25 * u * first_order + accumulation


def _first_layer(model: nn.Module) -> lorakit.LoraLayer:
    return next(layer for _, layer in lorakit.lora_layers(model))


# ----- 1. merged == unmerged ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", MODEL_DTYPES, ids=str)
@settings(FAST, max_examples=250)
@given(case=cases())
def test_merged_output_matches_unmerged(dtype: torch.dtype, case: Case) -> None:
    """A merged model computes what the unmerged one does, within the dtype's rounding error; unmerging then
    gives back the exact weights and outputs."""
    model = _to_lora(case, dtype)
    layer = _first_layer(model)
    assert all(p.dtype == torch.float32 for p in layer.adapter_parameters("default").values())
    assert layer.base_layer.weight.dtype == dtype
    x = case.make_input(dtype)
    with torch.no_grad():
        adapted = model(x)
        with lorakit.disable_adapters(model):
            base = model(x)
        tol = _tolerance(dtype, _reference(model, x), case.n_acc)
        assert adapted.dtype == dtype
        # The test must be able to fail: a merge that dropped ΔW must be caught, so the LoRA contribution has to
        # exceed the tolerance somewhere. Almost every draw does (typically by 100×), but a tiny layer can draw a
        # tiny update (a 1-channel 1×1 conv with r=1 has a single A weight): such draws are rejected, and if
        # most were, hypothesis would fail the test as unsatisfiable.
        assume(((adapted.double() - base.double()).abs() > tol).any())

        before = _snapshot(model)
        lorakit.merge(model)
        assert layer.merged_adapters == ["default"]
        merged = model(x)
        err = (merged.double() - adapted.double()).abs()
        worst = (err / tol).max().item()
        assert (err <= tol).all(), f"merged output off by up to {worst:.2f}× the tolerance"

        lorakit.unmerge(model)
        _assert_same_bits(before, model)
        # Same bits, same computation: the unmerged output is reproduced exactly.
        assert _bits_equal(model(x), adapted)


# ----- 2. many merge/unmerge cycles keep every bit --------------------------------------------------------


def _plant_specials(weight: torch.Tensor, gen: torch.Generator, with_nonfinite: bool) -> None:
    """Put exact zeros, negative zeros (and optionally subnormals, infinities, NaN payloads) into `weight`."""
    weight_bits = weight.data.view(_INT_VIEW[weight.element_size()])  # same storage, any layout
    flat_bits = weight_bits.flatten().clone()
    patterns = [0, torch.iinfo(flat_bits.dtype).min]  # +0.0 and -0.0
    if with_nonfinite:
        patterns += _SPECIAL_BITS[weight.dtype]
    positions = torch.randperm(flat_bits.numel(), generator=gen)
    for pos, pattern in zip(positions.tolist(), patterns, strict=False):  # as many as fit
        flat_bits[pos] = pattern
    weight_bits.copy_(flat_bits.view(weight.shape))


@pytest.mark.parametrize("large_delta", [False, True], ids=["small_delta", "large_delta"])
@pytest.mark.parametrize("dtype", MODEL_DTYPES, ids=str)
@settings(FAST, max_examples=80)
@given(case=cases(), with_nonfinite=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_hundred_cycles_keep_every_bit(
    dtype: torch.dtype, large_delta: bool, case: Case, with_nonfinite: bool, seed: int
) -> None:
    """100 merge/unmerge cycles leave every bit of every parameter as it was: weights with ±0.0 (and maybe
    subnormals, infinities, NaN payloads), channels_last conv weights, a lora bias merged into the base bias,
    and deltas small or ~1000× larger than W (the escape path)."""
    case.cast(dtype)
    weight = case.model.layer.weight
    with torch.no_grad():
        if large_delta:
            weight.mul_(1e-3)  # ΔW ≫ W: most elements lose all their bits in W + ΔW and must be escaped
        _plant_specials(weight, torch.Generator().manual_seed(seed), with_nonfinite)
    model = _to_lora(case, dtype)
    layer = _first_layer(model)
    before = _snapshot(model)
    for cycle in range(100):
        lorakit.merge(model)
        if cycle == 0:
            assert layer.merged_adapters == ["default"]
            assert set(layer._residuals) == ({"weight", "bias"} if case.lora_bias else {"weight"})
            escapes = layer._residuals["weight"].escape_index.numel()
            if large_delta:
                assert escapes > 0, "the escape path was not exercised"
            assert layer.merge_residual_bytes() == sum(r.nbytes for r in layer._residuals.values())
        lorakit.unmerge(model)
    assert layer.merged_adapters == []
    assert layer._residuals == {}
    _assert_same_bits(before, model)


# ----- 3. merge_exactly / unmerge_exactly on raw tensors --------------------------------------------------


def _delta_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)  # what LoRA layers produce: float32 or wider


@settings(FAST, max_examples=400)
@given(
    dtype=st.sampled_from(ALL_DTYPES),
    shape=st.lists(st.integers(1, 9), min_size=1, max_size=3),
    w_exp=st.integers(-6, 3),
    d_exp=st.integers(-30, 30),
    seed=st.integers(0, 2**31 - 1),
    with_specials=st.booleans(),
    permuted=st.booleans(),
)
def test_exact_roundtrip_any_magnitude(
    dtype: torch.dtype, shape: list[int], w_exp: int, d_exp: int, seed: int, with_specials: bool, permuted: bool
) -> None:
    """Deltas from 1e-30 to 1e30 against weights of 1e-6 to 1e3 (float16 overflows to inf: still exact).

    `permuted`: the weight is a non-contiguous view (dimensions reversed), as a transposed or channels_last
    parameter is; merge and unmerge work on it in place.
    """
    gen = torch.Generator().manual_seed(seed)
    if permuted:
        storage = torch.randn(shape[::-1], generator=gen, dtype=torch.float64) * 10.0**w_exp
        weight = storage.to(dtype).permute(*reversed(range(len(shape))))
    else:
        weight = (torch.randn(shape, generator=gen, dtype=torch.float64) * 10.0**w_exp).to(dtype)
    assert list(weight.shape) == shape
    delta = (torch.randn(shape, generator=gen, dtype=torch.float64) * 10.0**d_exp).to(_delta_dtype(dtype))
    _plant_specials(weight, gen, with_specials)
    original = weight.clone()
    expected_merged = merged_value(original, delta)
    residual = merge_exactly(weight, delta)
    assert _bits_equal(weight, expected_merged)  # the parameter holds round(W + ΔW) while merged
    assert residual.codes.dtype == torch.int8 and residual.codes.shape == weight.shape
    assert residual.escape_index.numel() == residual.escape_value.numel()
    unmerge_exactly(weight, delta, residual)
    assert _bits_equal(weight, original)


@settings(FAST, max_examples=400)
@given(
    dtype=st.sampled_from(ALL_DTYPES),
    numel=st.integers(1, 64),
    d_exp=st.integers(-40, 40),
    seed=st.integers(0, 2**31 - 1),
)
def test_exact_roundtrip_arbitrary_bit_patterns(dtype: torch.dtype, numel: int, d_exp: int, seed: int) -> None:
    """Weights made of uniformly random bits: NaNs of every payload, infinities, subnormals, huge and tiny."""
    gen = torch.Generator().manual_seed(seed)
    int_dtype = _INT_VIEW[torch.empty((), dtype=dtype).element_size()]
    info = torch.iinfo(int_dtype)
    raw = torch.randint(info.min, info.max, (numel,), generator=gen, dtype=int_dtype)
    weight = raw.view(dtype).clone()
    delta = (torch.randn(numel, generator=gen, dtype=torch.float64) * 2.0**d_exp).to(_delta_dtype(dtype))
    residual = merge_exactly(weight, delta)
    unmerge_exactly(weight, delta, residual)
    assert torch.equal(_bits(weight), raw)


@settings(FAST, max_examples=200)
@given(
    dtype=st.sampled_from(ALL_DTYPES),
    numel=st.integers(1, 512),
    w_exp=st.integers(-3, 3),
    rel=st.floats(0.0, 0.1),
    seed=st.integers(0, 2**31 - 1),
)
def test_residual_is_one_byte_per_element_for_small_deltas(
    dtype: torch.dtype, numel: int, w_exp: int, rel: float, seed: int
) -> None:
    """|ΔW| ≤ 0.1·|W| elementwise and W ≠ 0: the bit difference always fits in int8, nothing is escaped."""
    gen = torch.Generator().manual_seed(seed)
    weight = (torch.randn(numel, generator=gen, dtype=torch.float64) * 10.0**w_exp).to(dtype)
    weight[weight == 0] = 1.0
    factor = (torch.rand(numel, generator=gen, dtype=torch.float64) * 2 - 1) * rel
    delta = (weight.to(torch.float64) * factor).to(_delta_dtype(dtype))
    original = weight.clone()
    residual = merge_exactly(weight, delta)
    assert residual.escape_index.numel() == 0
    assert residual.nbytes == numel <= 1.1 * numel
    unmerge_exactly(weight, delta, residual)
    assert _bits_equal(weight, original)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_residual_size_for_a_typical_update(dtype: torch.dtype) -> None:
    """A weight matrix N(0, 1) and an update 1e-3 times its size (not elementwise): ≤ 1.1 bytes per element."""
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(64, 128, generator=gen).to(dtype)
    b, a = torch.randn(64, 4, generator=gen), torch.randn(4, 128, generator=gen)
    delta = (1e-3 / 2 * b @ a).to(_delta_dtype(dtype))  # B @ A has entries of size ~2
    original = weight.clone()
    residual = merge_exactly(weight, delta)
    assert isinstance(residual, MergeResidual)
    assert not _bits_equal(weight, original)  # the merge did change the weight
    assert residual.nbytes <= 1.1 * weight.numel()
    unmerge_exactly(weight, delta, residual)
    assert _bits_equal(weight, original)


# ----- 4. several adapters, disable_adapters on a merged model --------------------------------------------


class _Boom(Exception):
    pass


@pytest.mark.parametrize("dtype", MODEL_DTYPES, ids=str)
@settings(FAST, max_examples=80)
@given(case=cases(), r_b=st.integers(1, 4))
def test_two_adapters_merge_disable_unmerge(dtype: torch.dtype, case: Case, r_b: int) -> None:
    """Merging adapter a, then b, then unmerging restores the bits; `disable_adapters` on the merged model runs
    the exact base model and merges back to the same bits afterwards, also when the block raises."""
    model = _to_lora(case, dtype, adapter_name="a")
    config_b = lorakit.LoraConfig(
        r=r_b, lora_alpha=2.0 * r_b, target_modules=["layer"], init_lora_weights=False, lora_bias=case.lora_bias
    )
    lorakit.add_adapter(model, "b", config_b)
    lorakit.set_active_adapters(model, ["a", "b"])
    layer = _first_layer(model)
    x = case.make_input(dtype)
    original = _snapshot(model)
    with torch.no_grad():
        adapted = model(x)
        with lorakit.disable_adapters(model):
            base = model(x)
        tol = _tolerance(dtype, _reference(model, x), case.n_acc + r_b, n_adapters=2)

        lorakit.merge(model, ["a"])
        assert layer.merged_adapters == ["a"]
        assert (model(x).double() - adapted.double()).abs().le(tol).all()  # a merged, b still a branch
        lorakit.merge(model, ["b"])
        assert layer.merged_adapters == ["a", "b"]
        assert (model(x).double() - adapted.double()).abs().le(tol).all()
        merged = _snapshot(model)
        merged_out = model(x)

        # One merged state: merging a then b leaves the same bits as merging both at once.
        lorakit.unmerge(model)
        _assert_same_bits(original, model)
        lorakit.merge(model, ["a", "b"])
        _assert_same_bits(merged, model)

        with lorakit.disable_adapters(model):
            assert layer.merged_adapters == []
            _assert_same_bits(original, model)
            assert _bits_equal(model(x), base)
        assert layer.merged_adapters == ["a", "b"]
        assert not layer.disabled
        _assert_same_bits(merged, model)
        assert _bits_equal(model(x), merged_out)

        with pytest.raises(_Boom), lorakit.disable_adapters(model):
            assert _bits_equal(model(x), base)
            raise _Boom
        assert layer.merged_adapters == ["a", "b"]
        assert not layer.disabled
        _assert_same_bits(merged, model)
        assert _bits_equal(model(x), merged_out)

        for _ in range(10):
            lorakit.unmerge(model)
            lorakit.merge(model, ["a"])
            lorakit.merge(model, ["b"])
        _assert_same_bits(merged, model)
        lorakit.unmerge(model)
        _assert_same_bits(original, model)
        assert _bits_equal(model(x), adapted)


# ----- 5. the naive approach drifts -----------------------------------------------------------------------


def test_naive_bf16_unmerge_drifts() -> None:
    """`(W + ΔW) − ΔW` in bfloat16 changes bits, and cycling does not repair them: exactness is not automatic."""
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(64, 64, generator=gen).to(torch.bfloat16)
    delta = 0.1 * torch.randn(4, 64, generator=gen).T @ torch.randn(4, 64, generator=gen) / 2  # |ΔW| ~ 0.1 |W|

    # In bfloat16 arithmetic (a plain merge on a bf16 model) and via float32 (lorakit's merged_value).
    once_bf16 = (weight + delta.to(torch.bfloat16)) - delta.to(torch.bfloat16)
    once_f32 = ((weight.float() + delta).to(torch.bfloat16).float() - delta).to(torch.bfloat16)
    for once in (once_bf16, once_f32):
        changed = (_bits(once) != _bits(weight)).float().mean().item()
        assert changed > 0.05, f"only {changed:.1%} of the elements changed"

    # With a fixed ΔW the naive round trip settles after the first cycle: the damage stays, it is not undone.
    naive = {"bf16": weight.clone(), "f32": weight.clone()}
    for _ in range(100):
        naive["bf16"] = (naive["bf16"] + delta.to(torch.bfloat16)) - delta.to(torch.bfloat16)
        naive["f32"] = ((naive["f32"].float() + delta).to(torch.bfloat16).float() - delta).to(torch.bfloat16)
    for drifted in naive.values():
        changed = (_bits(drifted) != _bits(weight)).float().mean().item()
        assert changed > 0.05, f"only {changed:.1%} of the elements changed after 100 cycles"

    # The exact path on the same tensors keeps every bit, cycle after cycle.
    exact = weight.clone()
    for _ in range(100):
        residual = merge_exactly(exact, delta)
        unmerge_exactly(exact, delta, residual)
    assert _bits_equal(exact, weight)
