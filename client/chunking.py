"""What BankClient and ShardedBankClient share to answer one batch in several calls.

A batch whose response would be over the message limit is searched as row chunks,
one after another, within the one deadline of the whole call; their hits are joined
back in row order.

    rows = fitting_rows(info, k, client_limit)  # or None: no split
    end = end_of(timeout)                       # None: no deadline
    parts = [search(c, timeout=time_left(end)) for c in row_chunks(keys, exclude, rows)]
    hits = join_hits(parts)
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np

from . import errors
from .types import BankInfo, Hits, exclude_lists

RESPONSE_FRAMING_BYTES = 4096  # what the server allows a response beyond its hits
HIT_BYTES = 8 + 4  # an id (int64) and a score (float32)


def fitting_rows(info: BankInfo, k: int, client_limit: int) -> int:
    """The most query rows whose top-k with values fits the message limit (the
    server's, ``info.max_message_bytes``, or the client's, the lower); InvalidArgument
    when not even one query's hits fit."""
    limit = min(info.max_message_bytes or client_limit, client_limit)
    per_query = k * (HIT_BYTES + 2 * math.prod(info.value_shape))
    rows = (limit - RESPONSE_FRAMING_BYTES) // per_query
    if rows < 1:
        raise errors.InvalidArgument(
            f"k={k} with values needs {per_query + RESPONSE_FRAMING_BYTES} bytes for one "
            f"query, over the {limit}-byte message limit (server "
            f"{info.max_message_bytes}, client {client_limit}); ask for a "
            "smaller k, or raise the limit (bankd serve --max-message-mb, "
            "BankClient(max_message_bytes=...))"
        )
    return rows


def row_chunks(keys: Any, exclude_ids: Any, rows: int | None) -> list[tuple[Any, Any]]:
    """(keys, exclude_ids) of each call: the batch whole when ``rows`` is None or it
    fits, else consecutive chunks of ``rows`` rows with their exclusions."""
    b = len(keys)
    if rows is None or b <= rows:
        return [(keys, exclude_ids)]
    try:
        exclude = exclude_lists(exclude_ids, b)
    except ValueError as e:
        raise errors.InvalidArgument(str(e)) from None
    return [
        (keys[s : s + rows], None if exclude is None else exclude[s : s + rows])
        for s in range(0, b, rows)
    ]


def join_hits(parts: list[Hits]) -> Hits:
    """The hits of consecutive row chunks of one batch, as one (numpy)."""
    if len(parts) == 1:
        return parts[0]
    values = [p.values for p in parts]
    return Hits(
        ids=np.concatenate([p.ids for p in parts]),
        scores=np.concatenate([p.scores for p in parts]),
        values=None if values[0] is None else np.concatenate(values),
        request_id=parts[0].request_id,
    )


def end_of(timeout: float | None) -> float | None:
    """The ``time.monotonic()`` at which a call of ``timeout`` seconds ends (None: never)."""
    return None if timeout is None else time.monotonic() + timeout


def time_left(end: float | None) -> float | None:
    """Seconds to a call's end, for the next chunk's deadline (None: no deadline)."""
    return None if end is None else max(end - time.monotonic(), 0.0)


class Deadline:
    """A wait of a fixed length: how much of it is left, and sleeps that stay inside it."""

    def __init__(self, seconds: float) -> None:
        self._end = time.monotonic() + seconds

    def left(self) -> float:
        return self._end - time.monotonic()

    def sleep(self, s: float) -> None:
        time.sleep(min(s, max(self.left(), 0)))
