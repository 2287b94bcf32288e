"""The work directory of ``bankd build``: checkpoints that let an interrupted build resume.

For ``--out bank/bank.faiss`` it is ``bank/bank.partial/``:

    state.json              what is done; replaced atomically (temp file, fsync, rename)
    keyfn.safetensors       the key function fitted in pass 1
    perceiver.safetensors   the trained value compressor
    keys.f32, values.f16    pass-2 rows in row order, raw little-endian, append-only
    rank-<r>-of-<W>/        under torchrun: rank r's pass-2 rows (its own state.json,
                            keys.f32, values.f16), on that rank's own file system

Each pass-2 chunk (one encoder batch) is appended and fsynced before ``state.json``
counts it, so after a crash the files hold at least ``rows_done`` good rows; anything
past that is cut off when the build resumes. Weights are fsynced before the state names
them. The directory holds no manifest and no ``.faiss`` file, so ``bankd serve`` cannot
take it for a bank; it is removed once the bank is committed.

A build resumes only when its identity (the config fields that decide the bank, the
data file's SHA-256 and the bankd version) equals the one recorded here; otherwise
it stops and says which fields changed (``--restart`` discards the directory).

A torchrun build (``bankd build`` under ``torchrun``) keeps the training stage here
(rank 0) and each rank's pass-2 rows in ``rank-<r>-of-<W>/``, whose state names the
build (``build_id``, a random id drawn when this directory is created) and the rank's
row range; a rank's rows of another build or range are discarded. Rerun with another
number of processes, the build keeps the trained weights and starts pass 2 over.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from bankd.store.paths import BankPaths, fsync_path, sha256_file

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
        from bankd import __version__

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
        state = {"identity": identity, "identity_sha256": _digest(identity), "rows_done": 0}
        return cls._create(path, state | {"build_id": uuid.uuid4().hex})

    @classmethod
    def open_part(
        cls, work: Path, build_id: str, rank: int, world_size: int, rows: tuple[int, int]
    ) -> BuildWorkDir:
        """Rank ``rank``'s pass-2 rows ``rows`` (a range) of build ``build_id``, resumed
        or new: ``<work>/rank-<rank>-of-<world_size>/``.

        Every rank opens its own after rank 0 opened ``work`` (``open``), which need not
        be on the same file system: rows of another build or range are discarded.
        """
        path = work / f"rank-{rank}-of-{world_size}"
        identity = {"build_id": build_id, "rank": rank, "world_size": world_size}
        identity["rows"] = list(rows)
        if (path / STATE).exists():
            state = json.loads((path / STATE).read_text())
            if state.get("identity") == identity:
                return cls(path, state)
            log.info("discarding %s: the rows of another build or row range", path)
        return cls._create(path, {"identity": identity, "rows_done": 0})

    @classmethod
    def _create(cls, path: Path, state: dict[str, Any]) -> BuildWorkDir:
        if path.exists():  # created, but interrupted before its first state was written
            shutil.rmtree(path)
        path.mkdir(parents=True)
        work = cls(path, state)
        work._save()
        return work

    @property
    def build_id(self) -> str:
        """A random id of this build's checkpoints; every rank's rows carry it."""
        if "build_id" not in self.state:  # written before ids were drawn
            self.record("build_id", uuid.uuid4().hex)
        return self.state["build_id"]

    def keep_rows_of(self, world_size: int) -> None:
        """Discard the pass-2 rows of runs with another number of processes (here and in
        ``rank-*`` folders on this file system); the training stage is kept."""
        ranks = sorted(self.path.glob("rank-*-of-*"))
        stale = [p for p in ranks if p.name.split("-")[-1] != str(world_size)]
        if world_size > 1 and self.rows_done:
            stale += [self.path / "keys.f32", self.path / "values.f16"]
            self.state["rows_done"] = self.state["chunks_done"] = 0
            self._save()
        if stale:
            log.info(
                "discarding the pass-2 rows of a run with another number of processes "
                "(%s): pass 2 starts over with %d",
                ", ".join(p.name for p in stale),
                world_size,
            )
        for p in stale:
            if p.is_dir():
                shutil.rmtree(p)
            else:
                p.unlink(missing_ok=True)

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
        if n == 0:  # a rank with no rows (np.memmap cannot map an empty file)
            return np.empty((0, key_dim), np.float32), np.empty((0, *value_shape), np.float16)
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
