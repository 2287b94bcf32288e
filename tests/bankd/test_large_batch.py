"""Large batches: a B=1024, k=10 search with values (about 63 MB of fp16 values) through
`bankd serve` with its default flags, over Search and SearchStream; responses over the
message limit split by the client into row chunks that fit, and refused with a message
that names the limit and the fix when splitting is off or cannot help.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import pytest

from bankd.serve.service import ServiceLimits
from bankd_client import BankClient, InvalidArgument, shm

B, K = 1024, 10
MIB = 1024 * 1024


@pytest.fixture
def big_bank(make_bank: Any) -> Any:
    """N=2000 entries, d=16, values (32, 96) fp16: small to search, big to answer."""
    return make_bank(n=2000, d=16, seed=5)


def assert_exact(
    bank: Any, queries: np.ndarray, hits: Any, helpers: Any, exclude: Any = None
) -> None:
    """Brute-force top-K ids and scores, and every hit's own value, bit for bit."""
    helpers.assert_topk(bank, queries, K, hits.ids, hits.scores, exclude)
    assert hits.values.shape == (len(queries), K, 32, 96) and hits.values.dtype == np.float16
    np.testing.assert_array_equal(hits.values, helpers.values_of(bank, hits.ids))


def searches_answered(srv: Any) -> float:
    sample = {"method": "Search", "code": "OK"}
    return srv.metrics.registry.get_sample_value("bankd_requests_total", sample) or 0.0


@pytest.mark.parametrize("shared_memory", [True, False], ids=["shared-memory", "message"])
def test_63_mb_of_values_with_default_flags(
    big_bank: Any, serve: Any, helpers: Any, shared_memory: bool
) -> None:
    proc = serve(big_bank.path).wait_serving()  # `bankd serve` as deployed: default flags
    queries = big_bank.queries(B, seed=1)
    with BankClient(proc.address, timeout=120, shared_memory=shared_memory) as client:
        assert client.info().max_message_bytes == 256 * MIB
        assert client.rows_per_call(K) >= B  # fits in one response: no split
        hits = client.search(queries, k=K)
        assert hits.values.nbytes == B * K * 32 * 96 * 2 > 62_000_000
        assert_exact(big_bank, queries, hits, helpers)
        assert client.shared_memory_in_use is (shared_memory and shm.available())

        second = big_bank.queries(B, seed=2)
        streamed = list(client.stream_search([queries, second], k=K))
        assert len(streamed) == 2
        assert_exact(big_bank, queries, streamed[0], helpers)
        assert_exact(big_bank, second, streamed[1], helpers)


@pytest.fixture
def limited_server(big_bank: Any, server_factory: Any) -> Any:
    """An in-process server whose message limit is 16 MiB (a quarter of the response)."""
    limits = dataclasses.replace(ServiceLimits(), max_message_bytes=16 * MIB)
    return server_factory(big_bank.path, limits=limits)


def test_client_splits_a_batch_over_the_servers_limit(
    big_bank: Any, limited_server: Any, client_factory: Any, helpers: Any
) -> None:
    client = client_factory(limited_server.port)
    rows = client.rows_per_call(K)
    assert rows < B and rows * K * 32 * 96 * 2 < 16 * MIB
    queries = big_bank.queries(B, seed=3)
    exclude = [[int(big_bank.ids[i])] for i in range(B)]  # split along with the keys
    before = searches_answered(limited_server)
    hits = client.search(queries, k=K, exclude_ids=exclude)
    assert searches_answered(limited_server) - before == math.ceil(B / rows)
    assert_exact(big_bank, queries, hits, helpers, exclude)

    # A stream splits each batch into messages and hands back whole batches, in order.
    small = big_bank.queries(5, seed=4)
    streamed = list(client.stream_search([queries, small, queries], k=K))
    for got, want in zip(streamed, (queries, small, queries), strict=True):
        assert_exact(big_bank, want, got, helpers)


def test_client_splits_to_its_own_lower_limit(
    big_bank: Any, server_factory: Any, client_factory: Any, helpers: Any
) -> None:
    client = client_factory(server_factory(big_bank.path).port, max_message_bytes=16 * MIB)
    queries = big_bank.queries(B, seed=5)
    assert_exact(big_bank, queries, client.search(queries, k=K), helpers)


def test_over_the_limit_without_splitting_is_a_clear_error(
    big_bank: Any, limited_server: Any, client_factory: Any, helpers: Any
) -> None:
    client = client_factory(limited_server.port, split_batches=False, shared_memory=False)
    queries = big_bank.queries(B, seed=6)
    with pytest.raises(InvalidArgument) as e:
        client.search(queries, k=K)
    message = str(e.value)
    for part in (f"{16 * MIB}-byte message limit", "--max-message-mb", "at most 272 queries"):
        assert part in message, message
    with pytest.raises(InvalidArgument, match="--max-message-mb"):
        list(client.stream_search([queries], k=K))
    # The server keeps serving, and the same batch split by the client goes through.
    split = client_factory(limited_server.port)
    assert_exact(big_bank, queries, split.search(queries, k=K), helpers)


def test_one_query_over_the_limit_names_k_and_the_limit(
    big_bank: Any, server_factory: Any, client_factory: Any
) -> None:
    limits = dataclasses.replace(ServiceLimits(), max_message_bytes=MIB)
    port = server_factory(big_bank.path, limits=limits).port
    queries = big_bank.queries(4, seed=7)  # k=200: 1.2 MB of values for one query
    with pytest.raises(InvalidArgument, match=rf"k=200 .*{MIB}-byte message limit.*smaller k"):
        client_factory(port).search(queries, k=200)  # refused before sending
    with pytest.raises(InvalidArgument, match=r"k=200 .*smaller k.*--max-message-mb"):
        client = client_factory(port, split_batches=False, shared_memory=False)
        client.search(queries, k=200)  # by the server
