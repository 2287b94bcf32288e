"""Data-parallel plumbing for training: DDP over the process group of ``bankd.build.distributed``.

``DistEnv`` and ``init_distributed`` (torchrun's environment -> process group, NCCL on
CUDA, Gloo on the CPU, ``cuda:LOCAL_RANK``) live in ``bankd.build.distributed``, which
``bankd build`` uses too; this module adds what only training needs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

from bankd.build.distributed import DistEnv, init_distributed

__all__ = ["DistEnv", "init_distributed", "no_sync_unless", "wrap_ddp"]


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
    """Skip DDP's gradient all-reduce (FSDP's reduce-scatter) on accumulation micro-batches
    (not the last one)."""
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP's switch
        model.set_requires_gradient_sync(sync)
        yield
    elif sync or not hasattr(model, "no_sync"):
        yield
    else:
        with model.no_sync():
            yield
