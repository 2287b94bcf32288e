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

import argparse
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

from bankd import __version__
from bankd.build.config import BuildConfig, from_args, resolve_workers
from bankd.build.data import (
    Sample,
    entry_ids,
    first_of_each_id,
    read_llava_json,
    select_entries,
    split_pairs,
    with_images,
)
from bankd.build.distributed import DistEnv
from bankd.build.encoding import BuildPipeline
from bankd.build.parallel import (
    COLLECTIVE_TIMEOUT,
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
from bankd.models.encoders import resolve_device
from bankd.models.perceiver import ValueCompressor
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
    workers = resolve_workers(config.workers, resolve_device(config.device).type, processes)
    threads = config.threads or max(1, cores - max(1, workers))
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0])
        torch.set_num_threads(before[1])


# Fields that do not change the checkpoints: a build resumes across changes to them
# (keep_shards decides only how the rows are written out).
_NOT_IDENTITY = ("progress", "workers", "threads", "keep_shards")


def _pass2(
    pipe: BuildPipeline,
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


def _load_entries(config: BuildConfig) -> tuple[list[Sample], dict[str, int]]:
    """(the pairs the bank holds, {report key: samples skipped for that reason})."""
    all_samples, reasons = read_llava_json(config.data, strict=config.strict)
    if reasons:
        log.warning(
            "skipping %d malformed samples (--strict to stop instead); first reasons:\n  %s",
            len(reasons),
            "\n  ".join(reasons[:5]),
        )
    samples, n_no_image = with_images(all_samples)
    if n_no_image:
        log.warning("skipping %d of %d samples without an image", n_no_image, len(all_samples))
    samples, repeats = first_of_each_id(samples)  # the rule: bankd.build.data's docstring
    if repeats:
        log.warning(
            "skipping %d samples whose id an earlier sample has (first: %s)",
            len(repeats),
            repeats[:5],
        )
    if not samples:
        raise ValueError(f"{config.data}: no sample has an image")
    skipped = {
        "skipped_without_image": n_no_image,
        "skipped_malformed": len(reasons),
        "skipped_duplicate_ids": len(repeats),
    }
    return select_entries(samples, config.entries, config.seed), skipped


def _rank_facts(config: BuildConfig, identity: dict, pipe: BuildPipeline, ids: np.ndarray) -> dict:
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
    samples, skipped = _load_entries(config)
    ids, n = entry_ids(samples), len(samples)
    bounds = pass2_bounds(n, env.world_size, config.batch_size, shards=config.keep_shards)
    rows = bounds[env.rank], bounds[env.rank + 1]

    with build_environment(config, env.local_world_size):
        pipe = BuildPipeline(config, samples, env.device, config.progress and env.is_main)
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
        built = _Built(pipe, compressor, stage, ids, skipped, t_start, env.world_size)

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
        pipe: BuildPipeline,
        compressor: ValueCompressor,
        stage: dict,
        ids: np.ndarray,
        skipped: dict[str, int],
        t_start: float,
        world_size: int,
    ) -> None:
        self.pipe, self.compressor, self.info, self.ids = pipe, compressor, stage["info"], ids
        record = stage["record"]
        self.record = {k: v for k, v in record.items() if k != "timings"}  # state keeps its own
        self.timings = dict(record["timings"])
        self.skipped, self.t_start, self.world_size = skipped, t_start, world_size
        self.key_dim = pipe.embedder.key_function.dim
        self.value_shape = (compressor.spec.num_latents, compressor.spec.d_latents)

    def write(
        self, path: Path, chunks: Iterator[tuple], rows: slice, shard: dict | None = None
    ) -> Path:
        """Commit entries ``rows`` at ``path``, their keys and values read from ``chunks``
        in order; ``shard``: the ``config.shard`` record of one shard."""
        from bankd.search.tuning import (  # faiss only when writing
            AUTO,
            DEFAULT_RECALL_TARGET,
            build_tuned,
            choose_factory,
            parse_bytes,
        )
        from bankd.store.manifest import IndexRecord, KeyFunctionRecord, Manifest
        from bankd.store.writer import BankWriter

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
            source_ids = [s.id for s in samples]
            w.check_complete(source_ids)
            index, described = build_tuned(
                w.keys,
                factory,
                "ip",
                memory_budget_bytes=budget,
                recall_target=recall_target,
                recall_k=config.recall_k,
                seed=config.seed,
                ef_construction=config.ef_construction,
            )
            self.timings["total_s"] = time.perf_counter() - self.t_start
            report = {
                "entries": n,
                **self.skipped,
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
            manifest = Manifest(
                index=IndexRecord.from_dict(described, factory),
                metric="ip",
                vision_encoder=enc.vision_fingerprint(),
                text_encoder=enc.text_fingerprint(),
                key_function=KeyFunctionRecord(kf.to_config(), ""),
                config=resolved,
                report=report,
            )
            return w.finish(
                index,
                manifest,
                weights={"perceiver": self.compressor.weights_bytes()},
                key_function_weights=kf.weights_bytes(),
                source_ids=source_ids,
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


def run(args: argparse.Namespace) -> int:
    """Entry point of ``bankd build``; bad arguments raise ValueError.

    Under torchrun every rank runs this; only rank 0 prints.
    """
    from bankd.build.distributed import init_distributed
    from bankd.search.shard import shard_paths
    from bankd.store.reader import Bank

    config = from_args(args)
    env = init_distributed(config.device, timeout=COLLECTIVE_TIMEOUT)
    try:
        path = build_bank(config, restart=args.restart, env=env)
    finally:
        env.close()
    if not env.is_main:
        return 0
    manifest = Bank.load(path, verify=False, load_index=False).manifest
    report, index = manifest.report, manifest.index
    timings = report.get("timings", {})
    where = path
    if config.keep_shards:
        shards = shard_paths(config.out, env.world_size, config.out.parent)
        where = f"{env.world_size} shards, {', '.join(map(str, shards))}"
    print(f"build: wrote {report.get('entries')} entries to {where} in {timings.get('total_s')} s")
    recall, params = index.recall, index.search_params or "none"
    print(
        f"index: {index.factory} ({index.reason or 'as asked'}), "
        f"{index.bytes / 1e6:.1f} MB, search params {params}, "
        f"recall@{recall.get('k')} {recall.get('value')}"
    )
    return 0  # the informativeness table is in the log and in the manifest's report
