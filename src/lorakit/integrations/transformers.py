"""HuggingFace transformers' `Trainer` with a lorakit model: checkpoints hold the adapter, and resume.

`Trainer` trains and checkpoints a converted transformers model as it is: the model's `save_pretrained`
writes its adapters in peft's format, so `trainer.save_model()` and every `checkpoint-*` directory hold the
adapters (about their size), not the base weights. What plain `Trainer` cannot do is load such a checkpoint
back: it reloads adapter-only checkpoints for peft's `PeftModel` alone. `LoraTrainer` adds that:

    from lorakit.integrations.transformers import LoraTrainer
    trainer = LoraTrainer(model=lora_model, args=args, train_dataset=data)
    trainer.train(resume_from_checkpoint=True)       # adapter, optimizer, scheduler and RNG restored

For another `Trainer` subclass (trl's `SFTTrainer`, say) mix it in: `class MyTrainer(LoraTrainerMixin, SFTTrainer)`.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn
from transformers import Trainer
from transformers.trainer import TRAINING_ARGS_NAME

from ..distributed import sharded_parameters
from ..errors import LoraError
from ..hot_swap import load_pretrained_weights
from ..model import is_lora_model, lora_state, trainable_parameters


class LoraTrainerMixin:
    """Teaches a `Trainer` (sub)class to restore a lorakit model's adapters from its own checkpoints, for
    `train(resume_from_checkpoint=...)` and `load_best_model_at_end`, and to say what is wrong when a model
    with nothing to train is handed to it."""

    def train(self, *args: Any, **kwargs: Any) -> Any:
        model = self.model
        if is_lora_model(model) and trainable_parameters(model)[0] == 0:
            frozen = [name for name, trains in lora_state(model).trainable.items() if not trains]
            raise LoraError(
                f"nothing in the model requires grad, so there is nothing to train; adapters {frozen} are frozen. "
                "An adapter loaded with lorakit.load_adapter(model, path) is frozen by default: load it with "
                "trainable=True to train it."
            )
        return super().train(*args, **kwargs)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        model = self.model
        if not (is_lora_model(model) and sharded_parameters(model)):
            return super().save_model(output_dir, _internal_call)
        # FSDP2: every rank gathers the adapter's shards and rank 0 writes the whole adapter. Accelerate's own
        # path would first gather the whole model into rank 0's memory (FULL_STATE_DICT), or write no adapter at
        # all (SHARDED_STATE_DICT), and Trainer calls save_pretrained on rank 0 alone, which cannot gather.
        output_dir = self.args.output_dir if output_dir is None else output_dir
        model.save_pretrained(output_dir)
        if self.args.should_save:
            if self.processing_class is not None:
                self.processing_class.save_pretrained(output_dir)
            torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        model = self.model if model is None else model
        if not is_lora_model(model):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        load_pretrained_weights(model, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        if not is_lora_model(self.model):
            return super()._load_best_model()
        load_pretrained_weights(self.model, self.state.best_model_checkpoint)


class LoraTrainer(LoraTrainerMixin, Trainer):
    """transformers' `Trainer`, able to resume a lorakit model from its adapter-only checkpoints."""
