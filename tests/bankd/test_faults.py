"""Faults at the process level: `bankd serve` as a child process, as operators run it.

- SIGTERM drains: a stream in flight when the signal arrives is answered in full,
  new calls are refused with UNAVAILABLE meanwhile, and the process exits 0 within
  ``--grace``.
- A damaged bank (truncated index or values, a flipped bit, a manifest that does not
  match the arrays) is refused at start: non-zero exit, the file named on stderr.
  (tests/bankd/test_store.py covers every refusal at the ``Bank.load`` level.)
- kill -9 and a restart on the same port: a client stream fails with a typed
  ``Unavailable`` after a correct, in-order prefix; the trainer's ``Retriever`` waits
  the outage out with backoff and answers every batch exactly as brute force does, or
  raises ``RetrievalUnavailable`` once its patience is spent.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bankd.store.paths import BankPaths
from bankd.store.writer import write_bank
from bankd_client import BankClient, BankError, Unavailable

pytestmark = pytest.mark.slow  # child processes that import torch: seconds each
START_TIMEOUT_S = 120.0


def paced(batches: list[np.ndarray], every_s: float, sent: list[int]) -> Iterator[np.ndarray]:
    """Yield batches one every ``every_s`` seconds, counting them in sent[0]."""
    for q in batches:
        sent[0] += 1
        yield q
        time.sleep(every_s)


# -- SIGTERM ---------------------------------------------------------------------------


def test_sigterm_drains_the_inflight_stream_then_exits_0(
    bank: Any, helpers: Any, serve: Callable[..., Any]
) -> None:
    grace = 20.0
    server = serve(bank.path, "--grace", str(grace)).wait_serving()
    batches = [bank.queries(3, seed=300 + i) for i in range(16)]
    sent = [0]
    got: list[Any] = []
    failure: list[BaseException] = []

    def stream() -> None:
        with BankClient(server.address, retry_attempts=1, timeout=60) as client:
            try:
                got.extend(client.stream_search(paced(batches, 0.2, sent), k=4))
            except BaseException as e:
                failure.append(e)

    late = BankClient(server.address, retry_attempts=1, timeout=2)
    late.search(batches[0], k=4)  # connected before the signal, like a trainer
    streamer = threading.Thread(target=stream)
    streamer.start()
    while sent[0] < 4 and streamer.is_alive():
        time.sleep(0.01)
    server.proc.send_signal(signal.SIGTERM)
    t_term = time.monotonic()

    # New calls are refused with UNAVAILABLE (retried by clients; not gRPC's CANCELLED)
    # while the stream drains, once the signal is handled.
    refused: BankError | None = None
    with late:
        while refused is None and time.monotonic() - t_term < 5:
            try:
                late.search(batches[0], k=4)
                time.sleep(0.02)
            except BankError as e:
                refused = e
    assert isinstance(refused, Unavailable), f"a call after SIGTERM got {refused!r}"
    assert "shutting down" in str(refused)
    assert streamer.is_alive(), "the stream ended before the refusal was seen: not in flight"
    with BankClient(server.address, retry_attempts=1, timeout=2) as new:
        with pytest.raises(Unavailable, match="shutting down"):
            new.search(batches[0], k=4)
    assert sent[0] < len(batches)

    streamer.join(60)
    assert not failure, f"the in-flight stream failed: {failure[0]!r}"
    assert len(got) == len(batches)
    for q, hits in zip(batches, got, strict=True):
        helpers.assert_topk(bank, q, 4, hits.ids, hits.scores)
    assert server.exit_code(timeout=grace) == 0, server.output()
    assert time.monotonic() - t_term < grace
    assert "draining" in server.output()


# -- kill -9 and restart ---------------------------------------------------------------


def check_retrieved(bank: Any, helpers: Any, keys: np.ndarray, own: list[int], got: Any) -> None:
    """A Retriever's answer for one batch is the brute-force top-k without own ids."""
    exclude = [[i] for i in own]
    full = helpers.brute_force(bank, keys, exclude)
    ids = got.ids.numpy()
    k = ids.shape[1]
    assert got.mask.all()
    rows = np.array([[bank.row_of[int(e)] for e in row] for row in ids])
    scores = np.take_along_axis(full, rows, axis=1)
    expected = -np.sort(-full, axis=1)[:, :k]
    np.testing.assert_allclose(scores, expected, atol=1e-4, rtol=0)  # ties may swap ids
    assert not (ids == np.array(own)[:, None]).any(), "a query retrieved its own entry"
    np.testing.assert_array_equal(got.values.numpy(), helpers.values_of(bank, ids))


