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

from .data import (
    ImageCaptionDataset,
    Sample,
    collate,
    entry_ids,
    load_llava_json,
    select_entries,
    split_pairs,
    with_images,
)
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
_FLAG_FIELDS = ("data", "image_folder", "out", "encoder", "seed", "entries", "batch_size")
_FLAG_FIELDS += ("workers", "device", "perceiver_steps", "perceiver_lr", "text_weight")


@dataclass(frozen=True)
class BuildConfig:
    """Everything that decides the bank; logged at start and saved in its manifest."""

    data: Path
    image_folder: Path
    out: Path  # index path, e.g. bank/bank.faiss; the other files go next to it
    encoder: str = "tiny"
    seed: int = 0
    entries: int | None = None  # a seeded sample of this many pairs; None = all
    index_factory: str = "auto"  # FAISS factory string, or "auto" (bankd.autoindex)
    memory_budget: str = "8GiB"  # what the index may take in memory ("auto" chooses by it)
    recall_target: float | None = 0.95  # efSearch / nprobe tuned to reach this recall@k
    recall_k: int = 5
    batch_size: int = 64  # encoder batch
    workers: int = 2  # DataLoader workers decoding images; 0 = in the main process
    device: str = "auto"  # cuda when available
    perceiver_steps: int = 600
    perceiver_lr: float = 1e-3
    perceiver_batch_size: int = 32
    perceiver_train_samples: int = 50_000  # seeded subset the compressor trains on
    max_text_tokens: int = 96  # caption tokens fed to the compressor (capped by the encoder)
    text_weight: float = 0.0  # weight of the question-text component of keys
    key_temperature: float = 1.0
    eval_fraction: float = 0.1  # pairs kept out of compressor training, for the report
    feature_cache_mb: int = 2048  # cache frozen features in memory up to this size
    threads: int | None = None  # torch CPU threads; None = cores minus max(1, workers)
    progress: bool = True

    def __post_init__(self) -> None:
        lowest = {"entries": 1, "batch_size": 1, "workers": 0, "perceiver_steps": 0, "threads": 1}
        lowest |= {"perceiver_batch_size": 1, "perceiver_train_samples": 1}
        lowest |= {"max_text_tokens": 1, "feature_cache_mb": 0}
        for name, low in lowest.items():
            value = getattr(self, name)
            if value is not None and value < low:
                raise ValueError(f"{name} must be >= {low}, got {value}")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError(f"eval_fraction must be in [0, 1), got {self.eval_fraction}")
        if self.recall_target is not None and not 0 < self.recall_target <= 1:
            raise ValueError(f"recall_target must be in (0, 1], got {self.recall_target}")
        if self.recall_k < 1:
            raise ValueError(f"recall_k must be >= 1, got {self.recall_k}")
        from .autoindex import parse_bytes  # faiss only when building

        parse_bytes(self.memory_budget)  # validates
        if not self.perceiver_lr > 0:
            raise ValueError(f"perceiver_lr must be > 0, got {self.perceiver_lr}")
        KeyConfig(temperature=self.key_temperature, text_weight=self.text_weight)  # validates

    def to_dict(self) -> dict:
        return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items()}


