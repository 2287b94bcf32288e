"""Stage 1 (pretrain) and stage 2 (finetune) training of a TinyAlign VLM.

CPU, the offline demo (a bank served by ``bankd serve --port 50051``)::

    tinyalign pretrain --data data/shapes/data.json --image-folder data/shapes \\
        --bank localhost:50051 --vision tiny --llm tiny --out runs/stage1 --steps 300
    tinyalign pretrain ... --out runs/baseline --no-retrieval       # the same model, no bank
    tinyalign finetune --data instruct.json --image-folder data/shapes \\
        --bank localhost:50051 --from runs/stage1 --out runs/stage2 --data-fraction 0.4

Data-parallel on 8 GPUs (each rank searches the bank for its own batches)::

    torchrun --nproc_per_node 8 -m tinyalign pretrain --data ... --bank bankd:50051 \\
        --vision google/siglip-so400m-patch14-384 --llm Qwen/Qwen2-0.5B --out runs/stage1

Library: ``train(TrainConfig(...)) -> TrainResult`` and ``evaluate(model, dataset,
retriever)``. The loop is ``pipeline.Prefetcher`` (retrieval one batch ahead) + AdamW with
warmup and cosine decay + gradient accumulation; what trains is ``components.apply_stage``;
checkpoints are ``checkpoint.py``. The training configuration lives in ``config.py``.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch

from bankd.models.encoders import DualEncoder, preprocess_images
from bankd_client import Bank

from .checkpoint import latest_checkpoint, load_training_state, save_checkpoint
from .components import apply_stage, build_vlm, load_vision, load_vlm, read_config, save_model
from .config import TrainConfig, connect_retriever, model_config, resolve_config
from .conversation import get_template
from .data import VLMDataset, collate
from .distributed import DistEnv, init_distributed, no_sync_unless, wrap_ddp
from .fsdp import full_state, shard
from .llm import TINY_NAME, tiny_lm_texts
from .lora import merge_lora
from .memory import apply_memory, llm_weight_dtype
from .model import TinyAlignConfig, TinyAlignVLM
from .pipeline import (
    Prefetcher,
    ResumableSampler,
    autocast,
    evaluate,
    micro_batches,
    resolve_precision,
)
from .progress import ProgressLog
from .reporting import open_reporter
from .retrieval import Retriever

__all__ = ["TrainConfig", "TrainResult", "evaluate", "train"]

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What a run produced; ``model`` is the trained model (on every rank)."""

    out: Path
    final_loss: float
    losses: list[float]  # per optimizer step, from step 1
    steps: int
    completed: bool  # False when stopped early by stop_after
    eval_loss: float | None = None
    eval_history: list[tuple[int, float]] = field(default_factory=list)
    trainable: dict[str, dict[str, int]] = field(default_factory=dict)
    seconds: float = 0.0
    model: TinyAlignVLM | None = field(default=None, repr=False)


