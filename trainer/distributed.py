"""Data-parallel plumbing for training: process group from torchrun's environment, DDP.

A single process (no ``WORLD_SIZE`` or ``WORLD_SIZE=1``) never touches
``torch.distributed``. Under ``torchrun --nproc_per_node N`` each rank reads
``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK``, joins the group (NCCL on CUDA, Gloo on the
CPU) and uses ``cuda:LOCAL_RANK``. Only rank 0 logs, shows progress and writes files.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from bankd.models.encoders import resolve_device


@dataclass
class DistEnv:
    """This process's place in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False  # this process created the group, so it tears it down

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
        t = torch.tensor([value], dtype=torch.float64, device=self._reduce_device)
        dist.all_reduce(t)
        return float(t.item()) / self.world_size

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sums over ranks."""
        if not self.distributed:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self._reduce_device)
        dist.all_reduce(t)
        return t.tolist()

    @property
    def _reduce_device(self) -> torch.device:
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_group = False


def init_distributed(device: str = "auto") -> DistEnv:
    """A ``DistEnv`` from torchrun's environment variables (one process without them)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistEnv(device=resolve_device(device))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return DistEnv(rank, world_size, local_rank, dev, owns)


def wrap_ddp(model: nn.Module, env: DistEnv, *, find_unused: bool = True) -> nn.Module:
    """DDP over the trainable parameters only; frozen ones are neither synced nor reduced.

    ``find_unused``: needed when the data has text-only samples, since a micro-batch of
    them leaves the connectors unused on that rank.
    """
    if not env.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    frozen += [n for n, _ in model.named_buffers()]  # frozen towers' buffers: identical
    DDP._set_params_and_buffers_to_ignore_for_model(model, frozen)
    return DDP(
        model,
        device_ids=[env.device.index] if env.device.type == "cuda" else None,
        find_unused_parameters=find_unused,
    )


@contextlib.contextmanager
def no_sync_unless(model: nn.Module, sync: bool) -> Iterator[None]:
    """Skip DDP's gradient all-reduce on accumulation micro-batches (not the last one)."""
    if sync or not hasattr(model, "no_sync"):
        yield
    else:
        with model.no_sync():
            yield
