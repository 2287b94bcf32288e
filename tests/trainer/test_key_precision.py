"""Query keys equal the bank's stored keys whatever precision the trainer runs in, and a
bank whose keys have a text component (queried with the instruction) trains.

The trainer's path is the real one: ``Prefetcher.prepare`` runs the tower under the
run's autocast and hands the features to the ``Retriever``; the stored keys are read
back from the bank with ``fetch(with_keys=True)``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from bankd.search.local import LocalBank
from tinyalign.conversation import get_template
from tinyalign.data import VLMDataset, collate
from tinyalign.inference import generate
from tinyalign.llm import load_llm, texts_for_tiny_lm
from tinyalign.model import TinyAlignConfig
from tinyalign.pipeline import Prefetcher
from tinyalign.retrieval import Retriever
from tinyalign.train import train

N_PAIRS = 24


@pytest.fixture(scope="module")
def model(demo: Any) -> Any:
    from tinyalign.components import build_vlm

    texts = texts_for_tiny_lm([demo.data])
    cfg = TinyAlignConfig(retrieval=True, top_k=2)
    return build_vlm(cfg, pretrain_texts=texts, tiny_llm_steps=demo.tiny_llm_steps)[0]


@pytest.fixture(scope="module")
def text_bank(demo: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bank keyed on image + instruction (text weight 0.5), key features in bf16."""
    from bankd.build.config import BuildConfig
    from bankd.build.pipeline import build_bank

    root = tmp_path_factory.mktemp("text_bank")
    pairs = json.loads(demo.data.read_text())[:N_PAIRS]
    for i, p in enumerate(pairs):  # instructions that differ between samples
        p["conversations"][0]["value"] = f"<image>\nDescribe picture number {i} briefly."
    data = root / "pairs.json"
    data.write_text(json.dumps(pairs))
    out = build_bank(
        BuildConfig(
            data=data,
            image_folder=demo.images,
            out=root / "bank" / "bank.faiss",
            perceiver_steps=1,
            workers=0,
            device="cpu",
            progress=False,
            text_weight=0.5,
            key_precision="bf16",
        )
    )
    return Path(out)


def _batch(demo: Any, model: Any, data: Path, n: int = 6) -> dict[str, Any]:
    tok = load_llm(str(demo.llm_dir), progress=False)[1]
    ds = VLMDataset(
        data, demo.images, tok, get_template("plain"), model.vision.preprocess, max_length=64
    )
    return collate([ds[i] for i in range(n)], pad_token_id=0)


def _query_and_stored(
    model: Any, bank: LocalBank, raw: dict[str, Any], precision: str
) -> tuple[np.ndarray, np.ndarray, Retriever]:
    retriever = Retriever.from_bank(bank, model.vision, 2, owns_bank=False)
    prefetch = Prefetcher(model, retriever, torch.device("cpu"), precision)
    batch = prefetch.prepare(raw)
    texts = [raw["query_texts"][r] for r in raw["image_rows"].tolist()]
    query = retriever.keys(batch.features, texts).numpy()
    prefetch.take(batch)
    _, stored = bank.fetch(raw["sample_ids"].numpy(), with_keys=True)
    return query, np.asarray(stored), retriever


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_query_keys_equal_stored_keys_of_an_fp32_bank(
    demo: Any, model: Any, precision: str
) -> None:
    raw = _batch(demo, model, demo.data)
    with LocalBank(str(demo.bank)) as bank:
        query, stored, retriever = _query_and_stored(model, bank, raw, precision)
        retriever.close()
    assert retriever.feature_precision == "fp32"
    np.testing.assert_allclose(query, stored, atol=2e-5)


def test_the_run_precision_alone_would_move_the_keys(demo: Any, model: Any) -> None:
    """Without following the bank, a bf16 run's keys differ: the check above can fail."""
    raw = _batch(demo, model, demo.data)
    with LocalBank(str(demo.bank)) as bank:
        retriever = Retriever.from_bank(bank, model.vision, 2, owns_bank=False)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            features = model.image_features(raw["pixel_values"])  # the caller's autocast
        drifted = retriever.keys(features).numpy()
        _, stored = bank.fetch(raw["sample_ids"].numpy(), with_keys=True)
        retriever.close()
    assert np.abs(drifted - np.asarray(stored)).max() > 1e-3


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_text_keyed_bf16_bank_query_keys_equal_stored(
    demo: Any, model: Any, text_bank: Path, precision: str
) -> None:
    raw = _batch(demo, model, text_bank.parent.parent / "pairs.json")
    with LocalBank(str(text_bank)) as bank:
        query, stored, retriever = _query_and_stored(model, bank, raw, precision)
        assert retriever.uses_text and retriever.feature_precision == "bf16"
        with pytest.raises(ValueError, match="text component"):
            retriever.keys(torch.zeros(2, 64, 128))  # no instructions: refused
        retriever.close()
    np.testing.assert_allclose(query, stored, atol=2e-5)


def test_a_text_keyed_bank_trains(demo: Any, text_bank: Path, make_config: Any) -> None:
    result = train(
        make_config(bank=str(text_bank), data=str(text_bank.parent.parent / "pairs.json"), steps=2)
    )
    assert result.completed and all(np.isfinite(result.losses))
    # The trained model answers with the text bank too: the prompt is the instruction.
    pairs = json.loads((text_bank.parent.parent / "pairs.json").read_text())[:2]
    images = [demo.images / p["image"] for p in pairs]
    answers = generate(
        result.out,
        images,
        ["Describe picture number 0 briefly."] * 2,
        bank=str(text_bank),
        max_new_tokens=3,
        device="cpu",
    )
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)


def test_from_bank_refuses_a_text_bank_without_a_text_tower(model: Any, text_bank: Path) -> None:
    class VisionOnly:
        model_id = "vision-only"
        text_model = None
        tokenizer = None

        def __init__(self, inner: Any) -> None:
            self.inner = inner

        def vision_fingerprint(self) -> Any:
            return self.inner.vision_fingerprint()

    from bankd_client import errors

    with LocalBank(str(text_bank)) as bank, pytest.raises(errors.FailedPrecondition, match="text"):
        Retriever.from_bank(bank, VisionOnly(model.vision), 2, owns_bank=False)


def test_from_bank_refuses_other_value_shapes(demo: Any, model: Any) -> None:
    with LocalBank(str(demo.bank)) as bank, pytest.raises(ValueError, match="RAG connector"):
        Retriever.from_bank(bank, model.vision, 2, owns_bank=False, value_shape=(16, 96))


@pytest.mark.gpu
def test_cuda_query_keys_equal_stored_keys_of_a_cpu_bank(demo: Any, model: Any) -> None:
    """A bank built on the CPU (fp32 key features), queried by a bf16 run on CUDA."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    raw = _batch(demo, model, demo.data)
    cuda = model.to("cuda")
    try:
        with LocalBank(str(demo.bank)) as bank:
            retriever = Retriever.from_bank(bank, cuda.vision, 2, owns_bank=False)
            batch = Prefetcher(cuda, retriever, torch.device("cuda"), "bf16").prepare(raw)
            query = retriever.keys(batch.features).cpu().numpy()
            _, stored = bank.fetch(raw["sample_ids"].numpy(), with_keys=True)
            retriever.close()
    finally:
        model.to("cpu")
    # fp32 on two devices: the same function, different kernels' rounding.
    np.testing.assert_allclose(query, np.asarray(stored), atol=1e-4)
