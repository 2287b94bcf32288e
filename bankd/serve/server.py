"""The bankd server's lifecycle: binding, health, reflection, limits, loading, draining.

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

import logging
import threading
import time
from concurrent import futures
from dataclasses import asdict
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from bankd.serve.flags import ServerConfig
from bankd.serve.malformed import UndecodableRequests
from bankd.serve.metrics import Metrics
from bankd.serve.security import ServerSecurity
from bankd.serve.service import BankService
from bankd.serve.servicer import SERVICE_NAME, MemoryBankServicer, add_memory_bank
from bankd.serve.shm import MappedRegions, Sweeper
from bankd.store.reader import Bank
from bankd_client import errors
from bankd_client.channel import HTTP2_MAX_FRAME_BYTES
from bankd_client.shm import available as shm_available

log = logging.getLogger(__name__)


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
        add_memory_bank(self.servicer, self._grpc)
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
                threads=self.config.threads,
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

        seed = bank.manifest.seed
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
