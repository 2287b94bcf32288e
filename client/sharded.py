"""ShardedBankClient: one bank split into S shards, one bankd per shard, searched as one.

    from bankd_client import ShardedBankClient
    with ShardedBankClient(["bankd-0:50051", "bankd-1:50051", "bankd-2:50051"]) as bank:
        hits = bank.search(keys, k=5, exclude_ids=[[3], [17]])  # same Hits as BankClient

The shards are complete banks written by ``bankd shard`` (entry ids kept, so exclusion
stays global); a shard's target may name several replicas of it, balanced as BankClient
balances them (``load_balancing="round_robin"``). Each call goes to every shard at once
(gRPC futures, no threads); search merges the S per-shard top-k lists per query into the
exact global top-k. Values: only k of the S * k hits per query survive the merge, so
once the values the merge would drop pass 1 MiB, shards are asked for ids and scores
only, and the winners' values are fetched after the merge from the shard that holds
each (one Fetch per shard, at once): a second round trip instead of S times the value
bytes. A batch whose response would be over the message limit is split into row chunks
as BankClient splits it. A shard that fails fails the call with its usual error class,
the message naming the shard: never partial results.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np

from . import errors, tensors
from .chunking import HIT_BYTES, RESPONSE_FRAMING_BYTES, end_of, join_hits, time_left
from .client import BankClient
from .merge import combine_info, merge_with_source
from .proto import bankd_pb2 as pb
from .types import BankInfo, Hits, SearchQuery

_PROBE_IDS = 64  # ids probed at once when a fetch spans shards
SEPARATE_VALUES_OVER = 1 << 20  # dropped value bytes past which values come in a 2nd round
_FETCH_CHUNK = 16_384  # ids per Fetch call (a server takes up to 65536)


@dataclass
class _PendingSearch:
    """The Search calls of one batch (or of one row chunk of it) in flight, and what
    finishing it takes."""

    calls: list[tuple[int, grpc.Future]]
    k: int
    fetch_values: bool  # ids only were asked for: fetch the winners' values after the merge
    end: float | None  # the batch's deadline (time.monotonic), None: none
    last: bool  # the batch's last chunk: its hits are complete once this one is in
    as_torch: bool


class ShardedBankClient:
    """Client of a bank served as S shards; the same calls and results as BankClient.

    Args:
        targets: one gRPC target per shard, in shard order ("bankd-0:50051", ...).
        separate_values_over: when the values of the hits the merge drops
            ((S - 1) * B * k values) would pass this many bytes, search asks the shards
            for ids and scores only and fetches the winners' values afterwards; None:
            values always come with the search.
        **options: BankClient's keyword options (timeout, TLS, token, message size,
            retries, ...), applied to every shard's channel.

    info() checks that the shards agree (key dim, value shape, metric, index type,
    encoder fingerprints, key function) and sums their entries; search calls it once
    (then cached) to learn each shard's k limit.

    With a flat index split by ``bankd shard``, search returns the unsharded server's
    ids, scores and values: scores bit for bit when every server searches the same
    batch with the same number of BLAS threads (either changes how the matrix product
    is blocked, which may move a score's last bit, sharded or not: a server merging
    concurrent requests into one search does it too). Among exactly tied scores, ids
    are in entry-id order (FAISS's own order among ties is its heap's), and a tie cut
    at k may keep other members of it. IVF/HNSW shards are indexed on their own, so
    their approximate results are not the unsharded index's.
    """

    def __init__(
        self,
        targets: Sequence[str],
        *,
        separate_values_over: int | None = SEPARATE_VALUES_OVER,
        **options: Any,
    ) -> None:
        targets = [targets] if isinstance(targets, str) else list(targets)
        if not targets:
            raise ValueError("ShardedBankClient needs at least one shard target")
        if len(set(targets)) != len(targets):
            raise ValueError(f"a shard target is listed twice: {targets}")
        self.targets = targets
        self.separate_values_over = separate_values_over
        self.shards: list[BankClient] = []
        try:
            for target in targets:
                self.shards.append(BankClient(target, **options))
        except BaseException:
            self.close()
            raise
        self.timeout = self.shards[0].timeout
        # What BankClient's batch split (rows_per_call, _chunks) reads, the same for all.
        self.max_message_bytes = self.shards[0].max_message_bytes
        self.split_batches = self.shards[0].split_batches
        self._info: BankInfo | None = None
        self._shard_infos: list[BankInfo] = []

    # -- lifecycle ---------------------------------------------------------------------

    def close(self) -> None:
        for shard in self.shards:
            shard.close()

    def __enter__(self) -> ShardedBankClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Block until every shard reports SERVING (Unavailable naming the first that does not)."""
        import time

        end = time.monotonic() + timeout
        for i, shard in enumerate(self.shards):
            try:
                shard.wait_ready(timeout=max(end - time.monotonic(), 0.05))
            except errors.BankError as e:
                raise self._named(i, e) from None

    # -- fan-out -----------------------------------------------------------------------

    def _named(self, i: int, error: errors.BankError) -> errors.BankError:
        """The same error class, its message prefixed with the shard's index and target."""
        return errors.error_for_code(
            error.code, f"shard {i} of {len(self.shards)} ({self.targets[i]}): {error.message}"
        )

    def _submit(
        self, rpc: str, requests: Sequence[Any], timeout: float | None
    ) -> list[tuple[int, grpc.Future]]:
        """Start one call per shard (requests in shard order); no waiting."""
        calls = []
        for i, request in enumerate(requests):
            shard = self.shards[i]  # its stub and token metadata: one client per shard
            method = getattr(shard._stub, rpc)
            future = method.future(
                request, timeout=self._timeout(timeout), metadata=shard._metadata
            )
            calls.append((i, future))
        return calls

    def _timeout(self, timeout: float | None) -> float | None:
        return self.timeout if timeout is None else timeout

    def _collect(self, calls: list[tuple[int, grpc.Future]]) -> list[Any]:
        """Every call's response; the first failure (in shard order) cancels the rest."""
        try:
            out = []
            for i, future in calls:
                try:
                    out.append(future.result())
                except grpc.RpcError as e:
                    raise self._named(i, errors.from_rpc_error(e)) from None
            return out
        finally:
            for _, future in calls:
                future.cancel()  # no-op on finished calls

    def _all(self, rpc: str, requests: Sequence[Any], timeout: float | None) -> list[Any]:
        return self._collect(self._submit(rpc, requests, timeout))

    # -- calls -------------------------------------------------------------------------

    def info(self, *, timeout: float | None = None, refresh: bool = False) -> BankInfo:
        """The sharded bank: summed entries, the shards' common shapes and encoders."""
        if self._info is None or refresh:
            requests = [pb.GetInfoRequest()] * len(self.shards)
            infos = [BankInfo.from_pb(r) for r in self._all("GetInfo", requests, timeout)]
            self._info = combine_info(self.targets, infos)
            self._shard_infos = infos
        return self._info

    def shard_infos(self, *, timeout: float | None = None, refresh: bool = False) -> list[BankInfo]:
        """Each shard's own BankInfo, in shard order."""
        self.info(timeout=timeout, refresh=refresh)
        return list(self._shard_infos)

    def _batch_chunks(
        self, q: SearchQuery, k: int, with_values: bool, timeout: float | None
    ) -> Iterator[tuple[Any, int, Any, float | None, bool, bool]]:
        """(keys, k, exclude_ids, deadline, last, as_torch) of each call one batch takes:
        itself, or the row chunks BankClient's split makes when its response would be
        over the message limit (the lowest shard's, or this client's)."""
        info = self.info(timeout=timeout)
        k = int(q.k or k)
        if not 1 <= k <= info.max_k:
            raise errors.InvalidArgument(f"k={k} is out of range; it must be 1..{info.max_k}")
        chunks = self._chunks(q.keys, q.exclude_ids, k, with_values)
        end = end_of(self._timeout(timeout))  # one deadline for all chunks of the batch
        as_torch = tensors.is_torch_tensor(q.keys)
        for i, (keys, exclude) in enumerate(chunks):
            yield keys, k, exclude, end, i == len(chunks) - 1, as_torch

    def _start_search(
        self,
        keys: Any,
        k: int,
        exclude_ids: Any,
        with_values: bool,
        end: float | None,
        last: bool,
        as_torch: bool,
        params: dict[str, int | None],
    ) -> _PendingSearch:
        """Send the same batch to every shard (k capped at each one's size)."""
        info = self.info()
        base = self.shards[0]._search_request(keys, k, exclude_ids, with_values, **params)
        b = base.keys.shape[0]
        value_bytes = 2 * int(np.prod(info.value_shape))
        framing = RESPONSE_FRAMING_BYTES
        if with_values and b * k * (HIT_BYTES + value_bytes) + framing > info.max_message_bytes:
            raise errors.InvalidArgument(  # as the unsharded server would answer
                f"B={b}, k={k} needs a response over the {info.max_message_bytes}-byte "
                "message limit; split the batch"
            )
        # Values of hits the merge drops are wasted bytes: (S - 1) / S of them. Past a
        # small amount, ask for ids only and fetch the winners' values in a second round.
        dropped = (len(self.shards) - 1) * b * k * value_bytes
        limit = self.separate_values_over
        fetch_values = with_values and limit is not None and dropped > limit
        if fetch_values:
            base.with_values = False
        requests = []
        for shard_info in self._shard_infos:
            if k <= shard_info.max_k:
                requests.append(base)
            else:  # a shard smaller than k: all of its entries are candidates
                capped = pb.SearchRequest()
                capped.CopyFrom(base)
                capped.k = shard_info.max_k
                requests.append(capped)
        calls = self._submit("Search", requests, time_left(end))
        return _PendingSearch(calls, k, fetch_values, end, last, as_torch)

    def _finish_search(self, pending: _PendingSearch) -> Hits:
        """The merged hits of one started search (numpy)."""
        parts = self._collect(pending.calls)  # Hits (BankClient's stub reads them)
        hits, source = merge_with_source(parts, pending.k, self.info().metric)
        if pending.fetch_values:
            hits.values = self._values_of(hits.ids, source, time_left(pending.end))
        return hits

    def _search_batches(
        self,
        batches: Iterable[Any],
        k: int,
        with_values: bool,
        timeout: float | None,
        window: int,
        params: dict[str, int | None],
    ) -> Iterator[Hits]:
        """Hits of each batch in input order, up to `window` searches (batches or row
        chunks of them) in flight; the chunks of a batch joined in order."""
        in_flight: deque[_PendingSearch] = deque()
        done: list[Hits] = []  # the finished chunks of the batch being put together

        def finish_one() -> Hits | None:
            pending = in_flight.popleft()
            done.append(self._finish_search(pending))
            if not pending.last:
                return None
            hits = join_hits(done)
            done.clear()
            return hits.to_torch() if pending.as_torch else hits

        try:
            for q in batches:
                if not isinstance(q, SearchQuery):
                    q = SearchQuery(keys=q)
                for keys, kq, exclude, end, last, as_torch in self._batch_chunks(
                    q, k, with_values, timeout
                ):
                    in_flight.append(
                        self._start_search(
                            keys, kq, exclude, with_values, end, last, as_torch, params
                        )
                    )
                    if len(in_flight) >= window and (hits := finish_one()) is not None:
                        yield hits
            while in_flight:
                if (hits := finish_one()) is not None:
                    yield hits
        finally:
            for pending in in_flight:
                for _, future in pending.calls:
                    future.cancel()

    def _values_of(self, ids: np.ndarray, source: np.ndarray, timeout: float | None) -> np.ndarray:
        """Values [B, k, 32, 96] of merged hits, fetched from the shards that returned
        them (one Fetch per shard, all at once); zeros where padded."""
        calls, slots = [], []
        for s, shard in enumerate(self.shards):
            rows, cols = np.nonzero(source == s)
            for lo in range(0, len(rows), _FETCH_CHUNK):
                r, c = rows[lo : lo + _FETCH_CHUNK], cols[lo : lo + _FETCH_CHUNK]
                request = pb.FetchRequest(ids=ids[r, c].tolist())
                future = shard._stub.Fetch.future(
                    request, timeout=self._timeout(timeout), metadata=shard._metadata
                )
                calls.append((s, future))
                slots.append((r, c))
        shape = self.info().value_shape
        values = np.zeros((*ids.shape, *shape), dtype=np.float16)
        for (r, c), msg in zip(slots, self._collect(calls), strict=True):
            values[r, c] = tensors.decode(msg.values, name="values")
        return values

    def search(
        self,
        keys: Any,
        k: int = 5,
        *,
        exclude_ids: Any = None,
        with_values: bool = True,
        timeout: float | None = None,
        nprobe: int | None = None,
        ef_search: int | None = None,
    ) -> Hits:
        """Top-k over all shards for B query keys [B, d]; same arguments as BankClient.search
        (nprobe / ef_search go to every shard, each checking them against its own index).

        A batch whose response would be over the message limit is split as BankClient
        splits it (``rows_per_call(k)`` rows per chunk); the chunks are searched one
        after another, each on every shard at once, within the call's one deadline."""
        params = {"nprobe": nprobe, "ef_search": ef_search}
        batch = SearchQuery(keys, exclude_ids=exclude_ids, k=k)
        (hits,) = self._search_batches([batch], k, with_values, timeout, 1, params)
        return hits

    def stream_search(
        self,
        queries: Iterable[Any],
        k: int = 5,
        *,
        with_values: bool = True,
        timeout: float | None = None,
        window: int = 4,
        nprobe: int | None = None,
        ef_search: int | None = None,
    ) -> Iterator[Hits]:
        """Search a stream of batches, up to `window` searches in flight; yields in input
        order.

        Items are keys [B, d] or ``SearchQuery(keys, exclude_ids, k)``, as for
        BankClient.stream_search; here each batch is one Search call per shard (a batch
        over the message limit: one per row chunk, as in ``search``; each chunk counts
        in the window), and timeout is each batch's deadline.
        """
        if window < 1:
            raise ValueError(f"window must be at least 1, got {window}")
        params = {"nprobe": nprobe, "ef_search": ef_search}
        yield from self._search_batches(queries, k, with_values, timeout, window, params)

    def fetch(self, ids: Any, *, with_keys: bool = False, timeout: float | None = None) -> Any:
        """Values [n, 32, 96] fp16 of entries by id (and keys [n, d] with with_keys).

        Fetch has no partial answers (an id a shard lacks is NOT_FOUND for the whole
        call), so the whole list goes to every shard first; when no single shard holds
        all of it, each id is asked of every shard on its own.
        """
        wanted = [int(i) for i in tensors.as_numpy(ids, name="ids").reshape(-1)]
        if not wanted:
            raise errors.InvalidArgument("fetch needs at least one id")
        unique = list(dict.fromkeys(wanted))
        found = self._fetch_whole(unique, with_keys, timeout)
        if found is None:
            found = self._fetch_each(unique, with_keys, timeout)
        values = np.stack([found[i][0] for i in wanted])
        conv = tensors.to_torch if tensors.is_torch_tensor(ids) else (lambda a: a)
        if with_keys:
            return conv(values), conv(np.stack([found[i][1] for i in wanted]))
        return conv(values)

    def _fetch_calls(
        self, ids: list[int], with_keys: bool, timeout: float | None
    ) -> list[tuple[int, grpc.Future]]:
        request = pb.FetchRequest(ids=ids, with_keys=with_keys)
        return self._submit("Fetch", [request] * len(self.shards), timeout)

    def _fetch_results(
        self, calls: list[tuple[int, grpc.Future]]
    ) -> list[tuple[int, pb.FetchResponse]]:
        """The (shard, response) of calls that found their ids; NOT_FOUND ones left out."""
        out = []
        for i, future in calls:
            try:
                out.append((i, future.result()))
            except grpc.RpcError as e:
                error = errors.from_rpc_error(e)
                if not isinstance(error, errors.NotFound):
                    for _, f in calls:
                        f.cancel()
                    raise self._named(i, error) from None
        return out

    @staticmethod
    def _rows(msg: pb.FetchResponse, with_keys: bool) -> tuple[np.ndarray, np.ndarray | None]:
        values = tensors.decode(msg.values, name="values")
        return values, tensors.decode(msg.keys, name="keys") if with_keys else None

    def _fetch_whole(
        self, ids: list[int], with_keys: bool, timeout: float | None
    ) -> dict[int, tuple[np.ndarray, np.ndarray | None]] | None:
        answered = self._fetch_results(self._fetch_calls(ids, with_keys, timeout))
        if not answered:
            if len(ids) == 1:
                raise errors.NotFound(f"unknown entry ids: {ids}")
            return None
        values, keys = self._rows(answered[0][1], with_keys)
        return {e: (values[j], None if keys is None else keys[j]) for j, e in enumerate(ids)}

    def _fetch_each(
        self, ids: list[int], with_keys: bool, timeout: float | None
    ) -> dict[int, tuple[np.ndarray, np.ndarray | None]]:
        found: dict[int, tuple[np.ndarray, np.ndarray | None]] = {}
        for start in range(0, len(ids), _PROBE_IDS):
            chunk = ids[start : start + _PROBE_IDS]
            probes = [(e, self._fetch_calls([e], with_keys, timeout)) for e in chunk]
            for e, calls in probes:
                for _, msg in self._fetch_results(calls):
                    values, keys = self._rows(msg, with_keys)
                    found[e] = (values[0], None if keys is None else keys[0])
        missing = [e for e in ids if e not in found]
        if missing:
            raise errors.NotFound(f"unknown entry ids: {missing[:10]}")
        return found

    def embed(
        self,
        images: Sequence[Any],
        texts: Sequence[str] | None = None,
        *,
        timeout: float | None = None,
    ) -> np.ndarray:
        """Query keys [n, d], computed by the first shard that has the bank's encoder."""
        infos = self.shard_infos(timeout=timeout)
        i = next((j for j, info in enumerate(infos) if info.embed_available), 0)
        try:
            return self.shards[i].embed(images, texts, timeout=timeout)
        except errors.BankError as e:
            raise self._named(i, e) from None

    # These use nothing but self.info(), which here is the shards' common (checked) view,
    # and the split options set in __init__: one notion of what fits in a message.
    check_encoder = BankClient.check_encoder
    rows_per_call = BankClient.rows_per_call
    _chunks = BankClient._chunks
