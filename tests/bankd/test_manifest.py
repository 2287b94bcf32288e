"""Tests of bankd.store.manifest: the typed manifest round-trips the bankd-bank/1 JSON,
refuses a bad one naming the problem, and is what the writer, the loader, GetInfo and
LocalBank share; the writer takes a built index and checks it against the bank."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bankd.search.index import build_index
from bankd.search.local import LocalBank
from bankd.serve.service import BankService
from bankd.store.manifest import IndexRecord, KeyFunctionRecord, Manifest
from bankd.store.reader import Bank
from bankd.store.writer import BankWriter
from bankd_client.errors import BankFileError
from bankd_client.identity import EncoderFingerprint

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "bank_v0" / "bank.manifest.json"


def test_a_written_manifest_reads_back_the_same_json() -> None:
    raw = FIXTURE.read_text()
    manifest = Manifest.from_json(raw)
    assert manifest.entries == 40 and manifest.index_factory == "Flat"
    assert isinstance(manifest.vision_encoder, EncoderFingerprint)
    assert manifest.key_function is not None and manifest.key_function.name == "attnpool-v1"
    assert json.loads(manifest.to_json()) == json.loads(raw)


def test_unknown_index_fields_survive_a_round_trip() -> None:
    d = json.loads(FIXTURE.read_text())
    d["index"]["build_params"] = {"efConstruction": 80}
    again = Manifest.from_json(Manifest.from_json(json.dumps(d)).to_json())
    assert again.index.extra == {"build_params": {"efConstruction": 80}}
    assert again.to_dict()["index"]["build_params"] == {"efConstruction": 80}


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda d: d.pop("entries"), "missing or bad field 'entries'"),
        (lambda d: d.update(key_dim="wide"), "missing or bad field"),
        (lambda d: d.update(format="bankd-bank/0"), "not a bankd-bank/1 manifest"),
        (lambda d: d["files"]["bank.faiss"].pop("sha256"), "missing or bad field 'sha256'"),
    ],
)
def test_a_bad_manifest_is_refused_naming_the_problem(change: Any, message: str) -> None:
    d = json.loads(FIXTURE.read_text())
    change(d)
    with pytest.raises(BankFileError, match=message) as e:
        Manifest.from_json(json.dumps(d), where="bank.manifest.json")
    assert str(e.value).startswith("bank.manifest.json: ")
    with pytest.raises(BankFileError, match="not valid JSON"):
        Manifest.from_json("{", where="bank.manifest.json")


def _write(path: Path, index: Any, n: int = 6, d: int = 4, **finish: Any) -> Path:
    rng = np.random.default_rng(0)
    keys = rng.standard_normal((n, d)).astype(np.float32)
    with BankWriter(path, n_entries=n, key_dim=d, value_shape=(2, 3)) as w:
        w.add(keys, np.zeros((n, 2, 3), np.float16), np.arange(n) + 10)
        built = build_index(keys, "Flat") if index is None else index
        manifest = Manifest(
            index=IndexRecord("Flat", recall={"k": 5, "value": 1.0}),
            key_function=KeyFunctionRecord({"name": "attnpool-v1", "dim": d}, ""),
            config={"seed": 4},
        )
        return w.finish(built, manifest, **{"key_function_weights": b"kfw", **finish})


def test_the_writer_takes_a_built_index_and_completes_the_manifest(tmp_path: Path) -> None:
    bank = Bank.load(_write(tmp_path / "bank.faiss", None))
    m = bank.manifest
    assert (m.entries, m.key_dim, m.value_shape) == (6, 4, (2, 3))
    assert m.key_function == KeyFunctionRecord(
        {"name": "attnpool-v1", "dim": 4}, "bank.keyfn.safetensors"
    )
    assert set(m.files) >= {"bank.faiss", "bank.keys.npy", "bank.keyfn.safetensors"}
    assert bank.key_function() == ({"name": "attnpool-v1", "dim": 4}, b"kfw") and m.seed == 4


def test_the_writer_refuses_an_index_that_is_not_the_banks(tmp_path: Path) -> None:
    other = build_index(np.ones((5, 4), np.float32), "Flat")
    with pytest.raises(ValueError, match="the index holds 5 vectors of dim 4, the bank 6"):
        _write(tmp_path / "bank.faiss", other)
    assert not list(tmp_path.iterdir())  # nothing left behind
    with pytest.raises(ValueError, match="needs both its manifest record and its weights"):
        _write(tmp_path / "bank.faiss", None, key_function_weights=None)


def test_getinfo_and_local_bank_describe_the_bank_alike(tmp_path: Path) -> None:
    index = _write(tmp_path / "bank.faiss", None)
    service = BankService(Bank.load(index), device="cpu")
    try:
        served = service.info()
    finally:
        service.close()
    local = LocalBank(index).info()
    for name in ("entries", "key_dim", "value_shape", "metric", "bank_id", "key_function"):
        assert getattr(served, name) == getattr(local, name), name
    assert served.index_type == "Flat" and local.index_type == "exact (in-process)"
    assert served.recall == 1.0 and served.recall_k == 5
