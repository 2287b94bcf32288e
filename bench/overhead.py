"""TinyAlign's inference and training overhead against the same VLM without retrieval.

    source .venv/bin/activate                        # after `make install`
    python bench/overhead.py                         # tiny models, CPU, demo data in a temp dir
    python bench/overhead.py --repeats 30 --new-tokens 16 --json overhead.json
    python bench/overhead.py --device cuda --vision google/siglip-so400m-patch14-384 \\
        --llm Qwen/Qwen2-0.5B --data llava/blip_laion_cc_sbu_558k.json \\
        --image-folder llava/images --bank bank/bank.faiss --precision bf16

The paper reports 0.18 -> 0.21 s per answer and about 1.1x memory. One run measures,
for two VLMs that differ only in retrieval (same vision tower, LLM, connector and
connector initialisation; ``--model``/``--baseline`` take trained model directories
instead):

* generate latency: one question (``--batch``) answered greedily with exactly
  ``--new-tokens`` new tokens (``min_new_tokens`` = ``max_new_tokens``, so neither stops
  early), TinyAlign including its query key, bank search and value fetch and its k*32
  extra prefill tokens. The configurations alternate, ``--warmup`` calls each dropped;
  median and p90 over ``--repeats``.
* peak memory: each configuration in a fresh child process that loads its model (and,
  for TinyAlign, opens the bank) and answers ``--repeats`` questions: the CUDA
  allocator's peak on a GPU, else the child's peak resident set while answering (Linux's
  VmHWM reset after loading; ``ru_maxrss``, loading included, where it cannot be reset).
* training step time: a short stage-1 run of the trainer itself (``tinyalign.train``,
  prefetch on) for each, ``--train-steps`` steps after ``--warmup`` dropped, in two
  alternating blocks; the step time is what metrics.csv records.

It prints each configuration's figures and ``ratio(tinyalign/baseline ...) = X.XX`` for
latency, memory and training step. ``--bank`` defaults to a bank built in the workdir
from ``--data`` (the in-process bank; pass HOST:PORT to search a running ``bankd serve``).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: no spinning threads

import argparse
import csv
import json
import logging
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from workload.demo import demo_bank, demo_data

from tinyalign.components import LoadedVLM, build_vlm, load_vision, load_vlm
from tinyalign.config import TrainConfig
from tinyalign.conversation import get_template
from tinyalign.inference import generate, open_retriever
from tinyalign.llm import TINY_NAME, texts_for_tiny_lm
from tinyalign.model import TinyAlignConfig
from tinyalign.train import train

CONFIGS = ("baseline", "tinyalign")
PROMPT = "What is in the image? Answer briefly."


def progress(msg: str) -> None:
    print(f"[overhead] {msg}", file=sys.stderr, flush=True)


def prepare(args: argparse.Namespace, workdir: Path) -> tuple[Path, Path, str]:
    """(data JSON, image folder, bank target): demo data and a bank built here unless given."""
    data, folder = demo_data(workdir, args.data, args.image_folder, n=args.n, log=progress)
    if args.bank:
        return data, folder, args.bank
    index = demo_bank(
        workdir,
        data,
        folder,
        encoder=args.vision,
        perceiver_steps=args.perceiver_steps,
        seed=args.seed,
        device=args.device,
        log=progress,
    )
    return data, folder, str(index)


def load_model(args: argparse.Namespace, name: str, data: Path, vision: Any = None) -> LoadedVLM:
    """The configuration's VLM: a trained directory when given, else built fresh (seeded)."""
    directory = args.model if name == "tinyalign" else args.baseline
    device = torch.device(args.device)
    if directory:
        vlm = load_vlm(directory, device, progress=False, vision=vision)
        if vlm.model.config.retrieval != (name == "tinyalign"):
            raise ValueError(f"--{'model' if name == 'tinyalign' else 'baseline'} {directory}")
        return vlm
    config = TinyAlignConfig(
        vision=args.vision, llm=args.llm, retrieval=name == "tinyalign", top_k=args.k
    )
    texts = texts_for_tiny_lm([data]) if args.llm == TINY_NAME else None
    model, tokenizer = build_vlm(
        config,
        device=device,
        init_seed=args.seed,
        pretrain_texts=texts,
        tiny_llm_steps=args.tiny_llm_steps,
        progress=False,
        vision=vision if vision is not None else load_vision(config, device),
    )
    return LoadedVLM(model.eval(), tokenizer, get_template("vicuna"))


def images_of(data: Path, folder: Path, count: int) -> list[Path]:
    entries = [e for e in json.loads(data.read_text()) if e.get("image")]
    if not entries:
        raise ValueError(f"{data} has no samples with an image")
    return [folder / entries[i % len(entries)]["image"] for i in range(count)]


