"""X-LoRA saved with `save_xlora(..., layout="peft")` and loaded by `peft.PeftModel.from_pretrained`.

peft 0.21's XLoraModel runs only experts keyed "0", "1", … (it loads the i-th as adapter str(i), then activates
the config's keys) and needs `use_cache=False`; lorakit's experts keep their own names in the expert directories.
Models peft cannot serve are refused, saying why, and `layout="xlora"` saves them.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import peft
import pytest
import torch
import transformers as tf
from test_xlora import HIDDEN, _close, tiny_llama
from torch import nn

import lorakit
from lorakit import LoraConfig, LoraError, XLoraConfig

NAMES = ["sql", "chat", "math"]  # not in alphabetical order: the order must survive too
LLAMA_TARGETS = [["q_proj", "v_proj"], ["v_proj", "down_proj"], "all-linear"]


def save_experts(base: nn.Module, root: Path, targets: list) -> dict[str, str]:
    """Non-zero experts named NAMES (ranks 4, 8, 2 on `targets[i]`), saved under `root`."""
    directories = {}
    for i, (name, rank) in enumerate(zip(NAMES, [4, 8, 2], strict=True)):
        model = copy.deepcopy(base)
        torch.manual_seed(100 + i)
        config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets[i], init_lora_weights=False)
        lorakit.get_lora_model(model, config)
        directories[name] = str(lorakit.save_adapter(model, root / name))
    return directories


def xlora_model(base: nn.Module, directories: dict[str, str], **fields: object) -> nn.Module:
    """lorakit's X-LoRA model on a copy of `base`, with a random (non-trivial) classifier."""
    config = XLoraConfig(adapters=directories, xlora_dropout_p=0.0, **fields)
    model = lorakit.get_xlora_model(copy.deepcopy(base), config)
    torch.manual_seed(7)
    with torch.no_grad():
        for param in model.xlora_classifier.parameters():
            nn.init.normal_(param, std=0.5)
    return model


def load_in_peft(base: nn.Module, directory: Path) -> peft.PeftModel:
    plain = copy.deepcopy(base)
    plain.config.use_cache = False  # peft's XLoraModel refuses a model that caches
    return peft.PeftModel.from_pretrained(plain, directory).eval()


