"""Integration tests of bankd.serve.server: a real server on port 0 driven by the real client.

Covers search against brute force (values, dtypes, torch), exclusion, SearchStream
ordering under concurrency, Fetch, the status code and message of every bad input,
health and reflection, /metrics, deadlines, the concurrency limit and graceful stop.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

import bankd.serve.server
from bankd.serve.service import ServiceLimits
from bankd.store.reader import Bank
from bankd_client import (
    BankClient,
    DeadlineExceeded,
    FailedPrecondition,
    Hits,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    SearchQuery,
    Unavailable,
    errors,
    tensors,
)
from bankd_client.proto import bankd_pb2 as pb
from bankd_client.proto import bankd_pb2_grpc as pb_grpc

SERVICE = "bankd.v1.MemoryBank"


# -- helpers ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stub(server: Any) -> Any:
    """The raw generated stub, for requests the typed client refuses to build."""
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    yield pb_grpc.MemoryBankStub(channel)
    channel.close()


def raw_keys(array: np.ndarray, dtype: int | None = None, data: bytes | None = None) -> pb.Tensor:
    t = tensors.encode(array)
    if dtype is not None:
        t.dtype = dtype
    if data is not None:
        t.data = data
    return t


def call_raw(method: Callable, request: Any) -> Any:
    """Call a raw stub method, turning grpc.RpcError into the client's typed error."""
    try:
        return method(request, timeout=10)
    except grpc.RpcError as e:
        raise errors.from_rpc_error(e) from None


def assert_serving(client: BankClient, bank: Any, helpers: Any) -> None:
    """A good search succeeds and is right (the server survived whatever came before)."""
    q = bank.queries(3, seed=99)
    hits = client.search(q, k=5, with_values=False)
    helpers.assert_topk(bank, q, 5, hits.ids, hits.scores)


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


