"""Replicas of one bank behind one target: with load_balancing="round_robin" BankClient
sends calls to every address the target resolves to, and a replica that goes down
(drained by SIGTERM, or killed) drops out of the rotation while the others answer the
same hits; without it (gRPC's pick_first) a client sticks to one replica.

Three `bankd serve` children over one bank on loopback ports, reached through one
"ipv4:127.0.0.1:P0,127.0.0.1:P1,127.0.0.1:P2" target: what a Kubernetes headless
Service's DNS name resolves to. Who answered is read from each replica's /metrics.
"""

from __future__ import annotations

import argparse
import signal
import time
import urllib.request
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from bankd_client import BankClient, Hits
from bankd_client.credentials import add_connection_flags, connection_options

K = 5


def searches_answered(replica: Any) -> float:
    """bankd_requests_total{method="Search", code="OK"} from the replica's /metrics."""
    url = f"http://127.0.0.1:{replica.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as r:
        text = r.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "bankd_requests_total" and sample.labels == {
                "method": "Search",
                "code": "OK",
            }:
                return sample.value
    return 0.0


def assert_identical(got: Hits, want: Hits) -> None:
    np.testing.assert_array_equal(got.ids, want.ids)
    np.testing.assert_array_equal(got.scores, want.scores)
    np.testing.assert_array_equal(got.values, want.values)


@pytest.fixture
def replicas(make_bank: Any, serve: Callable[..., Any]) -> tuple[Any, list[Any]]:
    """The bank and three started `bankd serve` replicas of it, /metrics on free ports."""
    bank = make_bank(n=300, d=16, seed=11)
    procs = [serve(bank.path, "--metrics-port", "0", "--grace", "2") for _ in range(3)]
    for p in procs:  # started together above, so they load at the same time
        p.wait_ready()
        assert p.metrics_port, "no metrics port in the serving line"
    return bank, procs


def test_round_robin_over_replicas_and_failover(
    replicas: tuple[Any, list[Any]], serve: Callable[..., Any], helpers: Any
) -> None:
    bank, procs = replicas
    target = "ipv4:" + ",".join(p.address for p in procs)
    q = bank.queries(4, seed=1)

    with BankClient(target, timeout=30, load_balancing="round_robin") as client:
        client.wait_ready(timeout=10)
        want = client.search(q, k=K)
        helpers.assert_topk(bank, q, K, want.ids, want.scores)

        def search(n: int, up: list[Any]) -> list[float]:
            """n searches, all with the same answer; how many each replica in up took."""
            before = [searches_answered(p) for p in up]
            for _ in range(n):
                assert_identical(client.search(q, k=K), want)
            return [searches_answered(p) - b for p, b in zip(up, before, strict=True)]

        took = search(30, procs)
        assert sum(took) == 30 and min(took) > 0, f"calls per replica: {took}"

        # Drained: SIGTERM turns it NOT_SERVING, it finishes and exits; the rest answer.
        procs[0].proc.send_signal(signal.SIGTERM)
        assert procs[0].exit_code(timeout=30) == 0
        took = search(20, procs[1:])
        assert sum(took) == 20 and min(took) > 0, f"calls per replica: {took}"

        # Killed: no drain, the connection just drops; the last replica takes it all.
        procs[1].proc.kill()
        assert procs[1].exit_code(timeout=30) == -signal.SIGKILL
        assert search(10, procs[2:]) == [10]
        client.wait_ready(timeout=10)  # health: answered by a replica that is up

        # A replica back on its old address rejoins the rotation (gRPC reconnects it).
        back = serve(bank.path, "--metrics-port", "0", port=procs[0].port).wait_ready()
        deadline = time.monotonic() + 60
        while searches_answered(back) == 0:
            assert time.monotonic() < deadline, "the restarted replica got no call in 60 s"
            assert_identical(client.search(q, k=K), want)
            time.sleep(0.05)


@pytest.mark.parametrize("policy", [None, "pick_first"])
def test_pick_first_sticks_to_one_replica(
    replicas: tuple[Any, list[Any]], policy: str | None
) -> None:
    """The default: every call to the first address that connects."""
    bank, procs = replicas
    target = "ipv4:" + ",".join(p.address for p in procs)
    q = bank.queries(2, seed=2)
    before = [searches_answered(p) for p in procs]
    with BankClient(target, timeout=30, load_balancing=policy) as client:
        for _ in range(10):
            client.search(q, k=K, with_values=False)
    took = [searches_answered(p) - b for p, b in zip(procs, before, strict=True)]
    assert sorted(took) == [0, 0, 10], took


def test_lb_policy_flag_and_unknown_policies() -> None:
    parser = argparse.ArgumentParser()
    add_connection_flags(parser)
    args = parser.parse_args(["--lb-policy", "round_robin"])
    assert connection_options(args) == {"load_balancing": "round_robin"}
    assert connection_options(parser.parse_args([])) == {}
    with pytest.raises(ValueError, match="load_balancing must be one of"):
        BankClient("127.0.0.1:1", load_balancing="ring_hash")
