"""One view of a torchrun job for predict and train: this process's rank, joining and leaving the
process group, barriers, gathering small objects, and each rank's share of a list. torch is
imported only where a process group is used (a single process's predict may run without torch)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Rank:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def rank_from_env() -> Rank:
    """This process's place in the job torchrun describes in the environment (one process without)."""
    return Rank(int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")),
                int(os.environ.get("LOCAL_RANK", "0")))


# Ranks wait at barriers while one of them works alone (validation and the batchnorm recompute on
# the main rank, the slowest part of a raster, the teacher's targets): on the CPU that can pass
# torch's default of 30 minutes (10 for NCCL) and would end the job. A process that dies does not
# leave the others waiting: torchrun's agent ends the whole group.
LONG_WAIT = timedelta(hours=72)


def init(rank: Rank, backend: str = "gloo", timeout: timedelta = LONG_WAIT) -> None:
    """Join torchrun's process group (no-op for a single process)."""
    import torch.distributed as dist

    if rank.active and not dist.is_initialized():
        dist.init_process_group(backend, timeout=timeout)


def shutdown(rank: Rank) -> None:
    """Leave the group cleanly (gloo aborts the process at exit otherwise)."""
    import torch.distributed as dist

    if rank.active and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def barrier(rank: Rank) -> None:
    if rank.active:
        import torch.distributed as dist

        dist.barrier()


def gather(rank: Rank, value: Any) -> list[Any]:
    """Every rank's `value`, on every rank (a list in rank order)."""
    import torch.distributed as dist

    if not rank.active:
        return [value]
    out = [None] * rank.world
    dist.all_gather_object(out, value)
    return out


def any_rank(rank: Rank, value: bool, device: torch.device) -> bool:
    """True on every rank when `value` is true on any (e.g. 'the loss is not finite')."""
    import torch
    import torch.distributed as dist

    if not rank.active:
        return value
    t = torch.tensor([int(value)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def shard(items: list, rank: Rank, batch_size: int = 1) -> list:
    """This rank's contiguous share of `items`: whole batches, every rank the same number."""
    per_rank = len(items) // (rank.world * batch_size) * batch_size
    return items[rank.rank * per_rank:(rank.rank + 1) * per_rank]


def device_for_rank(device: str, rank: Rank) -> str:
    """Under torchrun, `auto`/`cuda` mean this process's GPU, cuda:LOCAL_RANK (when there are GPUs)."""
    import torch

    if rank.active and device in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{rank.local_rank % torch.cuda.device_count()}"
    return device
