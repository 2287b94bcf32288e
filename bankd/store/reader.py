"""Loading a bank with every check (``Bank.load``).

The file layout is ``bankd.store.paths``'; ``bankd.store.writer`` writes it. A bank
without a manifest, or whose files do not match the manifest's sizes and SHA-256
checksums, or whose build is unfinished (``bank.partial/``), is refused with a
message naming the file and the problem.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bankd.store.paths import FORMAT, BankPaths, sha256_file
from bankd_client.errors import BankFileError
from bankd_client.identity import EncoderFingerprint

PAGE_BYTES = 4096


def _mem_available_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (Linux), else None."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


@dataclass
class Bank:
    """A loaded bank: manifest, FAISS index, memory-mapped keys and values, ids."""

    paths: BankPaths
    manifest: dict[str, Any]
    index: Any
    keys: np.ndarray  # (N, d) float32, memory-mapped
    values: np.ndarray  # (N, 32, 96) float16, memory-mapped
    ids: np.ndarray  # (N,) int64, in memory
    bank_id: str

    @property
    def entries(self) -> int:
        return int(self.manifest["entries"])

    @property
    def key_dim(self) -> int:
        return int(self.manifest["key_dim"])

    @property
    def value_shape(self) -> tuple[int, ...]:
        return tuple(self.manifest["value_shape"])

    def fingerprint(self, which: str = "vision_encoder") -> EncoderFingerprint | None:
        d = self.manifest.get(which)
        return EncoderFingerprint.from_dict(d) if d else None

    def key_function(self) -> tuple[dict[str, Any], bytes] | None:
        kf = self.manifest.get("key_function")
        if not kf:
            return None
        return kf["config"], (self.paths.index.parent / kf["weights_file"]).read_bytes()

    def weights(self, name: str) -> bytes:
        return (self.paths.index.parent / self.manifest["weights"][name]).read_bytes()

    @property
    def search_params(self) -> dict[str, int]:
        """The FAISS search parameters the bank was tuned to ({} when none)."""
        return dict((self.manifest.get("index") or {}).get("search_params") or {})

    @property
    def recall(self) -> dict[str, Any]:
        """recall@k measured at build ({"k", "value", ...}; {} for older banks)."""
        return dict((self.manifest.get("index") or {}).get("recall") or {})

    def warm_values(self, *, max_fraction_of_available: float = 0.5) -> bool:
        """Map every page of the values file into this process now (reading one byte a
        page), so that searches do not pay a page fault per value they first touch
        (about 2 ms per B=128, k=5 batch on a cold 100000-entry bank). Skipped, False,
        when the values exceed ``max_fraction_of_available`` of MemAvailable (a bank
        larger than RAM stays demand-paged) or /proc/meminfo cannot be read."""
        nbytes = int(self.values.nbytes)
        available = _mem_available_bytes()
        if available is None or nbytes > max_fraction_of_available * available:
            return False
        flat = self.values.reshape(-1).view(np.uint8)
        step = 64 << 20  # a chunk at a time: other threads get the GIL in between
        for start in range(0, nbytes, step):
            int(flat[start : start + step : PAGE_BYTES].sum())
        return True

    def bytes_by_part(self) -> dict[str, int]:
        """File sizes summed by a fixed set of parts: index, keys, values, ids, ..."""
        stem = self.paths.stem.name
        out: dict[str, int] = {}
        for name, meta in self.manifest["files"].items():
            if name == self.paths.index.name:
                part = "index"
            elif name.endswith(".safetensors"):
                part = "weights"
            else:
                part = name[len(stem) + 1 :].split(".")[0]
            out[part] = out.get(part, 0) + int(meta["bytes"])
        return out

    def rows_of(self, entry_ids: np.ndarray) -> np.ndarray:
        """Row numbers of entry ids; -1 for ids the bank does not hold."""
        entry_ids = np.asarray(entry_ids, dtype=np.int64)
        pos = np.searchsorted(self._sorted_ids, entry_ids)
        pos = np.minimum(pos, len(self._sorted_ids) - 1)
        found = self._sorted_ids[pos] == entry_ids
        return np.where(found, self._sorted_rows[pos], -1)

    def __post_init__(self) -> None:
        order = np.argsort(self.ids, kind="stable")
        self._sorted_ids = self.ids[order]
        self._sorted_rows = order.astype(np.int64)

    @classmethod
    def load(
        cls,
        index_path: str | os.PathLike,
        *,
        verify: bool = True,
        load_index: bool = True,
        mmap_index: bool = False,
    ) -> Bank:
        """Open a bank, refusing a missing, corrupt or inconsistent one.

        verify: check SHA-256 checksums of every file (sizes are always checked).
        load_index: read the FAISS index (False: keys and values only, no faiss import).
        mmap_index: map the index's vector data from its file (``bankd.search.index.read_index``).
        Raises BankFileError naming the file and the problem.
        """
        paths = BankPaths(Path(index_path))
        unfinished = paths.file("partial")  # bankd.build.workdir.work_dir_of
        if paths.index.is_dir():
            what = (
                "an unfinished build's work directory" if paths.index.suffix == ".partial" else ""
            )
            raise BankFileError(
                f"{paths.index}: {what or 'a directory'}, not a bank index; serve the "
                f"{paths.stem}.faiss that the build writes when it completes"
            )
        if not paths.index.exists():
            hint = (
                f" ({unfinished} holds an unfinished build: run the same `bankd build` "
                "again to resume it)"
                if unfinished.is_dir()
                else ""
            )
            raise BankFileError(f"{paths.index}: index file not found{hint}")
        if not paths.manifest.exists():
            raise BankFileError(
                f"{paths.manifest}: manifest not found; the bank at {paths.index} is "
                "incomplete (an interrupted build?) and cannot be served"
            )
        raw = paths.manifest.read_bytes()
        try:
            manifest = json.loads(raw)
        except json.JSONDecodeError as e:
            raise BankFileError(f"{paths.manifest}: not valid JSON ({e})") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise BankFileError(f"{paths.manifest}: not a {FORMAT} manifest")
        try:
            n, d = int(manifest["entries"]), int(manifest["key_dim"])
            value_shape = tuple(int(s) for s in manifest["value_shape"])
            files = dict(manifest["files"])
        except (KeyError, TypeError, ValueError) as e:
            raise BankFileError(f"{paths.manifest}: missing or bad field {e}") from None
        parent = paths.index.parent
        for name, meta in sorted(files.items()):
            p = parent / name
            if not p.exists():
                raise BankFileError(f"{p}: listed in {paths.manifest.name} but missing")
            size = p.stat().st_size
            if size != meta["bytes"]:
                raise BankFileError(
                    f"{p}: {size} bytes, the manifest says {meta['bytes']} (truncated or replaced)"
                )
            if verify and sha256_file(p) != meta["sha256"]:
                raise BankFileError(f"{p}: SHA-256 does not match the manifest (corrupt file)")

        def array(part: str, dtype: np.dtype, shape: tuple[int, ...], mmap: bool) -> np.ndarray:
            p = paths.file(part)
            try:
                a = np.load(p, mmap_mode="r" if mmap else None, allow_pickle=False)
            except Exception as e:
                raise BankFileError(f"{p}: cannot read ({e})") from None
            if a.dtype != dtype or a.shape != shape:
                raise BankFileError(
                    f"{p}: holds {a.dtype} {list(a.shape)}, the manifest says {dtype} {list(shape)}"
                )
            return a

        keys = array("keys.npy", np.dtype(np.float32), (n, d), True)
        values = array("values.npy", np.dtype(np.float16), (n, *value_shape), True)
        ids = array("ids.npy", np.dtype(np.int64), (n,), False)
        index = None
        if load_index:
            from bankd.search.index import read_index

            try:
                index = read_index(paths.index, mmap=mmap_index)
            except Exception as e:
                raise BankFileError(f"{paths.index}: cannot read the FAISS index ({e})") from None
        if index is not None and (index.ntotal != n or index.d != d):
            raise BankFileError(
                f"{paths.index}: index holds {index.ntotal} vectors of dim {index.d}, "
                f"the manifest says {n} of dim {d}"
            )
        if len(np.unique(ids)) != n:
            raise BankFileError(f"{paths.file('ids.npy')}: entry ids are not unique")
        return cls(paths, manifest, index, keys, values, ids, hashlib.sha256(raw).hexdigest())
