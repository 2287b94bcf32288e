"""Sharded search latency: S bankd shards behind ShardedBankClient against one bankd.

    source .venv/bin/activate                            # after `make install`
    python bench/sharded_search.py                       # N=100000, d=768, B=128, k=5, 4 shards
    python bench/sharded_search.py --n 20000 --d 256     # quick check
    python bench/sharded_search.py --threads 1 --shard-threads 1 --json sharded.json
    python bench/sharded_search.py --workdir /tmp/bench-bank   # keep bank and shards; reused

It writes the synthetic bank of ``bench/search_latency.py`` (same generator, same
flags, so a ``--workdir`` bank is shared between the two), splits it with
``bankd.search.shard.split_bank`` (what ``bankd shard`` runs), and starts S + 1 ``bankd
serve`` processes on this machine: one on the whole bank, one per shard. Then, batch
by batch and in alternating order:

* unsharded: ``BankClient.search(keys, k, with_values=True)`` on the whole bank;
* sharded: ``ShardedBankClient.search(...)`` with the same arguments: the same batch
  to every shard at once, per-query merge of the S top-k lists in this process.

It checks that the two answers are equal (ids and values; scores bit for bit when
every server runs the same number of BLAS threads: ``--threads N --shard-threads N``),
times the client's merge on its own, and prints medians, p90s and last
``ratio(sharded/unsharded) = X.XX`` (ratio of the median latencies).

All processes share this machine's cores. By default the unsharded server's FAISS
uses every core and each shard's 1/S of them (S servers with a thread per core each
would oversubscribe the cores S times over): each shard searches 1/S of the keys on
1/S of the cores, so the ratio shows what the fan-out costs, not the speed-up a
shard per node gives (see bench/README.md).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import search_latency as sl  # noqa: E402  (the bank, queries and server child)

from bankd.search.shard import shard_paths, split_bank  # noqa: E402
from bankd.store.paths import BankPaths  # noqa: E402
from bankd.store.reader import Bank  # noqa: E402


@dataclass(frozen=True)
class ShardBenchConfig:
    """What one run measures; filled from the command line, saved with the figures."""

    n: int = 100_000
    d: int = 768
    batch: int = 128
    k: int = 5
    shards: int = 4
    repeats: int = 20
    warmup: int = 3
    index: str = "Flat"
    clusters: int = 1000
    seed: int = 0
    threads: int = 0  # OpenMP threads of FAISS in the unsharded server; 0 = all cores
    shard_threads: int = 0  # ... in each shard's server; 0 = cores / shards (at least 1)
    values_in_search: bool = False  # never fetch values in a second round
    workdir: str | None = None
    json: str | None = None

    def bank(self) -> sl.BenchConfig:
        """The search_latency config that writes the same bank and queries."""
        names = {f.name for f in fields(sl.BenchConfig)} - {"json"}
        return replace(sl.BenchConfig(), **{n: getattr(self, n) for n in names if hasattr(self, n)})


def shards_for(cfg: ShardBenchConfig, index: Path, workdir: Path) -> list[Path]:
    """The bank's shards under workdir/shards, reused when split from this very bank."""
    bank_id = Bank.load(index, verify=False, load_index=False).bank_id
    paths = shard_paths(index, cfg.shards, workdir / "shards")
    manifests = [BankPaths(p).manifest for p in paths]
    if all(m.exists() for m in manifests) and all(
        json.loads(m.read_text())["config"]["shard"]["source_bank_id"] == bank_id for m in manifests
    ):
        sl.progress(f"reusing the {cfg.shards} shards in {workdir / 'shards'}")
        return paths
    sl.progress(f"splitting the bank into {cfg.shards} shards")
    t0 = time.perf_counter()
    paths = split_bank(index, cfg.shards, workdir / "shards", verify=False)
    sl.progress(f"shards written in {time.perf_counter() - t0:.1f} s")
    return paths