def test_kill_9_and_restart_on_the_same_port(
    bank: Any, helpers: Any, serve: Callable[..., Any], caplog: Any
) -> None:
    torch = pytest.importorskip("torch")
    from bankd.models.keys import KeyFunction
    from tinyalign.retrieval import RetrievalUnavailable, Retriever

    first = serve(bank.path).wait_serving()
    port = first.port

    # A client stream (no resume: it must fail clearly) ...
    stream_batches = [bank.queries(2, seed=500 + i) for i in range(40)]
    sent = [0]
    streamed: list[Any] = []
    stream_error: list[BaseException] = []
    stream_client = BankClient(first.address, retry_attempts=1, timeout=60)

    def stream() -> None:
        try:
            for hits in stream_client.stream_search(paced(stream_batches, 0.1, sent), k=3):
                streamed.append(hits)
        except BaseException as e:
            stream_error.append(e)

    # ... and the trainer's Retriever, one batch submitted every 0.1 s.
    caplog.set_level("WARNING", logger="tinyalign.retrieval")
    bank_client = BankClient(first.address, timeout=5)
    key_function = KeyFunction(bank.keys.shape[1])  # one patch per image: key = the query
    retriever = Retriever(bank_client, key_function, k=4, retry_for_s=60, backoff_s=(0.2, 1.0))
    submitted: list[tuple[np.ndarray, list[int], Any]] = []

    def feed() -> None:
        for i in range(30):
            q = bank.queries(3, seed=700 + i)
            own = [int(bank.ids[r]) for r in np.argmax(q @ bank.keys.T, axis=1)]  # nearest
            features = torch.from_numpy(q)[:, None, :]  # (B, 1, d)
            keys = retriever.keys(features).numpy()
            submitted.append((keys, own, retriever.submit(features, torch.tensor(own))))
            time.sleep(0.1)

    threads = [threading.Thread(target=stream), threading.Thread(target=feed)]
    for t in threads:
        t.start()
    while (sent[0] < 10 or len(submitted) < 8) and threads[1].is_alive():
        time.sleep(0.01)
    first.proc.kill()  # SIGKILL: no drain, connections reset
    assert first.exit_code(timeout=30) == -signal.SIGKILL
    killed_after = len(submitted)
    # Down for longer than gRPC's own retries last (5 attempts, ~1.5 s of backoff), so
    # the Retriever's retrying is what bridges the outage: `bankd serve` restarts in
    # well under a second now that it does not import torch.
    time.sleep(3.0)
    second = serve(bank.path, port=port).wait_serving()
    assert second.port == port
    for t in threads:
        t.join(120)

    # The stream: a typed error, after a correct in-order prefix with no repeats.
    assert stream_error and isinstance(stream_error[0], Unavailable), stream_error
    assert 1 <= len(streamed) < len(stream_batches)
    for q, hits in zip(stream_batches, streamed, strict=False):
        helpers.assert_topk(bank, q, 3, hits.ids, hits.scores)
    # The same client streams again once the server is back.
    again = list(stream_client.stream_search(stream_batches[:3], k=3))
    for q, hits in zip(stream_batches[:3], again, strict=True):
        helpers.assert_topk(bank, q, 3, hits.ids, hits.scores)

    # The Retriever: every batch answered, each with its own right answer.
    assert len(submitted) == 30 and killed_after < 30
    for keys, own, future in submitted:
        check_retrieved(bank, helpers, keys, own, future.result(timeout=60))
    waited = [r for r in caplog.records if "retrying" in r.getMessage()]
    assert waited, "no search met the outage: the test did not test anything"

    # Patience runs out while the bank stays down: a clear error, in about that time.
    second.proc.kill()
    second.exit_code(timeout=30)
    impatient = Retriever(bank_client, key_function, k=4, retry_for_s=1.0, backoff_s=(0.2, 0.4))
    q = torch.from_numpy(bank.queries(2, seed=1))[:, None, :]
    t0 = time.monotonic()
    with pytest.raises(RetrievalUnavailable, match=r"unreachable for 1 s .*--resume"):
        impatient.retrieve(q, torch.tensor([0, 0]))
    assert time.monotonic() - t0 < 15
    impatient.close()
    retriever.close()
    stream_client.close()


