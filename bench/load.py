"""Load: many concurrent clients against one bankd, under and over its concurrency limit.

    source .venv/bin/activate                                    # after `make install`
    python bench/load.py                                         # 32 clients, 60 s, limit 64
    python bench/load.py --clients 32 --seconds 60 --scenario both    # limit 64, then 16
    python bench/load.py --clients 8 --seconds 10 --max-concurrent 4
    python bench/load.py --scenario both --json load.json --check     # exit 1 if a verdict fails
    python bench/load.py --target HOST:PORT --server-pid PID     # a server already running

By default it writes a synthetic bank from arrays (``bankd.store.write_bank``: unit keys
around ``--clusters`` random centres, random fp16 values [N, 32, 96]) and, for each
phase, starts `bankd serve` on it in a child process on a free loopback port with
``--max-concurrent-rpcs`` set to the phase's limit. ``--clients`` threads, each with its
own BankClient (its own channel, no retries), then send batches of ``--batch`` queries
(k=5, values returned) for ``--warmup`` + ``--seconds`` seconds: a ``--stream-fraction``
of the clients over SearchStream (``--stream-batches`` batches per call), the others
over unary Search. After an error a client waits ``--backoff-ms`` before its next call.
Every call has a deadline; ``--grace`` seconds after the end the calls still running are
cancelled and every client is joined.

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
import contextlib
import json
import os
import platform
import re
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from bankd.serve.process import ServeProcess
from bankd_client import BankClient, BankError

ID_OFFSET = 1_000_000  # entry ids differ from row numbers
VALUE_SHAPE = (32, 96)
KEY_NOISE = 0.7  # norm of the noise around a key's cluster centre
QUERY_NOISE = 0.3  # norm of the noise added to a bank key to make a query
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

    def bank_spec(self) -> dict[str, Any]:
        spec = {"n": self.n, "d": self.d, "clusters": self.clusters, "seed": self.seed}
        return {**spec, "generator": "bench/load.py v1"}


def progress(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _noise(rng: np.random.Generator, shape: tuple[int, ...], norm: float) -> np.ndarray:
    return rng.standard_normal(shape, dtype=np.float32) * np.float32(norm / np.sqrt(shape[-1]))


# -- the bank and the queries ------------------------------------------------------------


def bank_for(cfg: LoadConfig, workdir: Path) -> Path:
    """workdir/bank.faiss: clustered unit keys, random finite fp16 values (reused if kept)."""
    from bankd.store.paths import BankPaths
    from bankd.store.writer import write_bank

    index_path = workdir / "bank.faiss"
    manifest = BankPaths(index_path).manifest
    if manifest.exists() and json.loads(manifest.read_text()).get("config") == cfg.bank_spec():
        progress(f"reusing the bank at {index_path}")
        return index_path
    progress(f"writing a {cfg.n} x {cfg.d} bank to {index_path}")
    rng = np.random.default_rng(cfg.seed)
    centres = _unit(rng.standard_normal((cfg.clusters, cfg.d), dtype=np.float32))
    keys = centres[rng.integers(cfg.clusters, size=cfg.n)]
    keys = _unit(keys + _noise(rng, keys.shape, KEY_NOISE))  # (N, d)
    # Random bits with the top exponent bit cleared: finite fp16 in (-2, 2).
    bits = np.frombuffer(rng.bytes(cfg.n * int(np.prod(VALUE_SHAPE)) * 2), dtype=np.uint16)
    values = (bits & np.uint16(0xBFFF)).view(np.float16).reshape(cfg.n, *VALUE_SHAPE)
    ids = ID_OFFSET + np.arange(cfg.n, dtype=np.int64)
    return write_bank(index_path, keys, values, ids, config=cfg.bank_spec(), seed=cfg.seed)


def make_queries(cfg: LoadConfig, d: int, index_path: Path | None) -> list[np.ndarray]:
    """POOL_BATCHES batches [B, d] of unit queries near bank keys (random ones if remote)."""
    rng = np.random.default_rng(cfg.seed + 1)
    total = POOL_BATCHES * cfg.batch
    if index_path is None:
        queries = _unit(rng.standard_normal((total, d), dtype=np.float32))
    else:
        from bankd.store.paths import BankPaths

        keys = np.load(BankPaths(index_path).file("keys.npy"), mmap_mode="r")
        rows = np.sort(rng.integers(len(keys), size=total))
        queries = _unit(np.asarray(keys[rows]) + _noise(rng, (total, d), QUERY_NOISE))
        queries = queries[rng.permutation(total)]
    return [np.ascontiguousarray(b, dtype=np.float32) for b in np.split(queries, POOL_BATCHES)]


# -- the server and its memory -----------------------------------------------------------


def start_server(index: Path, limit: int, cfg: LoadConfig, log_path: Path) -> ServeProcess:
    """`bankd serve` on a free loopback port in a child process, with a given limit."""
    args = ["--device", cfg.device, "--no-verify", "--max-concurrent-rpcs", str(limit)]
    server = ServeProcess(
        index,
        log_path,
        serve_args=args,
        log_level="WARNING",
        start_timeout=START_TIMEOUT_S,
        wait_ready=False,
    )
    return server.start()


def read_memory_mb(pid: int) -> dict[str, float] | None:
    """VmRSS and RssAnon of a process in MB (/proc, else psutil's rss), None if unknown."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        try:
            import psutil
        except ImportError:
            return None
        try:
            return {"rss": psutil.Process(pid).memory_info().rss / 2**20, "anon": float("nan")}
        except psutil.Error:
            return None
    kb = dict(re.findall(r"^(VmRSS|RssAnon):\s+(\d+) kB", text, re.M))
    if "VmRSS" not in kb:
        return None
    return {"rss": int(kb["VmRSS"]) / 1024, "anon": int(kb.get("RssAnon", "nan")) / 1024}


class MemorySampler:
    """The server's memory every ``every_s`` seconds in a thread: (time, rss, anon)."""

    def __init__(self, pid: int, every_s: float) -> None:
        self.pid, self.every_s = pid, every_s
        self.samples: list[tuple[float, float, float]] = []
        self.marks: dict[str, dict[str, float] | None] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def sample(self) -> dict[str, float] | None:
        mem = read_memory_mb(self.pid)
        if mem is not None:
            self.samples.append((time.monotonic(), mem["rss"], mem["anon"]))
        return mem

    def mark(self, name: str) -> None:
        self.marks[name] = self.sample()

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self.sample()

    def start(self) -> MemorySampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self, t0: float, t1: float) -> dict[str, Any]:
        """Start / after warm-up / end / peak; least-squares slopes over [t0, t1] and over
        its second half (a leak keeps its slope; allocator warm-up flattens out)."""
        out: dict[str, Any] = {
            f"{part}_{name}_mb": None if m is None else round(m[part], 1)
            for name, m in self.marks.items()
            for part in ("rss", "anon")
        }
        out["rss_peak_mb"] = round(max((s[1] for s in self.samples), default=float("nan")), 1)
        window = np.array([s for s in self.samples if t0 <= s[0] <= t1 + 1e-3]).reshape(-1, 3)
        out["samples"] = len(window)
        half = window[window[:, 0] >= (t0 + t1) / 2]
        for part, i in (("rss", 1), ("anon", 2)):
            out[f"{part}_slope_mb_per_min"] = _slope(window, i, t0)
            out[f"{part}_slope_second_half_mb_per_min"] = _slope(half, i, t0)
        out["series"] = [[round(t - t0, 1), round(r, 1), round(a, 1)] for t, r, a in window]
        return out


