"""``tinyalign experiment``: the no-retrieval baseline against TinyAlign stage 1, same setup.

CPU, the offline demo (builds a bank in runs/exp/bank/, serves it with ``bankd serve`` on
a loopback port, trains both models against it over gRPC, stops the server)::

    bankd demo-data --out data/shapes --n 2000
    tinyalign experiment --data data/shapes/data.json --image-folder data/shapes --out runs/exp
    tinyalign experiment --data data/shapes/data.json --out runs/exp --fractions 1.0
    tinyalign experiment --data ... --out runs/exp --bank localhost:50051     # a running server
    tinyalign experiment --data ... --out runs/exp --bank bank/bank.faiss     # in-process bank
    tinyalign experiment --data ... --out runs/exp --seeds 0,1,2              # 3 seeds, means

Both runs share data, steps, batch size, seed and starting connector weights; TinyAlign
retrieves top-k values with self-exclusion (a sample never sees its own entry). A run's
"final loss" is its mean training loss over the last 10% of steps (less noisy than the
last step). ``--eval-data`` (default: heldout.json next to ``--data``) is evaluated with
every saved model at the end, TinyAlign with retrieval. ``--fractions 0.4,1.0`` (the
default) also trains both on a seeded 40% subset for the same number of EPOCHS, so 0.4x
the steps (equal steps on less data would only repeat samples, not save data), and
compares TinyAlign on 40% with the baseline on 100% by held-out loss. Writes
``loss_curves.csv`` (step, run, seed, loss), ``loss_curves.png`` (matplotlib: the mean
over seeds with a lowest-to-highest band), ``summary.json`` (means over seeds, and each
seed's numbers) and ``runs/<name>/`` (``runs/<name>/seed<s>/`` with several seeds: each
model with its metrics.csv and train_config.json). The accuracy study with controls and
CIs is ``tinyalign study``; this is the quick stage-1 comparison.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from bankd.models.encoders import preprocess_images, resolve_device
from bankd.serve.process import ServeProcess as BankServerProcess
from bankd_client import errors

from .components import load_vlm
from .config import TrainConfig
from .data import VLMDataset
from .llm import DEFAULT_PRETRAIN_STEPS
from .pipeline import resolve_precision
from .plots import plot_loss_curves
from .retrieval import Retriever, open_bank
from .train import evaluate, train

log = logging.getLogger(__name__)

FINAL_NOTE = "final loss = mean training loss over the last 10% of steps"


@dataclass(frozen=True)
class ExperimentConfig:
    """One comparison; saved as experiment_config.json in ``out``."""

    data: str
    out: str
    image_folder: str | None = None  # default: the data file's folder
    eval_data: str | None = None  # default: heldout.json next to data, if present
    bank: str | None = None  # "host:port", a .faiss path, or None: build and serve one
    fractions: tuple[float, ...] = (0.4, 1.0)
    steps: int = 250  # at the largest fraction; one epoch of the 2000 demo pairs at batch 8
    batch_size: int = 8
    top_k: int = 5
    seed: int = 0  # the bank's seed, and the runs' when seeds is empty
    seeds: tuple[int, ...] = ()  # every run once per seed; curves and numbers are means
    max_length: int = 512
    perceiver_steps: int | None = None  # None: bankd build's default (bank built here only)
    tiny_llm_steps: int = DEFAULT_PRETRAIN_STEPS
    workers: int = 1
    device: str = "auto"
    progress: bool = True

    def __post_init__(self) -> None:
        if not self.fractions or not all(0.0 < f <= 1.0 for f in self.fractions):
            raise ValueError(f"fractions must be in (0, 1], got {self.fractions}")
        for name in ("steps", "batch_size", "top_k", "tiny_llm_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct, got {self.seeds}")

    @property
    def run_seeds(self) -> tuple[int, ...]:
        return self.seeds or (self.seed,)


def final_loss(losses: Sequence[float]) -> float:
    """Mean over the last 10% of steps (at least one step)."""
    n = max(1, round(0.1 * len(losses)))
    return sum(losses[-n:]) / n


def reduction(baseline: float, tinyalign: float) -> float:
    """Relative loss reduction of TinyAlign: (baseline - tinyalign) / baseline."""
    return (baseline - tinyalign) / baseline


@contextlib.contextmanager
def _phase(times: dict[str, float], name: str) -> Iterator[None]:
    log.info("experiment: %s ...", name)
    t0 = time.perf_counter()
    yield
    times[name] = round(time.perf_counter() - t0, 2)
    log.info("experiment: %s done in %.1f s", name, times[name])


def ensure_bank(config: ExperimentConfig, folder: Path, directory: Path) -> tuple[Path, bool]:
    """(index, built now): the bank of ``config.data`` in ``directory``; reused when its
    manifest has the same build settings and the data file the same SHA-256."""
    from bankd.build.config import BuildConfig
    from bankd.build.pipeline import build_bank
    from bankd.store.manifest import Manifest
    from bankd.store.paths import BankPaths

    index = directory / "bank.faiss"
    steps = {} if config.perceiver_steps is None else {"perceiver_steps": config.perceiver_steps}
    build = BuildConfig(
        data=Path(config.data),
        image_folder=folder,
        out=index,
        seed=config.seed,
        workers=config.workers,
        device=config.device,
        progress=config.progress,
        **steps,
    )
    keys = ("encoder", "seed", "perceiver_steps", "index_factory", "entries")
    want = {k: build.to_dict()[k] for k in keys}
    want["data_sha256"] = hashlib.sha256(Path(config.data).read_bytes()).hexdigest()
    stamp, manifest = directory / "experiment_bank.json", BankPaths(index).manifest
    if stamp.is_file() and manifest.is_file():
        built = Manifest.from_json(manifest.read_bytes(), where=manifest).config
        if json.loads(stamp.read_text()) == want and all(built.get(k) == want[k] for k in keys):
            log.info("experiment: reusing the bank %s (same data and build settings)", index)
            return index, False
    build_bank(build, discard_other=True)  # the folder is the experiment's own
    stamp.write_text(json.dumps(want, indent=1) + "\n")
    return index, True


@dataclass(frozen=True)
class RunSpec:
    name: str
    retrieval: bool
    fraction: float
    steps: int
    samples: int


def plan_runs(config: ExperimentConfig, n_samples: int) -> list[RunSpec]:
    """Baseline, TinyAlign per fraction, largest first; every fraction trains for the same
    number of epochs as the largest one (proportionally fewer steps)."""
    top = max(config.fractions)
    n_top = max(1, round(top * n_samples))  # as VLMDataset draws its subset
    runs = []
    for f in sorted(set(config.fractions), reverse=True):
        n = max(1, round(f * n_samples))
        if n < config.batch_size:
            raise ValueError(f"fraction {f} leaves {n} samples, fewer than the batch size")
        steps, tag = max(1, round(config.steps * n / n_top)), "" if f == top else f"-{f:g}"
        runs += [
            RunSpec(f"baseline{tag}", False, f, steps, n),
            RunSpec(f"tinyalign{tag}", True, f, steps, n),
        ]
    return runs


def heldout_loss(
    run_dir: Path, eval_data: str, folder: str, bank: str | None, config: ExperimentConfig
) -> float:
    """Token-weighted held-out loss of a saved model (with retrieval if it has a RAG connector)."""
    device = resolve_device(config.device)
    model, tokenizer, template = load_vlm(run_dir, device, progress=False)
    dataset = VLMDataset(
        eval_data,
        folder,
        tokenizer,
        template,
        partial(preprocess_images, model.vision.image_processor),
        max_length=config.max_length,
        seed=config.seed,
    )
    retriever = None
    if model.config.retrieval:
        retriever = Retriever.from_bank(
            open_bank(bank),
            model.vision,
            model.config.top_k,
            feature_layer=model.config.feature_layer,
            mode=model.config.retrieval_mode,
        )
    try:
        return evaluate(
            model,
            dataset,
            retriever,
            batch_size=config.batch_size,
            device=device,
            precision=resolve_precision("auto", device),
            workers=config.workers,
        )
    finally:
        if retriever is not None:
            retriever.close()


def run_experiment(config: ExperimentConfig) -> dict[str, Any]:
    """Train every planned run, evaluate them, write the CSV, the PNG and summary.json."""
    t_start, times = time.perf_counter(), {}
    out, data = Path(config.out), Path(config.data)
    out.mkdir(parents=True, exist_ok=True)
    (out / "experiment_config.json").write_text(json.dumps(asdict(config), indent=1) + "\n")
    folder = config.image_folder or str(data.parent)
    eval_data = config.eval_data
    if eval_data is None and (data.parent / "heldout.json").is_file():
        eval_data = str(data.parent / "heldout.json")
    runs = plan_runs(config, len(json.loads(data.read_text())))
    results: dict[str, dict[str, Any]] = {}
    with contextlib.ExitStack() as stack:  # the server stops on errors too
        bank = config.bank
        local = bank is not None and (bank.endswith(".faiss") or Path(bank).exists())
        bank_info = {"target": bank, "mode": "in-process" if local else "given server"}
        if bank is None:
            with _phase(times, "bank build"):
                index, built = ensure_bank(config, Path(folder), out / "bank")
            with _phase(times, "bank server start"):
                server = stack.enter_context(BankServerProcess(index, out / "bank" / "server.log"))
            bank = server.address
            bank_info = {
                "target": bank,
                "mode": "bankd serve subprocess, gRPC on loopback",
                "index": str(index),
                "built_now": built,
            }
        seeds = config.run_seeds
        per_seed: dict[str, dict[int, dict[str, Any]]] = {r.name: {} for r in runs}
        for seed in seeds:
            for i, run in enumerate(runs, 1):
                what = f"run {i}/{len(runs)} {run.name} seed {seed} ({run.steps} steps)"
                with _phase(times, what):
                    result = train(
                        TrainConfig(
                            data=config.data,
                            out=str(_run_dir(out, run.name, seed, seeds)),
                            image_folder=folder,
                            bank=bank if run.retrieval else None,
                            retrieval=run.retrieval,
                            top_k=config.top_k,
                            batch_size=config.batch_size,
                            steps=run.steps,
                            max_length=config.max_length,
                            data_fraction=run.fraction,
                            seed=seed,
                            workers=config.workers,
                            device=config.device,
                            progress=config.progress,
                            log_every=max(1, run.steps // 10),
                            tiny_llm_steps=config.tiny_llm_steps,
                        )
                    )
                per_seed[run.name][seed] = {
                    "final_loss": final_loss(result.losses),
                    "last_step_loss": result.losses[-1],
                    "losses": result.losses,
                    "seconds": round(result.seconds, 1),
                    "heldout_loss": None,
                }
        if eval_data is not None:
            with _phase(times, f"held-out eval on {eval_data}"):
                for run in runs:
                    for seed in seeds:
                        per_seed[run.name][seed]["heldout_loss"] = heldout_loss(
                            _run_dir(out, run.name, seed, seeds), eval_data, folder, bank, config
                        )
        for run in runs:
            results[run.name] = {
                **asdict(run),
                **_mean_over_seeds(per_seed[run.name]),
                "epochs": run.steps * config.batch_size / run.samples,
            }
    summary = {
        "config": asdict(config),
        "final_loss_definition": FINAL_NOTE,
        "eval_data": eval_data,
        "bank": bank_info,
        **_compare(config, runs, results),
        "runs": {k: {n: v for n, v in r.items() if n != "losses"} for k, r in results.items()},
        "timings_s": times,
        "wall_s": round(time.perf_counter() - t_start, 1),
    }
    with (out / "loss_curves.csv").open("w") as f:
        f.write("step,run,seed,loss\n")
        for r in runs:
            for seed, one in per_seed[r.name].items():
                f.writelines(
                    f"{s},{r.name},{seed},{v:.6f}\n" for s, v in enumerate(one["losses"], 1)
                )
    plot_loss_curves(
        {"stage 1": {r.name: [one["losses"] for one in per_seed[r.name].values()] for r in runs}},
        out / "loss_curves.png",
        title=f"stage-1 training loss: baseline vs TinyAlign (top-{config.top_k}), "
        f"mean over seeds {', '.join(map(str, config.run_seeds))}",
    )
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def _run_dir(out: Path, name: str, seed: int, seeds: tuple[int, ...]) -> Path:
    return out / "runs" / name if len(seeds) == 1 else out / "runs" / name / f"seed{seed}"


def _mean_over_seeds(per_seed: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Means of the numbers (and the per-step mean curve) over seeds; the seeds' own too."""
    runs = list(per_seed.values())

    def mean(key: str) -> float | None:
        values = [r[key] for r in runs]
        return None if None in values else sum(values) / len(values)

    n = min(len(r["losses"]) for r in runs)
    return {
        "final_loss": mean("final_loss"),
        "last_step_loss": mean("last_step_loss"),
        "heldout_loss": mean("heldout_loss"),
        "losses": [sum(r["losses"][i] for r in runs) / len(runs) for i in range(n)],
        "seconds": round(sum(r["seconds"] for r in runs), 1),
        "seeds": {s: {k: v for k, v in r.items() if k != "losses"} for s, r in per_seed.items()},
    }


