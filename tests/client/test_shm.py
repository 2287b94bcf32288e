"""bankd_client.shm: slots of region files leased per call, reused once their arrays
are gone, few files however many results a caller keeps, unlinked on close and when
the pool is collected."""

from __future__ import annotations

import gc
import os
import stat
from pathlib import Path

import numpy as np
import pytest

from bankd_client import shm


def test_lease_array_give_back_and_reuse(tmp_path: Path) -> None:
    pool = shm.RegionPool(tmp_path)
    a = pool.lease(1000)
    assert a.size == shm.SLOT_GRANULE and shm.NAME_PATTERN.fullmatch(a.name)
    mode = os.stat(tmp_path / a.name).st_mode
    assert stat.S_IMODE(mode) == 0o600
    values = pool.array(a, np.float16, (2, 250))
    values[:] = 3
    row = values[1]  # a view keeps the lease as long as the array does
    del values
    gc.collect()
    b = pool.lease(10)  # `a` is still leased through `row`: another slot
    assert (b.name, b.offset) != (a.name, a.offset)
    pool.give_back(b)
    del row
    gc.collect()
    again = pool.lease(10)
    assert (again.name, again.offset) == (a.name, a.offset)
    with pytest.raises(ValueError, match="does not fit"):
        pool.array(again, np.float32, (shm.GRANULE,))


def test_kept_results_share_a_few_files_and_stay_intact(tmp_path: Path) -> None:
    """A caller keeping every result: slots are carved from arenas that double, so 64
    kept results live in a handful of files; each keeps its own bytes."""
    pool = shm.RegionPool(tmp_path)
    kept = []
    for i in range(64):
        lease = pool.lease(3_932_160)  # B=128, k=5 values of 32 x 96 fp16
        assert lease.offset % shm.ALIGN == 0
        values = pool.array(lease, np.float16, (128, 5, 32, 96))
        values[:] = i
        kept.append(values)
    assert len(list(tmp_path.iterdir())) <= 6
    assert all(
        float(v[0, 0, 0, 0]) == i and float(v[-1, -1, -1, -1]) == i for i, v in enumerate(kept)
    )
    files = set(pool.files)
    del kept[:32]  # the oldest results dropped: their slots serve the next calls
    gc.collect()
    for _ in range(32):
        kept.append(pool.array(pool.lease(3_932_160), np.float16, (128, 5, 32, 96)))
    assert set(pool.files) == files


def test_free_arenas_are_bounded_and_close_unlinks_all(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(shm, "ARENA_SLOTS", 1)
    pool = shm.RegionPool(tmp_path)
    # Each larger than the room left in the arenas before it: one arena each.
    leases = [pool.lease(shm.GRANULE * 2**i) for i in range(shm.KEEP_FREE + 2)]
    assert len({lease.name for lease in leases}) == len(leases)
    held = pool.array(leases[-1], np.uint8, (4,))
    for lease in leases[:-1]:
        pool.give_back(lease)
    # The smallest arenas with nothing leased, beyond KEEP_FREE, are unlinked.
    assert len(list(tmp_path.iterdir())) == shm.KEEP_FREE + 1
    assert not (tmp_path / leases[0].name).exists()
    pool.close()
    assert not list(tmp_path.iterdir())
    held[:] = 1  # an array handed out stays usable after close
    with pytest.raises(RuntimeError, match="closed"):
        pool.lease(1)


def test_pool_collected_without_close_unlinks_its_files(tmp_path: Path) -> None:
    pool = shm.RegionPool(tmp_path)
    pool.lease(10)
    assert len(list(tmp_path.iterdir())) == 1
    del pool
    gc.collect()
    assert not list(tmp_path.iterdir())


def test_a_forked_child_leaves_its_parents_files(tmp_path: Path) -> None:
    pool = shm.RegionPool(tmp_path)
    pool.lease(10)
    pid = os.fork()
    if pid == 0:  # the child drops its copy of the pool and exits normally
        del pool
        gc.collect()
        os._exit(0 if len(list(tmp_path.iterdir())) == 1 else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert len(list(tmp_path.iterdir())) == 1
    pool.close()
    assert not list(tmp_path.iterdir())
