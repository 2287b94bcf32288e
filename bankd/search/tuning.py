"""Index choice: a FAISS factory string from N, d and a memory budget, search
parameters tuned to a recall target, and the index built and tuned (``build_tuned``).
Per-call search parameters are ``bankd.search.params``'.

``choose_factory`` follows autofaiss's order of preference, by the bytes the index
holds in memory (estimates; the built index's serialized size is what the manifest
records):

* ``Flat`` (exact) while N is small (``flat_max`` entries) and N * d * 4 fits;
* ``HNSW32`` while N <= ``hnsw_max`` and the vectors plus the graph fit (best recall
  per query cost on a CPU, no training);
* ``IVF{nlist},Flat`` when the vectors fit but the graph does not, or N is past
  ``hnsw_max`` (nlist about 4 sqrt(N), a power of two, at least 39 training points
  per list);
* ``IVF{nlist},PQ{m}np`` when even the vectors do not fit: the largest m (dividing
  d, 8-bit codes) whose codes fit the budget ("np": no polysemous training, which
  costs most of the build and serves a search mode bankd does not use).

``tune`` measures recall@k against exact search and picks the smallest efSearch
(HNSW) or nprobe (IVF) reaching the target. ``build_tuned`` does so for every
approximate index, "auto" or a factory string given by hand (an HNSW index left at
FAISS's efSearch 16 can fall far short: 0.86 on a 100k-entry bank), and sets HNSW's
build depth (efConstruction) when asked. The protocol mirrors how the bank is
used: queries are a seeded sample of the bank's own keys, each excluding itself
(a training sample never retrieves its own entry), so the truth of a query is the
exact top-k of the other N - 1 keys and the index is asked for k + 1 hits with the
query's own row dropped. Callers with real queries pass them instead (no exclusion).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np

from bankd.search.index import METRICS, build_index, hnsw_graphs
from bankd.search.params import EF_SEARCH_MAX, current_params, search_parameters, tunable

log = logging.getLogger(__name__)

AUTO = "auto"
DEFAULT_MEMORY_BUDGET = 8 << 30  # bytes
DEFAULT_RECALL_TARGET = 0.95
DEFAULT_RECALL_K = 5
FLAT_MAX = 20_000  # exact search on fewer entries costs about what an ANN search does
HNSW_MAX = 2_000_000  # past this, building the graph takes too long: IVF
HNSW_M = 32
EF_SEARCH_LADDER = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, EF_SEARCH_MAX)
NPROBE_LADDER = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 1024)
PQ_M = (192, 128, 96, 64, 48, 32, 24, 16, 12, 8, 4, 2, 1)  # preferred sub-quantizer counts
# FAISS's ParameterSpace names, as stored in the manifest, and the request fields.


@dataclass(frozen=True)
class IndexChoice:
    """What choose_factory picked, why, and its estimated size in memory."""

    factory: str
    reason: str
    estimated_bytes: int


def parse_bytes(text: str | int) -> int:
    """'8GiB', '512MB', '1.5G' or a plain number of bytes."""
    if isinstance(text, int):
        return text
    units = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6}
    units |= {"mib": 2**20, "g": 10**9, "gb": 10**9, "gib": 2**30, "t": 10**12, "tb": 10**12}
    units |= {"tib": 2**40}
    s = text.strip().lower().replace(" ", "")
    num = s.rstrip("kmgtib")
    unit = s[len(num) :]
    if unit not in units or not num:
        raise ValueError(f"cannot read {text!r} as a size (e.g. 8GiB, 512MB, 1000000)")
    value = float(num) * units[unit]
    if value <= 0:
        raise ValueError(f"a memory budget must be positive, got {text!r}")
    return int(value)


def ivf_nlist(n: int) -> int:
    """Lists for n vectors: about 4 sqrt(n) as a power of two, >= 39 points per list."""
    target = 4 * math.sqrt(n)
    nlist = 2 ** max(0, round(math.log2(max(target, 1))))
    while nlist > 1 and n < 39 * nlist:
        nlist //= 2
    return nlist


def hnsw_bytes(n: int, d: int, m: int = HNSW_M) -> int:
    # vectors, level-0 links (2M int32), upper levels (1/M of the nodes, M links
    # each), per-node level and offset
    return n * (4 * d + 8 * m + 4 + 12)


def choose_factory(
    n: int,
    d: int,
    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET,
    *,
    flat_max: int = FLAT_MAX,
    hnsw_max: int = HNSW_MAX,
) -> IndexChoice:
    """The factory string for n keys of dimension d within a memory budget (logged)."""
    if n < 1 or d < 1:
        raise ValueError(f"need n >= 1 and d >= 1, got n={n}, d={d}")
    budget = memory_budget_bytes
    gib = f"{budget / 2**30:.2f} GiB"
    flat = n * d * 4
    nlist = ivf_nlist(n)
    centroids = nlist * d * 4

    def pq_bytes(m: int) -> int:  # codes and ids, centroids, codebooks
        return n * (m + 8) + centroids + d * 256 * 4

    if n <= flat_max and flat <= budget:
        choice = IndexChoice("Flat", f"N={n} <= {flat_max}: exact search", flat)
    elif n <= hnsw_max and hnsw_bytes(n, d) <= budget:
        size = hnsw_bytes(n, d)
        reason = f"N={n} > {flat_max}, vectors + graph ({size / 2**30:.2f} GiB) fit {gib}"
        choice = IndexChoice(f"HNSW{HNSW_M}", reason, size)
    elif flat + n * 8 + centroids <= budget:
        size = flat + n * 8 + centroids
        why = f"N={n} > {hnsw_max}" if n > hnsw_max else "an HNSW graph does not fit"
        reason = f"{why}; the vectors ({flat / 2**30:.2f} GiB) fit {gib}"
        choice = IndexChoice(f"IVF{nlist},Flat", reason, size)
    else:
        for m in (m for m in PQ_M if d % m == 0):
            size = pq_bytes(m)
            if size <= budget:
                reason = f"the vectors ({flat / 2**30:.2f} GiB) do not fit {gib}: {m}-byte codes"
                choice = IndexChoice(f"IVF{nlist},PQ{m}np", reason, size)
                break
        else:
            raise ValueError(
                f"no index over {n} x {d} keys fits a memory budget of {budget} bytes "
                f"(the smallest, IVF{nlist},PQ1np, needs about {pq_bytes(1)} bytes)"
            )
    log.info("index choice: %s (%s; about %.1f MB)", choice.factory, choice.reason,
             choice.estimated_bytes / 1e6)  # fmt: skip
    return choice


# -- recall --------------------------------------------------------------------------


def exact_topk(
    keys: np.ndarray, queries: np.ndarray, k: int, metric: int, chunk: int = 65_536
) -> np.ndarray:
    """Rows [Q, k] of the exact top-k over keys [N, d] (memory-mapped is fine), in blocks."""
    best_s = np.full((len(queries), 0), np.nan, dtype=np.float32)
    best_r = np.zeros((len(queries), 0), dtype=np.int64)
    for start in range(0, len(keys), chunk):
        block = np.ascontiguousarray(keys[start : start + chunk], dtype=np.float32)
        s, r = faiss.knn(queries, block, min(k, len(block)), metric=metric)
        s, r = np.concatenate([best_s, s], 1), np.concatenate([best_r, r + start], 1)
        order = np.argsort(s if metric == faiss.METRIC_L2 else -s, axis=1, kind="stable")[:, :k]
        best_s, best_r = np.take_along_axis(s, order, 1), np.take_along_axis(r, order, 1)
    return best_r


@dataclass(frozen=True)
class RecallSample:
    """Queries and their exact top-k rows; ``own`` is each query's own row, or -1."""

    queries: np.ndarray  # (Q, d) float32
    truth: np.ndarray  # (Q, k) int64 rows
    own: np.ndarray  # (Q,) int64
    k: int

    @classmethod
    def from_keys(
        cls, keys: np.ndarray, k: int, metric: int, *, size: int = 1000, seed: int = 0
    ) -> RecallSample:
        """A seeded sample of the bank's keys as queries, each excluding itself."""
        n = len(keys)
        if n < 2:
            raise ValueError("recall needs a bank of at least 2 entries")
        k = min(k, n - 1)
        rows = np.sort(np.random.default_rng([seed, 3]).choice(n, min(size, n), replace=False))
        queries = np.ascontiguousarray(keys[rows], dtype=np.float32)
        top = exact_topk(keys, queries, k + 1, metric)
        truth = np.array([[r for r in t if r != own][:k] for t, own in zip(top, rows, strict=True)])
        return cls(queries, truth, rows.astype(np.int64), k)

    @classmethod
    def from_queries(
        cls, keys: np.ndarray, queries: np.ndarray, k: int, metric: int
    ) -> RecallSample:
        """Given queries (no exclusion) and their exact top-k over keys."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        own = np.full(len(queries), -1, dtype=np.int64)
        return cls(queries, exact_topk(keys, queries, k, metric), own, k)

    def recall(self, rows: np.ndarray) -> float:
        """Mean |found ∩ truth| / k over the queries; rows [Q, >= k] from the index."""
        hits = 0
        for got, want, own in zip(rows, self.truth, self.own, strict=True):
            got = [r for r in got if r != own and r >= 0][: self.k]
            hits += len(set(got) & set(want.tolist()))
        return hits / (self.k * len(self.truth))

    def measure(self, index: Any, params: dict[str, int] | None = None) -> float:
        fetch = self.k + int((self.own >= 0).any())
        sp = search_parameters(index, params) if params else None
        _, rows = index.search(self.queries, fetch, params=sp)
        return self.recall(rows)


def tune(index: Any, sample: RecallSample, target: float) -> dict[str, Any]:
    """Smallest efSearch / nprobe whose recall@k on the sample reaches target.

    Returns {"params": {...}, "recall": float, "target": target, "reached": bool,
    "tried": {value: recall}}; for an index without parameters, its recall as is.
    The index itself is not changed.
    """
    if not 0 < target <= 1:
        raise ValueError(f"recall target must be in (0, 1], got {target}")
    space = tunable(index)
    if not space:
        recall = sample.measure(index)
        return {"params": {}, "recall": recall, "target": target, "reached": recall >= target}
    ((name, top),) = space.items()
    ladder = [v for v in (EF_SEARCH_LADDER if name == "efSearch" else NPROBE_LADDER) if v < top]
    ladder.append(top)
    tried: dict[int, float] = {}
    for value in ladder:
        tried[value] = sample.measure(index, {name: value})
        if tried[value] >= target:
            break
    best = value
    out = {"params": {name: best}, "recall": tried[best], "target": target}
    out |= {"reached": tried[best] >= target, "tried": tried}
    if out["reached"]:
        log.info("tuned %s=%d: recall@%d %.4f >= %.3f", name, best, sample.k, tried[best], target)
    else:
        log.warning(
            "recall target %.3f not reached: %s=%d gives recall@%d %.4f (the index type "
            "limits it; choose another --index-type or a larger memory budget)",
            target, name, best, sample.k, tried[best],
        )  # fmt: skip
    return out


def index_bytes(index: Any) -> int:
    """The index's serialized size: what it holds in memory, give or take a few KB."""
    return int(faiss.serialize_index(index).nbytes)


