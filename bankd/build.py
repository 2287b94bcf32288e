"""``bankd build``: LLaVA-format image-caption pairs -> a memory bank on disk.

CPU (the offline demo)::

    bankd demo-data --out data/shapes --n 2000
    bankd build --data data/shapes/data.json --image-folder data/shapes \\
        --out bank/bank.faiss --encoder tiny

GPU, a real encoder, a seeded 100k sample, an IVF index::

    bankd build --data blip_laion_cc_sbu_558k.json --image-folder llava-pretrain \\
        --out bank/bank.faiss --encoder google/siglip-base-patch16-224 \\
        --entries 100000 --index-type IVF1024,Flat --device cuda

Pipeline (``build_bank``): read and sample the pairs; pass 1 runs the frozen encoder over
the pairs the Perceiver trains on plus the evaluation split, fitting the key center and
caching the features when they fit the memory budget; the value compressor is trained
self-supervised on them; the informativeness of its values (trained vs. the same
compressor untrained) is measured on the evaluation split; pass 2 runs every entry
through encoder -> keys (``Embedder``, the path the server's Embed rpc uses) and values
(fp16) and streams them into ``BankWriter``. Same inputs + seed -> byte-identical keys
and values on the same machine.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from bankd_client.identity import sample_id_to_int

from .data import ImageCaptionDataset, Sample, collate, load_llava_json, with_images
from .models.embedder import Embedder
from .models.encoders import autocast_context, load_encoder, resolve_device
from .models.keys import KeyConfig, KeyFunction
from .models.perceiver import (
    CachedFeatures,
    FeatureBatch,
    PerceiverSpec,
    ValueCompressor,
    compress,
    train_compressor,
)
from .models.probe import format_informativeness, informativeness

log = logging.getLogger(__name__)

PROBE_TRAIN_MAX = 4000  # pairs the informativeness probes are fitted on, at most
MIN_EVAL_PAIRS = 20  # fewer held-out pairs than this: no informativeness report


@dataclass(frozen=True)
class BuildConfig:
    """Everything that decides the bank; logged at start and saved in its manifest."""

    data: Path
    image_folder: Path
    out: Path  # index path, e.g. bank/bank.faiss; the other files go next to it
    encoder: str = "tiny"
    seed: int = 0
    entries: int | None = None  # a seeded sample of this many pairs; None = all
    index_factory: str = "Flat"
    batch_size: int = 64  # encoder batch
    workers: int = 2  # DataLoader workers decoding images; 0 = in the main process
    device: str = "auto"  # cuda when available
    perceiver_steps: int = 300
    perceiver_lr: float = 1e-3
    perceiver_batch_size: int = 32
    perceiver_train_samples: int = 50_000  # seeded subset the compressor trains on
    max_text_tokens: int = 96  # caption tokens fed to the compressor (capped by the encoder)
    text_weight: float = 0.0  # weight of the question-text component of keys
    key_temperature: float = 1.0
    eval_fraction: float = 0.1  # pairs kept out of compressor training, for the report
    feature_cache_mb: int = 2048  # cache frozen features in memory up to this size
    progress: bool = True

    def __post_init__(self) -> None:
        if self.entries is not None and self.entries < 1:
            raise ValueError(f"entries must be >= 1, got {self.entries}")
        for name in (
            "batch_size",
            "perceiver_batch_size",
            "perceiver_train_samples",
            "max_text_tokens",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.workers < 0 or self.perceiver_steps < 0 or self.feature_cache_mb < 0:
            raise ValueError("workers, perceiver_steps and feature_cache_mb must be >= 0")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError(f"eval_fraction must be in [0, 1), got {self.eval_fraction}")
        if not self.perceiver_lr > 0:
            raise ValueError(f"perceiver_lr must be > 0, got {self.perceiver_lr}")
        KeyConfig(temperature=self.key_temperature, text_weight=self.text_weight)  # validates

    def to_dict(self) -> dict:
        return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items()}


def select_entries(samples: list[Sample], entries: int | None, seed: int) -> list[Sample]:
    """A seeded sample of ``entries`` pairs, kept in file order; all when None."""
    if entries is None or entries == len(samples):
        return samples
    if entries > len(samples):
        raise ValueError(f"--entries {entries} but only {len(samples)} pairs have an image")
    rng = np.random.default_rng([seed, 0])
    return [samples[i] for i in np.sort(rng.choice(len(samples), entries, replace=False))]


def entry_ids(samples: list[Sample]) -> np.ndarray:
    ids = np.array([sample_id_to_int(s.id) for s in samples], dtype=np.int64)
    uniq, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any():
        dup = {int(i) for i in uniq[counts > 1]}
        names = sorted({s.id for s in samples if sample_id_to_int(s.id) in dup})[:5]
        raise ValueError(f"duplicate sample ids in the data: {names}")
    return ids


def split_pairs(n: int, config: BuildConfig) -> tuple[np.ndarray, np.ndarray]:
    """(compressor training rows, evaluation rows), disjoint, seeded, sorted."""
    perm = np.random.default_rng([config.seed, 1]).permutation(n)
    n_eval = int(round(config.eval_fraction * n)) if n > 1 else 0
    train = perm[n_eval:][: config.perceiver_train_samples]
    return np.sort(train), np.sort(perm[:n_eval])


@contextlib.contextmanager
def deterministic() -> Iterator[None]:
    """Deterministic kernels for the build, restoring the caller's setting afterwards."""
    before = torch.are_deterministic_algorithms_enabled()
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


