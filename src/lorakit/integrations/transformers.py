"""HuggingFace transformers' `Trainer`: save the LoRA adapter (not the whole model) as training goes.

    from lorakit.integrations.transformers import SaveAdapterCallback
    trainer = Trainer(model=lora_model, args=args, train_dataset=data, callbacks=[SaveAdapterCallback()])

`Trainer` trains a lorakit model as it is (only the adapter parameters require gradients). The callback
writes the adapter in peft's format into each checkpoint directory (`<output_dir>/checkpoint-<step>`) and,
at the end of training, into `output_dir` (or the directory given).
"""

from __future__ import annotations

import os

from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from ..peft_format import save_adapter


class SaveAdapterCallback(TrainerCallback):
    """Save adapter `adapter_name` with every checkpoint and when training ends."""

    def __init__(self, output_dir: str | os.PathLike | None = None, adapter_name: str = "default") -> None:
        self.output_dir = output_dir
        self.adapter_name = adapter_name

    def on_save(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model: nn.Module | None = None,
        **kwargs: object,
    ) -> None:  # fmt: skip
        if model is not None and state.is_world_process_zero:
            save_adapter(model, os.path.join(args.output_dir, f"checkpoint-{state.global_step}"), self.adapter_name)

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model: nn.Module | None = None,
        **kwargs: object,
    ) -> None:  # fmt: skip
        if model is not None and state.is_world_process_zero:
            save_adapter(model, self.output_dir or args.output_dir, self.adapter_name)
