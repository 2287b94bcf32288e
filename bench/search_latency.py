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
import contextlib
import functools
import json
import os
import re
import selectors
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

# Passive OpenMP waiting, as `bankd serve` sets for itself: the reference's threads
# spinning after each of its searches would slow the server's next one on 2 cores.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import faiss  # noqa: E402
import numpy as np  # noqa: E402

from bankd.search.flat_kernel import FLAT_SEARCH  # noqa: E402
from bankd.search.tuning import exact_topk, search_parameters  # noqa: E402
from bankd.store.paths import VALUE_SHAPE, BankPaths  # noqa: E402
from bankd.store.writer import BankWriter  # noqa: E402

BLAS_THRESHOLD = 16  # the value bankd.search.index sets; faiss 1.15's default is far higher
CHUNK = 16_384  # entries generated and written at a time
ID_OFFSET = 1_000_000  # entry ids differ from row numbers, so id mapping is checked
KEY_NOISE = 0.7  # norm of the noise around a key's cluster centre
QUERY_NOISE = 0.3  # norm of the noise added to a bank key to make a query
SERVER_START_S = 300.0


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
    flat_search: str = "auto"  # `bankd serve --flat-search`: its own kernel or FAISS
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
            "generator": "bench/search_latency.py v1",
        }


def progress(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _noise(rng: np.random.Generator, shape: tuple[int, ...], norm: float) -> np.ndarray:
    return rng.standard_normal(shape, dtype=np.float32) * np.float32(norm / np.sqrt(shape[-1]))


# -- the bank ------------------------------------------------------------------------


def write_synthetic_bank(cfg: BenchConfig, index_path: Path) -> Path:
    """Clustered unit keys [N, d], random finite fp16 values [N, 32, 96], written in chunks."""
    rng = np.random.default_rng(cfg.seed)
    centres = _unit(rng.standard_normal((cfg.clusters, cfg.d), dtype=np.float32))
    with BankWriter(index_path, n_entries=cfg.n, key_dim=cfg.d) as w:
        for s in range(0, cfg.n, CHUNK):
            n = min(CHUNK, cfg.n - s)
            centre = centres[rng.integers(cfg.clusters, size=n)]
            keys = _unit(centre + _noise(rng, (n, cfg.d), KEY_NOISE))
            # Random bits with the top exponent bit cleared: finite fp16 in (-2, 2), fast.
            bits = np.frombuffer(rng.bytes(n * int(np.prod(VALUE_SHAPE)) * 2), dtype=np.uint16)
            values = (bits & np.uint16(0xBFFF)).view(np.float16).reshape(n, *VALUE_SHAPE)
            w.add(keys, values, ID_OFFSET + np.arange(s, s + n, dtype=np.int64))
            progress(f"  generated {s + n}/{cfg.n} entries")
        return w.finish(index_factory=cfg.index, config=cfg.bank_spec(), seed=cfg.seed)


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


def make_queries(cfg: BenchConfig, index_path: Path) -> list[np.ndarray]:
    """warmup + repeats batches [B, d] of unit queries, each near a random bank key."""
    keys = np.load(BankPaths(index_path).file("keys.npy"), mmap_mode="r", allow_pickle=False)
    rng = np.random.default_rng(cfg.seed + 1)
    total = (cfg.warmup + cfg.repeats) * cfg.batch
    rows = rng.choice(cfg.n, size=total, replace=total > cfg.n)
    queries = _unit(np.asarray(keys[np.sort(rows)]) + _noise(rng, (total, cfg.d), QUERY_NOISE))
    queries = queries[rng.permutation(total)].astype(np.float32)
    return [np.ascontiguousarray(b) for b in np.split(queries, cfg.warmup + cfg.repeats)]


# -- the two sides -------------------------------------------------------------------


class Reference:
    """In-process FAISS on the bank's index file + numpy gather from the values memmap."""

    def __init__(
        self, index_path: Path, params: dict[str, int] | None = None, block: int = 0
    ) -> None:
        paths = BankPaths(index_path)
        faiss.cvar.distance_compute_blas_threshold = BLAS_THRESHOLD
        if block:
            faiss.cvar.distance_compute_blas_database_bs = block
        self.index = faiss.read_index(str(index_path))
        # (N, 32, 96) fp16
        self.values = np.load(paths.file("values.npy"), mmap_mode="r", allow_pickle=False)
        self.ids = np.load(paths.file("ids.npy"), allow_pickle=False)  # (N,) int64
        # The same per-call parameters the bankd request carries (None: the index's own,
        # which a tuned bank's index file holds).
        self.params = search_parameters(self.index, params) if params else None

    def search(self, queries: np.ndarray, k: int) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        t0 = time.perf_counter()
        scores, rows = self.index.search(queries, k, params=self.params)  # (B, k) each
        t1 = time.perf_counter()
        ids = np.where(rows >= 0, self.ids[np.maximum(rows, 0)], -1)
        values = self.values[rows.reshape(-1)].reshape(*rows.shape, *self.values.shape[1:])
        t2 = time.perf_counter()
        times = {"search": t1 - t0, "gather": t2 - t1}
        return {"ids": ids, "scores": scores, "values": values}, times


class ServerProcess:
    """`bankd serve` in a child process (this file run with --serve-index)."""

    def __init__(self, index_path: Path, log_path: Path, cfg: BenchConfig) -> None:
        self.log_path = log_path
        self.settings = ""  # what the server reports of its FAISS and merge settings
        self._log = open(log_path, "wb")
        cmd = [sys.executable, str(Path(__file__).resolve()), "--serve-index", str(index_path)]
        if cfg.merge_wait_us is not None:
            cmd += ["--merge-wait-us", str(cfg.merge_wait_us)]
        if cfg.mmap_index:
            cmd += ["--mmap-index"]
        cmd += ["--flat-search", cfg.flat_search]
        env = dict(os.environ)
        if cfg.threads:
            # The environment, not omp_set_num_threads: that only sets the calling
            # thread's count, and the server searches in its own worker thread.
            env["OMP_NUM_THREADS"] = str(cfg.threads)
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self._log, env=env)
        try:
            self.port, self.metrics_port = self._read_ports()
        except BaseException:  # KeyboardInterrupt included: never leave the child behind
            self.stop()
            raise

    def _read_ports(self) -> tuple[int, int]:
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + SERVER_START_S
        while time.monotonic() < deadline:
            if not sel.select(timeout=1.0):
                continue
            line = self.proc.stdout.readline().decode()
            if not line:
                break
            if line.startswith("settings: "):
                self.settings = line.removeprefix("settings: ").strip()
            # "bankd serving X on HOST:PORT (plaintext, ...), metrics on HOST:PORT"
            m = re.search(r"on [\d.]+:(\d+) .*metrics on [\d.]+:(\d+)", line)
            if m:
                return int(m.group(1)), int(m.group(2))
        tail = self.log_path.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"the bankd server did not start; its log ends:\n{tail}")

    def server_seconds(self) -> dict[str, float]:
        """Sums of the server's Search handler and index search histograms, in seconds."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        text = urllib.request.urlopen(url, timeout=10).read().decode()
        out = {}
        for name, key in (
            ('bankd_search_latency_seconds_sum{method="Search"}', "handler"),
            ("bankd_index_search_latency_seconds_sum", "index_search"),
        ):
            m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
            out[key] = float(m.group(1)) if m else float("nan")
        return out

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if not self._log.closed:
            self._log.close()


def _flat_engine(flat_search: str) -> str:
    """Who searches a Flat IP index in a `bankd serve --flat-search flat_search`."""
    from bankd.search import flat_kernel

    if flat_search == "faiss" or not flat_kernel.available():
        return "FAISS"
    return f"bankd's kernel (k <= {flat_kernel.MAX_K})"


def serve_child(index: str, cfg: BenchConfig) -> int:
    """Child process: `bankd serve` (the CLI's own code) on free ports, after one line
    saying which FAISS settings the server's process searches with."""
    import bankd.search.index  # noqa: F401  (sets the BLAS threshold, as `bankd serve` does)
    from bankd.cli import main as bankd_main

    print(
        f"settings: faiss distance_compute_blas_threshold="
        f"{faiss.cvar.distance_compute_blas_threshold}, database block "
        f"{faiss.cvar.distance_compute_blas_database_bs}, "
        f"{faiss.omp_get_max_threads()} OpenMP threads, Flat searched by "
        f"{_flat_engine(cfg.flat_search)}",
        flush=True,
    )
    parent = os.getppid()

    def stop_when_orphaned() -> None:  # the parent was killed without stopping us
        while os.getppid() == parent:
            time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGTERM)  # `bankd serve` drains and exits

    threading.Thread(target=stop_when_orphaned, daemon=True).start()
    argv = ["--log-level", "WARNING", "serve", "--index", index, "--port", "0"]
    argv += ["--metrics-port", "0", "--device", "cpu", "--no-verify", "--no-embed"]
    argv += ["--grace", "1"]
    if cfg.merge_wait_us is not None:
        argv += ["--merge-wait-us", str(cfg.merge_wait_us)]
    if cfg.mmap_index:
        argv += ["--mmap-index"]
    argv += ["--flat-search", cfg.flat_search]
    return bankd_main(argv)


