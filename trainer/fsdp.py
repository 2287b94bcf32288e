"""Sharded training with torch FSDP (``fully_shard``) under torchrun: ``--fsdp``.

    torchrun --nproc_per_node 8 -m tinyalign finetune --fsdp --from runs/stage1 ...

Each rank holds 1/world of the trained weights, their gradients and AdamW's moments
instead of all of them (full stage 2 of Phi-2: about 43 GB a GPU under DDP). The units:
every decoder layer of the LLM (its ``_no_split_modules``), then the whole VLM as the
root (connectors, embeddings, final norm, output head), so one forward gathers a layer
at a time. The frozen vision tower is left out (``ignored_params``): it runs before
the forward, in the prefetcher, replicated on every rank, as the bank's key path.

FSDP gathers a unit's parameters in one buffer, so they must share a dtype: full
stage 2 (fp32 masters everywhere, ``memory.py``) or any run in fp32; a frozen bf16 LLM
next to fp32 connectors (stage 1, LoRA in bf16/fp16) is refused with that reason, and
those runs hold the LLM in half precision already. Saving gathers the full weights on
rank 0 (``full_state``); resuming a sharded run from a checkpoint is not supported.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from .distributed import DistEnv

log = logging.getLogger(__name__)


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def shard(model: Any, env: DistEnv) -> None:
    """Shard ``model`` (a TinyAlignVLM) in place over the torchrun process group."""
    if not env.distributed:
        raise ValueError("--fsdp shards across processes: run under torchrun with 2 or more")
    vision = set(model.vision.parameters())
    dtypes = {p.dtype for p in model.parameters() if p not in vision}
    if len(dtypes) > 1:
        names = ", ".join(sorted(str(d).removeprefix("torch.") for d in dtypes))
        raise ValueError(
            f"--fsdp needs the sharded weights in one dtype, got {names} (a frozen half-"
            "precision LLM beside fp32 connectors: stage 1 or LoRA); use --fsdp for a full "
            "stage 2, or --precision fp32"
        )
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(env.device.type, (env.world_size,))
    layer_types = set(getattr(model.llm, "_no_split_modules", None) or ())
    layers = [m for m in model.llm.modules() if type(m).__name__ in layer_types]
    if not layers:
        raise ValueError(f"{type(model.llm).__name__} names no decoder layers to shard")
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh, ignored_params=vision)
    log.info("FSDP: %d decoder layers + the VLM root over %d ranks", len(layers), env.world_size)


def full_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's state on rank 0's CPU (empty on the others); every rank calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options)
