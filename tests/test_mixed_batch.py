"""Mixed batches: each row of a batch runs its own adapter (`lorakit.mixed_batch`).

The oracle is the adapter alone: row i of a mixed forward must equal a forward of row i by itself with
`adapter_names[i]` active (or with adapters disabled for `"__base__"`), to float32 rounding, and greedy
generation must give each row the tokens it gets alone. Adapters are non-zero (`init_lora_weights=False`)
and differ in rank, alpha, scaling rule, bias and targets.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest
import torch
import transformers as tf
from test_families import FAMILIES, Family, build, fixed_batch, generate
from torch import nn

import lorakit
from lorakit import AdapterError, LoraConfig, LoraError, MergeError

BASE = "__base__"


@pytest.fixture(autouse=True, params=["stacked", "gathered"])
def linear_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run every test with both of LoraLinear's mixed-batch paths: all adapters stacked, or each row's own
    A and B gathered (chosen by the number of adapters; forced here)."""
    gathered = request.param == "gathered"
    monkeypatch.setattr(lorakit.LoraLinear, "use_gathered", staticmethod(lambda adapters, tokens: gathered))
    return request.param


def _close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    # Batched and single-row GEMMs may block the sums differently: float32 rounding, scaled to the output
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


def _alone(model: nn.Module, name: str, run: Callable[[], torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        if name == BASE:
            with lorakit.disable_adapters(model):
                return run()
        lorakit.set_active_adapters(model, name)
        return run()


def _rows(batch: dict[str, torch.Tensor], index: int) -> dict[str, torch.Tensor]:
    return {key: value[index : index + 1] for key, value in batch.items()}


def check_rows(model: nn.Module, batch: dict[str, torch.Tensor], names: Sequence[str], output: str) -> None:
    """Every row of a mixed forward equals that row alone with its adapter."""
    with torch.no_grad(), lorakit.mixed_batch(model, names):
        mixed = getattr(model(**batch), output)
    for row, name in enumerate(names):
        expected = _alone(model, name, lambda row=row: getattr(model(**_rows(batch, row)), output))
        _close(mixed[row : row + 1], expected)


def _tiny_llama(vocab: int = 64) -> nn.Module:
    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    return tf.LlamaForCausalLM(config).eval()


def _llama_with_three_adapters() -> nn.Module:
    model = _tiny_llama()
    lorakit.get_lora_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                             init_lora_weights=False), "a")  # fmt: skip
    targets = ["v_proj", "down_proj", "embed_tokens"]
    lorakit.add_adapter(model, "b", LoraConfig(r=8, lora_alpha=4, target_modules=targets, init_lora_weights=False))
    lorakit.add_adapter(model, "c", LoraConfig(r=2, lora_alpha=16, use_rslora=True, lora_bias=True,
                                               target_modules="all-linear", init_lora_weights=False))  # fmt: skip
    with torch.no_grad():  # lora_bias starts at zero: make it count
        for name, param in model.named_parameters():
            if name.endswith("lora_B.c.bias"):
                param.normal_()
    return model


MIXES = [
    ["a", BASE, "b", "c"],
    ["c", "c", "a", "a"],
    [BASE, BASE, BASE, "b"],
    ["b", "a", "c", BASE],
]


@pytest.mark.parametrize("names", MIXES, ids=["-".join(m) for m in MIXES])
def test_each_row_equals_its_adapter_alone(names: list[str]) -> None:
    model = _llama_with_three_adapters()
    ids = torch.randint(0, 64, (len(names), 9), generator=torch.Generator().manual_seed(0))
    check_rows(model, {"input_ids": ids}, names, "logits")


def test_generation_gives_each_row_its_own_tokens() -> None:
    model = _llama_with_three_adapters()
    names = ["a", BASE, "b", "c"]
    ids = torch.randint(3, 64, (len(names), 5), generator=torch.Generator().manual_seed(1))
    kwargs = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad(), lorakit.mixed_batch(model, names):
        mixed = model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
    alone = [
        _alone(model, name, lambda row=row: model.generate(ids[row : row + 1], **kwargs))
        for row, name in enumerate(names)
    ]
    assert [m.tolist() for m in mixed] == [a[0].tolist() for a in alone]
    assert len({tuple(a[0, 5:].tolist()) for a in alone}) == len(names)  # the adapters do change the tokens


