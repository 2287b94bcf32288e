"""A built bank served by a real bankd: Embed returns the keys the builder stored.

Builds a tiny bank (tiny encoder, 48 demo pairs, 2 Perceiver steps), starts a real
server on port 0 and drives it with the real client.
"""

from __future__ import annotations

import numpy as np
import pytest

from bankd.build.config import BuildConfig
from bankd.build.demo_data import DemoDataConfig, generate
from bankd.build.pipeline import build_bank
from bankd.serve.server import BankServer, ServerConfig
from bankd_client import BankClient, EncoderMismatch, sample_id_to_int


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    demo = tmp_path_factory.mktemp("demo")
    generate(DemoDataConfig(out=demo, n=48, heldout=0, seed=0), progress=False)
    index = build_bank(
        BuildConfig(
            data=demo / "data.json",
            image_folder=demo,
            out=tmp_path_factory.mktemp("bank") / "bank.faiss",
            workers=0,
            batch_size=16,
            perceiver_steps=2,
            perceiver_batch_size=16,
            eval_fraction=0.0,
            progress=False,
        )
    )
    server = BankServer(ServerConfig(index=str(index), port=0, metrics_port=None)).start()
    try:
        with BankClient(f"127.0.0.1:{server.port}", timeout=60) as client:
            client.wait_ready(30)
            yield demo, client
    finally:
        server.stop(grace=0)


def test_embed_returns_the_stored_keys(served):
    demo, client = served
    info = client.info()
    assert info.embed_available and info.vision_encoder is not None
    names = ["00003", "00017", "00040"]
    keys = client.embed([demo / "images" / f"{n}.png" for n in names])
    assert keys.shape == (3, info.key_dim) and keys.dtype == np.float32
    _, stored = client.fetch([sample_id_to_int(n) for n in names], with_keys=True)
    np.testing.assert_allclose(keys, stored, atol=1e-5)
    # Searching with an embedded key finds its own entry first unless it is excluded.
    hits = client.search(keys, k=3)
    assert [int(h) for h in hits.ids[:, 0]] == [sample_id_to_int(n) for n in names]
    excluded = client.search(keys, k=3, exclude_ids=[[sample_id_to_int(n)] for n in names])
    assert all(sample_id_to_int(n) not in row for n, row in zip(names, excluded.ids, strict=True))


def test_encoder_check_against_the_served_bank(served):
    _, client = served
    from bankd.models.encoders import load_encoder

    same = load_encoder("tiny", seed=0)
    assert client.check_encoder(same.vision_fingerprint()).matches(client.info().vision_encoder)
    other = load_encoder("tiny", seed=1)
    with pytest.raises(EncoderMismatch):
        client.check_encoder(other.vision_fingerprint())
    client.check_encoder(other.vision_fingerprint(), allow_mismatch=True)
