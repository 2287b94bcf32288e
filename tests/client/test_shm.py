"""bankd_client.shm: region files leased per call, reused once their arrays are gone,
unlinked on close and when the pool is collected."""

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
    assert a.size == shm.GRANULE and shm.NAME_PATTERN.fullmatch(a.name)
    mode = os.stat(tmp_path / a.name).st_mode
    assert stat.S_IMODE(mode) == 0o600
    values = pool.array(a, np.float16, (2, 250))
    values[:] = 3
    row = values[1]  # a view keeps the lease as long as the array does
    del values
    gc.collect()
    assert pool.lease(10) is not a  # still leased through `row`
    del row
    gc.collect()
    assert pool.lease(10) is a
    with pytest.raises(ValueError, match="does not fit"):
        pool.array(a, np.float32, (shm.GRANULE,))


def test_free_regions_are_bounded_and_close_unlinks_all(tmp_path: Path) -> None:
    pool = shm.RegionPool(tmp_path)
    regions = [pool.lease((i + 1) * shm.GRANULE) for i in range(shm.KEEP_FREE + 2)]
    held = pool.array(regions[-1], np.uint8, (4,))
    for r in regions[:-1]:
        pool.give_back(r)
    # The smallest free ones beyond KEEP_FREE are unlinked.
    assert len(list(tmp_path.iterdir())) == shm.KEEP_FREE + 1
    assert not (tmp_path / regions[0].name).exists()
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
