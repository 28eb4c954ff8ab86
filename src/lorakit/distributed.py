"""torch.distributed: what lorakit's file operations do when several processes train one model.

lorakit runs on torch's own engines and adds no wrapper of its own. Under DDP every rank holds the whole model;
under FSDP2 (`torch.distributed.fsdp.fully_shard`) each parameter is a `DTensor` of which a rank holds a shard.
Two rules follow:

- **Saving a sharded model is a collective.** Every rank calls `save_adapter` (or `save_pretrained`): sharded
  parameters are gathered (`DTensor.full_tensor`, which every rank must call in the same order), the ranks agree
  that each built the files, rank 0 writes them atomically, and all ranks return once they are on disk, or all
  raise the same `LoraError`. A rank that fails leaves the previous files as they were.
- **Saving an unsharded model** (DDP: every rank holds the whole adapter) needs no other rank: rank 0 writes and
  the others return at once, with no communication. So it may be called on every rank or on rank 0 alone, as
  transformers' `Trainer` and the usual `if rank == 0:` scripts do; a rank that reads the files must wait for
  them (`dist.barrier()`).
- **Loading into a sharded model** writes each rank's shard of the full tensor it read (`write_full`), with no
  communication: every rank reads the same file.

Outside an initialised process group of more than one process all of this is a no-op.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import nn

from .errors import LoraError

T = TypeVar("T")


def process_group_size() -> int:
    """The number of processes of the default group, 1 outside torch.distributed."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_sharded(tensor: torch.Tensor) -> bool:
    """Whether `tensor` is a `DTensor` (an FSDP2 parameter, say)."""
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def full_value(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor`'s whole value: gathered from every rank for a `DTensor` (a collective), else `tensor` itself."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor


def write_full(param: torch.Tensor, value: torch.Tensor) -> None:
    """Copy `value` (the whole tensor, on every rank) into `param`, or into this rank's shard of it."""
    if not is_sharded(param):
        param.copy_(value)
        return
    from torch.distributed.tensor import distribute_tensor

    value = value.to(device=param.to_local().device, dtype=param.dtype)
    shard = distribute_tensor(value, param.device_mesh, param.placements, src_data_rank=None)  # no communication
    param.to_local().copy_(shard.to_local())


def unsharded_class(module: nn.Module) -> type:
    """`module`'s own class: FSDP2's `fully_shard` swaps it for a subclass (`FSDPLlamaForCausalLM`), which a saved
    config must not name."""
    from torch.distributed.fsdp import FSDPModule

    return next(cls for cls in type(module).__mro__ if not issubclass(cls, FSDPModule))


def sharded_parameters(model: nn.Module) -> list[str]:
    """Names of `model`'s parameters that are `DTensor`s."""
    return [name for name, param in model.named_parameters() if is_sharded(param)]


def save_on_rank_zero(build: Callable[[], T], write: Callable[[T], None], what: str, gathers: bool) -> None:
    """`write(build())`, written by rank 0 of a process group. With `gathers` (`build` gathers shards: collectives
    that every rank must run, in the same order) it is one collective step: every rank builds, the ranks agree
    that all succeeded, rank 0 writes, and every rank returns after it or raises the same `LoraError`. Without,
    only rank 0 builds and writes, and the other ranks return at once. Outside a process group of several ranks:
    `write(build())`."""
    if process_group_size() == 1:
        write(build())
        return
    if not gathers:
        if dist.get_rank() == 0:
            write(build())
        return
    built, failure = None, None
    try:
        built = build()
    except Exception as error:  # reported to every rank below, then raised here as well
        failure = f"{type(error).__name__}: {error}"
    failures = [None] * dist.get_world_size()
    dist.all_gather_object(failures, failure)
    failed = [(rank, message) for rank, message in enumerate(failures) if message is not None]
    if failed:
        raise LoraError(f"{what} failed on rank {failed[0][0]} ({failed[0][1]}); nothing was written")
    outcome = [None]
    if dist.get_rank() == 0:
        try:
            write(built)
        except Exception as error:
            outcome = [f"{type(error).__name__}: {error}"]
    dist.broadcast_object_list(outcome, src=0)
    if outcome[0] is not None:
        raise LoraError(f"{what} failed on rank 0 while writing ({outcome[0]}); the previous files are as they were")
