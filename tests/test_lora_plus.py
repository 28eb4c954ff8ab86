"""LoRA+ parameter groups against peft 0.21's `create_loraplus_optimizer` on the same model."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import tiny_bert

import lorakit

peft = pytest.importorskip("peft")
from peft.optimizers import create_loraplus_optimizer  # noqa: E402

# LoRA on attention, the intermediate dense layers and the word embeddings; LayerNorm and classifier copies
# trained whole; every bias trained: each of peft's four groups gets parameters.
OPTIONS = dict(
    r=4, lora_alpha=8, target_modules=["query", "value", "intermediate.dense", "word_embeddings"], bias="all",
    modules_to_save=["classifier", "embeddings.LayerNorm"], lora_bias=False,
)  # fmt: skip


def test_groups_equal_peft_create_loraplus_optimizer():
    base = tiny_bert()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**OPTIONS))
    ours = lorakit.get_lora_model(base, lorakit.LoraConfig(**OPTIONS))
    optimizer = create_loraplus_optimizer(
        theirs, torch.optim.AdamW, lr=2e-4, loraplus_lr_ratio=8.0, loraplus_lr_embedding=1e-5,
        loraplus_weight_decay=0.1,
    )  # fmt: skip
    their_names = {id(p): n.removeprefix("base_model.model.") for n, p in theirs.named_parameters()}
    our_names = {id(p): n for n, p in ours.named_parameters()}
    groups = lorakit.lora_plus_param_groups(ours, lr=2e-4, lr_ratio=8.0, lr_embedding=1e-5, weight_decay=0.1)
    assert len(groups) == len(optimizer.param_groups) == 4
    for mine, peft_group in zip(groups, optimizer.param_groups, strict=True):
        assert (mine["lr"], mine["weight_decay"]) == (peft_group["lr"], peft_group["weight_decay"])
        assert [our_names[id(p)] for p in mine["params"]] == [their_names[id(p)] for p in peft_group["params"]]
        assert mine["params"], "every group has parameters in this model"
    trainable = sum(p.numel() for p in ours.parameters() if p.requires_grad)
    assert sum(p.numel() for group in groups for p in group["params"]) == trainable


def test_the_groups_train_with_any_optimizer():
    model = lorakit.get_lora_model(tiny_bert(), lorakit.LoraConfig(**OPTIONS))
    optimizer = torch.optim.SGD(lorakit.lora_plus_param_groups(model, lr=0.1))
    b = model.get_parameter("bert.encoder.layer.0.attention.self.query.lora_B.default.weight")
    ids = torch.randint(0, 64, (2, 8))
    model(input_ids=ids, labels=torch.tensor([0, 1])).loss.backward()
    grad = b.grad.clone()
    before = b.detach().clone()
    optimizer.step()
    torch.testing.assert_close(b.detach(), before - 0.1 * 16.0 * grad)  # B's learning rate is lr · lr_ratio


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(lr=0), "lr must be a positive number"),
        (dict(lr=1e-3, lr_ratio=-1), "lr_ratio must be a positive number"),
        (dict(lr=1e-3, lr_embedding=float("nan")), "lr_embedding must be a positive number"),
        (dict(lr=1e-3, weight_decay=-0.1), "weight_decay must be a non-negative number"),
    ],
)
def test_bad_arguments_are_lora_errors(kwargs, message):
    model = lorakit.get_lora_model(tiny_bert(), lorakit.LoraConfig(**OPTIONS))
    with pytest.raises(lorakit.LoraError, match=message):
        lorakit.lora_plus_param_groups(model, **kwargs)
    with pytest.raises(lorakit.LoraError, match="not a LoRA model"):
        lorakit.lora_plus_param_groups(tiny_bert(), lr=1e-3)
