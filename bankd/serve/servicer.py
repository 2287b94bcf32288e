"""The gRPC edge of bankd: the MemoryBank servicer and its registration.

``_rpc`` is the one place where a failure becomes a status code and metrics; each
handler converts protobuf to numpy and back and leaves the rest to ``BankService``
(``bankd.serve.service``). Search answers are written by ``bankd.serve.wire`` and
registered with a serializer that passes those bytes through (``add_memory_bank``).
The server's lifecycle (binding, loading, draining) is ``bankd.serve.server``'s.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from functools import wraps
from typing import Any

import grpc
import numpy as np

from bankd.serve import wire
from bankd.serve.metrics import Metrics
from bankd.serve.service import BankService
from bankd.serve.shm import MappedRegions
from bankd_client import errors, tensors
from bankd_client.proto import bankd_pb2 as pb
from bankd_client.proto import bankd_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["MemoryBank"].full_name
STREAM_WINDOW = 64  # requests one stream may have in flight


def _rpc(method: str) -> Callable:
    """Wrap a unary handler: metrics, and BankError/ValueError -> status code."""

    def deco(fn: Callable) -> Callable:
        @wraps(fn)
        def handler(self: MemoryBankServicer, request: Any, context: grpc.ServicerContext) -> Any:
            m = self.metrics
            code = grpc.StatusCode.OK
            m.inflight.inc()
            t0 = time.perf_counter()
            try:
                with self.in_flight():
                    service = self.service_or_unavailable()
                    return fn(self, service, request, context)
            except Exception as e:  # one place maps every failure to a status
                err = _as_bank_error(e)
                code = err.code
                context.abort(code, err.message)
            finally:
                m.inflight.dec()
                m.requests.labels(method=method, code=code.name).inc()
                if method == "Search":
                    m.search_latency.labels(method="Search").observe(time.perf_counter() - t0)

        return handler

    return deco


def _serialize(message: bytes | Any) -> bytes:
    """Search answers come serialized already (``bankd.serve.wire``); the rest are
    protobuf messages."""
    return message if isinstance(message, bytes) else message.SerializeToString()


_HANDLER_KINDS = {  # (client streams, server streams) -> grpc's handler factory
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def add_memory_bank(servicer: MemoryBankServicer, server: grpc.Server) -> None:
    """What the generated ``add_MemoryBankServicer_to_server`` does, read from the
    service's descriptor, with a serializer that passes bytes through."""
    handlers = {}
    for method in pb.DESCRIPTOR.services_by_name["MemoryBank"].methods:
        parse = getattr(pb, method.input_type.name).FromString
        kind = _HANDLER_KINDS[method.client_streaming, method.server_streaming]
        handlers[method.name] = kind(getattr(servicer, method.name), parse, _serialize)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)


def _as_bank_error(e: Exception) -> errors.BankError:
    if isinstance(e, errors.BankError):
        return e
    if isinstance(e, ValueError):
        return errors.InvalidArgument(str(e))
    log.exception("internal error")
    return errors.Internal(f"{type(e).__name__}: {e}")


def _deadline(timeout: float | None) -> float | None:
    return None if timeout is None else time.monotonic() + timeout


def _exclude_lists(request: pb.SearchRequest) -> list[list[int]] | None:
    return [list(e.ids) for e in request.exclude] if len(request.exclude) else None


