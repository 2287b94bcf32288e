"""A real bankd on port 0 and the real client: GetInfo, Search against brute force
(values, dtypes, torch, concurrent requests merged), exclusion, SearchStream ordering
under concurrency and its errors, Fetch.

Bad inputs are in test_server_errors.py; health, metrics, deadlines, the concurrency
limit and graceful stop in test_server_lifecycle.py.
"""

from __future__ import annotations

import dataclasses
import re
import threading
import time
from collections.abc import Callable
from typing import Any

import grpc
import numpy as np
import pytest

import bankd.serve.server
from bankd.serve.service import ServiceLimits
from bankd.store.reader import Bank
from bankd_client import (
    BankClient,
    Hits,
    InvalidArgument,
    NotFound,
    SearchQuery,
    tensors,
)
from bankd_client.proto import bankd_pb2 as pb

# -- GetInfo ---------------------------------------------------------------------------


def test_info_describes_the_bank(client: BankClient, bank: Any, server: Any) -> None:
    info = client.info(refresh=True)
    manifest = Bank.load(bank.path, verify=False).manifest
    assert info.entries == len(bank.ids)
    assert info.key_dim == bank.keys.shape[1]
    assert info.value_shape == bank.values.shape[1:]
    assert info.value_dtype == "float16"
    assert info.index_type == manifest.index_factory == "Flat"
    assert info.metric == "ip"
    assert info.max_k == 1024 and info.max_batch == ServiceLimits().max_batch
    assert info.max_message_bytes == ServiceLimits().max_message_bytes
    assert info.embed_available is False
    assert info.search_device == "cpu"
    # The exact engine(s) the server measured or was given, as the searcher names them.
    assert info.search_engine == server.servicer.service.searcher.engine_label()
    assert re.fullmatch(r"((B<=\d+:)?(faiss|kernel|kernel512|bf16),?)+", info.search_engine)
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
    client: BankClient,
    bank: Any,
    helpers: Any,
    server: Any,
    assert_serving: Callable[..., Any],
    samples: Callable[..., Any],
    scrape: Callable[..., Any],
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
    assert_serving(client, bank)
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
    stub: Any,
    bank: Any,
    helpers: Any,
    server: Any,
    samples: Callable[..., Any],
    scrape: Callable[..., Any],
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
    client: BankClient, bank: Any, unknown: int, assert_serving: Callable[..., Any]
) -> None:
    """5 is a row number but not an entry id; 1001 falls between two entry ids."""
    assert unknown not in bank.row_of
    with pytest.raises(NotFound, match=re.escape(str(unknown))):
        client.fetch([int(bank.ids[0]), unknown])
    assert_serving(client, bank)