def _slope(samples: np.ndarray, column: int, t0: float) -> float | None:
    """MB per minute of a least-squares line through (time, samples[:, column])."""
    if len(samples) < 2 or not np.isfinite(samples[:, column]).all():
        return None
    return round(float(np.polyfit((samples[:, 0] - t0) / 60, samples[:, column], 1)[0]), 2)


# -- the clients ---------------------------------------------------------------------------

# One record per unary call, per answered stream message, per failed stream call (kind
# "stream"), and per stream call as a whole ("stream_call", latency only):
# (kind, start, seconds, status code name).
Record = tuple[str, float, float, str]


def _code(e: BaseException) -> str:
    return e.code.name if isinstance(e, BankError) else f"CLIENT_{type(e).__name__}"


def stream_call(
    client: BankClient, qs: list[np.ndarray], cfg: LoadConfig, timeout: float, out: list[Record]
) -> str:
    """One SearchStream call of len(qs) batches; a message's latency runs from its send."""
    sent: list[float] = []

    def timed() -> Any:
        for q in qs:
            sent.append(time.monotonic())
            yield q

    t0, got, code = time.monotonic(), 0, "OK"
    try:
        for _ in client.stream_search(timed(), k=cfg.k, with_values=cfg.values, timeout=timeout):
            out.append(("stream", sent[got], time.monotonic() - sent[got], "OK"))
            got += 1
    except Exception as e:
        code = _code(e)
    seconds = time.monotonic() - t0
    if code != "OK":
        out.append(("stream", t0, seconds, code))
    out.append(("stream_call", t0, seconds, code))
    return code