def _compare(config: ExperimentConfig, runs: list[RunSpec], results: dict) -> dict[str, Any]:
    """Baseline vs TinyAlign per fraction, and TinyAlign on less data vs the full baseline."""

    def pair(b: float | None, t: float | None) -> dict[str, float | None]:
        return {
            "baseline": b,
            "tinyalign": t,
            "reduction": None if b is None or t is None else reduction(b, t),
        }

    def pct(p: dict) -> str:
        return (
            f"baseline {p['baseline']:.3f}, TinyAlign {p['tinyalign']:.3f} "
            f"({-100 * p['reduction']:+.1f}%)"
        )

    comparisons, efficiency, lines = [], [], []
    full = results[runs[0].name]
    for base, rag in zip(runs[::2], runs[1::2], strict=True):
        b, t = results[base.name], results[rag.name]
        c = {
            "fraction": base.fraction,
            "steps": base.steps,
            "runs": [base.name, rag.name],
            "final_loss": pair(b["final_loss"], t["final_loss"]),
            "heldout_loss": pair(b["heldout_loss"], t["heldout_loss"]),
        }
        where = "" if base is runs[0] else f" on {100 * base.fraction:g}% of the data"
        line = f"stage-1 loss at step {base.steps}{where}: {pct(c['final_loss'])}"
        if b["heldout_loss"] is not None:
            line += f" | held-out: {pct(c['heldout_loss'])}"
        comparisons.append(c)
        lines.append(line)
        if base is not runs[0] and t["heldout_loss"] is not None:
            e = pair(full["heldout_loss"], t["heldout_loss"])
            efficiency.append(
                {"runs": [runs[0].name, rag.name], "epochs": t["epochs"], "heldout_loss": e}
            )
            lines.append(
                f"data efficiency (held-out loss, same {t['epochs']:.2f} epochs): TinyAlign on "
                f"{100 * rag.fraction:g}% of the data ({rag.samples} samples, {rag.steps} steps) "
                f"{e['tinyalign']:.3f} vs baseline on {100 * runs[0].fraction:g}% "
                f"({runs[0].samples} samples, {runs[0].steps} steps) {e['baseline']:.3f} "
                f"({-100 * e['reduction']:+.1f}%)"
            )
    lines.append(
        f"({FINAL_NOTE}; % = (TinyAlign - baseline) / baseline; TinyAlign retrieves "
        f"top-{config.top_k} with self-exclusion)"
    )
    return {"comparisons": comparisons, "data_efficiency": efficiency, "lines": lines}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of ``tinyalign experiment``."""
    p.add_argument("--data", required=True, help="LLaVA-format JSON of image-caption pairs")
    p.add_argument("--image-folder", help="root of the JSON's image paths (default: its folder)")
    p.add_argument("--out", required=True, help="experiment directory")
    p.add_argument("--bank", help='"host:port" or a .faiss path (default: build and serve one)')
    p.add_argument("--eval-data", help="held-out JSON (default: heldout.json next to --data)")
    p.add_argument(
        "--fractions",
        default="0.4,1.0",
        help="data fractions; smaller ones train for the same epochs (default 0.4,1.0)",
    )
    p.add_argument("--steps", type=int, default=250, help="optimizer steps, largest fraction")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--seed", type=int, default=0, help="the bank's seed (and the runs')")
    p.add_argument("--seeds", help="run every comparison once per seed, e.g. 0,1,2")
    p.add_argument("--max-length", type=int, default=512, help="text tokens per sample")
    p.add_argument("--perceiver-steps", type=int, help="bank build (default: bankd build's)")
    p.add_argument("--tiny-llm-steps", type=int, default=DEFAULT_PRETRAIN_STEPS)
    p.add_argument("--workers", type=int, default=1, help="DataLoader worker processes")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, help="torch CPU threads (default on a CPU: 1)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    """Entry point of ``tinyalign experiment``: prints the comparison; 2 on bad input."""
    try:
        config = ExperimentConfig(
            data=args.data,
            out=args.out,
            image_folder=args.image_folder,
            eval_data=args.eval_data,
            bank=args.bank,
            fractions=tuple(float(f) for f in args.fractions.split(",") if f),
            steps=args.steps,
            batch_size=args.batch_size,
            top_k=args.top_k,
            seed=args.seed,
            seeds=tuple(int(x) for x in (args.seeds or "").split(",") if x),
            max_length=args.max_length,
            perceiver_steps=args.perceiver_steps,
            tiny_llm_steps=args.tiny_llm_steps,
            workers=args.workers,
            device=args.device,
            progress=not args.no_progress,
        )
        if args.threads or resolve_device(config.device).type == "cpu":
            # Unless OMP_WAIT_POLICY=passive was set before torch loaded, a second spinning
            # thread makes tiny-model steps up to 20x slower on a shared machine.
            torch.set_num_threads(args.threads or 1)
        summary = run_experiment(config)
    except (ValueError, FileNotFoundError, errors.BankError) as e:
        print(f"tinyalign experiment: error: {e}", file=sys.stderr)
        return 2
    print("\n".join(summary["lines"]))
    print(f"wall time {summary['wall_s']:.0f} s; summary in {Path(args.out) / 'summary.json'}")
    return 0
