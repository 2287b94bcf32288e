"""Load: many concurrent clients against one bankd, under and over its concurrency limit.

    source .venv/bin/activate                                    # after `make install`
    python bench/load.py                                         # 32 clients, 60 s, limit 64
    python bench/load.py --clients 32 --seconds 60 --scenario both    # limit 64, then 16
    python bench/load.py --clients 8 --seconds 10 --max-concurrent 4
    python bench/load.py --scenario both --json load.json --check     # exit 1 if a verdict fails
    python bench/load.py --target HOST:PORT --server-pid PID     # a server already running

By default it writes the reference workload's synthetic bank (``bench/workload``: unit
keys around ``--clusters`` random centres, random fp16 values [N, 32, 96]) and, for each
phase, starts `bankd serve` on it in a child process on a free loopback port with
``--max-concurrent-rpcs`` set to the phase's limit. ``--clients`` threads, each with its
own BankClient (its own channel, no retries; ``bench/load_clients.py``), then send
batches of ``--batch`` queries (k=5, values returned) for ``--warmup`` + ``--seconds``
seconds: a ``--stream-fraction`` of the clients over SearchStream (``--stream-batches``
batches per call), the others over unary Search. After an error a client waits
``--backoff-ms`` before its next call. Every call has a deadline; ``--grace`` seconds
after the end the calls still running are cancelled and every client is joined.

Printed per phase (and written with --json): requests and throughput, p50/p99/max
latency per kind, errors by gRPC status code, the latency of RESOURCE_EXHAUSTED
refusals next to that of answers, the longest pause between two answers, the server's
resident memory (VmRSS and its anonymous part from /proc/PID/status every
``--sample-s``) at start, after warm-up and at the end with the slope over the
measured part in MB/min, whether a fresh client is answered after the load, the
server's exit status after SIGTERM, and a verdict:

* clients <= limit: no error at all;
* clients >  limit: some RESOURCE_EXHAUSTED, no other error code, answers all along.

``--scenario both`` runs the phase under the limit (``--limit-under``, default 2 x
clients) and then the one over it (``--limit-over``, default clients / 2), each on a
fresh server. Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import os
from collections import Counter
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
from load_clients import Record, drive, fresh_client_answered
from workload.bank import BenchConfig, queries_near, unit
from workload.bank import bank_for as workload_bank
from workload.memory import MemorySampler
from workload.run import describe_machine, progress, publish, run_program, workdir_for
from workload.server import BenchServer

from bankd.serve.flags import ServerConfig
from bankd.store.paths import BankPaths
from bankd_client import BankClient

POOL_BATCHES = 64  # distinct query batches the clients cycle through
START_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class LoadConfig:
    """One load run; filled from the command line, saved with the figures."""

    clients: int = 32
    seconds: float = 60.0
    warmup: float = 5.0
    grace: float = 10.0  # after the end: calls still running are cancelled
    scenario: str = "run"  # run | under | over | both
    max_concurrent: int | None = None  # run: the server's limit (None: serve's default, 64)
    limit_under: int | None = None  # None: 2 x clients
    limit_over: int | None = None  # None: clients // 2
    batch: int = 16
    k: int = 5
    values: bool = True
    stream_fraction: float = 0.25
    stream_batches: int = 8  # batches per SearchStream call
    timeout: float = 10.0  # deadline of each call
    backoff_ms: float = 20.0  # pause after an error before the next call
    max_requests: int = 0  # per client (0: no limit but time)
    sample_s: float = 1.0
    n: int = 20_000
    d: int = 256
    clusters: int = 200
    seed: int = 0
    device: str = "auto"
    target: str | None = None
    server_pid: int | None = None
    workdir: str | None = None
    json: str | None = None
    check: bool = False

    def phases(self) -> list[tuple[str, int | None]]:
        """(name, the server's concurrency limit) of each phase, in order."""
        under = ("under", self.limit_under or 2 * self.clients)
        over = ("over", self.limit_over or max(1, self.clients // 2))
        run_limit = self.max_concurrent if self.target else self.max_concurrent or 64
        return {
            "run": [("run", run_limit)],
            "under": [under],
            "over": [over],
            "both": [under, over],
        }[self.scenario]


# -- the bank and the queries ------------------------------------------------------------


def bank_for(cfg: LoadConfig, workdir: Path) -> Path:
    """workdir/bank.faiss: the reference workload's bank at this size (reused if kept)."""
    spec = BenchConfig(n=cfg.n, d=cfg.d, clusters=cfg.clusters, seed=cfg.seed, index="Flat")
    return workload_bank(spec, workdir)


def make_queries(cfg: LoadConfig, d: int, index_path: Path | None) -> list[np.ndarray]:
    """POOL_BATCHES batches [B, d] of unit queries near bank keys (random ones if remote)."""
    total = POOL_BATCHES * cfg.batch
    if index_path is None:
        rng = np.random.default_rng(cfg.seed + 1)
        queries = unit(rng.standard_normal((total, d), dtype=np.float32))
    else:
        keys = np.load(BankPaths(index_path).file("keys.npy"), mmap_mode="r")
        queries, _ = queries_near(keys, total, cfg.seed)
    return [np.ascontiguousarray(b, dtype=np.float32) for b in np.split(queries, POOL_BATCHES)]


def start_server(index: Path, limit: int, cfg: LoadConfig, log_path: Path) -> BenchServer:
    """`bankd serve` on a free loopback port in a child process, with a given limit."""
    config = ServerConfig(
        index=str(index),
        port=0,
        metrics_port=None,
        device=cfg.device,
        verify=False,
        no_embed=True,
        grace_s=2.0,
        max_concurrent_rpcs=limit,
    )
    return BenchServer(config, log_path, start_timeout=START_TIMEOUT_S)


# -- figures -------------------------------------------------------------------------------


def latency_ms(seconds: list[float]) -> dict[str, Any]:
    if not seconds:
        return {"n": 0, "p50_ms": None, "p99_ms": None, "max_ms": None}
    ms = np.asarray(seconds) * 1e3
    return {
        "n": len(ms),
        "p50_ms": round(float(np.percentile(ms, 50)), 2),
        "p99_ms": round(float(np.percentile(ms, 99)), 2),
        "max_ms": round(float(ms.max()), 2),
    }


def summarize(records: list[Record], t: dict[str, float], cfg: LoadConfig) -> dict[str, Any]:
    """Figures over the calls started in the measured window [warm, end)."""
    window = [r for r in records if t["warm"] <= r[1] < t["end"]]
    calls = [r for r in window if r[0] != "stream_call"]
    answers = [r for r in calls if r[3] == "OK"]
    errors_by_kind = {
        kind: dict(Counter(r[3] for r in calls if r[0] == kind and r[3] != "OK"))
        for kind in ("search", "stream")
    }
    done = sorted(min(r[1] + r[2], t["end"]) for r in answers)
    pauses = np.diff([t["warm"], *done, t["end"]])
    warmup = [r for r in records if r[1] < t["warm"] and r[0] != "stream_call"]
    return {
        "requests": len(calls),
        "answered": len(answers),
        "answers_per_s": round(len(answers) / cfg.seconds, 1),
        "queries_per_s": round(len(answers) * cfg.batch / cfg.seconds, 1),
        "requests_per_s": round(len(calls) / cfg.seconds, 1),
        "latency": {
            "search": latency_ms([r[2] for r in answers if r[0] == "search"]),
            "stream_message": latency_ms([r[2] for r in answers if r[0] == "stream"]),
            "stream_call": latency_ms([r[2] for r in window if r[0] == "stream_call"]),
            "refusal": latency_ms([r[2] for r in calls if r[3] == "RESOURCE_EXHAUSTED"]),
        },
        "errors": dict(Counter(r[3] for r in calls if r[3] != "OK")),
        "errors_by_kind": errors_by_kind,
        "longest_pause_between_answers_ms": round(float(pauses.max()) * 1e3, 1),
        "warmup_requests": len(warmup),
        "warmup_errors": dict(Counter(r[3] for r in warmup if r[3] != "OK")),
    }


def verdict(p: dict[str, Any]) -> tuple[bool, str]:
    """The acceptance: no errors at or under the limit; quick refusals only, over it."""
    limit, errs = p["limit"], p["errors"]
    trouble = []
    if p["clients_not_joined"]:
        trouble.append(f"{p['clients_not_joined']} clients did not join")
    if not p["answered_after"]:
        trouble.append("no answer to a fresh client after the load")
    if p["server_exit_code"] not in (0, "not started here"):
        trouble.append(f"server exit status {p['server_exit_code']} after SIGTERM")
    if not p["answered"]:
        trouble.append("no answers")
    if limit is None:
        expect = "limit unknown"
    elif p["clients"] <= limit:
        expect = "clients <= limit: no errors"
        if errs:
            trouble.append(f"errors {errs}")
    else:
        expect = "clients > limit: RESOURCE_EXHAUSTED only"
        if not errs.get("RESOURCE_EXHAUSTED"):
            trouble.append("no RESOURCE_EXHAUSTED")
        other = {c: n for c, n in errs.items() if c != "RESOURCE_EXHAUSTED"}
        if other:
            trouble.append(f"other errors {other}")
    if trouble:
        return False, f"FAIL ({expect}): " + "; ".join(trouble)
    return True, f"PASS ({expect})"


def run_phase(
    cfg: LoadConfig, name: str, limit: int | None, index_path: Path | None, workdir: Path
) -> dict[str, Any]:
    """One server (started here unless --target), the clients against it, the figures."""
    server = None
    if cfg.target is None:
        assert index_path is not None and limit is not None
        progress(f"phase {name}: starting bankd serve --max-concurrent-rpcs {limit}")
        server = start_server(index_path, limit, cfg, workdir / f"server-{name}.log")
    target = server.address if server else cfg.target
    pid = server.pid if server else cfg.server_pid
    exit_code: int | str | None = "not started here"
    try:
        with BankClient(target, timeout=cfg.timeout) as probe:
            probe.wait_ready(timeout=START_TIMEOUT_S)
            key_dim = probe.info().key_dim
        batches = make_queries(cfg, key_dim, index_path)
        sampler = MemorySampler(pid, cfg.sample_s) if pid else None
        if sampler is not None:
            sampler.mark("start")
            sampler.start()
        progress(
            f"phase {name}: {cfg.clients} clients on {target} for {cfg.warmup:g} s warm-up + "
            f"{cfg.seconds:g} s"
        )
        records, t, not_joined, per_client = drive(cfg, target, batches, sampler)
        if sampler is not None:
            sampler.stop()
        answered_after = fresh_client_answered(target, cfg, batches[0])
    finally:
        if server is not None:
            exit_code = server.stop()
    n_stream = round(cfg.clients * cfg.stream_fraction)
    phase = {
        "name": name,
        "target": target,
        "limit": limit,
        "clients": cfg.clients,
        "stream_clients": n_stream,
        **summarize(records, t, cfg),
        "clients_answered": sum(n > 0 for n in per_client),
        "fewest_answers_per_client": min(per_client),
        "clients_not_joined": not_joined,
        "answered_after": answered_after,
        "server_exit_code": exit_code,
        "memory": None if sampler is None else sampler.summary(t["warm"], t["end"]),
    }
    phase["ok"], phase["verdict"] = verdict(phase)
    return phase


def _ms(lat: dict[str, Any]) -> str:
    if not lat["n"]:
        return f"{0:>7d} {'-':>9s} {'-':>9s} {'-':>9s}"
    return f"{lat['n']:>7d} {lat['p50_ms']:9.1f} {lat['p99_ms']:9.1f} {lat['max_ms']:9.1f}"


def report(cfg: LoadConfig, machine: str, phases: list[dict[str, Any]]) -> str:
    lines = [
        f"load: B={cfg.batch} k={cfg.k} values={'on' if cfg.values else 'off'}, "
        f"{cfg.warmup:g} s warm-up + {cfg.seconds:g} s measured, stream fraction "
        f"{cfg.stream_fraction:g} ({cfg.stream_batches} batches per stream call), backoff "
        f"{cfg.backoff_ms:g} ms after an error, deadline {cfg.timeout:g} s",
        f"machine: {machine}",
    ]
    for p in phases:
        lat, mem = p["latency"], p["memory"]
        errs = ", ".join(f"{c} {n}" for c, n in sorted(p["errors"].items())) or "none"
        by_kind = "; ".join(f"{k}: {v}" for k, v in p["errors_by_kind"].items() if v)
        lines += [
            "",
            f"phase {p['name']}: {p['clients']} clients ({p['stream_clients']} streaming) against "
            f"a concurrency limit of {p['limit'] if p['limit'] is not None else 'unknown'}",
            f"  requests {p['requests']} ({p['requests_per_s']:.1f}/s), answered {p['answered']}: "
            f"{p['answers_per_s']:.1f} answers/s, {p['queries_per_s']:.0f} queries/s",
            f"  {'latency, ms':<36s} {'n':>7s} {'p50':>9s} {'p99':>9s} {'max':>9s}",
            f"  {'Search (unary)':<36s} {_ms(lat['search'])}",
            f"  {'SearchStream message':<36s} {_ms(lat['stream_message'])}",
            f"  {'SearchStream call':<36s} {_ms(lat['stream_call'])}",
            f"  {'refusals (RESOURCE_EXHAUSTED)':<36s} {_ms(lat['refusal'])}",
            f"  errors by code: {errs}" + (f" ({by_kind})" if by_kind else ""),
            f"  clients answered {p['clients_answered']}/{p['clients']} (fewest answers "
            f"{p['fewest_answers_per_client']}); longest pause between answers "
            f"{p['longest_pause_between_answers_ms']:.0f} ms",
        ]
        if mem:
            lines.append(
                f"  server memory MB (VmRSS / anon): start {mem['rss_start_mb']} / "
                f"{mem['anon_start_mb']}, after warm-up {mem['rss_warm_mb']} / "
                f"{mem['anon_warm_mb']}, end {mem['rss_end_mb']} / {mem['anon_end_mb']}, "
                f"peak {mem['rss_peak_mb']}; slope {mem['rss_slope_mb_per_min']} / "
                f"{mem['anon_slope_mb_per_min']} MB/min over {mem['samples']} samples "
                f"(second half: {mem['rss_slope_second_half_mb_per_min']} / "
                f"{mem['anon_slope_second_half_mb_per_min']})"
            )
        else:
            lines.append("  server memory: not sampled (give --server-pid with --target)")
        lines += [
            f"  a fresh client answered after the load: {'yes' if p['answered_after'] else 'NO'}"
            f"; clients not joined: {p['clients_not_joined']}; server exit status after "
            f"SIGTERM: {p['server_exit_code']}",
            f"  verdict: {p['verdict']}",
        ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> LoadConfig:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    d = LoadConfig()
    p.add_argument("--clients", type=int, default=d.clients, help="concurrent clients")
    p.add_argument("--seconds", type=float, default=d.seconds, help="measured seconds")
    p.add_argument("--warmup", type=float, default=d.warmup, help="seconds before measuring")
    p.add_argument("--grace", type=float, default=d.grace, help="then cancel and join")
    p.add_argument(
        "--scenario",
        choices=("run", "under", "over", "both"),
        default=d.scenario,
        help="run: one phase at --max-concurrent; under/over/both: at --limit-under/-over",
    )
    p.add_argument(
        "--max-concurrent",
        type=int,
        default=None,
        help="the server's --max-concurrent-rpcs in a run phase (default 64; with --target: "
        "the target's limit, if known, for the verdict)",
    )
    p.add_argument("--limit-under", type=int, default=None, help="default 2 x clients")
    p.add_argument("--limit-over", type=int, default=None, help="default clients / 2")
    p.add_argument("--batch", type=int, default=d.batch, help="queries per request (B)")
    p.add_argument("--k", type=int, default=d.k, help="hits per query")
    p.add_argument("--no-values", dest="values", action="store_false", help="ids and scores only")
    p.add_argument("--stream-fraction", type=float, default=d.stream_fraction)
    p.add_argument("--stream-batches", type=int, default=d.stream_batches)
    p.add_argument("--timeout", type=float, default=d.timeout, help="deadline of each call, s")
    p.add_argument("--backoff-ms", type=float, default=d.backoff_ms)
    p.add_argument("--max-requests", type=int, default=d.max_requests, help="per client; 0: none")
    p.add_argument("--sample-s", type=float, default=d.sample_s, help="memory sampling period")
    p.add_argument("--n", type=int, default=d.n, help="bank entries")
    p.add_argument("--d", type=int, default=d.d, help="key dimension")
    p.add_argument("--clusters", type=int, default=d.clusters)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--device", default=d.device, help="the server's search device")
    p.add_argument("--target", default=None, help="a running bankd (host:port) instead")
    p.add_argument("--server-pid", type=int, default=None, help="its pid, for memory figures")
    p.add_argument("--workdir", default=None, help="keep the bank here (reused if it matches)")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    p.add_argument("--check", action="store_true", help="exit 1 if a phase's verdict fails")
    a = p.parse_args(argv)
    if min(a.clients, a.batch, a.k, a.stream_batches, a.n, a.d, a.clusters) < 1:
        p.error("clients, batch, k, stream-batches, n, d, clusters must be positive")
    if a.seconds <= 0 or a.warmup < 0 or a.grace < 0 or a.timeout <= 0 or a.sample_s <= 0:
        p.error("seconds, timeout and sample-s must be positive; warmup and grace >= 0")
    if not 0 <= a.stream_fraction <= 1 or a.k > a.n:
        p.error("stream-fraction must be in [0, 1]; k <= n")
    if a.target and a.scenario != "run":
        p.error("--target serves with its own limit: only --scenario run")
    return LoadConfig(**{f.name: getattr(a, f.name) for f in fields(LoadConfig)})


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    progress(f"config: {asdict(cfg)}")
    machine = describe_machine()
    with workdir_for(cfg.workdir, "bankd-load-") as workdir:
        index_path = None if cfg.target else bank_for(cfg, workdir)
        phases = [run_phase(cfg, n, lim, index_path, workdir) for n, lim in cfg.phases()]
    publish(report(cfg, machine, phases), cfg, {"machine": machine, "phases": phases})
    return 1 if cfg.check and not all(p["ok"] for p in phases) else 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    run_program(main)  # the server child stops on the way out, even when interrupted
