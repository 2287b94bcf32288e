"""The reference workload: a synthetic bank and queries near its keys, seeded.

Keys are unit vectors scattered around ``clusters`` random centres, values random
finite fp16 [N, 32, 96], entry ids ``ID_OFFSET + row`` (never row numbers, so id
mapping is checked); each query is a noisy copy of a random bank key. The defaults
are the project's reference point: N=100000, d=768, B=128, k=5, a Flat index.

    cfg = BenchConfig(n=20_000, d=256)
    index_path = bank_for(cfg, workdir)          # written once, reused while cfg matches
    batches = make_queries(cfg, index_path)      # warmup + repeats batches [B, d]
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bankd.search.tuning import build_tuned
from bankd.store.manifest import IndexRecord, Manifest
from bankd.store.paths import VALUE_SHAPE, BankPaths
from bankd.store.writer import BankWriter

from .run import progress

CHUNK = 16_384  # entries generated and written at a time
ID_OFFSET = 1_000_000  # entry ids differ from row numbers, so id mapping is checked
KEY_NOISE = 0.7  # norm of the noise around a key's cluster centre
QUERY_NOISE = 0.3  # norm of the noise added to a bank key to make a query


@dataclass(frozen=True)
class BenchConfig:
    """What one run measures; filled from the command line, saved with the figures."""

    n: int = 100_000
    d: int = 768
    batch: int = 128
    k: int = 5
    repeats: int = 20
    warmup: int = 3
    index: str = "Flat"  # FAISS factory string or "auto"
    nprobe: int | None = None  # per-request override in both processes (IVF)
    ef_search: int | None = None  # per-request override in both processes (HNSW)
    clusters: int = 1000
    seed: int = 0
    merge_wait_us: float | None = None  # None: `bankd serve`'s default
    threads: int = 0  # OpenMP threads of FAISS in each process; 0 = FAISS's default
    tune_allocator: bool = False  # bankd_client.tune_allocator() in this (the client) process
    mmap_index: bool = False  # `bankd serve --mmap-index`: the index's vectors mapped
    reference_block: int = 0  # the reference's FAISS flat-search database block; 0: FAISS's
    flat_search: str = "auto"  # `bankd serve --flat-search`: measured choice or one engine
    keep_results: bool = False  # the caller keeps every answer (values) to the end
    workdir: str | None = None
    json: str | None = None

    def search_params(self) -> dict[str, int]:
        """FAISS parameters of --nprobe / --ef-search, for the reference's searches."""
        given = {"nprobe": self.nprobe, "efSearch": self.ef_search}
        return {name: v for name, v in given.items() if v}

    def bank_spec(self) -> dict[str, Any]:
        """The fields that decide the bank's content (a kept bank is reused if they match)."""
        return {
            "n": self.n,
            "d": self.d,
            "index": self.index,
            "clusters": self.clusters,
            "seed": self.seed,
            # Unchanged since the generator lived in search_latency.py: kept banks stay valid.
            "generator": "bench/search_latency.py v1",
        }


def add_workload_args(p: argparse.ArgumentParser, d: Any) -> None:
    """The bank's and the queries' flags, shared by the benchmarks on this bank; d: defaults."""
    p.add_argument("--n", type=int, default=d.n, help="bank entries")
    p.add_argument("--d", type=int, default=d.d, help="key dimension")
    p.add_argument("--batch", type=int, default=d.batch, help="queries per search (B)")
    p.add_argument("--k", type=int, default=d.k, help="hits per query")
    p.add_argument("--repeats", type=int, default=d.repeats, help="measured batches")
    p.add_argument("--warmup", type=int, default=d.warmup, help="warm-up batches (not measured)")
    p.add_argument("--clusters", type=int, default=d.clusters, help="cluster centres of the keys")
    p.add_argument("--seed", type=int, default=d.seed)


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def noise(rng: np.random.Generator, shape: tuple[int, ...], norm: float) -> np.ndarray:
    """Gaussian noise of about ``norm`` per row (float32)."""
    return rng.standard_normal(shape, dtype=np.float32) * np.float32(norm / np.sqrt(shape[-1]))


def write_synthetic_bank(cfg: BenchConfig, index_path: Path) -> Path:
    """Clustered unit keys [N, d], random finite fp16 values [N, 32, 96], written in chunks."""
    rng = np.random.default_rng(cfg.seed)
    centres = unit(rng.standard_normal((cfg.clusters, cfg.d), dtype=np.float32))
    with BankWriter(index_path, n_entries=cfg.n, key_dim=cfg.d) as w:
        for s in range(0, cfg.n, CHUNK):
            n = min(CHUNK, cfg.n - s)
            centre = centres[rng.integers(cfg.clusters, size=n)]
            keys = unit(centre + noise(rng, (n, cfg.d), KEY_NOISE))
            # Random bits with the top exponent bit cleared: finite fp16 in (-2, 2), fast.
            bits = np.frombuffer(rng.bytes(n * int(np.prod(VALUE_SHAPE)) * 2), dtype=np.uint16)
            values = (bits & np.uint16(0xBFFF)).view(np.float16).reshape(n, *VALUE_SHAPE)
            w.add(keys, values, ID_OFFSET + np.arange(s, s + n, dtype=np.int64))
            progress(f"  generated {s + n}/{cfg.n} entries")
        w.check_complete()
        index, described = build_tuned(w.keys, cfg.index, seed=cfg.seed)
        manifest = Manifest(index=IndexRecord.from_dict(described, cfg.index))
        return w.finish(index, manifest.with_config(**cfg.bank_spec()))


def bank_for(cfg: BenchConfig, workdir: Path) -> Path:
    """The bank at workdir/bank.faiss, reused when a kept one was made with the same spec."""
    index_path = workdir / "bank.faiss"
    paths = BankPaths(index_path)
    if paths.manifest.exists():
        if json.loads(paths.manifest.read_text()).get("config") == cfg.bank_spec():
            progress(f"reusing the bank at {index_path}")
            return index_path
    progress(f"writing a {cfg.n} x {cfg.d} bank ({cfg.index}) to {index_path}")
    t0 = time.perf_counter()
    write_synthetic_bank(cfg, index_path)
    progress(f"bank written in {time.perf_counter() - t0:.1f} s")
    return index_path


def queries_near(keys: Any, total: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``total`` unit queries (total, d) float32, each a noisy copy of a random row of
    ``keys``, in random order, and the row each was made from (total,)."""
    rng = np.random.default_rng(seed + 1)
    rows = np.sort(rng.choice(len(keys), size=total, replace=total > len(keys)))
    queries = unit(np.asarray(keys[rows]) + noise(rng, (total, keys.shape[1]), QUERY_NOISE))
    order = rng.permutation(total)
    return queries[order].astype(np.float32), rows[order]


def make_queries(cfg: BenchConfig, index_path: Path) -> list[np.ndarray]:
    """warmup + repeats batches [B, d] of unit queries, each near a random bank key."""
    keys = np.load(BankPaths(index_path).file("keys.npy"), mmap_mode="r", allow_pickle=False)
    queries, _ = queries_near(keys, (cfg.warmup + cfg.repeats) * cfg.batch, cfg.seed)
    return [np.ascontiguousarray(b) for b in np.split(queries, cfg.warmup + cfg.repeats)]
