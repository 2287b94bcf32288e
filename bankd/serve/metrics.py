"""Prometheus metrics of a bankd server.

Names follow Prometheus conventions: ``bankd_`` prefix, base units, counters end in
``_total``, small fixed label sets. Each server gets its own CollectorRegistry (tests
run several servers in one process); process metrics are added to it.
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    start_http_server,
)

# Search on a small flat bank takes tens of microseconds; a 1M-entry CPU search of a
# big batch takes seconds. Buckets cover both ends.
SEARCH_BUCKETS = (
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.00075,
    0.001,
    0.0025,
    0.005,
    0.0075,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)


class Metrics:
    """The server's instruments, registered in one registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        self.search_latency = Histogram(
            "bankd_search_latency_seconds",
            "Time to answer one search request (Search or one SearchStream message), "
            "from arrival to response, values gathered.",
            ["method"],
            buckets=SEARCH_BUCKETS,
            registry=r,
        )
        self.index_search_latency = Histogram(
            "bankd_index_search_latency_seconds",
            "Time of one index search over a merged batch of requests.",
            buckets=SEARCH_BUCKETS,
            registry=r,
        )
        self.requests = Counter(
            "bankd_requests_total",
            "Requests answered, by method and gRPC status code.",
            ["method", "code"],
            registry=r,
        )
        self.query_rows = Counter("bankd_query_rows_total", "Query keys searched.", registry=r)
        self.merged_rows = Histogram(
            "bankd_merged_batch_rows",
            "Query rows per index search after merging concurrent requests.",
            buckets=ROW_BUCKETS,
            registry=r,
        )
        self.values_bytes = Counter(
            "bankd_values_bytes_total",
            "Bytes of values answered, by how they reached the client: in the response "
            "message, or written into the client's shared-memory region (same host).",
            ["transport"],
            registry=r,
        )
        self.bank_entries = Gauge("bankd_bank_entries", "Entries in the served bank.", registry=r)
        self.bank_bytes = Gauge(
            "bankd_bank_bytes", "Bytes of the served bank's files, by part.", ["part"], registry=r
        )
        self.inflight = Gauge("bankd_inflight_requests", "Requests being answered now.", registry=r)
        self.ready = Gauge("bankd_ready", "1 once the bank is loaded and serving.", registry=r)

    def serve_http(self, port: int, addr: str = "127.0.0.1") -> tuple[object, int]:
        """Start the /metrics HTTP server; returns (server, bound port)."""
        server, _thread = start_http_server(port, addr=addr, registry=self.registry)
        return server, server.server_address[1]
