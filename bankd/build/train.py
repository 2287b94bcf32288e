"""Pass 1 and the value compressor of ``bankd build``: the training stage.

Pass 1 runs the frozen encoder over the pairs the Perceiver trains on plus the
evaluation split, fitting the key function's center and caching the features when
they fit ``feature_cache_mb``; the compressor is trained self-supervised on them; the
informativeness of its values (trained vs. the same compressor untrained) is measured
on the evaluation split. ``train_stage`` checkpoints each result in the work directory
and loads it from there when a build resumes. Under torchrun only rank 0 runs it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

import numpy as np
import torch

from bankd.build.encoding import BuildPipeline
from bankd.build.workdir import BuildWorkDir
from bankd.models.perceiver import (
    CachedFeatures,
    FeatureBatch,
    ValueCompressor,
    compress,
    train_compressor,
)
from bankd.models.probe import informativeness

log = logging.getLogger("bankd.build")  # part of the build: one logger for all of it

PROBE_TRAIN_MAX = 4000  # pairs the informativeness probes are fitted on, at most
MIN_EVAL_PAIRS = 20  # fewer held-out pairs than this: no informativeness report


class _EncodedBatches:
    """Compressor training batches recomputed by the encoder every epoch (no cache)."""

    def __init__(self, pipe: BuildPipeline, rows: np.ndarray, seed: int) -> None:
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
    pipe: BuildPipeline,
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


def train_stage(
    pipe: BuildPipeline, train_rows: np.ndarray, eval_rows: np.ndarray, work: BuildWorkDir
) -> tuple[ValueCompressor, dict, dict]:
    """Pass 1, the Perceiver, informativeness: (compressor, training record, info).

    Checkpointed in ``work`` after training and after measuring; a resumed build loads
    the key function's center and the compressor instead of recomputing them.
    """
    kf = pipe.embedder.key_function
    cache = None
    if (saved := work.trained()) is not None:
        log.info("resuming: key function and Perceiver from %s", work.path)
        compressor = pipe.load_trained(saved)
        record = work.state["trained"]
    else:
        compressor, record, cache = _train(pipe, train_rows, eval_rows)
        weights = {"keyfn": kf.weights_bytes(), "perceiver": compressor.weights_bytes()}
        work.save_trained(weights, record)
    if (info := work.record("informativeness")) is None:
        t = time.perf_counter()
        models = {"trained": compressor, "random_init": pipe.compressor()}
        info = _measure(pipe, train_rows, eval_rows, cache, models)
        record["timings"]["informativeness_s"] = time.perf_counter() - t
        work.record("informativeness", info)
    return compressor, record, info


def _train(pipe: BuildPipeline, train_rows: np.ndarray, eval_rows: np.ndarray) -> tuple:
    """Pass 1 (key center, feature cache) and Perceiver training: (compressor, record, cache)."""
    config, enc, kf = pipe.config, pipe.encoder, pipe.embedder.key_function
    fit_rows = np.union1d(train_rows, eval_rows)
    use_cache = pipe.feature_bytes(len(fit_rows)) <= config.feature_cache_mb * 2**20
    log.info("features of %d pairs %s", len(fit_rows), "cached" if use_cache else "recomputed")
    timings: dict[str, float] = {}

    # Pass 1: the key center (and the feature cache).
    t = time.perf_counter()
    pooled, text_pooled, parts = [], [], []
    for batch, _, feats in pipe.batches(fit_rows, "pass 1 (center)"):
        pooled.append(kf.pool(feats.vision).cpu())
        if kf.uses_text:
            q_mask = batch["prompt_mask"].to(pipe.device)
            q = enc.text_features(
                batch["prompt_ids"], q_mask, precision=pipe.embedder.feature_precision
            )
            text_pooled.append(kf.pool_text(q, q_mask).cpu())
        if use_cache:
            parts.append(FeatureBatch(*(x.cpu() for x in feats)))
    kf.fit_center(pooled, text_pooled if kf.uses_text else None)
    cache = (fit_rows, FeatureBatch(*map(torch.cat, zip(*parts, strict=True)))) if parts else None
    del parts
    timings["pass1_s"] = time.perf_counter() - t

    # The value compressor (its untrained twin is the informativeness baseline).
    t = time.perf_counter()
    compressor = pipe.compressor()
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
            progress=pipe.progress,
        )
    timings["perceiver_s"] = time.perf_counter() - t
    record = {
        "steps": len(losses),
        "train_pairs": int(len(train_rows)),
        "first_loss": losses[0] if losses else None,
        "final_loss": float(np.mean(losses[-20:])) if losses else None,
        "timings": timings,
    }
    return compressor, record, cache
