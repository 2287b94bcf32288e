"""The server's side of shared-memory regions (see ``bankd_client.shm``).

A Search may name a region of a file its client created in /dev/shm; the server
gathers the values straight into it instead of into the response. ``MappedRegions``
opens such files, checks them and keeps their mappings, so a client that reuses its
regions costs one ``stat`` per request:

- the name must be ``bankd-`` and 32 hex digits (nothing else in the directory can be
  named) and the offset a multiple of 64, else InvalidArgument;
- a missing file, or one that is not a regular file owned by the server's user, means
  the client is elsewhere (another host, container or user): ``None``, and the caller
  sends the values in the response;
- a region past the file's end, or too small for the values: InvalidArgument.

A mapping is kept while its file exists (same inode and size on every use) and has
been used in the last ``idle_s`` seconds, at most ``max_mapped`` of them (least
recently used go first). ``sweep`` drops the rest; the server calls it every few
seconds, so the memory of unlinked files is freed soon after clients close them.
"""

from __future__ import annotations

import mmap
import os
import stat
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bankd_client import errors
from bankd_client.shm import ALIGN, NAME_PATTERN, SHM_DIR

SWEEP_EVERY_S = 5.0


@dataclass
class _Mapped:
    mapping: mmap.mmap
    identity: tuple[int, int, int]  # (st_dev, st_ino, st_size) when mapped
    used: float


class MappedRegions:
    """Client region files this server has mapped, by name."""

    def __init__(
        self, directory: Path = SHM_DIR, *, max_mapped: int = 256, idle_s: float = 60.0
    ) -> None:
        self.directory = Path(directory)
        self.max_mapped = max_mapped
        self.idle_s = idle_s
        self._maps: OrderedDict[str, _Mapped] = OrderedDict()
        self._lock = threading.Lock()
        self._uid = os.geteuid()

    def target(self, name: str, offset: int, size: int, nbytes: int) -> np.ndarray | None:
        """A writable uint8 view of nbytes at offset in the named region file, or None
        when this server cannot use it (see the module docstring)."""
        if not NAME_PATTERN.fullmatch(name):
            raise errors.InvalidArgument(
                f"values_region name {name[:80]!r} is not 'bankd-' and 32 hex digits"
            )
        if offset < 0 or offset % ALIGN:
            raise errors.InvalidArgument(
                f"values_region offset {offset} is not a non-negative multiple of {ALIGN}"
            )
        if size < nbytes:
            raise errors.InvalidArgument(
                f"values_region holds {size} bytes; the values need {nbytes}"
            )
        mapped = self._mapping(name)
        if mapped is None:
            return None
        if offset + size > len(mapped):
            raise errors.InvalidArgument(
                f"values_region [{offset}, {offset + size}) runs past the end of "
                f"{name} ({len(mapped)} bytes)"
            )
        return np.frombuffer(mapped, dtype=np.uint8, count=nbytes, offset=offset)

    def _mapping(self, name: str) -> mmap.mmap | None:
        path = self.directory / name
        try:
            st = os.stat(path, follow_symlinks=False)
        except (FileNotFoundError, NotADirectoryError):
            return None
        identity = (st.st_dev, st.st_ino, st.st_size)
        now = time.monotonic()
        with self._lock:
            held = self._maps.get(name)
            if held is not None and held.identity == identity:
                held.used = now
                self._maps.move_to_end(name)
                return held.mapping
        flags = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
        try:
            fd = os.open(path, flags)
        except OSError:  # gone meanwhile, not ours to write, or a link
            return None
        try:
            st = os.fstat(fd)  # the file actually opened, not the one stat saw
            if not stat.S_ISREG(st.st_mode) or st.st_uid != self._uid or st.st_size == 0:
                return None
            mapping = mmap.mmap(fd, st.st_size)
        finally:
            os.close(fd)
        with self._lock:
            self._maps[name] = _Mapped(mapping, (st.st_dev, st.st_ino, st.st_size), now)
            self._maps.move_to_end(name)
            while len(self._maps) > self.max_mapped:
                self._maps.popitem(last=False)
        return mapping

    def sweep(self) -> int:
        """Drop mappings of files gone, changed or idle; the number dropped. A mapping
        being written to lives on until that write's view is gone."""
        now = time.monotonic()
        with self._lock:
            names = list(self._maps)
        gone = []
        for name in names:
            held = self._maps.get(name)
            if held is None:
                continue
            try:
                st = os.stat(self.directory / name, follow_symlinks=False)
                same = (st.st_dev, st.st_ino, st.st_size) == held.identity
            except OSError:
                same = False
            if not same or now - held.used > self.idle_s:
                gone.append(name)
        with self._lock:
            for name in gone:
                self._maps.pop(name, None)
        return len(gone)

    def __len__(self) -> int:
        return len(self._maps)

    def clear(self) -> None:
        with self._lock:
            self._maps.clear()


class Sweeper:
    """A daemon thread calling ``regions.sweep()`` every ``every_s`` until stopped."""

    def __init__(self, regions: MappedRegions, every_s: float = SWEEP_EVERY_S) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(regions, every_s), name="bankd-shm-sweep", daemon=True
        )
        self._thread.start()

    def _run(self, regions: MappedRegions, every_s: float) -> None:
        while not self._stop.wait(every_s):
            regions.sweep()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


__all__ = ["MappedRegions", "Sweeper"]
