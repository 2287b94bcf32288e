"""Top-k maximum-inner-product search over a bank's keys, with exact exclusion.

The index is a FAISS factory string ("Flat" by default; "HNSW32", "IVF1024,Flat",
"IVF4096,PQ64" for large banks; ``bankd.search.tuning`` chooses one for "auto"). Its
search parameters (efSearch, nprobe) are set once when the bank loads, and a search
may override them for itself through FAISS SearchParameters. Where search runs:

* CPU: the FAISS index itself; a flat inner-product index with one of three exact
  engines: FAISS, bankd's own kernel (``bankd.search.flat_kernel``: multiplies from the
  index's vectors; x86-64 with AVX2 and FMA; k up to ``flat_kernel.MAX_K``), or bf16
  products on the CPU's matrix units with an exact fp32 re-rank
  (``bankd.search.bf16_search``; AMX or AVX-512-BF16). ``flat_search="auto"`` times
  those this machine has on the bank's own keys at load and takes the fastest for each
  batch size (``bankd.search.engine_choice``); the others pin one.
* CUDA with a FAISS GPU build: the index cloned to the GPU.
* CUDA without one: exact search with torch for flat indexes (``bankd.search.torch_search``:
  fp16 keys on the GPU, fp32 scores computed and reduced block by block, so memory
  stays bounded for any N); other index types stay on the CPU.

Exclusion (a training sample must not retrieve itself) is done by over-fetching
k + max(len(exclude)) hits and filtering, which is exact on every index type, GPU
ones included (FAISS GPU indexes ignore ID selectors).
"""

from __future__ import annotations

import glob
import logging
import os
import sys
from typing import Any

import faiss
import numpy as np

from bankd.search import bf16_search, flat_kernel
from bankd.search.engine_choice import EngineChoice, measure
from bankd.search.params import current_params, search_parameters, tunable
from bankd.search.topk import SearchResult, fetch_count, gather_values, select

log = logging.getLogger(__name__)

# faiss-cpu 1.15 ships a very high threshold, so a 128-query batch on a flat index
# takes a per-pair path about 6x slower than the matrix-multiply path. Any batch of
# more than a handful of queries should use BLAS.
faiss.cvar.distance_compute_blas_threshold = 16
# Flat search multiplies the queries with the keys 1024 rows at a time by default; 4096
# rows (12 MB of d=768 keys, within L3) keeps the multiply at the machine's sgemm rate:
# B=128 over 100000 x 768 keys 163 -> 149 ms on 2 cores (one numpy sgemm of the whole
# product: 148 ms), B=16 36 -> 34 ms, B=512 587 -> 534 ms.
FLAT_BLOCK_ROWS = 4096  # `bankd shard` aligns shard boundaries to it (bit-identical scores)
faiss.cvar.distance_compute_blas_database_bs = FLAT_BLOCK_ROWS

MAX_K_CPU = 4096
MAX_K_GPU = 2048  # FAISS GPU and our torch path both cap k here
METRICS = {"ip": faiss.METRIC_INNER_PRODUCT, "l2": faiss.METRIC_L2}
_TORCH_METRICS = {faiss.METRIC_INNER_PRODUCT: "ip", faiss.METRIC_L2: "l2"}


def build_index(
    keys: np.ndarray,
    factory: str,
    metric: str = "ip",
    *,
    train_sample: int = 100_000,
    seed: int = 0,
    ef_construction: int | None = None,
) -> Any:
    """FAISS index over keys [N, d] from a factory string; trained on a seeded sample.

    ef_construction: the build depth of the index's HNSW graph (its own, or its IVF
    quantizer's); None keeps FAISS's (40). A ValueError when the index has no graph.
    """
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r} (choose from {sorted(METRICS)})")
    n, d = keys.shape
    try:
        index = faiss.index_factory(d, factory, METRICS[metric])
    except RuntimeError as e:
        raise ValueError(f"bad FAISS factory string {factory!r}: {e}") from None
    if ef_construction is not None:
        graphs = hnsw_graphs(index)
        if not graphs:
            raise ValueError(
                f"ef_construction applies to HNSW indexes; {factory!r} has no HNSW graph"
            )
        if ef_construction < 1:
            raise ValueError(f"ef_construction must be >= 1, got {ef_construction}")
        for graph in graphs:  # before training: an HNSW quantizer is built by train()
            graph.efConstruction = int(ef_construction)
    if not index.is_trained:
        rng = np.random.default_rng(seed)
        rows = np.sort(rng.choice(n, size=min(n, train_sample), replace=False))
        index.train(np.ascontiguousarray(keys[rows], dtype=np.float32))
    chunk = 65_536
    for s in range(0, n, chunk):
        index.add(np.ascontiguousarray(keys[s : s + chunk], dtype=np.float32))
    return index


