"""Tests of bankd.store: write/load round trip, reproducible files, every refusal of a
broken bank (with the file named), and the atomicity of BankWriter."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import bankd.store.reader
import bankd.store.writer
from bankd.store.paths import FORMAT, BankPaths
from bankd.store.reader import Bank
from bankd.store.writer import BankWriter, write_bank
from bankd_client import EncoderFingerprint
from bankd_client.errors import BankFileError

VISION = EncoderFingerprint("tiny-vision", "a" * 64, "b" * 64)
TEXT = EncoderFingerprint("tiny-text", "c" * 64, "d" * 64)
DATA_PARTS = ("faiss", "keys.npy", "values.npy", "ids.npy")


def _files(index: Path) -> dict[str, bytes]:
    """Every file of the bank at index (temp folders included), by name."""
    return {p.name: p.read_bytes() for p in sorted(index.parent.iterdir()) if p.is_file()}


def _leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if ".tmp-" in p.name]


# -- round trip ------------------------------------------------------------------------


def test_write_then_load_round_trip(make_bank: Any) -> None:
    b = make_bank(
        n=120,
        d=12,
        vision_encoder=VISION,
        text_encoder=TEXT,
        key_function={"config": {"name": "attnpool-v1", "dim": 12}, "weights": b"kfw"},
        weights={"perceiver": b"perceiver-bytes"},
        config={"seed": 3},
        source_ids=[f"s{i}" for i in range(120)],
        report={"probe": 0.5},
    )
    bank = Bank.load(b.path)
    np.testing.assert_array_equal(bank.keys, b.keys)
    np.testing.assert_array_equal(bank.values, b.values)
    np.testing.assert_array_equal(bank.ids, b.ids)
    assert bank.keys.dtype == np.float32 and bank.values.dtype == np.float16
    assert isinstance(bank.values, np.memmap)  # served memory-mapped
    assert bank.index.ntotal == 120 and bank.index.d == 12
    assert (bank.entries, bank.key_dim, bank.value_shape) == (120, 12, (32, 96))
    m = bank.manifest
    assert m["format"] == FORMAT and m["index_factory"] == "Flat" and m["metric"] == "ip"
    assert m["value_dtype"] == "float16" and m["config"] == {"seed": 3}
    assert m["report"] == {"probe": 0.5}
    assert bank.fingerprint("vision_encoder") == VISION
    assert bank.fingerprint("text_encoder") == TEXT
    assert bank.key_function() == ({"name": "attnpool-v1", "dim": 12}, b"kfw")
    assert bank.weights("perceiver") == b"perceiver-bytes"
    sources = json.loads(BankPaths(b.path).file("sources.json").read_text())
    assert sources == [f"s{i}" for i in range(120)]
    for name, meta in m["files"].items():
        p = b.path.parent / name
        assert meta["bytes"] == p.stat().st_size
        assert meta["sha256"] == hashlib.sha256(p.read_bytes()).hexdigest()
    manifest_bytes = BankPaths(b.path).manifest.read_bytes()
    assert bank.bank_id == hashlib.sha256(manifest_bytes).hexdigest()
    assert _leftovers(b.path.parent) == []


def test_rows_of_maps_ids_not_rows(make_bank: Any) -> None:
    b = make_bank(n=50, d=4)
    bank = Bank.load(b.path)
    rows = bank.rows_of(b.ids[[9, 0, 49, 9]])
    np.testing.assert_array_equal(rows, [9, 0, 49, 9])
    unknown = [0, 5, int(b.ids.max()) + 1, int(b.ids.min()) - 1, 10**15]
    assert (bank.rows_of(np.array(unknown)) == -1).all()


def test_fingerprints_absent_by_default(make_bank: Any) -> None:
    bank = Bank.load(make_bank(n=10, d=4).path)
    assert bank.fingerprint() is None and bank.key_function() is None


def test_same_arrays_give_identical_data_files(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    keys = rng.standard_normal((300, 8)).astype(np.float32)
    values = rng.standard_normal((300, 4, 6)).astype(np.float16)
    ids = rng.permutation(300) * 3 + 11
    a = write_bank(tmp_path / "a" / "bank.faiss", keys, values, ids, source_ids=list("x" * 300))
    b = write_bank(tmp_path / "b" / "bank.faiss", keys, values, ids, source_ids=list("x" * 300))
    fa, fb = _files(a), _files(b)
    assert set(fa) == set(fb)
    for name in fa:
        if name != "bank.manifest.json":
            assert fa[name] == fb[name], name


def test_same_arrays_give_identical_manifest_and_bank_id(tmp_path: Path, monkeypatch: Any) -> None:
    rng = np.random.default_rng(0)
    keys = rng.standard_normal((50, 8)).astype(np.float32)
    values = rng.standard_normal((50, 4, 6)).astype(np.float16)
    a = write_bank(tmp_path / "a" / "bank.faiss", keys, values)
    clock = bankd.store.writer.time.time
    monkeypatch.setattr(bankd.store.writer.time, "time", lambda: clock() + 3600)  # an hour later
    b = write_bank(tmp_path / "b" / "bank.faiss", keys, values)
    assert _files(a)["bank.manifest.json"] == _files(b)["bank.manifest.json"]
    assert Bank.load(a).bank_id == Bank.load(b).bank_id


# -- refusals --------------------------------------------------------------------------


def _break(path: Path, how: str) -> Path:
    """Damage one file of the bank at path; returns the file that was damaged."""
    paths = BankPaths(path)
    if how == "missing manifest":
        paths.manifest.unlink()
        return paths.manifest
    if how == "missing values":
        paths.file("values.npy").unlink()
        return paths.file("values.npy")
    if how == "missing index":
        paths.index.unlink()
        return paths.index
    if how == "truncated values":
        p = paths.file("values.npy")
        with open(p, "r+b") as f:
            f.truncate(p.stat().st_size - 100)
        return p
    if how == "flipped byte in index":
        data = bytearray(paths.index.read_bytes())
        data[len(data) // 2] ^= 0x01
        paths.index.write_bytes(bytes(data))
        return paths.index
    if how == "flipped byte in ids":
        data = bytearray(paths.file("ids.npy").read_bytes())
        data[-3] ^= 0x40
        paths.file("ids.npy").write_bytes(bytes(data))
        return paths.file("ids.npy")
    if how == "not JSON":
        paths.manifest.write_text("{ not json")
        return paths.manifest
    if how == "wrong format":
        m = json.loads(paths.manifest.read_text())
        m["format"] = "something-else/9"
        paths.manifest.write_text(json.dumps(m))
        return paths.manifest
    if how == "missing field":
        m = json.loads(paths.manifest.read_text())
        del m["key_dim"]
        paths.manifest.write_text(json.dumps(m))
        return paths.manifest
    raise AssertionError(how)


@pytest.mark.parametrize(
    "how, message",
    [
        ("missing manifest", r"manifest not found.*incomplete"),
        ("missing values", r"listed in bank\.manifest\.json but missing"),
        ("missing index", r"index file not found"),
        ("truncated values", r"bytes, the manifest says .*truncated"),
        ("flipped byte in index", r"SHA-256 does not match"),
        ("flipped byte in ids", r"SHA-256 does not match"),
        ("not JSON", r"not valid JSON"),
        ("wrong format", r"not a bankd-bank/1 manifest"),
        ("missing field", r"key_dim"),
    ],
)
def test_broken_bank_is_refused_naming_the_file(make_bank: Any, how: str, message: str) -> None:
    b = make_bank(n=40, d=8)
    damaged = _break(b.path, how)
    with pytest.raises(BankFileError, match=message) as info:
        Bank.load(b.path)
    assert str(damaged) in str(info.value)


@pytest.mark.parametrize("field, value", [("entries", 39), ("entries", 41), ("key_dim", 9)])
def test_manifest_not_matching_the_arrays_is_refused(
    make_bank: Any, field: str, value: int
) -> None:
    b = make_bank(n=40, d=8)
    manifest = BankPaths(b.path).manifest
    m = json.loads(manifest.read_text())
    m[field] = value
    manifest.write_text(json.dumps(m))
    with pytest.raises(BankFileError, match=rf"manifest says .*{value}") as info:
        Bank.load(b.path)
    assert str(b.path.parent) in str(info.value)  # names the file that disagrees


def test_size_checked_even_without_checksums(make_bank: Any) -> None:
    b = make_bank(n=40, d=8)
    damaged = _break(b.path, "truncated values")
    with pytest.raises(BankFileError, match="truncated") as info:
        Bank.load(b.path, verify=False)
    assert str(damaged) in str(info.value)


def test_swapped_in_file_of_another_bank_is_refused(make_bank: Any) -> None:
    """Same sizes, other content: only the checksum can tell."""
    a = make_bank(n=40, d=8, name="a", seed=1)
    b = make_bank(n=40, d=8, name="b", seed=2)
    paths_a, paths_b = BankPaths(a.path), BankPaths(b.path)
    paths_a.file("values.npy").write_bytes(paths_b.file("values.npy").read_bytes())
    with pytest.raises(BankFileError, match="SHA-256") as info:
        Bank.load(a.path)
    assert "a.values.npy" in str(info.value)


# -- BankWriter ------------------------------------------------------------------------


def test_writer_exception_leaves_no_temp_folder_and_no_manifest(tmp_path: Path) -> None:
    index = tmp_path / "bank" / "bank.faiss"
    with pytest.raises(RuntimeError, match="boom"):
        with BankWriter(index, n_entries=10, key_dim=4, value_shape=(2, 3)) as w:
            w.add(np.ones((5, 4), np.float32), np.zeros((5, 2, 3)), np.arange(5))
            raise RuntimeError("boom")
    assert list(index.parent.iterdir()) == []
    assert not BankPaths(index).manifest.exists()
    with pytest.raises(BankFileError):
        Bank.load(index)


@pytest.mark.parametrize(
    "mistake, message",
    [
        (lambda w: w.add(np.ones((2, 5)), np.zeros((2, 2, 3)), np.arange(2)), "keys chunk"),
        (lambda w: w.add(np.ones((2, 4)), np.zeros((2, 3, 2)), np.arange(2)), "values chunk"),
        (lambda w: w.add(np.ones((2, 4)), np.zeros((2, 2, 3)), np.arange(3)), "ids chunk"),
        (lambda w: w.add(np.full((2, 4), np.nan), np.zeros((2, 2, 3)), np.arange(2)), "NaN"),
        (lambda w: w.add(np.ones((5, 4)), np.zeros((5, 2, 3)), np.arange(5)), "more than"),
        (lambda w: w.finish(), "3 entries added, 4 declared"),
    ],
)
def test_writer_refuses_bad_chunks(tmp_path: Path, mistake: Any, message: str) -> None:
    index = tmp_path / "bank.faiss"
    with pytest.raises(ValueError, match=message):
        with BankWriter(index, n_entries=4, key_dim=4, value_shape=(2, 3)) as w:
            w.add(np.ones((3, 4)), np.zeros((3, 2, 3)), np.arange(3))
            mistake(w)
    assert list(tmp_path.iterdir()) == []


def test_writer_refuses_duplicate_ids_and_bad_paths(tmp_path: Path) -> None:
    keys = np.ones((3, 4), np.float32)
    values = np.zeros((3, 2, 3), np.float16)
    with pytest.raises(ValueError, match="not unique"):
        write_bank(tmp_path / "bank.faiss", keys, values, np.array([1, 2, 1]))
    with pytest.raises(ValueError, match="source ids"):
        write_bank(tmp_path / "bank.faiss", keys, values, source_ids=["a"])
    with pytest.raises(ValueError, match=r"\.faiss"):
        BankWriter(tmp_path / "bank.index", n_entries=1, key_dim=4)
    with pytest.raises(ValueError, match="at least one entry"):
        BankWriter(tmp_path / "bank.faiss", n_entries=0, key_dim=4)
    assert list(tmp_path.iterdir()) == []


def test_failed_rewrite_before_commit_keeps_the_old_bank(make_bank: Any) -> None:
    old = make_bank(n=40, d=8, seed=1)
    before = _files(old.path)
    keys, values = old.keys[::-1].copy(), old.values[::-1].copy()
    with pytest.raises(ValueError, match="factory string"):
        write_bank(old.path, keys, values, old.ids, index_factory="NoSuchIndex")
    assert _files(old.path) == before
    np.testing.assert_array_equal(Bank.load(old.path).values, old.values)


@pytest.mark.parametrize("fail_at", [1, 2, 3, 4, 5, 6])
def test_failed_rewrite_never_loads_as_a_mix(
    make_bank: Any, monkeypatch: Any, fail_at: int
) -> None:
    """Crash on the fail_at-th rename of the commit: the result is refused, or it is
    entirely the old or entirely the new bank; never a mix that loads."""
    old = make_bank(n=40, d=8, seed=1)
    new_keys = np.roll(old.keys, 1, axis=0)
    new_values = -old.values
    new_ids = old.ids + 1
    calls = {"n": 0}
    real_replace = os.replace

    def replace(src: Any, dst: Any) -> None:
        calls["n"] += 1
        if calls["n"] == fail_at:
            raise OSError("disk full")
        real_replace(src, dst)

    monkeypatch.setattr(bankd.store.writer.os, "replace", replace)
    with pytest.raises(OSError, match="disk full"):
        write_bank(old.path, new_keys, new_values, new_ids, source_ids=["s"] * 40)
    monkeypatch.undo()
    assert _leftovers(old.path.parent) == []
    # The new arrays have the old sizes, so without checksums only the commit order
    # (manifest removed first, written last) keeps a mix from loading.
    for verify in (True, False):
        try:
            bank = Bank.load(old.path, verify=verify)
        except BankFileError as e:
            assert "manifest" in str(e)
            continue
        olds = (old.keys, old.values, old.ids)
        news = (new_keys, new_values, new_ids)
        got = (bank.keys, bank.values, bank.ids)
        assert all(np.array_equal(g, o) for g, o in zip(got, olds, strict=True)) or all(
            np.array_equal(g, n) for g, n in zip(got, news, strict=True)
        ), f"a mix of old and new files loads (verify={verify})"


def test_rewrite_replaces_the_bank(make_bank: Any) -> None:
    old = make_bank(n=40, d=8, seed=1)
    old_id = Bank.load(old.path).bank_id
    keys = np.roll(old.keys, 3, axis=0)
    write_bank(old.path, keys, old.values, old.ids)
    bank = Bank.load(old.path)
    np.testing.assert_array_equal(bank.keys, keys)
    assert bank.bank_id != old_id
    assert _leftovers(old.path.parent) == []


# -- serving the index memory-mapped ---------------------------------------------------


@pytest.mark.parametrize("factory", ["Flat", "SQfp16", "IVF16,Flat", "IVF16,SQ8", "HNSW16"])
def test_mapped_index_searches_like_a_read_one(tmp_path: Path, factory: str) -> None:
    from bankd.search.index import Searcher

    rng = np.random.default_rng(0)
    keys = rng.standard_normal((2000, 32)).astype(np.float32)
    values = rng.standard_normal((2000, 2, 3)).astype(np.float16)
    index = write_bank(tmp_path / "bank.faiss", keys, values, index_factory=factory)
    queries = keys[:50] + 0.1 * rng.standard_normal((50, 32)).astype(np.float32)
    hits = []
    for mmap in (False, True):
        bank = Bank.load(index, mmap_index=mmap)
        searcher = Searcher(bank.index, bank.keys, bank.ids, device="cpu")
        hits.append(searcher.search(queries, 5, exclude=[[i] for i in range(50)]))
    assert np.array_equal(hits[0].ids, hits[1].ids)
    assert np.allclose(hits[0].scores, hits[1].scores)
    assert not any(i in row for i, row in enumerate(hits[1].ids.tolist()))


def _resident_pages(a: np.ndarray) -> int:
    """Pages of a's mapping resident in this process (mincore would be exact; RssFile of
    /proc/self/status moves with everything else, so count through the values' own
    mapping in /proc/self/smaps)."""
    start = a.__array_interface__["data"][0]
    smaps = Path("/proc/self/smaps").read_text().split("\n")
    for i, line in enumerate(smaps):
        lo, _, rest = line.partition("-")
        try:
            hi = int(rest.split()[0], 16)
            lo_addr = int(lo, 16)
        except (ValueError, IndexError):
            continue
        if lo_addr <= start < hi:
            for entry in smaps[i + 1 : i + 25]:
                if entry.startswith("Rss:"):
                    return int(entry.split()[1]) // 4
    raise AssertionError("values mapping not found")


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="needs /proc (Linux)")
def test_warm_values_maps_every_page_in_and_changes_nothing(make_bank: Any) -> None:
    b = make_bank(n=400)
    bank = Bank.load(b.path)
    assert not bank.warm_values(max_fraction_of_available=0.0)  # too big: left alone
    cold = _resident_pages(bank.values)
    assert bank.warm_values()
    pages = bank.values.nbytes // bankd.store.reader.PAGE_BYTES
    assert _resident_pages(bank.values) >= pages > cold
    np.testing.assert_array_equal(bank.values, b.values)
