"""The Bank protocol: BankClient, ShardedBankClient and LocalBank implement it, method
by method and parameter by parameter, and the check names what a class lacks."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from bankd.search.local import LocalBank
from bankd_client import Bank, BankClient, ShardedBankClient
from bankd_client.bank import conformance, protocol_methods

IMPLEMENTATIONS = [BankClient, ShardedBankClient, LocalBank]


def test_protocol_declares_the_shared_calls() -> None:
    assert protocol_methods() == [
        "info",
        "search",
        "stream_search",
        "fetch",
        "check_encoder",
        "wait_ready",
        "close",
        "__enter__",
        "__exit__",
    ]


@pytest.mark.parametrize("cls", IMPLEMENTATIONS, ids=lambda c: c.__name__)
def test_implementation_conforms(cls: type) -> None:
    assert conformance(cls) == []


def test_instances_are_banks(bank: Any, client: BankClient) -> None:
    local = LocalBank(bank.path)
    sharded = ShardedBankClient([client.target])  # no call made: nothing to connect to yet
    try:
        for impl in (client, sharded, local):
            assert isinstance(impl, Bank)
        # The same calls give the same answer through the protocol, here and remote.
        q = bank.queries(3, seed=5)
        for impl in (client, local):
            hits = _top(impl, q)
            np.testing.assert_array_equal(hits, _top(local, q))
    finally:
        sharded.close()
        local.close()


def _top(b: Bank, q: np.ndarray) -> np.ndarray:
    return np.asarray(b.search(q, k=4, with_values=False).ids)


class MissingStream:
    """A bank without stream_search: everything else as BankClient has it."""

    info = BankClient.info
    search = BankClient.search
    fetch = BankClient.fetch
    check_encoder = BankClient.check_encoder
    wait_ready = BankClient.wait_ready
    close = BankClient.close
    __enter__ = BankClient.__enter__
    __exit__ = BankClient.__exit__


class OtherSignatures(MissingStream):
    """Every method present, but three of them take other arguments."""

    def search(self, keys: Any, k: int = 10, *, with_values: bool = True) -> Any:
        raise NotImplementedError  # never called: only its signature is checked

    def stream_search(self, queries: Any, k: int = 5, *, timeout: float | None = None) -> Iterator:
        raise NotImplementedError

    def fetch(self, ids: Any, request_id: str, *, with_keys: bool = False, timeout=None) -> Any:
        raise NotImplementedError


def test_check_fails_for_a_class_missing_a_method() -> None:
    assert conformance(MissingStream) == ["MissingStream has no stream_search()"]
    assert not isinstance(MissingStream(), Bank)


def test_check_compares_parameters_not_only_names() -> None:
    problems = conformance(OtherSignatures)
    assert isinstance(OtherSignatures(), Bank)  # names alone pass isinstance
    assert "OtherSignatures.search: 'k' defaults to 10, not 5" in problems
    assert "OtherSignatures.search: has no parameter 'exclude_ids'" in problems
    assert "OtherSignatures.stream_search: has no parameter 'with_values'" in problems
    assert "OtherSignatures.fetch: requires 'request_id', which the protocol does not pass" in (
        problems
    )
    assert not any(
        p.startswith(("OtherSignatures.info", "OtherSignatures.close")) for p in problems
    )
