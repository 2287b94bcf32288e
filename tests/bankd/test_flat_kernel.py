"""Tests of bankd.search.flat_kernel (the CPU flat-search kernel, bankd/search/_flatip.c) and of the
Searcher's choice between it and FAISS.

The kernel is built by setup.py where a C compiler is found and runs on x86-64 CPUs
with AVX2 and FMA; elsewhere these tests skip (and Searcher falls back to FAISS, which
the last tests check either way).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pytest

from bankd.search import flat_kernel
from bankd.search.flat_kernel import FlatKernel, pack_queries
from bankd.search.index import Searcher, build_index, read_index, write_index

needs_kernel = pytest.mark.skipif(
    not flat_kernel.available(),
    reason="bankd's flat kernel is not built here or the CPU lacks AVX2/FMA",
)


def _exact(keys: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k by float64 inner product, ties to the lower row; -inf / -1 past N."""
    s = queries.astype(np.float64) @ keys.astype(np.float64).T
    rows = np.broadcast_to(np.arange(len(keys)), s.shape)
    order = np.lexsort((rows, -s), axis=-1)[:, :k]
    scores, got = np.take_along_axis(s, order, 1), np.take_along_axis(rows, order, 1)
    pad = k - got.shape[1]
    if pad > 0:
        scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=-np.inf)
        got = np.pad(got, ((0, 0), (0, pad)), constant_values=-1)
    return scores, got


def _assert_exact(
    keys: np.ndarray, queries: np.ndarray, k: int, scores: np.ndarray, rows: np.ndarray
) -> None:
    """scores, rows are the top k of float64 search up to fp32 rounding: same scores,
    each row's own score, same rows wherever neighbouring scores are not near-ties."""
    b, d = queries.shape
    want_scores, want_rows = _exact(keys, queries, k)
    assert scores.shape == rows.shape == (b, k)
    assert scores.dtype == np.float32 and rows.dtype == np.int64
    atol = 1e-5 * np.sqrt(d)
    np.testing.assert_allclose(scores, want_scores, rtol=0, atol=atol)
    found = rows >= 0
    np.testing.assert_array_equal(found, want_rows >= 0)
    own = np.einsum("bd,bkd->bk", queries.astype(np.float64), keys[np.where(found, rows, 0)])
    np.testing.assert_allclose(np.where(found, own, -np.inf), scores, rtol=0, atol=atol)
    with np.errstate(invalid="ignore"):  # -inf - -inf past N: not a near-tie
        gaps = np.diff(np.pad(want_scores, ((0, 0), (1, 1)), constant_values=np.nan), axis=1)
    apart = ~(np.abs(gaps[:, :-1]) <= 2 * atol) & ~(np.abs(gaps[:, 1:]) <= 2 * atol)
    np.testing.assert_array_equal(rows[apart], want_rows[apart])
    for got in rows:
        assert len(set(got[got >= 0].tolist())) == int((got >= 0).sum()), "a row twice"


