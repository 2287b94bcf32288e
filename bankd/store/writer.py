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
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from bankd.store.manifest import FileRecord, IndexRecord, KeyFunctionRecord, Manifest
from bankd.store.paths import VALUE_SHAPE, BankPaths, fsync_path, sha256_file
from bankd_client.identity import EncoderFingerprint

log = logging.getLogger(__name__)


class BankWriter:
    """Streams keys, values and ids to temporary files, then commits the bank.

            with BankWriter("bank/bank.faiss", n_entries=N, key_dim=d) as w:
                w.add(keys, values, ids)          # chunks, in order
                index, described = build_tuned(w.keys, "auto")     # bankd.search.tuning
                w.finish(index, Manifest(index=IndexRecord.from_dict(described, "auto"), ...))

    ``write_bank`` does all of it for arrays in memory.

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

    def check_complete(self, source_ids: list[str] | None = None) -> None:
        """ValueError unless every declared entry was added, with unique ids (and one
        source id each when given): checked before an index is built over the keys."""
        if self.count != self.n:
            raise ValueError(f"{self.count} entries added, {self.n} declared")
        if len(np.unique(self.ids)) != self.n:
            raise ValueError("entry ids are not unique")
        if source_ids is not None and len(source_ids) != self.n:
            raise ValueError(f"{len(source_ids)} source ids for {self.n} entries")

    def finish(
        self,
        index: Any,
        manifest: Manifest,
        *,
        weights: dict[str, bytes] | None = None,
        key_function_weights: bytes | None = None,
        source_ids: list[str] | None = None,
    ) -> Path:
        """Write the built ``index`` over the keys added, the manifest, and move the bank
        into place.

        ``manifest`` says what the bank is (index record, encoders, key function config,
        build config and report); the writer completes it with the counts, shapes,
        files and their checksums. ``weights``: safetensors bytes by name (e.g.
        "perceiver"); ``key_function_weights``: the key function's, when the manifest
        has one; ``source_ids``: the source samples' id strings, in row order.
        """
        from bankd.search.index import write_index  # faiss only when writing

        self.check_complete(source_ids)
        if index.ntotal != self.n or index.d != self.d:
            raise ValueError(
                f"the index holds {index.ntotal} vectors of dim {index.d}, "
                f"the bank {self.n} of dim {self.d}"
            )
        if (manifest.key_function is None) != (key_function_weights is None):
            raise ValueError("a key function needs both its manifest record and its weights")
        for arr in (self.keys, self.values, self.ids):
            arr.flush()
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
        for name, blob in (weights or {}).items():
            part = f"{name}.safetensors"
            (self.tmp / part).write_bytes(blob)
            staged[part] = self.tmp / part
            weight_files[name] = self.paths.file(part).name
        kf = manifest.key_function
        if kf is not None and key_function_weights is not None:
            (self.tmp / "keyfn.safetensors").write_bytes(key_function_weights)
            staged["keyfn.safetensors"] = self.tmp / "keyfn.safetensors"
            kf = KeyFunctionRecord(kf.config, self.paths.file("keyfn.safetensors").name)
        self.keys = self.values = self.ids = None  # close memmaps before renames

        files = {}
        for part, p in staged.items():
            fsync_path(p)
            files[self.paths.file(part).name] = FileRecord(p.stat().st_size, sha256_file(p))
        manifest = replace(
            manifest,
            entries=self.n,
            key_dim=self.d,
            value_shape=self.value_shape,
            key_function=kf,
            weights=weight_files,
            files=files,
        )
        tmp_manifest = self.tmp / "manifest.json"
        tmp_manifest.write_text(manifest.to_json())
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
            manifest.index.factory,
        )
        return self.paths.index


def write_bank(
    index_path: str | os.PathLike,
    keys: np.ndarray,
    values: np.ndarray,
    ids: np.ndarray | None = None,
    *,
    index_factory: str = "Flat",
    metric: str = "ip",
    memory_budget_bytes: int | None = None,
    recall_target: float | None = 0.95,  # bankd.search.tuning.DEFAULT_RECALL_TARGET
    recall_k: int = 5,
    ef_construction: int | None = None,
    train_sample: int = 100_000,
    seed: int = 0,
    vision_encoder: EncoderFingerprint | None = None,
    text_encoder: EncoderFingerprint | None = None,
    key_function: dict[str, Any] | None = None,
    weights: dict[str, bytes] | None = None,
    config: dict[str, Any] | None = None,
    report: dict[str, Any] | None = None,
    source_ids: list[str] | None = None,
) -> Path:
    """Write a bank from in-memory arrays (benchmarks, users with their own keys).

    The index is built and tuned by ``bankd.search.tuning.build_tuned`` (index_factory
    a FAISS factory string or "auto"; efSearch / nprobe tuned to recall_target whatever
    the factory, None: FAISS's defaults; ef_construction: HNSW's build depth) and the
    bank committed by ``BankWriter``. ``key_function``: {"config": ..., "weights": ...}.
    Users with arrays in files, or who want every input checked with its row named,
    use ``bankd.build.importer.import_bank`` (``bankd import``).
    """
    from bankd.search.tuning import build_tuned  # faiss only when writing

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
        w.check_complete(source_ids)  # before the index costs anything
        index, described = build_tuned(
            w.keys,
            index_factory,
            metric,
            memory_budget_bytes=memory_budget_bytes,
            recall_target=recall_target,
            recall_k=recall_k,
            train_sample=train_sample,
            seed=seed,
            ef_construction=ef_construction,
        )
        kf = key_function
        manifest = Manifest(
            index=IndexRecord.from_dict(described, index_factory),
            metric=metric,
            vision_encoder=vision_encoder,
            text_encoder=text_encoder,
            key_function=KeyFunctionRecord(kf["config"], "") if kf else None,
            config=config or {},
            report=report or {},
        )
        return w.finish(
            index,
            manifest,
            weights=weights,
            key_function_weights=kf.get("weights", b"") if kf else None,
            source_ids=source_ids,
        )
