"""The reference a remote bank is measured against: in-process FAISS on the bank's own
index file plus a numpy gather of the values from the memory-mapped values file, the
floor a remote bank can only approach.

The reference sets ``faiss.cvar.distance_compute_blas_threshold`` to the value the
server sets (``bankd.search.index``), so a batch search takes the BLAS path in both.
"""

from __future__ import annotations

import time
from pathlib import Path

import faiss
import numpy as np

from bankd.search.params import search_parameters
from bankd.store.paths import BankPaths

BLAS_THRESHOLD = 16  # the value bankd.search.index sets; faiss 1.15's default is far higher


class Reference:
    """In-process FAISS on the bank's index file + numpy gather from the values memmap."""

    def __init__(
        self, index_path: Path, params: dict[str, int] | None = None, block: int = 0
    ) -> None:
        paths = BankPaths(index_path)
        faiss.cvar.distance_compute_blas_threshold = BLAS_THRESHOLD
        if block:
            faiss.cvar.distance_compute_blas_database_bs = block
        self.index = faiss.read_index(str(index_path))
        # (N, 32, 96) fp16
        self.values = np.load(paths.file("values.npy"), mmap_mode="r", allow_pickle=False)
        self.ids = np.load(paths.file("ids.npy"), allow_pickle=False)  # (N,) int64
        # The same per-call parameters the bankd request carries (None: the index's own,
        # which a tuned bank's index file holds).
        self.params = search_parameters(self.index, params) if params else None

    def search(self, queries: np.ndarray, k: int) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        t0 = time.perf_counter()
        scores, rows = self.index.search(queries, k, params=self.params)  # (B, k) each
        t1 = time.perf_counter()
        ids = np.where(rows >= 0, self.ids[np.maximum(rows, 0)], -1)
        values = self.values[rows.reshape(-1)].reshape(*rows.shape, *self.values.shape[1:])
        t2 = time.perf_counter()
        times = {"search": t1 - t0, "gather": t2 - t1}
        return {"ids": ids, "scores": scores, "values": values}, times

    def settings(self) -> str:
        """The FAISS settings this process searches with."""
        return (
            f"faiss distance_compute_blas_threshold="
            f"{faiss.cvar.distance_compute_blas_threshold}, database block "
            f"{faiss.cvar.distance_compute_blas_database_bs}, "
            f"{faiss.omp_get_max_threads()} OpenMP threads"
        )


def tie_explained(ref_scores: np.ndarray, got_scores: np.ndarray) -> bool:
    """Whether two rows of scores hold the same values (ids then differ only by ties)."""
    return bool(np.allclose(np.sort(ref_scores), np.sort(got_scores), rtol=0, atol=1e-5))