@dataclass
class RunState:
    """Where a run is; saved as trainer_state.json, so a resumed run continues exactly."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # data position of the next micro-batch: epoch ...
    batch_in_epoch: int = 0  # ... and micro-batch within it
    losses: list[float] = field(default_factory=list)
    eval_history: list[tuple[int, float]] = field(default_factory=list)


def cosine_with_warmup(total_steps: int, warmup_ratio: float):
    """LR factor per step: linear warmup over ceil(ratio * total) steps, then cosine to ~0.

    No step has a zero learning rate (the first warmup step is 1/warmup).
    """
    warmup = math.ceil(warmup_ratio * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total_steps - warmup)))

    return factor


def train(config: TrainConfig, *, bank: Bank | None = None) -> TrainResult:
    """Run stage ``config.stage``; ``bank`` (an open ``bankd_client.Bank``) overrides
    ``config.bank`` and stays open afterwards."""
    env = init_distributed(config.device)
    try:
        with torch.enable_grad():  # also when called from inside a no_grad block
            return _train(config, env, bank)
    finally:
        env.close()


def _train(config: TrainConfig, env: DistEnv, bank: Bank | None) -> TrainResult:
    t_start = time.perf_counter()
    config = resolve_config(config)
    if config.retrieval and bank is None and not config.bank:
        raise ValueError("this model uses retrieval: pass --bank HOST:PORT (or --no-retrieval)")
    precision = resolve_precision(config.precision, env.device)
    out = Path(config.out)
    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "train_config.json").write_text(config.to_json() + "\n")
    log.info("train config (resolved): %s", config.to_json())
    log.info("device %s, precision %s, world size %d", env.device, precision, env.world_size)
    ckpt = latest_checkpoint(out) if config.resume else None
    if config.resume and ckpt is None:
        log.warning("--resume: no checkpoint in %s, starting from scratch", out)

    # The model's config: fresh, from stage 1, or that of the checkpoint being resumed.
    # The vision tower comes first so a bank built with another encoder fails fast.
    mcfg = read_config(ckpt) if ckpt is not None else model_config(config)
    vision = load_vision(mcfg, env.device)
    retriever = connect_retriever(config, vision, mcfg, bank)
    try:
        model, tokenizer = _model(config, env, mcfg, vision, ckpt, precision)
        trainable = apply_stage(model, config.stage)
        memory = config.memory()
        trainable = (
            apply_memory(model, memory, stage=config.stage, precision=precision) or trainable
        )
        if config.fsdp:
            shard(model, env)  # before the optimizer: it must see the sharded parameters
        result = _loop(config, env, model, tokenizer, retriever, ckpt, precision)
        result.trainable, result.seconds = trainable, time.perf_counter() - t_start
        return result
    finally:
        if retriever is not None:
            retriever.close()


def _model(
    config: TrainConfig,
    env: DistEnv,
    mcfg: TinyAlignConfig,
    vision: DualEncoder,
    ckpt: Path | None,
    precision: str,
) -> tuple[TinyAlignVLM, Any]:
    """(model on the device, tokenizer): resumed, from ``init_from``, or fresh and seeded;
    the LLM's weights loaded in the dtype ``memory.llm_weight_dtype`` decides."""
    llm_dtype = llm_weight_dtype(precision, config.stage, config.lora)
    torch.manual_seed(config.seed)
    if env.distributed and not env.is_main:
        env.barrier()  # rank 0 builds caches (the tiny LM) first
    if ckpt is not None or config.init_from:
        directory = ckpt if ckpt is not None else config.init_from
        model, tokenizer, _ = load_vlm(
            directory, env.device, config=mcfg, progress=False, vision=vision, llm_dtype=llm_dtype
        )
    else:
        texts = None
        if config.llm == TINY_NAME:
            texts = tiny_lm_texts([config.data], config.tiny_llm_corpus)
        model, tokenizer = build_vlm(
            mcfg,
            init_seed=config.seed,  # the same connector init with or without retrieval
            pretrain_texts=texts,
            tiny_llm_steps=config.tiny_llm_steps,
            progress=config.progress and env.is_main,
            vision=vision,
            llm_dtype=llm_dtype,
        )
    if env.distributed and env.is_main:
        env.barrier()
    return model.to(env.device), tokenizer


def _datasets(
    config: TrainConfig, model: TinyAlignVLM, tokenizer: Any
) -> tuple[VLMDataset, VLMDataset | None]:
    make = partial(
        VLMDataset,
        image_folder=config.image_folder,
        tokenizer=tokenizer,
        template=get_template(config.template),
        image_processor_fn=partial(preprocess_images, model.vision.image_processor),
        max_length=config.max_length,
        seed=config.seed,  # the data_fraction subset: the same for every run with this seed
        strict=config.strict,
    )
    train_ds = make(config.data, data_fraction=config.data_fraction)
    return train_ds, make(config.eval_data) if config.eval_data else None