class _Pipeline:
    """The frozen encoder, the embedder and data loading, shared by every pass."""

    def __init__(self, config: BuildConfig, samples: list[Sample]) -> None:
        self.config, self.samples = config, samples
        self.device = resolve_device(config.device)
        self.encoder = load_encoder(config.encoder, seed=config.seed, device=self.device)
        key_config = KeyConfig(temperature=config.key_temperature, text_weight=config.text_weight)
        key_function = KeyFunction(self.encoder.vision_dim, key_config, self.encoder.text_dim)
        self.embedder = Embedder(self.encoder, key_function)
        self.text_tokens = min(config.max_text_tokens, self.encoder.max_text_tokens)

    def loader(
        self, rows: np.ndarray, shuffle_seed: int | None = None, batch_size: int | None = None
    ) -> DataLoader:
        dataset = ImageCaptionDataset(
            [self.samples[i] for i in rows],
            self.config.image_folder,
            self.encoder,
            max_text_tokens=self.text_tokens,
            with_prompt=self.embedder.uses_text,
        )
        gen = None if shuffle_seed is None else torch.Generator().manual_seed(shuffle_seed)
        return DataLoader(
            dataset,
            batch_size=batch_size or self.config.batch_size,
            shuffle=gen is not None,
            generator=gen,
            num_workers=self.config.workers,
            collate_fn=collate,
            persistent_workers=False,
            pin_memory=self.device.type == "cuda",
        )

    @torch.no_grad()
    def encode(self, batch: dict) -> tuple[torch.Tensor, FeatureBatch]:
        """A loader batch -> (keys (B, D), features for the compressor), on the device."""
        q_ids, q_mask = batch.get("prompt_ids"), batch.get("prompt_mask")
        keys, vision = self.embedder.keys_from_pixels(batch["pixel_values"], q_ids, q_mask)
        with autocast_context(self.device):
            text = self.encoder.text_features(batch["input_ids"], batch["attention_mask"])
        mask, ids = (batch[k].to(self.device) for k in ("attention_mask", "input_ids"))
        return keys, FeatureBatch(vision.float(), text.float(), mask, ids)

    def batches(
        self,
        rows: np.ndarray,
        desc: str,
        shuffle_seed: int | None = None,
        batch_size: int | None = None,
    ):
        """Yield (loader batch, keys, features) over ``rows``; in order unless shuffled."""
        bar = tqdm(total=len(rows), desc=desc, unit="pair", disable=not self.config.progress)
        for batch in self.loader(rows, shuffle_seed, batch_size):
            yield batch, *self.encode(batch)
            bar.update(len(batch["index"]))
        bar.close()


