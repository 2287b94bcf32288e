"""Fixtures of the bankd tests: a bank whose server can embed images.

``encoder_bank`` records the tiny encoder's fingerprint and a key function of its
width, so a server loads the encoder and Embed runs for real (decoding, encoder, key
function), while the bank itself stays a seeded synthetic one (no build, seconds).
Its entry ids follow tests/conftest.py: a permutation of ``1000 + 7 * i``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

ENCODER_BANK_ENTRIES = 3000


@pytest.fixture(scope="session")
def encoder_bank(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """(index path, keys [N, d], ids [N]) of a bank served with the tiny encoder."""
    from bankd.models.encoders import load_encoder
    from bankd.models.keys import KeyFunction
    from bankd.store import write_bank

    encoder = load_encoder("tiny", seed=0)
    d, n = encoder.vision_dim, ENCODER_BANK_ENTRIES
    key_function = KeyFunction(d)
    rng = np.random.default_rng(4321)
    keys = rng.standard_normal((n, d)).astype(np.float32)
    keys /= np.linalg.norm(keys, axis=1, keepdims=True)
    values = rng.standard_normal((n, 32, 96)).astype(np.float16)
    ids = (1000 + 7 * rng.permutation(n)).astype(np.int64)
    path = write_bank(
        tmp_path_factory.mktemp("encoder-bank") / "bank.faiss",
        keys,
        values,
        ids,
        vision_encoder=encoder.vision_fingerprint(),
        key_function={"config": key_function.to_config(), "weights": key_function.weights_bytes()},
        config={"seed": 0},
    )
    return Path(path), keys, ids