def hnsw_graphs(index: Any) -> list[Any]:
    """The HNSW graphs of an index: its own (under pre-transforms) or its IVF
    quantizer's; [] when it has none."""
    inner = faiss.downcast_index(index)
    while isinstance(inner, faiss.IndexPreTransform):
        inner = faiss.downcast_index(inner.index)
    if isinstance(inner, faiss.IndexIVF):
        inner = faiss.downcast_index(inner.quantizer)
    return [inner.hnsw] if isinstance(inner, faiss.IndexHNSW) else []


def write_index(index: Any, path: os.PathLike) -> None:
    faiss.write_index(index, str(path))


def read_index(path: os.PathLike, mmap: bool = False) -> Any:
    """The FAISS index at ``path``; ``mmap``: map its vector data (flat codes, IVF lists)
    read-only from the file instead of reading it into memory, so the page cache holds
    only what searches touch and a bank larger than RAM can be served (an HNSW graph
    and IVF centroids are still read)."""
    if not mmap:
        return faiss.read_index(str(path))
    flags = faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY  # IFC: IVF lists and flat codes
    return faiss.read_index(str(path), flags)


def describe(index: Any) -> str:
    """Short type name of a FAISS index (for logs and GetInfo)."""
    return type(faiss.downcast_index(index)).__name__


def _torch_cuda() -> Any | None:
    """torch, when it sees a CUDA device; else None.

    On Linux a machine without ``/dev/nvidia<N>`` has no CUDA device to find, and
    importing torch just to be told so costs `bankd serve` seconds and ~300 MB.
    """
    if sys.platform.startswith("linux") and not glob.glob("/dev/nvidia[0-9]*"):
        return None
    try:
        import torch
    except ImportError:
        return None
    return torch if torch.cuda.is_available() else None


def _flat_kernel(index: Any, required: bool, threads: int) -> Any | None:
    """bankd's flat kernel over a flat inner-product index's own vectors (no copy), or
    None: another index type, an empty index, or no kernel here (an error if required)."""
    flat = faiss.downcast_index(index)
    usable = isinstance(flat, faiss.IndexFlat) and flat.metric_type == faiss.METRIC_INNER_PRODUCT
    if not usable or not flat_kernel.available() or index.ntotal == 0:
        if required:
            why = "not available here" if usable else f"not for {describe(index)} indexes"
            raise ValueError(f"flat_search='kernel' asked for, but the kernel is {why}")
        return None
    # The index owns this memory (in RAM or mapped from its file); the searcher keeps
    # the index, so the view stays valid.
    n, d = index.ntotal, index.d
    keys = faiss.rev_swig_ptr(flat.get_xb(), n * d).reshape(n, d)
    return flat_kernel.FlatKernel(keys, threads=threads)


def _bf16_engine(kernel: flat_kernel.FlatKernel, required: bool) -> Any | None:
    """bf16 matrix-unit search over the kernel's keys with its re-rank, or None where
    the CPU has no bf16 units (an error if required)."""
    if not bf16_search.available():
        if required:
            raise ValueError(
                "flat_search='bf16' asked for, but this machine has no bf16 matrix units "
                "(AMX or AVX-512-BF16), AVX-512 candidate scan or torch"
            )
        return None
    return bf16_search.Bf16Search(kernel.keys, kernel, threads=kernel.threads)


def _faiss_gpus() -> int:
    return faiss.get_num_gpus() if hasattr(faiss, "StandardGpuResources") else 0


