"""Building, loading and freezing TinyAlign VLMs: the one place that decides what trains.

    vlm, tok = build_vlm(TinyAlignConfig(vision="tiny", llm="tiny"), device="cpu",
                         init_seed=0, pretrain_texts=texts)      # fresh: connectors seeded
    vlm, tok, template = load_vlm("runs/stage1", "cpu")          # a saved model directory
    counts = apply_stage(vlm, 1)                                 # freezing, logged

A model directory is what ``TinyAlignVLM.save_pretrained`` writes: ``config.json``,
``connector.safetensors``, ``rag_connector.safetensors`` and, after stage 2, ``llm/``
(weights and tokenizer). A stage-1 directory records the frozen LLM by name only; for
the offline ``tiny`` LM the resolved cache directory is kept in ``config.extra``.

Stages (``STAGES``): 1 trains the connector and the RAG connector with the vision tower
and the LLM frozen; 2 trains the LLM as well. The vision tower is always frozen: the
bank's keys were computed with it.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from bankd.models.encoders import DualEncoder, load_encoder

from .conversation import ChatTemplate, get_template
from .llm import DEFAULT_PRETRAIN_STEPS, TINY_NAME, load_llm
from .model import TinyAlignConfig, TinyAlignVLM

log = logging.getLogger(__name__)

# component -> trainable, per stage; the vision tower is never trained.
STAGES: dict[int, dict[str, bool]] = {
    1: {"vision": False, "connector": True, "rag_connector": True, "llm": False},
    2: {"vision": False, "connector": True, "rag_connector": True, "llm": True},
}
LLM_SUBDIR = "llm"
LLM_PATH_KEY = "llm_path"  # config.extra: where a "tiny" LLM was loaded from
TINY_STEPS_KEY = "tiny_llm_steps"  # config.extra: how long that tiny LLM was pretrained


class LoadedVLM(NamedTuple):
    """What ``load_vlm`` returns: the model, its tokenizer and its chat template."""

    model: TinyAlignVLM
    tokenizer: Any
    template: ChatTemplate


def apply_stage(model: TinyAlignVLM, stage: int) -> dict[str, dict[str, int]]:
    """Freeze / unfreeze components for ``stage``; log and return parameter counts.

    Frozen components are also put in eval mode (no dropout noise in what the trainable
    parts learn from); trainable ones in train mode.
    """
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r} (choose from {sorted(STAGES)})")
    counts: dict[str, dict[str, int]] = {}
    for name, trainable in STAGES[stage].items():
        module: nn.Module | None = getattr(model, name)
        if module is None:  # no RAG connector in a model without retrieval
            continue
        module.requires_grad_(trainable)
        module.train(trainable)
        params = list(module.parameters())
        n_train = sum(p.numel() for p in params if p.requires_grad)
        counts[name] = {"trainable": n_train, "frozen": sum(p.numel() for p in params) - n_train}
    total_train = sum(c["trainable"] for c in counts.values())
    total = total_train + sum(c["frozen"] for c in counts.values())
    for name, c in counts.items():
        log.info(
            "stage %d: %-13s %s  trainable %12s  frozen %12s",
            stage,
            name,
            "train " if STAGES[stage][name] else "frozen",
            f"{c['trainable']:,}",
            f"{c['frozen']:,}",
        )
    log.info(
        "stage %d: %s of %s parameters trainable (%.2f%%)",
        stage,
        f"{total_train:,}",
        f"{total:,}",
        100.0 * total_train / max(total, 1),
    )
    counts["total"] = {"trainable": total_train, "frozen": total - total_train}
    return counts


def build_vlm(
    config: TinyAlignConfig,
    *,
    device: str | torch.device = "cpu",
    init_seed: int = 0,
    llm_source: str | Path | None = None,
    pretrain_texts: list[str] | None = None,
    tiny_llm_steps: int = DEFAULT_PRETRAIN_STEPS,
    progress: bool = True,
    vision: DualEncoder | None = None,
    llm_dtype: torch.dtype | None = None,
) -> tuple[TinyAlignVLM, Any]:
    """A VLM with freshly initialised connectors (seeded by ``init_seed``) and its tokenizer.

    ``llm_source`` overrides where the LLM weights come from (a saved ``llm/`` folder);
    ``config.llm`` stays the recorded name. Two calls with the same ``init_seed`` give
    the same connector weights whether or not the model has a RAG connector, so a
    baseline and a retrieval run start from the same point. ``vision``: the tower, when
    the caller loaded it already (``load_vision(config)``). ``llm_dtype``: the dtype the
    LLM's weights are loaded in (``memory.llm_weight_dtype``; default fp32).
    """
    vision = vision if vision is not None else load_vision(config)
    source = str(llm_source) if llm_source is not None else config.llm
    llm, tokenizer = load_llm(
        source,
        pretrain_texts=pretrain_texts,
        pretrain_steps=tiny_llm_steps,
        progress=progress,
        dtype=llm_dtype,
    )
    if config.llm == TINY_NAME and source == TINY_NAME:
        # "tiny" is a recipe, not an identity: remember which cached build was used.
        extra = {**config.extra, LLM_PATH_KEY: str(llm.name_or_path)}
        config = replace(config, extra={**extra, TINY_STEPS_KEY: tiny_llm_steps})
    torch.manual_seed(init_seed)  # connector first, then RAG connector (model.py order)
    model = TinyAlignVLM(config, vision, llm)
    return model.to(device), tokenizer


def load_vision(config: TinyAlignConfig, device: str | torch.device = "cpu") -> DualEncoder:
    """The frozen vision tower a config names (the one its bank must have been built with)."""
    return load_encoder(
        config.vision, seed=config.vision_seed, device=device, feature_layer=config.feature_layer
    )


def read_config(model_dir: str | Path) -> TinyAlignConfig:
    """The ``TinyAlignConfig`` saved in a model directory; clear errors if it is not one."""
    path = Path(model_dir) / "config.json"
    if not Path(model_dir).is_dir():
        raise FileNotFoundError(f"model directory {model_dir} does not exist")
    if not path.is_file():
        raise FileNotFoundError(
            f"{model_dir} is not a TinyAlign model directory (no config.json); "
            "pass the --out of a finished pretrain/finetune run"
        )
    try:
        return TinyAlignConfig.from_json(path.read_text())
    except (ValueError, TypeError) as e:
        raise ValueError(f"{path}: not a TinyAlign config: {e}") from e


def llm_source_of(model_dir: str | Path, config: TinyAlignConfig) -> str:
    """Where a saved model's LLM comes from: its own ``llm/``, else the recorded base LLM."""
    own = Path(model_dir) / LLM_SUBDIR
    if own.is_dir():
        return str(own)
    recorded = config.extra.get(LLM_PATH_KEY)
    if config.llm == TINY_NAME and recorded and Path(recorded).is_dir():
        return str(recorded)
    return config.llm  # a hub id or directory; "tiny" is looked up in the cache


