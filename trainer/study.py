"""``tinyalign study``: the paper's protocol (stage 1, stage 2 on data fractions, eval) as
one resumable command, over arms and seeds, ending in report.md and its plots.

CPU, the demo (makes the demo data in runs/study/data; 33 min on a shared 2-core Xeon,
plus the tiny LM's one-time build when it is not cached yet)::

    tinyalign study --preset demo --out runs/study                # 2 runs at a time
    tinyalign study --config study.toml --out runs/study          # any data and models
    tinyalign study --preset demo --out runs/study --report-only  # report of finished runs

What it does (``StudyConfig`` in ``study_config.py`` lists every key):

1. banks, each built once from ``pretrain_data`` only and shared by the arms that use it
   (``main``; ``untrained``: the same Perceiver at step 0; ``ood``; ``mismatched``); a
   bank holding any instruction or eval image is refused;
2. stage 1 per (arm, seed) on the pretraining pairs, ``stage1_steps`` steps;
3. stage 2 per (arm, seed, fraction) from that stage-1 model on a seeded ``fraction`` of
   ``instruct_data`` for ``stage2_epochs`` epochs, then greedy answers to ``questions``
   (scored against ``answers``) and the held-out loss of the eval questions' answers.

Every arm with seed s sees the same samples in the same order and starts from the same
connector initialisation (the ``wider`` arm's connector has another shape) for the same
number of steps. Each finished unit writes ``result.json`` last; a rerun skips finished
units and redoes unfinished ones, so a killed study resumes without repeating work.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, replace
from functools import partial
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import torch

from bankd_client import errors, sample_id_to_int

from .study_config import (
    ARMS,
    MAIN,
    MISMATCHED,
    OOD,
    UNTRAINED,
    StudyConfig,
    demo_preset,
    llm_width,
    load_config,
    wider_connector,
)
from .study_eval import eval_conversations, evaluate_answers, heldout_loss

log = logging.getLogger(__name__)

RESULT = "result.json"
EVAL_CONVERSATIONS = "eval_conversations.json"


def _write_json(path: Path, payload: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1) + "\n")
    os.replace(tmp, path)


def unit(directory: Path, work: Callable[[Path], dict]) -> dict:
    """Run ``work(directory)`` unless ``directory/result.json`` says it finished; an
    unfinished directory (a killed run) is cleared first. The result is written last."""
    done = directory / RESULT
    if done.is_file():
        return json.loads(done.read_text())
    if directory.exists():
        log.info("study: %s was not finished; redoing it", directory)
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    result = work(directory)
    _write_json(done, result)
    return result


# -- banks ---------------------------------------------------------------------------------


def _held_out_images(config: StudyConfig) -> tuple[set[str], set[int]]:
    """(image paths, sample ids) of the instruction and eval sets: never in a bank."""
    instruct = json.loads(Path(config.instruct_data).read_text())
    images = {str(s["image"]) for s in instruct if s.get("image")}
    ids = {sample_id_to_int(s["id"]) for s in instruct if s.get("image")}
    for line in Path(config.questions).read_text().splitlines():
        if line.strip():
            images.add(str(json.loads(line)["image"]))
    return images, ids


def check_bank_is_clean(index: Path, data: str, config: StudyConfig) -> int:
    """Entries of the bank at ``index``; ValueError if one is an instruction or eval image."""
    from bankd.store.reader import Bank

    bank = Bank.load(index, verify=False, load_index=False)
    entry_ids = {int(i) for i in bank.ids}
    by_id = {sample_id_to_int(s["id"]): s.get("image") for s in json.loads(Path(data).read_text())}
    images, ids = _held_out_images(config)
    leaked = sorted(entry_ids & ids) + sorted(
        i for i in entry_ids if by_id.get(i) is not None and by_id[i] in images
    )
    if leaked:
        raise ValueError(f"bank {index} holds instruction/eval images (entry ids {leaked[:10]})")
    return len(entry_ids)


def build_banks(config: StudyConfig, out: Path, progress: bool) -> dict[str, str]:
    """Build (or reuse) each bank the arms need; {kind: index path}."""
    from bankd.build.config import BuildConfig
    from bankd.build.pipeline import build_bank

    folder = Path(config.image_folder)
    kinds = {
        MAIN: dict(data=config.pretrain_data),
        UNTRAINED: dict(data=config.pretrain_data, perceiver_steps=0),
        OOD: dict(data=config.ood_data, image_folder=Path(config.ood_image_folder or folder)),
        MISMATCHED: dict(data=config.pretrain_data, seed=config.bank_seed + 1)
        if config.mismatched_encoder is None
        else dict(data=config.pretrain_data, encoder=config.mismatched_encoder),
    }
    banks = {}
    for kind in config.banks():
        settings: dict[str, Any] = {
            "image_folder": folder,
            "encoder": config.vision,
            "seed": config.bank_seed,
            "perceiver_steps": config.perceiver_steps,
            **kinds[kind],
        }
        settings["data"] = Path(settings["data"])

        def work(directory: Path, settings=settings) -> dict:
            t0 = time.perf_counter()
            index = build_bank(
                BuildConfig(
                    out=directory / "bank.faiss",
                    device=config.device,
                    workers=0,
                    progress=progress,
                    **settings,
                )
            )
            entries = check_bank_is_clean(index, str(settings["data"]), config)
            return {"index": str(index), "entries": entries, "seconds": time.perf_counter() - t0}

        result = unit(out / "banks" / kind, work)
        banks[kind] = result["index"]
    return banks


# -- training and evaluation units ---------------------------------------------------------


def _train_config(config: StudyConfig, **kw: Any):
    from .config import TrainConfig

    return TrainConfig(
        image_folder=config.image_folder,
        batch_size=config.batch_size,
        grad_accum=config.grad_accum,
        max_length=config.max_length,
        precision=config.precision,
        device=config.device,
        workers=config.workers,
        tiny_llm_steps=config.tiny_llm_steps,
        log_every=25,
        **kw,
    )


def run_dir(plan: dict, arm: str, seed: int) -> Path:
    return Path(plan["out"]) / "runs" / arm / f"seed{seed}"


def stage1_config(config: StudyConfig, arm_name: str, seed: int, plan: dict, out: Path):
    """The stage-1 ``TrainConfig`` of an arm: only the arm's own settings differ."""
    arm = ARMS[arm_name]
    return _train_config(
        config,
        stage=1,
        data=config.pretrain_data,
        out=str(out),
        bank=plan["banks"].get(arm.bank) if arm.retrieval else None,
        retrieval=arm.retrieval,
        vision=config.vision,
        llm=config.llm,
        connector=plan["wider_spec"] if arm.wider else "mlp2x_gelu",
        top_k=config.k_of(arm),
        retrieval_mode=arm.mode,
        allow_encoder_mismatch=arm.bank == MISMATCHED,
        tiny_llm_corpus=config.tiny_llm_corpus,
        steps=config.stage1_steps,
        lr=config.stage1_lr,
        seed=seed,
    )


