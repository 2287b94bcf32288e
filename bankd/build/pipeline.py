"""``bankd build``: LLaVA-format image-caption pairs -> a memory bank on disk.

CPU (the offline demo)::

    bankd demo-data --out data/shapes --n 2000
    bankd build --data data/shapes/data.json --image-folder data/shapes \\
        --out bank/bank.faiss --encoder tiny

GPU, a real encoder, a seeded 100k sample, an IVF index::

    bankd build --data blip_laion_cc_sbu_558k.json --image-folder llava-pretrain \\
        --out bank/bank.faiss --encoder google/siglip-base-patch16-224 \\
        --entries 100000 --index-type IVF1024,Flat --device cuda

Pipeline (``build_bank``): read and sample the pairs; the training stage
(``bankd.build.train``): pass 1 runs the frozen encoder over
the pairs the Perceiver trains on plus the evaluation split, fitting the key center and
caching the features when they fit the memory budget; the value compressor is trained
self-supervised on them; the informativeness of its values (trained vs. the same
compressor untrained) is measured on the evaluation split; pass 2 runs every entry
through encoder -> keys (``Embedder``, the path the server's Embed rpc uses) and values
(fp16), appended chunk by chunk (one encoder batch each) to the work directory, then
copied into ``BankWriter``, which commits the bank atomically. Same inputs + seed ->
byte-identical keys and values on the same machine.

Data-parallel under torchrun (``bankd.build.parallel``): every rank encodes its own
contiguous part of pass 2 on ``cuda:LOCAL_RANK``; rank 0 trains the Perceiver first and
writes one bank equal to a one-process build's, or each rank writes its shard::

    torchrun --nproc_per_node 8 -m bankd build --data ... --out bank/bank.faiss [--keep-shards]

Interrupted (Ctrl-C, kill -9, a lost node)? Run the same command again: the build
resumes from ``<out stem>.partial/`` (``bankd.build.workdir``), skipping pass 1 and training
once the Perceiver was saved, and pass 2 from the last complete chunk; the bank equals
an uninterrupted build's. Changed settings or data refuse to resume; ``--restart``
discards the checkpoints.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load as load_safetensors
from torch.utils.data import DataLoader
from tqdm import tqdm

from bankd import __version__
from bankd.build.config import BuildConfig
from bankd.build.data import (
    ImageCaptionDataset,
    Sample,
    collate,
    entry_ids,
    load_llava_json,
    select_entries,
    split_pairs,
    with_images,
)
from bankd.build.distributed import DistEnv
from bankd.build.parallel import (
    all_rows,
    check_ranks_agree,
    on_rank0,
    pass2_bounds,
    remove_checkpoints,
    send_rows,
    shard_align,
)
from bankd.build.train import train_stage
from bankd.build.workdir import BuildWorkDir, work_dir_of
from bankd.models.embedder import Embedder
from bankd.models.encoders import autocast_context, load_encoder, resolve_device
from bankd.models.keys import KeyConfig, KeyFunction
from bankd.models.perceiver import FeatureBatch, PerceiverSpec, ValueCompressor, compress
from bankd.models.probe import format_informativeness
from bankd.store.paths import sha256_file

log = logging.getLogger(__name__)


@contextlib.contextmanager
def build_environment(config: BuildConfig, processes: int = 1) -> Iterator[None]:
    """Deterministic kernels and a CPU thread count for the build; restored afterwards.

    On CPU, torch gets the cores left by the image-decoding workers (or by the main
    process when there are none), out of this process's share of the machine's cores
    (``processes``: build processes on this machine): on a busy 2-core machine one
    OpenMP thread ran the 2000-pair demo build 4x faster than two.
    """
    before = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    cores = (os.cpu_count() or 1) // max(1, processes)
    threads = config.threads or max(1, cores - max(1, config.workers))
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0])
        torch.set_num_threads(before[1])


class _Pipeline:
    """The frozen encoder, the embedder and data loading, shared by every pass."""

    def __init__(
        self,
        config: BuildConfig,
        samples: list[Sample],
        device: torch.device | None = None,
        progress: bool | None = None,
    ) -> None:
        self.config, self.samples = config, samples
        self.device = device or resolve_device(config.device)
        self.progress = config.progress if progress is None else progress
        self.encoder = load_encoder(config.encoder, seed=config.seed, device=self.device)
        key_config = KeyConfig(temperature=config.key_temperature, text_weight=config.text_weight)
        key_function = KeyFunction(self.encoder.vision_dim, key_config, self.encoder.text_dim)
        self.embedder = Embedder(self.encoder, key_function)
        self.text_tokens = min(config.max_text_tokens, self.encoder.max_text_tokens)

    def compressor(self, weights: bytes | None = None) -> ValueCompressor:
        """The value compressor for this encoder, at its seeded initialisation or with
        ``weights`` (safetensors bytes), on the device."""
        spec = PerceiverSpec(max_text_tokens=self.text_tokens)
        e = self.encoder
        compressor = ValueCompressor(
            spec, e.vision_dim, e.text_dim, e.num_patches, seed=self.config.seed
        )
        if weights is not None:
            compressor.load_state_dict(load_safetensors(weights))
            compressor.eval()
        return compressor.to(self.device)

    def load_trained(self, weights: dict[str, bytes]) -> ValueCompressor:
        """The training stage's results: the key function's center (set here) and the
        trained compressor, from {"keyfn": ..., "perceiver": ...} safetensors bytes."""
        self.embedder.key_function.load_state_dict(load_safetensors(weights["keyfn"]))
        return self.compressor(weights["perceiver"])

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

    def batches(
        self, rows: np.ndarray, desc: str, seed: int | None = None, size: int = 0, done: int = 0
    ):
        """Yield (loader batch, keys, features) over ``rows``; in order unless shuffled.

        ``batch["index"]`` holds positions in ``rows``; ``done``: pairs the progress bar
        counts as done before these (a resumed pass).
        """
        bar = tqdm(
            total=done + len(rows),
            initial=done,
            desc=desc,
            unit="pair",
            disable=not self.progress,
        )
        for batch in self.loader(rows, seed, size):
            yield batch, *self.encode(batch)
            bar.update(len(batch["index"]))
        bar.close()

    def keys_and_values(self, compressor: ValueCompressor, rows: np.ndarray, done: int = 0):
        """Pass 2: yield (positions in ``rows``, keys (B, D) float32, values (B, 32, 96)
        float16), numpy, in order: vision tower, key function, text tower, compressor."""
        for batch, keys, feats in self.batches(rows, "pass 2 (keys, values)", done=done):
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


# Fields that do not change the checkpoints: a build resumes across changes to them
# (keep_shards decides only how the rows are written out).
_NOT_IDENTITY = ("progress", "workers", "threads", "keep_shards")


def _pass2(
    pipe: _Pipeline,
    compressor: ValueCompressor,
    work: BuildWorkDir,
    value_shape: tuple,
    rows: tuple[int, int] | None = None,
) -> None:
    """Entries ``rows`` (a range; all by default) -> key + value, appended to ``work``
    chunk by chunk from where it stopped."""
    lo, hi = rows or (0, len(pipe.samples))
    size, done = pipe.config.batch_size, work.rows_done
    if done:
        n, chunks = hi - lo, -(-(hi - lo) // size)
        log.info("resuming from chunk %d/%d (%d of %d entries done)", done // size, chunks, done, n)
    with work.open_rows(pipe.embedder.key_function.dim, value_shape) as out:
        for _, keys, values in pipe.keys_and_values(compressor, np.arange(lo + done, hi), done):
            out.append(keys, values)


def _load_entries(config: BuildConfig) -> tuple[list[Sample], int]:
    """(the pairs the bank holds, how many samples had no image)."""
    all_samples = load_llava_json(config.data)
    samples, n_no_image = with_images(all_samples)
    if n_no_image:
        log.warning("skipping %d of %d samples without an image", n_no_image, len(all_samples))
    if not samples:
        raise ValueError(f"{config.data}: no sample has an image")
    return select_entries(samples, config.entries, config.seed), n_no_image


def _rank_facts(config: BuildConfig, identity: dict, pipe: _Pipeline, ids: np.ndarray) -> dict:
    """What every rank of a build must agree on: settings, data, entries, encoder."""
    return {
        **identity,
        "data_sha256": sha256_file(config.data),
        "entries_sha256": hashlib.sha256(ids.tobytes()).hexdigest(),
        "vision_encoder": pipe.encoder.vision_fingerprint().to_dict(),
        "text_encoder": pipe.encoder.text_fingerprint().to_dict(),
        "bankd": __version__,
    }


def build_bank(
    config: BuildConfig,
    *,
    restart: bool = False,
    discard_other: bool = False,
    env: DistEnv | None = None,
) -> Path:
    """Build the bank described by ``config``; return the index path.

    Checkpoints go to ``<out stem>.partial/`` (``bankd.build.workdir``): run the same build
    again after an interruption and it resumes; ``restart`` discards them first, and
    ``discard_other`` discards them only when they belong to other inputs.

    ``env`` (``bankd.build.distributed.init_distributed``): this process's rank in a torchrun
    job whose every rank calls ``build_bank`` with the same config; each encodes its
    part of pass 2 (``bankd.build.parallel``). None: one process. With
    ``config.keep_shards`` each rank writes its part as a shard and returns its path.
    """
    env = env or DistEnv(device=resolve_device(config.device))
    t_start = time.perf_counter()
    log.info("bankd build config: %s", json.dumps(config.to_dict(), sort_keys=True))
    samples, n_no_image = _load_entries(config)
    ids, n = entry_ids(samples), len(samples)  # duplicate ids raise before any work
    bounds = pass2_bounds(n, env.world_size, config.batch_size, shards=config.keep_shards)
    rows = bounds[env.rank], bounds[env.rank + 1]

    with build_environment(config, env.local_world_size):
        pipe = _Pipeline(config, samples, env.device, config.progress and env.is_main)
        identity = {k: v for k, v in config.to_dict().items() if k not in _NOT_IDENTITY}
        identity["device"] = pipe.device.type
        if env.distributed:
            check_ranks_agree(env, _rank_facts(config, identity, pipe, ids))
            log.info("%d processes; pass-2 rows per rank: %s", env.world_size, bounds)
        work: BuildWorkDir | None = None

        def open_work() -> str:
            nonlocal work
            work = BuildWorkDir.open(
                config.out, identity, config.data, restart=restart, discard_other=discard_other
            )
            work.keep_rows_of(env.world_size)
            return work.build_id

        build_id = on_rank0(env, open_work)  # rank 0's work dir, or its refusal, everywhere
        train_rows, eval_rows = split_pairs(
            n, config.eval_fraction, config.perceiver_train_samples, config.seed
        )
        counts = (n, len(train_rows), len(eval_rows))
        log.info("%d entries, %d compressor-training, %d evaluation pairs", *counts)
        stage = None
        if env.is_main:
            compressor, record, info = train_stage(pipe, train_rows, eval_rows, work)
            kf = pipe.embedder.key_function
            weights = {"keyfn": kf.weights_bytes(), "perceiver": compressor.weights_bytes()}
            stage = {"weights": weights, "record": record, "info": info}
        stage = env.broadcast(stage)  # the other ranks wait here while rank 0 trains
        if not env.is_main:
            compressor = pipe.load_trained(stage["weights"])
        built = _Built(pipe, compressor, stage, ids, n_no_image, t_start, env.world_size)

        t = time.perf_counter()
        part = work
        if env.distributed:
            part = BuildWorkDir.open_part(
                work_dir_of(config.out), build_id, env.rank, env.world_size, rows
            )
        _pass2(pipe, compressor, part, built.value_shape, rows)
        built.timings["pass2_s"] = time.perf_counter() - t

        keys, values = part.rows(rows[1] - rows[0], built.key_dim, built.value_shape)
        own = ((keys[s : s + 8192], values[s : s + 8192]) for s in range(0, len(keys), 8192))
        if config.keep_shards:
            path = built.write_shard(env, bounds, own)
        elif env.is_main:
            every = all_rows(env, own, bounds, built.key_dim, built.value_shape)
            path = built.write(config.out, every, slice(0, n))
        else:
            send_rows(env, keys, values)
            path = config.out
        del keys, values, own
        remove_checkpoints(env, work, part)
    if env.is_main:
        log.info(
            "bank written to %s in %.1f s\n%s",
            path,
            built.timings["total_s"],
            format_informativeness(built.info),
        )
    return path


class _Built:
    """What a build wrote to its checkpoints (models, training record) and how it is
    committed: one bank, or one shard per rank."""

    def __init__(
        self,
        pipe: _Pipeline,
        compressor: ValueCompressor,
        stage: dict,
        ids: np.ndarray,
        n_no_image: int,
        t_start: float,
        world_size: int,
    ) -> None:
        self.pipe, self.compressor, self.info, self.ids = pipe, compressor, stage["info"], ids
        record = stage["record"]
        self.record = {k: v for k, v in record.items() if k != "timings"}  # state keeps its own
        self.timings = dict(record["timings"])
        self.n_no_image, self.t_start, self.world_size = n_no_image, t_start, world_size
        self.key_dim = pipe.embedder.key_function.dim
        self.value_shape = (compressor.spec.num_latents, compressor.spec.d_latents)

    def write(
        self, path: Path, chunks: Iterator[tuple], rows: slice, shard: dict | None = None
    ) -> Path:
        """Commit entries ``rows`` at ``path``, their keys and values read from ``chunks``
        in order; ``shard``: the ``config.shard`` record of one shard."""
        from bankd.search.tuning import AUTO, DEFAULT_RECALL_TARGET, choose_factory, parse_bytes
        from bankd.store.writer import BankWriter  # the store (and faiss) only when building

        config, enc, kf = self.pipe.config, self.pipe.encoder, self.pipe.embedder.key_function
        n, budget = len(self.pipe.samples), parse_bytes(config.memory_budget)
        factory, recall_target = config.index_factory, config.recall_target
        if shard is not None and factory == AUTO:  # each shard: the index the bank would get
            factory = choose_factory(n, self.key_dim, budget).factory
            recall_target = DEFAULT_RECALL_TARGET if recall_target is None else recall_target
        samples, ids = self.pipe.samples[rows], self.ids[rows]
        shape = {"key_dim": self.key_dim, "value_shape": self.value_shape}
        with BankWriter(path, n_entries=len(samples), **shape) as w:
            for keys, values in chunks:
                w.add(keys, values, ids[w.count : w.count + len(keys)])
            self.timings["total_s"] = time.perf_counter() - self.t_start
            report = {
                "entries": n,
                "skipped_without_image": self.n_no_image,
                "perceiver": self.record,
                "informativeness": self.info,
                "timings": {k: round(v, 2) for k, v in self.timings.items()},
            }
            resolved = {
                **config.to_dict(),
                "perceiver": self.compressor.to_config(),
                "key_function": kf.to_config(),
                "device": str(self.pipe.device),
                "threads": torch.get_num_threads(),
                "world_size": self.world_size,
                **({"shard": shard} if shard is not None else {}),
            }
            return w.finish(
                index_factory=factory,
                metric="ip",
                vision_encoder=enc.vision_fingerprint(),
                text_encoder=enc.text_fingerprint(),
                key_function={"config": kf.to_config(), "weights": kf.weights_bytes()},
                weights={"perceiver": self.compressor.weights_bytes()},
                config=resolved,
                source_ids=[s.id for s in samples],
                report=report,
                seed=config.seed,
                memory_budget_bytes=budget,
                recall_target=recall_target,
                recall_k=config.recall_k,
            )

    def write_shard(self, env: DistEnv, bounds: list[int], chunks: Iterator[tuple]) -> Path:
        """This rank's entries as shard r of W next to ``--out``, as ``bankd shard``
        names and writes it."""
        from bankd.search.shard import shard_paths

        config, (lo, hi) = self.pipe.config, bounds[env.rank : env.rank + 2]
        shard = {"index": env.rank, "of": env.world_size, "rows": [lo, hi]}
        shard["align_rows"] = shard_align(bounds, config.batch_size)
        path = shard_paths(config.out, env.world_size, config.out.parent)[env.rank]
        return self.write(path, chunks, slice(lo, hi), shard)
