"""LoRA layers under torch.compile: they trace without graph breaks (torch._dynamo.explain), and a compiled model
trains as the eager one does."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from torch import nn

import lorakit


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.lin = nn.Linear(8, 8)
        self.conv = nn.Conv1d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 2)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        hidden = self.lin(self.emb(ids))
        hidden = self.conv(hidden.transpose(1, 2)).transpose(1, 2)
        return self.head(hidden)


def test_no_graph_breaks_in_train_and_eval():
    model = Model()
    config = lorakit.LoraConfig(target_modules=["emb", "lin", "conv"], modules_to_save=["head"], lora_dropout=0.1)
    lorakit.get_lora_model(model, config)
    lorakit.add_adapter(model, "second", config.replace(lora_dropout=0.0))
    lorakit.set_active_adapters(model, ["default", "second"])
    ids = torch.randint(0, 10, (2, 5))
    for train in (True, False):
        model.train(train)
        torch._dynamo.reset()
        explanation = torch._dynamo.explain(model)(ids)
        assert explanation.graph_break_count == 0, explanation.break_reasons
        assert explanation.graph_count == 1


@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
@pytest.mark.parametrize(
    ("dtype", "rows"),
    [(torch.float32, 4), (torch.bfloat16, 4), (torch.bfloat16, 4096)],
    ids=["f32", "bf16-small", "bf16-large"],
)
def test_no_graph_breaks_on_the_single_adapter_linear_paths(dtype: torch.dtype, rows: int, grad: bool):
    """One adapter on a plain nn.Linear takes its own paths (base GEMM into the LoRA output in float32; without
    autograd, the branch added in place, and a small bfloat16 branch in float32): they trace whole too."""
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32)).to(dtype)
    lorakit.get_lora_model(model, lorakit.LoraConfig(r=4, target_modules=["0", "2"], init_lora_weights=False))
    x = torch.randn(rows, 64, dtype=dtype)
    torch._dynamo.reset()
    with torch.set_grad_enabled(grad):
        explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_compiled_llama_trains_like_eager():
    """A torch.compile'd lorakit Llama trains: its first loss is the eager model's, 3 AdamW steps lower the
    loss, every LoRA parameter moves and no base weight does."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    model = LlamaForCausalLM(config)
    lorakit.get_lora_model(model, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    lora = {name: p for name, p in model.named_parameters() if p.requires_grad}
    with torch.no_grad():
        for name, param in lora.items():
            if ".lora_B." in name:
                nn.init.normal_(param, std=0.02)  # a zero B would make the branch compute nothing
    assert lora and all(".lora_" in name for name in lora)
    lora_before = {name: p.detach().clone() for name, p in lora.items()}
    base_before = {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))

    eager_loss = model(input_ids=ids, labels=ids).loss.item()
    torch._dynamo.reset()
    compiled = torch.compile(model)
    optimizer = torch.optim.AdamW(list(lora.values()), lr=1e-2)
    losses = []
    for _ in range(3):
        loss = compiled(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())

    assert losses[0] == pytest.approx(eager_loss, rel=1e-5)
    assert losses[-1] < losses[0], losses
    for name, param in model.named_parameters():
        if name in lora:
            assert not torch.equal(param, lora_before[name]), f"{name} did not train"
        else:
            assert torch.equal(param, base_before[name]), f"base weight {name} changed"
