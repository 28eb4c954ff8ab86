"""The path most users take: a transformers model, `save_pretrained`, `Trainer` checkpoints and resume.

A converted model's `save_pretrained` writes its adapters in peft's format (never base weights under the LoRA
layers' keys, which `from_pretrained` cannot read back), so a process with only transformers and peft loads the
directory with `AutoModelFor….from_pretrained` and gets lorakit's outputs; `Trainer` checkpoints are about the
adapter's size, and `LoraTrainer` resumes from them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import peft
import pytest
import torch
import transformers as tf
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

import lorakit
from lorakit.integrations.transformers import LoraTrainer

VOCAB = 64


def llama_config(**overrides) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, **overrides,
    )  # fmt: skip


@pytest.fixture(scope="module")
def causal_base(tmp_path_factory) -> Path:
    """A base model saved the usual way, so `config._name_or_path` names a directory transformers can load."""
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("llama-base")
    LlamaForCausalLM(llama_config()).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def classifier_base(tmp_path_factory) -> Path:
    torch.manual_seed(1)
    directory = tmp_path_factory.mktemp("llama-cls-base")
    LlamaForSequenceClassification(llama_config(num_labels=3)).save_pretrained(directory)
    return directory


def tokens(seed: int, rows: int = 2, length: int = 7) -> torch.Tensor:
    return torch.randint(1, VOCAB, (rows, length), generator=torch.Generator().manual_seed(seed))


def outputs(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def trained_like(model: torch.nn.Module, seed: int = 3) -> None:
    """Give every trainable tensor (adapters, saved copies) values away from their initialisation."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=generator) * 0.3)


