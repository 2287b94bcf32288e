"""Tests of bankd.search.tuning: the factory choice by N, d and memory budget, recall
measured against exact search, tuning to a target, per-call search parameters, and
the manifest round trip of what the build chose and measured."""

from __future__ import annotations

from typing import Any

import faiss
import numpy as np
import pytest

from bankd.search import params, tuning
from bankd.search.index import Searcher, build_index
from bankd.search.tuning import RecallSample, choose_factory, parse_bytes, tune
from bankd.serve.service import BankService
from bankd.store.reader import Bank

IP = faiss.METRIC_INNER_PRODUCT
GIB = 2**30


@pytest.fixture(scope="module")
def ivf(bank: Any) -> Any:
    return build_index(bank.keys, "IVF32,Flat", seed=0)


@pytest.fixture(scope="module")
def sample(bank: Any) -> RecallSample:
    return RecallSample.from_keys(bank.keys, 5, IP, size=300, seed=0)


# -- choose_factory ------------------------------------------------------------------


def test_small_banks_are_flat() -> None:
    assert choose_factory(3000, 32, GIB).factory == "Flat"
    assert choose_factory(tuning.FLAT_MAX, 768, 8 * GIB).factory == "Flat"


def test_larger_banks_get_hnsw_when_the_graph_fits() -> None:
    choice = choose_factory(100_000, 768, 8 * GIB)
    assert choice.factory == "HNSW32"
    assert 100_000 * 768 * 4 < choice.estimated_bytes < 8 * GIB
    assert "HNSW" in choose_factory(tuning.FLAT_MAX + 1, 64, 8 * GIB).factory


def test_tighter_budgets_step_down_to_ivf_then_pq() -> None:
    flat = 100_000 * 768 * 4
    assert choose_factory(100_000, 768, flat + 10 * 2**20).factory == "IVF1024,Flat"
    pq = choose_factory(100_000, 768, 64 * 2**20)
    assert pq.factory.startswith("IVF1024,PQ") and pq.estimated_bytes <= 64 * 2**20
    m = int(pq.factory.split("PQ")[1].removesuffix("np"))
    assert 768 % m == 0
    smaller = choose_factory(100_000, 768, 16 * 2**20).factory
    assert int(smaller.split("PQ")[1].removesuffix("np")) < m  # less memory, shorter codes


def test_very_large_banks_use_ivf_not_a_graph() -> None:
    assert choose_factory(10_000_000, 256, 64 * GIB).factory == "IVF16384,Flat"


def test_a_small_bank_within_a_tiny_budget_is_compressed() -> None:
    assert "PQ" in choose_factory(5000, 64, 200_000).factory


def test_an_impossible_budget_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="no index .* fits a memory budget of 1000 bytes"):
        choose_factory(100_000, 768, 1000)


def test_ivf_lists_have_enough_training_points() -> None:
    for n in (1, 100, 5000, 100_000, 10**7):
        nlist = tuning.ivf_nlist(n)
        assert nlist >= 1 and (nlist == 1 or n >= 39 * nlist)
        assert nlist & (nlist - 1) == 0


@pytest.mark.parametrize(
    "text, value", [("8GiB", 8 * GIB), ("512MB", 512 * 10**6), ("1.5g", 1_500_000_000), ("42", 42)]
)
def test_parse_bytes(text: str, value: int) -> None:
    assert parse_bytes(text) == value


@pytest.mark.parametrize("text", ["lots", "-1GB", "0", "12XB"])
def test_parse_bytes_refuses_nonsense(text: str) -> None:
    with pytest.raises(ValueError):
        parse_bytes(text)


# -- recall and tuning -----------------------------------------------------------------


def test_recall_sample_excludes_each_query_itself(bank: Any, sample: RecallSample) -> None:
    assert sample.truth.shape == (300, 5)
    assert not (sample.truth == sample.own[:, None]).any()
    # Truth is the exact top-5 of the other keys.
    scores = sample.queries @ bank.keys.T
    scores[np.arange(300), sample.own] = -np.inf
    want = np.sort(-scores, axis=1)[:, :5]
    got = -np.take_along_axis(scores, sample.truth, axis=1)
    np.testing.assert_allclose(np.sort(got, axis=1), want, atol=1e-5)


def test_exact_index_has_recall_one(bank: Any, sample: RecallSample) -> None:
    assert sample.measure(build_index(bank.keys, "Flat")) == pytest.approx(1.0, abs=2e-3)


