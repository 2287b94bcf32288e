"""BankClient: the typed Python facade over a remote bankd.

    from bankd_client import BankClient
    with BankClient("localhost:50051") as bank:
        info = bank.info()
        hits = bank.search(keys, k=5, exclude_ids=[[3], [17]])   # keys [B, d]
        hits.ids, hits.scores, hits.values    # [B, k] int64, [B, k] float32, [B, k, 32, 96] fp16

numpy in, numpy out; torch in, torch out. UNAVAILABLE is retried by gRPC's own retry
policy (service config), status codes come back as ``bankd_client.errors`` classes.
With ``load_balancing="round_robin"``, a target that resolves to several addresses
(replicas of one bank: a Kubernetes headless Service, "ipv4:10.0.0.1:50051,10.0.0.2:50051")
gets its calls spread over all of them, skipping a replica whose connection is down.
A batch whose response would be over the message limit (the server's or this
client's, whichever is lower) is split into row chunks that fit, searched one after
another and put back together in order. On the server's host, values arrive through
shared memory instead of the socket (``bankd_client.shm``; ``shared_memory=False``
turns that off).
"""

from __future__ import annotations

import io
import logging
import math
import os
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from . import errors, shm, tensors, wire
from .channel import DEFAULT_MAX_MESSAGE_BYTES, SERVICE_NAME, open_channel, search_stub
from .chunking import Deadline, end_of, fitting_rows, join_hits, row_chunks, time_left
from .identity import EncoderFingerprint, fingerprint_encoder
from .proto import bankd_pb2 as pb
from .types import BankInfo, Hits, SearchQuery, exclude_to_pb

log = logging.getLogger(__name__)
DEFAULT_TIMEOUT_S = 60.0


