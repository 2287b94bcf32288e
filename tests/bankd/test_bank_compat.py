"""A bank written by the 0.1.0 format still loads and answers exactly as it did.

tests/fixtures/bank_v0/ holds a 40-entry bank (tiny encoder, ``bankd demo-data``
pairs, Flat index, key function weights; the Perceiver's weights left out to keep it
small) written by bankd 0.1.0; answers.json holds what that release answered for
seeded queries: GetInfo, search ids, scores and a checksum of the values, fetch.
Its README says how both were made. This test computes the same answers with the
code of today and compares: ids, checksums and info exactly, scores to float32
rounding (the search kernels may sum in a different order).

    python tests/bankd/test_bank_compat.py --write   # records answers.json (0.1.0 only)
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "bank_v0"
ANSWERS = FIXTURE / "answers.json"
K = 5


def sha256(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def queries(keys: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, list[list[int]]]:
    """4 seeded random unit keys and 3 of the bank's own keys excluding their own ids."""
    rng = np.random.default_rng(2024)
    q = rng.standard_normal((4, keys.shape[1])).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    rows = [3, 17, 31]
    q = np.concatenate([q, np.asarray(keys[rows], np.float32)])
    exclude = [[] for _ in range(4)] + [[int(ids[r])] for r in rows]
    return q, exclude


def hits_answer(hits: Any) -> dict[str, Any]:
    return {
        "ids": np.asarray(hits.ids).tolist(),
        "scores": np.asarray(hits.scores, np.float32).tolist(),
        "values_sha256": sha256(hits.values),
    }


def info_answer(info: Any) -> dict[str, Any]:
    d = info.summary()
    d["key_function_weights_sha256"] = hashlib.sha256(info.key_function.weights).hexdigest()
    return d


def answers(index: Path) -> dict[str, Any]:
    """Everything recorded about the bank at ``index``, computed with the code of today."""
    from bankd.search.local import LocalBank
    from bankd.serve.server import BankServer, ServerConfig
    from bankd_client import BankClient

    out: dict[str, Any] = {}
    with LocalBank(index, verify=True) as local:
        bank = local.bank
        q, exclude = queries(bank.keys, bank.ids)
        fetch_ids = [int(bank.ids[r]) for r in (0, 9, 39)]
        out["bank"] = {
            "entries": bank.entries,
            "key_dim": bank.key_dim,
            "value_shape": list(bank.value_shape),
            "bank_id": bank.bank_id,
            "ids_sha256": sha256(bank.ids),
            "search_params": bank.search_params,
            "recall": bank.recall,
            "bytes_by_part": bank.bytes_by_part(),
        }
        out["local_info"] = info_answer(local.info())
        out["local_search"] = hits_answer(local.search(q, k=K, exclude_ids=exclude))
    config = ServerConfig(index=str(index), port=0, metrics_port=None, device="cpu")
    server = BankServer(config).start()
    try:
        with BankClient(f"127.0.0.1:{server.port}", timeout=60) as client:
            client.wait_ready(60)
            out["server_info"] = info_answer(client.info())
            out["server_search"] = hits_answer(client.search(q, k=K, exclude_ids=exclude))
            values, keys = client.fetch(fetch_ids, with_keys=True)
            out["fetch"] = {"ids": fetch_ids, "values_sha256": sha256(values)}
            out["fetch"]["keys_sha256"] = sha256(keys)
    finally:
        server.stop(grace=0)
    return out


@pytest.fixture(scope="module")
def now(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    bank = tmp_path_factory.mktemp("bank_v0")  # a copy: loading must not need write access
    for f in FIXTURE.glob("bank.*"):
        shutil.copy(f, bank / f.name)
    return answers(bank / "bank.faiss")


@pytest.fixture(scope="module")
def then() -> dict[str, Any]:
    return json.loads(ANSWERS.read_text())


def test_the_bank_loads_with_the_same_manifest(now, then):
    assert now["bank"] == then["bank"]


@pytest.mark.parametrize("where", ["local_info", "server_info"])
def test_info_is_unchanged(now, then, where):
    assert now[where] == then[where]


@pytest.mark.parametrize("where", ["local_search", "server_search"])
def test_search_answers_are_unchanged(now, then, where):
    assert now[where]["ids"] == then[where]["ids"]
    assert now[where]["values_sha256"] == then[where]["values_sha256"]
    np.testing.assert_allclose(now[where]["scores"], then[where]["scores"], rtol=0, atol=2e-6)


def test_fetch_answers_are_unchanged(now, then):
    assert now["fetch"] == then["fetch"]


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        sys.exit(__doc__)
    ANSWERS.write_text(json.dumps(answers(FIXTURE / "bank.faiss"), indent=1, sort_keys=True))
    print(f"wrote {ANSWERS}")
