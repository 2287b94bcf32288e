"""`bankd import` and ``import_bank``: a bank from arrays a user has, served by bankd.

The end-to-end cases write .npy / .safetensors files, run `bankd import`, serve the
bank with `bankd serve` (a child process) or in-process, and check that searches return
the expected entry ids. The refusal cases check that each bad input is a ValueError
naming the problem (and its row) and that nothing was written.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file
from safetensors.torch import save_file as save_torch

from bankd.build.importer import ImportConfig, import_bank, load_array
from bankd.cli import main
from bankd.store.reader import Bank
from bankd_client import BankClient, sample_id_to_int


def arrays(n: int = 500, d: int = 16, seed: int = 3) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unit keys (N, d), float32 values (N, 4, 6), ids that are not row numbers."""
    rng = np.random.default_rng(seed)
    keys = rng.standard_normal((n, d)).astype(np.float32)
    keys /= np.linalg.norm(keys, axis=1, keepdims=True)
    values = rng.standard_normal((n, 4, 6)).astype(np.float32)
    ids = (5000 + 3 * rng.permutation(n)).astype(np.int64)
    return keys, values, ids


def as_bank(keys: np.ndarray, values: np.ndarray, ids: np.ndarray) -> Any:
    """What tests/conftest.py's helpers read from a bank."""
    row_of = {int(e): r for r, e in enumerate(ids)}
    return SimpleNamespace(keys=keys, values=values, ids=ids, row_of=row_of)


def test_import_npy_then_serve_finds_the_expected_ids(
    tmp_path: Path, serve: Any, helpers: Any, capsys: pytest.CaptureFixture
) -> None:
    keys, values, ids = arrays()
    for name, a in (("keys", keys), ("values", values), ("ids", ids)):
        np.save(tmp_path / f"{name}.npy", a)
    out = tmp_path / "bank" / "bank.faiss"
    argv = ["import", "--keys", str(tmp_path / "keys.npy"), "--values"]
    argv += [str(tmp_path / "values.npy"), "--ids", str(tmp_path / "ids.npy")]
    assert main([*argv, "--index", "Flat", "--out", str(out), "--no-progress"]) == 0
    assert f"wrote 500 entries to {out}" in capsys.readouterr().out
    child = serve(out).wait_ready()
    with BankClient(child.address, timeout=30) as client:
        rows = np.array([0, 17, 499])
        hits = client.search(keys[rows], k=1)
        np.testing.assert_array_equal(hits.ids[:, 0], ids[rows])  # each key finds itself
        q = keys[:20] + 0.3 * np.random.default_rng(1).standard_normal((20, 16)).astype("f4")
        exclude = [[int(ids[0])]] * 20
        hits = client.search(q, k=5, exclude_ids=exclude)
        written = as_bank(keys, values.astype(np.float16), ids)
        helpers.assert_topk(written, q, 5, hits.ids, hits.scores, exclude)
        np.testing.assert_array_equal(hits.values, helpers.values_of(written, hits.ids))
        assert client.info().entries == 500


def test_import_safetensors_with_sources(
    tmp_path: Path, server_factory: Any, client_factory: Any
) -> None:
    keys, values, _ = arrays(n=300)
    save_file({"keys": keys, "values": values, "extra": keys[:2]}, tmp_path / "emb.safetensors")
    sources = [f"coco/{i:06d}.jpg" for i in range(300)]
    sources[5] = 123  # integers and decimal strings keep their value
    (tmp_path / "sources.json").write_text(json.dumps(sources))
    emb, out = str(tmp_path / "emb.safetensors"), tmp_path / "b.faiss"
    argv = ["import", "--keys", emb, "--values", emb, "--sources", str(tmp_path / "sources.json")]
    assert main([*argv, "--out", str(out), "--no-progress"]) == 0
    bank = Bank.load(out)
    expected = np.array([sample_id_to_int(s) for s in sources])
    np.testing.assert_array_equal(bank.ids, expected)
    assert json.loads(bank.paths.file("sources.json").read_text())[:6] == [*sources[:5], "123"]
    assert bank.manifest.index.requested == "auto"
    client = client_factory(server_factory(out).port)
    got = client.fetch([expected[7], expected[5]])
    np.testing.assert_array_equal(got, values[[7, 5]].astype(np.float16))


def test_import_bank_from_arrays_tunes_any_factory(tmp_path: Path, make_bank: Any) -> None:
    keys, values, ids = arrays(n=3000, d=32)
    memmap = tmp_path / "keys.npy"
    np.save(memmap, keys)
    config = ImportConfig(index_factory="HNSW16", ef_construction=60, progress=False)
    path = import_bank(tmp_path / "h.faiss", np.load(memmap, mmap_mode="r"), values, ids,
                       config=config)  # fmt: skip
    bank = Bank.load(path)
    idx = bank.manifest.index
    assert idx.factory == "HNSW16" and idx.extra["build_params"] == {"efConstruction": 60}
    assert idx.recall["value"] >= 0.95 and "efSearch" in idx.search_params
    assert bank.values.dtype == np.float16 and bank.value_shape == (4, 6)
    assert bank.manifest.config["index_factory"] == "HNSW16"


