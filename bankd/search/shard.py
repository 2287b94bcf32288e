"""`bankd shard`: split one bank into S complete banks, one bankd per shard.

    bankd shard --index bank/bank.faiss --shards 4 --out bank/shards/
    # -> bank/shards/bank-0-of-4.faiss ... bank-3-of-4.faiss (each with its own files)
    bankd serve --index bank/shards/bank-0-of-4.faiss --port 50051   # one per shard

and ``bankd_client.ShardedBankClient([...targets in shard order...])`` searches them as
one bank.

Each shard is a contiguous range of the bank's rows, in the bank's order, written
through ``BankWriter`` with the same index factory, metric, encoder fingerprints, key
function, weights and config (plus a ``shard`` record): entry ids are kept, so
exclusion by entry id stays global. The boundaries fall on multiples of
``--align-rows`` (4096, the database block bankd's flat BLAS search uses,
``bankd.search.index.FLAT_BLOCK_ROWS``), so every block a
shard's flat search multiplies is one the unsharded search multiplies too, and scores
come out bit for bit the same (given the same query batch and BLAS thread count). A
bank too small for that is split evenly instead (logged), and scores may then differ
from the unsharded bank's in the last bits.
Non-flat indexes (IVF, HNSW, PQ) are built per shard and stay approximate.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

import numpy as np

from bankd.search.index import FLAT_BLOCK_ROWS
from bankd.store.paths import BankPaths
from bankd.store.reader import Bank
from bankd.store.writer import write_bank

log = logging.getLogger(__name__)

ALIGN_ROWS = FLAT_BLOCK_ROWS  # faiss.cvar.distance_compute_blas_database_bs as bankd sets it


def shard_bounds(n: int, shards: int, align: int = ALIGN_ROWS) -> list[int]:
    """Row boundaries [0, b1, ..., n] of `shards` contiguous, non-empty ranges.

    Boundaries are the even split's, rounded to the nearest multiple of `align`; when
    that would leave a shard empty, the even split itself (a warning says so).
    """
    if shards < 1:
        raise ValueError(f"--shards must be at least 1, got {shards}")
    if shards > n:
        raise ValueError(f"cannot split {n} entries into {shards} non-empty shards")
    if align < 1:
        raise ValueError(f"--align-rows must be at least 1, got {align}")
    if (aligned := aligned_bounds(n, shards, align)) is not None:
        return aligned
    log.warning(
        "%d entries are too few for %d shards aligned to %d rows: splitting evenly; "
        "flat-index scores may differ from the unsharded bank's in the last bits",
        n,
        shards,
        align,
    )
    return [n * i // shards for i in range(shards + 1)]


def aligned_bounds(n: int, shards: int, align: int) -> list[int] | None:
    """The even split's boundaries rounded to the nearest multiple of `align`, or None
    when that leaves a range empty."""
    even = [n * i // shards for i in range(shards + 1)]
    aligned = [0] + [align * round(b / align) for b in even[1:-1]] + [n]
    if all(lo < hi for lo, hi in zip(aligned, aligned[1:], strict=False)):
        return aligned
    return None


def shard_paths(index: Path, shards: int, out: Path) -> list[Path]:
    """out/<stem>-<i>-of-<S>.faiss, i zero-padded so that names sort in shard order."""
    width = len(str(shards - 1))
    return [out / f"{index.stem}-{i:0{width}d}-of-{shards}.faiss" for i in range(shards)]


def split_bank(
    index: str | os.PathLike,
    shards: int,
    out: str | os.PathLike,
    *,
    align_rows: int = ALIGN_ROWS,
    verify: bool = True,
) -> list[Path]:
    """Write `shards` banks under `out` from the bank at `index`; their index paths."""
    index = Path(index)
    bank = Bank.load(index, verify=verify, load_index=False)
    m = bank.manifest
    bounds = shard_bounds(bank.entries, shards, align_rows)
    sources = None
    if bank.paths.file("sources.json").name in m.files:
        sources = json.loads(bank.paths.file("sources.json").read_text())
    kf = bank.key_function()
    recall = bank.recall
    common = {
        "index_factory": m.index_factory or "Flat",
        "metric": m.metric,
        "vision_encoder": bank.fingerprint("vision_encoder"),
        "text_encoder": bank.fingerprint("text_encoder"),
        "key_function": {"config": kf[0], "weights": kf[1]} if kf else None,
        "weights": {name: bank.weights(name) for name in m.weights},
        "report": m.report,
        "seed": m.seed,
        # Each shard's index is tuned again to the bank's recall target, on its own keys.
        "recall_target": recall.get("target"),
        "recall_k": int(recall.get("k", 5)),
        "ef_construction": (m.index.extra.get("build_params") or {}).get("efConstruction"),
    }
    paths = shard_paths(index, shards, Path(out))
    for i, (lo, hi) in enumerate(zip(bounds, bounds[1:], strict=False)):
        shard = {
            "index": i,
            "of": shards,
            "rows": [lo, hi],
            "align_rows": align_rows if all(b % align_rows == 0 for b in bounds[1:-1]) else 1,
            "source": str(index),
            "source_bank_id": bank.bank_id,
        }
        write_bank(
            paths[i],
            np.asarray(bank.keys[lo:hi]),
            np.asarray(bank.values[lo:hi]),
            bank.ids[lo:hi],
            config={**m.config, "shard": shard},
            source_ids=sources[lo:hi] if sources is not None else None,
            **common,
        )
        log.info(
            "shard %d of %d: rows %d..%d (%d entries) -> %s", i, shards, lo, hi, hi - lo, paths[i]
        )
    return paths


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--index", required=True, help="the bank to split (written by `bankd build`)")
    p.add_argument("--shards", type=int, required=True, help="number of shards S")
    p.add_argument("--out", required=True, help="folder for the shards (created if needed)")
    p.add_argument(
        "--align-rows",
        type=int,
        default=ALIGN_ROWS,
        help="shard boundaries on multiples of this many rows (1: an even split)",
    )
    p.add_argument(
        "--no-verify", action="store_true", help="skip the source's checksums (sizes still checked)"
    )


def run(args: argparse.Namespace) -> int:
    paths = split_bank(
        args.index, args.shards, args.out, align_rows=args.align_rows, verify=not args.no_verify
    )
    for p in paths:
        entries = json.loads(BankPaths(p).manifest.read_text())["entries"]
        print(f"{p}\t{entries} entries")
    return 0
