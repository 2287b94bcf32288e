"""Shared-memory regions: values from a bankd on the same host without a transfer.

A Search answer is mostly values (3.9 MB at B=128, k=5). Through a loopback socket
gRPC moves that in about 3 ms on a 2-core machine, as long as an HNSW search takes
to find the hits. A client on the server's host can instead name a region of a file in
/dev/shm (``SearchRequest.values_region``); the server gathers the values from the
bank straight into it and answers with ids and scores only.

This module is the client's side: a pool of region files ("arenas"), carved into
slots; each slot is leased to one call and handed to the caller as a numpy array over
the mapping. A slot goes back to the pool when that array and every view of it are
gone, so a caller may keep its values as long as it likes and nothing is copied. A
caller that keeps earlier results (a prefetching trainer) holds several leases at
once: new slots are carved from the arenas it already has, and a new arena, as large
as all the others together, is made only when they are full. So the server maps a
handful of files once, however many results are kept, instead of a fresh file per
call; an arena whose slots are all back is reused from its start. Files are created 0600, named
``bankd-<32 hex digits>`` (the only names a server accepts) and unlinked when the pool
closes or the process exits normally; a process killed with SIGKILL leaves them
behind (``rm /dev/shm/bankd-*`` removes them).

    pool = RegionPool()
    lease = pool.lease(nbytes)           # send lease.name, lease.offset, lease.size
    values = pool.array(lease, np.float16, (B, k, 32, 96))   # once the server wrote it
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
GRANULE = 1 << 20  # region files grow in whole MiB
SLOT_GRANULE = 1 << 16  # slots are whole 64 KiB, so nearby sizes share freed slots
ARENA_SLOTS = 4  # a first arena holds this many slots of the size that made it
MAX_ARENA = 1 << 30  # an arena grows no larger, unless one slot needs more
KEEP_FREE = 4  # arenas with nothing leased kept for reuse


def available(directory: Path = SHM_DIR) -> bool:
    """Whether this host has a shared-memory directory this process can create files in."""
    return sys.platform.startswith("linux") and os.access(directory, os.W_OK | os.X_OK)


class Region:
    """One region file (an arena), mapped; carved into leased slots from ``top`` on."""

    def __init__(self, directory: Path, size: int) -> None:
        self.name = f"bankd-{secrets.token_hex(16)}"
        self.path = directory / self.name
        self.size = size
        self.top = 0  # bytes carved into slots so far
        self.live = 0  # slots leased now
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


class Lease:
    """A slot of a region file leased to one call: what a SearchRequest names."""

    __slots__ = ("offset", "region", "size", "__weakref__")

    def __init__(self, region: Region, offset: int, size: int) -> None:
        self.region, self.offset, self.size = region, offset, size

    @property
    def name(self) -> str:
        return self.region.name


class RegionPool:
    """Region files of one client, carved into slots leased per call and reused after
    the caller is done with them."""

    def __init__(self, directory: Path = SHM_DIR) -> None:
        self.directory = Path(directory)
        self._free: list[Lease] = []  # slots given back, in arenas with slots leased
        self._all: dict[str, Region] = {}  # every live region file
        self._lock = threading.RLock()  # give_back may run from a finalizer mid-lease
        self._closed = False
        # Unlink the files at interpreter exit even if close() is never called (by this
        # process only: a forked child exiting must not take its parent's files).
        self._finalizer = weakref.finalize(self, _unlink_all, self._all, os.getpid())

    def lease(self, nbytes: int) -> Lease:
        """A slot of at least nbytes, not leased to anyone else: a freed one of about
        that size, else carved from an arena, else from a new arena."""
        need = -(-max(nbytes, 1) // SLOT_GRANULE) * SLOT_GRANULE
        with self._lock:
            if self._closed:
                raise RuntimeError("the region pool is closed")
            fits = [s for s in self._free if need <= s.size <= 2 * need]
            if fits:
                slot = min(fits, key=lambda s: s.size)
                self._free.remove(slot)
                slot.region.live += 1
                return slot
            spare = [r for r in self._all.values() if r.top + need <= r.size]
            if spare:
                region = min(spare, key=lambda r: r.size - r.top)  # the fullest that fits
            else:
                # As large as all arenas together (doubling the pool), so a caller that
                # keeps every result makes few files for the server to map.
                held = sum(r.size for r in self._all.values())
                size = max(ARENA_SLOTS * need, min(held, MAX_ARENA), need)
                region = Region(self.directory, -(-size // GRANULE) * GRANULE)
                self._all[region.name] = region
            slot = Lease(region, region.top, need)
            region.top += need
            region.live += 1
            return slot

    def array(self, lease: Lease, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
        """A writable [*shape] array over a leased slot. The lease ends when the array
        and every view of it are gone; use once per lease."""
        dtype = np.dtype(dtype)
        count = math.prod(shape)
        if count * dtype.itemsize > lease.size:
            raise ValueError(f"{list(shape)} {dtype} does not fit a {lease.size}-byte region")
        base = np.frombuffer(lease.region.mapping, dtype=dtype, count=count, offset=lease.offset)
        # numpy points every view of `base` at it, so it dies with the last of them.
        weakref.finalize(base, self.give_back, lease)
        return base.reshape(shape)

    def give_back(self, lease: Lease) -> None:
        """Return a lease (the call failed, or its values array is gone)."""
        with self._lock:
            region = lease.region
            if self._closed or region.name not in self._all:
                return
            region.live -= 1
            if region.live > 0:
                self._free.append(lease)
                return
            # Nothing leased in this arena: carve it afresh from its start.
            self._free = [s for s in self._free if s.region is not region]
            region.top = 0
            empty = [r for r in self._all.values() if r.live == 0]
            if len(empty) > KEEP_FREE:  # drop the smallest; the server unmaps it
                drop = min(empty, key=lambda r: r.size)
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


__all__ = ["ALIGN", "NAME_PATTERN", "SHM_DIR", "Lease", "Region", "RegionPool", "available"]