_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def scrape(port: int) -> str:
    """The /metrics text of a server (straight to loopback, whatever proxy is set)."""
    with _NO_PROXY.open(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        return r.read().decode()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """{(sample name, sorted labels): value} of a /metrics text."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


# -- GetInfo ---------------------------------------------------------------------------


def test_info_describes_the_bank(client: BankClient, bank: Any, server: Any) -> None:
    info = client.info(refresh=True)
    manifest = Bank.load(bank.path, verify=False).manifest
    assert info.entries == len(bank.ids)
    assert info.key_dim == bank.keys.shape[1]
    assert info.value_shape == bank.values.shape[1:]
    assert info.value_dtype == "float16"
    assert info.index_type == manifest["index_factory"] == "Flat"
    assert info.metric == "ip"
    assert info.max_k == 1024 and info.max_batch == ServiceLimits().max_batch
    assert info.max_message_bytes == ServiceLimits().max_message_bytes
    assert info.embed_available is False
    assert info.search_device == "cpu"
    assert info.bank_id == server.servicer.service.bank.bank_id
    assert re.fullmatch(r"[0-9a-f]{64}", info.bank_id)
    assert info.server_version == bankd.__version__


# -- Search ----------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 5, 50])
@pytest.mark.parametrize("b", [1, 7, 64])
def test_search_equals_brute_force(
    client: BankClient, bank: Any, helpers: Any, b: int, k: int
) -> None:
    q = bank.queries(b, seed=b * 100 + k)
    hits = client.search(q, k=k)
    helpers.assert_topk(bank, q, k, hits.ids, hits.scores)
    assert hits.values.shape == (b, k, *bank.values.shape[1:])
    assert hits.values.dtype == np.float16
    np.testing.assert_array_equal(hits.values, helpers.values_of(bank, hits.ids))


def test_search_without_values_returns_none(client: BankClient, bank: Any, helpers: Any) -> None:
    q = bank.queries(5, seed=3)
    hits = client.search(q, k=5, with_values=False)
    assert hits.values is None
    helpers.assert_topk(bank, q, 5, hits.ids, hits.scores)


def test_search_accepts_float16_keys(client: BankClient, bank: Any, helpers: Any) -> None:
    q16 = bank.queries(16, seed=4, dtype=np.float16)
    hits = client.search(q16, k=5)
    helpers.assert_topk(bank, q16.astype(np.float32), 5, hits.ids, hits.scores)
    np.testing.assert_array_equal(hits.values, helpers.values_of(bank, hits.ids))


def test_search_torch_in_torch_out(client: BankClient, bank: Any, helpers: Any) -> None:
    torch = pytest.importorskip("torch")
    q = bank.queries(6, seed=5)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        hits = client.search(torch.from_numpy(q).to(dtype), k=5)
        assert isinstance(hits.ids, torch.Tensor) and hits.ids.dtype == torch.int64
        assert isinstance(hits.scores, torch.Tensor) and hits.scores.dtype == torch.float32
        assert isinstance(hits.values, torch.Tensor) and hits.values.dtype == torch.float16
        sent = torch.from_numpy(q).to(dtype).float().numpy()
        helpers.assert_topk(bank, sent, 5, hits.ids.numpy(), hits.scores.numpy())
        np.testing.assert_array_equal(hits.values.numpy(), helpers.values_of(bank, hits.ids))
    numpy_hits = client.search(q, k=5)
    torch_hits = client.search(torch.from_numpy(q), k=5)
    np.testing.assert_array_equal(torch_hits.ids.numpy(), numpy_hits.ids)


def test_search_largest_k(client: BankClient, bank: Any, helpers: Any) -> None:
    q = bank.queries(2, seed=6)
    k = client.info().max_k
    hits = client.search(q, k=k, with_values=False)
    helpers.assert_topk(bank, q, k, hits.ids, hits.scores)


def test_concurrent_searches_are_merged_correctly(
    client: BankClient, bank: Any, helpers: Any
) -> None:
    """Requests merged into one index search each get their own rows, k and exclusions."""
    failures: list[BaseException] = []
    barrier = threading.Barrier(8)

    def worker(t: int) -> None:
        rng = np.random.default_rng(t)
        try:
            barrier.wait(timeout=10)
            for i in range(15):
                b, k = int(rng.integers(1, 12)), int(rng.choice([1, 3, 5, 17]))
                q = bank.queries(b, seed=t * 1000 + i)
                exclude = [rng.choice(bank.ids, size=int(rng.integers(0, 4))).tolist() for _ in q]
                hits = client.search(q, k=k, exclude_ids=exclude)
                helpers.assert_topk(bank, q, k, hits.ids, hits.scores, exclude)
                np.testing.assert_array_equal(hits.values, helpers.values_of(bank, hits.ids))
        except BaseException as e:  # reported in the main thread
            failures.append(e)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=60)
    assert not failures, failures[0]


# -- exclusion -------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 5, 50])
def test_excluded_ids_never_returned(client: BankClient, bank: Any, helpers: Any, k: int) -> None:
    rng = np.random.default_rng(k)
    q = bank.queries(24, seed=10 + k)
    top = client.search(q, k=25, with_values=False).ids
    exclude = []
    for i in range(len(q)):
        # The query's own top hits, random bank ids, and an id the bank does not hold.
        own = top[i, : int(rng.integers(0, 16))].tolist()
        other = rng.choice(bank.ids, size=int(rng.integers(0, 4))).tolist()
        exclude.append(own + other + ([5] if i % 3 == 0 else []))
    assert max(map(len, exclude)) <= 20
    hits = client.search(q, k=k, exclude_ids=exclude)
    for i in range(len(q)):
        assert not set(hits.ids[i].tolist()) & set(exclude[i]), f"query {i}"
    assert (hits.ids != -1).all()
    helpers.assert_topk(bank, q, k, hits.ids, hits.scores, exclude)
    np.testing.assert_array_equal(hits.values, helpers.values_of(bank, hits.ids))


def test_exclusion_as_array_of_own_ids(client: BankClient, bank: Any, helpers: Any) -> None:
    """The trainer's form: one own id per query (a 1-D array), each its own best hit."""
    rows = np.arange(0, 40, 5)
    q, own = bank.keys[rows], bank.ids[rows]
    assert (client.search(q, k=1, with_values=False).ids[:, 0] == own).all()
    hits = client.search(q, k=5, exclude_ids=own)
    assert not (hits.ids == own[:, None]).any()
    helpers.assert_topk(bank, q, 5, hits.ids, hits.scores, [[int(e)] for e in own])


def test_exclusion_leaving_fewer_than_k_pads_with_minus_one(
    make_bank: Any, server_factory: Any, client_factory: Any
) -> None:
    small = make_bank(n=12, d=8)
    srv = server_factory(small.path)
    client = client_factory(srv.port)
    q = small.keys[:2]
    exclude = [small.ids[:9].tolist(), []]
    hits = client.search(q, k=5, exclude_ids=exclude)
    assert set(hits.ids[0, :3].tolist()) == set(small.ids[9:].tolist())
    assert (hits.ids[0, 3:] == -1).all() and np.isneginf(hits.scores[0, 3:]).all()
    assert not hits.values[0, 3:].any()
    assert (hits.ids[1] != -1).all()


# -- SearchStream ----------------------------------------------------------------------


def _stream_batches(bank: Any, n: int, seed: int) -> list[SearchQuery]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        b = int(rng.integers(1, 17))
        q = bank.queries(b, seed=seed * 10_000 + i)
        exclude = None
        if i % 3 == 0:
            exclude = [rng.choice(bank.ids, size=int(rng.integers(0, 5))).tolist() for _ in q]
        out.append(SearchQuery(keys=q, exclude_ids=exclude, k=int(rng.choice([1, 5, 9]))))
    return out


def test_stream_search_keeps_order(client: BankClient, bank: Any, helpers: Any) -> None:
    batches = _stream_batches(bank, 200, seed=1)
    results = list(client.stream_search(batches, k=5))
    assert len(results) == len(batches)
    for q, hits in zip(batches, results, strict=True):
        assert hits.ids.shape == (len(q.keys), q.k)
        unary = client.search(q.keys, k=q.k, exclude_ids=q.exclude_ids)
        helpers.assert_same_hits(hits, unary)
        np.testing.assert_array_equal(hits.values, helpers.values_of(bank, hits.ids))


def test_several_streams_at_once(client: BankClient, bank: Any, helpers: Any) -> None:
    per_thread = {t: _stream_batches(bank, 50, seed=100 + t) for t in range(4)}
    expected = {
        t: [client.search(q.keys, k=q.k, exclude_ids=q.exclude_ids) for q in qs]
        for t, qs in per_thread.items()
    }
    got: dict[int, list[Hits]] = {}
    failures: list[BaseException] = []

    def worker(t: int) -> None:
        try:
            got[t] = list(client.stream_search(per_thread[t], with_values=False))
        except BaseException as e:
            failures.append(e)

    threads = [threading.Thread(target=worker, args=(t,)) for t in per_thread]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=60)
    assert not failures, failures[0]
    for t in per_thread:
        assert len(got[t]) == len(expected[t])
        for a, b in zip(got[t], expected[t], strict=True):
            assert a.values is None
            helpers.assert_same_hits(a, dataclasses.replace(b, values=None))


