"""Sharded banks: `bankd shard` splits a bank, one real server per shard, and
ShardedBankClient's answers equal the unsharded server's (ids, scores, values) exactly.

The bank (N=5000, d=32, Flat) is split into 4 shards of 1024, 1024, 2048 and 904 rows:
boundaries on multiples of FAISS's database block, which this module sets to 1024 for
its servers (bankd's own is 4096, too big for a small bank: see bankd.search.index), so
flat-search scores are bit-identical; servers accept k up to 4096, so a search may ask
for more hits than a shard holds.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from bankd.search import shard
from bankd.search.shard import shard_bounds, split_bank
from bankd.serve.service import ServiceLimits
from bankd.store.reader import Bank
from bankd.store.writer import write_bank
from bankd_client import (
    BankClient,
    EncoderFingerprint,
    EncoderMismatch,
    FailedPrecondition,
    Hits,
    InvalidArgument,
    NotFound,
    SearchQuery,
    ShardedBankClient,
    Unavailable,
)
from bankd_client.sharded import SEPARATE_VALUES_OVER, merge_hits

N, D = 5000, 32
LIMITS = ServiceLimits(max_k=4096)


def make_arrays(n: int, d: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Clustered unit keys, random fp16 values, entry ids that are not row numbers."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((40, d))
    keys = centres[rng.integers(0, 40, size=n)] + 0.5 * rng.standard_normal((n, d))
    keys = (keys / np.linalg.norm(keys, axis=1, keepdims=True)).astype(np.float32)
    values = rng.standard_normal((n, 32, 96), dtype=np.float32).astype(np.float16)
    ids = (10_000 + 3 * rng.permutation(n)).astype(np.int64)
    return keys, values, ids


def start_server(index: Path, **config: Any) -> Any:
    from bankd.serve.server import BankServer, ServerConfig

    config.setdefault("limits", LIMITS)
    cfg = ServerConfig(
        index=str(index),
        port=0,
        metrics_port=None,
        device="cpu",
        no_embed=True,
        verify=False,  # the split is checked against the arrays by test_shards_are_...
        **config,
    )
    return BankServer(cfg).start()


BLOCK = 1024  # FAISS's flat-search database block for this module's servers


@pytest.fixture(scope="module", autouse=True)
def flat_block() -> Iterator[None]:
    """A small block, so that a 5000-entry bank has aligned shards (process-wide)."""
    import faiss

    import bankd.search.index  # sets bankd's own block first

    assert faiss.cvar.distance_compute_blas_database_bs == bankd.search.index.FLAT_BLOCK_ROWS
    faiss.cvar.distance_compute_blas_database_bs = BLOCK
    yield
    faiss.cvar.distance_compute_blas_database_bs = bankd.search.index.FLAT_BLOCK_ROWS


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    """The bank, its shards (written by `bankd shard`), and a server for each."""
    root = tmp_path_factory.mktemp("sharding")
    keys, values, ids = make_arrays(N, D, seed=3)
    index = write_bank(root / "bank.faiss", keys, values, ids)
    # `bankd shard`'s own arguments and run (bankd.cli.main would import the build's
    # torch and transformers first: 10 s on a busy machine, for nothing tested here).
    parser = argparse.ArgumentParser()
    shard.add_arguments(parser)
    argv = ["--index", str(index), "--shards", "4", "--out", str(root), "--align-rows", str(BLOCK)]
    args = parser.parse_args(argv)
    assert shard.run(args) == 0
    shard_paths = sorted(root.glob("bank-*-of-4.faiss"))
    servers = [start_server(index)] + [start_server(p) for p in shard_paths]
    full = BankClient(f"127.0.0.1:{servers[0].port}", timeout=30)
    sharded = ShardedBankClient([f"127.0.0.1:{s.port}" for s in servers[1:]], timeout=30)
    try:
        yield SimpleNamespace(
            index=index,
            shards=shard_paths,
            keys=keys,
            values=values,
            ids=ids,
            servers=servers,
            full=full,
            sharded=sharded,
        )
    finally:
        full.close()
        sharded.close()
        for s in servers:
            s.stop(grace=0)


def queries(setup: SimpleNamespace, b: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    q = setup.keys[rng.integers(0, N, size=b)] + 0.3 * rng.standard_normal((b, D))
    return (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)


def assert_equal_hits(got: Hits, want: Hits) -> None:
    """Equal scores (bit for bit), ids and values; only within a run of exactly tied
    scores may ids differ in order, and there ours ascend."""
    np.testing.assert_array_equal(got.scores, want.scores)
    assert got.ids.dtype == np.int64 and got.scores.dtype == np.float32
    assert got.ids.shape == want.ids.shape
    for r in np.flatnonzero((got.ids != want.ids).any(axis=1)):
        s = want.scores[r]
        starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
        for lo, hi in zip(starts, [*starts[1:], len(s)], strict=True):
            g, w = got.ids[r, lo:hi], want.ids[r, lo:hi]
            if (g != w).any():
                assert hi - lo > 1, f"row {r}: ids differ at {lo} without a tie"
                assert (np.diff(g) > 0).all(), f"row {r}: tied ids {g} not ascending"
                if hi < len(s):  # a tie cut by k may keep other members of it
                    assert sorted(g) == sorted(w), f"row {r}: tied ids {g} != {w}"
    if want.values is None:
        assert got.values is None
        return
    same = got.ids == want.ids
    np.testing.assert_array_equal(got.values[same], want.values[same])
    for r, c in zip(*np.nonzero(~same), strict=True):
        (at,) = np.flatnonzero(want.ids[r] == got.ids[r, c])
        np.testing.assert_array_equal(got.values[r, c], want.values[r, at])


# -- the split --------------------------------------------------------------------------


def test_shards_are_contiguous_complete_banks(setup: SimpleNamespace) -> None:
    sizes = []
    for i, path in enumerate(setup.shards):
        bank = Bank.load(path)
        lo, hi = bank.manifest["config"]["shard"]["rows"]
        assert bank.manifest["config"]["shard"]["index"] == i
        assert bank.manifest["index_factory"] == "Flat" and bank.index.ntotal == hi - lo
        np.testing.assert_array_equal(bank.ids, setup.ids[lo:hi])  # entry ids kept
        np.testing.assert_array_equal(bank.keys, setup.keys[lo:hi])
        np.testing.assert_array_equal(bank.values, setup.values[lo:hi])
        sizes.append(hi - lo)
    assert sizes == [1024, 1024, 2048, 904]


def test_shard_bounds() -> None:
    assert shard_bounds(100_000, 4) == [0, 24576, 49152, 73728, 100_000]  # bankd's 4096
    assert shard_bounds(100_000, 4, align=1024) == [0, 24576, 50176, 74752, 100_000]
    assert shard_bounds(3000, 4) == [0, 750, 1500, 2250, 3000]  # too small to align: even
    assert shard_bounds(10, 3, align=1) == [0, 3, 6, 10]
    assert shard_bounds(7, 1) == [0, 7]
    with pytest.raises(ValueError, match="non-empty"):
        shard_bounds(3, 4)
    with pytest.raises(ValueError, match="at least 1"):
        shard_bounds(10, 0)


def test_split_keeps_factory_metadata_and_sources(tmp_path: Path) -> None:
    keys, values, ids = make_arrays(600, 16, seed=5)
    fp = EncoderFingerprint("enc", "c" * 64, "w" * 64)
    index = write_bank(
        tmp_path / "b.faiss",
        keys,
        values,
        ids,
        index_factory="HNSW16",
        vision_encoder=fp,
        key_function={"config": {"name": "attnpool"}, "weights": b"kf"},
        weights={"perceiver": b"pc"},
        source_ids=[f"s{i}" for i in range(600)],
    )
    paths = split_bank(index, 3, tmp_path / "shards")
    assert [p.name for p in paths] == ["b-0-of-3.faiss", "b-1-of-3.faiss", "b-2-of-3.faiss"]
    for i, p in enumerate(paths):
        bank = Bank.load(p)
        lo, hi = 200 * i, 200 * (i + 1)  # too small to align: an even split
        assert bank.manifest["index_factory"] == "HNSW16"
        assert bank.fingerprint("vision_encoder") == fp
        assert bank.key_function() == ({"name": "attnpool"}, b"kf")
        assert bank.weights("perceiver") == b"pc"
        assert bank.manifest["config"]["shard"]["align_rows"] == 1
        sources = (p.parent / f"b-{i}-of-3.sources.json").read_text()
        assert sources == str([f"s{j}" for j in range(lo, hi)]).replace("'", '"')
        np.testing.assert_array_equal(bank.ids, ids[lo:hi])


# -- search -----------------------------------------------------------------------------


@pytest.mark.parametrize("b", [3, 40])  # below and above FAISS's BLAS threshold (16)
@pytest.mark.parametrize("k", [1, 5, 64])
def test_search_equals_unsharded(setup: SimpleNamespace, b: int, k: int) -> None:
    q = queries(setup, b, seed=b * 100 + k)
    assert_equal_hits(setup.sharded.search(q, k=k), setup.full.search(q, k=k))


def test_search_with_exclusion_equals_unsharded(setup: SimpleNamespace) -> None:
    q = queries(setup, 40, seed=11)
    top = setup.full.search(q, k=4, with_values=False).ids
    rng = np.random.default_rng(0)
    # Each query loses its own best hits, ids of other shards, and an id nobody holds.
    exclude = [[*map(int, top[i]), *map(int, rng.choice(setup.ids, 5)), 7] for i in range(40)]
    got = setup.sharded.search(q, k=10, exclude_ids=exclude)
    assert_equal_hits(got, setup.full.search(q, k=10, exclude_ids=exclude))
    assert not any(np.isin(got.ids[i], exclude[i]).any() for i in range(40))


@pytest.mark.parametrize("separate_values_over", [None, 0])
def test_values_with_the_search_or_fetched_after(
    setup: SimpleNamespace, separate_values_over: int | None
) -> None:
    """None: values always come with each shard's answer; 0: always fetched after."""
    targets = [f"127.0.0.1:{s.port}" for s in setup.servers[1:]]
    q = queries(setup, 40, seed=16)
    exclude = [[int(setup.ids[i])] for i in range(40)]
    with ShardedBankClient(targets, separate_values_over=separate_values_over) as bank:
        for k in (1, 8):
            got = bank.search(q, k=k, exclude_ids=exclude)
            assert_equal_hits(got, setup.full.search(q, k=k, exclude_ids=exclude))


