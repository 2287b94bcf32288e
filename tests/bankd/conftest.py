"""Shared by the bankd tests that drive a real server: the raw stub, a check that it
still serves correctly, and its /metrics read as text and as samples."""

from __future__ import annotations

import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from bankd_client import BankClient
from bankd_client.proto import bankd_pb2_grpc as pb_grpc


@pytest.fixture(scope="module")
def stub(server: Any) -> Iterator[Any]:
    """The raw generated stub, for requests the typed client refuses to build."""
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    yield pb_grpc.MemoryBankStub(channel)
    channel.close()


@pytest.fixture
def assert_serving(helpers: Any) -> Callable[[BankClient, Any], None]:
    """assert_serving(client, bank): a good search succeeds and is right (the server
    survived whatever came before)."""

    def check(client: BankClient, bank: Any) -> None:
        q = bank.queries(3, seed=99)
        hits = client.search(q, k=5, with_values=False)
        helpers.assert_topk(bank, q, 5, hits.ids, hits.scores)

    return check


_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@pytest.fixture(scope="session")
def scrape() -> Callable[[int], str]:
    """scrape(port): the /metrics text of a server (straight to loopback, whatever proxy
    is set)."""

    def get(port: int) -> str:
        with _NO_PROXY.open(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            return r.read().decode()

    return get


@pytest.fixture(scope="session")
def samples() -> Callable[[str], dict[tuple[str, tuple[tuple[str, str], ...]], float]]:
    """samples(text): {(sample name, sorted labels): value} of a /metrics text."""

    def parse(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        out = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return out

    return parse
