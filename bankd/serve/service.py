"""The bank service without the wire: validation, merged search, fetch, embed.

``BankService`` owns a loaded bank and its searcher. Its methods take and return
numpy arrays and raise ``bankd_client.errors`` classes with messages that say what
was wrong; the gRPC servicer (``bankd.serve.server``) only converts at the edge.

Concurrent searches are merged: a single worker thread takes the first waiting
request, waits up to ``merge_wait_s`` for more (up to ``merge_max_rows`` rows), runs
ONE index search over all their rows and hands each caller its slice. Many small
trainer batches then cost about what one big batch costs. Only requests with the
same per-request search parameters (nprobe, ef_search) are merged; the others wait
for the next search. Values are gathered in the callers' threads, in parallel,
after the search.
"""

from __future__ import annotations

import contextlib
import logging
import math
import queue
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import numpy as np

from bankd import __version__
from bankd.search.index import Searcher, SearchResult, gather_values
from bankd.serve.flags import ServiceLimits
from bankd.serve.images import decode_images
from bankd.serve.metrics import Metrics
from bankd.serve.shm import MappedRegions
from bankd.serve.wire import Fill
from bankd.store.reader import Bank
from bankd_client import errors
from bankd_client.types import BankInfo
from bankd_client.wire import InRegion

log = logging.getLogger(__name__)


DEFAULT_LIMITS = ServiceLimits()

# Request field -> FAISS parameter name, and the ServiceLimits field that caps it.
OVERRIDES = {"nprobe": ("nprobe", "max_nprobe"), "ef_search": ("efSearch", "max_ef_search")}
OVERRIDES_BY_PARAM = {param: limit for param, limit in OVERRIDES.values()}


@dataclass(eq=False)  # compared by identity: == on the keys arrays is not a bool
class _Pending:
    keys: np.ndarray
    k: int
    exclude: list[list[int]] | None
    deadline: float | None
    future: Future
    params: tuple[tuple[str, int], ...] = ()  # per-request FAISS parameters; merge key


