"""Throughput: many concurrent small-batch clients against one client of big batches.

    source .venv/bin/activate                         # after `make install`
    python bench/throughput.py                        # N=100000, d=768, k=5, Flat; 1, 8, 32 clients
    python bench/throughput.py --n 20000 --d 256 --seconds 5      # quick check
    python bench/throughput.py --clients 32 --merge-wait-us 2000  # another merge window
    python bench/throughput.py --rounds 3             # every phase three times, interleaved
    python bench/throughput.py --workdir /tmp/bench-bank   # keep the bank; reused next run

It writes the reference workload's synthetic bank (`bench/workload`: clustered unit
keys, random fp16 values [N, 32, 96]) and a pool of queries near bank keys, starts
`bankd serve` on it in a child process (`workload.server.BenchServer`), and measures
queries per second, values returned and decoded, in phases one after another:

* reference: one client sending `--batch` (512) queries per Search call;
* for each C in `--clients` (1, 8, 32): C threads, each with its own BankClient (its
  own channel), sending `--client-batch` (16) queries per Search call, back to back;
* in-process FAISS: the same pool searched in `--batch` batches with a numpy gather of
  the values, in this process (context: the floor of the work the server does).

Each phase runs `--warmup-s` and then `--seconds`; the queries of calls that complete
inside the measured window count. The server phases run `--rounds` (2) times in turn
and add up, so that a change in the machine's load reaches every phase alike. Between
phases the server's own histograms are
scraped: the rows per index search after merging (`bankd_merged_batch_rows`) and the
index search time. Every answer's ids are compared with the in-process search of the
same rows. The last line is `ratio(C x B=b / 1 x B=512) = X.XX`, the queries/s of the
largest C over the reference's; the project's target at the defaults is >= 0.8.
`--json PATH` writes every figure. Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import os
import re
import threading
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

# Passive OpenMP waiting here and in the server child: spinning threads on a shared
# machine slow every search several-fold.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
from workload.bank import BenchConfig, add_workload_args, bank_for, make_queries  # noqa: E402
from workload.reference import Reference, tie_explained  # noqa: E402
from workload.run import progress, publish, run_program, workdir_for  # noqa: E402
from workload.server import SERVER_START_S, BenchServer, merge_wait, server_config  # noqa: E402

POOL_BATCHES = 8  # the query pool holds this many reference batches


@dataclass(frozen=True)
class ThroughputConfig(BenchConfig):
    """What one run measures: the reference workload (`batch` is the reference's
    batch, `repeats`/`warmup` are unused) and the phases; saved with the figures."""

    batch: int = 512
    clients: tuple[int, ...] = (1, 8, 32)
    client_batch: int = 16
    seconds: float = 10.0
    warmup_s: float = 2.0
    rounds: int = 2

    def bank(self) -> BenchConfig:
        """The workload config of the same bank and a pool of POOL_BATCHES batches."""
        own = {f.name: getattr(self, f.name) for f in fields(BenchConfig)}
        return BenchConfig(**{**own, "warmup": 0, "repeats": POOL_BATCHES})


@dataclass
class Phase:
    """One phase's counts; rows are query rows answered inside the measured window."""

    name: str
    clients: int
    batch: int
    seconds: float
    calls: int = 0
    rows: int = 0
    wrong_rows: int = 0  # answered rows whose ids differ from the in-process search's
    # by more than near-tied scores swapping (merged batches may round in another order)
    errors: dict[str, int] | None = None
    server: dict[str, float] | None = None

    @property
    def queries_per_s(self) -> float:
        return self.rows / self.seconds

    def add(self, other: Phase) -> None:
        """Another round of the same phase."""
        self.seconds += other.seconds
        self.calls += other.calls
        self.rows += other.rows
        self.wrong_rows += other.wrong_rows
        for code, n in (other.errors or {}).items():
            self.errors[code] = self.errors.get(code, 0) + n


def scrape_merging(server: BenchServer) -> dict[str, float]:
    """Sums and counts of the server's merged-rows and index-search histograms."""
    text = server.metrics_text()
    out = {}
    for name in ("bankd_merged_batch_rows", "bankd_index_search_latency_seconds"):
        for part in ("sum", "count"):
            m = re.search(rf"^{name}_{part} (\S+)$", text, re.M)
            out[f"{name}_{part}"] = float(m.group(1)) if m else float("nan")
    return out


