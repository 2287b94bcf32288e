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
back to FAISS where not. An AVX-512 variant (``FlatKernel(avx512=True)``) gives the same
scores bit for bit; ``rescore`` scores chosen rows with the same arithmetic (the exact
re-rank of ``bankd.search.bf16_search`` and of the torch CUDA path), and
``collect_candidates`` is that engine's AVX-512 candidate scan.
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
# flat_search): the fastest engine by measurement at load, or one pinned (an error
# where it does not run): the kernel, FAISS, or bf16 matrix units with an exact re-rank.
FLAT_SEARCH = ("auto", "kernel", "faiss", "bf16")

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
    lib.bankd_flatip_avx512.restype = ctypes.c_int
    lib.bankd_flatip_avx512.argtypes = []
    lib.bankd_flatip_search512.restype = ctypes.c_int
    lib.bankd_flatip_search512.argtypes = [_P, _I64, _I64, _I64, _P, _I64, _I64, _P, _P]
    lib.bankd_flatip_rescore.restype = ctypes.c_int
    lib.bankd_flatip_rescore.argtypes = [_P, _I64, _P, _I64, _P, _I64, _P]
    lib.bankd_bf16_supported.restype = ctypes.c_int
    lib.bankd_bf16_supported.argtypes = []
    lib.bankd_bf16_collect.restype = ctypes.c_int
    lib.bankd_bf16_collect.argtypes = [_P, _I64, _I64, _I64, _I64, _I64, _P, _P, _P, _P, _I64, _P]
    return lib if lib.bankd_flatip_supported() else None


def available() -> bool:
    """Whether the kernel was built and this CPU runs it (x86-64 with AVX2 and FMA)."""
    return _library() is not None


def avx512_available() -> bool:
    """Whether the kernel's AVX-512 variant runs here (``FlatKernel(avx512=True)``)."""
    lib = _library()
    return lib is not None and bool(lib.bankd_flatip_avx512())


def collect_available() -> bool:
    """Whether ``collect_candidates`` runs here (the kernel, and AVX-512 F/BW/VL)."""
    lib = _library()
    return lib is not None and bool(lib.bankd_bf16_supported())


def rescore(keys: np.ndarray, queries: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Exact fp32 scores [B, m] of rows [B, m] (int64; -1 gives -inf) for queries [B, d],
    bit-identical to the kernel's search scores (one fused multiply-add per element, in
    order)."""
    lib = _library()
    if lib is None:
        raise RuntimeError("bankd's flat-search kernel is not available on this machine")
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    rows = np.ascontiguousarray(rows, dtype=np.int64)
    if (
        keys.dtype != np.float32
        or not keys.flags.c_contiguous
        or keys.shape[1:] != queries.shape[1:]
    ):
        raise ValueError(
            f"keys {keys.dtype}{list(keys.shape)} do not fit queries {list(queries.shape)}"
        )
    if rows.shape[0] != queries.shape[0] or ((rows >= len(keys)).any()):
        raise ValueError(f"rows {list(rows.shape)} out of range for {len(keys)} keys")
    out = np.empty(rows.shape, dtype=np.float32)
    b, m = rows.shape
    rc = lib.bankd_flatip_rescore(
        keys.ctypes.data, keys.shape[1], queries.ctypes.data, b, rows.ctypes.data, m,
        out.ctypes.data,
    )  # fmt: skip
    if rc:
        raise RuntimeError(f"bankd rescore failed ({rc})")
    return out


def collect_candidates(
    scores: np.ndarray,
    row0: int,
    margin: np.ndarray,
    heap: np.ndarray,
    cand_scores: np.ndarray,
    cand_rows: np.ndarray,
    count: np.ndarray,
) -> None:
    """One block of bfloat16 scores [b, c] (as uint16 bits, rows row0..row0+c-1) into the
    running candidate state of its b queries (see bankd_bf16_collect in _flatip.c):
    heap [b, k] float32, cand_scores/cand_rows [b, cap], count [b] int64; all updated."""
    lib = _library()
    if lib is None or not lib.bankd_bf16_supported():
        raise RuntimeError("candidate collection needs the kernel and AVX-512 (F, BW, VL)")
    b, c = scores.shape
    assert scores.dtype == np.uint16 and scores.strides[1] == 2, scores.strides
    for a in (margin, heap, cand_scores, cand_rows, count):
        assert a.flags.c_contiguous and len(a) == b
    rc = lib.bankd_bf16_collect(
        scores.ctypes.data, scores.strides[0] // 2, c, row0, b, heap.shape[1],
        margin.ctypes.data, heap.ctypes.data, cand_scores.ctypes.data, cand_rows.ctypes.data,
        cand_scores.shape[1], count.ctypes.data,
    )  # fmt: skip
    if rc:
        raise RuntimeError(f"bankd candidate collection failed ({rc})")


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
    reference, never copied), on up to ``threads`` threads; ``avx512``: the AVX-512
    variant (12 keys x 16 queries per tile; the same scores, bit for bit)."""

    def __init__(self, keys: np.ndarray, threads: int = 1, *, avx512: bool = False) -> None:
        lib = _library()
        if lib is None:
            raise RuntimeError("bankd's flat-search kernel is not available on this machine")
        if avx512 and not lib.bankd_flatip_avx512():
            raise RuntimeError("this CPU has no AVX-512 for the kernel's AVX-512 variant")
        self._search_fn = lib.bankd_flatip_search512 if avx512 else lib.bankd_flatip_search
        self.avx512 = avx512
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
                rc = self._search_fn(
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
