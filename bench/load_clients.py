"""The clients of bench/load.py: threads with a BankClient each, sending Search or
SearchStream calls back to back until the phase ends, every call recorded.

    records, t, not_joined, answered = drive(cfg, "127.0.0.1:50051", batches, sampler)

Each client has its own channel and no retries, so every refusal is seen and counted;
after an error it waits ``backoff_ms``. Every call has a deadline that ends by the
phase's hard stop (``grace`` seconds after its end); past it the calls still running
are cancelled and every client is joined.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Protocol

import numpy as np
from workload.memory import MemorySampler
from workload.run import progress

from bankd_client import BankClient, BankError


class LoadSettings(Protocol):
    """What the clients read of bench/load.py's LoadConfig."""

    clients: int
    stream_fraction: float
    stream_batches: int
    k: int
    values: bool
    timeout: float
    backoff_ms: float
    max_requests: int
    warmup: float
    seconds: float
    grace: float


# One record per unary call, per answered stream message, per failed stream call (kind
# "stream"), and per stream call as a whole ("stream_call", latency only):
# (kind, start, seconds, status code name).
Record = tuple[str, float, float, str]


def _code(e: BaseException) -> str:
    return e.code.name if isinstance(e, BankError) else f"CLIENT_{type(e).__name__}"


def stream_call(
    client: BankClient, qs: list[np.ndarray], cfg: LoadSettings, timeout: float, out: list[Record]
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
    cfg: LoadSettings,
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
    cfg: LoadSettings, target: str, batches: list[np.ndarray], sampler: MemorySampler | None
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


def fresh_client_answered(target: str, cfg: LoadSettings, queries: np.ndarray) -> bool:
    """After the load: does a new client get an answer (retrying UNAVAILABLE as usual)?"""
    try:
        with BankClient(target, timeout=cfg.timeout) as client:
            hits = client.search(queries, cfg.k, with_values=cfg.values)
        return hits.ids.shape == (len(queries), cfg.k)
    except Exception as e:
        progress(f"  a fresh client after the load got {_code(e)}: {e}")
        return False
