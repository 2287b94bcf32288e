"""Flat-search engines chosen by measurement on the machine that serves.

Which exact engine is fastest depends on the CPU (AVX2 only, AVX-512, AMX bf16 tiles)
and on the batch size: bankd's kernel wins small batches on an AVX2 machine, FAISS's
BLAS large ones on some, the bf16 matrix units (``bankd.search.bf16_search``) most
batches where the CPU has AMX. So with ``flat_search="auto"`` the searcher times every
engine it has on the bank's own keys, a few batch sizes of rows drawn from the bank,
and answers each batch with the engine that was fastest for the nearest measured size.
The measurement is bounded (``MEASURE_BUDGET_S``): sizes are measured largest first
(the merged batches a busy server searches) and no further size once the budget is
spent, so a server starts quickly; a large bank is measured at fewer sizes, the
smallest taking the choice of the nearest measured one.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

log = logging.getLogger(__name__)

MEASURE_BATCHES = (16, 128)  # a trainer's per-step batch and a merged server batch
MEASURE_K = 5  # the paper's k; larger k goes to FAISS in "auto" (not measured)
MEASURE_REPEATS = 2  # timed runs per engine and size, after one warm-up
MEASURE_BUDGET_S = 5.0  # no further batch size is measured once this much time is spent

Engine = Callable[[np.ndarray, int], object]


@dataclass(frozen=True)
class EngineChoice:
    """Which engine answers which batch sizes, and the timings that decided it.

    ``ranges``: (largest batch, engine) ascending; the last entry covers every larger
    batch too. ``seconds``: {engine: {batch: best measured seconds}}.
    """

    ranges: tuple[tuple[int, str], ...]
    seconds: dict[str, dict[int, float]] = field(default_factory=dict)

    def pick(self, batch: int) -> str:
        for upper, name in self.ranges:
            if batch <= upper:
                return name
        return self.ranges[-1][1]

    def label(self) -> str:
        """Short form for GetInfo and metric labels: "kernel" or "B<=45:kernel,bf16"."""
        names = [name for _, name in self.ranges]
        if len(set(names)) == 1:
            return names[0]
        parts = [f"B<={upper}:{name}" for upper, name in self.ranges[:-1]]
        return ",".join([*parts, self.ranges[-1][1]])

    def table(self) -> str:
        """The timings for the log: "B=16 kernel 31.2 ms, faiss 40.1 ms; B=128 ..."."""
        batches = sorted({b for t in self.seconds.values() for b in t})
        rows = []
        for b in batches:
            cells = [f"{n} {1e3 * t[b]:.1f} ms" for n, t in self.seconds.items() if b in t]
            rows.append(f"B={b} " + ", ".join(cells))
        return "; ".join(rows)


def merge_ranges(fastest: Sequence[tuple[int, str]]) -> tuple[tuple[int, str], ...]:
    """Ranges from the fastest engine at each measured batch size (ascending): each
    boundary at the geometric middle between two sizes; neighbours with one engine
    merged."""
    ranges: list[tuple[int, str]] = []
    for i, (b, name) in enumerate(fastest):
        upper = math.isqrt(b * fastest[i + 1][0]) if i + 1 < len(fastest) else b
        if ranges and ranges[-1][1] == name:
            ranges[-1] = (upper, name)
        else:
            ranges.append((upper, name))
    return tuple(ranges)


def measure(
    engines: dict[str, Engine],
    keys: np.ndarray,
    *,
    batches: Sequence[int] = MEASURE_BATCHES,
    k: int = MEASURE_K,
    budget_s: float = MEASURE_BUDGET_S,
    seed: int = 0,
) -> EngineChoice:
    """Time each engine (a search(queries, k) callable) on rows of keys [N, d] as
    queries and choose the fastest per batch size."""
    if not engines:
        raise ValueError("no engine to measure")
    if len(keys) == 0:
        raise ValueError("cannot measure on an empty bank")
    rng = np.random.default_rng(seed)
    k = min(k, len(keys))
    start = time.perf_counter()
    seconds: dict[str, dict[int, float]] = {name: {} for name in engines}
    fastest: list[tuple[int, str]] = []
    for b in sorted(set(batches), reverse=True):
        rows = np.sort(rng.choice(len(keys), size=b, replace=b > len(keys)))
        queries = np.ascontiguousarray(keys[rows], dtype=np.float32)
        for name, search in engines.items():
            search(queries, k)  # warm-up: pages, thread pools, oneDNN kernels
            best = math.inf
            for _ in range(MEASURE_REPEATS):
                t0 = time.perf_counter()
                search(queries, k)
                best = min(best, time.perf_counter() - t0)
            seconds[name][b] = best
        fastest.append((b, min(engines, key=lambda n: seconds[n][b])))
        if time.perf_counter() - start > budget_s:
            log.info("engine measurement stopped after B=%d (%.1f s budget)", b, budget_s)
            break
    choice = EngineChoice(merge_ranges(sorted(fastest)), seconds)
    log.info(
        "flat search engines measured in %.1f s: %s -> %s",
        time.perf_counter() - start,
        choice.table(),
        choice.label(),
    )
    return choice