class MemoryBankServicer(pb_grpc.MemoryBankServicer):
    """Converts between protobuf and the pb-free BankService."""

    def __init__(self, metrics: Metrics, regions: MappedRegions | None = None) -> None:
        self.metrics = metrics
        self.regions = regions  # None: values always travel in the response
        self.service: BankService | None = None
        self.draining = False
        self._calls = 0  # MemoryBank calls being answered
        self._calls_changed = threading.Condition()

    def service_or_unavailable(self) -> BankService:
        if self.service is None:
            raise errors.Unavailable("the bank is still loading")
        return self.service

    def admit(self) -> None:
        """Count a call in flight, or refuse it with UNAVAILABLE while draining."""
        with self._calls_changed:
            if self.draining:
                raise errors.Unavailable("the server is shutting down; retry")
            self._calls += 1

    def release(self) -> None:
        with self._calls_changed:
            self._calls -= 1
            self._calls_changed.notify_all()

    @contextlib.contextmanager
    def in_flight(self) -> Iterator[None]:
        self.admit()
        try:
            yield
        finally:
            self.release()

    def drain(self, timeout: float) -> bool:
        """Refuse new calls; wait up to timeout for those in flight (True: all done)."""
        with self._calls_changed:
            self.draining = True
            return self._calls_changed.wait_for(lambda: self._calls == 0, timeout)

    def _timeout(self, context: grpc.ServicerContext) -> float | None:
        left = context.time_remaining()
        return None if left is None or left > 1e6 else left

    @_rpc("GetInfo")
    def GetInfo(self, service: BankService, request: Any, context: Any) -> pb.GetInfoResponse:
        return service.info().to_pb()

    def _region(
        self, service: BankService, request: pb.SearchRequest, keys: np.ndarray
    ) -> np.ndarray | None:
        """The request's shared-memory region for its values, when this server can
        write there (see ``bankd.serve.shm``); None: the values go in the response."""
        if self.regions is None or not request.HasField("values_region"):
            return None
        if not request.with_values:
            return None
        return service.values_region(self.regions, request.values_region, keys, request.k)

    def _values(
        self,
        service: BankService,
        result: Any,
        with_values: bool,
        region: np.ndarray | None,
    ) -> wire.Fill | wire.InRegion | None:
        """The response's values: none, written into the region, or gathered into the
        message as it is serialized."""
        if not with_values:
            return None
        if region is not None:
            self.metrics.values_bytes.labels(transport="shared_memory").inc(region.nbytes)
            return service.values_into(result, region)
        fill = service.values_fill(result)
        self.metrics.values_bytes.labels(transport="message").inc(fill.nbytes)
        return fill

    @_rpc("Search")
    def Search(self, service: BankService, request: pb.SearchRequest, context: Any) -> bytes:
        with service.arriving():
            keys = tensors.decode(request.keys, name="keys")
            region = self._region(service, request, keys)
            pending = service.submit(
                keys,
                request.k,
                _exclude_lists(request),
                _deadline(self._timeout(context)),
                request.with_values and region is None,
                service.search_overrides(request.nprobe, request.ef_search),
                inline=True,
            )
        result = pending.result()
        values = self._values(service, result, request.with_values, region)
        self.metrics.query_rows.inc(len(keys))
        return wire.search_response(result.ids, result.scores, request.request_id, values)

    def SearchStream(
        self, request_iterator: Iterator[pb.SearchRequest], context: grpc.ServicerContext
    ) -> Iterator[bytes | pb.SearchStreamResponse]:
        """Requests are queued as they arrive; answers go out as searches complete.

        Counted twice in ``bankd_requests_total``: each message's answer as
        ``SearchStream.message`` with its own code (a stream carries errors per message),
        and the stream once as ``SearchStream``: OK, or CANCELLED when the client went
        away before every request was answered.
        """
        m = self.metrics
        try:
            service = self.service_or_unavailable()
            self.admit()
        except errors.BankError as e:
            m.requests.labels(method="SearchStream", code=e.code.name).inc()
            context.abort(e.code, e.message)
        done: queue.Queue = queue.Queue()
        window = threading.Semaphore(STREAM_WINDOW)
        m.inflight.inc()

        client_gone = threading.Event()

        def reader() -> None:
            submitted = 0
            try:
                for req in request_iterator:
                    window.acquire()
                    submitted += 1
                    t0 = time.perf_counter()
                    try:
                        with service.arriving():
                            keys = tensors.decode(req.keys, name="keys")
                            region = self._region(service, req, keys)
                            fut = service.submit(
                                keys,
                                req.k,
                                _exclude_lists(req),
                                with_values=req.with_values and region is None,
                                params=service.search_overrides(req.nprobe, req.ef_search),
                            )
                    except Exception as e:
                        done.put((req, t0, None, None, _as_bank_error(e)))
                        continue
                    fut.add_done_callback(
                        lambda f, r=req, t=t0, g=region: done.put((r, t, f, g, None))
                    )
            except Exception:  # the client went away; answer what was submitted
                client_gone.set()
            finally:
                done.put(submitted)

        threading.Thread(target=reader, name="bankd-stream-reader", daemon=True).start()
        answered, total = 0, None
        try:
            while total is None or answered < total:
                try:
                    item = done.get(timeout=1.0)
                except queue.Empty:
                    if not context.is_active():
                        client_gone.set()
                        return
                    continue
                if isinstance(item, int):
                    total = item
                    continue
                yield self._stream_answer(service, *item)
                answered += 1
                window.release()
        except GeneratorExit:  # gRPC closes the generator of a cancelled call
            client_gone.set()
            raise
        finally:
            self.release()
            m.inflight.dec()
            code = "CANCELLED" if client_gone.is_set() else "OK"
            m.requests.labels(method="SearchStream", code=code).inc()

    def _stream_answer(
        self,
        service: BankService,
        req: pb.SearchRequest,
        t0: float,
        fut: Any,
        region: np.ndarray | None,
        err: Any,
    ) -> bytes | pb.SearchStreamResponse:
        m = self.metrics
        if err is None:
            try:
                result = fut.result()
                values = self._values(service, result, req.with_values, region)
                out = wire.stream_response(req.request_id, result.ids, result.scores, values)
                m.query_rows.inc(len(result.ids))
                m.search_latency.labels(method="SearchStream").observe(time.perf_counter() - t0)
                m.requests.labels(method="SearchStream.message", code="OK").inc()
                return out
            except Exception as e:
                err = _as_bank_error(e)
        m.requests.labels(method="SearchStream.message", code=err.code.name).inc()
        return pb.SearchStreamResponse(
            request_id=req.request_id, error=pb.Error(code=err.code.value[0], message=err.message)
        )

    @_rpc("Fetch")
    def Fetch(
        self, service: BankService, request: pb.FetchRequest, context: Any
    ) -> pb.FetchResponse:
        values, keys = service.fetch(list(request.ids), request.with_keys)
        msg = pb.FetchResponse(values=tensors.encode(values, name="values"))
        if keys is not None:
            msg.keys.CopyFrom(tensors.encode(keys, name="keys"))
        return msg

    @_rpc("Embed")
    def Embed(
        self, service: BankService, request: pb.EmbedRequest, context: Any
    ) -> pb.EmbedResponse:
        keys = service.embed(list(request.images), list(request.texts))
        return pb.EmbedResponse(keys=tensors.encode(np.ascontiguousarray(keys), name="keys"))
