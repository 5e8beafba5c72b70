"""torch.distributed for training: set up from torchrun's environment, NCCL on GPUs and gloo on CPUs.

``torchrun --nproc_per_node N -m shardstore train ...`` sets RANK, WORLD_SIZE, LOCAL_RANK and the
rendezvous address; across nodes torchrun's ``--nnodes``/``--rdzv-endpoint`` do the rest (see
the README for a SLURM line). Without those variables training runs as a single process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job and the device it trains on."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0 alone logs and writes checkpoints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup(device: str | None = None) -> DistInfo:
    """Join the process group torchrun describes (if any) and pick the device.

    ``device``: None picks ``cuda:LOCAL_RANK`` when CUDA is available, else the CPU.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        chosen = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    else:
        chosen = torch.device(device)
        if chosen.type == "cuda" and chosen.index is None:
            chosen = torch.device("cuda", local_rank)
    if chosen.type == "cuda":
        torch.cuda.set_device(chosen)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if chosen.type == "cuda" else "gloo")
    return DistInfo(rank, world_size, local_rank, chosen)


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def all_reduce_mean(value: float, info: DistInfo) -> float:
    """The mean of a scalar over ranks (itself on a single process)."""
    if not info.distributed:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=info.device if info.device.type == "cuda" else "cpu")
    dist.all_reduce(t)
    return float(t.item()) / info.world_size


def broadcast_object(value: object, info: DistInfo) -> object:
    """Rank 0's ``value`` on every rank (any picklable object; itself on a single process)."""
    if not info.distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(value: object, info: DistInfo) -> list[object]:
    """Every rank's ``value``, in rank order, on every rank (``[value]`` on a single process)."""
    if not info.distributed:
        return [value]
    out: list[object] = [None] * info.world_size
    dist.all_gather_object(out, value)
    return out


def teardown(info: DistInfo) -> None:
    if info.distributed and dist.is_initialized():
        dist.destroy_process_group()


def broadcast_buffers(module: torch.nn.Module, info: DistInfo) -> None:
    """Give every rank rank 0's buffers (BatchNorm running statistics drift apart: each rank sees its own data)."""
    if not info.distributed:
        return
    for buffer in module.buffers():
        dist.broadcast(buffer.data, src=0)
