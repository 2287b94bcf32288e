"""Values through shared memory: a client on the server's host offers a /dev/shm region,
the server gathers the values into it. Answers must equal the message path's bit for
bit; a server that cannot use the region sends the values in the message; bad regions
are refused with InvalidArgument and never written; region files do not outlive the
client, nor their mappings the sweep.
"""

from __future__ import annotations

import gc
import os
import secrets
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bankd.serve.shm import MappedRegions
from bankd_client import InvalidArgument, SearchQuery, shm
from bankd_client.proto import bankd_pb2 as pb

pytestmark = pytest.mark.skipif(not shm.available(), reason="needs a writable /dev/shm")


def values_bytes(srv: Any, transport: str) -> float:
    sample = {"transport": transport}
    return srv.metrics.registry.get_sample_value("bankd_values_bytes_total", sample) or 0.0


def test_search_and_stream_equal_the_message_path(
    bank: Any, server: Any, client_factory: Any, helpers: Any
) -> None:
    via_shm = client_factory(server.port)
    via_message = client_factory(server.port, shared_memory=False)
    assert via_shm.shared_memory_in_use is None and via_message.shared_memory_in_use is False
    queries = bank.queries(24, seed=11)
    exclude = [[int(bank.ids[i])] for i in range(24)]
    before = values_bytes(server, "shared_memory"), values_bytes(server, "message")

    got = via_shm.search(queries, k=7, exclude_ids=exclude)
    want = via_message.search(queries, k=7, exclude_ids=exclude)
    assert via_shm.shared_memory_in_use is True
    helpers.assert_same_hits(got, want, atol=0)
    np.testing.assert_array_equal(got.values, helpers.values_of(bank, got.ids))
    assert got.values.flags.writeable  # the caller's own array, no copy needed
    assert values_bytes(server, "shared_memory") - before[0] == got.values.nbytes
    assert values_bytes(server, "message") - before[1] == want.values.nbytes

    batches = [SearchQuery(bank.queries(b, seed=b), k=k) for b, k in ((5, 3), (17, 9), (1, 1))]
    streamed = list(via_shm.stream_search(batches))
    for q, hits in zip(batches, streamed, strict=True):
        # A stream's batches may be merged into one search: scores agree to float32 ulps.
        helpers.assert_same_hits(hits, via_message.search(q.keys, k=q.k))
        np.testing.assert_array_equal(hits.values, helpers.values_of(bank, hits.ids))


def test_values_stay_valid_while_held_and_regions_are_reused(
    bank: Any, server: Any, client_factory: Any, helpers: Any
) -> None:
    client = client_factory(server.port)
    held = client.search(bank.queries(8, seed=1), k=5)
    expected = helpers.values_of(bank, held.ids)
    for seed in range(2, 12):  # each answer dropped at once: its region comes back
        client.search(bank.queries(8, seed=seed), k=5)
    np.testing.assert_array_equal(held.values, expected)  # never lent out again meanwhile
    assert len(client._shm_pool.files) == 2  # the held one and the one reused ten times
    torch = pytest.importorskip("torch")
    as_torch = client.search(torch.from_numpy(bank.queries(8, seed=1)), k=5)
    assert torch.equal(as_torch.values, torch.from_numpy(expected))


def test_close_unlinks_region_files_and_the_sweep_unmaps_them(
    bank: Any, server: Any, client_factory: Any, helpers: Any
) -> None:
    client = client_factory(server.port, shared_memory=True)
    hits = client.search(bank.queries(4, seed=3), k=2)
    kept, expected = hits.values, helpers.values_of(bank, hits.ids)
    names = client._shm_pool.files
    assert names and all((shm.SHM_DIR / n).exists() for n in names)
    assert set(names) <= set(server.regions._maps)
    client.close()
    assert not any((shm.SHM_DIR / n).exists() for n in names)
    np.testing.assert_array_equal(kept, expected)  # the mapping lives with the array
    server.regions.sweep()
    assert not set(names) & set(server.regions._maps)


