"""The files of a bank on disk, named once.

For ``--out bank/bank.faiss`` the bank is these files side by side:

    bank.faiss              FAISS index over the keys (labels = row numbers)
    bank.keys.npy           float32 [N, d] keys (Fetch, GPU search, re-indexing)
    bank.values.npy         float16 [N, 32, 96] values, memory-mapped when served
    bank.ids.npy            int64 [N] entry ids (the source samples' ids)
    bank.sources.json       the source samples' id strings, in row order
    bank.<name>.safetensors key-function and Perceiver weights
    bank.manifest.json      counts, shapes, encoder fingerprints, config, checksums

``bankd.store.writer`` writes them atomically, ``bankd.store.reader`` loads them with
every check. While ``bankd build`` runs, its checkpoints live in ``bank.partial/``
(``bankd.build.pipeline.workdir``), which ``Bank.load`` refuses.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

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
