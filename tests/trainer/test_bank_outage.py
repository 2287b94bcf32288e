"""Bank outages seen from training: the Retriever's retries, and a stage-1 run against
a remote bank whose server is killed (kill -9) mid-run.

Restarted on the same port, the run waits the outage out and finishes with exactly
the configured steps, each logged once and in order. Left down, the run stops with
``RetrievalUnavailable`` once ``bank_patience`` is spent. Transient errors (including
the CANCELLED a stopping gRPC server answers) are retried; a bad request is not.
(tests/bankd/test_faults.py tests the Retriever against a real server and brute force.)
"""

from __future__ import annotations

import csv
import math
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from bankd.models.keys import KeyFunction
from bankd_client import Hits, errors
from tinyalign.retrieval import RetrievalUnavailable, Retriever
from tinyalign.train import train


def logged_steps(out: Path) -> list[int]:
    path = out / "metrics.csv"
    if not path.exists():
        return []
    with path.open() as f:
        return [int(r["step"]) for r in csv.DictReader(f) if r.get("step")]


def kill_after_step(
    server: Any, out: Path, step: int, then: Callable[[], None] | None = None
) -> threading.Thread:
    """A thread that kill -9s the server once ``step`` is logged, then calls ``then``."""

    def watch() -> None:
        deadline = time.monotonic() + 300
        while len(logged_steps(out)) < step and time.monotonic() < deadline:
            time.sleep(0.01)
        server.proc.kill()
        assert server.exit_code(timeout=30) == -signal.SIGKILL
        if then is not None:
            then()

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


class FlakyBank:
    """Raises the given errors on the first searches, then answers (k hits of id 7)."""

    def __init__(self, *failures: Exception) -> None:
        self.failures = list(failures)
        self.calls = 0

    def search(self, keys: np.ndarray, k: int, **_: Any) -> Hits:
        self.calls += 1
        if self.failures:
            raise self.failures.pop(0)
        b = len(keys)
        return Hits(np.full((b, k), 7), np.zeros((b, k), np.float32), np.zeros((b, k, 32, 96)))


@pytest.mark.parametrize(
    "error",
    [
        errors.Unavailable("connection refused"),
        errors.DeadlineExceeded("deadline"),
        errors.Cancelled("CANCELLED"),  # what gRPC's shutdown answers (grpc/grpc#41785)
    ],
    ids=lambda e: type(e).__name__,
)
def test_retriever_waits_out_transient_errors(error: Exception) -> None:
    bank = FlakyBank(error, error)
    retriever = Retriever(bank, KeyFunction(4), k=2, retry_for_s=30, backoff_s=(0.01, 0.02))
    got = retriever.retrieve(torch.ones(3, 1, 4), torch.tensor([1, 2, 3]))
    assert bank.calls == 3 and got.ids.shape == (3, 2) and got.mask.all()


def test_retriever_does_not_retry_a_bad_request() -> None:
    bank = FlakyBank(errors.InvalidArgument("k=0"))
    retriever = Retriever(bank, KeyFunction(4), k=2, retry_for_s=30, backoff_s=(0.01, 0.02))
    with pytest.raises(errors.InvalidArgument):
        retriever.retrieve(torch.ones(3, 1, 4), torch.tensor([1, 2, 3]))
    assert bank.calls == 1


@pytest.mark.slow  # two `bankd serve` child processes
def test_run_survives_a_killed_and_restarted_bank(
    demo: Any, make_config: Any, serve: Callable[..., Any], tmp_path: Path, caplog: Any
) -> None:
    caplog.set_level("WARNING", logger="tinyalign.retrieval")
    first = serve(demo.bank).wait_ready()
    restarted: list[Any] = []

    def restart() -> None:
        # Down for longer than gRPC's own reconnect attempts (about 1.5 s; `bankd serve`
        # restarts in under a second), so the Retriever's retrying is what bridges it.
        time.sleep(3.0)
        restarted.append(serve(demo.bank, port=first.port).wait_ready())

    steps, out = 12, tmp_path / "run"
    watcher = kill_after_step(first, out, 3, then=restart)
    result = train(make_config(out=str(out), bank=first.address, steps=steps, bank_patience=120))
    watcher.join(60)

    assert restarted and restarted[0].port == first.port
    assert result.completed and len(result.losses) == steps
    assert all(math.isfinite(x) for x in result.losses)
    assert logged_steps(out) == list(range(1, steps + 1))  # each step once, in order
    waited = [r for r in caplog.records if "retrying" in r.getMessage()]
    assert waited, "no retrieval met the outage: the server was killed too late"
    with (out / "metrics.csv").open() as f:
        longest_wait_ms = max(float(r["retrieval_wait_ms"]) for r in csv.DictReader(f))
    assert longest_wait_ms > 500  # the step after the kill waited for the restart


@pytest.mark.slow
def test_run_stops_clearly_when_the_bank_stays_down(
    demo: Any, make_config: Any, serve: Callable[..., Any], tmp_path: Path
) -> None:
    server = serve(demo.bank).wait_ready()
    out = tmp_path / "run"
    kill_after_step(server, out, 2)
    t0 = time.monotonic()
    with pytest.raises(RetrievalUnavailable, match=r"unreachable for 2 s.*--resume"):
        train(make_config(out=str(out), bank=server.address, steps=200, bank_patience=2))
    assert time.monotonic() - t0 < 120
    steps = logged_steps(out)
    assert 2 <= len(steps) < 200 and steps == list(range(1, len(steps) + 1))
