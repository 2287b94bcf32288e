"""Running a benchmark program: progress lines, its work folder, timing, its report.

Progress goes to stderr with the time of day; the report goes to stdout (and to
``--json`` when given); an interrupted run exits 130 after its child processes stop.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np


def progress(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def workdir_for(kept: str | None, prefix: str) -> Iterator[Path]:
    """The kept folder (made if missing), else a temporary one removed afterwards."""
    if kept:
        Path(kept).mkdir(parents=True, exist_ok=True)
        yield Path(kept)
        return
    with tempfile.TemporaryDirectory(prefix=prefix) as where:
        yield Path(where)


def publish(text: str, cfg: Any, results: dict[str, Any]) -> None:
    """Print the report, with the machine (CPU model and flags) unless it names it
    already; write the config and figures to cfg.json when given."""
    if "machine" not in results:
        results = {"machine": describe_machine(), **results}
        text = f"machine: {results['machine']}\n{text}"
    print(text, flush=True)
    if cfg.json:
        Path(cfg.json).write_text(json.dumps({"config": asdict(cfg), **results}, indent=1))
        progress(f"figures written to {cfg.json}")


def run_program(main: Callable[[], int]) -> None:
    """sys.exit(main()); exit status 130 and a line on stderr when interrupted."""
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        progress("interrupted")
        sys.exit(130)


def latency_stats(seconds: list[float]) -> dict[str, float]:
    """Median, 90th percentile and minimum of durations, in milliseconds."""
    ms = np.asarray(seconds) * 1e3
    return {
        "median_ms": float(np.median(ms)),
        "p90_ms": float(np.percentile(ms, 90)),
        "min_ms": float(ms.min()),
    }


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    """fn()'s result and the seconds it took."""
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


# The CPU flags that decide which search engine is fastest (named with every figure).
SEARCH_FLAGS = (
    "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
    "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8",
)  # fmt: skip


def describe_machine() -> str:
    """Cores, CPU model and its vector/matrix flags, system and load average: named with
    every figure."""
    cpu, flags = platform.processor() or platform.machine(), "flags unknown"
    with contextlib.suppress(OSError):
        info = Path("/proc/cpuinfo").read_text()
        names = re.findall(r"^model name\s*:\s*(.+)$", info, re.M)
        cpu = names[0] if names else cpu
        found = re.findall(r"^flags\s*:\s*(.+)$", info, re.M)
        have = set(found[0].split()) if found else set()
        flags = " ".join(f for f in SEARCH_FLAGS if f in have) or "none of " + "/".join(
            SEARCH_FLAGS
        )
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    return (
        f"{os.cpu_count()} cores ({cpu}; {flags}), {platform.system()}, "
        f"load average {load} at start"
    )