def stage2_config(
    config: StudyConfig, arm_name: str, seed: int, fraction: float, plan: dict, out: Path
):
    """The stage-2 ``TrainConfig``: the arm's stage-1 model, a seeded fraction of the
    instructions (the same subset and order for every arm with this seed)."""
    arm = ARMS[arm_name]
    return _train_config(
        config,
        stage=2,
        data=config.instruct_data,
        out=str(out),
        init_from=str(run_dir(plan, arm_name, seed) / "stage1"),
        bank=plan["banks"].get(arm.bank) if arm.retrieval else None,
        allow_encoder_mismatch=arm.bank == MISMATCHED,
        data_fraction=fraction,
        epochs=config.stage2_epochs,
        lr=config.stage2_lr,
        seed=seed,
    )


def stage1_unit(config: StudyConfig, arm: str, seed: int, plan: dict, progress: bool) -> dict:
    from .train import train

    def work(d: Path) -> dict:
        result = train(replace(stage1_config(config, arm, seed, plan, d), progress=progress))
        return {"losses": result.losses, "trainable": result.trainable, "seconds": result.seconds}

    return unit(run_dir(plan, arm, seed) / "stage1", work)


def stage2_unit(
    config: StudyConfig, arm: str, seed: int, fraction: float, plan: dict, progress: bool
) -> dict:
    """Stage 2, then the eval answers and the held-out loss."""
    from .train import train

    bank = plan["banks"].get(ARMS[arm].bank) if ARMS[arm].retrieval else None

    def work(d: Path) -> dict:
        train_config = stage2_config(config, arm, seed, fraction, plan, d / "model")
        result = train(replace(train_config, progress=progress))
        t0 = time.perf_counter()
        scores = evaluate_answers(config, d / "model", bank, d / "eval", progress)
        loss = heldout_loss(config, d / "model", bank, plan["eval_conversations"], seed)
        return {
            "losses": result.losses,
            "steps": result.steps,
            "heldout_loss": loss,
            "scores": scores,
            "seconds": result.seconds,
            "eval_seconds": time.perf_counter() - t0,
        }

    return unit(run_dir(plan, arm, seed) / f"frac{fraction:g}", work)


# -- the whole study -----------------------------------------------------------------------


def _worker_init() -> None:
    # One thread per run: tiny models run fastest so, and runs go in parallel instead.
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)


def _run_units(jobs: int, calls: list[Callable[[], dict]]) -> list[dict]:
    if jobs <= 1:
        return [call() for call in calls]
    with ProcessPoolExecutor(jobs, mp_context=get_context("spawn"), initializer=_worker_init) as ex:
        return [f.result() for f in [ex.submit(call) for call in calls]]


