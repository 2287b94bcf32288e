"""A process's memory: one reading, measured against the bank it serves, and sampled
over a run.

    memory_mb(pid)                      # VmRSS, RssAnon, RssFile, VmHWM in MiB (Linux)
    memory_budget(index_path, rss)      # RSS against 1.15 x (index + values) + 300 MiB
    sampler = MemorySampler(pid, every_s=1.0).start(); sampler.mark("warm"); ...
"""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from bankd.store.paths import BankPaths


def memory_mb(pid: int) -> dict[str, float]:
    """VmRSS, RssAnon, RssFile and VmHWM (peak RSS) of a process, MB; {} without /proc."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    out = {}
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        if name in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
            out[name] = int(rest.split()[0]) / 1024
    return out


def memory_budget(index_path: Path, rss_mb: dict[str, float]) -> dict[str, float]:
    """The server's resident memory against the bank it serves: index file + values
    file, and the target 1.15 x (index + values) + 300 MB."""
    paths = BankPaths(index_path)
    index_mb = index_path.stat().st_size / 2**20
    values_mb = paths.file("values.npy").stat().st_size / 2**20
    bank_mb = index_mb + values_mb
    limit = 1.15 * bank_mb + 300
    out = {"index_mb": index_mb, "values_mb": values_mb, "limit_mb": limit}
    if rss_mb:
        out |= {
            "rss_over_bank": rss_mb["VmRSS"] / bank_mb,
            "rss_over_limit": rss_mb["VmRSS"] / limit,
        }
    return out


def rss_mb(pid: int) -> dict[str, float] | None:
    """VmRSS and RssAnon of a process in MB (/proc, else psutil's rss), None if unknown."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        try:
            import psutil
        except ImportError:
            return None
        try:
            return {"rss": psutil.Process(pid).memory_info().rss / 2**20, "anon": float("nan")}
        except psutil.Error:
            return None
    kb = dict(re.findall(r"^(VmRSS|RssAnon):\s+(\d+) kB", text, re.M))
    if "VmRSS" not in kb:
        return None
    return {"rss": int(kb["VmRSS"]) / 1024, "anon": int(kb.get("RssAnon", "nan")) / 1024}


class MemorySampler:
    """The server's memory every ``every_s`` seconds in a thread: (time, rss, anon)."""

    def __init__(self, pid: int, every_s: float) -> None:
        self.pid, self.every_s = pid, every_s
        self.samples: list[tuple[float, float, float]] = []
        self.marks: dict[str, dict[str, float] | None] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def sample(self) -> dict[str, float] | None:
        mem = rss_mb(self.pid)
        if mem is not None:
            self.samples.append((time.monotonic(), mem["rss"], mem["anon"]))
        return mem

    def mark(self, name: str) -> None:
        self.marks[name] = self.sample()

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self.sample()

    def start(self) -> MemorySampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self, t0: float, t1: float) -> dict[str, Any]:
        """Start / after warm-up / end / peak; least-squares slopes over [t0, t1] and over
        its second half (a leak keeps its slope; allocator warm-up flattens out)."""
        out: dict[str, Any] = {
            f"{part}_{name}_mb": None if m is None else round(m[part], 1)
            for name, m in self.marks.items()
            for part in ("rss", "anon")
        }
        out["rss_peak_mb"] = round(max((s[1] for s in self.samples), default=float("nan")), 1)
        window = np.array([s for s in self.samples if t0 <= s[0] <= t1 + 1e-3]).reshape(-1, 3)
        out["samples"] = len(window)
        half = window[window[:, 0] >= (t0 + t1) / 2]
        for part, i in (("rss", 1), ("anon", 2)):
            out[f"{part}_slope_mb_per_min"] = _slope(window, i, t0)
            out[f"{part}_slope_second_half_mb_per_min"] = _slope(half, i, t0)
        out["series"] = [[round(t - t0, 1), round(r, 1), round(a, 1)] for t, r, a in window]
        return out


def _slope(samples: np.ndarray, column: int, t0: float) -> float | None:
    """MB per minute of a least-squares line through (time, samples[:, column])."""
    if len(samples) < 2 or not np.isfinite(samples[:, column]).all():
        return None
    return round(float(np.polyfit((samples[:, 0] - t0) / 60, samples[:, column], 1)[0]), 2)