def in_a_transformers_only_process(script: str, tmp_path: Path) -> torch.Tensor:
    """Run `script` (it defines `logits`) where lorakit is never imported; return `logits`."""
    out = tmp_path / "logits.pt"
    code = textwrap.dedent(script) + textwrap.dedent(f"""
        import sys
        assert "lorakit" not in sys.modules
        torch.save(logits, {str(out)!r})
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    return torch.load(out, weights_only=True)


# ----- save_pretrained ---------------------------------------------------------------------------------------


def test_save_pretrained_writes_the_adapter_and_no_base_weights(causal_base, tmp_path):
    model = LlamaForCausalLM.from_pretrained(causal_base)
    lorakit.get_lora_model(model, lorakit.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    model.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(causal_base)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert saved.keys() == lorakit.lora_state_dict(model).keys()
    assert not any("base_layer" in key for key in saved)


TRANSFORMERS_ALONE = {
    "causal": (
        "causal_base", LlamaForCausalLM, "AutoModelForCausalLM", {"target_modules": ["q_proj", "v_proj", "down_proj"]}
    ),
    "classifier-with-head": (
        "classifier_base", LlamaForSequenceClassification, "AutoModelForSequenceClassification",
        {"target_modules": ["q_proj", "v_proj"], "modules_to_save": ["score"], "task_type": "SEQ_CLS"},
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(TRANSFORMERS_ALONE))
def test_transformers_alone_loads_save_pretrained_output_with_lorakits_logits(case, request, tmp_path):
    base, model_class, auto_class, fields = TRANSFORMERS_ALONE[case]
    model = model_class.from_pretrained(request.getfixturevalue(base))
    lorakit.get_lora_model(model, lorakit.LoraConfig(r=4, **fields))
    trained_like(model)
    model.save_pretrained(tmp_path / "adapter")
    ids = tokens(0)
    expected = outputs(model, ids)
    loaded = in_a_transformers_only_process(
        f"""
        import torch
        from transformers import {auto_class}
        model = {auto_class}.from_pretrained({str(tmp_path / "adapter")!r}).eval()
        with torch.no_grad():
            logits = model(input_ids=torch.tensor({ids.tolist()})).logits
        """,
        tmp_path,
    )
    torch.testing.assert_close(loaded, expected, rtol=1e-5, atol=1e-6)
    with lorakit.disable_adapters(model):
        assert not torch.allclose(outputs(model, ids), expected, atol=1e-3)  # the adapter matters


def test_several_adapters_save_as_peft_saves_them(causal_base, tmp_path):
    model = LlamaForCausalLM.from_pretrained(causal_base)
    lorakit.get_lora_model(model, lorakit.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    lorakit.add_adapter(model, "other", lorakit.LoraConfig(r=8, lora_alpha=16, target_modules=["o_proj"]))
    trained_like(model)
    lorakit.set_active_adapters(model, ["default", "other"])
    trained_like(model, seed=4)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_config.json").is_file() and (tmp_path / "other" / "adapter_config.json").is_file()

    ids = tokens(2)
    in_peft = peft.PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(causal_base), tmp_path)
    in_peft.load_adapter(tmp_path / "other", adapter_name="other")
    for name in ("default", "other"):
        lorakit.set_active_adapters(model, name)
        in_peft.set_adapter(name)
        torch.testing.assert_close(outputs(in_peft, ids), outputs(model, ids), rtol=1e-5, atol=1e-6)

    selected = tmp_path / "selected"
    model.save_pretrained(selected, selected_adapters=["other"])
    assert sorted(os.listdir(selected)) == ["other"]


def test_a_merged_model_saves_its_adapter_and_reloads_right(causal_base, tmp_path):
    model = LlamaForCausalLM.from_pretrained(causal_base)
    lorakit.get_lora_model(model, lorakit.LoraConfig(r=4, target_modules="all-linear"))
    trained_like(model)
    ids = tokens(3)
    expected = outputs(model, ids)
    lorakit.merge(model)
    model.save_pretrained(tmp_path)
    assert "model.safetensors" not in os.listdir(tmp_path)
    reloaded = tf.AutoModelForCausalLM.from_pretrained(tmp_path)  # transformers' own peft integration
    torch.testing.assert_close(outputs(reloaded, ids), expected, rtol=1e-5, atol=1e-5)


def test_merge_and_unload_gives_back_a_plain_save_pretrained(causal_base, tmp_path):
    model = LlamaForCausalLM.from_pretrained(causal_base)
    lorakit.get_lora_model(model, lorakit.LoraConfig(r=4, target_modules="all-linear"))
    trained_like(model)
    ids = tokens(4)
    expected = outputs(model, ids)
    lorakit.merge_and_unload(model)
    model.save_pretrained(tmp_path)
    assert "model.safetensors" in os.listdir(tmp_path) and "adapter_config.json" not in os.listdir(tmp_path)
    torch.testing.assert_close(outputs(LlamaForCausalLM.from_pretrained(tmp_path), ids), expected)


def test_save_pretrained_refuses_push_to_hub(causal_base, tmp_path):
    model = lorakit.get_lora_model(
        LlamaForCausalLM.from_pretrained(causal_base), lorakit.LoraConfig(r=2, target_modules=["q_proj"])
    )
    with pytest.raises(lorakit.LoraError, match="push_to_hub"):
        model.save_pretrained(tmp_path, push_to_hub=True)
    assert not os.listdir(tmp_path)


# ----- Trainer -------------------------------------------------------------------------------------------------


class Rows(torch.utils.data.Dataset):
    def __init__(self, seed: int, count: int) -> None:
        ids = tokens(seed, rows=count, length=12)
        self.rows = [{"input_ids": row, "attention_mask": torch.ones_like(row), "labels": row} for row in ids]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.rows[index]


LORA = {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"], "lora_dropout": 0.1}


def training_args(output: Path, **overrides) -> tf.TrainingArguments:
    values = {
        "output_dir": str(output), "max_steps": 6, "per_device_train_batch_size": 2, "learning_rate": 5e-3,
        "lr_scheduler_type": "linear", "warmup_steps": 2, "report_to": [], "save_strategy": "steps", "save_steps": 3,
        "logging_steps": 1, "use_cpu": True, "disable_tqdm": True, "dataloader_num_workers": 0, "seed": 0,
    }  # fmt: skip
    return tf.TrainingArguments(**{**values, **overrides})


def losses(trainer: tf.Trainer) -> dict[int, float]:
    return {entry["step"]: entry["loss"] for entry in trainer.state.log_history if "loss" in entry}


def lorakit_trainer(causal_base: Path, output: Path, eval_dataset: Rows | None = None, **overrides) -> LoraTrainer:
    model = lorakit.get_lora_model(LlamaForCausalLM.from_pretrained(causal_base), lorakit.LoraConfig(**LORA))
    args = training_args(output, **overrides)
    return LoraTrainer(model=model, args=args, train_dataset=Rows(5, 24), eval_dataset=eval_dataset)


def directory_bytes(directory: Path) -> int:
    return sum(path.stat().st_size for path in directory.rglob("*") if path.is_file())


def test_trainer_checkpoints_hold_the_adapter_and_resume_like_an_uninterrupted_run(causal_base, tmp_path):
    whole = lorakit_trainer(causal_base, tmp_path / "whole")
    whole.train()
    checkpoint = tmp_path / "whole" / "checkpoint-3"
    assert (checkpoint / "adapter_model.safetensors").is_file()
    assert not list(checkpoint.glob("model*.safetensors"))

    resumed = lorakit_trainer(causal_base, tmp_path / "resumed")
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert sorted(losses(resumed)) == [1, 2, 3, 4, 5, 6]  # 1-3 from the checkpoint's trainer_state.json
    assert [losses(resumed)[step] for step in (4, 5, 6)] == [losses(whole)[step] for step in (4, 5, 6)]
    final_whole, final_resumed = (lorakit.lora_state_dict(t.model) for t in (whole, resumed))
    assert all(torch.equal(final_whole[key], final_resumed[key]) for key in final_whole)
    assert resumed.lr_scheduler.get_last_lr() == whole.lr_scheduler.get_last_lr()

    peft_model = peft.get_peft_model(LlamaForCausalLM.from_pretrained(causal_base), peft.LoraConfig(**LORA))
    peft_run = tf.Trainer(model=peft_model, args=training_args(tmp_path / "peft"), train_dataset=Rows(5, 24))
    peft_run.train()
    ours, theirs = directory_bytes(checkpoint), directory_bytes(tmp_path / "peft" / "checkpoint-3")
    assert abs(ours - theirs) <= 0.1 * theirs, (ours, theirs)


def test_trainer_load_best_model_at_end_restores_the_best_checkpoints_adapter(causal_base, tmp_path):
    trainer = lorakit_trainer(
        causal_base, tmp_path, Rows(9, 4), eval_strategy="steps", eval_steps=3, load_best_model_at_end=True,
        metric_for_best_model="loss",  # random tokens: the held-out loss is lowest at step 3, not at the end
    )  # fmt: skip
    trainer.train()
    best = Path(trainer.state.best_model_checkpoint)
    assert best.name == "checkpoint-3"
    saved = load_file(best / "adapter_model.safetensors")
    now = lorakit.lora_state_dict(trainer.model)
    assert saved.keys() == now.keys() and all(torch.equal(saved[key], now[key]) for key in saved)
    last = load_file(tmp_path / "checkpoint-6" / "adapter_model.safetensors")
    assert not all(torch.equal(last[key], now[key]) for key in last)


def test_trainer_save_model_writes_the_adapter(causal_base, tmp_path):
    trainer = lorakit_trainer(causal_base, tmp_path / "run", max_steps=1, save_strategy="no")
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    assert (tmp_path / "final" / "adapter_model.safetensors").is_file()
    assert not list((tmp_path / "final").glob("model*.safetensors"))
    reloaded = lorakit.load_adapter(LlamaForCausalLM.from_pretrained(causal_base), tmp_path / "final")
    ids = tokens(6)
    torch.testing.assert_close(outputs(reloaded, ids), outputs(trainer.model, ids))


def test_trainer_refuses_a_model_loaded_frozen_and_names_trainable_true(causal_base, tmp_path):
    trainer = lorakit_trainer(causal_base, tmp_path / "run", max_steps=1)
    trainer.save_model(str(tmp_path / "adapter"))
    frozen = lorakit.load_adapter(LlamaForCausalLM.from_pretrained(causal_base), tmp_path / "adapter")
    trainer = LoraTrainer(model=frozen, args=training_args(tmp_path / "again", max_steps=1), train_dataset=Rows(5, 4))
    with pytest.raises(lorakit.LoraError, match="trainable=True"):
        trainer.train()
