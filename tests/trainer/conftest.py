"""Shared fixtures for the trainer tests: a tiny demo dataset, its bank, a cached tiny LM.

Built once per session under a temporary folder (``TINYALIGN_CACHE`` points there, so
nothing outside it is read or written): 64 training and 16 held-out synthetic pairs, a
mixed file that adds text-only samples, a bank built from the training pairs with the
``tiny`` encoder (seed 0) and a few Perceiver steps, and the ``tiny`` LLM pretrained
for a few steps. ``make_config`` gives CPU-sized ``TrainConfig``s.
"""

from __future__ import annotations

import json
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see tests/conftest.py

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

TINY_LLM_STEPS = 20  # the tiny LM only needs to exist; its quality does not matter here
N_TRAIN, N_HELDOUT, N_TEXT_ONLY = 64, 16, 8


@dataclass(frozen=True)
class Demo:
    root: Path
    data: Path  # 64 image-caption pairs
    heldout: Path  # 16 more, not in the bank
    mixed: Path  # 24 pairs + 8 text-only samples, shuffled together
    images: Path
    bank: Path  # bank.faiss built from `data` with the tiny encoder, seed 0
    cache: Path  # TINYALIGN_CACHE
    llm_dir: Path  # the cached tiny LM pretrained on `data`'s texts
    tiny_llm_steps: int = TINY_LLM_STEPS


@pytest.fixture(scope="session")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Demo]:
    from bankd.build.config import BuildConfig
    from bankd.build.demo_data import DemoDataConfig, generate
    from bankd.build.pipeline import build_bank
    from tinyalign.llm import load_llm, texts_for_tiny_lm

    root = tmp_path_factory.mktemp("tinyalign")
    old_cache = os.environ.get("TINYALIGN_CACHE")
    os.environ["TINYALIGN_CACHE"] = str(root / "cache")
    try:
        info = generate(
            DemoDataConfig(out=root / "data", n=N_TRAIN, heldout=N_HELDOUT), progress=False
        )
        data, images = Path(info["data_json"]), root / "data"
        pairs = json.loads(data.read_text())
        text_only = [
            {
                "id": f"text-{i}",
                "conversations": [
                    {"from": "human", "value": f"Say the number {i}."},
                    {"from": "gpt", "value": f"The number is {i}."},
                ],
            }
            for i in range(N_TEXT_ONLY)
        ]
        mixed = pairs[:24] + text_only
        np.random.default_rng(0).shuffle(mixed)
        (images / "mixed.json").write_text(json.dumps(mixed))
        bank = build_bank(
            BuildConfig(
                data=data,
                image_folder=images,
                out=root / "bank" / "bank.faiss",
                perceiver_steps=2,
                workers=0,
                device="cpu",
                progress=False,
            )
        )
        llm, _ = load_llm(
            "tiny",
            pretrain_texts=texts_for_tiny_lm([data]),
            pretrain_steps=TINY_LLM_STEPS,
            progress=False,
        )
        yield Demo(
            root,
            data,
            Path(info["heldout_json"]),
            images / "mixed.json",
            images,
            Path(bank),
            root / "cache",
            Path(llm.name_or_path),
        )
    finally:
        if old_cache is None:
            os.environ.pop("TINYALIGN_CACHE", None)
        else:
            os.environ["TINYALIGN_CACHE"] = old_cache


@pytest.fixture
def make_config(demo: Demo, tmp_path: Path) -> Callable[..., Any]:
    """make_config(**overrides) -> a CPU-sized stage-1 TrainConfig writing under tmp_path."""
    from tinyalign.config import TrainConfig

    def factory(**overrides: Any) -> TrainConfig:
        fields: dict[str, Any] = dict(
            data=str(demo.data),
            image_folder=str(demo.images),
            out=str(tmp_path / "run"),
            bank=str(demo.bank),
            top_k=2,
            batch_size=4,
            steps=2,
            max_length=64,
            workers=0,
            device="cpu",
            progress=False,
            log_every=1,
            tiny_llm_steps=TINY_LLM_STEPS,
        )
        fields.update(overrides)
        return TrainConfig(**fields)

    return factory


@pytest.fixture(scope="session")
def bank_server(demo: Demo) -> Iterator[Any]:
    """A real bankd server over the demo bank, gRPC on port 0, no metrics port."""
    from bankd.serve.server import BankServer, ServerConfig

    srv = BankServer(
        ServerConfig(
            index=str(demo.bank), host="127.0.0.1", port=0, metrics_port=None, device="cpu"
        )
    ).start()
    yield srv
    srv.stop(grace=0)


@pytest.fixture(scope="session")
def stage1(demo: Demo, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished stage-1 run with retrieval (3 steps), for loading and generation tests."""
    from tinyalign.config import TrainConfig
    from tinyalign.train import train

    out = tmp_path_factory.mktemp("stage1")
    train(
        TrainConfig(
            data=str(demo.data),
            out=str(out),
            bank=str(demo.bank),
            top_k=2,
            batch_size=4,
            steps=3,
            max_length=64,
            workers=0,
            device="cpu",
            progress=False,
            tiny_llm_steps=TINY_LLM_STEPS,
        )
    )
    return out
