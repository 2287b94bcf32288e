"""Tests of bankd.search.index: index building from factory strings, Searcher (exact on Flat,
exclusion on approximate indexes, padding when hits run out), select, gather_values."""

from __future__ import annotations

from typing import Any

import faiss
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bankd.search.index import MAX_K_CPU, Searcher, build_index, describe, gather_values
from bankd.search.topk import select


@pytest.fixture(scope="module")
def hnsw(bank: Any) -> Any:
    return build_index(bank.keys, "HNSW32")


@pytest.fixture(scope="module")
def ivf(bank: Any) -> Any:
    return build_index(bank.keys, "IVF16,Flat", seed=0)


def _exclusions(bank: Any, top: np.ndarray, seed: int, most: int = 20) -> list[list[int]]:
    """Per query: some of its own top hits plus random bank ids, at most `most` ids."""
    rng = np.random.default_rng(seed)
    out = []
    for row in top:
        own = row[: int(rng.integers(0, most - 4))].tolist()
        out.append(own + rng.choice(bank.ids, size=4).tolist())
    return out


# -- build_index -----------------------------------------------------------------------


def test_build_index_from_factory_strings(bank: Any) -> None:
    keys = bank.keys[:500]
    flat = build_index(keys, "Flat")
    assert flat.ntotal == 500 and flat.d == keys.shape[1]
    assert flat.metric_type == faiss.METRIC_INNER_PRODUCT
    assert "Flat" in describe(flat)
    assert build_index(keys, "Flat", "l2").metric_type == faiss.METRIC_L2
    assert "HNSW" in describe(build_index(keys, "HNSW16"))
    ivf = build_index(keys, "IVF4,Flat", seed=3)
    assert ivf.is_trained and ivf.ntotal == 500


def test_build_index_is_seeded(bank: Any) -> None:
    keys = bank.keys[:600]
    a = faiss.serialize_index(build_index(keys, "IVF8,Flat", train_sample=300, seed=1))
    b = faiss.serialize_index(build_index(keys, "IVF8,Flat", train_sample=300, seed=1))
    assert np.array_equal(a, b)


def test_build_index_refuses_bad_arguments(bank: Any) -> None:
    with pytest.raises(ValueError, match="factory string 'NoSuchIndex'"):
        build_index(bank.keys[:10], "NoSuchIndex")
    with pytest.raises(ValueError, match="unknown metric 'cosine'"):
        build_index(bank.keys[:10], "Flat", "cosine")


# -- Searcher --------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 5, 50])
def test_flat_search_is_exact(bank: Any, helpers: Any, k: int) -> None:
    searcher = Searcher(build_index(bank.keys, "Flat"), bank.keys, bank.ids, device="cpu")
    assert searcher.device == "cpu" and searcher.is_flat
    q = bank.queries(20, seed=k)
    result = searcher.search(q, k)
    helpers.assert_topk(bank, q, k, result.ids, result.scores)
    np.testing.assert_array_equal(bank.ids[result.rows], result.ids)  # rows match ids


def test_flat_search_with_exclusion_is_exact(bank: Any, helpers: Any) -> None:
    searcher = Searcher(build_index(bank.keys, "Flat"), bank.keys, bank.ids, device="cpu")
    q = bank.queries(30, seed=1)
    exclude = _exclusions(bank, searcher.search(q, 20).ids, seed=2)
    result = searcher.search(q, 10, exclude)
    assert (result.ids != -1).all()
    helpers.assert_topk(bank, q, 10, result.ids, result.scores, exclude)


def test_hnsw_never_returns_excluded_ids(bank: Any, hnsw: Any) -> None:
    searcher = Searcher(hnsw, bank.keys, bank.ids, device="cpu")
    assert not searcher.is_flat
    q = bank.queries(40, seed=3)
    for k in (1, 5, 50):
        exclude = _exclusions(bank, searcher.search(q, 20).ids, seed=k)
        result = searcher.search(q, k, exclude)
        assert result.ids.shape == (len(q), k)
        for i, row in enumerate(result.ids):
            assert not set(row.tolist()) & set(exclude[i]), f"query {i} got an excluded id"
        assert (result.ids != -1).all()
        assert (np.diff(result.scores, axis=1) <= 1e-6).all()  # best first
        np.testing.assert_array_equal(bank.ids[result.rows], result.ids)


def test_hnsw_search_params_are_applied(bank: Any, hnsw: Any) -> None:
    Searcher(hnsw, bank.keys, bank.ids, device="cpu", params={"efSearch": 77})
    assert faiss.downcast_index(hnsw).hnsw.efSearch == 77


