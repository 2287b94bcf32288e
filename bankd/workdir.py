"""The work directory of ``bankd build``: checkpoints that let an interrupted build resume.

For ``--out bank/bank.faiss`` it is ``bank/bank.partial/``:

    state.json              what is done; replaced atomically (temp file, fsync, rename)
    keyfn.safetensors       the key function fitted in pass 1
    perceiver.safetensors   the trained value compressor
    keys.f32, values.f16    pass-2 rows in row order, raw little-endian, append-only

Each pass-2 chunk (one encoder batch) is appended and fsynced before ``state.json``
counts it, so after a crash the files hold at least ``rows_done`` good rows; anything
past that is cut off when the build resumes. Weights are fsynced before the state names
them. The directory holds no manifest and no ``.faiss`` file, so ``bankd serve`` cannot
take it for a bank; it is removed once the bank is committed.

A build resumes only when its identity (the config fields that decide the bank, the
data file's SHA-256 and the bankd version) equals the one recorded here; otherwise
it stops and says which fields changed (``--restart`` discards the directory).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from .store import BankPaths, fsync_path, sha256_file

log = logging.getLogger(__name__)

STATE = "state.json"
WEIGHTS = ("keyfn", "perceiver")


def work_dir_of(index_path: Path) -> Path:
    """``bank/bank.faiss`` -> ``bank/bank.partial``."""
    return BankPaths(Path(index_path)).file("partial")


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)


class BuildWorkDir:
    """Checkpoints of one build: trained weights, then pass-2 rows chunk by chunk."""

    def __init__(self, path: Path, state: dict[str, Any]) -> None:
        self.path, self.state = path, state

    @classmethod
    def open(
        cls,
        index_path: Path,
        config: dict[str, Any],
        data: Path,
        *,
        restart: bool = False,
        discard_other: bool = False,
    ) -> BuildWorkDir:
        """The work directory for building ``index_path``: resumed, or new.

        Raises ValueError when it holds a build of other inputs, unless ``restart`` (always
        start over) or ``discard_other`` (start over only then: for callers that own the
        output folder, such as ``tinyalign experiment``).
        """
        from . import __version__

        path = work_dir_of(index_path)
        identity = {"config": config, "data_sha256": sha256_file(data), "bankd": __version__}
        if restart and path.exists():
            log.info("--restart: discarding %s", path)
            shutil.rmtree(path)
        state_file = path / STATE
        if state_file.exists():
            state = json.loads(state_file.read_text())
            if state.get("identity") == identity:
                return cls(path, state)
            changed = ", ".join(_changed(state.get("identity") or {}, identity))
            if discard_other:
                log.info("discarding %s, an unfinished build of other inputs (%s)", path, changed)
                return cls.open(index_path, config, data, restart=True)
            raise ValueError(
                f"{path} holds an unfinished build of other inputs "
                f"(changed: {changed}); "
                "run the original command to resume it, or add --restart to discard it"
            )
        if path.exists():  # created, but interrupted before its first state was written
            shutil.rmtree(path)
        path.mkdir(parents=True)
        state = {"identity": identity, "identity_sha256": _digest(identity), "rows_done": 0}
        work = cls(path, state)
        work._save()
        return work

    def _save(self) -> None:
        _write_atomically(self.path / STATE, json.dumps(self.state, sort_keys=True).encode())

    # -- stage 1: key function, Perceiver, informativeness ------------------------------

    def trained(self) -> dict[str, bytes] | None:
        """{"keyfn": ..., "perceiver": ...} safetensors bytes, or None if not saved yet."""
        if "trained" not in self.state:
            return None
        return {name: (self.path / f"{name}.safetensors").read_bytes() for name in WEIGHTS}

    def save_trained(self, weights: dict[str, bytes], record: dict[str, Any]) -> None:
        """Keep the weights and a JSON record (losses, timings) of the training stage."""
        for name in WEIGHTS:
            p = self.path / f"{name}.safetensors"
            p.write_bytes(weights[name])
            fsync_path(p)
        self.state["trained"] = record
        self._save()

    def record(self, key: str, value: Any = None) -> Any:
        """Read (value None) or write a JSON-able result kept across resumption."""
        if value is None:
            return self.state.get(key)
        self.state[key] = value
        self._save()
        return value

    # -- stage 2: pass-2 rows ---------------------------------------------------------

    @property
    def rows_done(self) -> int:
        return int(self.state["rows_done"])

    def open_rows(self, key_dim: int, value_shape: tuple[int, ...]) -> RowAppender:
        return RowAppender(self, key_dim, value_shape)

    def rows(self, n: int, key_dim: int, value_shape: tuple[int, ...]) -> tuple[np.ndarray, ...]:
        """All n rows, memory-mapped: keys (n, d) float32, values (n, *value_shape) float16."""
        if self.rows_done != n:
            raise ValueError(f"{self.path}: {self.rows_done} of {n} rows written")
        keys = np.memmap(self.path / "keys.f32", np.float32, "r", shape=(n, key_dim))
        values = np.memmap(self.path / "values.f16", np.float16, "r", shape=(n, *value_shape))
        return keys, values

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


class RowAppender:
    """Appends pass-2 chunks to the work directory; cuts off rows no state counts."""

    def __init__(self, work: BuildWorkDir, key_dim: int, value_shape: tuple[int, ...]) -> None:
        self.work = work
        self.files = []
        done = work.rows_done
        for name, row_bytes in (
            ("keys.f32", 4 * key_dim),
            ("values.f16", 2 * math.prod(value_shape)),
        ):
            f = open(work.path / name, "ab")
            f.truncate(done * row_bytes)  # a chunk written but not yet counted
            self.files.append(f)

    def __enter__(self) -> RowAppender:
        return self

    def __exit__(self, *exc: object) -> None:
        for f in self.files:
            f.close()

    def append(self, keys: np.ndarray, values: np.ndarray) -> None:
        """Write one chunk, fsync it, then count it in the state."""
        assert len(keys) == len(values)
        for f, a, dtype in zip(self.files, (keys, values), ("<f4", "<f2"), strict=True):
            f.write(np.ascontiguousarray(a, dtype=dtype).tobytes())
            f.flush()
            os.fsync(f.fileno())
        self.work.state["rows_done"] += len(keys)
        self.work.state["chunks_done"] = self.work.state.get("chunks_done", 0) + 1
        self.work._save()


def _changed(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Names of the identity fields that differ (config fields by their own name)."""
    flat_old = {**old.get("config", {}), **{k: v for k, v in old.items() if k != "config"}}
    flat_new = {**new["config"], **{k: v for k, v in new.items() if k != "config"}}
    return sorted(
        k for k in flat_old.keys() | flat_new.keys() if flat_old.get(k) != flat_new.get(k)
    )


def _digest(identity: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