def test_stream_of_nothing(client: BankClient) -> None:
    assert list(client.stream_search([], k=5)) == []


def test_stream_torch_items_come_back_as_torch(client: BankClient, bank: Any) -> None:
    torch = pytest.importorskip("torch")
    q = bank.queries(4, seed=8)
    out = list(client.stream_search([q, torch.from_numpy(q), q], k=3))
    assert isinstance(out[0].ids, np.ndarray) and isinstance(out[2].ids, np.ndarray)
    assert isinstance(out[1].ids, torch.Tensor) and isinstance(out[1].values, torch.Tensor)
    np.testing.assert_array_equal(out[1].ids.numpy(), out[0].ids)


def test_stream_bad_request_raises_at_its_position(
    client: BankClient, bank: Any, helpers: Any, server: Any
) -> None:
    before = samples(scrape(server.metrics_port))
    batches: list[Any] = [bank.queries(3, seed=i) for i in range(12)]
    batches[7] = np.ones((3, bank.keys.shape[1] + 1), np.float32)  # wrong dimension
    got = []
    with pytest.raises(InvalidArgument, match="dimension 33"):
        for hits in client.stream_search(batches, k=4):
            got.append(hits)
    assert len(got) == 7
    for q, hits in zip(batches[:7], got, strict=True):
        helpers.assert_topk(bank, q, 4, hits.ids, hits.scores)
    assert_serving(client, bank, helpers)
    assert len(list(client.stream_search(batches[:5], k=2))) == 5

    def inflight() -> float:
        return samples(scrape(server.metrics_port))[("bankd_inflight_requests", ())]

    # The abandoned stream's handler finishes (and stops counting as in flight).
    deadline = time.monotonic() + 5
    while inflight() != 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert inflight() == 0
    # ... and is counted as cancelled by its client, the complete one as OK.
    after = samples(scrape(server.metrics_port))
    streams = {
        code: after.get(key, 0) - before.get(key, 0)
        for code in ("OK", "CANCELLED")
        for key in [("bankd_requests_total", (("code", code), ("method", "SearchStream")))]
    }
    assert streams == {"OK": 1, "CANCELLED": 1}


