"""A real bankd on port 0: health while loading and after a failed load, reflection,
/metrics (names, counts, promtool), deadlines, the concurrency limit and graceful stop.
"""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

import bankd.serve.server
from bankd.store.reader import Bank
from bankd_client import (
    BankClient,
    DeadlineExceeded,
    InvalidArgument,
    ResourceExhausted,
    Unavailable,
    errors,
)

SERVICE = "bankd.v1.MemoryBank"


SERVICE = "bankd.v1.MemoryBank"


def slow_down(srv: Any, seconds: float) -> threading.Event:
    """Make every index search of srv take `seconds` longer; the event is set on entry."""
    searcher = srv.servicer.service.searcher
    original = type(searcher).raw_search.__get__(searcher)  # never a previous slow_down
    entered = threading.Event()

    def raw_search(queries: np.ndarray, fetch: int, params: Any = None) -> Any:
        entered.set()
        time.sleep(seconds)
        return original(queries, fetch, params)

    searcher.raw_search = raw_search
    return entered


# -- health, loading, reflection -------------------------------------------------------


class _GatedBank(Bank):
    """Bank whose load waits for a gate, so tests can look at a loading server."""

    gate = threading.Event()

    @classmethod
    def load(cls, index_path: Any, **kwargs: Any) -> Bank:
        assert cls.gate.wait(timeout=30), "gate never opened"
        return Bank.load(index_path, **kwargs)


def _health(port: int, service: str) -> int:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


def test_not_serving_and_unavailable_until_loaded(
    bank: Any,
    server_factory: Any,
    client_factory: Any,
    monkeypatch: Any,
    assert_serving: Callable[..., Any],
    samples: Callable[..., Any],
    scrape: Callable[..., Any],
) -> None:
    gate = threading.Event()
    monkeypatch.setattr(_GatedBank, "gate", gate)
    monkeypatch.setattr(bankd.serve.server, "Bank", _GatedBank)
    try:
        srv = server_factory(bank.path, load_in_background=True)
        serving = health_pb2.HealthCheckResponse.SERVING
        not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
        assert _health(srv.port, "") == not_serving
        assert _health(srv.port, SERVICE) == not_serving
        client = client_factory(srv.port, retry_attempts=2)
        with pytest.raises(Unavailable, match="loading"):
            client.search(bank.queries(2, seed=0), k=5)
        with pytest.raises(Unavailable, match="loading"):
            client.info()
        with pytest.raises(Unavailable, match="loading"):
            list(client.stream_search([bank.queries(2, seed=0)]))
        assert samples(scrape(srv.metrics_port))[("bankd_ready", ())] == 0
    finally:
        gate.set()
    srv.wait_loaded(timeout=30)
    assert _health(srv.port, "") == serving
    assert _health(srv.port, SERVICE) == serving
    page = samples(scrape(srv.metrics_port))
    assert page[("bankd_ready", ())] == 1
    engine = srv.servicer.service.searcher.engine_label()
    assert page[("bankd_search_engine_info", (("engine", engine),))] == 1
    client.wait_ready(timeout=5)
    assert_serving(client, bank)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_failed_load_is_reported(make_bank: Any, server_factory: Any, client_factory: Any) -> None:
    broken = make_bank(n=20, d=4)
    broken.path.with_suffix(".values.npy").unlink()
    srv = server_factory(broken.path, load_in_background=True)
    with pytest.raises(errors.BankFileError, match="values.npy"):
        srv.wait_loaded(timeout=30)
    assert _health(srv.port, SERVICE) == health_pb2.HealthCheckResponse.NOT_SERVING
    with pytest.raises(Unavailable):
        client_factory(srv.port, retry_attempts=2).info()


def test_reflection_lists_the_service(server: Any) -> None:
    from google.protobuf.descriptor_pool import DescriptorPool
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )

    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        db = ProtoReflectionDescriptorDatabase(channel)
        services = db.get_services()
        assert SERVICE in services
        assert "grpc.health.v1.Health" in services
        service = DescriptorPool(db).FindServiceByName(SERVICE)
        assert {m.name for m in service.methods} == {
            "GetInfo",
            "Search",
            "SearchStream",
            "Fetch",
            "Embed",
        }