def test_tuning_reaches_the_target_with_the_smallest_nprobe(ivf: Any, sample: RecallSample) -> None:
    out = tune(ivf, sample, 0.95)
    nprobe = out["params"]["nprobe"]
    assert out["reached"] and out["recall"] >= 0.95
    below = [v for v in out["tried"] if v < nprobe]
    assert below and all(out["tried"][v] < 0.95 for v in below)
    assert ivf.nprobe == 1  # tuning leaves the index itself as it was


def test_tuning_hnsw_on_a_clustered_set(bank: Any, sample: RecallSample) -> None:
    out = tune(build_index(bank.keys, "HNSW4"), sample, 0.99)
    assert out["reached"] and out["recall"] >= 0.99
    assert set(out["params"]) == {"efSearch"}


def test_an_unreachable_target_is_reported_not_hidden(bank: Any, sample: RecallSample) -> None:
    index = build_index(bank.keys, "PCA4,IVF8,Flat", seed=0)
    out = tune(index, sample, 0.95)
    assert not out["reached"] and out["params"] == {"nprobe": 8} and out["recall"] < 0.95


def test_per_call_parameters_leave_the_index_alone(ivf: Any, bank: Any) -> None:
    q = bank.queries(64, seed=3)
    lone = ivf.search(q, 5)[1]
    wide = ivf.search(q, 5, params=params.search_parameters(ivf, {"nprobe": 32}))[1]
    assert ivf.nprobe == 1 and (lone != wide).any()
    np.testing.assert_array_equal(ivf.search(q, 5)[1], lone)
    with pytest.raises(ValueError, match="no search parameter"):
        params.search_parameters(ivf, {"efSearch": 8})


def test_searcher_per_call_params(ivf: Any, bank: Any, helpers: Any) -> None:
    s = Searcher(ivf, bank.keys, bank.ids, device="cpu", params={"nprobe": 2})
    assert s.tunable == {"nprobe": 32} and s.defaults == {"nprobe": 2}
    q = bank.queries(16, seed=4)
    res = s.search(q, 5, params={"nprobe": 32})  # every list: exact
    helpers.assert_topk(bank, q, 5, res.ids, res.scores)


# -- the bank's manifest ---------------------------------------------------------------


def test_auto_on_a_small_bank_writes_flat_with_recall_one(make_bank: Any) -> None:
    b = make_bank(n=300, d=16, index_factory="auto")
    m = Bank.load(b.path).manifest.to_dict()
    assert m["index_factory"] == "Flat" and m["index"]["requested"] == "auto"
    assert "exact" in m["index"]["reason"] and m["index"]["search_params"] == {}
    assert m["index"]["recall"]["value"] == 1.0 and m["index"]["bytes"] > 300 * 16 * 4


def test_manifest_round_trip_and_service_defaults(make_bank: Any) -> None:
    b = make_bank(n=3000, d=32, index_factory="IVF32,Flat", recall_target=0.9, recall_k=5)
    bank = Bank.load(b.path)
    idx = bank.manifest.to_dict()["index"]
    assert idx["factory"] == bank.manifest.index_factory == "IVF32,Flat"
    assert bank.search_params == idx["search_params"] and "nprobe" in bank.search_params
    assert bank.recall["k"] == 5 and bank.recall["value"] >= 0.9 and bank.recall["target"] == 0.9
    assert idx["bytes"] == bank.bytes_by_part()["index"]  # the serialized size is the file
    service = BankService(bank)
    try:
        assert service.searcher.defaults == bank.search_params
        info = service.info()
        assert info.nprobe == bank.search_params["nprobe"] and info.max_nprobe == 32
        assert info.ef_search == info.max_ef_search == 0
        assert info.recall == bank.recall["value"] and info.recall_k == 5
    finally:
        service.close()


def test_auto_chooses_by_the_budget_for_arrays(make_bank: Any) -> None:
    # A budget below the raw vectors: the writer compresses and still tunes and measures.
    b = make_bank(n=3000, d=32, index_factory="auto", memory_budget_bytes=200_000)
    idx = Bank.load(b.path).manifest.to_dict()["index"]
    assert "PQ" in idx["factory"] and idx["memory_budget_bytes"] == 200_000
    assert idx["recall"]["target"] == tuning.DEFAULT_RECALL_TARGET
    assert idx["bytes"] < 3000 * 32 * 4 and "nprobe" in idx["search_params"]


def test_explicit_factory_without_target_measures_at_faiss_defaults(make_bank: Any) -> None:
    b = make_bank(n=2000, d=16, index_factory="HNSW8", recall_target=None)
    idx = Bank.load(b.path).manifest.to_dict()["index"]
    assert idx["search_params"] == {"efSearch": 16} and idx["recall"]["target"] is None
    assert 0 < idx["recall"]["value"] <= 1