def answer(args: argparse.Namespace, vlm: LoadedVLM, retriever: Any, images: list[Path]) -> float:
    """Seconds for one generate call over ``images`` (one batch)."""
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else lambda: None
    sync()
    t0 = time.perf_counter()
    generate(
        vlm,
        images,
        [PROMPT] * len(images),
        bank=retriever,
        max_new_tokens=args.new_tokens,
        min_new_tokens=args.new_tokens,
        precision=args.precision,
        batch_size=len(images),
    )
    sync()
    return time.perf_counter() - t0


def latency(args: argparse.Namespace, data: Path, folder: Path, bank: str) -> dict[str, Any]:
    """Alternating generate calls of both configurations; seconds per call."""
    first = load_model(args, "baseline", data)
    models = {
        "baseline": first,
        "tinyalign": load_model(args, "tinyalign", data, first.model.vision),
    }
    retriever, owned = open_retriever(models["tinyalign"], bank, args.k, bank_patience=60.0)
    times: dict[str, list[float]] = {c: [] for c in CONFIGS}
    images = images_of(data, folder, (args.warmup + args.repeats) * args.batch)
    try:
        for r in range(args.warmup + args.repeats):
            batch = images[r * args.batch : (r + 1) * args.batch]
            for name in CONFIGS if r % 2 == 0 else CONFIGS[::-1]:
                seconds = answer(
                    args, models[name], retriever if name == "tinyalign" else None, batch
                )
                if r >= args.warmup:
                    times[name].append(seconds)
    finally:
        if owned:
            retriever.close()
    return {c: summary(times[c]) for c in CONFIGS}


def summary(values: list[float]) -> dict[str, float]:
    s = sorted(values)
    return {
        "n": len(s),
        "median_s": statistics.median(s),
        "p90_s": s[min(len(s) - 1, round(0.9 * (len(s) - 1)))],
        "mean_s": statistics.fmean(s),
    }


def child_memory(args: argparse.Namespace, name: str) -> dict[str, Any]:
    """(in the child) peak memory of loading ``name`` and answering ``--repeats`` questions."""
    data, folder = Path(args.data), Path(args.image_folder)
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    vlm = load_model(args, name, data)
    retriever, owned = (None, False)
    if name == "tinyalign":
        retriever, owned = open_retriever(vlm, args.bank, args.k, bank_patience=60.0)
    images = images_of(data, folder, args.repeats * args.batch)
    answer(args, vlm, retriever, images[: args.batch])  # lazy initialisation out of the way
    loaded_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    # Loading (imports, building the tiny LM) peaks higher than answering and alike for
    # both; Linux resets the high-water mark VmHWM on "5" written to clear_refs.
    clear_refs = Path("/proc/self/clear_refs")
    reset = clear_refs.exists() and _try_write(clear_refs, "5")
    for r in range(args.repeats):
        answer(args, vlm, retriever, images[r * args.batch : (r + 1) * args.batch])
    if owned:
        retriever.close()
    rss = _vm_hwm() if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if cuda:
        kind, peak = "cuda max allocated", torch.cuda.max_memory_allocated()
    else:
        kind, peak = ("peak RSS while answering" if reset else "peak RSS"), rss
    return {"peak_bytes": peak, "kind": kind, "rss": rss, "rss_after_load": loaded_rss}


def _try_write(path: Path, text: str) -> bool:
    try:
        path.write_text(text)
        return True
    except OSError:
        return False


def _vm_hwm() -> int:
    """The process's peak resident set since the last reset, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024  # kB
    raise RuntimeError("/proc/self/status has no VmHWM")


def memory(args: argparse.Namespace, data: Path, folder: Path, bank: str) -> dict[str, Any]:
    """Each configuration's peak memory, measured in its own child process."""
    out = {}
    for name in CONFIGS:
        argv = [sys.executable, str(Path(__file__).resolve()), "--child-memory", name]
        argv += ["--data", str(data), "--image-folder", str(folder), "--bank", bank]
        for flag in ("vision", "llm", "device", "precision", "model", "baseline"):
            if getattr(args, flag) is not None:
                argv += [f"--{flag}", str(getattr(args, flag))]
        for flag in ("k", "seed", "tiny_llm_steps", "repeats", "batch", "new_tokens", "threads"):
            argv += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
        done = subprocess.run(argv, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"memory child for {name} failed:\n{done.stderr[-3000:]}")
        out[name] = json.loads(done.stdout.strip().splitlines()[-1])
    return out