def test_k_larger_than_a_shard(setup: SimpleNamespace) -> None:
    """k=1500 > three shards' sizes: they return everything, padded; the merge is exact."""
    q = queries(setup, 40, seed=12)
    exclude = [list(map(int, setup.ids[4100 + i : 4400 + i])) for i in range(40)]  # last shard
    want = setup.full.search(q, k=1500, exclude_ids=exclude, with_values=False)
    got = setup.sharded.search(q, k=1500, exclude_ids=exclude, with_values=False)
    assert_equal_hits(got, want)
    q = q[:3]
    assert_equal_hits(setup.sharded.search(q, k=1100), setup.full.search(q, k=1100))
    gone = [int(setup.ids[0]), int(setup.ids[4999])]
    everything = setup.sharded.search(q[:1], k=N, exclude_ids=[gone])  # more than the full max_k
    assert sorted(everything.ids[0, :-2].tolist()) == sorted(set(setup.ids.tolist()) - set(gone))
    assert everything.ids[0, -2:].tolist() == [-1, -1]
    assert (everything.scores[0, -2:] == -np.inf).all() and not everything.values[0, -2:].any()
    rows = np.argsort(setup.ids)[np.searchsorted(np.sort(setup.ids), everything.ids[0, :-2])]
    np.testing.assert_array_equal(everything.values[0, :-2], setup.values[rows])


