"""``bankd serve`` in a child process, for programs that need a bank server of their own
(``tinyalign experiment``, the benchmarks, tests that signal or kill a server):

    from bankd.serve.flags import ServerConfig
    from bankd.serve.process import ServeProcess
    from bankd_client import BankClient

    with ServeProcess(ServerConfig(index="bank/bank.faiss", port=0, metrics_port=0)) as server:
        client = BankClient(server.address)          # "127.0.0.1:PORT"
        ...                                          # server.metrics_port, server.pid
    # leaving the block: SIGTERM, the server drains and exits

``ServeProcess("bank/bank.faiss")`` (a path) serves it on a free loopback port with
no /metrics, no Embed and a 2 s drain. The child is ``bankd serve`` with the flags of
the config (``bankd.serve.flags.command_line``) plus ``--ready-file``: once it serves,
``bankd serve`` writes {"port", "metrics_port", "health_port", "pid", "index", "host"}
there as JSON, atomically (``write_ready_file``), and ``wait_ready`` reads it. A child
that exits first is noticed at once: ``ServeExited`` carries its exit status and the
tail of its log. The child stops itself when its parent dies without stopping it.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bankd.serve.flags import ServerConfig, command_line

log = logging.getLogger(__name__)

LOG_TAIL_LINES = 30
_CHILD = """import os, signal, sys, threading, time
def watch(parent=int(sys.argv[1])):
    while os.getppid() == parent:
        time.sleep(1)
    os.kill(os.getpid(), signal.SIGTERM)
threading.Thread(target=watch, daemon=True).start()
from bankd.cli import main
sys.exit(main(sys.argv[2:]))"""


def write_ready_file(path: str | os.PathLike, **facts: Any) -> None:
    """Write ``facts`` as JSON at ``path`` atomically: a reader sees all or nothing."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(facts, sort_keys=True))
    os.replace(tmp, path)


class ServeExited(RuntimeError):
    """The child exited before it served; ``code`` is its exit status."""

    def __init__(self, code: int, log_tail: str) -> None:
        super().__init__(f"bankd serve exited with status {code} before serving:\n{log_tail}")
        self.code = code


def local_config(index: str | os.PathLike) -> ServerConfig:
    """A private server of ``index``: a free loopback port, no /metrics, no Embed."""
    return ServerConfig(index=str(index), port=0, metrics_port=None, no_embed=True, grace_s=2.0)


class ServeProcess:
    """``bankd serve`` of ``config`` (a ServerConfig, or a bank's index path for
    ``local_config``) in a child process; a context manager.

    log_path: where its output goes (default: a file in a temporary folder);
    serve_args: more ``bankd serve`` flags, after the config's (the last one wins);
    wait_ready: start() returns once it serves (False: call ``wait_ready`` yourself).
    """

    def __init__(
        self,
        config: ServerConfig | str | os.PathLike,
        log_path: str | os.PathLike | None = None,
        *,
        serve_args: Sequence[str] = (),
        log_level: str | None = None,
        start_timeout: float = 180.0,
        wait_ready: bool = True,
    ) -> None:
        self.config = config if isinstance(config, ServerConfig) else local_config(config)
        self._tmp = tempfile.TemporaryDirectory(prefix="bankd-serve-")
        self.log_path = Path(log_path) if log_path else Path(self._tmp.name) / "serve.log"
        self.ready_path = Path(self._tmp.name) / "ready.json"
        self.serve_args, self.log_level = list(serve_args), log_level
        self.start_timeout, self.wait_on_start = start_timeout, wait_ready
        self.proc: subprocess.Popen | None = None
        self.ready: dict[str, Any] = {}

    @property
    def argv(self) -> list[str]:
        """The child's ``bankd`` arguments."""
        args = ["--log-level", self.log_level] if self.log_level else []
        args += ["serve", *command_line(self.config), *self.serve_args]
        return [*args, "--ready-file", str(self.ready_path)]

    def __enter__(self) -> ServeProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> ServeProcess:
        self.ready_path.unlink(missing_ok=True)
        self.ready = {}
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", _CHILD, str(os.getpid()), *self.argv],
                stdout=out,
                stderr=subprocess.STDOUT,
                env={"OMP_WAIT_POLICY": "PASSIVE", **os.environ},  # no spinning on shared cores
            )
        if self.wait_on_start:
            try:
                self.wait_ready(self.start_timeout)
            except BaseException:
                self.stop()
                raise
        return self

    def wait_ready(self, timeout: float | None = None) -> ServeProcess:
        """Until the child serves (its ready file is written); ServeExited if it exits
        first, TimeoutError (with its log's tail) after ``timeout`` seconds."""
        assert self.proc is not None, "start() first"
        deadline = time.monotonic() + (self.start_timeout if timeout is None else timeout)
        while not self.ready_path.exists():
            code = self.proc.poll()
            if code is not None:
                raise ServeExited(code, self.log_tail())
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"bankd serve did not serve in {timeout} s; its log ends:\n{self.log_tail()}"
                )
            time.sleep(0.02)
        self.ready = json.loads(self.ready_path.read_text())
        log.info("bankd serving %s on %s (pid %d)", self.config.index, self.address, self.pid)
        return self

    @property
    def port(self) -> int | None:
        return self.ready.get("port")

    @property
    def metrics_port(self) -> int | None:
        return self.ready.get("metrics_port")

    @property
    def health_port(self) -> int | None:
        return self.ready.get("health_port")

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def address(self) -> str:
        """host:port of the gRPC server ("" until it serves)."""
        if not self.ready:
            return ""
        host = self.ready["host"]
        return f"{host if host not in ('0.0.0.0', '::', '') else '127.0.0.1'}:{self.port}"

    def output(self) -> str:
        """Everything the child printed so far (stdout and stderr)."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        return "\n".join(self.output().splitlines()[-lines:])

    def exit_code(self, timeout: float | None = None) -> int:
        """Wait for the child to exit: its status (negative: the signal that ended it)."""
        assert self.proc is not None, "start() first"
        return self.proc.wait(timeout)

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM (bankd drains, then exits): its exit status; None if it had to be killed
        after ``timeout`` (or never started)."""
        code = None
        if self.proc is not None:
            code = self.proc.poll()
            if code is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    code = self.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
        return code

    def kill(self) -> None:
        """SIGKILL, no drain (a crash)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)