def train_steps(args: argparse.Namespace, data: Path, folder: Path, bank: str, workdir: Path):
    """Median stage-1 step time of each configuration, two alternating blocks."""
    rows: dict[str, list[float]] = {c: [] for c in CONFIGS}
    block = max(1, args.train_steps // 2)
    for b in range(2):
        for name in CONFIGS if b % 2 == 0 else CONFIGS[::-1]:
            out = workdir / "runs" / f"{name}-{b}"
            train(
                TrainConfig(
                    data=str(data),
                    image_folder=str(folder),
                    out=str(out),
                    bank=bank if name == "tinyalign" else None,
                    retrieval=name == "tinyalign",
                    vision=args.vision,
                    llm=args.llm,
                    top_k=args.k,
                    batch_size=args.train_batch,
                    steps=args.warmup + block,
                    seed=args.seed,
                    workers=0,
                    device=args.device,
                    precision=args.precision,
                    progress=False,
                    log_every=10_000,
                    tiny_llm_steps=args.tiny_llm_steps,
                )
            )
            with (out / "metrics.csv").open() as f:
                got = list(csv.DictReader(f))[args.warmup :]
            rows[name] += [args.train_batch / float(r["samples_per_s"]) for r in got]
            progress(f"training block {b + 1}/2 {name}: {len(got)} steps")
    return {c: summary(rows[c]) for c in CONFIGS}


def report(r: dict[str, Any]) -> str:
    c = r["config"]
    lat, mem, step = r["latency"], r["memory"], r["train_step"]
    lines = [
        f"generate: batch {c['batch']}, {c['new_tokens']} new tokens, top-{c['k']}, "
        f"{lat['baseline']['n']} calls each, device {c['device']}, "
        f"torch threads {c['torch_threads']}; memory = {mem['baseline']['kind']}",
        f"{'configuration':14s} {'median s':>9s} {'p90 s':>8s} {'peak MiB':>9s} "
        f"{'train step ms':>14s}",
    ]
    for name in CONFIGS:
        lines.append(
            f"{name:14s} {lat[name]['median_s']:9.4f} {lat[name]['p90_s']:8.4f} "
            f"{mem[name]['peak_bytes'] / 2**20:9.1f} {1000 * step[name]['median_s']:14.1f}"
        )
    for key, label in (
        ("latency", "generate latency"),
        ("memory", "peak memory"),
        ("train_step", "training step time"),
    ):
        lines.append(f"ratio(tinyalign/baseline {label}) = {r['ratios'][key]:.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=20, help="measured generate calls each")
    p.add_argument("--warmup", type=int, default=2, help="calls / steps dropped at the start")
    p.add_argument("--batch", type=int, default=1, help="questions per generate call")
    p.add_argument("--new-tokens", type=int, default=16, help="tokens generated per answer")
    p.add_argument("--train-steps", type=int, default=20, help="measured training steps each")
    p.add_argument("--train-batch", type=int, default=8)
    p.add_argument("--k", type=int, default=5, help="retrieved values per image")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vision", default="tiny", help="vision tower: tiny, hub id or directory")
    p.add_argument("--llm", default="tiny", help="causal LM: tiny, hub id or directory")
    p.add_argument("--model", help="a trained TinyAlign model directory (instead of --llm)")
    p.add_argument("--baseline", help="a trained model directory without retrieval")
    p.add_argument("--data", help="LLaVA JSON (default: demo data generated into the workdir)")
    p.add_argument("--image-folder", help="default: the data file's folder")
    p.add_argument("--bank", help="HOST:PORT or bank.faiss (default: built in the workdir)")
    p.add_argument("--n", type=int, default=256, help="demo pairs to generate without --data")
    p.add_argument("--perceiver-steps", type=int, default=20, help="when building the bank")
    p.add_argument("--tiny-llm-steps", type=int, default=50, help="tiny LM pretraining (cached)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"])
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--workdir", help="keep data, bank and runs here (default: a temp folder)")
    p.add_argument("--json", help="write every figure and the configuration here")
    p.add_argument("--child-memory", choices=CONFIGS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    lowest = {"repeats": 1, "batch": 1, "new_tokens": 1, "train_steps": 2, "train_batch": 1}
    lowest |= {"k": 1, "warmup": 0}
    for name, low in lowest.items():
        if getattr(args, name) < low:
            p.error(f"--{name.replace('_', '-')} must be >= {low}")
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    if args.child_memory:
        print(json.dumps(child_memory(args, args.child_memory)))
        return 0
    with tempfile.TemporaryDirectory(prefix="bench-overhead-") as tmp:
        workdir = Path(args.workdir or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        data, folder, bank = prepare(args, workdir)
        progress("generate latency, alternating configurations")
        lat = latency(args, data, folder, bank)
        progress("peak memory, one child process per configuration")
        mem = memory(args, data, folder, bank)
        progress("training step time")
        step = train_steps(args, data, folder, bank, workdir)
    result = {
        "latency": lat,
        "memory": mem,
        "train_step": step,
        "ratios": {
            "latency": lat["tinyalign"]["median_s"] / lat["baseline"]["median_s"],
            "memory": mem["tinyalign"]["peak_bytes"] / mem["baseline"]["peak_bytes"],
            "train_step": step["tinyalign"]["median_s"] / step["baseline"]["median_s"],
        },
        "config": {
            **{k: v for k, v in vars(args).items() if k not in ("json", "child_memory")},
            "data": str(data),
            "bank": bank,
            "torch_threads": torch.get_num_threads(),
        },
    }
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    print(report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