class BankClient:
    """Client of one bankd (or a load-balanced set of replicas behind one target).

    Args:
        target: "host:port", or any gRPC target that may resolve to several replicas
            of the bank ("dns:///bankd-headless.ns.svc.cluster.local:50051", one address
            per ready pod; "ipv4:10.0.0.1:50051,10.0.0.2:50051").
        timeout: default deadline of each call, in seconds (None: no deadline).
        tls: use TLS. Implied by root_certificates / client cert options.
        root_certificates: PEM (bytes or path) of the CA that signed the server's
            certificate; None with tls=True uses the system roots.
        client_certificate, client_key: PEM (bytes or path) for mutual TLS.
        server_name: the name the server's certificate must carry, when it is not the
            target's host (e.g. connecting by IP to a certificate issued for a DNS name).
        token: bearer token sent as "authorization: Bearer <token>" on every call; with
            TLS as call credentials, in plaintext as per-call metadata (gRPC refuses
            call credentials on an insecure channel).
        token_file: a file holding the token (read once, here), instead of token.
        max_message_bytes: send and receive limit (a response holds B * k * 32 * 96 * 2
            bytes of values; larger ones are split, see split_batches).
        retry_attempts: attempts per call when the server answers UNAVAILABLE (with
            round_robin, a retry goes to the next replica).
        load_balancing: gRPC load-balancing policy over the target's addresses.
            "round_robin": each call to the next replica with a working connection; a
            replica that drops out is reconnected in the background with gRPC's backoff
            (1 s growing to 120 s). None (gRPC's default) or "pick_first": every call to
            the first address that connects, so a client sticks to one replica; a
            dropped connection is reopened on the next call. Not round_robin by default
            because of that: a client idle while its one server restarts gets
            Unavailable until the backoff's next attempt, not a connection at once.
        split_batches: split a search whose response would be over the message limit
            (the server's ``info().max_message_bytes`` or max_message_bytes, the lower)
            into row chunks that fit, and join their answers in order. False: send it
            whole; the server refuses it with InvalidArgument.
        shared_memory: offer the server a region of a /dev/shm file for each search's
            values. A server on this host, running as this user, writes them there and
            the values cost no transfer (``Hits.values`` is then an array over that
            region, writable, reused once it and its views are gone). The first answer
            that comes back with the values in the message (another host, another user,
            ``bankd serve --no-shared-memory``) turns the offer off for this client;
            ``shared_memory_in_use`` tells which happened.
        options: extra channel options, overriding the defaults.
    """

    def __init__(
        self,
        target: str,
        *,
        timeout: float | None = DEFAULT_TIMEOUT_S,
        tls: bool = False,
        root_certificates: bytes | str | os.PathLike | None = None,
        client_certificate: bytes | str | os.PathLike | None = None,
        client_key: bytes | str | os.PathLike | None = None,
        server_name: str | None = None,
        token: str | None = None,
        token_file: str | os.PathLike | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        retry_attempts: int = 5,
        load_balancing: str | None = None,
        split_batches: bool = True,
        shared_memory: bool = True,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        conn = open_channel(
            target,
            tls=tls,
            root_certificates=root_certificates,
            client_certificate=client_certificate,
            client_key=client_key,
            server_name=server_name,
            token=token,
            token_file=token_file,
            max_message_bytes=max_message_bytes,
            retry_attempts=retry_attempts,
            load_balancing=load_balancing,
            options=options,
        )
        self.target = target
        self.timeout = timeout
        self.split_batches = split_batches
        self.max_message_bytes = conn.max_message_bytes
        self._channel = conn.channel
        self._metadata = conn.metadata
        self._stub = search_stub(self._channel)
        # None until an answer shows whether the server writes into our regions.
        self._shm_in_use: bool | None = None if shared_memory and shm.available() else False
        self._shm_pool: shm.RegionPool | None = None
        self._shm_lock = threading.Lock()
        self._info: BankInfo | None = None

    # -- lifecycle ---------------------------------------------------------------------

    def close(self) -> None:
        self._channel.close()
        if self._shm_pool is not None:
            self._shm_pool.close()

    @property
    def shared_memory_in_use(self) -> bool | None:
        """True: the server writes values into this client's shared memory; False:
        they come in the response messages; None: no answer with values yet."""
        return self._shm_in_use

    def __enter__(self) -> BankClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Block until the server reports SERVING on the standard health service."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        stub = health_pb2_grpc.HealthStub(self._channel)
        deadline = Deadline(timeout)
        while True:
            try:
                resp = stub.Check(
                    health_pb2.HealthCheckRequest(service=SERVICE_NAME),
                    timeout=max(deadline.left(), 0.05),
                    wait_for_ready=True,
                )
                if resp.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError as e:
                if deadline.left() <= 0:
                    raise errors.Unavailable(f"{self.target} not ready: {e.details()}") from None
            if deadline.left() <= 0:
                raise errors.Unavailable(f"{self.target} not SERVING after {timeout:.0f} s")
            deadline.sleep(0.05)

    # -- calls -------------------------------------------------------------------------

    def _call(self, method: Any, request: Any, timeout: float | None) -> Any:
        try:
            return method(
                request,
                timeout=self.timeout if timeout is None else timeout,
                metadata=self._metadata,
            )
        except grpc.RpcError as e:
            raise errors.from_rpc_error(e) from None

    def info(self, *, timeout: float | None = None, refresh: bool = False) -> BankInfo:
        """Entries, key dim, value shape, encoder fingerprint, key function, limits."""
        if self._info is None or refresh:
            self._info = BankInfo.from_pb(
                self._call(self._stub.GetInfo, pb.GetInfoRequest(), timeout)
            )
        return self._info

    def _search_request(
        self,
        keys: Any,
        k: int,
        exclude_ids: Any,
        with_values: bool,
        request_id: str = "",
        nprobe: int | None = None,
        ef_search: int | None = None,
        region: shm.Lease | None = None,
    ) -> pb.SearchRequest:
        arr = tensors.as_numpy(keys, name="keys")
        if arr.dtype not in (np.float32, np.float16):
            arr = arr.astype(np.float32)
        if arr.ndim != 2:
            raise errors.InvalidArgument(f"keys must be [B, d], got shape {list(arr.shape)}")
        try:
            exclude = exclude_to_pb(exclude_ids, arr.shape[0])
        except ValueError as e:
            raise errors.InvalidArgument(str(e)) from None
        return pb.SearchRequest(
            keys=tensors.encode(arr, name="keys"),
            k=int(k),
            exclude=exclude,
            with_values=with_values,
            request_id=request_id,
            nprobe=int(nprobe or 0),  # the server checks the range (one place, one message)
            ef_search=int(ef_search or 0),
            values_region=None
            if region is None
            else pb.SharedMemoryRegion(name=region.name, offset=region.offset, size=region.size),
        )

    # -- shared memory -----------------------------------------------------------------

    def _lease(self, keys: Any, k: int, with_values: bool) -> shm.Lease | None:
        """A region for one call's values, while the server may write into it."""
        if not with_values or self._shm_in_use is False or k < 1:
            return None
        nbytes = len(keys) * k * 2 * math.prod(self.info().value_shape)
        with self._shm_lock:
            if self._shm_pool is None:
                self._shm_pool = shm.RegionPool()
            pool = self._shm_pool
        try:
            return pool.lease(nbytes)
        except (OSError, RuntimeError) as e:  # /dev/shm full, or the client closed
            log.warning("no shared-memory region (%s): values come in the messages", e)
            self._shm_in_use = False
            return None

    def _placed(self, hits: Hits, region: shm.Lease | None) -> Hits:
        """Hits with their values read from the call's region when the server wrote
        them there; the region goes back to the pool when it was not used."""
        if not isinstance(hits.values, wire.InRegion):
            if region is not None:
                self._give_back(region)
                if hits.values is not None and self._shm_in_use is not False:
                    log.info("%s sends values in its messages (not on this host?)", self.target)
                    self._shm_in_use = False
            return hits
        if region is None:
            raise errors.Internal("the server answered with values in a region never offered")
        try:
            values = self._shm_pool.array(region, hits.values.dtype, hits.values.shape)
        except ValueError as e:
            self._give_back(region)
            raise errors.Internal(f"values in the shared-memory region: {e}") from None
        self._shm_in_use = True
        return replace(hits, values=values)

    def _give_back(self, region: shm.Lease | None) -> None:
        if region is not None:
            self._shm_pool.give_back(region)

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
        """Top-k entries for each of B query keys [B, d] (numpy or torch, fp32 or fp16).

        exclude_ids: None, or B lists of entry ids the matching query must not get
        (e.g. ``[[own_id] for own_id in batch_ids]``).
        nprobe / ef_search: the index's search parameter for this call only (IVF /
        HNSW banks; None: the bank's default, ``info().nprobe`` / ``.ef_search``).
        Past ``info().max_nprobe`` / ``.max_ef_search``, or on an index without the
        parameter, InvalidArgument.
        """
        chunks = self._chunks(keys, exclude_ids, k, with_values)
        end = end_of(self.timeout if timeout is None else timeout)
        parts = []
        for part_keys, part_exclude in chunks:
            region = self._lease(part_keys, k, with_values)
            try:
                request = self._search_request(
                    part_keys,
                    k,
                    part_exclude,
                    with_values,
                    nprobe=nprobe,
                    ef_search=ef_search,
                    region=region,
                )
                hits = self._call(self._stub.Search, request, time_left(end))
            except BaseException:
                self._give_back(region)
                raise
            parts.append(self._placed(hits, region))
        hits = join_hits(parts)
        return hits.to_torch() if tensors.is_torch_tensor(keys) else hits

    def rows_per_call(self, k: int, with_values: bool = True) -> int | None:
        """The most query rows whose response fits the message limit (the server's or
        this client's, the lower); None when no split applies (ids and scores only, or
        split_batches=False). InvalidArgument when not even one query's hits fit."""
        if not (with_values and self.split_batches) or k < 1:  # the server refuses k < 1
            return None
        return fitting_rows(self.info(), k, self.max_message_bytes)

    def _chunks(
        self, keys: Any, exclude_ids: Any, k: int, with_values: bool
    ) -> list[tuple[Any, Any]]:
        """(keys, exclude_ids) of each call a search takes: one, or row chunks that fit."""
        rows = self.rows_per_call(k, with_values) if len(keys) > 1 else None
        return row_chunks(keys, exclude_ids, rows)

    def stream_search(
        self,
        queries: Iterable[Any],
        k: int = 5,
        *,
        with_values: bool = True,
        timeout: float | None = None,
        nprobe: int | None = None,
        ef_search: int | None = None,
    ) -> Iterator[Hits]:
        """Search a stream of batches over one SearchStream call; yields in input order.

        Each item is a keys array [B, d] or a ``SearchQuery(keys, exclude_ids, k)``. The
        server works on several batches at once and may answer out of order; answers
        are put back in request order here by request id. nprobe / ef_search apply to
        every batch, as in ``search``.
        """
        torch_out: list[bool] = []
        parts: list[int] = []  # messages of each batch: 1, or its row chunks
        regions: dict[str, shm.Lease | None] = {}  # by request id, until answered
        if with_values:
            self.info()  # limits and value shape, fetched before the stream starts

        def requests() -> Iterator[pb.SearchRequest]:
            sent = 0  # request ids count messages
            for q in queries:
                if not isinstance(q, SearchQuery):
                    q = SearchQuery(keys=q)
                chunks = self._chunks(q.keys, q.exclude_ids, q.k or k, with_values)
                torch_out.append(tensors.is_torch_tensor(q.keys))
                parts.append(len(chunks))
                for part_keys, part_exclude in chunks:
                    region = self._lease(part_keys, q.k or k, with_values)
                    regions[str(sent)] = region
                    yield self._search_request(
                        part_keys,
                        q.k or k,
                        part_exclude,
                        with_values,
                        request_id=str(sent),
                        nprobe=nprobe,
                        ef_search=ef_search,
                        region=region,
                    )
                    sent += 1

        call = self._stub.SearchStream(
            requests(),
            timeout=self.timeout if timeout is None else timeout,
            metadata=self._metadata,
        )
        pending: dict[int, wire.StreamAnswer] = {}
        next_id, batch = 0, 0  # the next message and batch to hand out
        try:
            for response in call:
                pending[int(response.request_id)] = response
                # A batch goes out once all of its messages are in (parts[batch] is set
                # before its first message is sent).
                while batch < len(parts) and all(
                    next_id + j in pending for j in range(parts[batch])
                ):
                    answers = [pending.pop(next_id + j) for j in range(parts[batch])]
                    yield self._stream_result(answers, torch_out[batch], regions)
                    next_id += parts[batch]
                    batch += 1
        except grpc.RpcError as e:
            raise errors.from_rpc_error(e) from None
        finally:
            call.cancel()
            for region in list(regions.values()):  # never answered, or a failed batch
                self._give_back(region)
            regions.clear()
        if pending:
            raise errors.Internal(f"stream ended with unanswered requests {sorted(pending)}")

    def _stream_result(
        self,
        responses: list[wire.StreamAnswer],
        as_torch: bool,
        regions: dict[str, shm.Lease | None],
    ) -> Hits:
        """One batch's hits from the answers to its messages, in order."""
        for response in responses:
            if response.hits is None:
                code = errors.code_from_int(response.error_code)
                raise errors.error_for_code(code, response.error_message)
        hits = join_hits([self._placed(r.hits, regions.pop(r.request_id, None)) for r in responses])
        return hits.to_torch() if as_torch else hits

    def fetch(self, ids: Any, *, with_keys: bool = False, timeout: float | None = None) -> Any:
        """Values [n, 32, 96] fp16 of entries by id (and keys [n, d] with with_keys)."""
        id_list = [int(i) for i in tensors.as_numpy(ids, name="ids").reshape(-1)]
        msg = self._call(
            self._stub.Fetch, pb.FetchRequest(ids=id_list, with_keys=with_keys), timeout
        )
        values = tensors.decode(msg.values, name="values")
        as_torch = tensors.is_torch_tensor(ids)
        conv = tensors.to_torch if as_torch else (lambda a: a)
        if with_keys:
            return conv(values), conv(tensors.decode(msg.keys, name="keys"))
        return conv(values)

    def embed(
        self,
        images: Sequence[Any],
        texts: Sequence[str] | None = None,
        *,
        timeout: float | None = None,
    ) -> np.ndarray:
        """Query keys [n, d] for images (PIL images, encoded bytes or file paths)."""
        encoded = [_encode_image(im) for im in images]
        request = pb.EmbedRequest(images=encoded, texts=list(texts or []))
        return tensors.decode(self._call(self._stub.Embed, request, timeout).keys, name="keys")

    def check_encoder(
        self, encoder: Any, *, allow_mismatch: bool = False, model_id: str | None = None
    ) -> EncoderFingerprint:
        """Check that a vision encoder (torch module or fingerprint) is the bank's.

        Raises EncoderMismatch unless allow_mismatch; returns the encoder's fingerprint.
        """
        fp = (
            encoder
            if isinstance(encoder, EncoderFingerprint)
            else fingerprint_encoder(encoder, model_id)
        )
        bank_fp = self.info().vision_encoder
        if bank_fp is None:
            if not allow_mismatch:
                raise errors.EncoderMismatch(
                    "encoder mismatch: the bank records no vision encoder fingerprint"
                )
        elif not fp.matches(bank_fp) and not allow_mismatch:
            raise errors.EncoderMismatch(
                f"encoder mismatch: the bank's keys come from {bank_fp.short()}, "
                f"this encoder is {fp.short()}; retrieval with another encoder collapses "
                "accuracy (pass allow_mismatch=True to use it anyway)"
            )
        return fp


def _encode_image(image: Any) -> bytes:
    if isinstance(image, bytes):
        return image
    if isinstance(image, (str, os.PathLike)):
        return Path(image).read_bytes()
    if hasattr(image, "save"):  # PIL.Image
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return buf.getvalue()
    raise ValueError(f"cannot send {type(image).__name__} as an image (PIL image, bytes or path)")
