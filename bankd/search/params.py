"""FAISS search parameters: which one an index has (efSearch for HNSW, nprobe for IVF),
its current value, and a per-call ``SearchParameters`` object, through any
``IndexPreTransform`` wrappers. Used by the searcher (``bankd.search.index``) and the
tuning at build time (``bankd.search.tuning``).
"""

from __future__ import annotations

from typing import Any

import faiss

EF_SEARCH_MAX = 1024  # the largest efSearch tuning tries and a request may be given


def unwrap(index: Any) -> tuple[Any, list[Any]]:
    """The index under IndexPreTransform wrappers, and the wrappers."""
    index = faiss.downcast_index(index)
    wrappers = []
    while isinstance(index, faiss.IndexPreTransform):
        wrappers.append(index)
        index = faiss.downcast_index(index.index)
    return index, wrappers


def tunable(index: Any) -> dict[str, int]:
    """The search parameter the index has, with its largest useful value (empty: none)."""
    inner, _ = unwrap(index)
    if isinstance(inner, faiss.IndexHNSW):
        return {"efSearch": EF_SEARCH_MAX}
    if isinstance(inner, faiss.IndexIVF):
        return {"nprobe": int(inner.nlist)}
    return {}


def current_params(index: Any) -> dict[str, int]:
    """The index's own values of its tunable parameters."""
    inner, _ = unwrap(index)
    if isinstance(inner, faiss.IndexHNSW):
        return {"efSearch": int(inner.hnsw.efSearch)}
    if isinstance(inner, faiss.IndexIVF):
        return {"nprobe": int(inner.nprobe)}
    return {}


def search_parameters(index: Any, params: dict[str, int]) -> Any:
    """faiss SearchParameters for one call (the index itself is left as it is).

    The returned object keeps the objects it points to alive; pass it as
    ``index.search(x, k, params=...)``.
    """
    inner, wrappers = unwrap(index)
    unknown = set(params) - set(tunable(index))
    if unknown:
        raise ValueError(f"{type(inner).__name__} has no search parameter {sorted(unknown)}")
    if isinstance(inner, faiss.IndexHNSW):
        sp = faiss.SearchParametersHNSW()
        sp.efSearch = int(params.get("efSearch", inner.hnsw.efSearch))
    else:
        sp = faiss.SearchParametersIVF()
        sp.nprobe = int(params.get("nprobe", inner.nprobe))
    keep = [sp]
    for _ in wrappers:
        outer = faiss.SearchParametersPreTransform()
        outer.index_params = keep[-1]
        keep.append(outer)
    keep[-1].referenced = keep  # the SWIG objects hold raw pointers to the inner ones
    return keep[-1]
