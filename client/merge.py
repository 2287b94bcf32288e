"""Putting S shards' answers together: the exact global top-k of their per-shard
top-k lists, and one BankInfo for the bank they make up (refusing shards that are
not parts of one bank).

    hits = merge_hits([hits_0, hits_1, hits_2], k=5)     # each [B, 5]: ids, scores, values
    info = combine_info(targets, [info_0, info_1, info_2])
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from . import errors
from .types import BankInfo, Hits

_NO_ID = np.iinfo(np.int64).max  # sorts padding (-1 ids) after every real id


def merge_hits(parts: Sequence[Hits], k: int, metric: str = "ip") -> Hits:
    """The global top-k of per-shard top-k lists ([B, k_s] each), best first.

    Best is the highest score for "ip" and the lowest for "l2" (a distance); exact
    ties go to the lower entry id, and padding (id -1) comes last. Values (if every
    part has them) are gathered from the parts' arrays, without concatenating them.
    """
    return merge_with_source(parts, k, metric)[0]


def merge_with_source(parts: Sequence[Hits], k: int, metric: str = "ip") -> tuple[Hits, np.ndarray]:
    """merge_hits, and the part each hit came from [B, k] (-1 where padded)."""
    ids = np.concatenate([np.asarray(p.ids) for p in parts], axis=1)  # (B, sum k_s)
    scores = np.concatenate([np.asarray(p.scores) for p in parts], axis=1)
    pad = ids < 0
    rank = np.where(pad, np.inf, scores if metric == "l2" else -scores)
    order = np.lexsort((np.where(pad, _NO_ID, ids), rank), axis=-1)[:, :k]  # (B, <=k)
    out_ids = np.take_along_axis(ids, order, axis=1)
    out_scores = np.take_along_axis(scores, order, axis=1)
    starts = np.cumsum([0] + [np.asarray(p.ids).shape[1] for p in parts])
    source = np.where(out_ids < 0, -1, np.searchsorted(starts, order, side="right") - 1)
    short = k - order.shape[1]  # only if the shards together hold fewer than k entries
    if short:
        fill = ((0, 0), (0, short))
        out_ids = np.pad(out_ids, fill, constant_values=-1)
        out_scores = np.pad(out_scores, fill, constant_values=-np.inf)
        source = np.pad(source, fill, constant_values=-1)
    values = None
    if all(p.values is not None for p in parts):
        first = np.asarray(parts[0].values)
        values = np.zeros((len(ids), k, *first.shape[2:]), dtype=first.dtype)  # (B, k, 32, 96)
        for s, p in enumerate(parts):
            rows, slots = np.nonzero(source == s)
            if len(rows):
                values[rows, slots] = np.asarray(p.values)[rows, order[rows, slots] - starts[s]]
    hits = Hits(ids=out_ids.astype(np.int64), scores=out_scores.astype(np.float32), values=values)
    return hits, source


def combine_info(targets: Sequence[str], infos: Sequence[BankInfo]) -> BankInfo:
    """One BankInfo for the sharded bank; FailedPrecondition naming a shard that differs."""
    first = infos[0]

    def name(i: int) -> str:
        return f"shard {i} ({targets[i]})"

    for i, info in enumerate(infos[1:], 1):
        for field in ("vision_encoder", "text_encoder"):
            a, b = getattr(first, field), getattr(info, field)
            if (a is None) != (b is None) or (a is not None and not a.matches(b)):
                raise errors.EncoderMismatch(
                    f"encoder mismatch: {name(i)} has {field} {_short(b)}, {name(0)} has "
                    f"{_short(a)}; every shard must be split from the same bank"
                )
        for field in ("key_dim", "value_shape", "value_dtype", "metric", "index_type"):
            a, b = getattr(first, field), getattr(info, field)
            if a != b:
                raise errors.FailedPrecondition(
                    f"{name(i)} has {field} {b!r}, {name(0)} has {a!r}; every shard must "
                    "be split from the same bank"
                )
        if first.key_function != info.key_function:
            raise errors.FailedPrecondition(
                f"{name(i)} has another key function than {name(0)}; every shard must be "
                "split from the same bank"
            )
    seen: dict[str, int] = {}
    for i, info in enumerate(infos):
        if info.bank_id in seen:
            raise errors.FailedPrecondition(
                f"{name(i)} serves the same bank as {name(seen[info.bank_id])} "
                f"(bank_id {info.bank_id[:12]}): its entries would be counted twice"
            )
        seen[info.bank_id] = i
    entries = sum(info.entries for info in infos)
    # A shard whose max_k is below its size is capped by its server (--max-k): k past that
    # cannot be answered exactly. A shard whose max_k is its size just returns all of it.
    max_k = min([entries] + [info.max_k for info in infos if info.max_k < info.entries])
    return BankInfo(
        entries=entries,
        key_dim=first.key_dim,
        value_shape=first.value_shape,
        value_dtype=first.value_dtype,
        index_type=first.index_type,
        metric=first.metric,
        vision_encoder=first.vision_encoder,
        text_encoder=first.text_encoder,
        key_function=first.key_function,
        max_k=max_k,
        max_batch=min(info.max_batch for info in infos),
        bank_id=hashlib.sha256("\n".join(i.bank_id for i in infos).encode()).hexdigest(),
        server_version=",".join(dict.fromkeys(i.server_version for i in infos)),
        embed_available=any(info.embed_available for info in infos),
        search_device=",".join(dict.fromkeys(i.search_device for i in infos)),
        search_engine=";".join(dict.fromkeys(i.search_engine for i in infos)),
        max_message_bytes=min(info.max_message_bytes for info in infos),
        # Shards are indexed (and tuned) on their own: the most any shard uses, the
        # least any accepts, the lowest recall any measured.
        nprobe=max(info.nprobe for info in infos),
        ef_search=max(info.ef_search for info in infos),
        max_nprobe=min(info.max_nprobe for info in infos),
        max_ef_search=min(info.max_ef_search for info in infos),
        recall=min(info.recall for info in infos),
        recall_k=first.recall_k,
    )


def _short(fp: Any) -> str:
    return "none" if fp is None else fp.short()
