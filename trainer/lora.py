"""LoRA for stage 2 through peft (LLaVA's ``lora_enable``): adapters on the LLM, the rest
as the stage decides.

    add_lora(vlm, LoraSettings(r=64, alpha=16, target_modules="all-linear"))
    merge_lora(vlm)            # the LLM becomes a plain model with the adapters folded in

Only the adapters of the LLM train (the connectors too, as stage 2 trains them); the
base weights stay frozen in the training precision (``memory.py``) and the adapters are
fp32. Saved unmerged, ``llm/`` holds peft's adapter files and ``load_adapted`` rebuilds
the model from the recorded base; ``--lora-merge`` folds the adapters in before the
final save, so ``llm/`` is an ordinary checkpoint that any tool loads.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"


@dataclass(frozen=True)
class LoraSettings:
    """LoRA's rank, scale numerator, dropout and target modules (peft's names)."""

    r: int = 64
    alpha: float = 16.0
    dropout: float = 0.05
    # "all-linear" (peft: every linear layer but the output head) or module names.
    target_modules: str | tuple[str, ...] = "all-linear"
    merge: bool = False  # fold the adapters into the LLM before the final save

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {self.r}")
        if not self.alpha > 0:
            raise ValueError(f"LoRA alpha must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        if not self.target_modules:
            raise ValueError("LoRA needs target modules ('all-linear' or names)")


def parse_targets(text: str) -> str | tuple[str, ...]:
    """``--lora-target-modules``: "all-linear" or comma-separated module names."""
    text = text.strip()
    if text == "all-linear":
        return text
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    if not names:
        raise ValueError(f"no LoRA target modules in {text!r}")
    return names


def _peft() -> Any:
    try:
        import peft
    except ImportError as e:  # a declared dependency; a broken environment says so
        raise ImportError("--lora needs peft (pip install peft)") from e
    return peft


def add_lora(model: Any, settings: LoraSettings) -> None:
    """Wrap ``model.llm`` with fp32 LoRA adapters; its own weights freeze.

    An LLM loaded with adapters already (a resumed run) keeps them, made trainable."""
    if is_adapted(model.llm):
        for name, p in model.llm.named_parameters():
            p.requires_grad_("lora_" in name)
        return
    peft = _peft()
    config = peft.LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=list(settings.target_modules)
        if isinstance(settings.target_modules, tuple)
        else settings.target_modules,
        task_type="CAUSAL_LM",
    )
    model.llm = peft.get_peft_model(model.llm, config, autocast_adapter_dtype=True)
    for name, p in model.llm.named_parameters():
        if "lora_" in name:
            p.data = p.data.float()  # fp32 masters: the adapters are what trains


def is_adapted(llm: Any) -> bool:
    return hasattr(llm, "peft_config")


def merge_lora(model: Any) -> None:
    """Fold the adapters into the LLM's weights (in place; training is over)."""
    if not is_adapted(model.llm):
        raise ValueError("the LLM has no LoRA adapters to merge")
    base_dtype = next(p.dtype for n, p in model.llm.named_parameters() if "lora_" not in n)
    model.llm = model.llm.merge_and_unload().to(base_dtype)


def load_adapted(directory: str | Path, dtype: torch.dtype | None) -> Any:
    """An LLM saved unmerged: its recorded base with the adapters of ``directory``."""
    import json

    import transformers

    peft = _peft()
    base_name = json.loads((Path(directory) / ADAPTER_CONFIG).read_text())[
        "base_model_name_or_path"
    ]
    base = transformers.AutoModelForCausalLM.from_pretrained(
        base_name, dtype=dtype or torch.float32
    )
    log.info("LLM adapters %s on base %s", directory, base_name)
    return peft.PeftModel.from_pretrained(base, str(directory))
