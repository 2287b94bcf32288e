"""Exact inner-product top-k on the CPU with bankd's own kernel (bankd/search/_flatip.c).

A Flat bank's search is one big multiply: B=128 queries over 100000 x 768 keys is
about 20 GFLOP. FAISS gives it to the BLAS it bundles, which packs every block of keys
into a layout of its own before multiplying and writes all B x N scores for a heap pass
to read back. The kernel multiplies from the keys where they lie (the index's own
vectors, in memory or memory-mapped) and keeps each query's best k as it goes, so it
runs at the machine's multiply rate: on the 2-core reference machine 123 ms against
FAISS's 150 ms for the batch above (bench/search_latency.py measures it).

Results are exact and do not depend on how the rows are split: each score is one fp32
sum of the d products in order, and ties go to the lower row. The kernel needs an
x86-64 CPU with AVX2 and FMA and a build that compiled it (setup.py; optional);
``available()`` says whether this process has one, and ``bankd.search.index.Searcher`` falls
back to FAISS where not.
"""

from __future__ import annotations

import ctypes
import importlib.util
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from functools import cache

import numpy as np

log = logging.getLogger(__name__)

TILE_QUERIES = 16  # queries per kernel tile (two AVX2 registers of fp32)
# Queries per kernel call: 8 tiles of packed queries (393 KB at d=768) stay in a core's
# L2 cache while the keys stream past; larger batches go through in such chunks.
CALL_QUERIES = 128
# Below this many multiply-adds a call is not split over threads (thread hand-off costs
# tens of microseconds; a 1000-row bank searched by 8 queries takes about that).
SPLIT_MIN_MACS = 1 << 22

# Up to this k the kernel's per-query heaps are cheap; beyond, heap insertions cost more
# than FAISS's block-wise selection saves (B=128 over 100000 x 768 keys on 2 cores:
# k=64 130 vs 168 ms, k=128 157 vs 148 ms, k=1024 242 vs 175 ms), so searchers send
# larger k to FAISS.
MAX_K = 64
# Who searches a flat index on the CPU (`bankd serve --flat-search`, Searcher's
# flat_search): the kernel where it runs, the kernel or an error, or FAISS.
FLAT_SEARCH = ("auto", "kernel", "faiss")

_P = ctypes.c_void_p
_I64 = ctypes.c_int64


@cache
def _library() -> ctypes.CDLL | None:
    spec = importlib.util.find_spec("bankd.search._flatip")
    if spec is None or not spec.origin:
        return None
    try:
        lib = ctypes.CDLL(spec.origin)
    except OSError as e:
        log.warning("bankd's flat-search kernel did not load (%s); FAISS searches", e)
        return None
    lib.bankd_flatip_supported.restype = ctypes.c_int
    lib.bankd_flatip_supported.argtypes = []
    lib.bankd_flatip_search.restype = ctypes.c_int
    lib.bankd_flatip_search.argtypes = [_P, _I64, _I64, _I64, _P, _I64, _I64, _P, _P]
    return lib if lib.bankd_flatip_supported() else None


def available() -> bool:
    """Whether the kernel was built and this CPU runs it (x86-64 with AVX2 and FMA)."""
    return _library() is not None


def pack_queries(queries: np.ndarray) -> np.ndarray:
    """[B, d] -> [ceil(B/16), d, 16] float32: each tile's 16 queries side by side per
    dimension, zeros past B (the layout the kernel reads)."""
    b, d = queries.shape
    tiles = -(-b // TILE_QUERIES)
    packed = np.zeros((tiles, TILE_QUERIES, d), dtype=np.float32)
    packed.reshape(-1, d)[:b] = queries
    return np.ascontiguousarray(packed.transpose(0, 2, 1))


class FlatKernel:
    """Exact top-k inner-product search over keys [N, d] float32 (C-contiguous; kept by
    reference, never copied), on up to ``threads`` threads."""

    def __init__(self, keys: np.ndarray, threads: int = 1) -> None:
        lib = _library()
        if lib is None:
            raise RuntimeError("bankd's flat-search kernel is not available on this machine")
        if keys.ndim != 2 or keys.dtype != np.float32 or not keys.flags.c_contiguous:
            raise ValueError(f"keys must be C-contiguous float32 [N, d], got {keys.dtype}")
        self._lib = lib
        self.keys = keys
        self.n, self.d = keys.shape
        self.threads = max(1, int(threads))
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)

    def _threads_for(self, b: int) -> int:
        if self.threads == 1 or self.n * b * self.d < SPLIT_MIN_MACS:
            return 1
        return min(self.threads, self.n)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Best k (scores [B, k] float32, rows [B, k] int64) of queries [B, d], by score
        descending then row ascending; rows past N are -1 with score -inf."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        b, d = queries.shape
        if d != self.d:
            raise ValueError(f"queries have dim {d}, keys {self.d}")
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        parts = self._threads_for(b)
        bounds = np.linspace(0, self.n, parts + 1).astype(np.int64)
        heap_s = np.full((parts, b, k), -np.inf, dtype=np.float32)
        heap_r = np.full((parts, b, k), -1, dtype=np.int64)
        chunks = [
            (q0, pack_queries(queries[q0 : q0 + CALL_QUERIES])) for q0 in range(0, b, CALL_QUERIES)
        ]
        keys_at = self.keys.ctypes.data

        def run(part: int) -> None:
            r0, r1 = int(bounds[part]), int(bounds[part + 1])
            for q0, packed in chunks:
                nq = min(CALL_QUERIES, b - q0)
                rc = self._lib.bankd_flatip_search(
                    keys_at, d, r0, r1, packed.ctypes.data, nq, k,
                    heap_s[part, q0:].ctypes.data, heap_r[part, q0:].ctypes.data,
                )  # fmt: skip
                if rc:
                    raise RuntimeError(f"bankd flat-search kernel failed ({rc})")

        self._run_parts(run, parts)
        scores = heap_s.transpose(1, 0, 2).reshape(b, parts * k)
        rows = heap_r.transpose(1, 0, 2).reshape(b, parts * k)
        order = np.lexsort((rows, -scores), axis=-1)[:, :k]
        return np.take_along_axis(scores, order, 1), np.take_along_axis(rows, order, 1)

    def _run_parts(self, run, parts: int) -> None:
        if parts == 1:
            run(0)
            return
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="bankd-flat")
        futures = [self._pool.submit(run, p) for p in range(1, parts)]
        try:
            run(0)  # this thread takes the first part
        finally:
            for f in futures:
                f.result()