def test_torch_and_stream(setup: SimpleNamespace, helpers: SimpleNamespace) -> None:
    torch = pytest.importorskip("torch")
    q = queries(setup, 20, seed=13)
    hits = setup.sharded.search(torch.from_numpy(q), k=5)
    assert isinstance(hits.ids, torch.Tensor) and hits.values.dtype == torch.float16
    np.testing.assert_array_equal(hits.ids.numpy(), setup.full.search(q, k=5).ids)

    batches = [
        q[:8],
        SearchQuery(q[8:12], exclude_ids=[[int(setup.ids[0])]] * 4, k=3),
        q[12:],
        SearchQuery(q[:2], k=7),
    ]
    got = list(setup.sharded.stream_search(batches, k=5, window=2))
    want = list(setup.full.stream_search(batches, k=5))
    assert len(got) == len(want) == 4
    # Batches in flight together are merged into one FAISS search on each server, which
    # changes BLAS blocking: scores may move in the last bit, on either side.
    for g, w in zip(got, want, strict=True):
        helpers.assert_same_hits(g, w, atol=1e-6)


def test_bad_k_and_keys(setup: SimpleNamespace) -> None:
    q = queries(setup, 2, seed=14)
    with pytest.raises(InvalidArgument, match=r"k=0 is out of range; it must be 1\.\.5000"):
        setup.sharded.search(q, k=0)
    with pytest.raises(InvalidArgument, match="5001"):
        setup.sharded.search(q, k=N + 1)
    with pytest.raises(InvalidArgument, match=r"shard 0 of 4 \(127\.0\.0\.1:\d+\): keys have"):
        setup.sharded.search(np.zeros((2, D + 1), np.float32), k=1)


