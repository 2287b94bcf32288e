"""Every exact flat-search engine gives the fp32 brute-force answer: identical ids and
scores on adversarial data (near ties around the k-th score, exact ties across the
bf16 engine's margin, keys and queries of very large and very small norm, exclusion).

The reference scores every key with the kernel's fp32 arithmetic
(``flat_kernel.rescore``: one fused multiply-add per element, in order) and orders by
score descending, then row ascending. Engines that a machine lacks skip here: the bf16
engine needs AMX or AVX-512-BF16, the kernel x86-64 with AVX2 and FMA.
"""

from __future__ import annotations

import numpy as np
import pytest

from bankd.search import bf16_search, flat_kernel
from bankd.search.engine_choice import EngineChoice, measure, merge_ranges
from bankd.search.index import Searcher, build_index
from bankd.search.topk import select

needs_kernel = pytest.mark.skipif(not flat_kernel.available(), reason="no flat kernel here")
needs_bf16 = pytest.mark.skipif(not bf16_search.available(), reason="no bf16 matrix units here")


def reference(keys: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """fp32 brute force: every row scored, best k by (score desc, row asc)."""
    b, n = len(queries), len(keys)
    rows = np.broadcast_to(np.arange(n, dtype=np.int64), (b, n))
    s = flat_kernel.rescore(keys, queries, np.ascontiguousarray(rows))
    order = np.lexsort((rows, -s), axis=-1)[:, :k]
    return np.take_along_axis(s, order, 1), np.take_along_axis(rows, order, 1)


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def near_ties(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Keys whose scores against each query differ by a few ulps around the k-th best,
    far inside the bf16 margin."""
    d = 64
    base = unit(rng.standard_normal((1, d)))
    keys = np.repeat(base, 400, 0) + rng.standard_normal((400, d)).astype(np.float32) * 1e-6
    keys = np.concatenate([keys, unit(rng.standard_normal((600, d)))]).astype(np.float32)
    queries = np.concatenate([base, unit(base + rng.standard_normal((5, d)) * 1e-3)])
    return keys[rng.permutation(len(keys))], queries.astype(np.float32)


def exact_ties(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Duplicated keys (equal scores, so the row decides) straddling the k-th place,
    and scores in a band as wide as the margin."""
    d = 48
    keys = unit(rng.standard_normal((300, d)))
    keys = np.concatenate([keys, keys[:50], keys[:50]])
    q = unit(rng.standard_normal((8, d)))
    top = keys[np.argsort(-(keys @ q[0]))[:3]]
    keys = np.concatenate([keys, np.repeat(top, 4, 0)]).astype(np.float32)
    return keys[rng.permutation(len(keys))], q


def wild_norms(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Keys and queries of norms from 1e-30 to 1e30 (bf16 keeps fp32's exponent range;
    the margin must hold at both ends) and a few subnormal elements."""
    d = 32
    keys = unit(rng.standard_normal((500, d)))
    keys *= (10.0 ** rng.uniform(-30, 30, (500, 1))).astype(np.float32)
    keys[:5, :3] = 1e-40  # subnormal elements
    queries = unit(rng.standard_normal((6, d)))
    queries *= np.array([[1e-30], [1e-10], [1.0], [1e10], [1e30], [3.0]], dtype=np.float32)
    return keys.astype(np.float32), queries.astype(np.float32)


def small_norm_band(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Most keys tiny (scores near 0, all within the margin of each other) and one huge:
    many candidates, the fallback to the fp32 kernel must still be exact."""
    d = 16
    keys = unit(rng.standard_normal((3000, d))) * np.float32(1e-3)
    keys[7] *= 1e6
    return keys.astype(np.float32), unit(rng.standard_normal((4, d)))


CASES = {
    "near_ties": near_ties,
    "exact_ties": exact_ties,
    "wild_norms": wild_norms,
    "small_norm_band": small_norm_band,
}


def engines(keys: np.ndarray) -> dict:
    kernel = flat_kernel.FlatKernel(keys, threads=2)
    found = {"kernel": kernel.search}
    if flat_kernel.avx512_available():
        found["kernel512"] = flat_kernel.FlatKernel(keys, threads=2, avx512=True).search
    if bf16_search.available():
        found["bf16"] = bf16_search.Bf16Search(keys, kernel, threads=2).search
    return found


@needs_kernel
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("k", [1, 5, 37])
def test_engines_match_brute_force(case: str, k: int) -> None:
    keys, queries = CASES[case](np.random.default_rng(3))
    want_s, want_r = reference(keys, queries, k)
    for name, search in engines(keys).items():
        got_s, got_r = search(queries, k)
        np.testing.assert_array_equal(got_r, want_r, err_msg=f"{name} rows, {case}")
        np.testing.assert_array_equal(got_s, want_s, err_msg=f"{name} scores, {case}")


@needs_kernel
def test_reference_is_fp32_brute_force() -> None:
    """The reference's scores agree with float64 products to fp32 accuracy (so they are
    inner products, not something the engines merely share)."""
    rng = np.random.default_rng(0)
    keys, queries = unit(rng.standard_normal((200, 24))), unit(rng.standard_normal((3, 24)))
    s, r = reference(keys, queries, 10)
    exact = np.take_along_axis(queries.astype(np.float64) @ keys.astype(np.float64).T, r, 1)
    np.testing.assert_allclose(s, exact, rtol=0, atol=1e-6)


@needs_bf16
@pytest.mark.parametrize("k", [1, 5, 100])
def test_bf16_large_k_and_batches(k: int) -> None:
    """More queries than one pass takes, k above the kernel's heap limit."""
    rng = np.random.default_rng(1)
    keys = unit(rng.standard_normal((2000, 40)))
    queries = unit(rng.standard_normal((bf16_search.CALL_QUERIES + 3, 40)))
    kernel = flat_kernel.FlatKernel(keys, threads=2)
    got = bf16_search.Bf16Search(keys, kernel, threads=2).search(queries, k)
    want = reference(keys, queries, k)
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_array_equal(got[0], want[0])


@needs_kernel
@pytest.mark.parametrize("flat_search", ["auto", "kernel", "faiss", "bf16"])
def test_searcher_exclusion_matches_brute_force(flat_search: str) -> None:
    """Exclusion of the query's own and its duplicates' ids, through the Searcher."""
    if flat_search == "bf16" and not bf16_search.available():
        pytest.skip("no bf16 matrix units here")
    keys, _ = exact_ties(np.random.default_rng(5))
    ids = np.arange(len(keys), dtype=np.int64) + 1000
    searcher = Searcher(build_index(keys, "Flat"), keys, ids, device="cpu", flat_search=flat_search)
    queries = keys[:6].copy()
    exclude = [[int(ids[i])] for i in range(6)]
    exclude[2] += [int(i) for i in ids[:40]]  # a long list, some of it in the top k
    got = searcher.search(queries, 5, exclude)
    s, r = reference(keys, queries, 5 + 41)
    want = select(ids, s, r, 5, exclude)
    # FAISS (pinned, or measured fastest on this tiny bank) sums in its own order and
    # orders ties its own way: scores to fp32 accuracy.
    if "faiss" in searcher.engine_label():
        np.testing.assert_allclose(got.scores, want.scores, rtol=1e-5)
        return
    np.testing.assert_array_equal(got.ids, want.ids)
    np.testing.assert_array_equal(got.scores, want.scores)


def test_margin_bound_covers_observed_error() -> None:
    """The bound's coefficient is above what bf16 rounding does to a worst-case-ish
    product (all elements equal, so every rounding has one sign)."""
    d = 512
    x = np.full(d, 1 + 2**-9 + 2**-12, dtype=np.float32)  # rounds down by ~0.3%
    xb = (x.view(np.uint32) + 0x7FFF + ((x.view(np.uint32) >> 16) & 1)) >> 16 << 16
    xr = xb.astype(np.uint32).view(np.float32).astype(np.float64)
    err = abs(float(xr @ xr) - float(x.astype(np.float64) @ x))
    bound = bf16_search.error_coefficient(d) * float(np.linalg.norm(x)) ** 2
    assert 0 < err <= bound
    assert bf16_search.error_coefficient(d) < 0.02  # the margin stays useful


def test_engine_choice_ranges() -> None:
    assert merge_ranges([(16, "kernel"), (128, "bf16")]) == ((45, "kernel"), (128, "bf16"))
    assert merge_ranges([(16, "bf16"), (128, "bf16")]) == ((128, "bf16"),)
    choice = EngineChoice(((45, "kernel"), (128, "bf16")))
    assert [choice.pick(b) for b in (1, 45, 46, 4096)] == ["kernel", "kernel", "bf16", "bf16"]
    assert choice.label() == "B<=45:kernel,bf16"


def test_measure_picks_the_faster_engine() -> None:
    keys = unit(np.random.default_rng(0).standard_normal((100, 8)))

    def slow(q: np.ndarray, k: int) -> None:
        np.linalg.matrix_power(np.eye(60), 200)  # measurable work

    choice = measure({"slow": slow, "fast": lambda q, k: None}, keys, batches=(2, 8))
    assert choice.label() == "fast"
    assert set(choice.seconds["slow"]) == {2, 8}
    # No time left after the largest size: it alone is measured, and it decides.
    short = measure({"slow": slow, "fast": lambda q, k: None}, keys, batches=(2, 8), budget_s=0)
    assert set(short.seconds["slow"]) == {8} and short.label() == "fast"
    with pytest.raises(ValueError, match="no engine"):
        measure({}, keys)


@needs_kernel
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("k", [1, 5, 37])
def test_torch_fp16_rerank_matches_brute_force(case: str, k: int) -> None:
    """The CUDA path's code on CPU tensors: fp16 keys choose candidates (small blocks,
    so many), the re-rank gives the fp32 answer."""
    torch = pytest.importorskip("torch")
    from bankd.search.torch_search import TorchFlatIndex

    keys, queries = CASES[case](np.random.default_rng(3))
    index = TorchFlatIndex(keys, "cpu", dtype=torch.float16, block_bytes=4 * 16 * 256)
    assert index.rerank
    got_s, got_r = index.search_numpy(queries, k)
    want_s, want_r = reference(keys, queries, k)
    np.testing.assert_array_equal(got_r, want_r)
    np.testing.assert_array_equal(got_s, want_s)


@pytest.mark.gpu
@needs_kernel
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("k", [5, 100])
def test_cuda_rerank_matches_brute_force(case: str, k: int) -> None:
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from bankd.search.torch_search import TorchFlatIndex

    keys, queries = CASES[case](np.random.default_rng(4))
    got_s, got_r = TorchFlatIndex(keys, "cuda").search_numpy(queries, k)
    want_s, want_r = reference(keys, queries, k)
    np.testing.assert_array_equal(got_r, want_r)
    np.testing.assert_array_equal(got_s, want_s)


@needs_bf16
def test_auto_measures_every_engine_here(monkeypatch: pytest.MonkeyPatch) -> None:
    """flat_search="auto" times FAISS, the kernel(s) and bf16 (on a bank this small only
    when told to consider bf16) and names its choice."""
    monkeypatch.setattr(bf16_search, "AUTO_MIN_ELEMENTS", 0)
    keys = unit(np.random.default_rng(2).standard_normal((3000, 32)))
    ids = np.arange(len(keys), dtype=np.int64)
    searcher = Searcher(build_index(keys, "Flat"), keys, ids, device="cpu")
    assert searcher.choice is not None
    assert {"faiss", "kernel", "bf16"} <= set(searcher.choice.seconds)
    assert searcher.engine_label() == searcher.choice.label()
    got = searcher.search(keys[:4], 5)
    assert (got.ids[:, 0] == ids[:4]).all()
