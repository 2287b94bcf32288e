"""Writing a bank atomically (``BankWriter``, ``write_bank``).

Everything is written under a temporary folder first; on finish the old manifest is
removed, the files are renamed into place and the manifest is renamed LAST. A bank
without a manifest, or whose files do not match the manifest's sizes and SHA-256
checksums, is refused by ``bankd.store.reader.Bank.load`` with a message naming the
file. The file layout is ``bankd.store.paths``'.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from bankd.store.paths import FORMAT, VALUE_SHAPE, BankPaths, fsync_path, sha256_file
from bankd_client.identity import EncoderFingerprint

log = logging.getLogger(__name__)


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
        recall_target: float | None = None,
        recall_k: int = 5,
    ) -> Path:
        """Build the index, write the manifest, and move the bank into place.

        index_factory is a FAISS factory string or "auto" (``bankd.search.tuning``: chosen
        from N, d and memory_budget_bytes). With recall_target (default 0.95 for
        "auto") efSearch / nprobe are tuned to reach it; the manifest's ``index``
        records the choice, the search parameters the server applies by default,
        recall@recall_k against exact search and the index's size.
        """
        from bankd.search.index import write_index
        from bankd.search.tuning import build_tuned  # faiss only when writing

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
