"""Shared-memory regions: values from a bankd on the same host without a transfer.

A Search answer is mostly values (3.9 MB at B=128, k=5). Through a loopback socket
gRPC moves that in about 3 ms on a 2-core machine, as long as an HNSW search takes
to find the hits. A client on the server's host can instead name a region of a file in
/dev/shm (``SearchRequest.values_region``); the server gathers the values from the
bank straight into it and answers with ids and scores only.

This module is the client's side: a pool of region files, each leased to one call and
handed to the caller as a numpy array over the mapping. The region goes back to the
pool when that array and every view of it are gone, so a caller may keep its values
as long as it likes and nothing is copied. Files are created 0600, named
``bankd-<32 hex digits>`` (the only names a server accepts) and unlinked when the pool
closes or the process exits normally; a process killed with SIGKILL leaves them
behind (``rm /dev/shm/bankd-*`` removes them).

    pool = RegionPool()
    region = pool.lease(nbytes)          # send region.name, 0, region.size
    values = pool.array(region, np.float16, (B, k, 32, 96))   # once the server wrote it
"""

from __future__ import annotations

import math
import mmap
import os
import re
import secrets
import sys
import threading
import weakref
from pathlib import Path

import numpy as np

SHM_DIR = Path("/dev/shm")
NAME_PATTERN = re.compile(r"bankd-[0-9a-f]{32}")
ALIGN = 64  # region offsets are multiples of this
GRANULE = 1 << 20  # region files grow in whole MiB, so nearby sizes share regions
KEEP_FREE = 4  # regions kept for reuse beyond those leased


def available(directory: Path = SHM_DIR) -> bool:
    """Whether this host has a shared-memory directory this process can create files in."""
    return sys.platform.startswith("linux") and os.access(directory, os.W_OK | os.X_OK)


class Region:
    """One region file, mapped; leased to one call at a time."""

    def __init__(self, directory: Path, size: int) -> None:
        self.name = f"bankd-{secrets.token_hex(16)}"
        self.path = directory / self.name
        self.size = size
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, size)
            self.mapping = mmap.mmap(fd, size)
        except BaseException:
            os.unlink(self.path)
            raise
        finally:
            os.close(fd)

    def unlink(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


class RegionPool:
    """Region files of one client: leased per call, reused after the caller is done."""

    def __init__(self, directory: Path = SHM_DIR) -> None:
        self.directory = Path(directory)
        self._free: list[Region] = []
        self._all: dict[str, Region] = {}  # every live region file, leased or free
        self._lock = threading.RLock()  # give_back may run from a finalizer mid-lease
        self._closed = False
        # Unlink the files at interpreter exit even if close() is never called (by this
        # process only: a forked child exiting must not take its parent's files).
        self._finalizer = weakref.finalize(self, _unlink_all, self._all, os.getpid())

    def lease(self, nbytes: int) -> Region:
        """A region of at least nbytes, not leased to anyone else."""
        with self._lock:
            if self._closed:
                raise RuntimeError("the region pool is closed")
            fits = [r for r in self._free if r.size >= nbytes]
            if fits:
                region = min(fits, key=lambda r: r.size)
                self._free.remove(region)
                return region
            region = Region(self.directory, -(-max(nbytes, 1) // GRANULE) * GRANULE)
            self._all[region.name] = region
            return region

    def array(self, region: Region, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
        """A writable [*shape] array over a leased region's start. The lease ends when
        the array and every view of it are gone; use once per lease."""
        dtype = np.dtype(dtype)
        count = math.prod(shape)
        if count * dtype.itemsize > region.size:
            raise ValueError(f"{list(shape)} {dtype} does not fit a {region.size}-byte region")
        base = np.frombuffer(region.mapping, dtype=dtype, count=count)
        # numpy points every view of `base` at it, so it dies with the last of them.
        weakref.finalize(base, self.give_back, region)
        return base.reshape(shape)

    def give_back(self, region: Region) -> None:
        """Return a lease (the call failed, or its values array is gone)."""
        with self._lock:
            if self._closed or region.name not in self._all:
                return
            self._free.append(region)
            if len(self._free) > KEEP_FREE:  # drop the smallest; the server unmaps it
                drop = min(self._free, key=lambda r: r.size)
                self._free.remove(drop)
                del self._all[drop.name]
                drop.unlink()

    def close(self) -> None:
        """Unlink every region file. Arrays handed out stay valid (their mappings live
        until they are gone); the server drops its mappings of the files."""
        with self._lock:
            self._closed = True
            self._free.clear()
            self._finalizer()

    @property
    def files(self) -> list[str]:
        """Names of the region files this pool has now."""
        with self._lock:
            return sorted(self._all)


def _unlink_all(regions: dict[str, Region], owner_pid: int) -> None:
    if os.getpid() != owner_pid:
        return
    for region in list(regions.values()):
        region.unlink()
    regions.clear()


__all__ = ["ALIGN", "NAME_PATTERN", "SHM_DIR", "Region", "RegionPool", "available"]
