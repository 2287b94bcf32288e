"""Training checkpoints without pickle: safetensors for tensors, JSON for everything else.

    runs/stage1/checkpoints/step-0000300/
        config.json  connector.safetensors  rag_connector.safetensors  [llm/]   # the model
        optimizer.safetensors  optimizer.json     # AdamW moments / param groups
        scheduler.json  [scaler.json]             # LR schedule position, fp16 loss scale
        rng.safetensors                           # torch CPU (and CUDA) generator states
        trainer_state.json                        # step, epoch, data position, losses; last

A checkpoint is written under a temporary name and renamed into place, and
``trainer_state.json`` is its last file, so ``latest_checkpoint`` never picks a
half-written one. Only the newest ``keep`` checkpoints are kept.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .components import save_model
from .model import TinyAlignVLM

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"
_PREFIX = "step-"


def checkpoint_dir(out: str | Path, step: int) -> Path:
    return Path(out) / CHECKPOINTS / f"{_PREFIX}{step:07d}"


def latest_checkpoint(out: str | Path) -> Path | None:
    """The complete checkpoint with the highest step under ``out``, or None."""
    root = Path(out) / CHECKPOINTS
    done = [p for p in root.glob(f"{_PREFIX}*") if (p / STATE_FILE).is_file()]
    return max(done, key=lambda p: int(p.name[len(_PREFIX) :]), default=None)


def _write_json(path: Path, payload: Any) -> None:
    path.write_text(json.dumps(payload, indent=1, sort_keys=True) + "\n")


def optimizer_to_files(optimizer: torch.optim.Optimizer, directory: Path) -> None:
    """``optimizer.safetensors`` (per-parameter tensors) + ``optimizer.json`` (the rest)."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, st in sd["state"].items():
        for key, value in st.items():
            if torch.is_tensor(value):
                tensors[f"{pid}.{key}"] = value.detach().to("cpu").contiguous()
            else:
                scalars.setdefault(str(pid), {})[key] = value
    save_file(tensors, directory / "optimizer.safetensors")
    _write_json(
        directory / "optimizer.json", {"param_groups": sd["param_groups"], "scalars": scalars}
    )


def optimizer_from_files(optimizer: torch.optim.Optimizer, directory: Path) -> None:
    meta = json.loads((directory / "optimizer.json").read_text())
    state: dict[int, dict[str, Any]] = {}
    for name, tensor in load_file(directory / "optimizer.safetensors").items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = tensor
    for pid, values in meta["scalars"].items():
        state.setdefault(int(pid), {}).update(values)
    groups = meta["param_groups"]
    for g in groups:
        if isinstance(g.get("betas"), list):
            g["betas"] = tuple(g["betas"])
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def rng_state() -> dict[str, torch.Tensor]:
    states = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            states[f"cuda.{i}"] = s
    return states


def set_rng_state(states: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(states["cpu"])
    cuda = [states[k] for k in sorted(states) if k.startswith("cuda.")]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def save_checkpoint(
    out: str | Path,
    step: int,
    *,
    model: TinyAlignVLM,
    tokenizer: Any,
    save_llm: bool,
    optimizer: torch.optim.Optimizer | None,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler | None,
    state: dict[str, Any],
    keep: int = 2,
    model_state: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write checkpoint ``step`` (model, optimizer, schedule, RNG, ``state``); prune old ones.

    ``optimizer`` None: no optimizer state (a sharded run, which cannot resume);
    ``model_state``: a sharded model's gathered weights."""
    final = checkpoint_dir(out, step)
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_model(model, tokenizer, tmp, save_llm=save_llm, state=model_state)
    if optimizer is not None:
        optimizer_to_files(optimizer, tmp)
    _write_json(tmp / "scheduler.json", scheduler.state_dict())
    if scaler is not None and scaler.is_enabled():
        _write_json(tmp / "scaler.json", scaler.state_dict())
    save_file(rng_state(), tmp / "rng.safetensors")
    _write_json(tmp / STATE_FILE, state)  # last: marks the checkpoint complete
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    log.info("checkpoint %s", final)
    if keep > 0:
        root = Path(out) / CHECKPOINTS
        done = sorted(
            (p for p in root.glob(f"{_PREFIX}*") if (p / STATE_FILE).is_file()),
            key=lambda p: int(p.name[len(_PREFIX) :]),
        )
        for old in done[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_training_state(
    ckpt: Path,
    *,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler | None,
) -> dict[str, Any]:
    """Restore optimizer, schedule, loss scale and RNG from ``ckpt``; return its state dict.

    The model weights come with the checkpoint's model files (``load_vlm(ckpt)``).
    """
    optimizer_from_files(optimizer, ckpt)
    scheduler.load_state_dict(json.loads((ckpt / "scheduler.json").read_text()))
    if scaler is not None and scaler.is_enabled() and (ckpt / "scaler.json").is_file():
        scaler.load_state_dict(json.loads((ckpt / "scaler.json").read_text()))
    set_rng_state(load_file(ckpt / "rng.safetensors"))
    return json.loads((ckpt / STATE_FILE).read_text())
