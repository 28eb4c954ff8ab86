"""mistral.rs as a real consumer: an adapter trained and saved by lorakit gives the same greedy tokens there.

A tiny Llama (saved with `save_pretrained`) and a ByteLevel BPE tokenizer built with `tokenizers` are
served by mistral.rs 0.9.5 on the CPU, with and without a LoRA adapter trained a few steps with lorakit
and written by `lorakit.save_adapter`. Token ids come back through chat requests with logprobs.

What mistral.rs 0.9.5 needs, found by probing it:
- `rope_theta` at the top level of config.json (transformers 5 writes it inside `rope_parameters`);
- a tokenizer decoder it knows (ByteLevel) and a `chat_template`: ids only come back from chat requests,
  and a plain-string prompt goes through the template, so the template is the identity;
- `MISTRALRS_CPU_KV_F32=1`, else its CPU KV cache is float16 even for a float32 model.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import lorakit

mistralrs = pytest.importorskip("mistralrs")

VOCAB = 320
PROMPT = "the quick brown fox jumps over the lazy dog"
NEW_TOKENS = 12
CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "low rank adaptation freezes the base weights and trains two small matrices",
    "a merged adapter costs nothing at inference time",
    "mistral rs is a rust inference engine built on candle",
    "pack my box with five dozen liquor jugs",
    "sphinx of black quartz judge my vow",
] * 4


def build_tokenizer(directory: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )  # fmt: skip
    tokenizer.train_from_iterator(CORPUS, trainer)
    assert tokenizer.get_vocab_size() == VOCAB
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "add_bos_token": False, "add_eos_token": False, "model_max_length": 256,
        "chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}",
    }))  # fmt: skip
    return tokenizer


def build_base(directory: Path) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False, bos_token_id=0,
        eos_token_id=1, rms_norm_eps=1e-5,
        initializer_range=0.2,  # clear margins between the top logits, so greedy choices are stable
    )  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    save_for_mistralrs(model, directory)
    return model


def save_for_mistralrs(model: LlamaForCausalLM, directory: Path) -> None:
    """`save_pretrained`, with `rope_theta` also at the top level of config.json, where mistral.rs reads it."""
    model.save_pretrained(directory)
    config_path = directory / "config.json"
    saved = json.loads(config_path.read_text())
    saved["rope_theta"] = (saved.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    config_path.write_text(json.dumps(saved))


def train_a_few_steps(model: torch.nn.Module, tokenizer) -> None:
    """Five AdamW steps of the model's trainable parameters on the corpus; the model is left in eval mode."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    batch = torch.tensor([tokenizer.encode(text).ids[:8] for text in CORPUS[:6]])
    model.train()
    for _ in range(5):
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def greedy(model: torch.nn.Module, prompt_ids: list[int]) -> list[int]:
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=NEW_TOKENS, eos_token_id=None, pad_token_id=0)  # fmt: skip
    return out[0, len(prompt_ids) :].tolist()


def served_greedy(runner, adapter: str | None) -> list[int]:
    request = mistralrs.ChatCompletionRequest(
        messages=PROMPT, model="tiny", max_tokens=NEW_TOKENS, temperature=0.0, top_k=1, ignore_eos=True,
        logprobs=True, top_logprobs=1, adapter=adapter,
    )  # fmt: skip
    tokens = []
    for entry in runner.send_chat_completion_request(request).choices[0].logprobs.content:
        top = entry.top_logprobs[0]
        assert top.logprob == entry.logprob  # greedy: the chosen token is the top one, whose id we read
        tokens.append(top.token)
    return tokens


def lora_runner(base_dir: Path, name: str, adapter_dir: Path):
    """A mistral.rs runner of the float32 Llama in `base_dir` with the adapter in `adapter_dir` under `name`."""
    return mistralrs.Runner(
        which=mistralrs.Which.Lora(model_id=str(base_dir), adapters=[mistralrs.LoraAdapter(name, str(adapter_dir))],
                                   arch=mistralrs.Architecture.Llama, dtype=mistralrs.ModelDType.F32)
    )  # fmt: skip


def test_mistralrs_serves_a_lorakit_adapter(tmp_path, monkeypatch):
    monkeypatch.setenv("MISTRALRS_CPU_KV_F32", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    base_dir.mkdir()
    model = build_base(base_dir)
    tokenizer = build_tokenizer(base_dir)
    prompt_ids = tokenizer.encode(PROMPT).ids
    base_tokens = greedy(model, prompt_ids)

    config = lorakit.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                     "gate_proj", "up_proj", "down_proj"])  # fmt: skip
    lorakit.get_lora_model(model, config)
    train_a_few_steps(model, tokenizer)
    lora_tokens = greedy(model, prompt_ids)
    assert lora_tokens != base_tokens, "the trained adapter should change the greedy tokens"
    with lorakit.disable_adapters(model):
        assert greedy(model, prompt_ids) == base_tokens
    lorakit.save_adapter(model, adapter_dir)

    plain = mistralrs.Runner(
        which=mistralrs.Which.Plain(model_id=str(base_dir), arch=mistralrs.Architecture.Llama,
                                    dtype=mistralrs.ModelDType.F32)
    )  # fmt: skip
    assert plain.tokenize_text(PROMPT, add_special_tokens=True, enable_thinking=None) == prompt_ids
    assert served_greedy(plain, None) == base_tokens
    del plain

    served = lora_runner(base_dir, "trained", adapter_dir)
    assert served_greedy(served, "trained") == lora_tokens
    assert served_greedy(served, None) == base_tokens
    assert os.path.isfile(adapter_dir / "adapter_model.safetensors")