def test_bfloat16_safetensors_are_widened(tmp_path: Path) -> None:
    keys, values, _ = arrays(n=50)
    save_torch({"values": torch.from_numpy(values).to(torch.bfloat16)}, tmp_path / "v.safetensors")
    got = load_array(tmp_path / "v.safetensors", "values")
    assert got.dtype == np.float32 and got.shape == values.shape
    np.testing.assert_allclose(got, values, rtol=1e-2, atol=1e-2)


def _bad(**change: Any) -> dict[str, Any]:
    keys, values, ids = arrays(n=40, d=8)
    return {"keys": keys, "values": values, "ids": ids, **change}


def _with_row(a: np.ndarray, row: int, value: float) -> np.ndarray:
    a = a.copy()
    a.reshape(len(a), -1)[row, 0] = value
    return a


KEYS, VALUES, IDS = arrays(n=40, d=8)
REFUSED = {
    "keys not 2-D": (_bad(keys=KEYS[:, 0]), "keys must be \\[N, d\\]"),
    "integer keys": (_bad(keys=KEYS.astype(np.int32)), "keys must be floating point"),
    "counts differ": (_bad(values=VALUES[:39]), "40 keys but 39 values"),
    "values 1-D": (_bad(values=VALUES[:, 0, 0]), "values must be \\[N, ...\\]"),
    "NaN key": (_bad(keys=_with_row(KEYS, 7, np.nan)), "keys row 7 holds NaN or inf"),
    "inf value": (_bad(values=_with_row(VALUES, 3, np.inf)), "values row 3 holds NaN or inf"),
    "fp16 overflow": (_bad(values=_with_row(VALUES, 9, 1e6)), "values row 9 .* float16"),
    "duplicate ids": (_bad(ids=np.r_[IDS[:30], IDS[2], IDS[31:]]), r"ids\[2\] = .* ids\[30\]"),
    "negative id": (_bad(ids=np.r_[IDS[:4], -1, IDS[5:]]), r"ids\[4\] = -1 is negative"),
    "float ids": (_bad(ids=IDS.astype(np.float64)), "ids must be integers"),
    "huge uint64": (_bad(ids=np.r_[IDS[:39].astype(np.uint64), np.uint64(2**63)]), "not fit int64"),
    "ids count": (_bad(ids=IDS[:10]), r"ids must be \[N\] = \[40\]"),
    "sources count": (_bad(ids=None, sources=["a"] * 3), "3 sources for 40 entries"),
    "same source twice": (
        _bad(ids=None, sources=[f"s{i}" for i in range(39)] + ["s4"]),
        r"sources\[4\] = 's4' and sources\[39\] = 's4'",
    ),
    "bad source": (_bad(ids=None, sources=[f"s{i}" for i in range(39)] + [""]), r"sources\[39\]"),
    "ids and sources": (_bad(sources=["x"] * 40), "not both"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_bad_input_is_refused_before_writing(tmp_path: Path, case: str) -> None:
    kwargs, message = REFUSED[case]
    out = tmp_path / "bank.faiss"
    with pytest.raises(ValueError, match=message):
        import_bank(out, config=ImportConfig(progress=False), **kwargs)
    assert not any(tmp_path.iterdir()), "nothing is written for bad input"


def test_bad_files_are_refused_with_the_flag_named(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    np.save(tmp_path / "k.npy", KEYS)
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object))
    save_file({"a": VALUES, "b": VALUES}, tmp_path / "two.safetensors")
    (tmp_path / "v.txt").write_text("1 2 3")
    (tmp_path / "broken.safetensors").write_bytes(b"\x00" * 16)
    k = str(tmp_path / "k.npy")
    cases = {
        str(tmp_path / "missing.npy"): "--values .*missing.npy: no such file",
        str(tmp_path / "v.txt"): "expected a .npy or .safetensors file",
        str(tmp_path / "obj.npy"): "not a plain numeric .npy array",
        str(tmp_path / "two.safetensors"): "no tensor 'values' .*\\['a', 'b'\\]",
        str(tmp_path / "broken.safetensors"): "not a safetensors file",
        f"{tmp_path / 'k.npy'}:x": "a .npy file holds one array",
    }
    for values, message in cases.items():
        argv = ["import", "--keys", k, "--values", values, "--out", str(tmp_path / "o.faiss")]
        assert main(argv) == 2, values
        err = capsys.readouterr().err
        assert err.startswith("bankd import: ") and re.search(message, err), err
    assert main(["import", "--keys", k, "--values", f"{tmp_path / 'two.safetensors'}:b",
                 "--out", str(tmp_path / "o.faiss"), "--no-progress",
                 "--index", "HNSW8", "--ef-construction", "0"]) == 2  # fmt: skip
    assert "ef_construction must be >= 1" in capsys.readouterr().err
    assert not (tmp_path / "o.faiss").exists()