# -- damaged banks ---------------------------------------------------------------------


def _truncate(path: Path, by: int = 100) -> Path:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - by)
    return path


def _flip_bit(path: Path) -> Path:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))
    return path


def _one_more_entry(paths: BankPaths) -> Path:
    m = json.loads(paths.manifest.read_text())
    m["entries"] += 1
    paths.manifest.write_text(json.dumps(m))
    return paths.file("keys.npy")  # the first array checked against the manifest


DAMAGE: dict[str, tuple[Callable[[BankPaths], Path], str]] = {
    "truncated index": (lambda p: _truncate(p.index), r"bytes, the manifest says"),
    "truncated values": (lambda p: _truncate(p.file("values.npy")), r"truncated"),
    "flipped bit in values": (lambda p: _flip_bit(p.file("values.npy")), r"SHA-256"),
    "manifest entry count": (_one_more_entry, r"the manifest says float32 \[41, 8\]"),
}


# All four run through `bankd`'s entry point (``bankd.cli.main``, whose return value is
# the exit status) in ONE child process: a child of its own per bank would pay torch's
# import each (seconds on a busy 2-core machine). `python -m bankd serve` runs once
# on its own below, for the process's exit status.
_RUN_ALL = """import sys
from bankd.cli import main
for name, index in zip(sys.argv[1::2], sys.argv[2::2]):
    print("--- " + name, file=sys.stderr, flush=True)
    rc = main(["serve", "--index", index, "--port", "0", "--metrics-port", "-1",
               "--device", "cpu", "--no-embed"])
    print("--- exit " + str(rc), file=sys.stderr, flush=True)"""


def _damaged_bank(folder: Path, damage: Callable[[BankPaths], Path]) -> tuple[Path, Path]:
    """A small bank with one damage applied: (its index, the damaged file)."""
    rng = np.random.default_rng(0)
    keys = rng.standard_normal((40, 8)).astype(np.float32)
    values = rng.standard_normal((40, 32, 96)).astype(np.float16)
    index = Path(write_bank(folder / "bank.faiss", keys, values))
    return index, damage(BankPaths(index))


@pytest.fixture(scope="module")
def refused_starts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple]:
    """name -> (damaged file, exit status, stdout + the case's stderr)."""
    damaged, argv = {}, []
    for i, (name, (damage, _)) in enumerate(DAMAGE.items()):
        index, damaged[name] = _damaged_bank(tmp_path_factory.mktemp(f"damaged{i}"), damage)
        argv += [name, str(index)]
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    run = subprocess.run(
        [sys.executable, "-c", _RUN_ALL, *argv],
        capture_output=True,
        text=True,
        timeout=START_TIMEOUT_S,
        env=env,
    )
    assert run.returncode == 0, run.stderr
    out = {}
    for m in re.finditer(r"^--- ([^\n]+)\n(.*?)^--- exit (\d+)$", run.stderr, re.S | re.M):
        out[m.group(1)] = (damaged[m.group(1)], int(m.group(3)), run.stdout + m.group(2))
    assert set(out) == set(DAMAGE), run.stderr
    return out


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_bank_is_refused_at_start(refused_starts: dict, damage: str) -> None:
    path, code, output = refused_starts[damage]
    assert code != 0, output
    assert "bankd serving" not in output
    (message,) = [line for line in output.splitlines() if line.startswith("bankd serve: ")]
    assert str(path) in message, message
    assert re.search(DAMAGE[damage][1], message), message


def test_damaged_bank_process_exits_non_zero(tmp_path: Path, serve: Callable[..., Any]) -> None:
    index, damaged = _damaged_bank(tmp_path, DAMAGE["flipped bit in values"][0])
    server = serve(index)
    assert server.exit_code(timeout=START_TIMEOUT_S) == 2
    assert f"bankd serve: {damaged}: SHA-256 does not match" in server.output()
    assert server.stdout.get(timeout=10) is None  # it never said it was serving