# -- batches over the message limit -----------------------------------------------------

B, K, MIB = 1024, 10, 1024 * 1024  # B x k values: 63 MB


def searches_answered(server: Any) -> float:
    sample = {"method": "Search", "code": "OK"}
    return server.metrics.registry.get_sample_value("bankd_requests_total", sample) or 0.0


@pytest.mark.parametrize("separate_values_over", [None, SEPARATE_VALUES_OVER])
def test_batch_over_the_message_limit_is_split(
    setup: SimpleNamespace, helpers: SimpleNamespace, separate_values_over: int | None
) -> None:
    """B=1024, k=10 with values under a 16 MiB client limit: the row chunks BankClient
    makes, each searched on every shard, joined in order: the unsharded answer."""
    limit = 16 * MIB
    targets = [f"127.0.0.1:{s.port}" for s in setup.servers[1:]]
    full = BankClient(f"127.0.0.1:{setup.servers[0].port}", timeout=60, max_message_bytes=limit)
    bank = ShardedBankClient(
        targets, timeout=60, max_message_bytes=limit, separate_values_over=separate_values_over
    )
    with full, bank:
        rows = bank.rows_per_call(K)
        assert rows == full.rows_per_call(K) and rows < B
        q = queries(setup, B, seed=18)
        exclude = [[int(setup.ids[i])] for i in range(B)]  # split along with the keys
        before = [searches_answered(s) for s in setup.servers[1:]]
        got = bank.search(q, k=K, exclude_ids=exclude)
        took = [searches_answered(s) - b for s, b in zip(setup.servers[1:], before, strict=True)]
        assert took == [-(-B // rows)] * 4  # every chunk went to every shard
        assert got.values.shape == (B, K, 32, 96)
        assert_equal_hits(got, full.search(q, k=K, exclude_ids=exclude))

        # A stream splits each batch over the limit, and hands back whole batches in order.
        torch = pytest.importorskip("torch")
        small = queries(setup, 5, seed=19)
        batches = [q, torch.from_numpy(small), SearchQuery(q, k=3)]
        streamed = list(bank.stream_search(batches, k=K, window=2))
        assert isinstance(streamed[1].ids, torch.Tensor)
        # Chunks in flight together may be merged into one search on a server, which
        # can move a score's last bit.
        for got, (keys, k) in zip(streamed, [(q, K), (small, K), (q, 3)], strict=True):
            helpers.assert_same_hits(got, full.search(keys, k=k), atol=1e-6)

        with pytest.raises(InvalidArgument, match=r"k=3000 .*over the 16777216-byte.*smaller k"):
            bank.search(q[:2], k=3000)  # not even one query's hits fit


def test_split_follows_the_lowest_shard_limit(setup: SimpleNamespace) -> None:
    """One shard's server allows 8 MiB: the sharded bank's limit, and the split's."""
    small = start_server(
        setup.shards[2], limits=dataclasses.replace(LIMITS, max_message_bytes=8 * MIB)
    )
    targets = [f"127.0.0.1:{s.port}" for s in (*setup.servers[1:3], small, setup.servers[4])]
    full_target = f"127.0.0.1:{setup.servers[0].port}"
    try:
        with (
            ShardedBankClient(targets, timeout=60) as bank,
            BankClient(full_target, timeout=60, max_message_bytes=8 * MIB) as full,
        ):
            assert bank.info().max_message_bytes == 8 * MIB
            assert bank.rows_per_call(K) == full.rows_per_call(K) < B // 4
            q = queries(setup, B, seed=20)
            assert_equal_hits(bank.search(q, k=K), full.search(q, k=K))
        with ShardedBankClient(targets, timeout=60, split_batches=False) as whole:
            assert whole.rows_per_call(K) is None
            with pytest.raises(InvalidArgument, match=r"8388608-byte message limit; split"):
                whole.search(q, k=K)  # as the unsharded server answers
    finally:
        small.stop(grace=0)


# -- a shard with replicas --------------------------------------------------------------


def test_a_shard_served_by_replicas(setup: SimpleNamespace) -> None:
    """Shard 0 behind one target naming two replicas of it, balanced round-robin: the
    same answers, and both replicas take calls."""
    twin = start_server(setup.shards[0])
    replicas = (setup.servers[1], twin)
    shard_0 = "ipv4:" + ",".join(f"127.0.0.1:{s.port}" for s in replicas)
    targets = [shard_0] + [f"127.0.0.1:{s.port}" for s in setup.servers[2:]]
    q = queries(setup, 8, seed=17)
    want = setup.full.search(q, k=5)
    before = [searches_answered(s) for s in replicas]
    try:
        with ShardedBankClient(targets, timeout=30, load_balancing="round_robin") as bank:
            assert bank.info().entries == N
            for _ in range(10):
                assert_equal_hits(bank.search(q, k=5), want)
    finally:
        twin.stop(grace=0)
    took = [searches_answered(s) - b for s, b in zip(replicas, before, strict=True)]
    assert sum(took) == 10 and min(took) > 0, took


# -- info and fetch ---------------------------------------------------------------------


def test_info(setup: SimpleNamespace) -> None:
    info, full = setup.sharded.info(), setup.full.info()
    assert info.entries == N
    for field in ("key_dim", "value_shape", "value_dtype", "metric", "index_type"):
        assert getattr(info, field) == getattr(full, field)
    assert info.max_k == N  # every shard answers k up to its size; together all N
    shard_infos = setup.sharded.shard_infos()
    assert [s.entries for s in shard_infos] == [1024, 1024, 2048, 904]
    assert info.bank_id not in {s.bank_id for s in shard_infos}
    fp = EncoderFingerprint("enc", "c" * 64, "w" * 64)
    assert setup.sharded.check_encoder(fp, allow_mismatch=True) == fp
    with pytest.raises(EncoderMismatch, match="records no vision encoder"):
        setup.sharded.check_encoder(fp)
    with pytest.raises(FailedPrecondition, match=r"shard 0 of 4 .*no encoder loaded"):
        setup.sharded.embed([b"not an image"])


def test_fetch(setup: SimpleNamespace) -> None:
    rng = np.random.default_rng(1)
    ids = rng.choice(setup.ids, 30, replace=False)
    ids = np.concatenate([ids, ids[:3]])  # repeated ids come back repeated
    values, keys = setup.sharded.fetch(ids, with_keys=True)
    want_values, want_keys = setup.full.fetch(ids, with_keys=True)
    np.testing.assert_array_equal(values, want_values)
    np.testing.assert_array_equal(keys, want_keys)
    one_shard = setup.ids[2000:2010]  # all in shard 2: answered by one round
    np.testing.assert_array_equal(setup.sharded.fetch(one_shard), setup.full.fetch(one_shard))
    with pytest.raises(NotFound, match=r"unknown entry ids: \[7\]"):
        setup.sharded.fetch([7])
    with pytest.raises(NotFound, match=r"unknown entry ids: \[7, 8\]"):
        setup.sharded.fetch([int(setup.ids[0]), 7, int(setup.ids[4999]), 8])


# -- shards that do not fit together, and a shard that is down ---------------------------


def test_mismatched_shards(setup: SimpleNamespace, tmp_path: Path) -> None:
    keys, values, ids = make_arrays(100, D, seed=9)
    fp = EncoderFingerprint("other", "c" * 64, "w" * 64)
    other_encoder = start_server(
        write_bank(tmp_path / "e.faiss", keys, values, ids + 1, vision_encoder=fp)
    )
    keys16, values16, ids16 = make_arrays(100, 16, seed=9)
    other_dim = start_server(write_bank(tmp_path / "d.faiss", keys16, values16, ids16))
    same_as_0 = start_server(setup.shards[0])
    good = [f"127.0.0.1:{s.port}" for s in setup.servers[1:3]]
    try:
        for server, error, match in [
            (
                other_encoder,
                EncoderMismatch,
                "encoder mismatch: shard 2 .* has vision_encoder other",
            ),
            (other_dim, FailedPrecondition, "shard 2 .* has key_dim 16, shard 0 .* has 32"),
            (same_as_0, FailedPrecondition, "shard 2 .* serves the same bank as shard 0"),
        ]:
            target = f"127.0.0.1:{server.port}"
            with ShardedBankClient([*good, target], timeout=30) as bank:
                with pytest.raises(error, match=match) as e:
                    bank.search(queries(setup, 2, seed=1), k=3)
                assert target in str(e.value)
    finally:
        for s in (other_encoder, other_dim, same_as_0):
            s.stop(grace=0)
    with pytest.raises(ValueError, match="listed twice"):
        ShardedBankClient([good[0], good[0]])


def test_a_shard_down_fails_the_call(setup: SimpleNamespace) -> None:
    spare = start_server(setup.shards[3])
    target = f"127.0.0.1:{spare.port}"
    targets = [f"127.0.0.1:{s.port}" for s in setup.servers[1:4]] + [target]
    q = queries(setup, 8, seed=15)
    with ShardedBankClient(targets, timeout=10, retry_attempts=2) as bank:
        assert_equal_hits(bank.search(q, k=5), setup.full.search(q, k=5))
        spare.stop(grace=0)
        pattern = rf"shard 3 of 4 \({target}\)"
        with pytest.raises(Unavailable, match=pattern):
            bank.search(q, k=5)
        with pytest.raises(Unavailable, match=pattern):
            bank.fetch([int(setup.ids[0]), int(setup.ids[4999])])
        with pytest.raises(Unavailable, match=pattern):
            bank.info(refresh=True)


# -- the merge on its own ----------------------------------------------------------------


def test_merge_orders_ties_by_id_and_pads_last() -> None:
    v = np.arange(8, dtype=np.float16).reshape(1, 2, 2, 2)
    a = Hits(np.array([[9, -1]]), np.array([[0.5, -np.inf]], np.float32), v)
    b = Hits(np.array([[4, 2]]), np.array([[0.5, 0.1]], np.float32), v + 10)
    m = merge_hits([a, b], 4)
    assert m.ids.tolist() == [[4, 9, 2, -1]]
    np.testing.assert_array_equal(m.scores, np.float32([[0.5, 0.5, 0.1, -np.inf]]))
    want = np.stack([v[0, 0] + 10, v[0, 0], v[0, 1] + 10, np.zeros_like(v[0, 0])])  # pad: 0
    np.testing.assert_array_equal(m.values[0], want)
    l2 = merge_hits([a, b], 3, metric="l2")  # distances: smallest first, padding still last
    assert l2.ids.tolist() == [[2, 4, 9]]
    short = merge_hits([Hits(np.array([[3]]), np.array([[1.0]], np.float32))], 2)
    assert short.ids.tolist() == [[3, -1]] and short.values is None
