"""The gRPC edge of bankd: servicer, health, reflection, limits, lifecycle.

    server = BankServer(ServerConfig(index="bank/bank.faiss", port=0)).start()
    server.wait_loaded(); ...; server.stop()

The server listens before the bank is loaded and reports NOT_SERVING on the standard
health service until it is (MemoryBank calls answer UNAVAILABLE meanwhile). gRPC's own
``maximum_concurrent_rpcs`` answers RESOURCE_EXHAUSTED past the concurrency limit.
On SIGTERM the health status turns NOT_SERVING, new MemoryBank calls are answered
UNAVAILABLE (which clients retry), and requests in flight drain for up to ``grace_s``
before the process exits. TLS, mutual TLS and bearer-token auth are
``bankd.serve.security``'s; the files are read and checked before anything binds.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import asdict, dataclass
from functools import wraps
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from bankd.serve.malformed import UndecodableRequests
from bankd.serve.metrics import Metrics
from bankd.serve.security import ServerSecurity
from bankd.serve.service import BankService, ServiceLimits
from bankd.serve.shm import MappedRegions, Sweeper
from bankd.store.reader import Bank
from bankd_client import errors, tensors, wire
from bankd_client.client import HTTP2_MAX_FRAME_BYTES
from bankd_client.proto import bankd_pb2 as pb
from bankd_client.proto import bankd_pb2_grpc as pb_grpc
from bankd_client.shm import available as shm_available

log = logging.getLogger(__name__)
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["MemoryBank"].full_name
STREAM_WINDOW = 64  # requests one stream may have in flight


@dataclass(frozen=True)
class ServerConfig:
    """Everything `bankd serve` takes; logged at start."""

    index: str
    host: str = "127.0.0.1"
    port: int = 50051
    metrics_port: int | None = 9100
    metrics_host: str = "127.0.0.1"
    device: str = "auto"
    flat_search: str = "auto"  # CPU flat indexes: "auto" (bankd's kernel if built), "faiss"
    max_concurrent_rpcs: int = 64
    workers: int = 0  # gRPC handler threads; 0 = max_concurrent_rpcs + 8
    grace_s: float = 10.0
    verify: bool = True
    encoder: str | None = None  # load this encoder for Embed instead of the bank's
    no_embed: bool = False
    mmap_index: bool = False  # map the index's vectors from the file (larger-than-RAM banks)
    limits: ServiceLimits = ServiceLimits()
    tls_cert: str | None = None  # PEM certificate chain; with tls_key: serve TLS
    tls_key: str | None = None  # PEM private key (unencrypted)
    tls_client_ca: str | None = None  # PEM CA bundle: clients need a cert it signed (mTLS)
    auth_token_file: str | None = None  # bearer token every MemoryBank call must carry
    health_port: int | None = None  # plaintext port serving grpc.health.v1 alone; 0 = free
    shared_memory: bool = True  # write values into same-host clients' /dev/shm regions


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
    """Search answers come serialized already (``bankd_client.wire``); the rest are
    protobuf messages."""
    return message if isinstance(message, bytes) else message.SerializeToString()


_HANDLER_KINDS = {  # (client streams, server streams) -> grpc's handler factory
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def _add_memory_bank(servicer: MemoryBankServicer, server: grpc.Server) -> None:
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


class BankServer:
    """A bankd process's server: gRPC + health + reflection + metrics endpoint."""

    def __init__(self, config: ServerConfig, metrics: Metrics | None = None) -> None:
        self.config = config
        self.metrics = metrics or Metrics()
        self.health = health.HealthServicer()
        self.regions = MappedRegions() if config.shared_memory and shm_available() else None
        self._sweeper: Sweeper | None = None
        self.servicer = MemoryBankServicer(self.metrics, self.regions)
        self.loaded = threading.Event()
        self.load_error: BaseException | None = None
        self.port: int | None = None
        self.metrics_port: int | None = None
        self.health_port: int | None = None
        self._metrics_http: Any = None
        self._health_grpc: Any = None
        self.security = ServerSecurity.from_files(
            tls_cert=config.tls_cert,
            tls_key=config.tls_key,
            tls_client_ca=config.tls_client_ca,
            auth_token_file=config.auth_token_file,
        )
        limit = config.limits.max_message_bytes
        self._grpc = grpc.server(
            futures.ThreadPoolExecutor(
                max_workers=config.workers or config.max_concurrent_rpcs + 8,
                thread_name_prefix="bankd-rpc",
            ),
            maximum_concurrent_rpcs=config.max_concurrent_rpcs,
            interceptors=[
                *self.security.interceptors(self.metrics),  # first: auth before parsing
                UndecodableRequests(SERVICE_NAME, self.metrics),
            ],
            options=[
                ("grpc.max_send_message_length", limit),
                ("grpc.max_receive_message_length", limit),
                ("grpc.so_reuseport", 0),
                ("grpc.http2.max_frame_size", HTTP2_MAX_FRAME_BYTES),  # see bankd_client
                # Clients ping every 30 s on long streams; accept that instead of
                # answering GOAWAY "too many pings".
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
            ],
        )

    def start(self, *, load_in_background: bool = False) -> BankServer:
        log.info("bankd config: %s", asdict(self.config))
        _add_memory_bank(self.servicer, self._grpc)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._grpc)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self._grpc
        )
        for name in ("", SERVICE_NAME):
            self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        address = f"{self.config.host}:{self.config.port}"
        if self.security.credentials is not None:
            self.port = self._grpc.add_secure_port(address, self.security.credentials)
        else:
            self.port = self._grpc.add_insecure_port(address)
        if not self.port:
            raise errors.Unavailable(f"cannot bind {address}")
        self._grpc.start()
        if self.config.health_port is not None:
            self._start_health_port()
        if self.config.metrics_port is not None:
            self._metrics_http, self.metrics_port = self.metrics.serve_http(
                self.config.metrics_port, self.config.metrics_host
            )
        log.info(
            "listening on %s:%d (%s; metrics on %s)",
            self.config.host,
            self.port,
            self.security.describe(),
            self.metrics_port,
        )
        if not self.security.tls and not self.security.token and not _loopback(self.config.host):
            log.warning(
                "serving %s in plaintext without authentication: anyone who can reach it "
                "can read the bank (--tls-cert/--tls-key, --auth-token-file)",
                address,
            )
        if self.regions is not None:
            self._sweeper = Sweeper(self.regions)
        if load_in_background:
            threading.Thread(target=self._load, name="bankd-load", daemon=True).start()
        else:
            self._load()
        return self

    def _start_health_port(self) -> None:
        """The same health statuses, plaintext, on a port of their own.

        Kubernetes' gRPC probes and Docker's HEALTHCHECK cannot speak TLS; this port
        answers grpc.health.v1 only (every other method is UNIMPLEMENTED, no reflection),
        so it reveals no more than whether the bank is being served.
        """
        self._health_grpc = grpc.server(
            futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="bankd-health"),
            options=[("grpc.so_reuseport", 0)],
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._health_grpc)
        address = f"{self.config.host}:{self.config.health_port}"
        self.health_port = self._health_grpc.add_insecure_port(address)
        if not self.health_port:
            self._grpc.stop(0)
            raise errors.Unavailable(f"cannot bind the health port {address}")
        self._health_grpc.start()
        log.info(
            "health (grpc.health.v1 only, plaintext) on %s:%d", self.config.host, self.health_port
        )

    def _load(self) -> None:
        try:
            t0 = time.perf_counter()
            bank = Bank.load(
                self.config.index, verify=self.config.verify, mmap_index=self.config.mmap_index
            )
            embedder = None if self.config.no_embed else _load_embedder(bank, self.config)
            self.servicer.service = BankService(
                bank,
                device=self.config.device,
                flat_search=self.config.flat_search,
                limits=self.config.limits,
                metrics=self.metrics,
                embedder=embedder,
            )
            log.info(
                "loaded %s: %d entries, key dim %d, search on %s, embed %s (%.1f s)",
                self.config.index,
                bank.entries,
                bank.key_dim,
                self.servicer.service.searcher.engine(),
                "on" if embedder else "off",
                time.perf_counter() - t0,
            )
            for name in ("", SERVICE_NAME):
                self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
            self.metrics.ready.set(1)
            if not self.config.mmap_index:  # --mmap-index: larger than RAM, demand-paged
                threading.Thread(
                    target=_warm_values, args=(bank,), name="bankd-warm-values", daemon=True
                ).start()
        except BaseException as e:
            self.load_error = e
            raise
        finally:
            self.loaded.set()

    def wait_loaded(self, timeout: float | None = None) -> None:
        if not self.loaded.wait(timeout):
            raise TimeoutError("bank not loaded in time")
        if self.load_error is not None:
            raise self.load_error

    def stop(self, grace: float | None = None) -> None:
        """Turn NOT_SERVING, drain requests in flight for up to grace seconds, stop.

        New calls are refused with UNAVAILABLE by the servicer while the drain lasts:
        gRPC's own shutdown answers the calls that reach it meanwhile CANCELLED
        (grpc/grpc#41785), which clients do not retry.
        """
        grace = self.config.grace_s if grace is None else grace
        self.health.enter_graceful_shutdown()
        self.metrics.ready.set(0)
        t0 = time.monotonic()
        self.servicer.drain(grace)
        self._grpc.stop(max(0.0, grace - (time.monotonic() - t0))).wait()
        if self._health_grpc is not None:
            self._health_grpc.stop(0).wait()
        if self.servicer.service is not None:
            self.servicer.service.close()
        if self._sweeper is not None:
            self._sweeper.stop()
            self.regions.clear()
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()

    def wait(self) -> None:
        self._grpc.wait_for_termination()


def _warm_values(bank: Bank) -> None:
    t0 = time.perf_counter()
    if bank.warm_values():
        log.info(
            "values mapped in (%.0f MB, %.1f s)", bank.values.nbytes / 1e6, time.perf_counter() - t0
        )
    else:
        log.info("values left demand-paged (over half of the available memory)")


def _loopback(host: str) -> bool:
    return host in ("localhost", "::1", "[::1]") or host.startswith("127.")


def _load_embedder(bank: Bank, config: ServerConfig) -> Any:
    """The bank's encoder + key function for Embed, or None (logged) if unavailable."""
    kf = bank.key_function()
    vision = bank.fingerprint("vision_encoder")
    if kf is None or vision is None:
        log.warning("bank has no key function or encoder fingerprint: Embed is off")
        return None
    name = config.encoder or vision.model_id
    try:
        from bankd.models.embedder import Embedder

        seed = int(bank.manifest.get("config", {}).get("seed", 0))
        return Embedder.from_bank(
            name,
            seed=seed,
            key_config=kf[0],
            key_weights=kf[1],
            expected_vision=vision,
            device="cpu",
        )
    except Exception as e:
        log.warning("cannot load encoder %r for Embed (%s): Embed is off", name, e)
        return None
