"""The eleven families candle-lora promised, on transformers' own classes with the heads users fine-tune.

Each family is built offline from a tiny config with random weights and converted twice: with its default
targets (`target_modules=None`, from `lorakit.DEFAULT_TARGET_MODULES`) and with `"all-linear"`. On each:
three AdamW steps lower the loss on a fixed batch; the base weights stay bit-identical; merged outputs equal
unmerged ones; `unmerge` restores every base weight bit for bit; `save_adapter` → a fresh copy of the base →
`load_adapter` gives identical outputs; `merge_and_unload` gives a plain transformers model whose
`save_pretrained`/`from_pretrained` round trip gives the same outputs; and `generate()` gives the same tokens
merged and unmerged. Then: a bfloat16 case, transformers' `Trainer`, and tied
weights (an output projection sharing the word embeddings' weight).

The models run in eval mode throughout (dropout off, BatchNorm statistics frozen), so the fixed-batch loss
is a deterministic function of the adapter weights.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import transformers as tf
from torch import nn

import lorakit
from lorakit import LoraConfig, MergeError

VOCAB = 64
LR = 2e-2
STEPS = 3


# ----- the families ---------------------------------------------------------------------------------------


def _llama(tie: bool = False) -> nn.Module:
    return tf.LlamaForCausalLM(
        tf.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                       tie_word_embeddings=tie)
    )  # fmt: skip


def _mistral() -> nn.Module:
    return tf.MistralForCausalLM(
        tf.MistralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    )  # fmt: skip


def _falcon() -> nn.Module:
    return tf.FalconForCausalLM(tf.FalconConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                                num_attention_heads=4, bos_token_id=1, eos_token_id=2))  # fmt: skip


def _bert() -> nn.Module:
    return tf.BertForSequenceClassification(
        tf.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=64, max_position_embeddings=64, num_labels=3)
    )  # fmt: skip


def _stablelm() -> nn.Module:
    return tf.StableLmForCausalLM(
        tf.StableLmConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                          bos_token_id=1, eos_token_id=2)
    )  # fmt: skip


def _t5() -> nn.Module:  # T5 ties lm_head to the shared embedding by default
    return tf.T5ForConditionalGeneration(
        tf.T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
                    num_heads=4, decoder_start_token_id=0)
    )  # fmt: skip


def _dinov2() -> nn.Module:
    return tf.Dinov2ForImageClassification(
        tf.Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2, image_size=16,
                        patch_size=8, num_labels=3)
    )  # fmt: skip


def _resnet() -> nn.Module:
    return tf.ResNetForImageClassification(
        tf.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", num_labels=3)
    )


def _mpt() -> nn.Module:
    return tf.MptForCausalLM(tf.MptConfig(vocab_size=VOCAB, d_model=32, n_heads=4, n_layers=2, max_seq_len=64))


def _blip() -> nn.Module:
    text = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        encoder_hidden_size=32,
        bos_token_id=1,
        sep_token_id=2,
        pad_token_id=0,
    )
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=16,
                  patch_size=8)  # fmt: skip
    return tf.BlipForConditionalGeneration(tf.BlipConfig(text_config=text, vision_config=vision, projection_dim=32))


def _starcoder() -> nn.Module:
    return tf.GPTBigCodeForCausalLM(tf.GPTBigCodeConfig(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4,
                                                        n_positions=64, bos_token_id=1, eos_token_id=2))  # fmt: skip


def _tokens(generator: torch.Generator, length: int = 8) -> torch.Tensor:
    return torch.randint(3, VOCAB, (2, length), generator=generator)


def _causal_batch(generator: torch.Generator) -> dict[str, torch.Tensor]:
    ids = _tokens(generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def _seq2seq_batch(generator: torch.Generator) -> dict[str, torch.Tensor]:
    ids = _tokens(generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": _tokens(generator, 5)}


def _classify_batch(generator: torch.Generator) -> dict[str, torch.Tensor]:
    ids = _tokens(generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor([0, 2])}


def _image_batch(size: int) -> Callable[[torch.Generator], dict[str, torch.Tensor]]:
    def batch(generator: torch.Generator) -> dict[str, torch.Tensor]:
        return {"pixel_values": torch.randn(2, 3, size, size, generator=generator), "labels": torch.tensor([1, 2])}

    return batch


def _caption_batch(generator: torch.Generator) -> dict[str, torch.Tensor]:
    ids = _tokens(generator, 6)
    ids[:, 0] = 1  # BLIP's text decoder starts from its bos token
    pixels = torch.randn(2, 3, 16, 16, generator=generator)
    return {"pixel_values": pixels, "input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


@dataclass(frozen=True)
class Family:
    name: str
    model_type: str
    build: Callable[[], nn.Module]
    batch: Callable[[torch.Generator], dict[str, torch.Tensor]]
    kind: str  # "causal", "seq2seq", "classify" or "caption": which head and whether generate() applies
    default_leaves: frozenset[str]  # the module-name endings the family default must adapt
    all_linear_left_out: frozenset[str]  # Linear layers "all-linear" must leave alone (output embeddings, tied)


def _leaves(*names: str) -> frozenset[str]:
    return frozenset(names)


BLIP_TIED = "text_decoder.cls.predictions.decoder"  # its weight is the text decoder's word embeddings

FAMILIES = [
    Family("llama", "llama", _llama, _causal_batch, "causal", _leaves("q_proj", "v_proj"), _leaves("lm_head")),
    Family("mistral", "mistral", _mistral, _causal_batch, "causal", _leaves("q_proj", "v_proj"), _leaves("lm_head")),
    Family("falcon", "falcon", _falcon, _causal_batch, "causal", _leaves("query_key_value"), _leaves("lm_head")),
    Family("bert", "bert", _bert, _classify_batch, "classify", _leaves("query", "value"), _leaves()),
    Family("stablelm", "stablelm", _stablelm, _causal_batch, "causal", _leaves("q_proj", "v_proj"), _leaves("lm_head")),
    Family("t5", "t5", _t5, _seq2seq_batch, "seq2seq", _leaves("q", "v"), _leaves("lm_head")),
    Family("dinov2", "dinov2", _dinov2, _image_batch(16), "classify", _leaves("q_proj", "v_proj"), _leaves()),
    Family("resnet", "resnet", _resnet, _image_batch(32), "classify", _leaves("convolution"), _leaves()),
    Family("mpt", "mpt", _mpt, _causal_batch, "causal", _leaves("Wqkv"), _leaves("lm_head")),
    Family("blip", "blip", _blip, _caption_batch, "caption", _leaves("qkv", "query", "value"), _leaves(BLIP_TIED)),
    Family("starcoder", "gpt_bigcode", _starcoder, _causal_batch, "causal", _leaves("c_attn"), _leaves("lm_head")),
]
TIED_FAMILIES = {"falcon", "t5", "mpt", "blip", "starcoder"}  # their default configs tie the output embedding


# ----- helpers ------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """The models are tiny: one intra-op thread is as fast, and on a shared, busy machine it avoids OpenMP's
    spinning threads fighting other processes for the cores (measured: 230 s with two threads, 8 s with one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def build(family: Family, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return family.build().eval()


def fixed_batch(family: Family) -> dict[str, torch.Tensor]:
    return family.batch(torch.Generator().manual_seed(1234))


def logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


def bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().reshape(-1).view(torch.uint8)


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(bits(a), bits(b))


def base_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of a plain model, by its plain name: the objects LoRA layers keep wrapping."""
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


def changed(tensors: dict[str, torch.Tensor], snapshot: dict[str, torch.Tensor]) -> list[str]:
    return [name for name, tensor in tensors.items() if not bits_equal(tensor, snapshot[name])]


def linear_names(model: nn.Module) -> set[str]:
    return {name for name, module in model.named_modules() if isinstance(module, nn.Linear)}


def train(model: nn.Module, batch: dict[str, torch.Tensor], steps: int = STEPS) -> list[float]:
    """`steps` AdamW steps on the adapter parameters; the losses before each step and after the last."""
    params = [p for p in model.parameters() if p.requires_grad]
    assert params, "the LoRA model has nothing to train"
    optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    losses = []
    for _ in range(steps):
        loss = model(**batch).loss
        losses.append(loss.item())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():
        losses.append(model(**batch).loss.item())
    return losses


def fp32_tolerance(reference: torch.Tensor) -> dict[str, float]:
    """Merged vs unmerged in float32: `(W + ΔW)x` and `Wx + s·B(Ax)` round differently, by a few float32 ulps
    per layer (eps = 1.2e-7). Allow 1e-5 of the largest logit (~80 eps); the 22 cases measure at most 2.3e-7 of it."""
    return {"rtol": 0.0, "atol": 1e-5 * reference.abs().max().item()}


def generation_inputs(family: Family, batch: dict[str, torch.Tensor]) -> dict[str, object]:
    if family.kind == "caption":
        return {"pixel_values": batch["pixel_values"], "max_new_tokens": 6}
    return {
        "input_ids": batch["input_ids"],
        "attention_mask": batch["attention_mask"],
        "max_new_tokens": 6,
        "pad_token_id": 0,
    }


def generate(model: nn.Module, family: Family, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(**generation_inputs(family, batch), do_sample=False, num_beams=1)


# ----- the matrix ---------------------------------------------------------------------------------------


def test_defaults_table_covers_the_eleven_families() -> None:
    assert {f.model_type for f in FAMILIES} <= set(lorakit.DEFAULT_TARGET_MODULES)
    for family in FAMILIES:
        model = build(family)
        assert model.config.model_type == family.model_type
        leaves = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
        matched = [entry for entry in lorakit.DEFAULT_TARGET_MODULES[family.model_type] if entry in leaves]
        assert set(matched) == family.default_leaves, (family.name, matched)


@pytest.mark.parametrize("targets", [None, "all-linear"], ids=["default", "all-linear"])
@pytest.mark.parametrize("family", FAMILIES, ids=[f.name for f in FAMILIES])
def test_family(family: Family, targets: str | None, tmp_path: Path) -> None:
    base = build(family)
    batch = fixed_batch(family)
    base_logits = logits(base, batch)
    fresh = copy.deepcopy(base)  # the same base weights, never converted: load_adapter's target
    plain_linears = linear_names(base)
    originals = base_tensors(base)
    snapshot = {name: t.detach().clone() for name, t in originals.items()}
    base_types = {name: type(m) for name, m in base.named_modules()}
    base_keys = set(base.state_dict())

    model = lorakit.get_lora_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    assert model is base and type(model) is type(fresh)

    # --- which modules got adapters
    adapted = {name for name, _ in lorakit.lora_layers(model)}
    if targets is None:
        expected = {name for name in base_types if name.rsplit(".", 1)[-1] in family.default_leaves}
        saved_targets = lorakit.DEFAULT_TARGET_MODULES[family.model_type]
    else:
        expected = {n for n in plain_linears if not any(n == left or n.endswith("." + left)
                                                        for left in family.all_linear_left_out)}  # fmt: skip
        saved_targets = sorted(expected)
        assert not (adapted & {n for n in plain_linears if n.rsplit(".", 1)[-1] in family.all_linear_left_out})
    assert expected and adapted == expected, sorted(adapted ^ expected)
    if family.name == "resnet" and targets == "all-linear":
        # ResNet's only Linear is its classification head: "all-linear" means every Linear but the output
        # embedding, and an image classifier's head is not one, so the head (alone) gets the adapter.
        assert adapted == {"classifier.1"}
    for name in adapted:  # the wrapped module is the original one, untouched
        assert type(model.get_submodule(name).base_layer) is base_types[name]

    trainable, total = lorakit.trainable_parameters(model)
    assert 0 < trainable < total
    assert all(not t.requires_grad for t in originals.values())

    # --- three optimizer steps lower the loss; the base weights do not move
    losses = train(model, batch)
    assert losses[-1] < losses[0], losses
    assert changed(originals, snapshot) == []
    unmerged = logits(model, batch)
    with lorakit.disable_adapters(model):
        assert torch.equal(logits(model, batch), base_logits)
    tolerance = fp32_tolerance(unmerged)
    # the adapters are not zero: the comparisons below are not vacuous
    assert (unmerged - base_logits).abs().max().item() > 100 * tolerance["atol"]

    # --- merged == unmerged; unmerge restores every bit
    if family.kind in ("causal", "seq2seq", "caption"):
        tokens_unmerged = generate(model, family, batch)
        assert tokens_unmerged.shape[1] > (batch["input_ids"].shape[1] if family.kind == "causal" else 1)
    lorakit.merge(model)
    assert changed(originals, snapshot), "merge wrote no base weight"
    merged = logits(model, batch)
    torch.testing.assert_close(merged, unmerged, **tolerance)
    if family.kind in ("causal", "seq2seq", "caption"):
        tokens_merged = generate(model, family, batch)
        assert torch.equal(tokens_merged, tokens_unmerged), (tokens_merged, tokens_unmerged)
    lorakit.unmerge(model)
    assert changed(originals, snapshot) == []
    assert torch.equal(logits(model, batch), unmerged)

    # --- save_adapter -> a fresh model -> load_adapter: identical outputs
    adapter_dir = lorakit.save_adapter(model, tmp_path / "adapter")
    saved_config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert saved_config["target_modules"] == saved_targets
    lorakit.load_adapter(fresh, adapter_dir)
    assert {name for name, _ in lorakit.lora_layers(fresh)} == adapted
    assert torch.equal(logits(fresh, batch), unmerged)

    # --- merge_and_unload: a plain transformers model with the adapter baked in, and it round-trips
    plain = lorakit.merge_and_unload(model)
    assert plain is model and not lorakit.is_lora_model(plain)
    assert {name: type(m) for name, m in plain.named_modules()} == base_types
    assert set(plain.state_dict()) == base_keys
    baked = logits(plain, batch)
    torch.testing.assert_close(baked, unmerged, **tolerance)
    plain.save_pretrained(tmp_path / "merged")
    reloaded = type(plain).from_pretrained(tmp_path / "merged").eval()
    assert type(reloaded) is type(plain)
    reloaded_state, plain_state = reloaded.state_dict(), plain.state_dict()
    assert set(reloaded_state) == set(plain_state)
    assert [k for k in plain_state if not bits_equal(reloaded_state[k], plain_state[k])] == []
    assert torch.equal(logits(reloaded, batch), baked)
    if family.name in TIED_FAMILIES:  # the tie survives: nothing was merged into the shared weight
        holder = reloaded.text_decoder if family.name == "blip" else reloaded
        assert holder.get_output_embeddings().weight is holder.get_input_embeddings().weight


# ----- bfloat16 ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("targets", [None, "all-linear"], ids=["default", "all-linear"])
def test_llama_bfloat16(targets: str | None, tmp_path: Path) -> None:
    family = FAMILIES[0]
    base = build(family).to(torch.bfloat16)
    batch = fixed_batch(family)
    base_logits = logits(base, batch)
    fresh = copy.deepcopy(base)
    originals = base_tensors(base)
    snapshot = {name: t.detach().clone() for name, t in originals.items()}
    model = lorakit.get_lora_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=targets))

    losses = train(model, batch)
    assert losses[-1] < losses[0], losses
    assert changed(originals, snapshot) == []
    unmerged = logits(model, batch)
    assert unmerged.dtype == torch.bfloat16

    # Every bf16 operation rounds to within eps/2 (eps = 2**-7) of its value. Merged and unmerged round in
    # different places (W + ΔW once, against Wx and s·B(Ax) added per token), and those differences travel
    # through the blocks: allow 2·eps of the largest logit (measured: at most 0.9·eps over several seeds).
    eps = torch.finfo(torch.bfloat16).eps
    atol = 2 * eps * unmerged.abs().max().item()
    assert (unmerged.float() - base_logits.float()).abs().max().item() > 10 * atol  # the adapter matters
    lorakit.merge(model)
    assert changed(originals, snapshot)
    torch.testing.assert_close(logits(model, batch).float(), unmerged.float(), rtol=0.0, atol=atol)
    lorakit.unmerge(model)  # in bf16, (W + ΔW) - ΔW is not W: lorakit restores it anyway
    assert changed(originals, snapshot) == []
    assert torch.equal(logits(model, batch), unmerged)

    lorakit.load_adapter(fresh, lorakit.save_adapter(model, tmp_path / "adapter"))
    assert torch.equal(logits(fresh, batch), unmerged)


# ----- transformers' Trainer ------------------------------------------------------------------------------


class _Rows(torch.utils.data.Dataset):
    def __init__(self, rows: list[dict[str, torch.Tensor]]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.rows[index]


def test_trainer_trains_llama_lora_and_saves_the_adapter(tmp_path: Path) -> None:
    family = FAMILIES[0]
    base = build(family)
    fresh = copy.deepcopy(base)
    originals = base_tensors(base)
    snapshot = {name: t.detach().clone() for name, t in originals.items()}
    model = lorakit.get_lora_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    initial = {k: v.clone() for k, v in lorakit.lora_state_dict(model).items()}

    generator = torch.Generator().manual_seed(7)
    rows = []
    for _ in range(6):
        ids = torch.randint(3, VOCAB, (8,), generator=generator)
        rows.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})
    args = tf.TrainingArguments(
        output_dir=str(tmp_path / "run"), max_steps=3, per_device_train_batch_size=2, learning_rate=LR,
        lr_scheduler_type="constant", report_to=[], save_strategy="steps", save_steps=3, logging_steps=1,
        use_cpu=True, disable_tqdm=True, dataloader_num_workers=0, seed=0,
    )  # fmt: skip
    trainer = tf.Trainer(model=model, args=args, train_dataset=_Rows(rows))
    result = trainer.train()
    trainer.save_model()  # the model's save_pretrained: the adapter, in peft's format
    assert result.global_step == 3
    assert [entry["step"] for entry in trainer.state.log_history if "loss" in entry] == [1, 2, 3]

    trained = lorakit.lora_state_dict(model)
    assert all(not torch.equal(trained[k], initial[k]) for k in initial if ".lora_B." in k)  # B left zero
    assert changed(originals, snapshot) == []  # Trainer touched only the adapter

    run = tmp_path / "run"
    for directory in (run, run / "checkpoint-3"):  # save_model and the checkpoint
        assert (directory / "adapter_config.json").is_file() and (directory / "adapter_model.safetensors").is_file()
    model.eval()
    batch = fixed_batch(family)
    lorakit.load_adapter(fresh, run)
    trained_logits = logits(model, batch)
    assert torch.equal(logits(fresh, batch), trained_logits)
    with lorakit.disable_adapters(fresh):
        assert not torch.allclose(logits(fresh, batch), trained_logits)  # the saved adapter is the trained one


# ----- tied weights ---------------------------------------------------------------------------------------


def test_all_linear_leaves_out_a_tied_output_projection() -> None:
    model = _llama(tie=True).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    linears = linear_names(model)
    lorakit.get_lora_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    assert {name for name, _ in lorakit.lora_layers(model)} == linears - {"lm_head"}
    batch = fixed_batch(FAMILIES[0])
    unmerged = logits(model, batch)
    embedding = model.model.embed_tokens.weight.detach().clone()
    plain = lorakit.merge_and_unload(model)
    torch.testing.assert_close(logits(plain, batch), unmerged, **fp32_tolerance(unmerged))
    assert plain.lm_head.weight is plain.model.embed_tokens.weight  # still tied, and untouched
    assert bits_equal(plain.model.embed_tokens.weight, embedding)


def test_all_linear_leaves_out_a_tied_layer_that_is_not_the_output_embedding() -> None:
    """BLIP's captioning decoder projects onto a weight tied to its word embeddings, though the model's
    `get_output_embeddings()` does not report it: the tie itself keeps it out."""
    model = _blip().eval()
    decoder = model.text_decoder.cls.predictions.decoder
    assert model.get_output_embeddings() is None
    assert decoder.weight is model.text_decoder.bert.embeddings.word_embeddings.weight
    lorakit.get_lora_model(model, LoraConfig(r=4, target_modules="all-linear"))
    assert model.text_decoder.cls.predictions.decoder is decoder  # not wrapped


TIED_TARGETS = [  # (family, targets, the weight the error names, a module the error names as sharing it)
    ("llama", ["lm_head"], "lm_head.weight", "model.embed_tokens"),
    ("llama", ["embed_tokens"], "model.embed_tokens.weight", "lm_head"),
    ("llama", ["q_proj", "v_proj", "lm_head"], "lm_head.weight", "model.embed_tokens"),  # no q/v merge either
    ("t5", ["embed_tokens"], "encoder.embed_tokens.weight", "lm_head"),  # shared by both stacks and lm_head
    ("t5", ["q", "lm_head"], "lm_head.weight", "shared"),
]


@pytest.mark.parametrize(("family_name", "targets", "weight", "other"), TIED_TARGETS, ids=lambda v: str(v))
def test_merging_a_tied_weight_is_a_clear_error(family_name: str, targets: list[str], weight: str, other: str) -> None:
    family = next(f for f in FAMILIES if f.name == family_name)
    torch.manual_seed(0)
    model = (_llama(tie=True) if family_name == "llama" else family.build()).eval()
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    batch = fixed_batch(family)
    lorakit.get_lora_model(model, LoraConfig(r=4, target_modules=targets, init_lora_weights=False))
    tensors = dict(model.named_parameters())
    snapshot = {name: t.detach().clone() for name, t in tensors.items()}
    before = logits(model, batch)

    for operation in (lorakit.merge, lorakit.merge_and_unload):
        with pytest.raises(
            MergeError, match=rf"cannot merge into {re.escape(weight)}: .*shared with .*\b{re.escape(other)}\b.*tied"
        ):
            operation(model)
        assert lorakit.is_lora_model(model)
        assert changed(tensors, snapshot) == []  # checked before any weight is written: nothing half-merged
        assert all(not layer.merged_adapters for _, layer in lorakit.lora_layers(model))
        assert torch.equal(logits(model, batch), before)


def test_merging_an_untied_output_projection_works() -> None:
    model = _llama(tie=False).eval()
    lorakit.get_lora_model(model, LoraConfig(r=4, target_modules=["lm_head"], init_lora_weights=False))
    batch = fixed_batch(FAMILIES[0])
    unmerged = logits(model, batch)
    lorakit.merge(model)
    torch.testing.assert_close(logits(model, batch), unmerged, **fp32_tolerance(unmerged))
