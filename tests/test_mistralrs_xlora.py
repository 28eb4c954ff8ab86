"""mistral.rs serves lorakit's X-LoRA export (`lorakit.export_xlora_mistralrs`) with lorakit's greedy tokens.

Three non-zero experts on every projection of the tiny Llama of `test_mistralrs.py` and a random classifier
(large weights, so the routing matters), for classifier depth 1 and 2, layerwise or not, with top-k,
temperature and a global scaling weight. mistral.rs 0.9.5's X-LoRA Llama only takes one-token prompts (a
RoPE position bug, design §6), so generation starts from one token; lorakit generates with its KV caches.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from test_mistralrs import build_base, build_tokenizer
from torch import nn

import lorakit
from lorakit import LoraConfig, LoraError, XLoraConfig

mistralrs = pytest.importorskip("mistralrs")

PROMPT = "the"
NEW_TOKENS = 10
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CONFIGS = {
    "depth1": {},
    "depth1-layerwise-topk": {"layerwise_scalings": True, "top_k_lora": 2},
    "depth2-layerwise-temperature-global": {
        "xlora_depth": 2,
        "xlora_size": 64,
        "layerwise_scalings": True,
        "softmax_temperature": 0.5,
        "global_scaling_weight": 0.8,
    },
    "depth2-topk1": {"xlora_depth": 2, "xlora_size": 64, "top_k_lora": 1},
}


@pytest.fixture(scope="module")
def served_base(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, nn.Module, dict[str, Path], list[int]]:
    root = tmp_path_factory.mktemp("xlora_mistralrs")
    base_dir = root / "base"
    base_dir.mkdir()
    base = build_base(base_dir)
    prompt_ids = build_tokenizer(base_dir).encode(PROMPT).ids
    assert len(prompt_ids) == 1
    experts = {}
    for i, name in enumerate(["alpha", "beta", "gamma"]):
        model = copy.deepcopy(base)
        torch.manual_seed(10 + i)
        lorakit.get_lora_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=PROJECTIONS,
                                                 init_lora_weights=False))  # fmt: skip
        experts[name] = lorakit.save_adapter(model, root / name)
    return base_dir, base, experts, prompt_ids


def greedy(model: nn.Module, prompt_ids: list[int]) -> list[int]:
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, use_cache=True,
                             max_new_tokens=NEW_TOKENS, eos_token_id=None, pad_token_id=0)  # fmt: skip
    return out[0, len(prompt_ids) :].tolist()


def served_greedy(runner: object) -> list[int]:
    request = mistralrs.ChatCompletionRequest(
        messages=PROMPT, model="tiny", max_tokens=NEW_TOKENS, temperature=0.0, top_k=1, ignore_eos=True,
        logprobs=True, top_logprobs=1,
    )  # fmt: skip
    tokens = []
    for entry in runner.send_chat_completion_request(request).choices[0].logprobs.content:
        top = entry.top_logprobs[0]
        assert top.logprob == entry.logprob
        tokens.append(top.token)
    return tokens


@pytest.mark.parametrize("fields", CONFIGS.values(), ids=CONFIGS.keys())
def test_mistralrs_serves_lorakits_xlora(served_base, fields: dict, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("MISTRALRS_CPU_KV_F32", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    base_dir, base, experts, prompt_ids = served_base
    model = lorakit.get_xlora_model(copy.deepcopy(base), XLoraConfig(adapters=experts, **fields)).eval()
    torch.manual_seed(3)
    with torch.no_grad():
        for param in model.xlora_classifier.parameters():
            nn.init.normal_(param, std=0.5)
    tokens = greedy(model, prompt_ids)
    with lorakit.disable_adapters(model):
        assert greedy(model, prompt_ids) != tokens, "the experts should change the greedy tokens"
    order = lorakit.export_xlora_mistralrs(model, tmp_path / "export", base_model_id=str(base_dir))
    runner = mistralrs.Runner(
        which=mistralrs.Which.XLora(xlora_model_id=str(tmp_path / "export"), order=str(order), model_id=str(base_dir),
                                    arch=mistralrs.Architecture.Llama, dtype=mistralrs.ModelDType.F32)
    )  # fmt: skip
    assert served_greedy(runner) == tokens


def test_export_refuses_what_mistralrs_cannot_serve(served_base, tmp_path: Path) -> None:
    base_dir, base, experts, _ = served_base
    cases = [
        ({"top_k_lora": 2, "enable_softmax_topk": True}, experts, "refuses enable_softmax_topk"),
        ({"xlora_depth": 2, "xlora_size": 16}, experts, "needs xlora_size == hidden_size"),
        ({}, {"a": experts["alpha"], "ab": experts["beta"]}, "'a' is part of"),
    ]
    for fields, adapters, message in cases:
        model = lorakit.get_xlora_model(copy.deepcopy(base), XLoraConfig(adapters=adapters, **fields))
        with pytest.raises(LoraError, match=message):
            lorakit.export_xlora_mistralrs(model, tmp_path / "refused", base_model_id=str(base_dir))
    assert not (tmp_path / "refused").exists()