def prepare(config: StudyConfig, out: Path, progress: bool) -> dict:
    """Banks, the tiny LM (built once, before runs start in parallel) and the plan."""
    from bankd.models.encoders import load_encoder

    from .llm import TINY_NAME, load_llm, tiny_lm_texts

    out.mkdir(parents=True, exist_ok=True)
    (out / "study_config.json").write_text(config.to_json() + "\n")
    banks = build_banks(config, out, progress)
    if config.llm == TINY_NAME:
        texts = tiny_lm_texts([config.pretrain_data], config.tiny_llm_corpus)
        load_llm(
            TINY_NAME, pretrain_texts=texts, pretrain_steps=config.tiny_llm_steps, progress=progress
        )
    plan: dict[str, Any] = {"out": str(out), "banks": banks, "wider_spec": None}
    if "wider" in config.arms:
        vision = load_encoder(config.vision, seed=0, device="cpu")
        spec, added, rag = wider_connector(
            "mlp2x_gelu", "mlp2x_gelu", vision.vision_dim, llm_width(config.llm), 96
        )
        plan.update(wider_spec=spec, wider_added_params=added, rag_connector_params=rag)
        log.info(
            "study: wider connector %s adds %d parameters (RAG connector: %d)", spec, added, rag
        )
    plan["eval_conversations"] = eval_conversations(config, out / EVAL_CONVERSATIONS)
    _write_json(out / "plan.json", plan)
    return plan


def run_study(
    config: StudyConfig, out: str | Path, *, jobs: int = 1, progress: bool = True
) -> dict:
    """Run (or resume) every unit of the study, then write the report; its summary."""
    from .study_report import write_report

    out = Path(out)
    t0 = time.perf_counter()
    plan = prepare(config, out, progress)
    one = progress and jobs <= 1
    firsts = [
        partial(stage1_unit, config, arm, seed, plan, one)
        for seed in config.seeds
        for arm in config.arms
    ]
    _run_units(jobs, firsts)
    seconds = [
        partial(stage2_unit, config, arm, seed, f, plan, one)
        for seed in config.seeds
        for arm in config.arms
        for f in sorted(config.fractions, reverse=True)
    ]
    _run_units(jobs, seconds)
    log.info("study: all runs done in %.0f s", time.perf_counter() - t0)
    return write_report(config, out, plan)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of ``tinyalign study``."""
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--preset", choices=["demo"], help="demo: the demo data, made in OUT/data")
    which.add_argument("--config", help="study TOML (keys: StudyConfig's fields)")
    p.add_argument("--out", required=True, help="study directory (rerun to resume)")
    p.add_argument(
        "--jobs",
        type=int,
        help="runs in parallel processes, 1 thread each (default: 2 for the demo preset on "
        "a CPU with 2 or more cores, else 1)",
    )
    p.add_argument("--report-only", action="store_true", help="report the finished runs")
    p.add_argument("--seeds", help="override the seeds, e.g. 0,1")
    p.add_argument("--no-progress", action="store_true")


def _demo_data(out: Path, progress: bool) -> Path:
    from bankd.build.demo_data import DemoDataConfig, generate
    from bankd.build.demo_instruct import InstructConfig, generate_instruct

    data = out / "data"
    if not (data / "eval" / "answers_gt.jsonl").is_file():
        config = DemoDataConfig(out=data)
        generate(config, progress=progress)
        generate_instruct(config, InstructConfig(), progress=progress)
    return data


def run(args: argparse.Namespace) -> int:
    """Entry point of ``tinyalign study``; 2 on bad input."""
    from bankd.models.encoders import resolve_device

    from .study_report import write_report

    out, progress = Path(args.out), not args.no_progress
    try:
        if args.preset:
            config = demo_preset(_demo_data(out, progress))
        else:
            config = load_config(args.config)
        if args.seeds:
            config = replace(config, seeds=tuple(int(s) for s in args.seeds.split(",") if s))
        jobs = args.jobs
        if jobs is None:
            cpu = resolve_device(config.device).type == "cpu"
            jobs = min(2, os.cpu_count() or 1) if args.preset and cpu else 1
        if jobs < 1:
            raise ValueError(f"--jobs must be >= 1, got {jobs}")
        torch.set_num_threads(1)
        log.info("study config: %s", json.dumps(asdict(config)))
        if args.report_only:
            summary = write_report(config, out, json.loads((out / "plan.json").read_text()))
        else:
            summary = run_study(config, out, jobs=jobs, progress=progress)
    except (ValueError, FileNotFoundError, errors.BankError) as e:
        print(f"tinyalign study: error: {e}", file=sys.stderr)
        return 2
    print(summary["table"])
    print(f"report: {out / 'report.md'}")
    return 0