# -- metrics ---------------------------------------------------------------------------


def test_metrics_exposed_and_counting(
    server: Any,
    client: BankClient,
    bank: Any,
    samples: Callable[..., Any],
    scrape: Callable[..., Any],
) -> None:
    before = samples(scrape(server.metrics_port))
    batches = [bank.queries(b, seed=b) for b in (1, 4, 9)]
    for q in batches:
        client.search(q, k=5)
    list(client.stream_search(batches, k=2))
    with pytest.raises(InvalidArgument):
        client.search(bank.queries(2, seed=0), k=0)
    text = scrape(server.metrics_port)
    after = samples(text)
    for name in (
        "bankd_search_latency_seconds_bucket",
        "bankd_requests_total",
        "bankd_query_rows_total",
        "bankd_bank_entries",
        "bankd_index_search_latency_seconds_bucket",
        "bankd_inflight_requests",
    ):
        assert any(s[0] == name for s in after), name

    def delta(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert after[("bankd_bank_entries", ())] == len(bank.ids)
    assert delta("bankd_search_latency_seconds_count", method="Search") == 4
    assert delta("bankd_search_latency_seconds_count", method="SearchStream") == 3
    assert delta("bankd_query_rows_total") == 2 * 14
    assert delta("bankd_requests_total", method="Search", code="OK") == 3
    assert delta("bankd_requests_total", method="Search", code="INVALID_ARGUMENT") == 1
    # Sub-millisecond buckets exist for search latency.
    buckets = {
        float(dict(lbl)["le"])
        for (name, lbl) in after
        if name == "bankd_search_latency_seconds_bucket"
    }
    assert min(buckets) < 1e-3


def test_promtool_check_metrics(
    server: Any, client: BankClient, bank: Any, scrape: Callable[..., Any]
) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (CI installs Debian's prometheus package)")
    client.search(bank.queries(2, seed=0), k=5)
    text = scrape(server.metrics_port)
    result = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_bank_bytes_labels_do_not_depend_on_the_file_name(
    make_bank: Any, server_factory: Any, samples: Callable[..., Any], scrape: Callable[..., Any]
) -> None:
    parts = []
    for name in ("bank", "tinyalign_v2"):
        srv = server_factory(make_bank(n=20, d=4, name=name).path)
        found = samples(scrape(srv.metrics_port))
        parts.append({dict(lbl)["part"] for (n, lbl) in found if n == "bankd_bank_bytes"})
    assert parts[0] == parts[1]


# -- deadlines, concurrency limit, graceful stop ---------------------------------------


def test_tiny_deadline_is_deadline_exceeded(
    client: BankClient, bank: Any, assert_serving: Callable[..., Any]
) -> None:
    with pytest.raises(DeadlineExceeded):
        client.search(bank.queries(64, seed=0), k=50, timeout=1e-4)
    assert_serving(client, bank)


def test_deadline_passing_while_queued(
    bank: Any,
    server_factory: Any,
    client_factory: Any,
    assert_serving: Callable[..., Any],
    samples: Callable[..., Any],
    scrape: Callable[..., Any],
) -> None:
    srv = server_factory(bank.path)
    entered = slow_down(srv, 0.6)
    client = client_factory(srv.port)
    blocker = threading.Thread(target=client.search, args=(bank.queries(2, seed=0),))
    blocker.start()
    assert entered.wait(5)
    t0 = time.monotonic()
    with pytest.raises(DeadlineExceeded):
        client.search(bank.queries(2, seed=1), k=5, timeout=0.2)
    assert time.monotonic() - t0 < 0.55
    blocker.join(10)
    # The server sees the expired request and skips its search: one index search ran.
    expired = ("bankd_requests_total", (("code", "DEADLINE_EXCEEDED"), ("method", "Search")))
    deadline = time.monotonic() + 5
    while samples(scrape(srv.metrics_port)).get(expired, 0) < 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    found = samples(scrape(srv.metrics_port))
    assert found.get(expired) == 1
    assert found[("bankd_index_search_latency_seconds_count", ())] == 1
    assert_serving(client, bank)


def test_concurrency_limit_answers_resource_exhausted(
    bank: Any,
    helpers: Any,
    server_factory: Any,
    client_factory: Any,
    assert_serving: Callable[..., Any],
) -> None:
    srv = server_factory(bank.path, max_concurrent_rpcs=2)
    slow_down(srv, 0.6)
    client = client_factory(srv.port)
    barrier = threading.Barrier(8)
    outcomes: list[tuple[str, float]] = []
    lock = threading.Lock()

    def worker(i: int) -> None:
        q = bank.queries(512, seed=i)
        barrier.wait(timeout=10)
        t0 = time.monotonic()
        try:
            hits = client.search(q, k=5, with_values=False)
            helpers.assert_topk(bank, q, 5, hits.ids, hits.scores)
            outcome = "ok"
        except ResourceExhausted:
            outcome = "exhausted"
        with lock:
            outcomes.append((outcome, time.monotonic() - t0))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=30)
    kinds = [o for o, _ in outcomes]
    assert len(outcomes) == 8
    assert kinds.count("ok") >= 2 and kinds.count("exhausted") >= 1, kinds
    # Refusals are immediate, not queued behind the slow searches.
    assert max(t for o, t in outcomes if o == "exhausted") < 0.5
    slow_down(srv, 0.0)
    assert_serving(client, bank)


def test_graceful_stop_lets_an_inflight_search_finish(
    bank: Any, helpers: Any, server_factory: Any, client_factory: Any
) -> None:
    srv = server_factory(bank.path)
    entered = slow_down(srv, 0.5)
    client = client_factory(srv.port, retry_attempts=2)
    q = bank.queries(8, seed=0)
    result: dict[str, Any] = {}

    def search() -> None:
        try:
            result["hits"] = client.search(q, k=5)
        except BaseException as e:
            result["error"] = e

    th = threading.Thread(target=search)
    th.start()
    assert entered.wait(5)
    srv.stop(grace=5)
    th.join(10)
    assert "error" not in result, result.get("error")
    helpers.assert_topk(bank, q, 5, result["hits"].ids, result["hits"].scores)
    with pytest.raises(Unavailable):
        client.search(q, k=5, timeout=2)


def test_calls_during_the_drain_are_unavailable_not_cancelled(
    bank: Any, helpers: Any, server_factory: Any, client_factory: Any
) -> None:
    """On an established connection, gRPC's own shutdown answers the first new call
    CANCELLED (grpc/grpc#41785), which neither gRPC's retry policy nor the trainer
    retries; the server refuses calls with UNAVAILABLE while it drains instead."""
    srv = server_factory(bank.path)
    q = bank.queries(4, seed=0)
    inflight_client = client_factory(srv.port, retry_attempts=1)
    late = client_factory(srv.port, retry_attempts=1, timeout=5)
    late.search(q, k=5)  # connected before the stop, like a trainer's long-lived channel
    entered = slow_down(srv, 1.5)
    result: dict[str, Any] = {}
    th = threading.Thread(target=lambda: result.update(hits=inflight_client.search(q, k=5)))
    th.start()
    assert entered.wait(5)
    stopper = threading.Thread(target=srv.stop, kwargs={"grace": 10})
    stopper.start()
    refusals = []
    t0 = time.monotonic()
    while time.monotonic() - t0 < 0.7:  # well inside the drain: the search takes 1.5 s
        with pytest.raises(Unavailable, match="shutting down"):
            late.search(q, k=5)
        refusals.append(t0)
    assert th.is_alive() and len(refusals) > 1
    th.join(10)
    helpers.assert_topk(bank, q, 5, result["hits"].ids, result["hits"].scores)
    stopper.join(10)
    assert not stopper.is_alive()
    with pytest.raises(Unavailable):
        late.search(q, k=5)
