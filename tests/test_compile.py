"""LoRA layers trace under torch.compile without graph breaks (torch._dynamo.explain)."""

from __future__ import annotations

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