class BankService:
    """A served bank: validated search (merged across callers), fetch, embed, info."""

    def __init__(
        self,
        bank: Bank,
        *,
        device: str = "auto",
        flat_search: str = "auto",
        threads: int | None = None,
        limits: ServiceLimits = DEFAULT_LIMITS,
        metrics: Metrics | None = None,
        embedder: Any = None,
        search_params: dict[str, Any] | None = None,
    ) -> None:
        self.bank = bank
        self.limits = limits
        self.metrics = metrics or Metrics()
        self.embedder = embedder
        if search_params is None:
            search_params = bank.search_params  # what the build tuned, if anything
        self.searcher = Searcher(
            bank.index,
            bank.keys,
            bank.ids,
            device=device,
            params=search_params,
            flat_search=flat_search,
            threads=threads,
        )
        self.max_k = min(limits.max_k, self.searcher.max_k)
        # The largest value a request may give each overridable parameter.
        self.max_params = {
            name: min(top, getattr(limits, OVERRIDES_BY_PARAM[name]))
            for name, top in self.searcher.tunable.items()
        }
        if search_params:
            log.info("search parameters %s (bank defaults)", self.searcher.defaults)
        self._queue: queue.Queue[_Pending | None] = queue.Queue()
        # Requests being decoded right now (see `arriving`): the merge loop waits for
        # them, and does not wait at all when nobody else is on the way.
        self._arriving = 0
        self._arriving_lock = threading.Lock()
        # One index search at a time: the merge loop's, or a lone caller's own (inline).
        self._search_lock = threading.Lock()
        self._worker = threading.Thread(target=self._merge_loop, name="bankd-search", daemon=True)
        self._worker.start()
        self.metrics.bank_entries.set(bank.entries)
        for part, size in bank.bytes_by_part().items():
            self.metrics.bank_bytes.labels(part=part).set(size)

    def close(self) -> None:
        self._queue.put(None)
        self._worker.join(timeout=5)

    # -- info --------------------------------------------------------------------------

    def info(self) -> BankInfo:
        return self.bank.info(
            server_version=__version__,
            max_k=self.max_k,
            max_batch=self.limits.max_batch,
            embed_available=self.embedder is not None,
            search_device=self.searcher.device,
            max_message_bytes=self.limits.max_message_bytes,
            nprobe=self.searcher.defaults.get("nprobe", 0),
            ef_search=self.searcher.defaults.get("efSearch", 0),
            max_nprobe=self.max_params.get("nprobe", 0),
            max_ef_search=self.max_params.get("efSearch", 0),
        )

    # -- search ------------------------------------------------------------------------

    def response_bytes(self, batch: int, k: int, with_values: bool) -> int:
        """Upper bound of a Search response's size: ids, scores, values, framing."""
        per_hit = 8 + 4 + (2 * int(np.prod(self.bank.value_shape)) if with_values else 0)
        return batch * k * per_hit + 4096

    def search_overrides(self, nprobe: int = 0, ef_search: int = 0) -> dict[str, int]:
        """FAISS parameters of a request's nprobe / ef_search (0: the bank's default).

        InvalidArgument for a negative value, one past the limit, or one the index
        does not have (a Flat index has neither: its search is exact already).
        """
        out = {}
        for field, value in (("nprobe", nprobe), ("ef_search", ef_search)):
            if value == 0:
                continue
            param = OVERRIDES[field][0]
            if param not in self.max_params:
                kind = self.bank.manifest.index_factory
                has = (
                    ", ".join(f for f, (p, _) in OVERRIDES.items() if p in self.max_params)
                    or "no search parameter (exact or fixed search)"
                )
                raise errors.InvalidArgument(
                    f"{field} does not apply to this bank's index ({kind}); it takes {has}"
                )
            top = self.max_params[param]
            if not 1 <= value <= top:
                raise errors.InvalidArgument(
                    f"{field}={value} is out of range; this bank takes 1..{top} "
                    f"(0 or unset: its default {self.searcher.defaults[param]})"
                )
            if value != self.searcher.defaults[param]:  # the default merges with the rest
                out[param] = int(value)
        return out

    def validate_search(
        self,
        keys: np.ndarray,
        k: int,
        exclude: list[list[int]] | None,
        with_values: bool = True,
    ) -> None:
        """Raise InvalidArgument for anything a search must not be run with.

        with_values: whether the response message carries the values (they count
        against the message limit; values written into a client's shared-memory region
        do not)."""
        lim = self.limits
        if keys.ndim != 2:
            raise errors.InvalidArgument(f"keys must be [B, d], got shape {list(keys.shape)}")
        b, d = keys.shape
        if b == 0:
            raise errors.InvalidArgument("empty batch: keys has 0 rows")
        if b > lim.max_batch:
            raise errors.InvalidArgument(
                f"batch of {b} queries is over the limit of {lim.max_batch}"
            )
        if d != self.bank.key_dim:
            raise errors.InvalidArgument(
                f"keys have dimension {d}, the bank's keys have {self.bank.key_dim}"
            )
        if keys.dtype not in (np.float32, np.float16):
            raise errors.InvalidArgument(
                f"keys dtype {keys.dtype} unsupported; use float32 or float16"
            )
        if not np.isfinite(keys).all():
            bad = int(np.flatnonzero(~np.isfinite(keys).all(axis=1))[0])
            raise errors.InvalidArgument(f"keys contain NaN or inf (first in row {bad})")
        if not 1 <= k <= self.max_k:
            raise errors.InvalidArgument(f"k={k} is out of range; it must be 1..{self.max_k}")
        if exclude:
            if len(exclude) != b:
                raise errors.InvalidArgument(
                    f"exclude has {len(exclude)} lists for {b} queries (give none or one per query)"
                )
            widest = max(len(e) for e in exclude)
            if widest > lim.max_exclude_per_query:
                raise errors.InvalidArgument(
                    f"a query excludes {widest} ids; the limit is {lim.max_exclude_per_query}"
                )
        need = self.response_bytes(b, k, with_values)
        if need > lim.max_message_bytes:
            per_query = self.response_bytes(1, k, with_values) - self.response_bytes(0, k, False)
            fit = max((lim.max_message_bytes - self.response_bytes(0, k, False)) // per_query, 0)
            raise errors.InvalidArgument(
                f"B={b}, k={k} needs a response of {need} bytes, over the server's "
                f"{lim.max_message_bytes}-byte message limit (bankd serve --max-message-mb); "
                f"split the batch into calls of at most {fit} queries (BankClient.search "
                "and stream_search split by themselves unless split_batches=False)"
                if fit
                else f"k={k} needs a response of {need} bytes for one query, over the "
                f"server's {lim.max_message_bytes}-byte message limit; ask for a smaller k "
                "or raise the limit (bankd serve --max-message-mb)"
            )

    @contextlib.contextmanager
    def arriving(self) -> Iterator[None]:
        """Mark a request as on its way to ``submit`` (decoding, validating)."""
        with self._arriving_lock:
            self._arriving += 1
        try:
            yield
        finally:
            with self._arriving_lock:
                self._arriving -= 1

    def submit(
        self,
        keys: np.ndarray,
        k: int,
        exclude: list[list[int]] | None = None,
        deadline: float | None = None,
        with_values: bool = True,
        params: dict[str, int] | None = None,
        *,
        inline: bool = False,
    ) -> Future:
        """Validate and queue a search; the Future gives a SearchResult.

        params: FAISS parameters for this search only, from ``search_overrides``.
        inline: when nobody else is searching, queued or arriving, search in the
        calling thread (the Future is done on return) instead of handing the request
        to the merge loop's thread and back, which costs a lone caller about 0.7 ms.
        Unary callers only: a stream's reader keeps reading while its searches run.
        """
        self.validate_search(keys, k, exclude, with_values)
        fut: Future = Future()
        keys = keys.astype(np.float32, copy=False)
        merge_key = tuple(sorted((params or {}).items()))
        pending = _Pending(keys, k, exclude or None, deadline, fut, merge_key)
        if inline and self._alone():
            try:
                self._run_merged([pending])
            finally:
                self._search_lock.release()
        else:
            self._queue.put(pending)
        return fut

    def _alone(self) -> bool:
        """True, holding the search lock, when this caller (inside ``arriving``) is the
        only one: nothing queued, searching or being decoded."""
        if self._arriving > 1 or not self._queue.empty():
            return False
        if not self._search_lock.acquire(blocking=False):
            return False
        if self._queue.empty():
            return True
        self._search_lock.release()  # one came in meanwhile: merge with it
        return False

    def search(
        self,
        keys: np.ndarray,
        k: int,
        exclude: list[list[int]] | None = None,
        *,
        with_values: bool = True,
        timeout: float | None = None,
        nprobe: int = 0,
        ef_search: int = 0,
    ) -> tuple[SearchResult, np.ndarray | None]:
        """Blocking search: (ids/scores/rows, values [B, k, 32, 96] or None)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        params = self.search_overrides(nprobe, ef_search)
        result = self.submit(keys, k, exclude, deadline, with_values, params).result()
        return result, self.values_for(result) if with_values else None

    def values_for(self, result: SearchResult) -> np.ndarray:
        return gather_values(self.bank.values, result.rows)

    def values_region(
        self, regions: MappedRegions, region: Any, keys: np.ndarray, k: int
    ) -> np.ndarray | None:
        """Where a search's values go in the client's shared-memory region (``region``
        has name, offset, size): a writable [B, k, 32, 96] view, or None when this
        server cannot write there. Keys or k out of range: None too (``submit`` says
        what is wrong with them)."""
        if keys.ndim != 2 or not 1 <= k <= self.max_k:
            return None
        values = self.bank.values
        shape = (keys.shape[0], k, *values.shape[1:])
        nbytes = math.prod(shape) * values.dtype.itemsize
        raw = regions.target(region.name, region.offset, region.size, nbytes)
        return None if raw is None else raw.view(values.dtype).reshape(shape)

    def values_into(self, result: SearchResult, out: np.ndarray) -> InRegion:
        """Gather the result's values into ``out`` (from ``values_region``)."""
        gather_values(self.bank.values, result.rows, out)
        return InRegion(out.shape, out.dtype)

    def values_fill(self, result: SearchResult) -> Fill:
        """The result's values, gathered from the bank straight into a response."""
        values = self.bank.values
        return Fill(
            (*result.rows.shape, *values.shape[1:]),
            values.dtype,
            lambda out: gather_values(values, result.rows, out),
        )

    def _merge_loop(self) -> None:
        # Requests with other search parameters than the batch being formed wait here,
        # in arrival order, for a later batch: one index search takes one set.
        held: list[_Pending] = []
        while True:
            first = held.pop(0) if held else self._queue.get()
            if first is None:
                return
            with self._search_lock:
                held = self._collect_and_run(first, held)

    def _collect_and_run(self, first: _Pending, held: list[_Pending]) -> list[_Pending]:
        """Merge ``first`` with held and arriving requests of the same parameters, run
        the batch; the requests still held for a later batch."""
        batch, rows = [first], len(first.keys)
        waiting, held = held, []
        for p in waiting:
            if p.params == first.params and rows < self.limits.merge_max_rows:
                batch.append(p)
                rows += len(p.keys)
            else:
                held.append(p)
        wait_until = time.monotonic() + self.limits.merge_wait_s
        while rows < self.limits.merge_max_rows:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                # Wait (boundedly) only while another request is being decoded; a
                # lone caller pays no merge latency.
                left = wait_until - time.monotonic()
                if self._arriving == 0 or left <= 0:
                    break
                try:
                    item = self._queue.get(timeout=min(left, 0.0001))
                except queue.Empty:
                    continue
            if item is None:
                self._queue.put(None)
                break
            if item.params != first.params:
                held.append(item)
                continue
            batch.append(item)
            rows += len(item.keys)
        self._run_merged(batch)
        return held

    def _run_merged(self, batch: list[_Pending]) -> None:
        now = time.monotonic()
        live = []
        for p in batch:
            if p.deadline is not None and now > p.deadline:
                p.future.set_exception(errors.DeadlineExceeded("deadline passed before search"))
            elif p.future.set_running_or_notify_cancel():
                live.append(p)
        if not live:
            return
        try:
            t0 = time.perf_counter()
            queries = live[0].keys if len(live) == 1 else np.concatenate([p.keys for p in live])
            fetch = max(p.k + max((len(e) for e in p.exclude or []), default=0) for p in live)
            fetch = min(fetch, self.searcher.n)
            params = dict(live[0].params) or None  # every request in a batch has the same
            scores, rows = self.searcher.raw_search(queries, fetch, params)
            self.metrics.index_search_latency.observe(time.perf_counter() - t0)
            self.metrics.merged_rows.observe(len(queries))
            start = 0
            for p in live:
                end = start + len(p.keys)
                p.future.set_result(
                    self.searcher.select(scores[start:end], rows[start:end], p.k, p.exclude)
                )
                start = end
        except Exception as e:  # never let a bad batch kill the worker
            log.exception("index search failed")
            for p in live:
                if not p.future.done():
                    p.future.set_exception(errors.Internal(f"index search failed: {e}"))

    # -- fetch and embed ---------------------------------------------------------------

    def fetch_response_bytes(self, n: int, with_keys: bool) -> int:
        """Upper bound of a Fetch response's size: values, keys, framing."""
        per_id = 2 * math.prod(self.bank.value_shape) + (4 * self.bank.key_dim if with_keys else 0)
        return n * per_id + 4096

    def check_fetch_size(self, n: int, with_keys: bool) -> None:
        """InvalidArgument, before anything is gathered, when the answer to a Fetch of n
        ids would exceed the message limit (as ``validate_search`` does for Search)."""
        limit = self.limits.max_message_bytes
        need = self.fetch_response_bytes(n, with_keys)
        if need <= limit:
            return
        per_id = self.fetch_response_bytes(1, with_keys) - self.fetch_response_bytes(0, False)
        fit = max((limit - self.fetch_response_bytes(0, False)) // per_id, 0)
        raise errors.InvalidArgument(
            f"a Fetch of {n} ids{' with keys' if with_keys else ''} needs a response of "
            f"{need} bytes, over the server's {limit}-byte message limit (bankd serve "
            f"--max-message-mb); fetch at most {fit} ids per call"
        )

    def fetch(self, ids: list[int], with_keys: bool) -> tuple[np.ndarray, np.ndarray | None]:
        if not ids:
            raise errors.InvalidArgument("fetch needs at least one id")
        if len(ids) > self.limits.max_fetch:
            raise errors.InvalidArgument(
                f"{len(ids)} ids is over the fetch limit of {self.limits.max_fetch}"
            )
        self.check_fetch_size(len(ids), with_keys)
        rows = self.bank.rows_of(np.asarray(ids, dtype=np.int64))
        if (rows < 0).any():
            missing = [ids[i] for i in np.flatnonzero(rows < 0)[:10]]
            raise errors.NotFound(f"unknown entry ids: {missing}")
        values = gather_values(self.bank.values, rows[None, :])[0]
        keys = np.asarray(self.bank.keys[rows], dtype=np.float32) if with_keys else None
        return values, keys

    def embed(self, images: list[bytes], texts: list[str]) -> np.ndarray:
        if self.embedder is None:
            raise errors.FailedPrecondition(
                "this server has no encoder loaded, so it cannot embed; start it with the "
                "bank's encoder available (bankd serve --encoder <id|dir>)"
            )
        if not images:
            raise errors.InvalidArgument("embed needs at least one image")
        if len(images) > self.limits.max_embed:
            raise errors.InvalidArgument(
                f"{len(images)} images is over the embed limit of {self.limits.max_embed}"
            )
        if texts and len(texts) != len(images):
            raise errors.InvalidArgument(f"{len(texts)} texts for {len(images)} images")
        decoded = decode_images(images, self.limits.max_embed_pixels)
        return np.asarray(self.embedder.embed(decoded, list(texts) or None), dtype=np.float32)
