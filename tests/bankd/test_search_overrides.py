"""Per-request nprobe / ef_search through a real server: defaults from the manifest,
overrides that change results, limits answered with INVALID_ARGUMENT, indexes without
the parameter, concurrent requests with different parameters (never merged into one
search), streams, and the sharded client passing them on."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bankd.search.shard import split_bank
from bankd.serve.service import ServiceLimits
from bankd_client import BankClient, InvalidArgument, ShardedBankClient


def recall(bank: Any, queries: np.ndarray, ids: np.ndarray, helpers: Any, k: int = 5) -> float:
    """Fraction of the exact top-k ids (brute force) that the hits hold."""
    exact = bank.ids[np.argsort(-helpers.brute_force(bank, queries), axis=1)[:, :k]]
    pairs = zip(ids.tolist(), exact.tolist(), strict=True)
    return float(np.mean([len(set(a) & set(b)) / k for a, b in pairs]))


@pytest.fixture
def ivf_bank(make_bank: Any) -> Any:
    """3000 x 32 clustered keys, IVF32,Flat tuned to a low target (small default nprobe)."""
    return make_bank(n=3000, d=32, index_factory="IVF32,Flat", recall_target=0.5)


@pytest.fixture
def ivf_client(ivf_bank: Any, server_factory: Any, client_factory: Any) -> BankClient:
    return client_factory(server_factory(ivf_bank.path).port)


def test_info_reports_the_tuned_default_and_limits(ivf_client: BankClient) -> None:
    info = ivf_client.info()
    assert info.index_type == "IVF32,Flat"
    assert 1 <= info.nprobe < 32 and info.max_nprobe == 32
    assert info.ef_search == info.max_ef_search == 0
    assert info.recall_k == 5 and 0.5 <= info.recall < 1


def test_nprobe_override_changes_recall(
    ivf_client: BankClient, ivf_bank: Any, helpers: Any
) -> None:
    q = ivf_bank.queries(64, seed=1)
    default = ivf_client.search(q, k=5, with_values=False)
    every_list = ivf_client.search(q, k=5, nprobe=32)
    helpers.assert_topk(ivf_bank, q, 5, every_list.ids, every_list.scores)  # exact
    np.testing.assert_array_equal(every_list.values, helpers.values_of(ivf_bank, every_list.ids))
    assert recall(ivf_bank, q, default.ids, helpers) < recall(ivf_bank, q, every_list.ids, helpers)
    # The override is for that request only: the next default search is the same as before.
    np.testing.assert_array_equal(ivf_client.search(q, k=5, with_values=False).ids, default.ids)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"nprobe": 33}, r"nprobe=33 is out of range; this bank takes 1\.\.32"),
        ({"nprobe": -1}, r"nprobe=-1 is out of range"),
        ({"ef_search": 16}, r"ef_search does not apply to this bank's index \(IVF32,Flat\)"),
    ],
)
def test_bad_overrides_are_invalid_argument_and_the_server_goes_on(
    ivf_client: BankClient, ivf_bank: Any, helpers: Any, kwargs: dict, message: str
) -> None:
    q = ivf_bank.queries(4, seed=2)
    with pytest.raises(InvalidArgument, match=message):
        ivf_client.search(q, k=5, **kwargs)
    with pytest.raises(InvalidArgument, match=message):
        list(ivf_client.stream_search([q], k=5, **kwargs))
    hits = ivf_client.search(q, k=5, nprobe=32)
    helpers.assert_topk(ivf_bank, q, 5, hits.ids, hits.scores)


def test_server_flag_caps_nprobe(ivf_bank: Any, server_factory: Any, client_factory: Any) -> None:
    srv = server_factory(ivf_bank.path, limits=ServiceLimits(max_nprobe=8))
    client = client_factory(srv.port)
    assert client.info().max_nprobe == 8
    client.search(ivf_bank.queries(2, seed=3), k=5, nprobe=8)
    with pytest.raises(InvalidArgument, match=r"1\.\.8"):
        client.search(ivf_bank.queries(2, seed=3), k=5, nprobe=9)


def test_flat_index_refuses_both(client: BankClient, bank: Any, helpers: Any) -> None:
    q = bank.queries(2, seed=4)
    for kwargs in ({"nprobe": 4}, {"ef_search": 64}):
        with pytest.raises(InvalidArgument, match="does not apply to this bank's index .Flat."):
            client.search(q, k=5, **kwargs)
    hits = client.search(q, k=5, nprobe=0, ef_search=None)  # 0 / None: the default
    helpers.assert_topk(bank, q, 5, hits.ids, hits.scores)


def test_ef_search_override_on_hnsw(
    make_bank: Any, server_factory: Any, client_factory: Any, helpers: Any
) -> None:
    bank = make_bank(n=3000, d=32, index_factory="HNSW4", recall_target=None)  # FAISS's 16
    client = client_factory(server_factory(bank.path).port)
    info = client.info()
    assert info.ef_search == 16 and info.max_ef_search == 1024 and info.max_nprobe == 0
    q = bank.queries(128, seed=5)
    low = client.search(q, k=5, ef_search=1, with_values=False).ids
    high = client.search(q, k=5, ef_search=512, with_values=False).ids
    assert recall(bank, q, low, helpers) < recall(bank, q, high, helpers)
    assert recall(bank, q, high, helpers) > 0.95
    with pytest.raises(InvalidArgument, match=r"ef_search=1025 is out of range"):
        client.search(q, k=5, ef_search=1025)
    with pytest.raises(InvalidArgument, match="nprobe does not apply"):
        client.search(q, k=5, nprobe=2)


def test_concurrent_requests_with_different_parameters(
    ivf_bank: Any, server_factory: Any, client_factory: Any
) -> None:
    """Requests in flight together get the results of their own nprobe: only requests
    with equal parameters share an index search."""
    srv = server_factory(ivf_bank.path, limits=ServiceLimits(merge_wait_s=0.01))
    client = client_factory(srv.port)
    settings = [None, 1, 2, 4, 8, 32]
    queries = [ivf_bank.queries(int(b), seed=10 + b) for b in range(1, 9)]
    alone = {
        (p, i): client.search(q, k=5, nprobe=p, with_values=False).ids
        for p in settings
        for i, q in enumerate(queries)
    }
    merged_before = srv.metrics.merged_rows._sum.get()
    failures: list[BaseException] = []
    barrier = threading.Barrier(len(settings))

    def worker(p: int | None) -> None:
        try:
            barrier.wait(timeout=10)
            for _ in range(3):
                for i, q in enumerate(queries):
                    got = client.search(q, k=5, nprobe=p, with_values=False).ids
                    np.testing.assert_array_equal(got, alone[(p, i)], err_msg=f"nprobe={p}")
        except BaseException as e:  # reported in the main thread
            failures.append(e)

    threads = [threading.Thread(target=worker, args=(p,)) for p in settings]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not failures, failures[0]
    assert srv.metrics.merged_rows._sum.get() - merged_before == 3 * len(settings) * 36
    # The stream path carries the parameter too.
    streamed = list(client.stream_search(queries, k=5, nprobe=32, with_values=False))
    for i, hits in enumerate(streamed):
        np.testing.assert_array_equal(hits.ids, alone[(32, i)])


def test_sharded_client_passes_overrides_to_every_shard(
    ivf_bank: Any, tmp_path: Path, server_factory: Any, helpers: Any
) -> None:
    paths = split_bank(ivf_bank.path, 2, tmp_path / "shards", align_rows=1)
    servers = [server_factory(p) for p in paths]
    with ShardedBankClient([f"127.0.0.1:{s.port}" for s in servers], timeout=30) as bank:
        info = bank.info()
        assert info.max_nprobe == min(i.max_nprobe for i in bank.shard_infos())
        assert info.recall == min(i.recall for i in bank.shard_infos())
        q = ivf_bank.queries(16, seed=6)
        hits = bank.search(q, k=5, nprobe=info.max_nprobe)  # every list of every shard
        helpers.assert_topk(ivf_bank, q, 5, hits.ids, hits.scores)
        (streamed,) = bank.stream_search([q], k=5, nprobe=info.max_nprobe, with_values=False)
        np.testing.assert_array_equal(streamed.ids, hits.ids)
        with pytest.raises(InvalidArgument, match=r"shard 0 of 2 .*nprobe=999"):
            bank.search(q, k=5, nprobe=999)
