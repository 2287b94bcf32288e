"""The released LLaVA files' quirks (tests/fixtures/llava_quirks/quirks.json) and
vision-only checkpoints as vision towers.

The fixture's nine samples: a Pretrain-style id and prompt with ``<image>`` at the end;
the same id again (mix665k repeats ids); a conversation that opens with a gpt turn;
an int id with two rounds; a text-only ShareGPT sample; two human turns in a row; an
empty conversation; no id; user/assistant roles.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from PIL import Image

from bankd.build.config import BuildConfig
from bankd.build.data import first_of_each_id, read_llava_json
from bankd.build.pipeline import build_bank
from bankd.models.encoders import load_encoder
from bankd.store.reader import Bank
from tinyalign.conversation import IGNORE_INDEX, get_template, query_text
from tinyalign.data import VLMDataset
from tinyalign.llm import load_llm

QUIRKS = Path(__file__).resolve().parents[1] / "fixtures" / "llava_quirks"


def _dataset(demo: Any, **kw: Any) -> VLMDataset:
    tok = load_llm(str(demo.llm_dir), progress=False)[1]
    enc = load_encoder("tiny")
    return VLMDataset(
        QUIRKS / "quirks.json", QUIRKS, tok, get_template("vicuna"), enc.preprocess, **kw
    )


def test_trainer_skips_and_counts_malformed_samples(demo: Any) -> None:
    ds = _dataset(demo)
    assert (len(ds), ds.skipped) == (6, 3)
    assert "sample 5" in ds.skip_reasons[0]
    assert any("missing 'id'" in r for r in ds.skip_reasons)
    ids = [e.get("id") for e in ds.entries]
    assert "two-human-turns" not in ids and "no-turns" not in ids
    items = [ds[i] for i in range(len(ds))]  # every kept sample tokenises and loads
    assert sum(it["has_image"] for it in items) == 5
    with pytest.raises(ValueError, match="--strict"):
        _dataset(demo, strict=True)


def test_leading_gpt_turn_is_dropped_as_llava_does(demo: Any) -> None:
    ds = _dataset(demo)
    i = [e.get("id") for e in ds.entries].index("leading-gpt")
    item = ds[i]
    answer = [
        t for t, lab in zip(item["input_ids"], item["labels"], strict=True) if lab != IGNORE_INDEX
    ]
    text = ds.tokenizer.decode(answer, skip_special_tokens=True)
    assert "A blue circle." in text and "Hello!" not in text
    assert item["query_text"] == "What is shown?"
    assert query_text(ds.entries[i]["conversations"]) == "What is shown?"


def test_builder_reads_the_quirks_and_keeps_the_first_of_each_id(tmp_path: Path) -> None:
    samples, reasons = read_llava_json(QUIRKS / "quirks.json")
    assert len(reasons) == 2 and "entry 6" in reasons[0] and "entry 7" in reasons[1]
    by_id = {s.id: s for s in reversed(samples)}  # the first of a repeated id
    assert by_id["leading-gpt"].caption == "A blue circle."
    assert by_id["004539375"].prompt == "Render a clear and concise summary of the photo."
    assert by_id["user-assistant-roles"].caption == "Blue."
    kept, repeats = first_of_each_id([s for s in samples if s.image])
    assert repeats == ["004539375"] and kept[0].image == "a.png"
    with pytest.raises(ValueError, match="entry 6"):
        read_llava_json(QUIRKS / "quirks.json", strict=True)

    out = build_bank(
        BuildConfig(
            data=QUIRKS / "quirks.json",
            image_folder=QUIRKS,
            out=tmp_path / "bank.faiss",
            perceiver_steps=1,
            workers=0,
            device="cpu",
            progress=False,
            batch_size=4,
        )
    )
    report = Bank.load(out).manifest.report
    assert report["entries"] == 5
    assert report["skipped_malformed"] == 2
    assert report["skipped_without_image"] == 1
    assert report["skipped_duplicate_ids"] == 1


def _vision_only(dual: Any, directory: Path, cls: type) -> Path:
    tower = cls(dual.vision_model.config)
    tower.load_state_dict(dual.vision_model.state_dict())
    tower.save_pretrained(directory)
    dual.image_processor.save_pretrained(directory)
    return directory


def test_siglip_vision_model_directory_is_the_dual_encoders_tower(tmp_path: Path) -> None:
    dual = load_encoder("tiny")
    enc = load_encoder(str(_vision_only(dual, tmp_path / "siglip", transformers.SiglipVisionModel)))
    assert not enc.has_text and enc.text_model is None
    assert enc.vision_fingerprint().matches(dual.vision_fingerprint())
    pixels = dual.preprocess([Image.new("RGB", (64, 64), "red")])
    torch.testing.assert_close(enc.image_features(pixels), dual.image_features(pixels))
    with pytest.raises(ValueError, match="vision-only"):
        enc.text_dim  # noqa: B018


def test_clip_vision_model_directory_loads_without_the_class_token(tmp_path: Path) -> None:
    from bankd.models.encoders import build_tiny_image_processor

    vision = transformers.CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=64,
        patch_size=16,
    )
    torch.manual_seed(0)
    tower = transformers.CLIPVisionModel(vision)
    tower.save_pretrained(tmp_path / "clip")
    build_tiny_image_processor().save_pretrained(tmp_path / "clip")
    enc = load_encoder(str(tmp_path / "clip"), feature_layer=-1)
    feats = enc.image_features(enc.preprocess([Image.new("RGB", (64, 64), "blue")]))
    assert feats.shape == (1, 16, 32) and enc.num_patches == 16  # 4 x 4 patches, no CLS


def test_a_vision_only_tower_cannot_build_a_bank(tmp_path: Path) -> None:
    dual = load_encoder("tiny")
    directory = _vision_only(dual, tmp_path / "siglip", transformers.SiglipVisionModel)
    data = json.loads((QUIRKS / "quirks.json").read_text())[:1]
    (tmp_path / "one.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="vision-only"):
        build_bank(
            BuildConfig(
                data=tmp_path / "one.json",
                image_folder=QUIRKS,
                out=tmp_path / "bank.faiss",
                encoder=str(directory),
                workers=0,
                device="cpu",
                progress=False,
            )
        )


def test_a_vision_only_tower_queries_its_dual_encoders_bank(demo: Any, tmp_path: Path) -> None:
    from bankd.search.local import LocalBank
    from tinyalign.retrieval import Retriever

    dual = load_encoder("tiny")
    directory = _vision_only(dual, tmp_path / "siglip", transformers.SiglipVisionModel)
    tower = load_encoder(str(directory))
    pixels = dual.preprocess([Image.new("RGB", (64, 64), "red")])
    with LocalBank(str(demo.bank)) as bank:
        ours = Retriever.from_bank(bank, tower, 2, owns_bank=False)
        theirs = Retriever.from_bank(bank, dual, 2, owns_bank=False)
        torch.testing.assert_close(
            ours.keys(tower.image_features(pixels)), theirs.keys(dual.image_features(pixels))
        )
        ours.close(), theirs.close()
