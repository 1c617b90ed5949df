"""Multi-GPU / multi-node training under torchrun: process group, data sharding, rank-0 writes."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def init_from_env(device: torch.device) -> Dist:
    """Join the process group torchrun describes in the environment (no-op for a single process)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def shard(indices: list[int], d: Dist, batch_size: int) -> list[int]:
    """This rank's share of an epoch's order: whole batches, every rank the same number of steps."""
    per_rank = len(indices) // (d.world * batch_size) * batch_size
    return indices[d.rank * per_rank:(d.rank + 1) * per_rank]


def barrier(d: Dist) -> None:
    if d.active:
        dist.barrier()


def any_rank(d: Dist, value: bool, device: torch.device) -> bool:
    """True on every rank when `value` is true on any (e.g. 'the loss is not finite')."""
    if not d.active:
        return value
    t = torch.tensor([int(value)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def shutdown(d: Dist) -> None:
    if d.active and dist.is_initialized():
        dist.destroy_process_group()