@pytest.mark.parametrize(
    "fields",
    [{}, {"layerwise_scalings": True, "xlora_depth": 2, "xlora_size": 16, "top_k_lora": 2}],
    ids=["defaults", "layerwise-depth2-topk"],
)
def test_peft_runs_named_experts_with_lorakits_logits(tmp_path: Path, fields: dict) -> None:
    base = tiny_llama()
    lk = xlora_model(base, save_experts(base, tmp_path / "experts", LLAMA_TARGETS), **fields)
    saved = lorakit.save_xlora(lk, tmp_path / "saved", layout="peft")
    pf = load_in_peft(base, saved)
    ids = torch.randint(1, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = lk(input_ids=ids).logits, pf(input_ids=ids, use_cache=False).logits
        plain = base(input_ids=ids).logits
    _close(ours, theirs)
    assert (ours - plain).abs().max() > 100 * (ours - theirs).abs().max()  # the experts do count
    _close(lorakit.latest_scalings(lk), pf.base_model.get_latest_scalings())
    kwargs = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        ours = lk.generate(ids, use_cache=True, **kwargs)
        theirs = pf.generate(input_ids=ids, use_cache=False, **kwargs)
    assert torch.equal(ours, theirs)


def test_load_xlora_keeps_the_names_and_takes_the_experts_from_inside(tmp_path: Path) -> None:
    base = tiny_llama()
    lk = xlora_model(base, save_experts(base, tmp_path / "experts", LLAMA_TARGETS), layerwise_scalings=True)
    saved = lorakit.save_xlora(lk, tmp_path / "saved", layout="peft")
    adapters = json.loads((saved / "adapter_config.json").read_text())["adapters"]
    assert adapters == {str(i): str(saved.resolve() / name) for i, name in enumerate(NAMES)}
    moved = Path(shutil.move(saved, tmp_path / "moved"))  # the paths in the config now lead nowhere
    ids = torch.randint(0, 64, (2, 7))

    def check_loads() -> None:
        loaded = lorakit.load_xlora(copy.deepcopy(base), moved)
        assert lorakit.adapter_names(loaded) == NAMES
        with torch.no_grad():
            torch.testing.assert_close(loaded(input_ids=ids).logits, lk(input_ids=ids).logits, rtol=0, atol=0)

    check_loads()
    config = json.loads((moved / "adapter_config.json").read_text())
    config["adapters"] = {name: f"/elsewhere/{name}" for name in NAMES}  # keyed by name, as lorakit wrote it before
    (moved / "adapter_config.json").write_text(json.dumps(config))
    check_loads()


def test_a_sequence_classifier_gets_seq_cls(tmp_path: Path) -> None:
    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=64, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, num_labels=3, pad_token_id=0)  # fmt: skip
    base = tf.LlamaForSequenceClassification(config).eval()
    targets = [*LLAMA_TARGETS[:2], ["q_proj", "o_proj", "gate_proj"]]  # not the head: peft loads no expert there
    lk = xlora_model(base, save_experts(base, tmp_path / "experts", targets))
    saved = lorakit.save_xlora(lk, tmp_path / "saved", layout="peft")
    assert json.loads((saved / "adapter_config.json").read_text())["task_type"] == "SEQ_CLS"
    pf = load_in_peft(base, saved)
    assert isinstance(pf, peft.PeftModelForSequenceClassification)
    ids = torch.randint(1, 64, (2, 9))
    with torch.no_grad():
        ours, theirs = lk(input_ids=ids).logits, pf(input_ids=ids, use_cache=False).logits
        plain = base(input_ids=ids).logits
    _close(ours, theirs)
    assert (ours - plain).abs().max() > 100 * (ours - theirs).abs().max()


def _bert_classifier() -> nn.Module:
    config = tf.BertConfig(vocab_size=64, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64, max_position_embeddings=64, num_labels=3)  # fmt: skip
    return tf.BertForSequenceClassification(config)


def _gpt2() -> nn.Module:
    return tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=64, n_embd=HIDDEN, n_layer=2, n_head=4, n_positions=64))


def _llama_token_classifier() -> nn.Module:
    config = tf.LlamaConfig(vocab_size=64, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, num_labels=3)  # fmt: skip
    return tf.LlamaForTokenClassification(config)


@pytest.mark.parametrize(
    ("build", "targets", "message"),
    [
        (_bert_classifier, ["query", "value"], "under the model's top-level 'model' attribute"),  # at `bert.…`
        (_gpt2, ["c_attn"], "under the model's top-level 'model' attribute"),  # causal, at `transformer.…`
        (_llama_token_classifier, ["q_proj", "v_proj"], "serves causal LMs and sequence classifiers"),
    ],
    ids=["bert-seq-cls", "gpt2", "llama-token-cls"],
)
def test_what_peft_cannot_serve_is_refused(tmp_path: Path, build, targets: list[str], message: str) -> None:
    torch.manual_seed(0)
    base = build().eval()
    lk = xlora_model(base, save_experts(base, tmp_path / "experts", [targets] * 3))
    with pytest.raises(LoraError, match=message) as refused:
        lorakit.save_xlora(lk, tmp_path / "peft", layout="peft")
    assert "layout='xlora'" in str(refused.value)
    assert not (tmp_path / "peft").exists()
    saved = lorakit.save_xlora(lk, tmp_path / "xlora", layout="xlora")  # what the message advises works
    loaded = lorakit.load_xlora(copy.deepcopy(base), saved)
    assert lorakit.adapter_names(loaded) == NAMES
    ids = torch.randint(1, 64, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, lk(input_ids=ids).logits, rtol=0, atol=0)
