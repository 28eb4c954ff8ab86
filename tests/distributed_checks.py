"""Checks that need a process group, run by tests/test_distributed.py under `torchrun --nproc_per_node 2` (gloo):

    python -m torch.distributed.run --nproc_per_node 2 tests/distributed_checks.py OUT_DIR

Each rank writes what it saw to OUT_DIR/rank<r>.json. On an FSDP2-sharded lorakit model:
- a save that fails on rank 1 while building, or on rank 0 while writing, raises the same `LoraError` on every
  rank and leaves the previous adapter as it was;
- merging, unmerging a model merged before sharding, and adding an adapter after `fully_shard`, are refused
  with a `LoraError` that says what to do;
- `LoraTrainer.save_model` and transformers' `save_pretrained(is_main_process=...)`, called on every rank, write
  the whole adapter, as `save_adapter` does;
- a meta-device start from a checkpoint that lacks a tensor is refused on every rank, nothing materialized.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from transformers import TrainingArguments

import lorakit
import lorakit.formats.peft as peft_format
from lorakit.integrations.transformers import LoraTrainer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from distributed_train import build_model, convert, shard


class Options:
    modules_to_save = False
    gradient_checkpointing = False


def outcome(call) -> str:
    """`"ok"`, or the type and message of what `call` raised."""
    try:
        call()
    except Exception as error:
        return f"{type(error).__name__}: {error}"
    return "ok"


def files_of(directory: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(directory.iterdir())}


def main() -> None:
    out = Path(sys.argv[1])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model = convert(build_model(bf16_base=False), Options())
    shard(model, bf16_base=False)
    saved = out / "adapter"
    seen = {"first save": outcome(lambda: lorakit.save_adapter(model, saved))}
    dist.barrier()
    before = files_of(saved)

    build = peft_format.adapter_files

    def failing_build(*args, **kwargs):
        files = build(*args, **kwargs)  # after the gathers every rank takes part in
        if rank == 1:
            raise RuntimeError("rank 1 ran out of memory (simulated)")
        return files

    peft_format.adapter_files = failing_build
    seen["rank 1 fails building"] = outcome(lambda: lorakit.save_adapter(model, saved))
    peft_format.adapter_files = build
    seen["unchanged after rank 1 failed"] = files_of(saved) == before

    replace = peft_format.replace_files

    def failing_write(directory, files):
        raise OSError(28, "No space left on device (simulated)")

    peft_format.replace_files = failing_write if rank == 0 else replace
    seen["rank 0 fails writing"] = outcome(lambda: lorakit.save_adapter(model, saved))
    peft_format.replace_files = replace
    seen["unchanged after rank 0 failed"] = files_of(saved) == before

    seen["merge"] = outcome(lambda: lorakit.merge(model))
    config = lorakit.LoraConfig(r=2, target_modules=["q_proj"])
    seen["add after sharding"] = outcome(lambda: lorakit.add_adapter(model, "late", config))
    seen["save again"] = outcome(lambda: lorakit.save_adapter(model, saved))

    # LoraTrainer's save_model on every rank: the shards gathered, the whole adapter written by rank 0 alone
    trainer = LoraTrainer(model=model, args=TrainingArguments(str(out / "trainer"), use_cpu=True, report_to=[]))
    seen["trainer save"] = outcome(lambda: trainer.save_model(str(out / "trainer-save")))
    seen["transformers save, rank 0 the main process"] = outcome(
        lambda: model.save_pretrained(out / "save-pretrained", is_main_process=rank == 0)
    )
    dist.barrier()
    adapter = files_of(saved)
    for directory in ("trainer-save", "save-pretrained"):
        written = files_of(out / directory)
        seen[f"{directory} as save_adapter"] = all(written[name] == adapter[name] for name in adapter)

    merged = convert(build_model(bf16_base=False), Options())
    lorakit.merge(merged)
    shard(merged, bf16_base=False)
    weight = merged.model.layers[0].self_attn.q_proj.base_layer.weight
    before_unmerge = weight.full_tensor()
    seen["unmerge after sharding"] = outcome(lambda: lorakit.unmerge(merged))
    seen["still merged"] = torch.equal(weight.full_tensor(), before_unmerge)

    if rank == 0:  # a base checkpoint that lacks one tensor
        state = build_model(bf16_base=False).state_dict()
        del state["model.layers.1.mlp.down_proj.weight"]
        save_file(state, out / "incomplete.safetensors")
    dist.barrier()
    meta = convert(build_model(bf16_base=False, on_meta=True), Options())
    shard(meta, bf16_base=False)
    seen["materialize without a tensor"] = outcome(lambda: lorakit.materialize(meta, out / "incomplete.safetensors"))
    seen["still on meta"] = meta.model.layers[0].self_attn.q_proj.base_layer.weight.is_meta
    (out / f"rank{rank}.json").write_text(json.dumps(seen))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
