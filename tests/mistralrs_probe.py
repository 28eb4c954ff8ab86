"""Probe: mistral.rs 0.9.5 (CPU) vs transformers/peft greedy tokens on a tiny Llama + LoRA.

Scratch script; run with `.venv/bin/python tests/mistralrs_probe.py`. Fully offline: the model, the
tokenizer and the adapter are all built here, in a temporary directory.

What mistral.rs 0.9.5 needs (found by probing):
- config.json: `rope_theta` at the top level (transformers 5 writes it only inside `rope_parameters`).
- tokenizer.json with a decoder it knows (ByteLevel here). No post-processor, so no BOS is added and the
  prompt's ids are exactly the BPE ids on both sides.
- tokenizer_config.json with a `chat_template`: token ids only come back through
  `ChatCompletionRequest(logprobs=True, top_logprobs=1)` (CompletionRequest has no logprobs), and a chat
  request is refused ("Received messages for a model which does not have a chat template") without one,
  even when `messages` is a plain, pre-templated string. A string is not run through the template.
- env MISTRALRS_CPU_KV_F32=1 before the Runner starts: by default its CPU KV cache is f16 even for an
  f32 model, which perturbs logits.
- `ignore_eos=True` keeps it generating past EOS; transformers gets `eos_token_id=None` to match.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ["MISTRALRS_CPU_KV_F32"] = "1"  # must be set before mistral.rs builds its KV cache

import torch  # noqa: E402

VOCAB = 320
SEED = 0
PROMPT = "the quick brown fox jumps over the lazy dog"
N_NEW = 12
ALIAS = "probe"

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "low rank adaptation freezes the base weights and trains two small matrices",
    "a merged adapter costs nothing at inference time",
    "mistral rs is a rust inference engine built on candle",
    "pack my box with five dozen liquor jugs",
    "sphinx of black quartz judge my vow",
] * 4


def build_tokenizer(out: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    assert tok.get_vocab_size() == VOCAB, tok.get_vocab_size()
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": "<s>",
                "eos_token": "</s>",
                "add_bos_token": False,
                "add_eos_token": False,
                "model_max_length": 256,
                # Only needed so that mistral.rs accepts a chat request (the one kind that returns
                # logprobs, hence ids); a plain-string `messages` bypasses it.
                "chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}",
            },
            indent=2,
        )
    )
    return tok


def build_model(out: Path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(SEED)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=1,
        rms_norm_eps=1e-5,
        # std 0.02 gives near-uniform logits whose argmax flips on float noise; wider weights give
        # greedy choices with clear margins.
        initializer_range=0.2,
    )
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(out, safe_serialization=True)
    path = out / "config.json"
    raw = json.loads(path.read_text())
    raw["rope_theta"] = (raw.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    path.write_text(json.dumps(raw, indent=2))
    return model


def build_adapter(model, out: Path):
    import peft

    torch.manual_seed(SEED + 1)
    cfg = peft.LoraConfig(
        r=8,
        lora_alpha=16,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        init_lora_weights=False,
    )
    pm = peft.get_peft_model(model, cfg).eval()
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.mul_(0.5)
    pm.save_pretrained(out)
    return pm


def hf_greedy(model, prompt_ids: list[int]) -> tuple[list[int], list[float], float]:
    """Greedy ids, their logprobs and the smallest top1-top2 logit margin."""
    inp = torch.tensor([prompt_ids])
    with torch.no_grad():
        out = model.generate(
            input_ids=inp,
            attention_mask=torch.ones_like(inp),
            do_sample=False,
            max_new_tokens=N_NEW,
            min_new_tokens=0,
            eos_token_id=None,
            pad_token_id=0,
            output_logits=True,
            return_dict_in_generate=True,
        )
    ids = out.sequences[0, len(prompt_ids) :].tolist()
    logits = torch.cat(out.logits).float()
    lp = torch.log_softmax(logits, -1)
    top2 = logits.topk(2, -1).values
    margin = (top2[:, 0] - top2[:, 1]).min().item()
    return ids, [lp[i, t].item() for i, t in enumerate(ids)], margin


def mrs_greedy(runner, adapter: str | None) -> tuple[list[int], list[float], int]:
    import mistralrs as m

    req = m.ChatCompletionRequest(
        messages=PROMPT,  # a plain string: pre-templated, tokenized as is
        model="probe",
        max_tokens=N_NEW,
        temperature=0.0,
        top_k=1,
        ignore_eos=True,
        logprobs=True,
        top_logprobs=1,
        adapter=adapter,
    )
    res = runner.send_chat_completion_request(req)
    content = res.choices[0].logprobs.content
    ids, lps = [], []
    for c in content:
        top = c.top_logprobs[0]
        assert top.logprob == c.logprob, (top, c)  # greedy: the sampled token is the top-1 token
        ids.append(top.token)
        lps.append(c.logprob)
    return ids, lps, res.usage.prompt_tokens


def compare(label: str, hf, mrs) -> bool:
    hf_ids, hf_lp, margin = hf
    mrs_ids, mrs_lp, _ = mrs
    dlp = max(abs(a - b) for a, b in zip(hf_lp, mrs_lp)) if hf_ids == mrs_ids else float("nan")
    ok = hf_ids == mrs_ids
    print(f"[{label}] transformers: {hf_ids}")
    print(f"[{label}] mistral.rs:   {mrs_ids}")
    print(f"[{label}] equal={ok}  max|dlogprob|={dlp:.2e}  min top1-top2 logit margin={margin:.3f}")
    return ok


def main() -> int:
    import mistralrs as m

    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        base_dir, adapter_dir = Path(tmp) / "base", Path(tmp) / "adapter"
        base_dir.mkdir()
        model = build_model(base_dir)
        tok = build_tokenizer(base_dir)
        prompt_ids = tok.encode(PROMPT).ids

        hf_base = hf_greedy(model, prompt_ids)
        pm = build_adapter(model, adapter_dir)
        hf_lora_unmerged = hf_greedy(pm, prompt_ids)
        merged = pm.merge_and_unload()
        hf_lora = hf_greedy(merged, prompt_ids)
        assert hf_lora[0] == hf_lora_unmerged[0], "peft merged vs unmerged disagree"
        assert hf_lora[0] != hf_base[0], "adapter does not change the greedy tokens"
        t_build = time.time()

        ok = True
        # 1) Plain base model.
        runner = m.Runner(
            which=m.Which.Plain(model_id=str(base_dir), arch=m.Architecture.Llama, dtype=m.ModelDType.F32)
        )
        mrs_ids = runner.tokenize_text(PROMPT, add_special_tokens=True, enable_thinking=None)
        assert mrs_ids == prompt_ids, (mrs_ids, prompt_ids)
        plain = mrs_greedy(runner, None)
        assert plain[2] == len(prompt_ids), plain[2]
        ok &= compare("base, Which.Plain", hf_base, plain)
        del runner

        # 2) Base + LoRA adapter (peft format) in one runner; adapter=None is the base model.
        runner = m.Runner(
            which=m.Which.Lora(
                model_id=str(base_dir),
                adapters=[m.LoraAdapter(ALIAS, str(adapter_dir))],
                arch=m.Architecture.Llama,
                dtype=m.ModelDType.F32,
            )
        )
        print(runner.list_lora_adapters())
        ok &= compare("lora, Which.Lora adapter=alias", hf_lora, mrs_greedy(runner, ALIAS))
        ok &= compare("base, Which.Lora adapter=None", hf_base, mrs_greedy(runner, None))
        del runner

    print(f"build+transformers {t_build - t0:.1f}s, total {time.time() - t0:.1f}s")
    assert ok, "token mismatch"
    print("OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
