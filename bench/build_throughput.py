"""Bank build throughput against the bare vision-tower forward, measured in one run.

    python bench/build_throughput.py                             # tiny and base, 4096 pairs
    python bench/build_throughput.py --encoders tiny --n 2048 --workers 2
    python bench/build_throughput.py --encoders base --batch-size 128 --json build.json

Made for CUDA (it runs on a CPU too, slowly). Demo pairs (``bankd.build.demo_data``, PNGs of
``--image-size`` px) are generated in a temporary folder. Each encoder is built in code
with random weights (throughput does not depend on them), saved with
``DualEncoder.save_pretrained`` and loaded by path, as a real checkpoint is:

* ``tiny``: the offline default's configuration (``tiny_siglip_config``: 64 px images,
  8 px patches, width 128, 4 vision layers);
* ``so400m`` (only when asked: ``--encoders so400m``): SigLIP-so400m-sized towers (384 px,
  14 px patches, width 1152, 27 layers), the paper's vision tower;
* ``base``: SigLIP-base-sized (224 px, 16 px patches, width 768, 12 layers per tower,
  as google/siglip-base-patch16-224), with the tiny byte-level tokenizer.

For each encoder, all at ``--batch-size`` and inside ``bankd.build.pipeline.build_environment``:

1. build pass: ``bankd.build.encoding.BuildPipeline.keys_and_values``, pass 2 of ``bankd build``
   (DataLoader workers decode, preprocess and tokenize; vision and text towers under
   bf16 autocast; key function; Perceiver value compressor; keys and values copied to
   the host) over all pairs, wall clock including the workers' start, per ``--workers``;
2. input alone: the same DataLoader (``BuildPipeline.loader``) without the models;
3. models alone: ``BuildPipeline.encode`` + ``compress`` + copies to the host on one batch
   already on the device, repeated;
4. bare vision tower: ``vision_model(pixel_values=...)`` under bf16 autocast on random
   pixels already on the device, repeated.

It prints pairs/s of each and ``ratio(build pass / bare vision tower)`` per encoder.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers

from bankd.build.config import BuildConfig
from bankd.build.data import load_llava_json
from bankd.build.demo_data import DemoDataConfig, generate
from bankd.build.encoding import BuildPipeline
from bankd.build.pipeline import build_environment
from bankd.models.encoders import (
    DualEncoder,
    autocast_context,
    build_tiny_image_processor,
    build_tiny_tokenizer,
    tiny_siglip_config,
)
from bankd.models.perceiver import PerceiverSpec, ValueCompressor, compress

ENCODERS = ("tiny", "base", "so400m")
# google/siglip-so400m-patch14-384's towers (text: its width and depth, the tiny vocabulary).
SO400M_VISION = {"hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27}
SO400M_VISION |= {"num_attention_heads": 16, "image_size": 384, "patch_size": 14}
SO400M_TEXT = {"hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27}
SO400M_TEXT |= {"num_attention_heads": 16, "max_position_embeddings": 64}


@dataclass(frozen=True)
class Config:
    encoders: tuple[str, ...] = ("tiny", "base")  # so400m on request (--encoders so400m)
    n: int = 4096
    image_size: int = 224
    batch_size: int = 64
    workers: tuple[int, ...] = (2, 8)
    repeats: int = 20
    device: str = "auto"
    seed: int = 0
    json: str | None = None


def progress(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def save_encoder(name: str, folder: Path, seed: int) -> Path:
    """A random-weight dual encoder of configuration ``name``, saved under folder/name."""
    tok = build_tiny_tokenizer()
    if name == "tiny":
        config = tiny_siglip_config(len(tok), tok.pad_token_id, tok.eos_token_id)
        processor = build_tiny_image_processor()
    else:  # base: transformers' SiglipConfig defaults are SigLIP-base's
        text = {"vocab_size": len(tok), "pad_token_id": tok.pad_token_id}
        text |= {"bos_token_id": tok.eos_token_id, "eos_token_id": tok.eos_token_id}
        vision: dict[str, Any] = {"image_size": 224}
        if name == "so400m":
            text |= SO400M_TEXT
            vision = dict(SO400M_VISION)
        config = transformers.SiglipConfig(text_config=text, vision_config=vision)
        px = vision["image_size"]
        processor = type(build_tiny_image_processor())(
            size={"height": px, "width": px}, image_mean=[0.5] * 3, image_std=[0.5] * 3
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.SiglipModel(config).float()
    return DualEncoder(model, tok, processor, name).save_pretrained(folder / name)


def pairs_per_s(fn: Any, pairs: int, repeats: int, device: torch.device) -> float:
    """pairs * repeats / seconds of `repeats` calls of fn(), after 3 warm-up calls."""
    for _ in range(3):
        fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync(device)
    return pairs * repeats / (time.perf_counter() - t0)


def build_pass(pipe: BuildPipeline, compressor: ValueCompressor, rows: np.ndarray) -> float:
    """Pairs/s of bankd build's pass 2 over rows (wall clock, workers' start included)."""
    for _ in pipe.keys_and_values(compressor, rows[: 2 * pipe.config.batch_size]):
        pass  # warm-up: CUDA context, cuBLAS handles, kernels
    sync(pipe.device)
    t0 = time.perf_counter()
    for _ in pipe.keys_and_values(compressor, rows):
        pass
    sync(pipe.device)
    return len(rows) / (time.perf_counter() - t0)


def input_only(pipe: BuildPipeline, rows: np.ndarray) -> float:
    """Pairs/s of the same DataLoader (decode, preprocess, tokenize) without the models."""
    t0 = time.perf_counter()
    for _ in pipe.loader(rows):
        pass
    return len(rows) / (time.perf_counter() - t0)


def on_device(cfg: Config, pipe: BuildPipeline, compressor: ValueCompressor) -> dict[str, Any]:
    """Pairs/s of the models on one batch already on the device, and of the bare tower."""
    dev, enc = pipe.device, pipe.encoder
    batch = {k: v.to(dev) for k, v in next(iter(pipe.loader(np.arange(cfg.batch_size)))).items()}
    b = len(batch["index"])

    def models() -> None:
        keys, feats = pipe.encode(batch)
        compress(compressor, feats).half().cpu()
        keys.float().cpu()

    px = torch.randn_like(batch["pixel_values"])

    @torch.no_grad()
    def tower() -> None:
        with autocast_context(dev):
            enc.vision_model(pixel_values=px)

    return {
        "models_only": pairs_per_s(models, b, cfg.repeats, dev),
        "bare_vision_tower": pairs_per_s(tower, b, cfg.repeats, dev),
        "device": str(dev),
        "batch": b,
        "image_px": int(px.shape[-1]),
        "vision_params_m": sum(p.numel() for p in enc.vision_model.parameters()) / 1e6,
    }


def measure(cfg: Config, name: str, encoder_dir: Path, data: Path) -> dict[str, Any]:
    samples = load_llava_json(data / "data.json")
    rows = np.arange(len(samples))
    out: dict[str, Any] = {}
    for workers in cfg.workers:
        build = BuildConfig(
            data=data / "data.json",
            image_folder=data,
            out=data / "unused.faiss",
            encoder=str(encoder_dir),
            seed=cfg.seed,
            batch_size=cfg.batch_size,
            workers=workers,
            device=cfg.device,
            progress=False,
        )
        with build_environment(build):
            pipe = BuildPipeline(build, samples)
            enc = pipe.encoder
            spec = PerceiverSpec(max_text_tokens=pipe.text_tokens)
            dims = (enc.vision_dim, enc.text_dim, enc.num_patches)
            compressor = ValueCompressor(spec, *dims, seed=cfg.seed).to(pipe.device)
            out[f"build_pass_workers{workers}"] = build_pass(pipe, compressor, rows)
            out[f"input_only_workers{workers}"] = input_only(pipe, rows)
            if workers == cfg.workers[-1]:
                out |= on_device(cfg, pipe, compressor)
        progress(f"  {name}, {workers} workers: {out}")
    return out


def report(cfg: Config, results: dict[str, dict[str, Any]], gpu: str) -> str:
    lines = [
        f"build throughput: {cfg.n} demo pairs ({cfg.image_size} px PNG), batch {cfg.batch_size},"
        f" {gpu}, torch {torch.__version__}",
        f"  {'pairs/s':<58}" + "".join(f"{name:>12}" for name in results),
    ]

    def row(label: str, key: str) -> str:
        return f"  {label:<58}" + "".join(f"{r[key]:12.0f}" for r in results.values())

    for w in cfg.workers:
        lines.append(
            row(
                f"build pass (bankd.build.pipeline pass 2), {w} DataLoader workers",
                f"build_pass_workers{w}",
            )
        )
        lines.append(
            row(f"  input alone (decode + preprocess), {w} workers", f"input_only_workers{w}")
        )
    lines.append(row("models alone (towers, key fn, Perceiver), batch on device", "models_only"))
    lines.append(row("bare vision tower forward (bf16 autocast), on device", "bare_vision_tower"))
    lines.append(
        f"  {'(vision tower: M parameters, image px)':<58}"
        + "".join(f"{r['vision_params_m']:8.1f}M {r['image_px']:>3}" for r in results.values())
    )
    best = f"build_pass_workers{cfg.workers[-1]}"
    for name, r in results.items():
        lines.append(
            f"ratio(build pass / bare vision tower) {name} = "
            f"{r[best] / r['bare_vision_tower']:.3f} ({cfg.workers[-1]} workers); "
            f"models alone / bare tower = {r['models_only'] / r['bare_vision_tower']:.3f}"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> Config:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    d = Config()
    p.add_argument("--encoders", default=",".join(d.encoders), help="tiny,base")
    p.add_argument("--n", type=int, default=d.n, help="demo pairs")
    p.add_argument("--image-size", type=int, default=d.image_size, help="demo image side, px")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--workers", default=",".join(map(str, d.workers)), help="e.g. 2,8")
    p.add_argument("--repeats", type=int, default=d.repeats, help="batches of the on-device parts")
    p.add_argument("--device", default=d.device)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    a = p.parse_args(argv)
    encoders = tuple(a.encoders.split(","))
    if not set(encoders) <= set(ENCODERS):
        p.error(f"--encoders takes names from {ENCODERS}")
    workers = tuple(int(w) for w in a.workers.split(","))
    if min(a.n, a.batch_size, a.repeats) < 1 or min(workers) < 0:
        p.error("n, batch-size, repeats must be positive, workers >= 0")
    return Config(
        encoders, a.n, a.image_size, a.batch_size, workers, a.repeats, a.device, a.seed, a.json
    )


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    progress(f"config: {asdict(cfg)}")
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="bankd-build-bench-") as where:
        folder = Path(where)
        t0 = time.perf_counter()
        generate(
            DemoDataConfig(
                folder / "data", n=cfg.n, heldout=0, seed=cfg.seed, image_size=cfg.image_size
            ),
            progress=False,
        )
        progress(f"{cfg.n} demo pairs written in {time.perf_counter() - t0:.0f} s")
        for name in cfg.encoders:
            encoder_dir = save_encoder(name, folder / "encoders", cfg.seed)
            progress(f"measuring {name}")
            results[name] = measure(cfg, name, encoder_dir, folder / "data")
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    text = report(cfg, results, gpu)
    print(text, flush=True)
    if cfg.json:
        Path(cfg.json).write_text(
            json.dumps({"config": asdict(cfg), "gpu": gpu, **results}, indent=1)
        )
        progress(f"figures written to {cfg.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
