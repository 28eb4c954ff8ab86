"""LoRA training on several processes with torch.distributed: DDP or FSDP2, the recipe of the README.

    torchrun --nproc_per_node 8 examples/distributed_train.py --mode fsdp2 --backend nccl      # 8 GPUs
    torchrun --nproc_per_node 2 examples/distributed_train.py --mode ddp --backend gloo       # the CPU

Every rank builds the same model (here a small Llama from a config, nothing downloaded), converts it with
lorakit, *then* wraps it (DDP) or shards it (`fully_shard` per decoder layer, then the root), and trains on its
slice of each global batch. With `--meta-start CHECKPOINT` every rank builds the model on the meta device (no
memory), converts it (the adapters are made for real, as on a built model), shards it, and only then loads the
base weights with `lorakit.materialize`, each rank its shards.

`lorakit.save_adapter` is called on every rank: sharded adapters are gathered, rank 0 writes one complete
peft-format adapter atomically, and every rank returns once it is on disk. (Under DDP, rank 0 writes and the
others return at once, so they wait at a barrier before reading it.) A sharded model takes saved weights back with
`lorakit.hot_swap_adapter` (each rank its shard).

With `--record FILE`, rank 0 writes the per-step global losses and the final logits of a fixed batch to FILE
(what `tests/test_distributed.py` compares with one process training on the whole batch).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel
from transformers import LlamaConfig, LlamaForCausalLM

import lorakit

VOCAB, TOKENS = 128, 16


def build_model(bf16_base: bool, seed: int = 0, on_meta: bool = False) -> LlamaForCausalLM:
    """The same base model on every rank: a 2-layer Llama from a config, seeded; with `on_meta`, without memory
    (its weights come later, from a checkpoint, with `lorakit.materialize`)."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    with torch.device("meta" if on_meta else "cpu"):
        model = LlamaForCausalLM(config)
    return model.to(torch.bfloat16) if bf16_base else model


def convert(model: LlamaForCausalLM, args: argparse.Namespace) -> LlamaForCausalLM:
    """LoRA on every linear layer (float32 adapters, also on a bfloat16 base), seeded: every rank gets the same
    adapter. Before any wrapping or sharding."""
    torch.manual_seed(1)
    config = lorakit.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                                modules_to_save=["lm_head"] if args.modules_to_save else None)  # fmt: skip
    lorakit.get_lora_model(model, config)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def shard(model: LlamaForCausalLM, bf16_base: bool) -> None:
    """FSDP2: each decoder layer, then the root. On a bfloat16 base the float32 adapters compute in bfloat16 and
    their gradients are reduced in float32."""
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16_base else None
    options = {"mp_policy": policy} if policy is not None else {}
    for layer in model.model.layers:
        fully_shard(layer, **options)
    fully_shard(model, **options)


def global_batches(steps: int, rows: int) -> torch.Tensor:
    """`(steps, rows, TOKENS)` token ids, the same on every rank: runs of consecutive tokens (t → t+1), which
    the random base cannot predict and LoRA learns."""
    starts = torch.randint(0, VOCAB, (steps, rows, 1), generator=torch.Generator().manual_seed(2))
    return (starts + torch.arange(TOKENS)) % VOCAB


def train(
    trained: torch.nn.Module, steps: int, rows: int, rank: int, world: int, device: torch.device
) -> tuple[list[float], float]:
    """`steps` AdamW steps, this rank on its `rows` of each global batch of `rows · world`; the global mean losses
    and the norm of the first step's gradients."""
    params = [p for p in trained.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    losses = []
    for batch in global_batches(steps, rows * world):
        ids = batch[rank * rows : (rank + 1) * rows].to(device)  # this rank's slice
        loss = trained(input_ids=ids, labels=ids).loss
        loss.backward()  # DDP and FSDP2 average the gradients over the ranks
        if not losses:  # the first gradients' norm: a sum over ranks instead of a mean would double it
            first_gradient_norm = torch.stack([full_tensor(p.grad).float().norm() for p in params]).norm().item()
        optimizer.step()
        optimizer.zero_grad()
        mean = loss.detach().float()
        if world > 1:
            dist.all_reduce(mean)
        losses.append(mean.item() / world)
        if rank == 0:
            print(f"step {len(losses)}: loss {losses[-1]:.4f}")
    return losses, first_gradient_norm


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """A sharded (FSDP2) tensor gathered from every rank; any other tensor as it is."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def probe_logits(model: torch.nn.Module, device: torch.device) -> torch.Tensor:
    """Logits of a fixed batch, in eval mode."""
    model.eval()
    with torch.no_grad():
        return model(input_ids=global_batches(1, 2)[0].to(device)).logits.float()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=["ddp", "fsdp2"], default="fsdp2")
    parser.add_argument("--backend", default="nccl" if torch.cuda.is_available() else "gloo")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=4, help="rows per rank and step")
    parser.add_argument("--bf16-base", action="store_true", help="a bfloat16 base with float32 adapters")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--modules-to-save", action="store_true", help="also train a full copy of lm_head")
    parser.add_argument("--meta-start", type=Path, metavar="CHECKPOINT",
                        help="build on the meta device, convert, shard, then load the base from this safetensors "
                        "checkpoint (a file, or a directory with model.safetensors or a sharded index)")  # fmt: skip
    parser.add_argument("--save", type=Path, default=Path("distributed-adapter"))
    parser.add_argument("--record", type=Path, help="rank 0 writes the losses and final logits here (JSON)")
    args = parser.parse_args()

    dist.init_process_group(args.backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{int(os.environ['LOCAL_RANK'])}") if args.backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)

    if args.meta_start:  # a model too big to build whole: each rank materializes only its shards
        model = convert(build_model(args.bf16_base, on_meta=True), args)  # the adapters are made for real
        if args.mode == "fsdp2":
            shard(model, args.bf16_base)
        lorakit.materialize(model, args.meta_start, device)
    else:
        model = convert(build_model(args.bf16_base).to(device), args)
        if args.mode == "fsdp2":
            shard(model, args.bf16_base)
    if args.mode == "ddp":
        trained = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    else:
        trained = model
    losses, first_gradient_norm = train(trained, args.steps, args.batch, rank, world, device)
    lorakit.save_adapter(model, args.save)  # on every rank: rank 0 writes the whole adapter
    dist.barrier()  # under DDP the other ranks do not wait for the files
    logits = probe_logits(model, device)

    # a fresh sharded model takes the saved adapter back, each rank its shard
    reloaded = convert(build_model(args.bf16_base).to(device), args)
    if args.mode == "fsdp2":
        shard(reloaded, args.bf16_base)
    lorakit.hot_swap_adapter(reloaded, args.save)  # into its adapter slot, in place
    same = torch.equal(probe_logits(reloaded, device), logits)
    if rank == 0:
        print(f"saved to {args.save}; reloaded into a fresh {args.mode} model: same logits: {same}")
        if args.record:
            record = {"losses": losses, "first_gradient_norm": first_gradient_norm, "logits": logits.cpu().tolist(),
                      "reloaded_same": same, "world": world}  # fmt: skip
            args.record.write_text(json.dumps(record))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
