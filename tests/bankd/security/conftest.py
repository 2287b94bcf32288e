"""Fixtures of the security tests: the certificates (``certificates.py``), servers over
the shared bank with a given security config, clients that fail fast, and one call of
each MemoryBank rpc."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from certificates import Pki, make_pki

from bankd_client import BankClient


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def serve(server_factory: Callable[..., Any], bank: Any) -> Callable[..., Any]:
    """serve(**security config): a started server over the shared bank, no Embed."""

    def start(**config: Any) -> Any:
        return server_factory(bank.path, no_embed=True, metrics_port=None, **config)

    return start


@pytest.fixture
def connect(client_factory: Callable[..., Any]) -> Callable[..., BankClient]:
    """connect(server, **BankClient options): a client with no retries (fast refusals)."""

    def make(server: Any, **kwargs: Any) -> BankClient:
        kwargs.setdefault("retry_attempts", 1)
        kwargs.setdefault("timeout", 10.0)
        return client_factory(server.port, **kwargs)

    return make


@pytest.fixture
def every_rpc() -> Callable[[BankClient, Any], dict[str, Callable[[], Any]]]:
    """every_rpc(client, bank): one call of each MemoryBank rpc that needs only a bank."""

    def every_rpc(client: BankClient, bank: Any) -> dict[str, Callable[[], Any]]:
        q = bank.queries(2, seed=5)
        return {
            "GetInfo": lambda: client.info(refresh=True),
            "Search": lambda: client.search(q, k=3),
            "SearchStream": lambda: list(client.stream_search([q, q], k=3)),
            "Fetch": lambda: client.fetch(bank.ids[:2]),
        }

    return every_rpc