class _EncodedBatches:
    """Compressor training batches recomputed by the encoder every epoch (no cache)."""

    def __init__(self, pipe: _Pipeline, rows: np.ndarray, seed: int) -> None:
        self.pipe, self.rows, self.seed, self.epoch = pipe, rows, seed, 0

    def __iter__(self) -> Iterator[FeatureBatch]:
        self.epoch += 1
        size = self.pipe.config.perceiver_batch_size
        for _, _, feats in self.pipe.batches(self.rows, "features", self.seed + self.epoch, size):
            yield FeatureBatch(*(t.cpu() for t in feats))


def _feature_bytes(pipe: _Pipeline, n: int) -> int:
    e = pipe.encoder
    return (
        n
        * 4
        * (e.num_patches * e.vision_dim + pipe.text_tokens * e.text_dim + 2 * pipe.text_tokens)
    )


def _values(compressor: ValueCompressor, feats: FeatureBatch, chunk: int = 256) -> np.ndarray:
    n = feats.vision.shape[0]
    out = [
        compress(compressor, FeatureBatch(*(t[i : i + chunk] for t in feats))).cpu()
        for i in range(0, n, chunk)
    ]
    return torch.cat(out).numpy()


def _features_of(pipe: _Pipeline, rows: np.ndarray, cache: dict[int, FeatureBatch] | None):
    """Features of ``rows`` (from the pass-1 cache when there is one), on the CPU."""
    if cache is not None:
        parts = [cache[int(r)] for r in rows]
    else:
        parts = []
        for batch, _, feats in pipe.batches(rows, "probe features"):
            parts += [
                FeatureBatch(*(t[j : j + 1].cpu() for t in feats))
                for j in range(len(batch["index"]))
            ]
    return FeatureBatch(*(torch.cat(ts) for ts in zip(*parts, strict=False)))