def merging(d: dict[str, float], wall_s: float) -> dict[str, float]:
    """Index searches, mean rows per search, mean search time and the fraction of the
    wall_s seconds the phase ran spent searching, from its summed histogram deltas."""
    searches = d["bankd_merged_batch_rows_count"]
    return {
        "index_searches": searches,
        "rows_per_search": d["bankd_merged_batch_rows_sum"] / max(searches, 1),
        "search_ms": 1e3 * d["bankd_index_search_latency_seconds_sum"] / max(searches, 1),
        "busy": d["bankd_index_search_latency_seconds_sum"] / wall_s,
    }


def wrong_rows(want: dict[str, np.ndarray], ids: np.ndarray, scores: np.ndarray) -> int:
    """Rows whose ids differ from want's, other than by tied scores in another order."""
    differ = np.flatnonzero((want["ids"] != ids).any(axis=1))
    return sum(not tie_explained(want["scores"][r], scores[r]) for r in differ)


def run_clients(
    cfg: ThroughputConfig,
    address: str,
    pool: np.ndarray,
    truth: dict[str, np.ndarray],
    clients: int,
    b: int,
) -> Phase:
    """`clients` threads with a BankClient each, Search of b rows back to back."""
    from bankd_client import BankClient, errors

    phase = Phase(f"{clients} x B={b}", clients, b, cfg.seconds, errors={})
    lock = threading.Lock()
    t_begin = [0.0]  # set by the barrier before any thread is released

    def begin() -> None:
        t_begin[0] = time.perf_counter()

    start = threading.Barrier(clients + 1, action=begin)

    def client(c: int) -> None:
        with BankClient(address, timeout=600) as bank:
            bank.wait_ready(timeout=SERVER_START_S)
            start.wait()
            window = (t_begin[0] + cfg.warmup_s, t_begin[0] + cfg.warmup_s + cfg.seconds)
            at = (c * b * 7) % (len(pool) - b + 1)  # clients start at different rows
            while time.perf_counter() < window[1]:
                rows = slice(at, at + b)
                at = (at + b) % (len(pool) - b + 1)
                try:
                    hits = bank.search(pool[rows], k=cfg.k, with_values=True)
                except errors.BankError as e:
                    with lock:
                        phase.errors[e.code.name] = phase.errors.get(e.code.name, 0) + 1
                    continue
                done = time.perf_counter()
                want = {name: a[rows] for name, a in truth.items()}
                wrong = wrong_rows(want, np.asarray(hits.ids), np.asarray(hits.scores))
                if window[0] <= done <= window[1]:
                    with lock:
                        phase.calls += 1
                        phase.rows += b
                        phase.wrong_rows += wrong

    threads = [threading.Thread(target=client, args=(c,), daemon=True) for c in range(clients)]
    for t in threads:
        t.start()
    start.wait()
    for t in threads:
        t.join()
    return phase


def in_process(cfg: ThroughputConfig, ref: Reference, pool: np.ndarray) -> Phase:
    """The pool searched here in cfg.batch batches, values gathered, for the window."""
    phase = Phase(f"in-process faiss, B={cfg.batch}", 1, cfg.batch, cfg.seconds)
    t0 = time.perf_counter()
    window = (t0 + cfg.warmup_s, t0 + cfg.warmup_s + cfg.seconds)
    at = 0
    while time.perf_counter() < window[1]:
        ref.search(pool[at : at + cfg.batch], cfg.k)
        at = (at + cfg.batch) % len(pool)
        if window[0] <= time.perf_counter() <= window[1]:
            phase.calls += 1
            phase.rows += cfg.batch
    return phase


def measure(cfg: ThroughputConfig, index_path: Path, workdir: Path) -> dict[str, Any]:
    pool = np.concatenate(make_queries(cfg.bank(), index_path))  # (POOL_BATCHES * B, d)
    ref = Reference(index_path)
    progress(f"exact answers of the {len(pool)} pool queries, in process")
    batches = range(0, len(pool), cfg.batch)
    found = [ref.search(pool[s : s + cfg.batch], cfg.k)[0] for s in batches]
    truth = {name: np.concatenate([f[name] for f in found]) for name in ("ids", "scores")}
    progress("starting the bankd server process")
    server = BenchServer(
        server_config(index_path, cfg), workdir / "server.log", threads=cfg.threads
    )
    plan = [(1, cfg.batch)] + [(c, cfg.client_batch) for c in cfg.clients]
    phases: list[Phase] = []
    deltas: list[dict[str, float]] = []
    try:
        settings = server.search_settings()
        for r in range(cfg.rounds):
            for i, (clients, b) in enumerate(plan):
                progress(
                    f"round {r + 1}/{cfg.rounds}, {clients} x B={b}: "
                    f"{cfg.warmup_s:g} s + {cfg.seconds:g} s"
                )
                before = scrape_merging(server)
                phase = run_clients(cfg, server.address, pool, truth, clients, b)
                after = scrape_merging(server)
                progress(f"  {phase.queries_per_s:.0f} queries/s")
                if r == 0:
                    phases.append(phase)
                    deltas.append(dict.fromkeys(after, 0.0))
                else:
                    phases[i].add(phase)
                for name in after:
                    deltas[i][name] += after[name] - before[name]
    finally:
        progress("stopping the server")
        server.stop()
    for phase, d in zip(phases, deltas, strict=True):
        phase.server = merging(d, cfg.rounds * (cfg.warmup_s + cfg.seconds))
    progress(f"in-process faiss, B={cfg.batch}")
    phases.append(in_process(cfg, ref, pool))
    top = phases[len(cfg.clients)]  # the largest C: clients are sorted
    return {
        "phases": [{**asdict(p), "queries_per_s": p.queries_per_s} for p in phases],
        "ratio": top.queries_per_s / phases[0].queries_per_s if phases[0].rows else float("nan"),
        "ratio_name": f"{top.clients} x B={top.batch} / 1 x B={cfg.batch}",
        "server_settings": f"{settings}, {merge_wait(cfg)}",
    }