def test_ivf_missing_hits_are_padded(bank: Any, ivf: Any) -> None:
    """nprobe=1 over 16 lists finds about N/16 candidates: the rest are -1 / -inf."""
    searcher = Searcher(ivf, bank.keys, bank.ids, device="cpu", params={"nprobe": 1})
    q = bank.queries(10, seed=4)
    k = 600  # more than one inverted list holds
    first = searcher.search(q, 5)
    exclude = [row[:3].tolist() for row in first.ids]
    result = searcher.search(q, k, exclude)
    missing = result.ids == -1
    assert missing.any(axis=1).all()
    for i in range(len(q)):
        n = int((~missing[i]).sum())
        assert not missing[i, :n].any(), "hits must come first, then padding"
        assert not set(result.ids[i].tolist()) & set(exclude[i])
    assert np.isneginf(result.scores[missing]).all() and (result.rows[missing] == -1).all()
    assert np.isfinite(result.scores[~missing]).all()
    values = gather_values(bank.values, result.rows)
    assert values.shape == (len(q), k, *bank.values.shape[1:])
    assert not values[missing].any()
    np.testing.assert_array_equal(values[~missing], bank.values[result.rows[~missing]])


def test_ivf_with_every_list_probed_is_exact(bank: Any, helpers: Any, ivf: Any) -> None:
    searcher = Searcher(ivf, bank.keys, bank.ids, device="cpu", params={"nprobe": 16})
    q = bank.queries(10, seed=5)
    exclude = _exclusions(bank, searcher.search(q, 20).ids, seed=6)
    result = searcher.search(q, 8, exclude)
    helpers.assert_topk(bank, q, 8, result.ids, result.scores, exclude)


def test_searcher_limits(bank: Any, make_bank: Any) -> None:
    small = make_bank(n=30, d=8)
    index = build_index(small.keys, "Flat")
    searcher = Searcher(index, small.keys, small.ids, device="cpu")
    assert searcher.max_k == 30 and searcher.n == 30 and searcher.d == 8
    big = Searcher(build_index(bank.keys, "Flat"), bank.keys, bank.ids, device="cpu")
    assert big.max_k == min(MAX_K_CPU, len(bank.ids))
    # Excluding more than the bank can spare leaves -1 padding, never an excluded id.
    result = searcher.search(small.keys[:1], 10, [small.ids[:25].tolist()])
    assert set(result.ids[0, :5].tolist()) == set(small.ids[25:].tolist())
    assert (result.ids[0, 5:] == -1).all()


