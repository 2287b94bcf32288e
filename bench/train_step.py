"""Training-step time with retrieval from a remote bankd against an in-process bank.

    source .venv/bin/activate                        # after `make install`
    python bench/train_step.py                       # demo data (512 pairs) in a temp folder
    python bench/train_step.py --steps 60 --warmup 3 --batch-size 8 --k 5 --json step.json
    python bench/train_step.py --data data/shapes/data.json --image-folder data/shapes \\
        --workdir /tmp/bench-train-step              # keep the bank; reused next time

One run, one model, one data set, both configurations (k, batch size and seed alike):

* remote: the bank served by ``bankd serve`` in a child process, searched over gRPC on
  loopback with values returned (``--bank 127.0.0.1:PORT``, what a user runs);
* in-process: ``bankd.search.local.LocalBank`` on the same bank files (``--bank bank.faiss``).

Each measurement is a short stage-1 run of the trainer itself (``tinyalign.train.train``:
the Prefetcher searching one batch ahead, vision tower, LLM forward/backward, AdamW),
and a step's time is what the trainer records in metrics.csv: the full optimizer step,
including any wait for retrieval. Runs alternate between the two configurations
(remote first in even blocks, in-process first in odd ones), each dropping its first
``--warmup`` steps, so machine drift hits both alike; block ``b`` uses seed ``seed + b``
for both configurations. It prints median, p90 and mean retrieval wait per step for each,
then ``ratio(remote/in-process step time) = X.XX`` (medians; target <= 1.05).
``OPENBLAS_NUM_THREADS=1`` and ``OMP_WAIT_POLICY=PASSIVE`` are set unless given (the
server child inherits them).
"""

from __future__ import annotations

import os

# Before numpy/torch load: the in-process search's BLAS threads must not spin on the cores
# the training step runs on (that would flatter the remote bank), nor OpenMP's.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import csv
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from workload.demo import demo_bank, demo_data

from bankd.serve.process import ServeProcess
from tinyalign.config import TrainConfig
from tinyalign.train import train

CONFIGS = ("remote", "in-process")


def progress(msg: str) -> None:
    print(f"[train_step] {msg}", file=sys.stderr, flush=True)


def prepare(args: argparse.Namespace, workdir: Path) -> tuple[Path, Path, Path]:
    """(data JSON, image folder, bank index): demo data and its bank unless given/kept."""
    data, folder = demo_data(workdir, args.data, args.image_folder, n=args.n, log=progress)
    index = demo_bank(
        workdir, data, folder, perceiver_steps=args.perceiver_steps, seed=args.seed, log=progress
    )
    return data, folder, index


def run_block(args, data: Path, folder: Path, bank: str, out: Path, seed: int) -> list[dict]:
    """One short trainer run; its metrics.csv rows after the warm-up steps."""
    train(
        TrainConfig(
            data=str(data),
            image_folder=str(folder),
            out=str(out),
            bank=bank,
            top_k=args.k,
            batch_size=args.batch_size,
            steps=args.warmup + args.block,
            seed=seed,
            workers=args.workers,
            device=args.device,
            progress=False,
            log_every=10_000,
            tiny_llm_steps=args.tiny_llm_steps,
        )
    )
    with (out / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))[args.warmup :]
    return [
        {
            "step_s": args.batch_size / float(r["samples_per_s"]),
            "wait_s": float(r["retrieval_wait_ms"]) / 1000,
        }
        for r in rows
    ]


def stats(rows: list[dict]) -> dict[str, float]:
    steps = sorted(r["step_s"] for r in rows)
    return {
        "steps": len(steps),
        "median_s": statistics.median(steps),
        "p90_s": steps[min(len(steps) - 1, int(round(0.9 * (len(steps) - 1))))],
        "mean_s": statistics.fmean(steps),
        "mean_wait_s": statistics.fmean(r["wait_s"] for r in rows),
    }


def measure(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    data, folder, index = prepare(args, workdir)
    blocks = max(1, -(-args.steps // args.block))
    rows: dict[str, list[dict]] = {c: [] for c in CONFIGS}
    progress("starting `bankd serve` in a child process")
    with ServeProcess(index, workdir / "server.log") as server:
        targets = {"remote": server.address, "in-process": str(index)}
        progress(
            f"bankd on {server.address}; {blocks} blocks x {args.block} steps per "
            f"configuration, {args.warmup} warm-up steps each"
        )
        for b in range(blocks):
            order = CONFIGS if b % 2 == 0 else CONFIGS[::-1]
            for name in order:
                t0 = time.perf_counter()
                got = run_block(
                    args,
                    data,
                    folder,
                    targets[name],
                    workdir / "runs" / f"{name}-{b}",
                    args.seed + b,
                )
                rows[name] += got
                progress(
                    f"block {b + 1}/{blocks} {name:10s} median step "
                    f"{1000 * statistics.median(r['step_s'] for r in got):.1f} ms "
                    f"({time.perf_counter() - t0:.1f} s)"
                )
    result = {c: stats(rows[c][: args.steps]) for c in CONFIGS}
    result["ratio"] = result["remote"]["median_s"] / result["in-process"]["median_s"]
    result["config"] = {k: v for k, v in vars(args).items() if k != "json"}
    result["config"].update(data=str(data), bank=str(index), torch_threads=torch.get_num_threads())
    return result


def report(r: dict[str, Any]) -> str:
    c = r["config"]
    lines = [
        f"training step, batch {c['batch_size']}, top-{c['k']}, prefetch on, "
        f"{r['remote']['steps']} measured steps per configuration, "
        f"torch threads {c['torch_threads']}",
        f"{'configuration':14s} {'median ms':>10s} {'p90 ms':>8s} {'mean ms':>8s} "
        f"{'retrieval wait ms/step':>23s}",
    ]
    for name in CONFIGS:
        s = r[name]
        lines.append(
            f"{name:14s} {1000 * s['median_s']:10.1f} {1000 * s['p90_s']:8.1f} "
            f"{1000 * s['mean_s']:8.1f} {1000 * s['mean_wait_s']:23.2f}"
        )
    lines.append(f"ratio(remote/in-process step time) = {r['ratio']:.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=60, help="measured steps per configuration")
    p.add_argument("--block", type=int, default=10, help="measured steps per block")
    p.add_argument("--warmup", type=int, default=3, help="steps dropped at the start of each block")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", help="LLaVA JSON (default: demo data generated into the workdir)")
    p.add_argument("--image-folder", help="default: the data file's folder")
    p.add_argument("--n", type=int, default=512, help="demo pairs to generate without --data")
    p.add_argument("--perceiver-steps", type=int, default=20, help="when building the bank")
    p.add_argument("--tiny-llm-steps", type=int, default=50, help="tiny LM pretraining (cached)")
    p.add_argument("--workers", type=int, default=1, help="DataLoader workers")
    p.add_argument("--device", default="auto")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (1: fastest for tiny models on a shared CPU)",
    )
    p.add_argument("--workdir", help="keep data, bank and runs here (default: a temp folder)")
    p.add_argument("--json", help="write every figure and the configuration here")
    args = p.parse_args(argv)
    if min(args.steps, args.block, args.batch_size, args.k) < 1 or args.warmup < 0:
        p.error("--steps, --block, --batch-size and --k must be >= 1, --warmup >= 0")
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench-train-step-") as tmp:
        workdir = Path(args.workdir or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        result = measure(args, workdir)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    print(report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
