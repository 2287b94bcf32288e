"""The bank server of a benchmark: `bankd serve` in a child process on free loopback
ports (gRPC and Prometheus), its search settings, its metrics and its memory.

    with BenchServer(index_path, workdir / "server.log", serve_flags(cfg)) as server:
        BankClient(server.address) ...
        server.server_seconds()        # the server's own Search and index-search time
        memory_mb(server.pid)            # workload.memory

The child is started by bankd's own launcher (``ServeProcess``), the one every program
that needs a server of its own uses; ``BenchServer._launch`` is the one place that
knows how.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from bankd.serve.process import ServeProcess

SERVER_START_S = 300.0

# Run in a fresh interpreter with the server's environment: the FAISS settings a
# `bankd serve` process searches with (bankd's search module sets them on import; the
# OpenMP thread count comes from the environment), and who searches a Flat index.
_SETTINGS_PROBE = """import sys
import faiss
import bankd.search.index
from bankd.search import flat_kernel
if sys.argv[1] == "faiss" or not flat_kernel.available():
    engine = "FAISS"
else:
    engine = f"bankd's kernel (k <= {flat_kernel.MAX_K})"
print(
    f"faiss distance_compute_blas_threshold={faiss.cvar.distance_compute_blas_threshold}, "
    f"database block {faiss.cvar.distance_compute_blas_database_bs}, "
    f"{faiss.omp_get_max_threads()} OpenMP threads, Flat searched by {engine}"
)"""


def serve_flags(cfg: Any) -> list[str]:
    """`bankd serve` flags of a BenchConfig: CPU search, its merge wait, index mapping
    and flat search engine."""
    flags = ["--device", "cpu", "--no-verify", "--grace", "1"]
    if cfg.merge_wait_us is not None:
        flags += ["--merge-wait-us", str(cfg.merge_wait_us)]
    if cfg.mmap_index:
        flags += ["--mmap-index"]
    return flags + ["--flat-search", cfg.flat_search]


def merge_wait(cfg: Any) -> str:
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
    """os.environ with ``extra`` set while a child is started, restored afterwards."""
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
    """`bankd serve --index INDEX [flags]` in a child process, on free loopback ports,
    with metrics; ``threads`` sets its FAISS OpenMP threads (0: FAISS's default).

    ``search_settings()`` says what the server searches with (FAISS settings, OpenMP
    threads, the Flat engine), as a process with the server's environment reports them.
    """

    def __init__(
        self,
        index_path: Path,
        log_path: Path,
        flags: Sequence[str] = (),
        *,
        threads: int = 0,
        start_timeout: float = SERVER_START_S,
    ) -> None:
        self.log_path = log_path
        self.threads = threads
        self._flags = list(flags)
        self._process = self._launch(index_path, start_timeout)

    def _launch(self, index_path: Path, start_timeout: float) -> ServeProcess:
        """Start the child; its gRPC and metrics ports are known when this returns."""
        process = ServeProcess(
            index_path,
            self.log_path,
            serve_args=["--metrics-port", "0", *self._flags],
            log_level="WARNING",
            start_timeout=start_timeout,
            wait_ready=False,
        )
        with _environment(_server_env(self.threads)):
            process.start()
        self.port = int(process.address.rsplit(":", 1)[1])
        # "bankd serving X on HOST:PORT (...), metrics on HOST:PORT": in the log by now.
        m = re.search(r"metrics on [\d.]+:(\d+)", self.log_path.read_text(errors="replace"))
        if m is None:
            process.stop()
            raise RuntimeError(f"bankd serve gave no metrics port; see {self.log_path}")
        self.metrics_port = int(m.group(1))
        return process

    def search_settings(self) -> str:
        """FAISS's BLAS threshold and database block, OpenMP threads, the Flat engine."""
        flags = self._flags
        given = "--flat-search" in flags
        flat_search = flags[flags.index("--flat-search") + 1] if given else "auto"
        env = {"OMP_WAIT_POLICY": "PASSIVE", **os.environ, **_server_env(self.threads)}
        out = subprocess.run(
            [sys.executable, "-c", _SETTINGS_PROBE, flat_search],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        return out.stdout.strip()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self._process.proc.pid

    def __enter__(self) -> BenchServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def metrics_text(self) -> str:
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