def test_raw_stream_answers_every_request_and_continues_after_an_error(
    stub: Any, bank: Any, helpers: Any, server: Any
) -> None:
    """The contract below the client: one response per request, `error` on the bad one;
    each answer counted in bankd_requests_total by its own code, the stream once."""
    before = samples(scrape(server.metrics_port))
    qs = [bank.queries(2, seed=50 + i) for i in range(10)]
    requests = [
        pb.SearchRequest(keys=tensors.encode(q), k=3, request_id=f"r{i}") for i, q in enumerate(qs)
    ]
    requests[3].k = 0
    requests[6].keys.data = b"\x00" * 5
    responses = list(stub.SearchStream(iter(requests), timeout=30))
    by_id = {r.request_id: r for r in responses}
    assert len(responses) == len(requests) and set(by_id) == {f"r{i}" for i in range(10)}
    for i, q in enumerate(qs):
        r = by_id[f"r{i}"]
        if i in (3, 6):
            assert r.WhichOneof("outcome") == "error"
            assert r.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
            assert ("k=0" if i == 3 else "bytes") in r.error.message
        else:
            assert r.WhichOneof("outcome") == "result"
            hits = Hits.from_pb(r.result)
            assert hits.request_id == f"r{i}" and hits.values is None
            helpers.assert_topk(bank, q, 3, hits.ids, hits.scores)
    after = samples(scrape(server.metrics_port))
    counted = {
        (labels[1][1], labels[0][1]): value - before.get((name, labels), 0)
        for (name, labels), value in after.items()
        if name == "bankd_requests_total" and labels[1][1].startswith("SearchStream")
    }
    assert {k: v for k, v in counted.items() if v} == {
        ("SearchStream.message", "OK"): 8,
        ("SearchStream.message", "INVALID_ARGUMENT"): 2,
        ("SearchStream", "OK"): 1,
    }


# -- Fetch -----------------------------------------------------------------------------


def test_fetch_returns_values_and_keys_in_request_order(
    client: BankClient, bank: Any, helpers: Any
) -> None:
    rng = np.random.default_rng(0)
    ids = rng.choice(bank.ids, size=40, replace=False)
    ids = np.concatenate([ids, ids[:3]])  # repeats are answered too
    values = client.fetch(ids)
    np.testing.assert_array_equal(values, helpers.values_of(bank, ids))
    values, keys = client.fetch(ids.tolist(), with_keys=True)
    np.testing.assert_array_equal(values, helpers.values_of(bank, ids))
    rows = [bank.row_of[int(e)] for e in ids]
    assert keys.dtype == np.float32
    np.testing.assert_array_equal(keys, bank.keys[rows])


def test_fetch_torch_ids(client: BankClient, bank: Any, helpers: Any) -> None:
    torch = pytest.importorskip("torch")
    ids = torch.tensor(bank.ids[[5, 0, 9]])
    values = client.fetch(ids)
    assert isinstance(values, torch.Tensor) and values.dtype == torch.float16
    np.testing.assert_array_equal(values.numpy(), helpers.values_of(bank, bank.ids[[5, 0, 9]]))


@pytest.mark.parametrize("unknown", [5, 1001, 10**12, -1])
def test_fetch_unknown_id_is_not_found(
    client: BankClient, bank: Any, helpers: Any, unknown: int
) -> None:
    """5 is a row number but not an entry id; 1001 falls between two entry ids."""
    assert unknown not in bank.row_of
    with pytest.raises(NotFound, match=re.escape(str(unknown))):
        client.fetch([int(bank.ids[0]), unknown])
    assert_serving(client, bank, helpers)


# -- bad inputs: status code, message, and the server keeps serving ---------------------


def _search_request(bank: Any, **overrides: Any) -> pb.SearchRequest:
    q = bank.queries(4, seed=0)
    fields: dict[str, Any] = {"keys": tensors.encode(q), "k": 5}
    fields.update(overrides)
    return pb.SearchRequest(**fields)


