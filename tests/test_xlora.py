"""X-LoRA against peft's `XLoraModel` (the oracle), and its behaviour in generation and training.

Golden tests: the same three non-zero experts (of different ranks and targets) and the same classifier
weights in lorakit and peft (whose experts must be named "0".."n-1"); the logits must agree to float32
rounding for each configuration below.
"""

from __future__ import annotations

import copy
from pathlib import Path

import peft
import pytest
import torch
import transformers as tf
from torch import nn

import lorakit
from lorakit import LoraConfig, LoraConfigError, LoraError, XLoraConfig

HIDDEN = 32
EXPERTS = [(4, ["q_proj", "v_proj"]), (8, ["v_proj", "down_proj"]), (2, "all-linear")]


def tiny_llama(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    config = tf.LlamaConfig(vocab_size=64, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    return tf.LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def experts(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, dict[str, str]]:
    """The base model and three saved, non-zero expert adapters named "0", "1", "2"."""
    base = tiny_llama()
    root = tmp_path_factory.mktemp("experts")
    directories = {}
    for i, (rank, targets) in enumerate(EXPERTS):
        model = copy.deepcopy(base)
        torch.manual_seed(100 + i)
        config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, init_lora_weights=False)
        lorakit.get_lora_model(model, config)
        lorakit.save_adapter(model, root / str(i))
        directories[str(i)] = str(root / str(i))
    return base, directories


CONFIGS = {
    "defaults": {},
    "layerwise-depth2": {"layerwise_scalings": True, "xlora_depth": 2, "xlora_size": 16},
    "temperature-global": {"softmax_temperature": 0.5, "global_scaling_weight": 0.7},
    "top_k": {"top_k_lora": 2},
    "softmax_topk": {"top_k_lora": 2, "enable_softmax_topk": True, "enable_softmax": False},
    "scaling_pass_none": {"scaling_pass_value": None},
    "depth3-pass-value": {"xlora_depth": 3, "xlora_size": 8, "scaling_pass_value": 0.3, "top_k_lora": 1},
}


def build_pair(base: nn.Module, directories: dict[str, str], fields: dict) -> tuple[nn.Module, nn.Module]:
    """lorakit's and peft's X-LoRA models on copies of `base`, with the same random classifier weights."""
    peft_fields = {k: v for k, v in fields.items() if k != "scaling_pass_value" or v is not None}
    pf_config = peft.XLoraConfig(task_type="CAUSAL_LM", hidden_size=HIDDEN, adapters=directories,
                                 xlora_dropout_p=0.0, **peft_fields)  # fmt: skip
    plain = copy.deepcopy(base)
    plain.config.use_cache = False  # peft refuses a model that caches
    pf = peft.get_peft_model(plain, pf_config).eval()
    if "scaling_pass_value" in fields and fields["scaling_pass_value"] is None:
        pf.base_model.set_scaling_pass_value(None)  # peft's config cannot hold None
    lk = lorakit.get_xlora_model(copy.deepcopy(base), XLoraConfig(adapters=directories, xlora_dropout_p=0.0, **fields))
    theirs = [m for m in pf.base_model.internal_xlora_classifier.layers if isinstance(m, nn.Linear)]
    ours = [*lk.xlora_classifier.inner, lk.xlora_classifier.last]
    assert len(theirs) == len(ours)
    torch.manual_seed(7)
    with torch.no_grad():
        for their, our in zip(theirs, ours, strict=True):
            nn.init.normal_(their.weight, std=0.5)
            nn.init.normal_(their.bias, std=0.5)
            our.weight.copy_(their.weight)
            our.bias.copy_(their.bias)
    return lk, pf


def _close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


@pytest.mark.parametrize("fields", CONFIGS.values(), ids=CONFIGS.keys())
def test_logits_equal_peft(experts: tuple[nn.Module, dict[str, str]], fields: dict) -> None:
    base, directories = experts
    lk, pf = build_pair(base, directories, fields)
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = lk(input_ids=ids).logits, pf(input_ids=ids).logits
        base_logits = base(input_ids=ids).logits
    _close(ours, theirs)
    assert (ours - base_logits).abs().max() > 100 * (ours - theirs).abs().max()  # the experts do count
    scalings = lorakit.latest_scalings(lk)
    n_layers = sum(1 for _ in lorakit.lora_layers(lk))
    assert scalings.shape == (2, 9, n_layers, 3)
    _close(scalings, pf.base_model.get_latest_scalings())


def test_generation_with_the_cache_equals_without(experts: tuple[nn.Module, dict[str, str]]) -> None:
    base, directories = experts
    lk, _ = build_pair(base, directories, {"layerwise_scalings": True, "top_k_lora": 2})
    ids = torch.randint(3, 64, (2, 5), generator=torch.Generator().manual_seed(1))
    kwargs = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        cached = lk.generate(ids, use_cache=True, **kwargs)
        uncached = lk.generate(ids, use_cache=False, **kwargs)
        again = lk.generate(ids, use_cache=True, **kwargs)  # a new sequence resets the scaling pass's cache
        with lorakit.disable_adapters(lk):
            plain = lk.generate(ids, use_cache=True, **kwargs)
    assert torch.equal(cached, uncached) and torch.equal(cached, again)
    assert not torch.equal(cached, plain)


def test_training_trains_the_classifier_only_and_flips_nothing(experts: tuple[nn.Module, dict[str, str]]) -> None:
    base, directories = experts
    lk = lorakit.get_xlora_model(copy.deepcopy(base), XLoraConfig(adapters=directories, xlora_depth=2, xlora_size=16))
    lk.train()
    trainable = {name for name, p in lk.named_parameters() if p.requires_grad}
    assert trainable and all(name.startswith("xlora_classifier.") for name in trainable)
    before = {name: p.detach().clone() for name, p in lk.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in lk.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(2))
    for _ in range(2):
        lk(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    changed = {name for name, p in lk.named_parameters() if not torch.equal(p, before[name])}
    assert changed == trainable
    assert all(m.training for m in lk.modules())  # still in training mode, as the user left it
    assert {name for name, p in lk.named_parameters() if p.requires_grad} == trainable
    lk.eval()
    with torch.no_grad():
        lk.generate(ids[:, :3], max_new_tokens=2, do_sample=False, pad_token_id=0)
    assert not any(m.training for m in lk.modules())
    assert {name for name, p in lk.named_parameters() if p.requires_grad} == trainable


def test_trainable_experts(experts: tuple[nn.Module, dict[str, str]]) -> None:
    base, directories = experts
    lk = lorakit.get_xlora_model(copy.deepcopy(base), XLoraConfig(adapters=directories, use_trainable_adapters=True))
    expert_params = {name: p for name, p in lk.named_parameters() if ".lora_" in name}
    assert expert_params and all(p.requires_grad for p in expert_params.values())
    before = {name: p.detach().clone() for name, p in expert_params.items()}
    optimizer = torch.optim.SGD([p for p in lk.parameters() if p.requires_grad], lr=1e-1)
    ids = torch.randint(0, 64, (2, 9))
    for _ in range(2):  # the second step sees the first step's expert weights
        lk(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert all(not torch.equal(p, before[name]) for name, p in expert_params.items())


def test_disable_adapters_disables_the_experts(experts: tuple[nn.Module, dict[str, str]]) -> None:
    base, directories = experts
    lk = lorakit.get_xlora_model(copy.deepcopy(base), XLoraConfig(adapters=directories))
    ids = torch.randint(0, 64, (1, 6))
    with torch.no_grad(), lorakit.disable_adapters(lk):
        torch.testing.assert_close(lk(input_ids=ids).logits, base(input_ids=ids).logits, rtol=0, atol=0)


def test_experts_keep_their_names_and_errors(experts: tuple[nn.Module, dict[str, str]]) -> None:
    base, directories = experts
    named = {"code": directories["0"], "math": directories["1"]}
    lk = lorakit.get_xlora_model(copy.deepcopy(base), XLoraConfig(adapters=named))
    assert lorakit.adapter_names(lk) == ["code", "math"] and lorakit.active_adapters(lk) == ["code", "math"]
    with pytest.raises(lorakit.MergeError, match="runs a mixed batch or X-LoRA"):
        lorakit.merge(lk)
    with pytest.raises(lorakit.AdapterError, match="runs a mixed batch or X-LoRA"):
        lorakit.delete_adapter(lk, "code")  # its stacked weights would go stale
    lorakit.remove_xlora(lk)
    lorakit.delete_adapter(lk, "code")
    assert lorakit.adapter_names(lk) == ["math"] and not hasattr(lk, "xlora_classifier")
    lk = lorakit.get_xlora_model(copy.deepcopy(base), XLoraConfig(adapters=named))
    with pytest.raises(LoraError, match="already an X-LoRA model"):
        lorakit.get_xlora_model(lk, XLoraConfig(adapters=named))
    with pytest.raises(LoraConfigError, match="top_k_lora=3 is more than the 2 experts"):
        lorakit.get_xlora_model(copy.deepcopy(base), XLoraConfig(adapters=named, top_k_lora=3))
    with pytest.raises(LoraConfigError, match="at least one expert"):
        lorakit.get_xlora_model(copy.deepcopy(base), XLoraConfig())
    for bad, message in [
        ({"xlora_depth": 0}, "xlora_depth must be a positive integer"),
        ({"softmax_temperature": 0.0}, "softmax_temperature must be > 0"),
        ({"enable_softmax_topk": True}, "needs top_k_lora"),
        ({"xlora_dropout_p": 1.0}, r"xlora_dropout_p must be in \[0, 1\)"),
    ]:
        with pytest.raises(LoraConfigError, match=message):
            XLoraConfig(**bad)


def test_a_foreign_cache_is_refused(experts: tuple[nn.Module, dict[str, str]], tmp_path: Path) -> None:
    base, directories = experts
    lk = lorakit.get_xlora_model(copy.deepcopy(base), XLoraConfig(adapters=directories))
    ids = torch.randint(0, 64, (1, 4))
    with torch.no_grad():
        output = base(input_ids=ids, use_cache=True)  # a cache filled by another model
        prefix = getattr(output, "cache", None) or output.past_key_values
        with pytest.raises(LoraError, match="has not followed"):
            lk(input_ids=ids[:, -1:], past_key_values=prefix, use_cache=True)


# ----- on disk ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["xlora", "peft"])
def test_save_and_load_round_trip(experts: tuple[nn.Module, dict[str, str]], tmp_path: Path, layout: str) -> None:
    base, directories = experts
    fields = {"layerwise_scalings": True, "xlora_depth": 2, "xlora_size": 16, "top_k_lora": 2}
    lk, _ = build_pair(base, directories, fields)
    lorakit.save_xlora(lk, tmp_path / "saved", layout=layout)
    loaded = lorakit.load_xlora(copy.deepcopy(base), tmp_path / "saved")
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, lk(input_ids=ids).logits, rtol=0, atol=0)
    assert lorakit.adapter_names(loaded) == ["0", "1", "2"]


def test_peft_loads_lorakits_peft_layout(experts: tuple[nn.Module, dict[str, str]], tmp_path: Path) -> None:
    base, directories = experts
    lk, _ = build_pair(base, directories, {"xlora_depth": 2, "xlora_size": 16})
    saved = lorakit.save_xlora(lk, tmp_path / "saved", layout="peft")
    plain = copy.deepcopy(base)
    plain.config.use_cache = False
    pf = peft.PeftModel.from_pretrained(plain, saved).eval()
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        _close(lk(input_ids=ids).logits, pf(input_ids=ids).logits)


def test_peft_saved_xlora_has_no_classifier_and_is_refused(
    experts: tuple[nn.Module, dict[str, str]], tmp_path: Path
) -> None:
    """peft 0.21 saves an X-LoRA model without its classifier (an empty weights file): loading it would silently
    give a random classifier, so lorakit refuses it, saying why."""
    base, directories = experts
    _, pf = build_pair(base, directories, {"layerwise_scalings": True})
    pf.save_pretrained(tmp_path / "peft")
    model = copy.deepcopy(base)
    with pytest.raises(LoraError, match="drops the X-LoRA classifier"):
        lorakit.load_xlora(model, tmp_path / "peft", adapters=directories)
    assert not lorakit.is_lora_model(model)


def test_bad_classifier_file_leaves_the_model_plain(experts: tuple[nn.Module, dict[str, str]], tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    base, directories = experts
    lk, _ = build_pair(base, directories, {})
    saved = lorakit.save_xlora(lk, tmp_path / "saved")
    tensors = load_file(saved / "xlora_classifier.safetensors")
    tensors["last.weight"] = tensors["last.weight"][:, :-1].contiguous()
    save_file(tensors, saved / "xlora_classifier.safetensors")
    model = copy.deepcopy(base)
    with pytest.raises(LoraError, match=r"'last.weight' has shape \[3, 31\], the model expects \[3, 32\]"):
        lorakit.load_xlora(model, saved)
    assert not lorakit.is_lora_model(model) and not hasattr(model, "xlora_classifier")
    (saved / "xlora_config.json").write_text('{"adapters": {"../up": "x"}}')
    with pytest.raises(LoraError, match="cannot be a directory name"):
        lorakit.load_xlora(model, saved)


def test_it_learns_to_route() -> None:
    """examples/xlora_routing.py (quick): two experts trained on two tasks; the trained classifier sends each
    task's tokens mostly to that task's expert, and the mixture beats either expert alone on the mixed task."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "examples" / "xlora_routing.py"
    spec = importlib.util.spec_from_file_location("xlora_routing", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    result = example.run(quick=True)
    up, down = result["routing"]["up"], result["routing"]["down"]
    assert up[0] > 0.6 and down[1] > 0.6, result["routing"]
    losses = result["losses"]
    assert losses["X-LoRA"] < losses["expert 'up' alone"] and losses["X-LoRA"] < losses["expert 'down' alone"], losses
