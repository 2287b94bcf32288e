"""Top-k selection with exact per-query exclusion, and value gathers; numpy only.

Shared by the FAISS searcher (``bankd.search.index``) and the in-process bank
(``bankd.search.local``), so both drop excluded ids and pad missing hits the same way.
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
    exact: at most len(exclude[b]) raw hits of row b are dropped. Kept hits keep their
    order; rows with fewer than k are padded (id and row -1, score -inf).
    """
    # Few, in-place passes: at B=1024, k=2048 every temporary is 16 MB of fresh pages.
    b, fetch = rows.shape
    missing = rows < 0
    ids = np.take(row_ids, rows, mode="clip")  # (B, fetch)
    np.putmask(ids, missing, -1)
    drop = _excluded(ids, exclude)
    drop |= missing
    scores = scores.astype(np.float32, copy=False)
    if k <= fetch and not drop[:, :k].any():  # nothing dropped among the first k
        return SearchResult(
            np.ascontiguousarray(ids[:, :k]), scores[:, :k].copy(), rows[:, :k].astype(np.int64)
        )
    src = _kept_columns(drop, k)  # (B, k) column of each row's j-th kept hit; >= fetch: none
    invalid = src >= fetch
    np.minimum(src, max(fetch - 1, 0), out=src)
    src += fetch * np.arange(b)[:, None]  # now positions in the flattened (B, fetch) arrays

    def pick(a: np.ndarray, fill: float, dtype: type) -> np.ndarray:
        if not fetch:
            return np.full((b, k), fill, dtype)
        got = np.take(a.reshape(-1), src).astype(dtype, copy=False)
        np.putmask(got, invalid, fill)
        return got

    return SearchResult(
        pick(ids, -1, np.int64), pick(scores, -np.inf, np.float32), pick(rows, -1, np.int64)
    )


_SHIFT_MAX = 8  # up to this many drops per row, kept columns come from shifts, not a sort
_BROADCAST_MAX = 16  # up to this many excluded ids per query, one broadcast comparison


def _excluded(ids: np.ndarray, exclude: list[list[int]] | None) -> np.ndarray:
    """(B, fetch) bool: ids[b, j] is in exclude[b]."""
    widest = max((len(e) for e in exclude), default=0) if exclude else 0
    if not widest:
        return np.zeros(ids.shape, dtype=bool)
    if widest > _BROADCAST_MAX:  # a (B, fetch, widest) comparison would be too big
        return np.stack([np.isin(row, e) for row, e in zip(ids, exclude, strict=True)])
    excl = np.full((len(ids), widest), -2, dtype=np.int64)  # -2 never matches an id
    for i, e in enumerate(exclude):
        excl[i, : len(e)] = e
    return (ids[:, :, None] == excl[:, None, :]).any(-1)


def _kept_columns(drop: np.ndarray, k: int) -> np.ndarray:
    """(B, k) int64: the column of the j-th column of each row not dropped (>= fetch if
    there is none)."""
    b, fetch = drop.shape
    n_drop = drop.sum(1)
    most = int(n_drop.max(initial=0))
    if most > _SHIFT_MAX:
        # A stable sort puts kept columns first, in order; dropped ones become "none".
        order = np.argsort(drop, axis=1, kind="stable")
        src = np.full((b, k), fetch, dtype=np.int64)
        src[:, : min(k, fetch)] = order[:, :k]
        src[np.arange(k)[None, :] >= (fetch - n_drop)[:, None]] = fetch
        return src
    # The j-th kept column is j moved on by one for every dropped column at or before it:
    # shift past each row's drops in increasing column order (first drop, second, ...).
    src = np.broadcast_to(np.arange(k, dtype=np.int64), (b, k)).copy()
    left = drop.copy() if most > 1 else drop
    every = np.arange(b)
    for t in range(most):
        first = left.argmax(1)  # the row's next dropped column (0 if none is left)
        found = left[every, first]
        src += src >= np.where(found, first, fetch)[:, None]
        if t + 1 < most:
            left[every[found], first[found]] = False
    return src


def gather_values(
    values: np.ndarray, rows: np.ndarray, out: np.ndarray | None = None
) -> np.ndarray:
    """Values of rows [B, k] from the (memory-mapped) value array; zeros where row is -1.

    ``out``: where to write them ([B, k, *value shape], the values' dtype), e.g. their
    place in a response being serialized; a new array when None."""
    flat = rows.reshape(-1)
    shape = (*rows.shape, *values.shape[1:])
    if out is None:
        out = np.empty(shape, dtype=values.dtype)
    elif out.shape != shape or out.dtype != values.dtype or not out.flags.c_contiguous:
        raise ValueError(
            f"out is {out.dtype}{list(out.shape)}, needs a contiguous {values.dtype}{list(shape)}"
        )
    dest = out.reshape(len(flat), *values.shape[1:])  # a view: out is contiguous
    valid = flat >= 0
    if valid.all():
        np.take(values, flat, axis=0, out=dest)
    else:
        dest[~valid] = 0
        dest[valid] = values[flat[valid]]
    return out