def test_server_without_shared_memory_sends_values_in_the_message(
    bank: Any, server_factory: Any, client_factory: Any, helpers: Any
) -> None:
    srv = server_factory(bank.path, shared_memory=False)
    client = client_factory(srv.port)
    queries = bank.queries(6, seed=4)
    first = client.search(queries, k=3)
    assert client.shared_memory_in_use is False
    np.testing.assert_array_equal(first.values, helpers.values_of(bank, first.ids))
    client.search(queries, k=3)
    assert values_bytes(srv, "shared_memory") == 0
    assert len(client._shm_pool.files) == 1  # the one offered; no more after that


def _raw_search(client: Any, bank: Any, region: pb.SharedMemoryRegion, b: int = 2) -> Any:
    request = client._search_request(bank.queries(b, seed=0), 3, None, True)
    request.values_region.CopyFrom(region)
    return client._call(client._stub.Search, request, None)


def _region_file(size: int) -> Path:
    path = shm.SHM_DIR / f"bankd-{secrets.token_hex(16)}"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    os.ftruncate(fd, size)
    os.close(fd)
    return path


@pytest.mark.parametrize(
    ("name", "offset", "size", "match"),
    [
        ("../etc/passwd", 0, 1 << 20, "32 hex digits"),
        ("bankd-" + "0" * 31, 0, 1 << 20, "32 hex digits"),
        ("NAMED", 3, 1 << 20, "multiple of 64"),
        ("NAMED", 0, 100, "the values need"),
        ("NAMED", 1 << 20, 1 << 20, "runs past the end"),
    ],
)
def test_bad_regions_are_invalid_argument_and_nothing_is_written(
    bank: Any, server: Any, client_factory: Any, name: str, offset: int, size: int, match: str
) -> None:
    client = client_factory(server.port)
    path = _region_file(1 << 20)
    try:
        name = path.name if name == "NAMED" else name
        with pytest.raises(InvalidArgument, match=match):
            _raw_search(client, bank, pb.SharedMemoryRegion(name=name, offset=offset, size=size))
        assert path.read_bytes() == bytes(1 << 20)
        client.search(bank.queries(2, seed=1), k=3)  # still serving
    finally:
        path.unlink()


def test_regions_the_server_cannot_use_get_values_in_the_message(
    bank: Any, server: Any, client_factory: Any, tmp_path: Path, helpers: Any
) -> None:
    client = client_factory(server.port, shared_memory=False)
    missing = pb.SharedMemoryRegion(name=f"bankd-{secrets.token_hex(16)}", size=1 << 20)
    hits = _raw_search(client, bank, missing)
    np.testing.assert_array_equal(hits.values, helpers.values_of(bank, hits.ids))

    # A link in the shared-memory directory is never followed: its target stays as is.
    target = tmp_path / "elsewhere"
    target.write_bytes(bytes(1 << 20))
    link = shm.SHM_DIR / f"bankd-{secrets.token_hex(16)}"
    link.symlink_to(target)
    try:
        hits = _raw_search(client, bank, pb.SharedMemoryRegion(name=link.name, size=1 << 20))
        assert hits.values is not None and not isinstance(hits.values, type(missing))
        assert target.read_bytes() == bytes(1 << 20)
    finally:
        link.unlink()


def test_mapped_regions_reuse_remap_and_sweep(tmp_path: Path) -> None:
    regions = MappedRegions(tmp_path, max_mapped=2, idle_s=3600)
    names = []
    for _ in range(3):
        name = f"bankd-{secrets.token_hex(16)}"
        (tmp_path / name).write_bytes(bytes(4096))
        names.append(name)
    view = regions.target(names[0], 64, 128, 100)
    view[:] = 7
    assert (tmp_path / names[0]).read_bytes()[64:164] == bytes([7]) * 100
    mapping = regions._maps[names[0]].mapping
    regions.target(names[0], 0, 64, 64)
    assert regions._maps[names[0]].mapping is mapping  # mapped once
    regions.target(names[1], 0, 64, 64)
    regions.target(names[2], 0, 64, 64)
    assert len(regions) == 2 and names[0] not in regions._maps  # least recently used
    (tmp_path / names[1]).write_bytes(bytes(8192))  # replaced: a new inode, a new size
    assert len(regions.target(names[1], 4096, 4096, 4096)) == 4096
    (tmp_path / names[2]).unlink()
    assert regions.sweep() == 1 and set(regions._maps) == {names[1]}
    regions.idle_s = 0
    assert regions.sweep() == 1 and len(regions) == 0
    del view
    gc.collect()