def report(cfg: ThroughputConfig, r: dict[str, Any]) -> str:
    lines = [
        f"throughput: N={cfg.n} d={cfg.d} k={cfg.k} index={cfg.index}, values returned "
        f"(clusters={cfg.clusters}, seed={cfg.seed}; {cfg.warmup_s:g} s warm-up + "
        f"{cfg.seconds:g} s per phase, server phases {cfg.rounds} times in turn)",
        f"bankd server (own process): {r['server_settings']}",
        f"  {'phase':<30s} {'queries/s':>10s} {'calls':>7s} {'wrong':>6s} "
        f"{'searches':>9s} {'rows/search':>11s} {'search ms':>9s} {'busy':>5s}",
    ]
    for p in r["phases"]:
        s = p["server"]
        merged = (
            f"{s['index_searches']:9.0f} {s['rows_per_search']:11.1f} {s['search_ms']:9.1f} "
            f"{s['busy']:5.2f}"
            if s
            else ""
        )
        lines.append(
            f"  {p['name']:<30s} {p['queries_per_s']:10.0f} {p['calls']:7d} "
            f"{p['wrong_rows']:6d} {merged}"
        )
        if p["errors"]:
            lines.append(f"    errors: {p['errors']}")
    lines += [
        "  (wrong: answered rows whose ids differ from the in-process search; searches,",
        "   rows/search, search ms: the server's index searches over the whole phase,",
        "   warm-up included; busy: the fraction of the phase spent in index search)",
        f"ratio({r['ratio_name']}) = {r['ratio']:.2f}",
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> ThroughputConfig:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    d = ThroughputConfig()
    add_workload_args(p, d)
    p.add_argument("--index", default=d.index, help="FAISS factory string, or auto")
    p.add_argument(
        "--clients", default=",".join(map(str, d.clients)), help="comma list of client counts"
    )
    p.add_argument("--client-batch", type=int, default=d.client_batch, help="queries per call")
    p.add_argument("--seconds", type=float, default=d.seconds, help="measured seconds per phase")
    p.add_argument("--warmup-s", type=float, default=d.warmup_s, help="warm-up seconds per phase")
    p.add_argument("--rounds", type=int, default=d.rounds, help="times each server phase runs")
    p.add_argument("--merge-wait-us", type=float, default=None, help="the server's merge wait")
    p.add_argument("--threads", type=int, default=d.threads, help="FAISS OpenMP threads (0: all)")
    p.add_argument("--workdir", default=None, help="keep the bank here (reused if it matches)")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    a = p.parse_args(argv)
    a.clients = tuple(sorted({int(c) for c in a.clients.split(",") if c}))
    positive = (a.n, a.d, a.batch, a.k, a.clusters, a.client_batch, a.seconds, a.rounds)
    positive += a.clients
    if not a.clients or min(positive) <= 0 or a.warmup_s < 0 or a.threads < 0 or a.k > a.n:
        p.error("n, d, batch, k, clusters, clients, client-batch, seconds, rounds must be positive")
    values = {f.name: getattr(a, f.name, getattr(d, f.name)) for f in fields(ThroughputConfig)}
    return replace(d, **values)


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    progress(f"config: {asdict(cfg)}")
    with workdir_for(cfg.workdir, "bankd-throughput-") as workdir:
        index_path = bank_for(cfg.bank(), workdir)
        results = measure(cfg, index_path, workdir)
    publish(report(cfg, results), cfg, results)
    return 0


if __name__ == "__main__":
    run_program(main)  # child processes stop on the way out, even when interrupted