def build_tuned(
    keys: np.ndarray,
    factory: str,
    metric: str = "ip",
    *,
    memory_budget_bytes: int | None = None,
    recall_target: float | None = DEFAULT_RECALL_TARGET,
    recall_k: int = DEFAULT_RECALL_K,
    recall_queries: int = 1000,
    train_sample: int = 100_000,
    seed: int = 0,
    ef_construction: int | None = None,
) -> tuple[Any, dict[str, Any]]:
    """Build the index over keys [N, d] (``factory`` may be "auto"), tune it, describe it.

    Returns (index, description) where the description is what the manifest's
    ``index`` records: requested and chosen factory and why, the build parameters
    (HNSW's efConstruction), the search parameters the server applies by default,
    recall@k with its protocol, and the index's bytes. Every index with efSearch /
    nprobe is tuned to ``recall_target``, whichever factory string made it; None keeps
    FAISS's defaults and only measures (except for "auto", which always tunes).
    ``ef_construction``: HNSW's build depth (FAISS: 40; deeper builds a better graph,
    more slowly); a ValueError for a factory string without an HNSW graph, ignored
    when "auto" chooses one without.
    """

    n, d = keys.shape
    budget = DEFAULT_MEMORY_BUDGET if memory_budget_bytes is None else memory_budget_bytes
    desc: dict[str, Any] = {"requested": factory}
    if factory == AUTO:
        choice = choose_factory(n, d, budget)
        factory = choice.factory
        desc |= {"reason": choice.reason, "memory_budget_bytes": budget}
        if recall_target is None:
            recall_target = DEFAULT_RECALL_TARGET
        if ef_construction is not None and "HNSW" not in factory:
            # asked for in case "auto" chose a graph; it chose none
            log.info("ef_construction=%d unused: %s has no HNSW graph", ef_construction, factory)
            ef_construction = None
    desc["factory"] = factory
    index = build_index(
        keys, factory, metric, train_sample=train_sample, seed=seed, ef_construction=ef_construction
    )
    graphs = hnsw_graphs(index)
    if graphs:
        desc["build_params"] = {"efConstruction": int(graphs[0].efConstruction)}
    faiss_metric = METRICS[metric]
    exact = isinstance(faiss.downcast_index(index), faiss.IndexFlat)
    if exact or n < 2:
        desc["search_params"] = {}
        desc["recall"] = {"k": recall_k, "value": 1.0, "protocol": "exact search"}
    else:
        sample = RecallSample.from_keys(
            keys, recall_k, faiss_metric, size=recall_queries, seed=seed
        )
        if recall_target is not None:
            tuned = tune(index, sample, recall_target)
            params, recall = tuned["params"], tuned["recall"]
        else:
            params, recall = current_params(index), sample.measure(index)
        desc["search_params"] = params
        desc["recall"] = {
            "k": sample.k,
            "value": round(recall, 4),
            "target": recall_target,
            "queries": len(sample.queries),
            "protocol": "bank keys as queries, each excluding itself, against exact search",
        }
        if params:
            faiss.ParameterSpace().set_index_parameters(
                index, ",".join(f"{k}={v}" for k, v in params.items())
            )
    desc["bytes"] = index_bytes(index)
    log.info(
        "index %s: %.1f MB, search params %s, recall@%d %.4f",
        factory, desc["bytes"] / 1e6, desc["search_params"] or "none", desc["recall"]["k"],
        desc["recall"]["value"],
    )  # fmt: skip
    return index, desc
