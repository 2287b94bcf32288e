"""Memory at real scale: the precision weights are held in, gradient checkpointing, LoRA.

    dtype = llm_weight_dtype("bf16", stage=1, lora=False)   # torch.bfloat16: frozen LLM
    vlm, tok = build_vlm(cfg, llm_dtype=dtype)               # loaded in it, never fp32 first
    counts = apply_memory(vlm, MemoryConfig(...), stage=2, precision="bf16")

The weight-precision policy (``--precision`` bf16 or fp16; fp32 keeps everything fp32):

* frozen weights are held in the training precision with no fp32 copy, since nothing
  updates them: the LLM in stage 1, and the LLM's base weights under ``--lora``;
* trained weights stay fp32, which makes them their own master copies: autocast computes
  in bf16/fp16 while AdamW updates fp32 (bf16 weights would round most small updates
  away): the connector, the RAG connector, the LoRA adapters, and the whole LLM in a
  full stage 2 (under ``--fsdp`` those fp32 weights are sharded across ranks);
* the vision tower stays fp32: it is frozen and small next to the LLM, and it runs in
  the precision its bank recorded for key features (``Retriever.feature_precision``)
  through autocast, which needs no second copy.

``--gradient-checkpointing`` recomputes each LLM layer in the backward pass instead of
keeping its activations (transformers' own checkpointing, non-reentrant). transformers
checkpoints only modules in train mode, so a frozen LLM with checkpointing on runs in
train mode, as LLaVA's trainer runs it; these LLMs' dropout is 0, so the losses are the
same as without it (a test checks).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from .lora import LoraSettings, add_lora
from .model import TinyAlignVLM

log = logging.getLogger(__name__)

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class MemoryConfig:
    """The memory options of one run (``tinyalign pretrain/finetune`` flags)."""

    gradient_checkpointing: bool = False
    lora: LoraSettings | None = None  # stage 2 only: adapters instead of the full LLM


def llm_weight_dtype(precision: str, stage: int, lora: bool) -> torch.dtype:
    """The dtype the LLM's weights are loaded in (the policy in the module docstring)."""
    if precision not in _DTYPES:
        raise ValueError(f"unknown precision {precision!r} (bf16, fp16, fp32)")
    trained = stage == 2 and not lora
    return torch.float32 if trained else _DTYPES[precision]


def enable_gradient_checkpointing(model: TinyAlignVLM) -> None:
    """Recompute the LLM's layers in backward; a frozen LLM is put in train mode for it."""
    llm = model.llm
    if not getattr(llm, "supports_gradient_checkpointing", False):
        raise ValueError(f"{type(llm).__name__} does not support gradient checkpointing")
    kwargs = {"use_reentrant": False}
    if hasattr(llm, "activation_checkpointing_enable"):  # transformers 5's name
        llm.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    llm.config.use_cache = False  # a cache is useless in training and conflicts with it
    llm.train(True)


def trainable_counts(model: TinyAlignVLM) -> dict[str, dict[str, int]]:
    """{component: {"trainable": n, "frozen": n}} and a "total" entry."""
    counts: dict[str, dict[str, int]] = {}
    for name in ("vision", "connector", "rag_connector", "llm"):
        module = getattr(model, name)
        if module is None:
            continue
        params = list(module.parameters())
        n_train = sum(p.numel() for p in params if p.requires_grad)
        counts[name] = {"trainable": n_train, "frozen": sum(p.numel() for p in params) - n_train}
    counts["total"] = {
        k: sum(c[k] for n, c in counts.items() if n != "total") for k in ("trainable", "frozen")
    }
    return counts


def apply_memory(
    model: TinyAlignVLM, memory: MemoryConfig, *, stage: int, precision: str
) -> dict[str, dict[str, int]] | None:
    """LoRA adapters (stage 2) and gradient checkpointing, after ``apply_stage``.

    Returns the new trainable-parameter counts when LoRA changed them, else None."""
    counts = None
    if memory.lora is not None:
        if stage != 2:
            raise ValueError("--lora adapts the LLM in stage 2 (finetune); stage 1 freezes it")
        add_lora(model, memory.lora)
        counts = trainable_counts(model)
        t = counts["total"]
        log.info(
            "LoRA r=%d alpha=%g on %s: %s of %s parameters trainable (%.3f%%)",
            memory.lora.r,
            memory.lora.alpha,
            memory.lora.target_modules,
            f"{t['trainable']:,}",
            f"{t['trainable'] + t['frozen']:,}",
            100.0 * t["trainable"] / max(1, t["trainable"] + t["frozen"]),
        )
    if memory.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    dtypes = {str(p.dtype).removeprefix("torch.") for p in model.llm.parameters()}
    log.info("precision %s: LLM weights held in %s", precision, ", ".join(sorted(dtypes)))
    return counts