def load_vlm(
    model_dir: str | Path,
    device: str | torch.device = "cpu",
    *,
    config: TinyAlignConfig | None = None,
    progress: bool = True,
    vision: DualEncoder | None = None,
    llm_dtype: torch.dtype | None = None,
) -> LoadedVLM:
    """Load a saved TinyAlign model: config, base components, trained weights.

    ``config`` overrides the saved one (e.g. a different ``top_k``); the trained weights
    must still fit it.
    """
    config = config or read_config(model_dir)
    for name in ("connector", "rag_connector") if config.retrieval else ("connector",):
        if not (Path(model_dir) / f"{name}.safetensors").is_file():
            raise FileNotFoundError(f"{model_dir} has no {name}.safetensors")
    model, tokenizer = build_vlm(
        config,
        device=device,
        llm_source=llm_source_of(model_dir, config),
        tiny_llm_steps=int(config.extra.get(TINY_STEPS_KEY, DEFAULT_PRETRAIN_STEPS)),
        progress=progress,
        vision=vision,
        llm_dtype=llm_dtype,
    )
    model.load_components(model_dir)
    model.eval()
    return LoadedVLM(model, tokenizer, get_template(config.template))


def save_model(
    model: TinyAlignVLM,
    tokenizer: Any,
    directory: str | Path,
    *,
    save_llm: bool,
    state: dict[str, torch.Tensor] | None = None,
) -> Path:
    """``save_pretrained`` plus the tokenizer next to a saved LLM (stage 2); ``state``: a
    sharded model's gathered weights."""
    directory = model.save_pretrained(directory, save_llm=save_llm, state=state)
    if save_llm:
        tokenizer.save_pretrained(directory / LLM_SUBDIR)
    return directory