def test_searcher_refuses_cuda_without_cuda(bank: Any) -> None:
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(ValueError, match="CUDA is not available"):
        Searcher(build_index(bank.keys[:10], "Flat"), bank.keys[:10], bank.ids[:10], device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("k", [5, 2048])
def test_cuda_search_matches_cpu(bank: Any, helpers: Any, k: int) -> None:
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    searcher = Searcher(build_index(bank.keys, "Flat"), bank.keys, bank.ids, device="cuda")
    assert searcher.device.startswith("cuda") and searcher.torch_index is not None
    q = bank.queries(64, seed=7)
    exclude = [[int(e)] for e in bank.ids[:64]]
    exclude[3] = bank.ids[100:140].tolist()  # a long list: fetch = k + 40
    result = searcher.search(q, k, exclude)
    assert (result.ids != -1).all()
    helpers.assert_topk(bank, q, k, result.ids, result.scores, exclude, atol=5e-3)


# -- the torch path (bankd.search.torch_search): blocks, group pre-selection, merges ------------


def _clustered(n: int, d: int, b: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Unit keys (n, d) around a few centres and unit queries (b, d) near some keys."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((16, d))
    keys = centres[rng.integers(16, size=n)] + 0.8 * rng.standard_normal((n, d))
    keys /= np.linalg.norm(keys, axis=1, keepdims=True)
    q = keys[rng.integers(n, size=b)] + 0.3 * rng.standard_normal((b, d))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    return keys.astype(np.float32), q.astype(np.float32)


def _assert_exact_topk(
    keys: np.ndarray,
    queries: np.ndarray,
    scores: np.ndarray,
    rows: np.ndarray,
    fetch: int,
    metric: str,
    atol: float,
) -> None:
    """(scores, rows) (B, fetch) are the best fetch of a float64 brute force, best first;
    rows whose reference score is within atol of the fetch-th one may swap (ties)."""
    ip = queries.astype(np.float64) @ keys.astype(np.float64).T  # (B, N)
    if metric == "l2":
        ref = (queries.astype(np.float64) ** 2).sum(1)[:, None] + (
            keys.astype(np.float64) ** 2
        ).sum(1)
        ref = ref - 2 * ip
        rank = -ref  # higher is better
    else:
        ref = rank = ip
    assert scores.shape == rows.shape == (len(queries), fetch)
    assert scores.dtype == np.float32 and rows.dtype == np.int64
    for i in range(len(queries)):
        assert len(set(rows[i].tolist())) == fetch, f"query {i}: repeated rows"
        np.testing.assert_allclose(scores[i], ref[i, rows[i]], atol=atol, rtol=1e-6)
        got = rank[i, rows[i]]
        assert (np.diff(got) <= atol).all(), f"query {i}: not best first"
        kth = np.sort(rank[i])[::-1][fetch - 1]
        assert got.min() >= kth - atol, f"query {i}: a hit below the {fetch}-th best"
        must = np.flatnonzero(rank[i] > kth + atol)
        assert set(must.tolist()) <= set(rows[i].tolist()), f"query {i}: a best hit missing"


@pytest.mark.parametrize("metric", ["ip", "l2"])
@pytest.mark.parametrize("fetch", [1, 7, 300])
def test_torch_search_blocks_are_exact_on_cpu(fetch: int, metric: str) -> None:
    """fp32 on the CPU: the block, group and merge logic against brute force."""
    torch = pytest.importorskip("torch")
    from bankd.search.torch_search import MERGE_EVERY, TorchFlatIndex, group_size

    keys, q = _clustered(20_011, 48, 16, seed=fetch)  # the last block is partial
    index = TorchFlatIndex(keys, "cpu", metric=metric, block_bytes=4 * 16 * 1000)
    assert index.keys.dtype == torch.float32
    assert 20_011 // 1000 > MERGE_EVERY  # candidates are merged on the way
    assert (group_size(fetch, 1000) > 1) == (fetch < 300)  # both selection paths run
    scores, rows = index.search_numpy(q, fetch)
    _assert_exact_topk(keys, q, scores, rows, fetch, metric, atol=1e-5)


def test_torch_search_refuses_bad_arguments() -> None:
    pytest.importorskip("torch")
    from bankd.search.torch_search import TorchFlatIndex

    keys, q = _clustered(50, 8, 2, seed=0)
    with pytest.raises(ValueError, match="unknown metric 'cos'"):
        TorchFlatIndex(keys, "cpu", metric="cos")
    bad = keys.copy()
    bad[7, 1] = np.nan
    with pytest.raises(ValueError, match="NaN or inf"):
        TorchFlatIndex(bad, "cpu")
    index = TorchFlatIndex(keys, "cpu")
    with pytest.raises(ValueError, match="fetch=51"):
        index.search_numpy(q, 51)
    with pytest.raises(ValueError, match=r"queries must be \[B, 8\]"):
        index.search_numpy(q[:, :4], 5)


@pytest.mark.gpu
@pytest.mark.parametrize("metric", ["ip", "l2"])
@pytest.mark.parametrize("fetch", [1, 6, 129, 2049])
@pytest.mark.parametrize("block_bytes", [4 * 64 * 4096, None])
def test_cuda_torch_search_is_exact_over_fp16_keys(
    fetch: int, metric: str, block_bytes: int | None
) -> None:
    """fp16 keys and queries, fp32 products: equal to a float64 brute force over the
    fp16-rounded inputs (ties aside), with many blocks and with the default one."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from bankd.search.torch_search import SCORE_BLOCK_BYTES, TorchFlatIndex

    keys, q = _clustered(50_000, 200, 64, seed=fetch)
    block_bytes = block_bytes or SCORE_BLOCK_BYTES
    index = TorchFlatIndex(keys, "cuda", metric=metric, block_bytes=block_bytes)
    assert index.keys.dtype == torch.float16 and index.nbytes() == 50_000 * 200 * 2
    scores, rows = index.search_numpy(q, fetch)
    rounded = (keys.astype(np.float16), q.astype(np.float16))
    _assert_exact_topk(*rounded, scores, rows, fetch, metric, atol=2e-5)


@pytest.mark.gpu
def test_cuda_torch_search_scales_keys_past_the_fp16_range() -> None:
    """Keys and queries far beyond fp16's 65504 (and far below its precision) still rank
    exactly: both are scaled by powers of two before rounding."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from bankd.search.torch_search import LOAD_ROWS, TorchFlatIndex

    keys, q = _clustered(LOAD_ROWS + 5000, 64, 32, seed=3)
    keys[:LOAD_ROWS] *= 1e6  # two load chunks with different scales
    keys[LOAD_ROWS:] *= 3e5
    q *= 1e-6
    index = TorchFlatIndex(keys, "cuda")
    assert torch.isfinite(index.keys).all() and index.keys.abs().max() <= 1
    scores, rows = index.search_numpy(q, 10)
    # The reference rounds the same power-of-two-scaled inputs to fp16.
    ks, qs = index.key_scale, 2.0 ** -np.ceil(np.log2(np.abs(q).max()))
    rounded_keys = (keys * ks).astype(np.float16).astype(np.float64) / ks
    rounded_q = (q * qs).astype(np.float16).astype(np.float64) / qs
    _assert_exact_topk(rounded_keys, rounded_q, scores, rows, 10, "ip", atol=2e-5)


# -- select (the exclusion filter) against a reference ----------------------------------


def _reference_select(
    ids_of_row: np.ndarray, scores: np.ndarray, rows: np.ndarray, k: int, exclude: Any
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    out_ids = np.full((len(rows), k), -1, np.int64)
    out_scores = np.full((len(rows), k), -np.inf, np.float32)
    out_rows = np.full((len(rows), k), -1, np.int64)
    for b in range(len(rows)):
        banned = set(exclude[b]) if exclude else set()
        j = 0
        for s, r in zip(scores[b], rows[b], strict=True):
            if j == k:
                break
            if r < 0 or int(ids_of_row[r]) in banned:
                continue
            out_ids[b, j], out_scores[b, j], out_rows[b, j] = ids_of_row[r], s, r
            j += 1
    return out_ids, out_scores, out_rows


@st.composite
def raw_hits(draw: Any) -> tuple[Any, ...]:
    n = draw(st.integers(1, 25))
    ids = np.array(draw(st.lists(st.integers(0, 10**6), min_size=n, max_size=n, unique=True)))
    b = draw(st.integers(1, 4))
    fetch = draw(st.integers(1, n))
    rows, scores = [], []
    for _ in range(b):
        found = draw(st.integers(0, fetch))
        perm = draw(st.permutations(list(range(n))))[:found]
        rows.append(perm + [-1] * (fetch - found))
        s = sorted(draw(st.lists(st.floats(-1, 1, width=32), min_size=found, max_size=found)))
        scores.append(s[::-1] + [-np.inf] * (fetch - found))
    k = draw(st.integers(1, fetch + 3))
    exclude = None
    if draw(st.booleans()):
        exclude = [
            draw(st.lists(st.one_of(st.sampled_from(ids.tolist()), st.integers(0, 10**6))))
            for _ in range(b)
        ]
    return ids, np.array(scores, np.float32), np.array(rows, np.int64), k, exclude


@settings(max_examples=200, deadline=None)
@given(raw_hits())
def test_select_matches_reference(case: tuple[Any, ...]) -> None:
    ids, scores, rows, k, exclude = case
    searcher = Searcher.__new__(Searcher)
    searcher.ids = ids
    got = searcher.select(scores, rows, k, exclude)
    want = _reference_select(ids, scores, rows, k, exclude)
    np.testing.assert_array_equal(got.ids, want[0])
    np.testing.assert_array_equal(got.scores, want[1])
    np.testing.assert_array_equal(got.rows, want[2])
    assert got.ids.dtype == np.int64 and got.scores.dtype == np.float32


@pytest.mark.parametrize("widest", [1, 3, 12, 40])
def test_select_paths_match_reference(widest: int) -> None:
    """Few drops per row (column shifts) and many (a stable sort); short exclusion lists
    (one broadcast comparison) and long ones (per-row isin); missing hits in between."""
    rng = np.random.default_rng(widest)
    ids = rng.permutation(10**6)[:300]
    rows = np.stack([rng.permutation(300)[:100] for _ in range(6)])
    rows[2, 60:] = -1  # an IVF that ran out of candidates
    scores = -np.sort(-rng.random(rows.shape, dtype=np.float32), axis=1)
    exclude = [ids[rng.choice(rows[i, :70], widest, replace=False)].tolist() for i in range(6)]
    exclude[4] = []
    for k in (1, 50, 99, 120):
        got = select(ids, scores, rows, k, exclude)
        want = _reference_select(ids, scores, rows, k, exclude)
        for a, b in zip((got.ids, got.scores, got.rows), want, strict=True):
            np.testing.assert_array_equal(a, b)


# -- gather_values ---------------------------------------------------------------------


def test_gather_values_keeps_order_and_zeroes_missing(bank: Any) -> None:
    rows = np.array([[7, 3, 7], [2999, 0, 1]])
    out = gather_values(bank.values, rows)
    assert out.shape == (2, 3, *bank.values.shape[1:]) and out.dtype == np.float16
    np.testing.assert_array_equal(out, bank.values[rows])
    rows[1, 1] = -1
    out = gather_values(bank.values, rows)
    assert not out[1, 1].any()
    np.testing.assert_array_equal(out[0], bank.values[[7, 3, 7]])
    np.testing.assert_array_equal(out[1, 2], bank.values[1])