BAD_CALLS: dict[str, tuple[Callable[[BankClient, Any, Any], Any], type, str]] = {
    "wrong key dimension": (
        lambda c, s, bank: c.search(np.ones((2, 16), np.float32), k=5),
        InvalidArgument,
        r"dimension 16.*32",
    ),
    "int64 keys": (
        lambda c, s, bank: call_raw(
            s.Search, _search_request(bank, keys=tensors.encode(np.ones((2, 32), np.int64)))
        ),
        InvalidArgument,
        r"int64",
    ),
    "unspecified dtype": (
        lambda c, s, bank: call_raw(
            s.Search,
            _search_request(bank, keys=raw_keys(bank.queries(2, seed=0), pb.DTYPE_UNSPECIFIED)),
        ),
        InvalidArgument,
        r"dtype",
    ),
    "1-D keys": (
        lambda c, s, bank: call_raw(
            s.Search, _search_request(bank, keys=tensors.encode(np.ones(32, np.float32)))
        ),
        InvalidArgument,
        r"\[B, d\]",
    ),
    "NaN key": (
        lambda c, s, bank: c.search(
            np.where(np.arange(32) == 3, np.nan, bank.queries(2, seed=0)).astype(np.float32), k=5
        ),
        InvalidArgument,
        r"NaN or inf",
    ),
    "inf key (float16)": (
        lambda c, s, bank: c.search(
            np.vstack([bank.queries(1, seed=0), np.full((1, 32), np.inf)]).astype(np.float16), k=5
        ),
        InvalidArgument,
        r"NaN or inf.*row 1",
    ),
    "k=0": (
        lambda c, s, bank: c.search(bank.queries(2, seed=0), k=0),
        InvalidArgument,
        r"k=0",
    ),
    "k over max_k": (
        lambda c, s, bank: c.search(bank.queries(2, seed=0), k=1025, with_values=False),
        InvalidArgument,
        r"k=1025.*1024",
    ),
    "negative k": (
        lambda c, s, bank: c.search(bank.queries(2, seed=0), k=-3),
        InvalidArgument,
        r"k=-3",
    ),
    "empty batch": (
        lambda c, s, bank: c.search(np.zeros((0, 32), np.float32), k=5),
        InvalidArgument,
        r"empty batch",
    ),
    "exclude count != B": (
        lambda c, s, bank: call_raw(
            s.Search, _search_request(bank, exclude=[pb.ExcludeIds(ids=[1]) for _ in range(3)])
        ),
        InvalidArgument,
        r"exclude has 3 lists for 4 queries",
    ),
    "too many excluded ids": (
        lambda c, s, bank: call_raw(
            s.Search,
            _search_request(bank, exclude=[pb.ExcludeIds(ids=range(1025))] + [pb.ExcludeIds()] * 3),
        ),
        InvalidArgument,
        r"1025.*1024",
    ),
    "byte count not matching shape": (
        lambda c, s, bank: call_raw(
            s.Search,
            _search_request(bank, keys=raw_keys(bank.queries(4, seed=0), data=b"\0" * 100)),
        ),
        InvalidArgument,
        r"100 bytes.*\[4, 32\].*512",
    ),
    "unknown fetch id": (
        lambda c, s, bank: c.fetch([int(bank.ids[0]), 999_999]),
        NotFound,
        r"999999",
    ),
    "fetch over the limit": (
        lambda c, s, bank: c.fetch(np.full(65_537, bank.ids[0])),
        InvalidArgument,
        r"65537 ids is over the fetch limit of 65536",
    ),
    "empty fetch": (
        lambda c, s, bank: c.fetch([]),
        InvalidArgument,
        r"at least one id",
    ),
    "embed without an encoder": (
        lambda c, s, bank: c.embed([b"\x89PNG not really"]),
        FailedPrecondition,
        r"no encoder",
    ),
}


@pytest.mark.parametrize("name", list(BAD_CALLS))
def test_bad_input_gets_status_and_message(
    name: str, client: BankClient, stub: Any, bank: Any, helpers: Any
) -> None:
    call, exc_type, message = BAD_CALLS[name]
    with pytest.raises(exc_type) as info:
        call(client, stub, bank)
    assert type(info.value) is exc_type
    assert re.search(message, str(info.value)), str(info.value)
    assert_serving(client, bank, helpers)


def test_exclude_rows_not_matching_batch_is_refused_by_the_client(
    client: BankClient, bank: Any
) -> None:
    with pytest.raises(ValueError, match="3 rows for a batch of 4"):
        client.search(bank.queries(4, seed=0), k=5, exclude_ids=[[1], [2], [3]])


def test_batch_over_the_limit(
    bank: Any, helpers: Any, server_factory: Any, client_factory: Any
) -> None:
    limits = dataclasses.replace(ServiceLimits(), max_batch=16)
    client = client_factory(server_factory(bank.path, limits=limits).port)
    assert client.info().max_batch == 16
    client.search(bank.queries(16, seed=0), k=5)
    with pytest.raises(InvalidArgument, match="batch of 17 queries is over the limit of 16"):
        client.search(bank.queries(17, seed=0), k=5)
    assert_serving(client, bank, helpers)


