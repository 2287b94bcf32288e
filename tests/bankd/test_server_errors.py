"""A real bankd on port 0: the status code and message of every bad input (through the
typed client and the raw stub), and message-size limits; the server keeps serving
after each.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any

import grpc
import numpy as np
import pytest

from bankd.serve.service import ServiceLimits
from bankd_client import (
    BankClient,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    errors,
    tensors,
)
from bankd_client.proto import bankd_pb2 as pb


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
    name: str,
    client: BankClient,
    stub: Any,
    bank: Any,
    assert_serving: Callable[..., Any],
) -> None:
    call, exc_type, message = BAD_CALLS[name]
    with pytest.raises(exc_type) as info:
        call(client, stub, bank)
    assert type(info.value) is exc_type
    assert re.search(message, str(info.value)), str(info.value)
    assert_serving(client, bank)


def test_exclude_rows_not_matching_batch_is_refused_by_the_client(
    client: BankClient, bank: Any
) -> None:
    with pytest.raises(ValueError, match="3 rows for a batch of 4"):
        client.search(bank.queries(4, seed=0), k=5, exclude_ids=[[1], [2], [3]])


def test_batch_over_the_limit(
    bank: Any,
    server_factory: Any,
    client_factory: Any,
    assert_serving: Callable[..., Any],
) -> None:
    limits = dataclasses.replace(ServiceLimits(), max_batch=16)
    client = client_factory(server_factory(bank.path, limits=limits).port)
    assert client.info().max_batch == 16
    client.search(bank.queries(16, seed=0), k=5)
    with pytest.raises(InvalidArgument, match="batch of 17 queries is over the limit of 16"):
        client.search(bank.queries(17, seed=0), k=5)
    assert_serving(client, bank)


@pytest.fixture
def small_message_server(bank: Any, server_factory: Any) -> Any:
    limits = dataclasses.replace(ServiceLimits(), max_message_bytes=1 << 20)
    return server_factory(bank.path, limits=limits)


def test_oversize_message_is_resource_exhausted(
    small_message_server: Any,
    client_factory: Any,
    bank: Any,
    assert_serving: Callable[..., Any],
) -> None:
    client = client_factory(small_message_server.port)
    assert client.info().max_message_bytes == 1 << 20
    big = np.tile(bank.queries(1, seed=0), (8192, 1))  # 1 MiB of float32 keys + framing
    with pytest.raises(ResourceExhausted):
        client.search(big, k=1, with_values=False)
    assert_serving(client, bank)


def test_response_over_the_message_limit_is_invalid_argument(
    small_message_server: Any,
    client_factory: Any,
    bank: Any,
    assert_serving: Callable[..., Any],
) -> None:
    client = client_factory(small_message_server.port, split_batches=False, shared_memory=False)
    value_bytes = int(np.prod(bank.values.shape[1:])) * 2
    b = (1 << 20) // value_bytes + 1  # its values alone do not fit
    with pytest.raises(InvalidArgument, match="split the batch"):
        client.search(bank.queries(b, seed=0), k=1)
    assert_serving(client, bank)


def test_response_just_over_the_message_limit_is_refused_up_front(
    server_factory: Any,
    client_factory: Any,
    bank: Any,
    helpers: Any,
    assert_serving: Callable[..., Any],
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
    assert_serving(client, bank)


def test_search_without_values_is_not_limited_by_value_bytes(
    small_message_server: Any, client_factory: Any, bank: Any, helpers: Any
) -> None:
    client = client_factory(small_message_server.port)
    q = bank.queries(1000, seed=0)  # B*k*value bytes = 30 MiB; the response is ~60 KiB
    hits = client.search(q, k=5, with_values=False)
    helpers.assert_topk(bank, q, 5, hits.ids, hits.scores)