def build_bank(config: BuildConfig) -> Path:
    """Build the bank described by ``config``; return the index path."""
    from .store import BankWriter  # the store (and faiss) only when building

    t_start = time.perf_counter()
    log.info("bankd build config: %s", json.dumps(config.to_dict(), sort_keys=True))
    all_samples = load_llava_json(config.data)
    samples, n_no_image = with_images(all_samples)
    if n_no_image:
        log.warning("skipping %d of %d samples without an image", n_no_image, len(all_samples))
    if not samples:
        raise ValueError(f"{config.data}: no sample has an image")
    samples = select_entries(samples, config.entries, config.seed)
    ids = entry_ids(samples)
    n = len(samples)
    timings: dict[str, float] = {}

    with deterministic():
        pipe = _Pipeline(config, samples)
        train_rows, eval_rows = split_pairs(n, config)
        fit_rows = np.union1d(train_rows, eval_rows)
        use_cache = _feature_bytes(pipe, len(fit_rows)) <= config.feature_cache_mb * 2**20
        log.info(
            "%d entries, %d compressor-training pairs, %d evaluation pairs, features %s",
            n,
            len(train_rows),
            len(eval_rows),
            "cached" if use_cache else "recomputed",
        )

        # Pass 1: key center (+ feature cache).
        t = time.perf_counter()
        pooled, text_pooled, cache = [], [], {} if use_cache else None
        kf = pipe.embedder.key_function
        for batch, _, feats in pipe.batches(fit_rows, "pass 1 (center)"):
            pooled.append(kf.pool(feats.vision).cpu())
            if kf.uses_text:
                q_ids, q_mask = batch["prompt_ids"], batch["prompt_mask"]
                with autocast_context(pipe.device):
                    q = pipe.encoder.text_features(q_ids, q_mask)
                text_pooled.append(kf.pool_text(q, q_mask.to(pipe.device)).cpu())
            if cache is not None:
                rows = fit_rows[batch["index"].numpy()]
                for j, r in enumerate(rows):
                    cache[int(r)] = FeatureBatch(*(x[j : j + 1].cpu() for x in feats))
        kf.fit_center(pooled, text_pooled if kf.uses_text else None)
        timings["pass1_s"] = time.perf_counter() - t

        # The value compressor, and an untrained twin as the informativeness baseline.
        t = time.perf_counter()
        enc = pipe.encoder
        spec = PerceiverSpec(max_text_tokens=pipe.text_tokens)
        compressor = ValueCompressor(
            spec, enc.vision_dim, enc.text_dim, enc.num_patches, seed=config.seed
        ).to(pipe.device)
        baseline = ValueCompressor(
            spec, enc.vision_dim, enc.text_dim, enc.num_patches, seed=config.seed
        ).to(pipe.device)
        if use_cache:
            train_feats = _features_of(pipe, train_rows, cache)
            source = CachedFeatures(
                *train_feats, batch_size=config.perceiver_batch_size, seed=config.seed
            )
        else:
            source = _EncodedBatches(pipe, train_rows, config.seed)
        losses = []
        if config.perceiver_steps and len(train_rows):
            losses = train_compressor(
                compressor,
                source,
                config.perceiver_steps,
                config.perceiver_lr,
                config.seed,
                vocab_size=enc.vocab_size,
                progress=config.progress,
            )
        timings["perceiver_s"] = time.perf_counter() - t

        t = time.perf_counter()
        report_info = _measure(pipe, samples, train_rows, eval_rows, cache, compressor, baseline)
        timings["informativeness_s"] = time.perf_counter() - t
        del cache

        # Pass 2: every entry -> key + value, streamed to the writer in row order.
        t = time.perf_counter()
        with BankWriter(
            config.out, n_entries=n, key_dim=kf.dim, value_shape=(spec.num_latents, spec.d_latents)
        ) as writer:
            for batch, keys, feats in pipe.batches(np.arange(n), "pass 2 (keys, values)"):
                rows = batch["index"].numpy()
                values = compress(compressor, feats).half().cpu().numpy()
                writer.add(keys.float().cpu().numpy(), values, ids[rows])
            timings["pass2_s"] = time.perf_counter() - t
            timings["total_s"] = time.perf_counter() - t_start
            report = {
                "entries": n,
                "skipped_without_image": n_no_image,
                "perceiver": {
                    "steps": len(losses),
                    "train_pairs": int(len(train_rows)),
                    "first_loss": losses[0] if losses else None,
                    "final_loss": float(np.mean(losses[-20:])) if losses else None,
                },
                "informativeness": report_info,
                "timings": {k: round(v, 2) for k, v in timings.items()},
            }
            resolved = {
                **config.to_dict(),
                "perceiver": compressor.to_config(),
                "key_function": kf.to_config(),
                "device": str(pipe.device),
            }
            path = writer.finish(
                index_factory=config.index_factory,
                metric="ip",
                vision_encoder=enc.vision_fingerprint(),
                text_encoder=enc.text_fingerprint(),
                key_function={"config": kf.to_config(), "weights": kf.weights_bytes()},
                weights={"perceiver": compressor.weights_bytes()},
                config=resolved,
                source_ids=[s.id for s in samples],
                report=report,
                seed=config.seed,
            )
    log.info(
        "bank written to %s in %.1f s\n%s",
        path,
        timings["total_s"],
        format_informativeness(report_info),
    )
    return Path(path)


