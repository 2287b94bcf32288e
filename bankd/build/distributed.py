"""Data-parallel plumbing shared by ``bankd build`` and the trainer: torchrun's process group.

A single process (no ``WORLD_SIZE`` or ``WORLD_SIZE=1``) never touches
``torch.distributed``. Under ``torchrun --nproc_per_node N`` each rank reads
``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK``, joins the group (NCCL on CUDA, Gloo on the
CPU) and uses ``cuda:LOCAL_RANK``. Only rank 0 logs, shows progress and writes files.

Model-side like ``bankd.models``: no server, faiss or grpc imports, so the trainer
(``tinyalign``) uses the same copy.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from bankd.models.encoders import resolve_device


@dataclass
class DistEnv:
    """This process's place in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False  # this process created the group, so it tears it down
    local_world_size: int = 1  # processes on this node (they share its CPU cores)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def mean(self, value: float) -> float:
        """The mean of ``value`` over ranks (the value itself in one process)."""
        if not self.distributed:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.comm_device)
        dist.all_reduce(t)
        return float(t.item()) / self.world_size

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sums over ranks."""
        if not self.distributed:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.comm_device)
        dist.all_reduce(t)
        return t.tolist()

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        """Rank ``src``'s ``obj`` (any picklable object) on every rank."""
        if not self.distributed:
            return obj
        box = [obj if self.rank == src else None]
        dist.broadcast_object_list(box, src=src, device=self.comm_device)
        return box[0]

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    @property
    def comm_device(self) -> torch.device:
        """Where tensors sent between ranks live: the GPU for NCCL, else the CPU."""
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_group = False


def init_distributed(device: str = "auto", *, timeout: timedelta | None = None) -> DistEnv:
    """A ``DistEnv`` from torchrun's environment variables (one process without them).

    ``timeout``: how long a collective waits for the slowest rank (torch's default when
    None: 10 min for NCCL, 30 min for Gloo).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistEnv(device=resolve_device(device))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    dev = resolve_device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    owns = not dist.is_initialized()
    if owns:
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, **({"timeout": timeout} if timeout else {}))
    return DistEnv(rank, world_size, local_rank, dev, owns, local_world)
