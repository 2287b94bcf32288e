"""``bankd serve`` in a child process on a free loopback port: for programs that need a
bank server of their own (``tinyalign experiment``, the benchmarks).

The child runs the CLI's own ``main``; it stops itself when its parent dies without
stopping it. Its output goes to ``log_path``; the address is read from its
"bankd serving ... on HOST:PORT" line.
"""

from __future__ import annotations

import logging
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger(__name__)

SERVING_RE = re.compile(r"bankd serving .*? on (\S+):(\d+)")  # the first: metrics may follow
_CHILD = """import os, signal, sys, threading, time
def watch(parent=int(sys.argv[1])):
    while os.getppid() == parent:
        time.sleep(1)
    os.kill(os.getpid(), signal.SIGTERM)
threading.Thread(target=watch, daemon=True).start()
from bankd.cli import main
sys.exit(main(sys.argv[2:]))"""


class ServeProcess:
    """``bankd serve --index INDEX --host 127.0.0.1 --port 0 --metrics-port -1 --no-embed
    --grace 2 [serve_args]``; a context manager. ``address`` is "127.0.0.1:PORT" once
    started; with ``wait_ready`` start() returns once health says SERVING."""

    def __init__(
        self,
        index: str | Path,
        log_path: str | Path,
        *,
        serve_args: Sequence[str] = (),
        log_level: str | None = None,
        start_timeout: float = 180.0,
        wait_ready: bool = True,
    ) -> None:
        self.index, self.log_path, self.start_timeout = Path(index), Path(log_path), start_timeout
        self.serve_args, self.log_level, self.wait_ready = list(serve_args), log_level, wait_ready
        self.proc: subprocess.Popen | None = None
        self.address = ""
        self._log = None

    def __enter__(self) -> ServeProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> ServeProcess:
        args = ["--log-level", self.log_level] if self.log_level else []
        args += ["serve", "--index", str(self.index), "--host", "127.0.0.1", "--port", "0"]
        args += ["--metrics-port", "-1", "--no-embed", "--grace", "2", *self.serve_args]
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("a")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _CHILD, str(os.getpid()), *args],
            text=True,
            stdout=subprocess.PIPE,
            stderr=self._log,
            env={"OMP_WAIT_POLICY": "PASSIVE", **os.environ},  # no spinning on shared cores
        )
        lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, args=(lines,), daemon=True).start()
        deadline = time.monotonic() + self.start_timeout
        try:
            while not self.address:
                line = lines.get(timeout=max(0.01, deadline - time.monotonic()))
                if line is None:
                    raise RuntimeError(f"bankd serve exited early; see {self.log_path}")
                if m := SERVING_RE.search(line):
                    self.address = f"{m.group(1)}:{m.group(2)}"
            if self.wait_ready:
                from bankd_client import BankClient

                with BankClient(self.address) as client:
                    client.wait_ready(timeout=max(1.0, deadline - time.monotonic()))
        except BaseException as e:
            self.stop()
            if isinstance(e, queue.Empty):
                raise RuntimeError(
                    f"bankd serve did not start in {self.start_timeout:.0f} s; see {self.log_path}"
                ) from None
            raise
        log.info("bankd serving %s on %s (pid %d)", self.index, self.address, self.proc.pid)
        return self

    def _pump(self, lines: queue.Queue) -> None:
        for line in self.proc.stdout:  # keep draining: the child never blocks on its stdout
            self._log.write(line)
            self._log.flush()
            lines.put(line)
        lines.put(None)

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
        if self._log is not None:
            self._log.close()
            self._log = None
        return code