# -- measuring -----------------------------------------------------------------------


def memory_mb(pid: int) -> dict[str, float]:
    """VmRSS, RssAnon, RssFile and VmHWM (peak RSS) of a process, MB; {} without /proc."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    out = {}
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        if name in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
            out[name] = int(rest.split()[0]) / 1024
    return out


def memory_budget(index_path: Path, rss_mb: dict[str, float]) -> dict[str, float]:
    """The server's resident memory against the bank it serves: index file + values
    file, and the target 1.15 x (index + values) + 300 MB."""
    paths = BankPaths(index_path)
    index_mb = index_path.stat().st_size / 2**20
    values_mb = paths.file("values.npy").stat().st_size / 2**20
    bank_mb = index_mb + values_mb
    limit = 1.15 * bank_mb + 300
    out = {"index_mb": index_mb, "values_mb": values_mb, "limit_mb": limit}
    if rss_mb:
        out |= {
            "rss_over_bank": rss_mb["VmRSS"] / bank_mb,
            "rss_over_limit": rss_mb["VmRSS"] / limit,
        }
    return out


def _stats(seconds: list[float]) -> dict[str, float]:
    ms = np.asarray(seconds) * 1e3
    return {
        "median_ms": float(np.median(ms)),
        "p90_ms": float(np.percentile(ms, 90)),
        "min_ms": float(ms.min()),
    }


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def _tie_explained(ref_scores: np.ndarray, got_scores: np.ndarray) -> bool:
    return bool(np.allclose(np.sort(ref_scores), np.sort(got_scores), rtol=0, atol=1e-5))


def wire_cost(ref: dict[str, np.ndarray], reps: int = 5) -> dict[str, float]:
    """In-process cost of one response: bankd's way (``bankd_client.wire``: values
    gathered into the message, read back as views) against the protobuf runtime's
    (arrays -> Tensor messages -> serialization, parse -> decode), gather included."""
    from bankd.search.topk import gather_values
    from bankd_client import wire
    from bankd_client.proto import bankd_pb2 as pb
    from bankd_client.types import Hits

    values = ref["values"].reshape(-1, *ref["values"].shape[2:])  # a stand-in bank
    rows = np.arange(len(values), dtype=np.int64).reshape(ref["ids"].shape)
    times: dict[str, list[float]] = {"encode": [], "decode": [], "pb_encode": [], "pb_decode": []}
    size = 0
    for _ in range(reps):
        fill = wire.Fill(
            ref["values"].shape, values.dtype, lambda o: gather_values(values, rows, o)
        )
        blob, t = _timed(lambda f=fill: wire.search_response(ref["ids"], ref["scores"], "", f))
        times["encode"].append(t)
        size = len(blob)
        _, t = _timed(lambda b=blob: wire.read_search_response(b))
        times["decode"].append(t)
        _, t = _timed(
            lambda: (
                Hits(ref["ids"], ref["scores"], gather_values(values, rows))
                .to_pb()
                .SerializeToString()
            )
        )
        times["pb_encode"].append(t)
        _, t = _timed(lambda b=blob: Hits.from_pb(pb.SearchResponse.FromString(b)))
        times["pb_decode"].append(t)
    out: dict[str, float] = {f"{k}_ms": _stats(v)["median_ms"] for k, v in times.items()}
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
    server: ServerProcess,
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
        (out["ref"], parts), t["ref"] = _timed(lambda: ref.search(queries, k))
        t["ref_search"], t["ref_gather"] = parts["search"], parts["gather"]

    def run_rpc() -> None:
        before = server.server_seconds()  # scraped outside the timed call
        out["rpc"], t["rpc"] = _timed(lambda: search(queries, with_values=True))
        after = server.server_seconds()
        t["server_handler"] = after["handler"] - before["handler"]
        t["server_index_search"] = after["index_search"] - before["index_search"]

    def run_rpc_message() -> None:
        out["rpc_message"], t["rpc_message"] = _timed(lambda: search_message(queries))

    def run_rpc_ids() -> None:
        _, t["rpc_no_values"] = _timed(lambda: search(queries, with_values=False))

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
            self.tied_rows += _tie_explained(want["scores"][row], hits.scores[row])
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
    server = ServerProcess(index_path, workdir / "server.log", cfg)
    times: dict[str, list[float]] = {name: [] for name in TIMINGS}
    agree = Agreement()
    found: dict[str, list[np.ndarray]] = {"ref": [], "bankd": []}
    try:
        with (
            BankClient(f"127.0.0.1:{server.port}", timeout=600) as client,
            BankClient(f"127.0.0.1:{server.port}", timeout=600, shared_memory=False) as by_msg,
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
        memory = memory_mb(server.proc.pid)  # after every batch: the values touched
    finally:
        progress("stopping the server")
        server.stop()
    stats = {name: _stats(t) for name, t in times.items()}
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
        "reference_settings": f"faiss distance_compute_blas_threshold="
        f"{faiss.cvar.distance_compute_blas_threshold}, database block "
        f"{faiss.cvar.distance_compute_blas_database_bs}, "
        f"{faiss.omp_get_max_threads()} OpenMP threads",
        "server_settings": f"{server.settings}, merge wait "
        + ("`bankd serve`'s default" if cfg.merge_wait_us is None else f"{cfg.merge_wait_us:g} us"),
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
        f"{cfg.warmup} warm-up)",
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


def parse_args(argv: list[str] | None = None) -> tuple[BenchConfig, str | None]:
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
        help="`bankd serve --flat-search`: bankd's flat kernel where it runs (auto), or FAISS",
    )
    p.add_argument("--serve-index", default=None, help=argparse.SUPPRESS)  # the server child
    a = p.parse_args(argv)
    positive = (a.n, a.d, a.batch, a.k, a.repeats, a.clusters)
    if min(positive) < 1 or a.warmup < 0 or a.threads < 0 or a.k > a.n:
        p.error("n, d, batch, k, repeats, clusters must be positive; warmup, threads >= 0; k <= n")
    cfg = BenchConfig(**{f.name: getattr(a, f.name) for f in fields(BenchConfig)})
    return cfg, a.serve_index


@contextlib.contextmanager
def workdir_for(kept: str | None, prefix: str) -> Iterator[Path]:
    """The kept folder (made if missing), else a temporary one removed afterwards."""
    if kept:
        Path(kept).mkdir(parents=True, exist_ok=True)
        yield Path(kept)
        return
    with tempfile.TemporaryDirectory(prefix=prefix) as where:
        yield Path(where)


def publish(text: str, cfg: Any, results: dict[str, Any]) -> None:
    """Print the report; write the config and figures to cfg.json when given."""
    print(text, flush=True)
    if cfg.json:
        Path(cfg.json).write_text(json.dumps({"config": asdict(cfg), **results}, indent=1))
        progress(f"figures written to {cfg.json}")


def run_program(main: Callable[[], int]) -> None:
    """sys.exit(main()); exit status 130 and a line on stderr when interrupted."""
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        progress("interrupted")
        sys.exit(130)


def main(argv: list[str] | None = None) -> int:
    cfg, serve_index = parse_args(argv)
    if serve_index is not None:
        return serve_child(serve_index, cfg)
    progress(f"config: {asdict(cfg)}")
    with workdir_for(cfg.workdir, "bankd-bench-") as workdir:
        index_path = bank_for(cfg, workdir)
        results = measure(cfg, index_path, workdir)
    publish(report(cfg, results), cfg, results)
    return 0


if __name__ == "__main__":
    run_program(main)  # child processes stop on the way out, even when interrupted
