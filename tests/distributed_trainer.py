"""transformers' `Trainer` (`LoraTrainer`) training a lorakit model with DDP, run by tests/test_distributed.py
under `torchrun --nproc_per_node 2` (gloo, the CPU):

    python -m torch.distributed.run --nproc_per_node 2 tests/distributed_trainer.py OUT_DIR [--resume CHECKPOINT]

Trainer calls `save_pretrained` on rank 0 alone; every checkpoint must hold the whole adapter, and a run resumed
from one must go on as the uninterrupted run did. Rank 0 writes the logged losses to OUT_DIR/losses.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torch.utils.data import Dataset
from transformers import TrainingArguments

import lorakit
from lorakit.integrations.transformers import LoraTrainer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from distributed_train import build_model, global_batches

STEPS, SAVE_EVERY, ROWS_PER_RANK = 6, 3, 2


class Runs(Dataset):
    """32 rows of consecutive token ids, which LoRA learns to predict."""

    def __init__(self) -> None:
        self.ids = global_batches(1, 32)[0]

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[index], "labels": self.ids[index]}


def main() -> None:
    out = Path(sys.argv[1])
    resume = sys.argv[3] if sys.argv[2:3] == ["--resume"] else None
    model = build_model(bf16_base=False)
    torch.manual_seed(1)
    lorakit.get_lora_model(model, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    args = TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=ROWS_PER_RANK, max_steps=STEPS, save_steps=SAVE_EVERY,
        learning_rate=2e-2, lr_scheduler_type="constant", logging_steps=1, report_to=[], use_cpu=True,
        ddp_backend="gloo", seed=0,
    )  # fmt: skip
    trainer = LoraTrainer(model=model, args=args, train_dataset=Runs())
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(str(out / "final"))
    if trainer.args.process_index == 0:
        losses = {entry["step"]: entry["loss"] for entry in trainer.state.log_history if "loss" in entry}
        (out / "losses.json").write_text(json.dumps({"world": trainer.args.world_size, "losses": losses}))


if __name__ == "__main__":
    main()