def shard_threads(cfg: ShardBenchConfig) -> int:
    """Threads per shard server: the cores shared evenly, as S servers on one machine need
    (S servers with an OpenMP thread per core each oversubscribe it S times over)."""
    return cfg.shard_threads or max(1, (os.cpu_count() or 1) // cfg.shards)


def _equal(a: Any, b: Any) -> dict[str, int]:
    return {
        "rows": len(a.ids),
        "id_rows": int((a.ids != b.ids).any(axis=1).sum()),
        "score_rows": int((a.scores != b.scores).any(axis=1).sum()),
        "value_hits": int((~(a.values == b.values).all(axis=(2, 3)) & (a.ids == b.ids)).sum()),
        "max_score_diff": float(np.abs(a.scores - b.scores).max()),
    }


def merge_cost(shard_clients: list[Any], queries: np.ndarray, k: int, reps: int = 5) -> float:
    """Median seconds of merge_hits on real per-shard answers (the client's own work)."""
    from bankd_client.sharded import merge_hits

    parts = [c.search(queries, k=k) for c in shard_clients]
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        merge_hits(parts, k)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def measure(cfg: ShardBenchConfig, index: Path, shards: list[Path], workdir: Path) -> dict:
    from bankd_client import BankClient, ShardedBankClient
    from bankd_client.sharded import SEPARATE_VALUES_OVER

    bank_cfg = replace(cfg.bank(), merge_wait_us=None)
    shard_cfg = replace(bank_cfg, threads=shard_threads(cfg))
    batches = sl.make_queries(bank_cfg, index)
    servers: list[sl.ServerProcess] = []
    times: dict[str, list[float]] = {"unsharded": [], "sharded": []}
    agree = {"rows": 0, "id_rows": 0, "score_rows": 0, "value_hits": 0, "max_score_diff": 0.0}
    try:
        sl.progress(f"starting {cfg.shards + 1} bankd server processes")
        servers.append(sl.ServerProcess(index, workdir / "server-whole.log", bank_cfg))
        for i, path in enumerate(shards):
            servers.append(sl.ServerProcess(path, workdir / f"server-{i}.log", shard_cfg))
        targets = [f"127.0.0.1:{s.port}" for s in servers]
        with (
            BankClient(targets[0], timeout=600) as whole,
            ShardedBankClient(
                targets[1:],
                timeout=600,
                separate_values_over=None if cfg.values_in_search else SEPARATE_VALUES_OVER,
            ) as sharded,
        ):
            whole.wait_ready(timeout=sl.SERVER_START_S)
            sharded.wait_ready(timeout=sl.SERVER_START_S)
            sl.progress(f"servers up; {cfg.warmup} warm-up + {cfg.repeats} measured batches")
            for i, q in enumerate(batches):
                t: dict[str, float] = {}
                out: dict[str, Any] = {}
                sides = [("unsharded", whole), ("sharded", sharded)]
                for name, client in sides[::-1] if i % 2 else sides:
                    t0 = time.perf_counter()
                    out[name] = client.search(q, k=cfg.k, with_values=True)
                    t[name] = time.perf_counter() - t0
                for key, v in _equal(out["sharded"], out["unsharded"]).items():
                    agree[key] = max(agree[key], v) if key == "max_score_diff" else agree[key] + v
                if i >= cfg.warmup:
                    for name in times:
                        times[name].append(t[name])
                sl.progress(
                    f"  batch {i + 1}/{len(batches)}{' (warm-up)' if i < cfg.warmup else ''}: "
                    f"unsharded {t['unsharded'] * 1e3:.1f} ms, sharded {t['sharded'] * 1e3:.1f} ms"
                )
            merge_s = merge_cost(sharded.shards, batches[0], cfg.k)
            dropped = (cfg.shards - 1) * cfg.batch * cfg.k * 2 * int(np.prod(sl.VALUE_SHAPE))
            limit = sharded.separate_values_over
            values_path = (
                f"fetched after the merge ({dropped / 1e6:.1f} MB of dropped values avoided)"
                if limit is not None and dropped > limit
                else f"sent with each shard's hits ({dropped / 1e6:.1f} MB dropped by the merge)"
            )
            shard_sizes = [s.entries for s in sharded.shard_infos()]
    finally:
        sl.progress("stopping the servers")
        for s in servers:
            s.stop()
    stats = {name: sl._stats(v) for name, v in times.items()}
    return {
        "stats": stats,
        "ratio": stats["sharded"]["median_ms"] / stats["unsharded"]["median_ms"],
        "paired_ratio_median": float(np.median(np.divide(times["sharded"], times["unsharded"]))),
        "merge_ms": merge_s * 1e3,
        "values_path": values_path,
        "shard_entries": shard_sizes,
        "agreement": agree,
        "server_settings": servers[0].settings,
        "shard_server_settings": servers[1].settings,
    }


def report(cfg: ShardBenchConfig, r: dict[str, Any]) -> str:
    s, a = r["stats"], r["agreement"]

    def row(label: str, name: str) -> str:
        return f"  {label:<44s} {s[name]['median_ms']:9.1f} {s[name]['p90_ms']:9.1f}"

    return "\n".join(
        [
            f"sharded search: N={cfg.n} d={cfg.d} B={cfg.batch} k={cfg.k} index={cfg.index}, "
            f"{cfg.shards} shards of {r['shard_entries']} entries, all on this machine "
            f"({cfg.repeats} batches measured after {cfg.warmup} warm-up)",
            f"unsharded server: {r['server_settings']}",
            f"each shard's server: {r['shard_server_settings']}",
            f"  {'':<44s} {'median ms':>9s} {'p90 ms':>9s}",
            row("unsharded: BankClient.search, values", "unsharded"),
            row(f"sharded: ShardedBankClient.search ({cfg.shards} shards)", "sharded"),
            f"  values: {r['values_path']}",
            f"  client merge of {cfg.shards} x {cfg.k} hits per query: {r['merge_ms']:.2f} ms",
            f"checked on {a['rows']} query rows: {a['id_rows']} rows with other ids, "
            f"{a['score_rows']} with other scores (largest difference {a['max_score_diff']:.1e}); "
            f"hits with other values: {a['value_hits']}",
            f"median of per-batch ratios (sharded / unsharded) = {r['paired_ratio_median']:.2f}",
            f"ratio(sharded/unsharded) = {r['ratio']:.2f}",
        ]
    )


def parse_args(argv: list[str] | None = None) -> ShardBenchConfig:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    d = ShardBenchConfig()
    sl.add_workload_args(p, d)
    p.add_argument("--shards", type=int, default=d.shards, help="shards (S)")
    p.add_argument("--index", default=d.index, help="FAISS factory string")
    p.add_argument(
        "--threads",
        type=int,
        default=d.threads,
        help="FAISS OpenMP threads in the unsharded server (0: FAISS's default, all cores)",
    )
    p.add_argument(
        "--shard-threads",
        type=int,
        default=d.shard_threads,
        help="FAISS OpenMP threads in each shard's server (0: cores / shards, at least 1)",
    )
    p.add_argument(
        "--values-in-search",
        action="store_true",
        help="shards send the values of all their hits (no second round for the winners')",
    )
    p.add_argument("--workdir", default=None, help="keep bank and shards here (reused)")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    a = p.parse_args(argv)
    positive = (a.n, a.d, a.batch, a.k, a.shards, a.repeats, a.clusters)
    if (
        min(positive) < 1
        or min(a.warmup, a.threads, a.shard_threads) < 0
        or max(a.k, a.shards) > a.n
    ):
        p.error("n, d, batch, k, shards, repeats, clusters must be positive; k, shards <= n")
    return ShardBenchConfig(**{f.name: getattr(a, f.name) for f in fields(ShardBenchConfig)})


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    sl.progress(f"config: {asdict(cfg)}")
    with sl.workdir_for(cfg.workdir, "bankd-bench-") as workdir:
        index = sl.bank_for(cfg.bank(), workdir)
        shards = shards_for(cfg, index, workdir)
        results = measure(cfg, index, shards, workdir)
    sl.publish(report(cfg, results), cfg, results)
    return 0


if __name__ == "__main__":
    sl.run_program(main)  # child processes stop on the way out, even when interrupted
