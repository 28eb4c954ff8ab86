"""DDP and FSDP2 training of lorakit models, for real: two gloo processes under torchrun on the CPU.

`examples/distributed_train.py` (the README's recipe) trains on 2 ranks × b rows; the same steps in one process
on the whole 2b rows must give the same losses, the same saved adapter (rank 0 writes the gathered, complete
tensors) and the same logits. peft loads the adapter the sharded model saved; a fresh sharded model takes it back
(each rank its shard) with equal logits. `tests/distributed_checks.py` covers failures during a sharded save and
what lorakit refuses on a sharded model.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import lorakit

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "distributed_train.py"
ROWS, STEPS = 2, 5

spec = importlib.util.spec_from_file_location("distributed_train", SCRIPT)
recipe = importlib.util.module_from_spec(spec)
spec.loader.exec_module(recipe)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(script: Path, *args: str) -> str:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), str(script), *args]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    run = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)  # a hang fails
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    return run.stdout


class Options:
    def __init__(self, **flags: bool) -> None:
        self.modules_to_save = flags.get("modules_to_save", False)
        self.gradient_checkpointing = flags.get("gradient_checkpointing", False)


def one_process(tmp_path: Path, bf16_base: bool, **flags: bool) -> tuple[list[float], float, torch.Tensor, Path]:
    """The same training in this process, on all 2·ROWS rows of each batch."""
    torch.set_num_threads(1)  # as each torchrun rank (OMP_NUM_THREADS=1): the same GEMM blocking
    model = recipe.convert(recipe.build_model(bf16_base), Options(**flags))
    losses, first_gradient_norm = recipe.train(model, STEPS, 2 * ROWS, rank=0, world=1, device=torch.device("cpu"))
    saved = tmp_path / "one-process"
    lorakit.save_adapter(model, saved)
    return losses, first_gradient_norm, recipe.probe_logits(model, torch.device("cpu")), saved


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """`‖actual − expected‖ / ‖expected‖`. Per tensor, not per entry: AdamW divides by √v, so where a gradient is
    ~0 its float32 rounding (different for a batch split over 2 ranks) moves single entries far more than the
    tensor."""
    actual, expected = actual.double(), expected.double()
    return float((actual - expected).norm() / expected.norm())


CASES = {  # id → (mode, bf16 base, flags, tolerance (rtol) of losses, adapters and logits)
    "ddp": ("ddp", False, {}, 1e-5),
    # a full trained copy of lm_head feeds every adapter's gradient: after 5 AdamW steps float32 rounding has grown
    # to 2e-5–6e-5 between runs (the first step's loss and gradients are still checked to 1e-5)
    "ddp-checkpointing-lm_head": ("ddp", False, {"gradient_checkpointing": True, "modules_to_save": True}, 3e-4),
    "fsdp2": ("fsdp2", False, {}, 1e-5),
    # bfloat16 compute: 2 ranks and 1 process round their differently shaped GEMMs differently
    "fsdp2-bf16-base-fp32-adapters": ("fsdp2", True, {"gradient_checkpointing": True}, 5e-2),
}


@pytest.mark.parametrize("case", list(CASES))
def test_two_ranks_train_as_one_process_on_the_whole_batch(case, tmp_path):
    mode, bf16_base, flags, rtol = CASES[case]
    args = ["--mode", mode, "--steps", str(STEPS), "--batch", str(ROWS), "--save", str(tmp_path / "ranks"),
            "--record", str(tmp_path / "record.json")]  # fmt: skip
    args += ["--bf16-base"] * bf16_base + ["--gradient-checkpointing"] * flags.get("gradient_checkpointing", False)
    args += ["--modules-to-save"] * flags.get("modules_to_save", False)
    stdout = torchrun(SCRIPT, *args)
    record = json.loads((tmp_path / "record.json").read_text())
    assert record["world"] == 2 and record["reloaded_same"], stdout

    losses, first_gradient_norm, logits, saved = one_process(tmp_path, bf16_base, **flags)
    assert losses[-1] < losses[0], "the adapter must learn"
    first_step_rtol = 1e-5 if not bf16_base else rtol
    assert record["losses"][0] == pytest.approx(losses[0], rel=first_step_rtol)
    assert record["first_gradient_norm"] == pytest.approx(first_gradient_norm, rel=first_step_rtol), "a mean, not a sum"
    torch.testing.assert_close(torch.tensor(record["losses"]), torch.tensor(losses), rtol=rtol, atol=0)
    assert relative_error(torch.tensor(record["logits"]), logits) <= rtol
    ranks_file = load_file(tmp_path / "ranks" / "adapter_model.safetensors")
    one_file = load_file(saved / "adapter_model.safetensors")
    assert ranks_file.keys() == one_file.keys()
    for key in ranks_file:  # whole tensors, not one rank's shard
        assert ranks_file[key].shape == one_file[key].shape, key
        error = relative_error(ranks_file[key], one_file[key])
        assert error <= rtol, f"{key}: relative error {error:.2e}"
    assert (tmp_path / "ranks" / "adapter_config.json").read_text() == (saved / "adapter_config.json").read_text()

    if case == "fsdp2":  # the sharded model's adapter in peft
        peft = pytest.importorskip("peft")
        in_peft = peft.PeftModel.from_pretrained(recipe.build_model(False), tmp_path / "ranks").eval()
        with torch.no_grad():
            peft_logits = in_peft(input_ids=recipe.global_batches(1, 2)[0]).logits
        torch.testing.assert_close(peft_logits, torch.tensor(record["logits"]), rtol=1e-5, atol=1e-5)


def test_a_meta_device_start_trains_as_an_ordinary_start(tmp_path):
    """Each rank builds on meta, converts, shards and materializes its shards from a sharded checkpoint: training
    gives the adapter an ordinary start gives, to the bit."""
    recipe.build_model(False).save_pretrained(tmp_path / "base", max_shard_size="100KB")
    assert (tmp_path / "base" / "model.safetensors.index.json").is_file()
    for start in ("ordinary", "meta"):
        args = ["--mode", "fsdp2", "--steps", str(STEPS), "--batch", str(ROWS), "--save", str(tmp_path / start),
                "--record", str(tmp_path / f"{start}.json")]  # fmt: skip
        torchrun(SCRIPT, *args, *(["--meta-start", str(tmp_path / "base")] if start == "meta" else []))
    ordinary, meta = (json.loads((tmp_path / f"{start}.json").read_text()) for start in ("ordinary", "meta"))
    assert meta["losses"] == ordinary["losses"] and meta["logits"] == ordinary["logits"]
    assert meta["losses"][-1] < meta["losses"][0]
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (tmp_path / "meta" / name).read_bytes() == (tmp_path / "ordinary" / name).read_bytes(), name


def test_failures_during_a_sharded_save_and_what_a_sharded_model_refuses(tmp_path):
    torchrun(ROOT / "tests" / "distributed_checks.py", str(tmp_path))
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for seen in ranks:
        assert seen["first save"] == "ok" and seen["save again"] == "ok"
        assert seen["rank 1 fails building"].startswith("LoraError: save_adapter to ")
        assert (
            "failed on rank 1 (RuntimeError: rank 1 ran out of memory (simulated)); nothing was written"
            in (seen["rank 1 fails building"])
        )
        assert "failed on rank 0 while writing (OSError: [Errno 28] No space left" in seen["rank 0 fails writing"]
        assert seen["unchanged after rank 1 failed"] and seen["unchanged after rank 0 failed"]
        assert seen["trainer save"] == "ok" and seen["transformers save, rank 0 the main process"] == "ok"
        assert seen["trainer-save as save_adapter"] and seen["save-pretrained as save_adapter"]
        assert seen["merge"].startswith("MergeError: cannot merge") and "sharded" in seen["merge"]
        assert "FSDP2 cannot take new parameters after fully_shard" in seen["add after sharding"]
        assert seen["unmerge after sharding"].startswith("MergeError: cannot unmerge 'model.layers.0.self_attn.q_proj'")
        assert "Unmerge before sharding" in seen["unmerge after sharding"] and seen["still merged"]
        assert seen["materialize without a tensor"].startswith("LoraError: cannot materialize from ")
        lacking = "lacks ['model.layers.1.mlp.down_proj.weight'], which would be left on the meta"
        assert lacking in seen["materialize without a tensor"]
        assert seen["still on meta"]


def test_trainer_with_ddp_checkpoints_the_whole_adapter_and_resumes(tmp_path):
    """`LoraTrainer` under torchrun (DDP over gloo): Trainer saves from rank 0 alone, which must neither hang nor
    write part of the adapter, and a run resumed from the middle checkpoint ends where the whole run ended."""
    script = ROOT / "tests" / "distributed_trainer.py"
    torchrun(script, str(tmp_path / "whole"))
    torchrun(script, str(tmp_path / "resumed"), "--resume", str(tmp_path / "whole" / "checkpoint-3"))
    whole, resumed = (json.loads((tmp_path / run / "losses.json").read_text()) for run in ("whole", "resumed"))
    assert whole["world"] == 2 and list(whole["losses"]) == ["1", "2", "3", "4", "5", "6"], whole
    assert whole["losses"]["6"] < whole["losses"]["1"], f"the adapter must learn: {whole}"
    assert list(resumed["losses"]) == list(whole["losses"])  # 1–3 from the checkpoint's trainer state
    for step in ("4", "5", "6"):
        assert resumed["losses"][step] == pytest.approx(whole["losses"][step], rel=1e-6), step

    reference = recipe.build_model(False)
    torch.manual_seed(1)
    lorakit.get_lora_model(reference, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    initial = lorakit.lora_state_dict(reference)
    final = load_file(tmp_path / "whole" / "final" / "adapter_model.safetensors")
    for checkpoint in ("checkpoint-3", "checkpoint-6", "final"):
        tensors = load_file(tmp_path / "whole" / checkpoint / "adapter_model.safetensors")
        assert tensors.keys() == initial.keys(), checkpoint
    checkpoint = load_file(tmp_path / "whole" / "checkpoint-6" / "adapter_model.safetensors")
    resumed_final = load_file(tmp_path / "resumed" / "final" / "adapter_model.safetensors")
    for key, value in final.items():
        assert torch.equal(checkpoint[key], value), key
        torch.testing.assert_close(resumed_final[key], value, rtol=1e-6, atol=1e-7)
    assert all(not torch.equal(value, initial[key]) for key, value in final.items()), "trained, not the start"