def test_mistralrs_serves_an_adapter_trained_on_a_4bit_base(tmp_path, monkeypatch):
    """QLoRA's usual path: train on the 4-bit base, ship the adapter with the dequantized base (the weights the
    adapter was trained against), and serve it there with the tokens lorakit gives."""
    bnb = pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    monkeypatch.setenv("MISTRALRS_CPU_KV_F32", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    float_dir, base_dir, adapter_dir = tmp_path / "float", tmp_path / "dequantized", tmp_path / "adapter"
    float_dir.mkdir()
    build_base(float_dir)
    tokenizer = build_tokenizer(float_dir)
    prompt_ids = tokenizer.encode(PROMPT).ids
    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    )
    model = AutoModelForCausalLM.from_pretrained(float_dir, quantization_config=quantization, device_map="cpu")
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    lorakit.get_lora_model(model, lorakit.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    train_a_few_steps(model, tokenizer)
    lorakit.save_adapter(model, adapter_dir)
    trained_tokens = greedy(model, prompt_ids)

    lorakit.dequantize(model)
    assert greedy(model, prompt_ids) == trained_tokens
    with lorakit.disable_adapters(model):
        base_tokens = greedy(model, prompt_ids)
    assert base_tokens != trained_tokens, "the trained adapter should change the greedy tokens"
    save_for_mistralrs(lorakit.unload(model), base_dir)
    build_tokenizer(base_dir)

    served = lora_runner(base_dir, "qlora", adapter_dir)
    assert served_greedy(served, "qlora") == trained_tokens
    assert served_greedy(served, None) == base_tokens


def test_mistralrs_serves_a_pissa_adapter_converted_to_lora_on_the_original_base(tmp_path, monkeypatch):
    """A PiSSA fine-tune trains on the residual base; saved with convert_to_lora=True it is a plain LoRA (rank 2r) of
    the original weights, which mistral.rs serves on the unchanged base with lorakit's greedy tokens."""
    monkeypatch.setenv("MISTRALRS_CPU_KV_F32", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    base_dir.mkdir()
    model = build_base(base_dir)  # the original weights, as mistral.rs will read them
    tokenizer = build_tokenizer(base_dir)
    prompt_ids = tokenizer.encode(PROMPT).ids
    base_tokens = greedy(model, prompt_ids)
    config = lorakit.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights="pissa")
    lorakit.get_lora_model(model, config)
    train_a_few_steps(model, tokenizer)
    trained_tokens = greedy(model, prompt_ids)
    assert trained_tokens != base_tokens, "the trained adapter should change the greedy tokens"
    lorakit.save_adapter(model, adapter_dir, convert_to_lora=True)
    assert lorakit.read_adapter_config(adapter_dir).r == 8

    served = lora_runner(base_dir, "pissa", adapter_dir)
    assert served_greedy(served, "pissa") == trained_tokens
    assert served_greedy(served, None) == base_tokens
    assert greedy(lorakit.unload(model), prompt_ids) == base_tokens  # the original weights again


def test_mistralrs_refuses_dora_adapters_and_serves_the_merged_model(tmp_path, monkeypatch):
    """mistral.rs 0.9.5 loads no DoRA adapter ("dynamic LoRA does not support DoRA adapters"); a DoRA fine-tune
    is served there merged: `merge_and_unload`, `save_pretrained`, and the plain model gives lorakit's tokens."""
    monkeypatch.setenv("MISTRALRS_CPU_KV_F32", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    base_dir, adapter_dir, merged_dir = tmp_path / "base", tmp_path / "adapter", tmp_path / "merged"
    base_dir.mkdir()
    model = build_base(base_dir)
    tokenizer = build_tokenizer(base_dir)
    prompt_ids = tokenizer.encode(PROMPT).ids
    base_tokens = greedy(model, prompt_ids)
    config = lorakit.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"], use_dora=True)
    lorakit.get_lora_model(model, config)
    train_a_few_steps(model, tokenizer)
    dora_tokens = greedy(model, prompt_ids)
    assert dora_tokens != base_tokens, "the trained adapter should change the greedy tokens"
    lorakit.save_adapter(model, adapter_dir)

    with pytest.raises(ValueError, match="dynamic LoRA does not support DoRA adapters"):
        lora_runner(base_dir, "d", adapter_dir)

    save_for_mistralrs(lorakit.merge_and_unload(model), merged_dir)
    build_tokenizer(merged_dir)
    assert greedy(model, prompt_ids) == dora_tokens
    served = mistralrs.Runner(
        which=mistralrs.Which.Plain(model_id=str(merged_dir), arch=mistralrs.Architecture.Llama,
                                    dtype=mistralrs.ModelDType.F32)
    )  # fmt: skip
    assert served_greedy(served, None) == dora_tokens