def _measure(
    pipe: _Pipeline,
    samples: list[Sample],
    train_rows: np.ndarray,
    eval_rows: np.ndarray,
    cache,
    trained: ValueCompressor,
    baseline: ValueCompressor,
) -> dict:
    """Informativeness of trained vs. untrained values on the evaluation pairs."""
    if len(eval_rows) < MIN_EVAL_PAIRS or len(train_rows) < MIN_EVAL_PAIRS:
        return {"skipped": f"needs >= {MIN_EVAL_PAIRS} training and evaluation pairs"}
    probe_rows = train_rows
    if len(probe_rows) > PROBE_TRAIN_MAX:
        rng = np.random.default_rng([pipe.config.seed, 2])
        probe_rows = np.sort(rng.choice(probe_rows, PROBE_TRAIN_MAX, replace=False))
    fit_feats = _features_of(pipe, probe_rows, cache)
    eval_feats = _features_of(pipe, eval_rows, cache)
    values = {
        name: (_values(model, fit_feats), _values(model, eval_feats))
        for name, model in (("trained", trained), ("random_init", baseline))
    }
    fit_s, eval_s = [samples[i] for i in probe_rows], [samples[i] for i in eval_rows]
    return informativeness(
        values,
        [s.caption for s in fit_s],
        [s.caption for s in eval_s],
        [s.attributes for s in fit_s],
        [s.attributes for s in eval_s],
        seed=pipe.config.seed,
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``bankd build``."""
    d = BuildConfig.__dataclass_fields__
    parser.add_argument("--data", type=Path, required=True, help="LLaVA-format JSON")
    parser.add_argument(
        "--image-folder",
        type=Path,
        required=True,
        help="folder the samples' image paths are relative to",
    )
    parser.add_argument("--out", type=Path, required=True, help="index path, e.g. bank/bank.faiss")
    parser.add_argument(
        "--encoder",
        default=d["encoder"].default,
        help="'tiny', a local model directory or a hub id (SigLIP/CLIP)",
    )
    parser.add_argument("--seed", type=int, default=d["seed"].default)
    parser.add_argument(
        "--entries",
        type=int,
        default=None,
        help="build from a seeded sample of this many pairs (default: all)",
    )
    parser.add_argument(
        "--index-type",
        default=d["index_factory"].default,
        help="FAISS factory string: Flat, IVF1024,Flat, HNSW32, IVF4096,PQ32",
    )
    parser.add_argument("--batch-size", type=int, default=d["batch_size"].default)
    parser.add_argument(
        "--workers",
        type=int,
        default=d["workers"].default,
        help="DataLoader workers decoding images (0: main process)",
    )
    parser.add_argument("--device", default=d["device"].default, help="auto, cpu, cuda, cuda:1")
    parser.add_argument("--perceiver-steps", type=int, default=d["perceiver_steps"].default)
    parser.add_argument("--perceiver-lr", type=float, default=d["perceiver_lr"].default)
    parser.add_argument(
        "--text-weight",
        type=float,
        default=d["text_weight"].default,
        help="weight of the question text in keys (0..1; 0 = image only)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    """Entry point of ``bankd build``; bad arguments raise ValueError."""
    config = BuildConfig(
        data=args.data,
        image_folder=args.image_folder,
        out=args.out,
        encoder=args.encoder,
        seed=args.seed,
        entries=args.entries,
        index_factory=args.index_type,
        batch_size=args.batch_size,
        workers=args.workers,
        device=args.device,
        perceiver_steps=args.perceiver_steps,
        perceiver_lr=args.perceiver_lr,
        text_weight=args.text_weight,
        progress=not args.no_progress,
    )
    from .store import BankPaths

    path = build_bank(config)
    manifest = json.loads(BankPaths(path).manifest.read_text())
    report = manifest.get("report") or {}
    print(
        f"build: wrote {report.get('entries')} entries to {path} "
        f"in {report.get('timings', {}).get('total_s')} s"
    )
    print(format_informativeness(report.get("informativeness", {})))
    return 0
