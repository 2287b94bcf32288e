"""Search latency: bankd's Search RPC against in-process FAISS on the same bank.

    source .venv/bin/activate                            # after `make install`
    python bench/search_latency.py                       # N=100000, d=768, B=128, k=5, Flat
    python bench/search_latency.py --n 20000 --d 256     # quick check, well under a minute
    python bench/search_latency.py --index HNSW32 --json search_latency.json
    python bench/search_latency.py --index auto          # bankd.search.tuning's choice, tuned
    python bench/search_latency.py --index HNSW32 --ef-search 64   # per-request override
    python bench/search_latency.py --workdir /tmp/bench-bank   # keep the bank, reuse it next run

It writes a synthetic bank with cluster structure (unit keys scattered around
`--clusters` random centres, random fp16 values [N, 32, 96]) and queries that are
noisy copies of bank keys, starts `bankd serve` on that bank in a separate process
(as deployed: client and server do not share a GIL), and then, batch by batch,
interleaves:

* reference: in-process ``faiss`` search of the same index file plus a numpy gather
  of the values from the memory-mapped values file: the floor a remote bank can
  only approach;
* bankd: ``BankClient.search(keys, k, with_values=True)``, the trainer's call; on
  one host the server writes the values into the client's shared memory;
* bankd with the values in the response message (``BankClient(...,
  shared_memory=False)``), as a client on another host gets them;
* bankd without values (``with_values=False``), to split off the cost of moving
  B * k * 32 * 96 fp16 values (3.9 MB at the defaults).

Both processes set ``faiss.cvar.distance_compute_blas_threshold = 16`` (the server
does it in ``bankd.search.index``), so a batch search takes the BLAS path in each. The
server's own histograms (scraped from its /metrics after every call) split each
RPC into the server's handler time and its index search. The last line printed is
``ratio(bankd/in-process) = X.XX``, the ratio of the median latencies; the project's
target at the defaults is <= 1.5. For approximate indexes it also prints recall@k of
the reference and of bankd against exact search of the same queries (ids of the
exact top-k over the bank's keys). Progress goes to stderr; exit status 0.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

# Passive OpenMP waiting, as `bankd serve` sets for itself: the reference's threads
# spinning after each of its searches would slow the server's next one on 2 cores.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import faiss  # noqa: E402
import numpy as np  # noqa: E402
from workload.bank import BenchConfig, add_workload_args, bank_for, make_queries  # noqa: E402
from workload.memory import memory_budget, memory_mb  # noqa: E402
from workload.reference import Reference, tie_explained  # noqa: E402
from workload.run import (  # noqa: E402
    latency_stats,
    progress,
    publish,
    run_program,
    timed,
    workdir_for,
)
from workload.server import SERVER_START_S, BenchServer, merge_wait, server_config  # noqa: E402

from bankd.search.flat_kernel import FLAT_SEARCH  # noqa: E402
from bankd.search.tuning import exact_topk  # noqa: E402
from bankd.store.paths import VALUE_SHAPE, BankPaths  # noqa: E402


def wire_cost(ref: dict[str, np.ndarray], reps: int = 5) -> dict[str, float]:
    """In-process cost of one response: bankd's way (``bankd.serve.wire`` writes, values
    gathered then joined into the message; ``bankd_client.wire`` reads them back as
    views) against the protobuf runtime's
    (arrays -> Tensor messages -> serialization, parse -> decode), gather included."""
    from bankd.search.topk import gather_values
    from bankd.serve import wire as server_wire
    from bankd_client import wire
    from bankd_client.proto import bankd_pb2 as pb
    from bankd_client.types import Hits

    values = ref["values"].reshape(-1, *ref["values"].shape[2:])  # a stand-in bank
    rows = np.arange(len(values), dtype=np.int64).reshape(ref["ids"].shape)
    times: dict[str, list[float]] = {"encode": [], "decode": [], "pb_encode": [], "pb_decode": []}
    size = 0
    for _ in range(reps):
        fill = server_wire.Fill(
            ref["values"].shape, values.dtype, lambda o: gather_values(values, rows, o)
        )
        blob, t = timed(
            lambda f=fill: server_wire.search_response(ref["ids"], ref["scores"], "", f)
        )
        times["encode"].append(t)
        size = len(blob)
        _, t = timed(lambda b=blob: wire.read_search_response(b))
        times["decode"].append(t)
        _, t = timed(
            lambda: (
                Hits(ref["ids"], ref["scores"], gather_values(values, rows))
                .to_pb()
                .SerializeToString()
            )
        )
        times["pb_encode"].append(t)
        _, t = timed(lambda b=blob: Hits.from_pb(pb.SearchResponse.FromString(b)))
        times["pb_decode"].append(t)
    out: dict[str, float] = {f"{k}_ms": latency_stats(v)["median_ms"] for k, v in times.items()}
    return {**out, "response_bytes": size}


TIMINGS = (
    "ref",
    "ref_search",
    "ref_gather",
    "rpc",
    "rpc_message",
    "rpc_no_values",
    "server_handler",
    "server_index_search",
)


def measure_batch(
    ref: Reference,
    clients: tuple[Any, Any],
    server: BenchServer,
    queries: np.ndarray,
    cfg: BenchConfig,
    flip: bool,
) -> tuple[dict[str, float], dict[str, np.ndarray], Any, Any]:
    """One batch through the reference, bankd with values (shared memory, then in the
    message), bankd without: seconds each."""
    t: dict[str, float] = {}
    out: dict[str, Any] = {}
    k = cfg.k
    params = {"k": k, "nprobe": cfg.nprobe, "ef_search": cfg.ef_search}
    search = functools.partial(clients[0].search, **params)
    search_message = functools.partial(clients[1].search, **params)

    def run_ref() -> None:
        (out["ref"], parts), t["ref"] = timed(lambda: ref.search(queries, k))
        t["ref_search"], t["ref_gather"] = parts["search"], parts["gather"]

    def run_rpc() -> None:
        before = server.server_seconds()  # scraped outside the timed call
        out["rpc"], t["rpc"] = timed(lambda: search(queries, with_values=True))
        after = server.server_seconds()
        t["server_handler"] = after["handler"] - before["handler"]
        t["server_index_search"] = after["index_search"] - before["index_search"]

    def run_rpc_message() -> None:
        out["rpc_message"], t["rpc_message"] = timed(lambda: search_message(queries))

    def run_rpc_ids() -> None:
        _, t["rpc_no_values"] = timed(lambda: search(queries, with_values=False))

    # Alternate the order so that neither side always runs right after the other.
    steps = [run_ref, run_rpc, run_rpc_message, run_rpc_ids]
    for step in steps[::-1] if flip else steps:
        step()
    return t, out["ref"], out["rpc"], out["rpc_message"]


@dataclass
class Agreement:
    """How far bankd's answers differ from the reference's."""

    rows: int = 0
    id_rows: int = 0  # query rows whose ids differ
    tied_rows: int = 0  # ... of which the two score lists agree (ties ordered differently)
    values: int = 0  # hits with the same id but different values

    transports: int = 0  # hits whose id or value differ between the two transports

    def add(self, want: dict[str, np.ndarray], hits: Any, message: Any) -> None:
        same = (hits.ids == message.ids) & (hits.values == message.values).all(axis=(2, 3))
        self.transports += int((~same).sum())
        self.rows += len(want["ids"])
        for row in np.flatnonzero((want["ids"] != hits.ids).any(axis=1)):
            self.id_rows += 1
            self.tied_rows += tie_explained(want["scores"][row], hits.scores[row])
        differ = ~(want["values"] == hits.values).all(axis=(2, 3))  # (B, k)
        self.values += int((differ & (want["ids"] == hits.ids)).sum())


def measure(cfg: BenchConfig, index_path: Path, workdir: Path) -> dict[str, Any]:
    from bankd_client import BankClient

    batches = make_queries(cfg, index_path)
    if cfg.tune_allocator:
        from bankd_client import tune_allocator

        tune_allocator()  # as `bankd serve` does at start
    if cfg.threads:
        faiss.omp_set_num_threads(cfg.threads)  # the reference searches in this thread
    ref = Reference(index_path, cfg.search_params(), cfg.reference_block)
    progress("starting the bankd server process")
    server = BenchServer(
        server_config(index_path, cfg), workdir / "server.log", threads=cfg.threads
    )
    times: dict[str, list[float]] = {name: [] for name in TIMINGS}
    agree = Agreement()
    found: dict[str, list[np.ndarray]] = {"ref": [], "bankd": []}
    kept: list[Any] = []  # every answer, with --keep-results
    try:
        settings = server.search_settings()
        with (
            BankClient(server.address, timeout=600) as client,
            BankClient(server.address, timeout=600, shared_memory=False) as by_msg,
        ):
            client.wait_ready(timeout=SERVER_START_S)
            progress(
                f"server up on port {server.port}; {cfg.warmup} warm-up + {cfg.repeats} "
                "measured batches, interleaved"
            )
            for i, queries in enumerate(batches):
                t, want, hits, message = measure_batch(
                    ref, (client, by_msg), server, queries, cfg, flip=i % 2 == 1
                )
                agree.add(want, hits, message)
                if cfg.keep_results:
                    kept.append((want, hits, message))
                found["ref"].append(want["ids"])
                found["bankd"].append(np.asarray(hits.ids))
                if i >= cfg.warmup:
                    for name in TIMINGS:
                        times[name].append(t[name])
                progress(
                    f"  batch {i + 1}/{len(batches)}{' (warm-up)' if i < cfg.warmup else ''}"
                    f": reference {t['ref'] * 1e3:.1f} ms, bankd {t['rpc'] * 1e3:.1f} ms, "
                    f"values in the message {t['rpc_message'] * 1e3:.1f} ms, "
                    f"without values {t['rpc_no_values'] * 1e3:.1f} ms"
                )
            shared_memory = client.shared_memory_in_use
        memory = memory_mb(server.pid)  # after every batch: the values touched
    finally:
        progress("stopping the server")
        server.stop()
    stats = {name: latency_stats(t) for name, t in times.items()}
    return {
        "stats": stats,
        "ratio": stats["rpc"]["median_ms"] / stats["ref"]["median_ms"],
        "ratio_message": stats["rpc_message"]["median_ms"] / stats["ref"]["median_ms"],
        "shared_memory": shared_memory,
        "paired_ratio_median": float(np.median(np.divide(times["rpc"], times["ref"]))),
        "ratio_no_values": stats["rpc_no_values"]["median_ms"] / stats["ref_search"]["median_ms"],
        "agreement": asdict(agree),
        "recall": recall_vs_exact(cfg, index_path, batches, found),
        "index": json.loads(BankPaths(index_path).manifest.read_text()).get("index", {}),
        "wire": wire_cost(want),
        "memory": {"server": memory, **memory_budget(index_path, memory)},
        "reference_settings": ref.settings(),
        "server_settings": f"{settings}, {merge_wait(cfg)}",
    }


def recall_vs_exact(
    cfg: BenchConfig, index_path: Path, batches: list[np.ndarray], found: dict[str, list]
) -> dict[str, float] | None:
    """recall@k of each side's ids against exact inner-product search of the same
    queries (None for a Flat index: it is the exact search)."""
    paths = BankPaths(index_path)
    if json.loads(paths.manifest.read_text()).get("index_factory") == "Flat":
        return None
    keys = np.load(paths.file("keys.npy"), mmap_mode="r", allow_pickle=False)
    ids = np.load(paths.file("ids.npy"), allow_pickle=False)
    progress(f"exact search of the {len(batches) * cfg.batch} queries for recall@{cfg.k}")
    truth = ids[exact_topk(keys, np.concatenate(batches), cfg.k, faiss.METRIC_INNER_PRODUCT)]
    out = {}
    for side, parts in found.items():
        got = np.concatenate(parts)
        hits = sum(len(set(g) & set(w)) for g, w in zip(got.tolist(), truth.tolist(), strict=True))
        out[side] = hits / truth.size
    return out


# -- report --------------------------------------------------------------------------


def report(cfg: BenchConfig, r: dict[str, Any]) -> str:
    s, w, a = r["stats"], r["wire"], r["agreement"]
    values_mb = cfg.batch * cfg.k * int(np.prod(VALUE_SHAPE)) * 2 / 1e6

    def row(label: str, name: str) -> str:
        return f"  {label:<56s} {s[name]['median_ms']:9.1f} {s[name]['p90_ms']:9.1f}"

    transport = s["rpc"]["median_ms"] - s["server_handler"]["median_ms"]
    via = "shared memory" if r["shared_memory"] else "in the message: no shared memory"
    idx = r.get("index") or {}
    chosen = f" -> {idx['factory']} ({idx.get('reason', '')})" if cfg.index == "auto" else ""
    params = {**idx.get("search_params", {}), **cfg.search_params()}
    lines = [
        f"search latency: N={cfg.n} d={cfg.d} B={cfg.batch} k={cfg.k} index={cfg.index}"
        f"{chosen}, search params {params or 'FAISS defaults'} "
        f"(clusters={cfg.clusters}, seed={cfg.seed}, {cfg.repeats} batches measured after "
        f"{cfg.warmup} warm-up)"
        + ("; the caller keeps every answer to the end" if cfg.keep_results else ""),
        f"reference (this process): {r['reference_settings']}",
        f"bankd server (own process): {r['server_settings']}",
        f"  {'':<56s} {'median ms':>9s} {'p90 ms':>9s}",
        row("reference: in-process faiss + numpy gather", "ref"),
        row("  of which faiss search", "ref_search"),
        row("  of which value gather", "ref_gather"),
        row(f"bankd Search RPC, values ({values_mb:.1f} MB, {via})", "rpc"),
        row("  server handler (bankd_search_latency)", "server_handler"),
        row("  server index search", "server_index_search"),
        f"  {'  rest: serialize, transport, client decode':<56s} {transport:9.1f}",
        row("bankd Search RPC, values in the message", "rpc_message"),
        row("bankd Search RPC, with_values=False", "rpc_no_values"),
        f"  one response in-process ({w['response_bytes'] / 1e6:.1f} MB, value gather "
        f"included): bankd's wire encode {w['encode_ms']:.2f} ms, decode "
        f"{w['decode_ms']:.2f} ms; through protobuf objects {w['pb_encode_ms']:.2f} / "
        f"{w['pb_decode_ms']:.2f} ms",
        f"ids checked on {a['rows']} query rows: {a['id_rows']} rows differ "
        f"({a['tied_rows']} of them by tied scores); hits whose values differ: {a['values']}; "
        f"hits that differ between the two transports: {a['transports']}",
        f"median of per-batch ratios (bankd / reference, same batch) = "
        f"{r['paired_ratio_median']:.2f}",
        f"ratio without values (bankd ids-only RPC / faiss search) = {r['ratio_no_values']:.2f}",
    ]
    m = r["memory"]
    if m["server"]:
        srv = m["server"]
        lines.append(
            f"server memory after the batches{' (--mmap-index)' if cfg.mmap_index else ''}: "
            f"RSS {srv['VmRSS']:.0f} MiB (anonymous {srv['RssAnon']:.0f}, file-backed "
            f"{srv['RssFile']:.0f}, peak {srv['VmHWM']:.0f}); index {m['index_mb']:.0f} + values "
            f"{m['values_mb']:.0f} MiB; RSS / (index + values) = {m['rss_over_bank']:.2f}; "
            f"RSS / (1.15 x (index + values) + 300 MiB) = {m['rss_over_limit']:.2f} (target <= 1)"
        )
    if r["recall"] is not None:
        lines.append(
            f"recall@{cfg.k} against exact search of the same queries: reference "
            f"{r['recall']['ref']:.4f}, bankd {r['recall']['bankd']:.4f}"
        )
    lines += [
        f"ratio(bankd values in the message/in-process) = {r['ratio_message']:.2f}",
        f"ratio(bankd/in-process) = {r['ratio']:.2f}",
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> BenchConfig:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    d = BenchConfig()
    add_workload_args(p, d)
    p.add_argument("--index", default=d.index, help="FAISS factory string, or auto")
    p.add_argument("--nprobe", type=int, default=None, help="per-request nprobe (IVF)")
    p.add_argument("--ef-search", type=int, default=None, help="per-request efSearch (HNSW)")
    p.add_argument(
        "--merge-wait-us",
        type=float,
        default=d.merge_wait_us,
        help="the server's request-merging wait (default: the server's own default)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=d.threads,
        help="FAISS OpenMP threads in both processes (0: FAISS's default, all cores)",
    )
    p.add_argument(
        "--tune-allocator",
        action="store_true",
        help="call bankd_client.tune_allocator() in the client process (responses over 32 MB)",
    )
    p.add_argument(
        "--keep-results",
        action="store_true",
        help="keep every answer (its values) to the end, in both processes, as a "
        "prefetching trainer does: no region of an earlier call can be reused",
    )
    p.add_argument("--workdir", default=None, help="keep the bank here (reused if it matches)")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    p.add_argument(
        "--reference-block",
        type=int,
        default=d.reference_block,
        help="the reference's FAISS flat-search database block (default: FAISS's, 1024; "
        "bankd serve uses 4096)",
    )
    p.add_argument(
        "--mmap-index",
        action="store_true",
        help="serve with `bankd serve --mmap-index` (the index's vectors mapped from the file)",
    )
    p.add_argument(
        "--flat-search",
        choices=FLAT_SEARCH,
        default=d.flat_search,
        help="`bankd serve --flat-search`: the fastest engine measured at load (auto), or one",
    )
    a = p.parse_args(argv)
    positive = (a.n, a.d, a.batch, a.k, a.repeats, a.clusters)
    if min(positive) < 1 or a.warmup < 0 or a.threads < 0 or a.k > a.n:
        p.error("n, d, batch, k, repeats, clusters must be positive; warmup, threads >= 0; k <= n")
    cfg = BenchConfig(**{f.name: getattr(a, f.name) for f in fields(BenchConfig)})
    return cfg


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    progress(f"config: {asdict(cfg)}")
    with workdir_for(cfg.workdir, "bankd-bench-") as workdir:
        index_path = bank_for(cfg, workdir)
        results = measure(cfg, index_path, workdir)
    publish(report(cfg, results), cfg, results)
    return 0


if __name__ == "__main__":
    run_program(main)  # child processes stop on the way out, even when interrupted