class _ConvNet(nn.Module):
    """An Embedding, a padded Conv2d with a reflect padding mode, a Conv1d and a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 6, padding_idx=0)
        self.conv = nn.Conv2d(6, 8, 3, padding=1, padding_mode="reflect", bias=True)
        self.conv1 = nn.Conv1d(8, 8, 3, stride=2, dilation=2)
        self.head = nn.Linear(8, 5)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)  # (b, h, w, 6)
        x = self.conv(x.permute(0, 3, 1, 2)).relu()  # (b, 8, h, w)
        x = self.conv1(x.flatten(2))  # (b, 8, t)
        return self.head(x.mean(-1))


def test_embedding_and_conv_targets() -> None:
    torch.manual_seed(0)
    model = _ConvNet().eval()
    lorakit.get_lora_model(model, LoraConfig(r=4, target_modules=["embed", "conv", "head"], init_lora_weights=False,
                                             lora_bias=False), "a")  # fmt: skip
    lorakit.add_adapter(model, "b", LoraConfig(r=2, lora_alpha=3, target_modules=["conv", "conv1"],
                                               init_lora_weights=False, lora_bias=True))  # fmt: skip
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_B.b." in name and name.endswith("bias"):
                param.normal_()
    names = ["b", BASE, "a", "b", "a"]
    ids = torch.randint(0, 20, (len(names), 4, 5), generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), lorakit.mixed_batch(model, names):
        mixed = model(ids)
    for row, name in enumerate(names):
        _close(mixed[row : row + 1], _alone(model, name, lambda row=row: model(ids[row : row + 1])))
    assert not torch.allclose(mixed[0], mixed[1])  # adapter b changes row 0 against the base row 1


def test_modules_to_save_rows_use_their_copy() -> None:
    family = next(f for f in FAMILIES if f.name == "bert")
    model = build(family)
    config = LoraConfig(r=4, target_modules=["query", "value"], modules_to_save=["classifier"], init_lora_weights=False)
    lorakit.get_lora_model(model, config, "a")
    lorakit.add_adapter(model, "b", config.replace(r=2))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "modules_to_save" in name:
                param.normal_()
    batch = fixed_batch(family)
    batch = {k: torch.cat([v, v.flip(0)]) for k, v in batch.items() if k != "labels"}
    check_rows(model, batch, ["b", "a", BASE, "b"], "logits")


@pytest.mark.parametrize("family", FAMILIES, ids=[f.name for f in FAMILIES])
def test_families(family: Family) -> None:
    """Two adapters with the family's default targets and with all-linear, of different ranks, and the base."""
    model = build(family)
    lorakit.get_lora_model(model, LoraConfig(r=4, init_lora_weights=False), "a")
    lorakit.add_adapter(model, "b", LoraConfig(r=2, lora_alpha=5, target_modules="all-linear", init_lora_weights=False))
    batch = {k: torch.cat([v, v[:1]]) for k, v in fixed_batch(family).items()}  # 3 rows
    names = ["a", "b", BASE]
    check_rows(model, batch, names, "logits")
    if family.kind != "classify":  # causal, seq2seq (t5) and captioning (blip) generate
        with lorakit.mixed_batch(model, names):
            mixed = generate(model, family, batch)
        for row, name in enumerate(names):
            alone = _alone(model, name, lambda row=row: generate(model, family, _rows(batch, row)))
            # a row that stops early (at EOS) alone is padded in the batch while the others go on
            ours, own = mixed[row].tolist(), alone[0].tolist()
            assert ours[: len(own)] == own and set(ours[len(own) :]) <= {0}, (family.name, name, ours, own)


# ----- errors ---------------------------------------------------------------------------------------------


def test_errors_name_what_is_wrong() -> None:
    model = _llama_with_three_adapters()
    ids = torch.randint(0, 64, (2, 5))
    mismatch = r"model\.embed_tokens: the batch has 2 rows .* 3 adapter names"
    with pytest.raises(LoraError, match=mismatch), torch.no_grad(), lorakit.mixed_batch(model, ["a", "b", "c"]):
        model(ids)
    with pytest.raises(AdapterError, match="unknown adapter 'nope'"), lorakit.mixed_batch(model, ["a", "nope"]):
        pass
    with pytest.raises(LoraError, match="list of adapter names"), lorakit.mixed_batch(model, "a"):
        pass
    with pytest.raises(LoraError, match="at least one"), lorakit.mixed_batch(model, []):
        pass
    nested = pytest.raises(LoraError, match="already runs a mixed batch")
    with nested, lorakit.mixed_batch(model, ["a", "b"]), lorakit.mixed_batch(model, ["a", "b"]):
        pass
    with pytest.raises(LoraError, match="disabled"), lorakit.disable_adapters(model), lorakit.mixed_batch(model, ["a"]):
        pass
    model.train()
    with pytest.raises(LoraError, match="eval mode"), lorakit.mixed_batch(model, ["a", "b"]):
        pass
    model.eval()
    with pytest.raises(LoraError, match="eval mode"), lorakit.mixed_batch(model, ["a", "b"]):
        model.train()
        model(ids)
    model.eval()
    lorakit.set_active_adapters(model, "a")
    lorakit.merge(model)
    with pytest.raises(MergeError, match="merged adapters"), lorakit.mixed_batch(model, ["a", "b"]):
        pass
    lorakit.unmerge(model)
    # every failure above left the model as it was: an ordinary forward still runs adapter a
    before = _alone(model, "a", lambda: model(ids).logits)
    assert all(layer.adapter_stack is None for _, layer in lorakit.lora_layers(model))
    lorakit.set_active_adapters(model, "a")
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, before, rtol=0, atol=0)


def test_grouped_conv_is_refused() -> None:
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2)).eval()
    lorakit.get_lora_model(model, LoraConfig(r=2, target_modules=["0"]), "a")
    with pytest.raises(LoraError, match="groups=2"), lorakit.mixed_batch(model, ["a"]):
        pass
    assert model[0].adapter_stack is None


def test_model_is_unchanged_after_the_block() -> None:
    model = _llama_with_three_adapters()
    lorakit.set_active_adapters(model, "b")
    ids = torch.randint(0, 64, (2, 5))
    with torch.no_grad():
        before = model(ids).logits
        with lorakit.mixed_batch(model, ["a", "c"]):
            model(ids)
        after = model(ids).logits
    assert torch.equal(before, after)
    assert lorakit.active_adapters(model) == ["b"]