@contextlib.contextmanager
def build_environment(config: BuildConfig) -> Iterator[None]:
    """Deterministic kernels and a CPU thread count for the build; restored afterwards.

    On CPU, torch gets the cores left by the image-decoding workers (or by the main
    process when there are none): on a busy 2-core machine one OpenMP thread ran the
    2000-pair demo build 4x faster than two.
    """
    before = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    threads = config.threads or max(1, (os.cpu_count() or 1) - max(1, config.workers))
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0])
        torch.set_num_threads(before[1])


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

    def feature_bytes(self, n: int) -> int:
        e, t = self.encoder, self.text_tokens
        return 4 * n * (e.num_patches * e.vision_dim + t * e.text_dim + 2 * t)

    @torch.no_grad()
    def encode(self, batch: dict) -> tuple[torch.Tensor, FeatureBatch]:
        """A loader batch -> (keys (B, D), features for the compressor), on the device."""
        q_ids, q_mask = batch.get("prompt_ids"), batch.get("prompt_mask")
        keys, vision = self.embedder.keys_from_pixels(batch["pixel_values"], q_ids, q_mask)
        with autocast_context(self.device):
            text = self.encoder.text_features(batch["input_ids"], batch["attention_mask"])
        mask, ids = (batch[k].to(self.device) for k in ("attention_mask", "input_ids"))
        return keys, FeatureBatch(vision.float(), text.float(), mask, ids)

    def loader(self, rows: np.ndarray, seed: int | None = None, size: int = 0) -> DataLoader:
        """Batches of decoded, preprocessed pairs ``rows`` (DataLoader workers decode)."""
        c, uses_text = self.config, self.embedder.uses_text
        subset = [self.samples[i] for i in rows]
        data = ImageCaptionDataset(
            subset, c.image_folder, self.encoder, self.text_tokens, uses_text
        )
        gen = None if seed is None else torch.Generator().manual_seed(seed)
        kw = {"num_workers": c.workers, "collate_fn": collate, "generator": gen}
        return DataLoader(data, size or c.batch_size, shuffle=gen is not None, **kw)

    def batches(self, rows: np.ndarray, desc: str, seed: int | None = None, size: int = 0):
        """Yield (loader batch, keys, features) over ``rows``; in order unless shuffled.

        ``batch["index"]`` holds positions in ``rows``.
        """
        bar = tqdm(total=len(rows), desc=desc, unit="pair", disable=not self.config.progress)
        for batch in self.loader(rows, seed, size):
            yield batch, *self.encode(batch)
            bar.update(len(batch["index"]))
        bar.close()

    def keys_and_values(self, compressor: ValueCompressor, rows: np.ndarray):
        """Pass 2: yield (positions in ``rows``, keys (B, D) float32, values (B, 32, 96)
        float16), numpy, in order: vision tower, key function, text tower, compressor."""
        for batch, keys, feats in self.batches(rows, "pass 2 (keys, values)"):
            values = compress(compressor, feats).half().cpu().numpy()
            yield batch["index"].numpy(), keys.float().cpu().numpy(), values

    def features(self, rows: np.ndarray, cache: tuple[np.ndarray, FeatureBatch] | None):
        """Features of ``rows`` on the CPU: from the pass-1 cache, else encoded again."""
        if cache is not None:
            cached_rows, feats = cache
            pos = torch.as_tensor(np.searchsorted(cached_rows, rows))
            return FeatureBatch(*(t[pos] for t in feats))
        parts = [f for _, _, f in self.batches(rows, "features")]
        return FeatureBatch(*(torch.cat(ts).cpu() for ts in zip(*parts, strict=True)))


class _EncodedBatches:
    """Compressor training batches recomputed by the encoder every epoch (no cache)."""

    def __init__(self, pipe: _Pipeline, rows: np.ndarray, seed: int) -> None:
        self.pipe, self.rows, self.seed, self.epoch = pipe, rows, seed, 0

    def __iter__(self) -> Iterator[FeatureBatch]:
        self.epoch += 1
        size = self.pipe.config.perceiver_batch_size
        for _, _, feats in self.pipe.batches(self.rows, "features", self.seed + self.epoch, size):
            yield FeatureBatch(*(t.cpu() for t in feats))


def _values(compressor: ValueCompressor, feats: FeatureBatch, chunk: int = 256) -> np.ndarray:
    n = feats.vision.shape[0]
    parts = [compress(compressor, [t[i : i + chunk] for t in feats]) for i in range(0, n, chunk)]
    return torch.cat(parts).cpu().numpy()