def _arrays(n: int, d: int, b: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (
        rng.standard_normal((n, d), dtype=np.float32),
        rng.standard_normal((b, d), dtype=np.float32),
    )


def test_pack_queries_layout() -> None:
    q = np.arange(3 * 20, dtype=np.float32).reshape(20, 3)  # 20 queries of d=3
    packed = pack_queries(q)
    assert packed.shape == (2, 3, 16) and packed.flags.c_contiguous
    np.testing.assert_array_equal(packed[0, :, 5], q[5])
    np.testing.assert_array_equal(packed[1, :, 3], q[19])
    assert not packed[1, :, 4:].any()  # padding past the last query


@needs_kernel
@pytest.mark.parametrize(
    ("n", "d", "b", "k"),
    [
        (1, 1, 1, 1),  # one key, one query
        (5, 3, 2, 8),  # fewer keys than k and than one 6-row tile: padded with -1
        (7, 33, 17, 3),  # a partial tile of keys and one of queries
        (1000, 32, 16, 5),
        (1003, 768, 130, 10),  # the reference dim; more queries than one kernel call
        (400, 1152, 300, 64),  # SigLIP-so400m's dim; three calls of queries; MAX_K
    ],
)
def test_kernel_is_exact(n: int, d: int, b: int, k: int) -> None:
    keys, queries = _arrays(n, d, b, seed=n + d)
    scores, rows = FlatKernel(keys, threads=1).search(queries, k)
    _assert_exact(keys, queries, k, scores, rows)
    missing = rows == -1
    assert missing.sum() == b * max(0, k - n) and np.isneginf(scores[missing]).all()


@needs_kernel
def test_thread_splits_give_identical_results() -> None:
    """Each score is one in-order fp32 sum, so splitting rows over threads (or shards)
    changes nothing, not even the last bit."""
    keys, queries = _arrays(5000, 96, 40, seed=3)
    one = FlatKernel(keys, threads=1).search(queries, 20)
    for threads in (2, 3, 7):
        kernel = FlatKernel(keys, threads=threads)
        assert kernel._threads_for(len(queries)) == threads  # really split
        got = kernel.search(queries, 20)
        np.testing.assert_array_equal(got[0], one[0])
        np.testing.assert_array_equal(got[1], one[1])
        kernel.close()
    # A shard's search over its rows gives the same scores as the whole bank's.
    shard = FlatKernel(keys[2000:], threads=2).search(queries, 20)
    common = 0
    for i in range(len(queries)):
        whole = dict(zip(one[1][i].tolist(), one[0][i].tolist(), strict=True))
        for row, score in zip(shard[1][i].tolist(), shard[0][i].tolist(), strict=True):
            if row + 2000 in whole:
                assert whole[row + 2000] == score
                common += 1
    assert common > 100


@needs_kernel
def test_ties_go_to_the_lower_row_whatever_the_split() -> None:
    base, queries = _arrays(50, 16, 9, seed=5)
    keys = np.concatenate([base] * 6)  # every key six times, at rows r, r+50, ...
    for threads in (1, 4):
        kernel = FlatKernel(keys, threads=threads)
        kernel_rows = kernel.search(queries, 12)[1]
        _, want = _exact(keys, queries, 12)
        np.testing.assert_array_equal(kernel_rows, want)
        kernel.close()


@needs_kernel
def test_kernel_refuses_bad_input() -> None:
    keys, queries = _arrays(20, 8, 3, seed=1)
    with pytest.raises(ValueError, match="C-contiguous float32"):
        FlatKernel(keys.astype(np.float64))
    with pytest.raises(ValueError, match="C-contiguous float32"):
        FlatKernel(np.asfortranarray(keys))
    kernel = FlatKernel(keys)
    with pytest.raises(ValueError, match="dim 9, keys 8"):
        kernel.search(np.zeros((2, 9), np.float32), 3)
    with pytest.raises(ValueError, match="k must be at least 1"):
        kernel.search(queries, 0)


# -- Searcher: kernel or FAISS ---------------------------------------------------------


@needs_kernel
def test_searcher_uses_the_kernel_on_flat_ip_and_agrees_with_faiss(bank: Any) -> None:
    index = build_index(bank.keys, "Flat")
    kernel = Searcher(index, bank.keys, bank.ids, device="cpu")
    plain = Searcher(index, bank.keys, bank.ids, device="cpu", flat_search="faiss")
    assert kernel.kernel is not None and "kernel" in kernel.engine()
    assert plain.kernel is None and "FAISS" in plain.engine()
    q = bank.queries(50, seed=11)
    exclude = [[int(bank.ids[i])] for i in range(50)]
    for k in (1, 5, flat_kernel.MAX_K - 1, flat_kernel.MAX_K + 10):  # the last one: FAISS
        a, b = kernel.search(q, k, exclude), plain.search(q, k, exclude)
        np.testing.assert_array_equal(a.ids, b.ids)
        np.testing.assert_allclose(a.scores, b.scores, rtol=0, atol=1e-5)


@needs_kernel
def test_searcher_kernel_reads_a_memory_mapped_index(bank: Any, tmp_path: Path) -> None:
    write_index(build_index(bank.keys, "Flat"), tmp_path / "flat.faiss")
    mapped = Searcher(read_index(tmp_path / "flat.faiss", mmap=True), bank.keys, bank.ids)
    assert mapped.kernel is not None
    q = bank.queries(8, seed=12)
    want = Searcher(build_index(bank.keys, "Flat"), bank.keys, bank.ids, flat_search="faiss")
    np.testing.assert_array_equal(mapped.search(q, 7).ids, want.search(q, 7).ids)


def test_searcher_keeps_faiss_where_the_kernel_does_not_apply(bank: Any) -> None:
    l2 = Searcher(build_index(bank.keys, "Flat", "l2"), bank.keys, bank.ids, device="cpu")
    hnsw = Searcher(build_index(bank.keys[:500], "HNSW8"), bank.keys, bank.ids, device="cpu")
    empty = Searcher(faiss.IndexFlatIP(bank.keys.shape[1]), bank.keys[:0], bank.ids[:0])
    assert l2.kernel is None and hnsw.kernel is None and empty.kernel is None
    with pytest.raises(ValueError, match="not for IndexHNSWFlat"):
        Searcher(build_index(bank.keys[:500], "HNSW8"), bank.keys, bank.ids, flat_search="kernel")
    with pytest.raises(ValueError, match="flat_search must be one of"):
        Searcher(build_index(bank.keys[:10], "Flat"), bank.keys, bank.ids, flat_search="blas")


def test_searcher_falls_back_when_the_kernel_is_missing(
    bank: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(flat_kernel, "available", lambda: False)
    index = build_index(bank.keys, "Flat")
    searcher = Searcher(index, bank.keys, bank.ids, device="cpu")
    assert searcher.kernel is None and "FAISS" in searcher.engine()
    with pytest.raises(ValueError, match="kernel is not available here"):
        Searcher(index, bank.keys, bank.ids, device="cpu", flat_search="kernel")