def client_loop(
    i: int,
    client: BankClient,
    streaming: bool,
    batches: list[np.ndarray],
    cfg: LoadConfig,
    t_end: float,
    t_hard: float,
    stop: threading.Event,
    out: list[Record],
) -> None:
    """Calls back to back until t_end (or max_requests); each deadline ends by t_hard."""
    j, sent = i * 7, 0
    while not stop.is_set() and (now := time.monotonic()) < t_end:
        if cfg.max_requests and sent >= cfg.max_requests:
            return
        timeout = max(0.01, min(cfg.timeout, t_hard - now))
        if streaming:
            qs = [batches[(j + s) % len(batches)] for s in range(cfg.stream_batches)]
            code = stream_call(client, qs, cfg, timeout, out)
            j, sent = j + len(qs), sent + len(qs)
        else:
            code = "OK"
            try:
                q = batches[j % len(batches)]
                client.search(q, cfg.k, with_values=cfg.values, timeout=timeout)
            except Exception as e:
                code = _code(e)
            out.append(("search", now, time.monotonic() - now, code))
            j, sent = j + 1, sent + 1
        if code != "OK":
            stop.wait(cfg.backoff_ms / 1e3)


def drive(
    cfg: LoadConfig, target: str, batches: list[np.ndarray], sampler: MemorySampler | None
) -> tuple[list[Record], dict[str, float], int, list[int]]:
    """Run the clients: (records, phase times, clients not joined, answers per client)."""
    n_stream = round(cfg.clients * cfg.stream_fraction)
    # Own channels, no retries: every refusal is seen and counted.
    clients = [
        BankClient(target, timeout=cfg.timeout, retry_attempts=1) for _ in range(cfg.clients)
    ]
    outs: list[list[Record]] = [[] for _ in clients]
    stop = threading.Event()
    t_begin = time.monotonic()
    t = {"begin": t_begin, "warm": t_begin + cfg.warmup}
    t["end"] = t["warm"] + cfg.seconds
    t["hard"] = t["end"] + cfg.grace
    threads = [
        threading.Thread(
            target=client_loop,
            args=(i, c, i < n_stream, batches, cfg, t["end"], t["hard"], stop, outs[i]),
            name=f"load-client-{i}",
            daemon=True,
        )
        for i, c in enumerate(clients)
    ]
    for th in threads:
        th.start()
    for name in ("warm", "end"):
        time.sleep(max(0.0, t[name] - time.monotonic()))
        if sampler is not None:
            sampler.mark(name)
        progress(f"  {'warm-up over' if name == 'warm' else 'load over, joining clients'}")
    for th in threads:
        th.join(timeout=max(0.0, t["hard"] - time.monotonic()))
    stop.set()
    if any(th.is_alive() for th in threads):  # past the hard stop: cancel what still runs
        for c in clients:
            c.close()
        for th in threads:
            th.join(timeout=5.0)
    for c in clients:
        c.close()
    not_joined = sum(th.is_alive() for th in threads)
    answered = [
        sum(1 for r in o if r[0] != "stream_call" and r[3] == "OK" and t["warm"] <= r[1] < t["end"])
        for o in outs
    ]
    return [r for o in outs for r in o], t, not_joined, answered


def fresh_client_answered(target: str, cfg: LoadConfig, queries: np.ndarray) -> bool:
    """After the load: does a new client get an answer (retrying UNAVAILABLE as usual)?"""
    try:
        with BankClient(target, timeout=cfg.timeout) as client:
            hits = client.search(queries, cfg.k, with_values=cfg.values)
        return hits.ids.shape == (len(queries), cfg.k)
    except Exception as e:
        progress(f"  a fresh client after the load got {_code(e)}: {e}")
        return False


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
    pid = server.proc.pid if server else cfg.server_pid
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


def describe_machine() -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        names = re.findall(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        cpu = names[0] if names else cpu
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    return f"{os.cpu_count()} cores ({cpu}), {platform.system()}, load average {load} at start"


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
    kept = contextlib.nullcontext(cfg.workdir) if cfg.workdir else None
    with kept or tempfile.TemporaryDirectory(prefix="bankd-load-") as where:
        workdir = Path(where)
        workdir.mkdir(parents=True, exist_ok=True)
        index_path = None if cfg.target else bank_for(cfg, workdir)
        phases = [run_phase(cfg, n, lim, index_path, workdir) for n, lim in cfg.phases()]
    print(report(cfg, machine, phases), flush=True)
    if cfg.json:
        doc = {"config": asdict(cfg), "machine": machine, "phases": phases}
        Path(cfg.json).write_text(json.dumps(doc, indent=1))
        progress(f"figures written to {cfg.json}")
    return 1 if cfg.check and not all(p["ok"] for p in phases) else 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # the server child stops on the way out
        progress("interrupted")
        sys.exit(130)