@pytest.fixture
def small_message_server(bank: Any, server_factory: Any) -> Any:
    limits = dataclasses.replace(ServiceLimits(), max_message_bytes=1 << 20)
    return server_factory(bank.path, limits=limits)


def test_oversize_message_is_resource_exhausted(
    small_message_server: Any, client_factory: Any, bank: Any, helpers: Any
) -> None:
    client = client_factory(small_message_server.port)
    assert client.info().max_message_bytes == 1 << 20
    big = np.tile(bank.queries(1, seed=0), (8192, 1))  # 1 MiB of float32 keys + framing
    with pytest.raises(ResourceExhausted):
        client.search(big, k=1, with_values=False)
    assert_serving(client, bank, helpers)


def test_response_over_the_message_limit_is_invalid_argument(
    small_message_server: Any, client_factory: Any, bank: Any, helpers: Any
) -> None:
    client = client_factory(small_message_server.port, split_batches=False, shared_memory=False)
    value_bytes = int(np.prod(bank.values.shape[1:])) * 2
    b = (1 << 20) // value_bytes + 1  # its values alone do not fit
    with pytest.raises(InvalidArgument, match="split the batch"):
        client.search(bank.queries(b, seed=0), k=1)
    assert_serving(client, bank, helpers)


def test_response_just_over_the_message_limit_is_refused_up_front(
    server_factory: Any, client_factory: Any, bank: Any, helpers: Any
) -> None:
    """Sizing counts ids, scores and framing too: either the answer fits and arrives, or
    the request is refused before searching (never RESOURCE_EXHAUSTED on the way out)."""
    value_bytes = int(np.prod(bank.values.shape[1:])) * 2
    b = 170
    limit = b * value_bytes + 100  # values fit; values + ids + scores (12 B a hit) do not
    limits = dataclasses.replace(ServiceLimits(), max_message_bytes=limit)
    port = server_factory(bank.path, limits=limits).port
    client = client_factory(port, split_batches=False, shared_memory=False)
    try:
        hits = client.search(bank.queries(b, seed=0), k=1)
    except InvalidArgument as e:
        assert "split the batch" in str(e)
    else:
        helpers.assert_topk(bank, bank.queries(b, seed=0), 1, hits.ids, hits.scores)
    assert_serving(client, bank, helpers)


def test_search_without_values_is_not_limited_by_value_bytes(
    small_message_server: Any, client_factory: Any, bank: Any, helpers: Any
) -> None:
    client = client_factory(small_message_server.port)
    q = bank.queries(1000, seed=0)  # B*k*value bytes = 30 MiB; the response is ~60 KiB
    hits = client.search(q, k=5, with_values=False)
    helpers.assert_topk(bank, q, 5, hits.ids, hits.scores)


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
    bank: Any, helpers: Any, server_factory: Any, client_factory: Any, monkeypatch: Any
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
    assert samples(scrape(srv.metrics_port))[("bankd_ready", ())] == 1
    client.wait_ready(timeout=5)
    assert_serving(client, bank, helpers)


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
    server: Any, client: BankClient, bank: Any, helpers: Any
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


def test_promtool_check_metrics(server: Any, client: BankClient, bank: Any) -> None:
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
    make_bank: Any, server_factory: Any
) -> None:
    parts = []
    for name in ("bank", "tinyalign_v2"):
        srv = server_factory(make_bank(n=20, d=4, name=name).path)
        found = samples(scrape(srv.metrics_port))
        parts.append({dict(lbl)["part"] for (n, lbl) in found if n == "bankd_bank_bytes"})
    assert parts[0] == parts[1]


# -- deadlines, concurrency limit, graceful stop ---------------------------------------


def test_tiny_deadline_is_deadline_exceeded(client: BankClient, bank: Any, helpers: Any) -> None:
    with pytest.raises(DeadlineExceeded):
        client.search(bank.queries(64, seed=0), k=50, timeout=1e-4)
    assert_serving(client, bank, helpers)


def test_deadline_passing_while_queued(
    bank: Any, helpers: Any, server_factory: Any, client_factory: Any
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
    assert_serving(client, bank, helpers)


def test_concurrency_limit_answers_resource_exhausted(
    bank: Any, helpers: Any, server_factory: Any, client_factory: Any
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
    assert_serving(client, bank, helpers)


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