class Searcher:
    """Searches one bank's keys on the best device available.

    Args:
        index: the bank's FAISS index (labels are row numbers).
        keys: the bank's keys [N, d] (memory-mapped; used only by the torch path).
        ids: entry id of each row [N].
        device: "auto", "cpu", or "cuda[:n]".
        params: FAISS search parameters to set, e.g. {"efSearch": 64, "nprobe": 16}.
        flat_search: for a flat inner-product index on the CPU: "auto" (the engines
            this machine has, timed on the bank's keys; the fastest per batch size),
            or one pinned: "kernel", "bf16" (an error where they do not run), "faiss".
        key_copies: whether "auto" may consider engines that keep a copy of the keys
            in memory (bf16: half the fp32 keys' bytes, and torch); off for a bank
            served memory-mapped (`bankd serve --mmap-index`).
        threads: CPU threads one search may use: FAISS's OpenMP threads (a setting of
            the whole process), bankd's flat kernel's and the bf16 engine's scan and
            re-rank; None leaves FAISS's default (one per core).

    ``tunable`` names the parameter a search may override per call ({"efSearch": max}
    for HNSW, {"nprobe": nlist} for IVF, {} otherwise, and {} on a FAISS GPU index);
    ``defaults`` are the values searches use when they do not.
    """

    def __init__(
        self,
        index: Any,
        keys: np.ndarray,
        ids: np.ndarray,
        *,
        device: str = "auto",
        params: dict[str, Any] | None = None,
        flat_search: str = "auto",
        threads: int | None = None,
        key_copies: bool = True,
    ) -> None:
        if flat_search not in flat_kernel.FLAT_SEARCH:
            raise ValueError(
                f"flat_search must be one of {flat_kernel.FLAT_SEARCH}, got {flat_search!r}"
            )
        if threads is not None:
            if threads < 1:
                raise ValueError(f"threads must be >= 1, got {threads}")
            faiss.omp_set_num_threads(threads)
        self.threads = faiss.omp_get_max_threads()
        # OpenMP's thread count is per calling thread: the searching threads (handlers,
        # the merge thread) set it again before each FAISS search (_faiss_search).
        self._set_threads = threads is not None
        self.ids = ids
        self.n, self.d = index.ntotal, index.d
        self.is_flat = isinstance(faiss.downcast_index(index), faiss.IndexFlat)
        # A FAISS GPU build needs no torch; torch is imported only to search without one.
        faiss_gpus = _faiss_gpus() if device != "cpu" else 0
        torch = _torch_cuda() if device != "cpu" and not faiss_gpus else None
        if device.startswith("cuda") and not faiss_gpus and torch is None:
            raise ValueError(f"device {device!r} asked for, but CUDA is not available")
        self.device = "cpu"
        self.torch_index = None  # the torch path's keys, when it searches
        self._index = index
        if params:
            ps = faiss.ParameterSpace()
            for name, value in params.items():
                ps.set_index_parameter(index, name, value)
        if faiss_gpus or torch is not None:
            gpu = int(device.split(":")[1]) if ":" in device else 0
            if faiss_gpus:
                self._res = faiss.StandardGpuResources()
                self._index = faiss.index_cpu_to_gpu(self._res, gpu, index)
                self.device = f"cuda:{gpu}"
            elif self.is_flat and index.metric_type in _TORCH_METRICS:
                from bankd.search.torch_search import TorchFlatIndex

                metric = _TORCH_METRICS[index.metric_type]
                self.torch_index = TorchFlatIndex(keys, f"cuda:{gpu}", metric=metric)
                self.device = f"cuda:{gpu}"
            else:
                log.warning("no FAISS GPU build: %s index searched on the CPU", describe(index))
        self.kernel = None  # bankd.search.flat_kernel.FlatKernel, when it searches
        self.bf16 = None  # bankd.search.bf16_search.Bf16Search, when it searches
        self.choice: EngineChoice | None = None  # which engine answers which batch sizes
        if self.device == "cpu" and flat_search != "faiss":
            required = flat_search in ("kernel", "bf16")
            self.kernel = _flat_kernel(index, required, self.threads)
        big = key_copies and self.n * self.d >= bf16_search.AUTO_MIN_ELEMENTS
        if self.kernel is not None and (flat_search == "bf16" or flat_search == "auto" and big):
            self.bf16 = _bf16_engine(self.kernel, required=flat_search == "bf16")
        if flat_search == "bf16":
            self.kernel = None  # pinned: the kernel stays only as bf16's re-rank
        self.kernel512 = None  # the kernel's AVX-512 variant, measured against the rest
        if flat_search == "auto" and self.kernel is not None:  # more than one engine here
            if flat_kernel.avx512_available():
                keys = self.kernel.keys
                self.kernel512 = flat_kernel.FlatKernel(keys, self.kernel.threads, avx512=True)
            self.choice = measure(self._flat_engines(), self.kernel.keys)
        self.tunable = tunable(index) if self._index is index else {}
        self.defaults = current_params(index)
        self.max_k = min(MAX_K_GPU if self.device != "cpu" else MAX_K_CPU, self.n)

    def _flat_engines(self) -> dict[str, Any]:
        engines = {"faiss": self._faiss_search}
        if self.kernel is not None:
            engines["kernel"] = self.kernel.search
        if self.kernel512 is not None:
            engines["kernel512"] = self.kernel512.search
        if self.bf16 is not None:
            engines["bf16"] = self.bf16.search
        return engines

    def engine_label(self) -> str:
        """Short engine name for GetInfo and metric labels: "faiss", "kernel", "bf16",
        "torch", or a measured choice by batch size such as "B<=45:kernel,bf16"."""
        if self.choice is not None:
            return self.choice.label()
        if self.torch_index is not None:
            return "torch"
        if self.bf16 is not None:
            return "bf16"
        return "kernel" if self.kernel is not None else "faiss"

    def engine(self) -> str:
        """Where and with what searches run, for logs: e.g. "cpu, bankd flat kernel on 2
        threads (k <= 64)", "cuda:0, torch exact", "cpu, FAISS IndexHNSWFlat"."""
        if self.choice is not None:
            return (
                f"cpu, exact engines by batch size {self.choice.label()} on "
                f"{self.threads} threads (measured: "
                f"{self.choice.table()}; FAISS for k > {flat_kernel.MAX_K})"
            )
        if self.bf16 is not None:
            return f"cpu, bf16 matrix units + exact fp32 re-rank on {self.bf16.threads} threads"
        if self.kernel is not None:
            return (
                f"cpu, bankd flat kernel on {self.kernel.threads} threads "
                f"(k <= {flat_kernel.MAX_K}; FAISS above)"
            )
        if self.torch_index is not None:
            return f"{self.device}, torch exact"
        on = f" on {self.threads} threads" if self.device == "cpu" else ""
        return f"{self.device}, FAISS {describe(self._index)}{on}"

    def raw_search(
        self, queries: np.ndarray, fetch: int, params: dict[str, int] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Best `fetch` (scores, rows) per query [B, d] float32; rows are -1 where none.

        params overrides ``tunable`` parameters for this call only (FAISS
        SearchParameters; the shared index is not changed).
        """
        if self.torch_index is not None:
            return self.torch_index.search_numpy(queries, fetch)
        if self.choice is not None and fetch <= flat_kernel.MAX_K:  # flat: no parameters
            return self._flat_engines()[self.choice.pick(len(queries))](queries, fetch)
        if self.bf16 is not None and self.choice is None:  # pinned: any k
            return self.bf16.search(queries, fetch)
        if self.kernel is not None and fetch <= flat_kernel.MAX_K:
            return self.kernel.search(queries, fetch)
        sp = search_parameters(self._index, params) if params else None
        return self._faiss_search(queries, fetch, sp)

    def _faiss_search(
        self, queries: np.ndarray, fetch: int, sp: Any = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """FAISS's search on this thread, with the threads this searcher was given."""
        if self._set_threads:
            faiss.omp_set_num_threads(self.threads)
        return self._index.search(np.ascontiguousarray(queries, dtype=np.float32), fetch, params=sp)

    def select(
        self,
        scores: np.ndarray,
        rows: np.ndarray,
        k: int,
        exclude: list[list[int]] | None = None,
    ) -> SearchResult:
        """Top-k of raw hits [B, fetch] after dropping excluded ids (see topk.select)."""
        return select(self.ids, scores, rows, k, exclude)

    def search(
        self,
        queries: np.ndarray,
        k: int,
        exclude: list[list[int]] | None = None,
        params: dict[str, int] | None = None,
    ) -> SearchResult:
        """Top-k for queries [B, d], never returning an id in exclude[b] for row b."""
        scores, rows = self.raw_search(queries, fetch_count(k, exclude, self.n), params)
        return self.select(scores, rows, k, exclude)


__all__ = ["SearchResult", "Searcher", "build_index", "gather_values", "read_index", "write_index"]
