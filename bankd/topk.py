"""Top-k selection with exact per-query exclusion, and value gathers; numpy only.

Shared by the FAISS searcher (``bankd.index``) and the in-process bank
(``bankd.local``), so both drop excluded ids and pad missing hits the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SearchResult:
    """Top-k of B queries: entry ids, scores, and bank rows (for value gathers)."""

    ids: np.ndarray  # (B, k) int64, -1 where fewer than k hits
    scores: np.ndarray  # (B, k) float32, -inf where ids is -1
    rows: np.ndarray  # (B, k) int64, -1 where ids is -1


def fetch_count(k: int, exclude: list[list[int]] | None, n: int) -> int:
    """Raw hits to fetch so that k remain after exclusion: k + the longest exclusion."""
    widest = max((len(e) for e in exclude), default=0) if exclude else 0
    return min(k + widest, n)


def select(
    row_ids: np.ndarray,
    scores: np.ndarray,
    rows: np.ndarray,
    k: int,
    exclude: list[list[int]] | None = None,
) -> SearchResult:
    """Top-k of raw hits [B, fetch] after dropping excluded ids and missing hits.

    row_ids maps bank rows to entry ids. With fetch >= k + len(exclude[b]) this is
    exact: at most len(exclude[b]) raw hits of row b are dropped.
    """
    b = len(rows)
    widest = max((len(e) for e in exclude), default=0) if exclude else 0
    ids = np.where(rows >= 0, row_ids[np.maximum(rows, 0)], -1)
    drop = rows < 0
    if widest:
        excl = np.full((b, widest), -2, dtype=np.int64)  # -2 never matches an id
        for i, e in enumerate(exclude):
            excl[i, : len(e)] = e
        drop = drop | (ids[:, :, None] == excl[:, None, :]).any(-1)
    if drop.any():
        # A stable sort puts kept hits first, in their original best-first order.
        order = np.argsort(drop, axis=1, kind="stable")[:, :k]
        ids, scores, rows, drop = (
            np.take_along_axis(a, order, axis=1) for a in (ids, scores, rows, drop)
        )
    else:
        ids, scores, rows, drop = ids[:, :k], scores[:, :k], rows[:, :k], drop[:, :k]
    pad = k - ids.shape[1]
    if pad or drop.any():
        fill = ((0, 0), (0, pad))
        ids = np.pad(np.where(drop, -1, ids), fill, constant_values=-1)
        rows = np.pad(np.where(drop, -1, rows), fill, constant_values=-1)
        scores = np.pad(np.where(drop, -np.inf, scores), fill, constant_values=-np.inf)
    return SearchResult(ids.astype(np.int64), scores.astype(np.float32), rows.astype(np.int64))


def gather_values(values: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Values of rows [B, k] from the (memory-mapped) value array; zeros where row is -1."""
    flat = rows.reshape(-1)
    out = np.empty((len(flat), *values.shape[1:]), dtype=values.dtype)
    valid = flat >= 0
    if valid.all():
        np.take(values, flat, axis=0, out=out)
    else:
        out[~valid] = 0
        out[valid] = values[flat[valid]]
    return out.reshape(*rows.shape, *values.shape[1:])