def _loop(
    config: TrainConfig,
    env: DistEnv,
    model: TinyAlignVLM,
    tokenizer: Any,
    retriever: Retriever | None,
    ckpt: Path | None,
    precision: str,
) -> TrainResult:
    device, out = env.device, Path(config.out)
    train_ds, eval_ds = _datasets(config, model, tokenizer)
    sampler = ResumableSampler(
        len(train_ds), seed=config.seed, rank=env.rank, world_size=env.world_size
    )
    per_epoch = len(sampler) // config.batch_size  # micro-batches per epoch and rank
    if per_epoch < 1:
        raise ValueError(
            f"{config.data}: {len(train_ds)} samples are fewer than batch size "
            f"{config.batch_size} x {env.world_size} ranks"
        )
    total = config.steps or max(1, math.ceil(config.epochs * per_epoch / config.grad_accum))
    stop = min(total, config.stop_after or total)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    factor = cosine_with_warmup(total, config.warmup_ratio)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    # What must not change between a run and its resumption (else the data order differs).
    identity = {
        "total_steps": total,
        "batch_size": config.batch_size,
        "grad_accum": config.grad_accum,
        "world_size": env.world_size,
        "seed": config.seed,
    }
    state = RunState()
    if ckpt is not None:
        saved = load_training_state(ckpt, optimizer=optimizer, scheduler=scheduler, scaler=scaler)
        changed = {k: (saved.get(k), v) for k, v in identity.items() if saved.get(k) != v}
        if changed:
            raise ValueError(f"cannot resume {ckpt}: the run changed {changed} (saved, now)")
        state = RunState(**{k: saved[k] for k in asdict(RunState())})
        state.eval_history = [tuple(e) for e in state.eval_history]
        log.info(
            "resuming %s at step %d (epoch %d, batch %d)",
            ckpt,
            state.step,
            state.epoch,
            state.batch_in_epoch,
        )

    def save() -> None:
        whole = full_state(model) if config.fsdp else None  # a collective: every rank
        if env.is_main:
            save_checkpoint(
                out,
                state.step,
                model=model,
                tokenizer=tokenizer,
                save_llm=config.stage == 2,
                optimizer=None if config.fsdp else optimizer,
                scheduler=scheduler,
                scaler=scaler,
                state={**identity, **asdict(state), "config": asdict(config)},
                keep=config.keep_checkpoints,
                model_state=whole,
            )
        env.barrier()

    def run_eval() -> None:
        loss = evaluate(
            model,
            eval_ds,
            retriever,
            device=device,
            precision=precision,
            env=env,
            batch_size=config.eval_batch_size or config.batch_size,
        )
        state.eval_history.append((state.step, loss))
        reporter.scalars(state.step, {"eval/loss": loss})
        log.info("step %d: held-out loss %.4f", state.step, loss)

    samples_per_step = config.batch_size * config.grad_accum * env.world_size
    reporter = open_reporter(config.report_to, out, hparams=asdict(config), enabled=env.is_main)
    progress = ProgressLog(
        out,
        start_step=state.step,
        stop_step=stop,
        total_steps=total,
        samples_per_step=samples_per_step,
        log_every=config.log_every,
        enabled=env.is_main,
        bar=env.is_main and config.progress,
        desc=f"stage {config.stage}",
    )
    batches = Prefetcher(model, retriever, device, precision)(
        micro_batches(
            train_ds,
            sampler,
            batch_size=config.batch_size,
            collate_fn=partial(collate, pad_token_id=tokenizer.pad_token_id),
            workers=config.workers,
            start=(state.epoch, state.batch_in_epoch),
            count=(stop - state.step) * config.grad_accum,
            pin_memory=device.type == "cuda",
        )
    )
    text_only = any(e.get("image") is None for e in train_ds.entries)
    ddp = model if config.fsdp else wrap_ddp(model, env, find_unused=text_only)
    while state.step < stop:
        t0, step_loss, wait = time.perf_counter(), 0.0, 0.0
        for micro in range(config.grad_accum):
            batch = next(batches)  # the next batch's search is already under way
            with no_sync_unless(ddp, micro == config.grad_accum - 1), autocast(precision, device):
                loss = ddp(**batch.model_inputs()).loss
            scaler.scale(loss / config.grad_accum).backward()
            step_loss += float(loss.detach()) / config.grad_accum
            wait += batch.wait_s
            epoch, pos = batch.position
            state.epoch, state.batch_in_epoch = (
                (epoch, pos + 1) if pos + 1 < per_epoch else (epoch + 1, 0)
            )
        scaler.unscale_(optimizer)
        # The norm before clipping (inf: measured, nothing clipped).
        clip = config.max_grad_norm if config.max_grad_norm > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(params, clip)
        grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        scaler.step(optimizer)
        scaler.update()
        lr = scheduler.get_last_lr()[0]
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        state.losses.append(env.mean(step_loss))
        wait_ms = 1000.0 * wait / config.grad_accum
        seconds = time.perf_counter() - t0
        progress.step(state.step, state.losses[-1], lr, seconds, wait_ms)
        train_scalars = {"train/loss": state.losses[-1], "train/lr": lr}
        train_scalars |= {"train/grad_norm": grad_norm, "train/retrieval_wait_ms": wait_ms}
        train_scalars["train/samples_per_s"] = samples_per_step / seconds
        reporter.scalars(state.step, train_scalars)
        if eval_ds is not None and (
            state.step == total or (config.eval_every and state.step % config.eval_every == 0)
        ):
            run_eval()
        if state.step == stop or (config.save_every and state.step % config.save_every == 0):
            save()
    progress.close()
    final = {"final/loss": state.losses[-1]} if state.losses else {}
    if state.eval_history:
        final["final/eval_loss"] = state.eval_history[-1][1]
    if state.step == total and eval_ds is not None and not state.eval_history:
        run_eval()  # resumed a finished run that had no evaluation
    if state.step == total and config.lora_merge:
        merge_lora(model)  # the saved llm/ is then an ordinary checkpoint
    whole = full_state(model) if config.fsdp and state.step == total else None
    if state.step == total and env.is_main:
        save_model(model, tokenizer, out, save_llm=config.stage == 2, state=whole)
        summary = {
            "steps": state.step,
            "final_loss": state.losses[-1],
            "eval_loss": state.eval_history[-1][1] if state.eval_history else None,
        }
        (out / "train_result.json").write_text(json.dumps(summary, indent=1) + "\n")
        log.info("saved the stage-%d model to %s", config.stage, out)
    reporter.close(final)
    env.barrier()
    return TrainResult(
        out=out,
        final_loss=state.losses[-1] if state.losses else float("nan"),
        losses=list(state.losses),
        steps=state.step,
        completed=state.step == total,
        eval_loss=state.eval_history[-1][1] if state.eval_history else None,
        eval_history=list(state.eval_history),
        model=model,
    )
