"""`bankd serve --threads N`: searches use N CPU threads (FAISS's OpenMP threads and
bankd's flat kernel's), and answer as with the default."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import faiss
import pytest

from bankd.cli import main
from bankd_client import BankClient


@pytest.fixture
def keep_omp_threads() -> Iterator[None]:
    """FAISS's thread count is process-wide: put it back for the tests after this one."""
    before = faiss.omp_get_max_threads()
    yield
    faiss.omp_set_num_threads(before)


def test_server_threads_reach_faiss_and_the_flat_kernel(
    bank: Any, server_factory: Any, client_factory: Any, helpers: Any, keep_omp_threads: None
) -> None:
    srv = server_factory(bank.path, threads=1)
    searcher = srv.servicer.service.searcher
    assert searcher.threads == faiss.omp_get_max_threads() == 1
    assert searcher.kernel is None or searcher.kernel.threads == 1
    assert "on 1 threads" in searcher.engine()
    q = bank.queries(16, seed=11)
    hits = client_factory(srv.port).search(q, k=5)
    helpers.assert_topk(bank, q, 5, hits.ids, hits.scores)


def test_faiss_search_on_the_set_threads(
    bank: Any, server_factory: Any, keep_omp_threads: None
) -> None:
    srv = server_factory(bank.path, threads=2, flat_search="faiss")
    engine = srv.servicer.service.searcher.engine()
    assert engine == "cpu, FAISS IndexFlatIP on 2 threads"


def test_faiss_threads_hold_in_the_thread_that_searches(
    bank: Any, server_factory: Any, keep_omp_threads: None
) -> None:
    """OpenMP's thread count is per calling thread: a search from another thread (as the
    server's handlers and merge thread are) runs FAISS on the threads asked for too."""
    faiss.omp_set_num_threads(2)
    srv = server_factory(bank.path, threads=1, flat_search="faiss")
    searcher = srv.servicer.service.searcher
    faiss.omp_set_num_threads(2)  # this thread's count, not the searcher's
    seen: list[int] = []

    def search() -> None:
        searcher.raw_search(bank.queries(4, seed=13), 5)
        seen.append(faiss.omp_get_max_threads())

    worker = threading.Thread(target=search)
    worker.start()
    worker.join()
    assert seen == [1]


def test_bankd_serve_threads_flag(bank: Any, serve: Any, helpers: Any) -> None:
    child = serve(bank.path, "--threads", "1").wait_ready()
    with BankClient(child.address, timeout=30) as client:
        q = bank.queries(8, seed=12)
        hits = client.search(q, k=4)
    helpers.assert_topk(bank, q, 4, hits.ids, hits.scores)
    child.stop()
    assert "on 1 threads" in child.output()


@pytest.mark.parametrize("flag", ["--threads", "--max-embed-pixels"])
def test_serve_refuses_a_count_below_one(
    bank: Any, flag: str, capsys: pytest.CaptureFixture
) -> None:
    assert main(["serve", "--index", str(bank.path), flag, "0"]) == 2
    assert f"{flag} must be >= 1" in capsys.readouterr().err
