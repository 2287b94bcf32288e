"""A bank on disk: writing it atomically, loading it with every check.

For ``--out bank/bank.faiss`` the bank is these files side by side:

    bank.faiss              FAISS index over the keys (labels = row numbers)
    bank.keys.npy           float32 [N, d] keys (Fetch, GPU search, re-indexing)
    bank.values.npy         float16 [N, 32, 96] values, memory-mapped when served
    bank.ids.npy            int64 [N] entry ids (the source samples' ids)
    bank.sources.json       the source samples' id strings, in row order
    bank.<name>.safetensors key-function and Perceiver weights
    bank.manifest.json      counts, shapes, encoder fingerprints, config, checksums

Everything is written under a temporary folder first; on finish the old manifest is
removed, the files are renamed into place and the manifest is renamed LAST. A bank
without a manifest, or whose files do not match the manifest's sizes and SHA-256
checksums, is refused by ``Bank.load`` with a message naming the file. While
``bankd build`` runs, its checkpoints live in ``bank.partial/`` (``bankd.workdir``),
which ``Bank.load`` refuses too.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bankd_client.errors import BankFileError
from bankd_client.identity import EncoderFingerprint

log = logging.getLogger(__name__)

FORMAT = "bankd-bank/1"
VALUE_SHAPE = (32, 96)


@dataclass(frozen=True)
class BankPaths:
    """Where each file of the bank whose index is ``index`` lives."""

    index: Path

    @property
    def stem(self) -> Path:
        return self.index.with_suffix("")

    def file(self, part: str) -> Path:
        return self.stem.parent / f"{self.stem.name}.{part}"

    @property
    def manifest(self) -> Path:
        return self.file("manifest.json")


def sha256_file(path: Path, chunk: int = 8 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def fsync_path(path: Path) -> None:
    """fsync a file, or a directory (making the renames and removals in it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class BankWriter:
    """Streams keys, values and ids to temporary files, then commits the bank.

        with BankWriter("bank/bank.faiss", n_entries=N, key_dim=d) as w:
            w.add(keys, values, ids)          # chunks, in order
            w.finish(index_factory="Flat", vision_encoder=fp, ...)

    Leaving the ``with`` by an exception removes the temporary files; the previous
    bank at that path (if any) is untouched until ``finish`` starts committing.
    """

    def __init__(
        self,
        index_path: str | os.PathLike,
        *,
        n_entries: int,
        key_dim: int,
        value_shape: tuple[int, ...] = VALUE_SHAPE,
    ) -> None:
        if n_entries < 1:
            raise ValueError(f"a bank needs at least one entry, got n_entries={n_entries}")
        if key_dim < 1:
            raise ValueError(f"key_dim must be positive, got {key_dim}")
        self.paths = BankPaths(Path(index_path))
        if self.paths.index.suffix != ".faiss":
            raise ValueError(f"index path must end in .faiss, got {self.paths.index}")
        self.n, self.d, self.value_shape = n_entries, key_dim, tuple(value_shape)
        parent = self.paths.index.parent
        parent.mkdir(parents=True, exist_ok=True)
        self.tmp = parent / f".{self.paths.index.name}.tmp-{os.getpid()}-{time.time_ns()}"
        self.tmp.mkdir()
        fmt = np.lib.format
        self.keys = fmt.open_memmap(self.tmp / "keys.npy", "w+", np.float32, (self.n, self.d))
        self.values = fmt.open_memmap(
            self.tmp / "values.npy", "w+", np.float16, (self.n, *self.value_shape)
        )
        self.ids = fmt.open_memmap(self.tmp / "ids.npy", "w+", np.int64, (self.n,))
        self.count = 0
        self.committed = False

    def __enter__(self) -> BankWriter:
        return self

    def __exit__(self, exc_type: Any, *exc: object) -> None:
        if not self.committed:
            self.abort()

    def abort(self) -> None:
        for a in ("keys", "values", "ids"):
            setattr(self, a, None)  # drop memmaps before deleting their files
        shutil.rmtree(self.tmp, ignore_errors=True)

    def add(self, keys: np.ndarray, values: np.ndarray, ids: np.ndarray) -> None:
        """Append a chunk of entries: keys [n, d], values [n, *value_shape], ids [n]."""
        keys, values, ids = np.asarray(keys), np.asarray(values), np.asarray(ids)
        n = len(keys)
        if keys.shape != (n, self.d):
            raise ValueError(f"keys chunk has shape {keys.shape}, expected ({n}, {self.d})")
        if values.shape != (n, *self.value_shape):
            raise ValueError(
                f"values chunk has shape {values.shape}, expected ({n}, {self.value_shape})"
            )
        if ids.shape != (n,):
            raise ValueError(f"ids chunk has shape {ids.shape}, expected ({n},)")
        if not np.isfinite(keys).all():
            raise ValueError("keys chunk contains NaN or inf")
        if self.count + n > self.n:
            raise ValueError(f"more than the declared {self.n} entries")
        s = slice(self.count, self.count + n)
        self.keys[s], self.values[s], self.ids[s] = keys, values.astype(np.float16), ids
        self.count += n

    def finish(
        self,
        *,
        index_factory: str = "Flat",
        metric: str = "ip",
        vision_encoder: EncoderFingerprint | None = None,
        text_encoder: EncoderFingerprint | None = None,
        key_function: dict[str, Any] | None = None,
        weights: dict[str, bytes] | None = None,
        config: dict[str, Any] | None = None,
        source_ids: list[str] | None = None,
        report: dict[str, Any] | None = None,
        train_sample: int = 100_000,
        seed: int = 0,
        memory_budget_bytes: int | None = None,
        recall_target: float | None = 0.95,  # autoindex.DEFAULT_RECALL_TARGET
        recall_k: int = 5,
        ef_construction: int | None = None,
    ) -> Path:
        """Build the index, write the manifest, and move the bank into place.

        index_factory is a FAISS factory string or "auto" (``bankd.autoindex``: chosen
        from N, d and memory_budget_bytes). efSearch / nprobe are tuned to reach
        recall_target, whatever the factory string (None: FAISS's defaults, measured
        only); ef_construction sets an HNSW graph's build depth. The manifest's
        ``index`` records the choice, the search parameters the server applies by
        default, recall@recall_k against exact search and the index's size.
        """
        from .autoindex import build_tuned  # faiss only when writing
        from .index import write_index

        if self.count != self.n:
            raise ValueError(f"{self.count} entries added, {self.n} declared")
        if len(np.unique(self.ids)) != self.n:
            raise ValueError("entry ids are not unique")
        if source_ids is not None and len(source_ids) != self.n:
            raise ValueError(f"{len(source_ids)} source ids for {self.n} entries")
        for arr in (self.keys, self.values, self.ids):
            arr.flush()
        index, index_desc = build_tuned(
            self.keys,
            index_factory,
            metric,
            memory_budget_bytes=memory_budget_bytes,
            recall_target=recall_target,
            recall_k=recall_k,
            train_sample=train_sample,
            seed=seed,
            ef_construction=ef_construction,
        )
        index_factory = index_desc["factory"]
        staged: dict[str, Path] = {"faiss": self.tmp / "index.faiss"}
        write_index(index, staged["faiss"])
        staged.update(
            {
                "keys.npy": self.tmp / "keys.npy",
                "values.npy": self.tmp / "values.npy",
                "ids.npy": self.tmp / "ids.npy",
            }
        )
        if source_ids is not None:
            staged["sources.json"] = self.tmp / "sources.json"
            staged["sources.json"].write_text(json.dumps(list(map(str, source_ids))))
        weight_files: dict[str, str] = {}
        for name, blob in {**(weights or {})}.items():
            part = f"{name}.safetensors"
            (self.tmp / part).write_bytes(blob)
            staged[part] = self.tmp / part
            weight_files[name] = self.paths.file(part).name
        kf = None
        if key_function is not None:
            (self.tmp / "keyfn.safetensors").write_bytes(key_function.get("weights", b""))
            staged["keyfn.safetensors"] = self.tmp / "keyfn.safetensors"
            kf = {
                "config": key_function["config"],
                "weights_file": self.paths.file("keyfn.safetensors").name,
            }
        self.keys = self.values = self.ids = None  # close memmaps before renames

        files = {}
        for part, p in staged.items():
            fsync_path(p)
            files[self.paths.file(part).name] = {
                "bytes": p.stat().st_size,
                "sha256": sha256_file(p),
            }
        manifest = {
            "format": FORMAT,
            "entries": self.n,
            "key_dim": self.d,
            "value_shape": list(self.value_shape),
            "value_dtype": "float16",
            "index_factory": index_factory,
            "index": index_desc,
            "metric": metric,
            "vision_encoder": vision_encoder.to_dict() if vision_encoder else None,
            "text_encoder": text_encoder.to_dict() if text_encoder else None,
            "key_function": kf,
            "weights": weight_files,
            "config": config or {},
            "report": report or {},
            "files": files,
        }
        tmp_manifest = self.tmp / "manifest.json"
        tmp_manifest.write_text(json.dumps(manifest, indent=1, sort_keys=True))
        fsync_path(tmp_manifest)

        # Commit: no manifest while files are being swapped, so a crash here leaves
        # something Bank.load refuses rather than a mix of old and new files.
        # The directory is fsynced after the removal and after the renames, so that
        # after a power cut the new manifest never sits beside old or missing files.
        parent = self.paths.index.parent
        self.paths.manifest.unlink(missing_ok=True)
        fsync_path(parent)
        for part, p in staged.items():
            os.replace(p, self.paths.file(part) if part != "faiss" else self.paths.index)
        fsync_path(parent)
        os.replace(tmp_manifest, self.paths.manifest)
        fsync_path(parent)
        self.committed = True
        shutil.rmtree(self.tmp, ignore_errors=True)
        log.info(
            "wrote bank %s: %d entries, key dim %d, index %s",
            self.paths.index,
            self.n,
            self.d,
            index_factory,
        )
        return self.paths.index


def write_bank(
    index_path: str | os.PathLike,
    keys: np.ndarray,
    values: np.ndarray,
    ids: np.ndarray | None = None,
    **finish_kwargs: Any,
) -> Path:
    """Write a bank from in-memory arrays (benchmarks, users with their own keys)."""
    keys = np.ascontiguousarray(keys, dtype=np.float32)
    if keys.ndim != 2:
        raise ValueError(f"keys must be [N, d], got shape {keys.shape}")
    ids = np.arange(len(keys), dtype=np.int64) if ids is None else np.asarray(ids, np.int64)
    with BankWriter(
        index_path, n_entries=len(keys), key_dim=keys.shape[1], value_shape=tuple(values.shape[1:])
    ) as w:
        chunk = 65_536
        for s in range(0, len(keys), chunk):
            w.add(keys[s : s + chunk], values[s : s + chunk], ids[s : s + chunk])
        return w.finish(**finish_kwargs)


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
        mmap_index: map the index's vector data from its file (``bankd.index.read_index``).
        Raises BankFileError naming the file and the problem.
        """
        paths = BankPaths(Path(index_path))
        unfinished = paths.file("partial")  # bankd.workdir.work_dir_of
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
            from .index import read_index

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
