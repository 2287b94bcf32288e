"""The bank server of a benchmark: `bankd serve` in a child process on free loopback
ports, its search settings and its metrics.

    with BenchServer(server_config(index_path, cfg), workdir / "server.log") as server:
        BankClient(server.address) ...
        server.server_seconds()        # the server's own Search and index-search time
        memory_mb(server.pid)          # workload.memory

The child is started by bankd's own launcher (``bankd.serve.process.ServeProcess``:
``bankd serve --ready-file``), the one every program that needs a server of its own
uses; its ports come from the ready file.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

from bankd.serve.flags import ServerConfig, ServiceLimits
from bankd.serve.process import ServeProcess
from bankd_client import BankClient

from .bank import BenchConfig

SERVER_START_S = 300.0

# Run in a fresh interpreter with the server's environment: the FAISS settings a
# `bankd serve` process searches with (bankd's search module sets them on import; the
# OpenMP thread count comes from the environment), and who searches a Flat index.
_SETTINGS_PROBE = """import faiss
import bankd.search.index
print(
    f"faiss distance_compute_blas_threshold={faiss.cvar.distance_compute_blas_threshold}, "
    f"database block {faiss.cvar.distance_compute_blas_database_bs}, "
    f"{faiss.omp_get_max_threads()} OpenMP threads"
)"""


def server_config(index_path: Path, cfg: BenchConfig) -> ServerConfig:
    """`bankd serve` of a BenchConfig: CPU search, free ports with /metrics, no Embed,
    no checksums at load, its merge wait, index mapping and flat search engine."""
    limits = ServiceLimits()
    if cfg.merge_wait_us is not None:
        limits = replace(limits, merge_wait_s=cfg.merge_wait_us / 1e6)
    return ServerConfig(
        index=str(index_path),
        port=0,
        metrics_port=0,
        device="cpu",
        verify=False,
        no_embed=True,
        grace_s=1.0,
        mmap_index=cfg.mmap_index,
        flat_search=cfg.flat_search,
        limits=limits,
    )


def merge_wait(cfg: BenchConfig) -> str:
    """The server's merge wait as the settings lines name it."""
    if cfg.merge_wait_us is None:
        return "merge wait `bankd serve`'s default"
    return f"merge wait {cfg.merge_wait_us:g} us"


def _server_env(threads: int) -> dict[str, str]:
    """The environment the server child gets beyond this process's own."""
    # The environment, not omp_set_num_threads: that only sets the calling thread's
    # count, and the server searches in its own worker thread.
    return {"OMP_NUM_THREADS": str(threads)} if threads else {}


@contextlib.contextmanager
def _environment(extra: dict[str, str]) -> Iterator[None]:
    """os.environ with ``extra`` set while a child is started, restored afterwards.

    ServeProcess hands the child this process's environment, and OpenMP reads its
    thread count from the environment once, when the child loads it."""
    saved = {name: os.environ.get(name) for name in extra}
    os.environ.update(extra)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


class BenchServer:
    """`bankd serve` of ``config`` in a child process (its ports: 0 picks free ones);
    ``threads`` sets its FAISS OpenMP threads (0: FAISS's default).

    ``search_settings()`` says what the server searches with (FAISS settings, OpenMP
    threads, the Flat engine), as a process with the server's environment reports them.
    """

    def __init__(
        self,
        config: ServerConfig,
        log_path: Path,
        *,
        threads: int = 0,
        start_timeout: float = SERVER_START_S,
    ) -> None:
        self.config = config
        self.log_path = log_path
        self.threads = threads
        self._process = ServeProcess(
            config, log_path, log_level="WARNING", start_timeout=start_timeout
        )
        with _environment(_server_env(threads)):
            self._process.start()  # returns once it serves; stops the child if it fails
        self.port = self._process.port
        self.metrics_port = self._process.metrics_port

    def search_settings(self) -> str:
        """FAISS's BLAS threshold and database block, OpenMP threads, and the engine the
        server chose (its GetInfo's search_engine)."""
        env = {"OMP_WAIT_POLICY": "PASSIVE", **os.environ, **_server_env(self.threads)}
        out = subprocess.run(
            [sys.executable, "-c", _SETTINGS_PROBE],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        with BankClient(self.address, shared_memory=False) as client:
            engine = client.info().search_engine or "FAISS"
        chosen = f"search engine {engine} (--flat-search {self.config.flat_search})"
        return f"{out.stdout.strip()}, {chosen}"

    @property
    def address(self) -> str:
        return self._process.address

    @property
    def pid(self) -> int:
        assert self._process.pid is not None  # started in __init__
        return self._process.pid

    def __enter__(self) -> BenchServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def metrics_text(self) -> str:
        """The server's /metrics page (it must serve one: metrics_port in its config)."""
        if self.metrics_port is None:
            raise RuntimeError("this server was started without /metrics (metrics_port=None)")
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        return urllib.request.urlopen(url, timeout=10).read().decode()

    def server_seconds(self) -> dict[str, float]:
        """Sums of the server's Search handler and index search histograms, in seconds."""
        text = self.metrics_text()
        out = {}
        for name, key in (
            ('bankd_search_latency_seconds_sum{method="Search"}', "handler"),
            ("bankd_index_search_latency_seconds_sum", "index_search"),
        ):
            m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
            out[key] = float(m.group(1)) if m else float("nan")
        return out

    def stop(self) -> int | None:
        """SIGTERM (bankd drains, then exits): its exit status, None if it was killed."""
        return self._process.stop()