def _measure(
    pipe: _Pipeline,
    train_rows: np.ndarray,
    eval_rows: np.ndarray,
    cache,
    models: dict[str, ValueCompressor],
) -> dict:
    """Informativeness of each compressor's values on the evaluation pairs."""
    if min(len(eval_rows), len(train_rows)) < MIN_EVAL_PAIRS:
        return {"skipped": f"needs >= {MIN_EVAL_PAIRS} training and evaluation pairs"}
    probe_rows = train_rows
    if len(probe_rows) > PROBE_TRAIN_MAX:
        rng = np.random.default_rng([pipe.config.seed, 2])
        probe_rows = np.sort(rng.choice(probe_rows, PROBE_TRAIN_MAX, replace=False))
    fit, test = pipe.features(probe_rows, cache), pipe.features(eval_rows, cache)
    values = {k: (_values(m, fit), _values(m, test)) for k, m in models.items()}
    chosen = [[pipe.samples[i] for i in r] for r in (probe_rows, eval_rows)]
    captions = [[s.caption for s in part] for part in chosen]
    attributes = [[s.attributes for s in part] for part in chosen]
    return informativeness(values, *captions, *attributes, seed=pipe.config.seed)


def build_bank(config: BuildConfig) -> Path:
    """Build the bank described by ``config``; return the index path."""
    from .autoindex import parse_bytes
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

    with build_environment(config):
        pipe = _Pipeline(config, samples)
        enc, kf = pipe.encoder, pipe.embedder.key_function
        train_rows, eval_rows = split_pairs(
            n, config.eval_fraction, config.perceiver_train_samples, config.seed
        )
        fit_rows = np.union1d(train_rows, eval_rows)
        use_cache = pipe.feature_bytes(len(fit_rows)) <= config.feature_cache_mb * 2**20
        counts = (n, len(train_rows), len(eval_rows), "cached" if use_cache else "recomputed")
        log.info("%d entries, %d compressor-training, %d evaluation pairs; features %s", *counts)

        # Pass 1: the key center (and the feature cache).
        t = time.perf_counter()
        pooled, text_pooled, parts = [], [], []
        for batch, _, feats in pipe.batches(fit_rows, "pass 1 (center)"):
            pooled.append(kf.pool(feats.vision).cpu())
            if kf.uses_text:
                q_mask = batch["prompt_mask"].to(pipe.device)
                with autocast_context(pipe.device):
                    q = enc.text_features(batch["prompt_ids"], q_mask)
                text_pooled.append(kf.pool_text(q, q_mask).cpu())
            if use_cache:
                parts.append(FeatureBatch(*(x.cpu() for x in feats)))
        kf.fit_center(pooled, text_pooled if kf.uses_text else None)
        cache = (
            (fit_rows, FeatureBatch(*map(torch.cat, zip(*parts, strict=True)))) if parts else None
        )
        del parts
        timings["pass1_s"] = time.perf_counter() - t

        # The value compressor, and its untrained twin as the informativeness baseline.
        t = time.perf_counter()
        spec = PerceiverSpec(max_text_tokens=pipe.text_tokens)
        dims = (enc.vision_dim, enc.text_dim, enc.num_patches)
        compressor = ValueCompressor(spec, *dims, seed=config.seed).to(pipe.device)
        baseline = ValueCompressor(spec, *dims, seed=config.seed).to(pipe.device)
        if cache is not None:
            source = CachedFeatures(
                *pipe.features(train_rows, cache),
                batch_size=config.perceiver_batch_size,
                seed=config.seed,
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
        models = {"trained": compressor, "random_init": baseline}
        info = _measure(pipe, train_rows, eval_rows, cache, models)
        timings["informativeness_s"] = time.perf_counter() - t
        del cache, source

        # Pass 2: every entry -> key + value, streamed to the writer in row order.
        t = time.perf_counter()
        value_shape = (spec.num_latents, spec.d_latents)
        with BankWriter(config.out, n_entries=n, key_dim=kf.dim, value_shape=value_shape) as w:
            for pos, keys, values in pipe.keys_and_values(compressor, np.arange(n)):
                w.add(keys, values, ids[pos])
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
                "informativeness": info,
                "timings": {k: round(v, 2) for k, v in timings.items()},
            }
            resolved = {
                **config.to_dict(),
                "perceiver": compressor.to_config(),
                "key_function": kf.to_config(),
                "device": str(pipe.device),
                "threads": torch.get_num_threads(),
            }
            path = w.finish(
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
                memory_budget_bytes=parse_bytes(config.memory_budget),
                recall_target=config.recall_target,
                recall_k=config.recall_k,
            )
    log.info(
        "bank written to %s in %.1f s\n%s", path, timings["total_s"], format_informativeness(info)
    )
    return Path(path)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``bankd build``."""
    d = {k: f.default for k, f in BuildConfig.__dataclass_fields__.items()}
    add = parser.add_argument
    add("--data", type=Path, required=True, help="LLaVA-format JSON")
    add("--image-folder", type=Path, required=True, help="folder image paths are relative to")
    add("--out", type=Path, required=True, help="index path, e.g. bank/bank.faiss")
    add("--encoder", default=d["encoder"], help="'tiny', a model directory or a SigLIP/CLIP hub id")
    add("--seed", type=int, default=d["seed"])
    add("--entries", type=int, default=None, help="a seeded sample of this many pairs (all)")
    add(
        "--index-type",
        default=d["index_factory"],
        help="FAISS factory string (Flat, HNSW32, IVF1024,Flat, IVF4096,PQ64) or 'auto': "
        "chosen by entries, key dim and --memory-budget",
    )
    add("--memory-budget", default=d["memory_budget"], help="index memory for auto (8GiB, 512MB)")
    add(
        "--recall-target",
        type=float,
        default=d["recall_target"],
        help="tune efSearch / nprobe to this recall@k against exact search (0: keep FAISS's)",
    )
    add("--recall-k", type=int, default=d["recall_k"], help="the k of the recall target")
    add("--batch-size", type=int, default=d["batch_size"], help="encoder batch size")
    add("--workers", type=int, default=d["workers"], help="image-decoding workers (0: inline)")
    add("--device", default=d["device"], help="auto (cuda when available), cpu, cuda, cuda:1")
    add("--threads", type=int, default=None, help="torch CPU threads (cores left by workers)")
    add("--perceiver-steps", type=int, default=d["perceiver_steps"])
    add("--perceiver-lr", type=float, default=d["perceiver_lr"])
    add(
        "--text-weight",
        type=float,
        default=d["text_weight"],
        help="weight of the question text in keys, 0..1 (0: image only)",
    )
    add("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    """Entry point of ``bankd build``; bad arguments raise ValueError."""
    from .store import BankPaths

    same_name = (*_FLAG_FIELDS, "threads")
    config = BuildConfig(
        **{f: getattr(args, f) for f in same_name},
        index_factory=args.index_type,
        memory_budget=args.memory_budget,
        recall_target=args.recall_target or None,
        recall_k=args.recall_k,
        progress=not args.no_progress,
    )
    path = build_bank(config)
    manifest = json.loads(BankPaths(path).manifest.read_text())
    report, index = manifest.get("report") or {}, manifest.get("index") or {}
    timings = report.get("timings", {})
    print(f"build: wrote {report.get('entries')} entries to {path} in {timings.get('total_s')} s")
    recall, params = index.get("recall", {}), index.get("search_params") or "none"
    print(
        f"index: {index.get('factory')} ({index.get('reason', 'as asked')}), "
        f"{index.get('bytes', 0) / 1e6:.1f} MB, search params {params}, "
        f"recall@{recall.get('k')} {recall.get('value')}"
    )
    return 0  # the informativeness table is in the log and in the manifest's report
