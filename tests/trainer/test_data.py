"""VLMDataset and collate on demo data mixed with text-only samples."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch

from bankd.build.demo_data import DemoDataConfig, generate
from bankd.models.encoders import load_encoder
from bankd_client import sample_id_to_int
from tinyalign.conversation import IGNORE_INDEX, IMAGE_PLACEHOLDER_ID, get_template
from tinyalign.data import VLMDataset, collate
from tinyalign.llm import TinyLMConfig, texts_for_tiny_lm, train_tiny_tokenizer

TEXT_ONLY = {
    "id": "text-0001",
    "conversations": [
        {"from": "human", "value": "<image>\nName a colour."},  # stray <image>: dropped
        {"from": "gpt", "value": "Red."},
        {"from": "human", "value": "And another?"},
        {"from": "gpt", "value": "Blue."},
    ],
}


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    generate(DemoDataConfig(out=out, n=20, heldout=0), progress=False)
    data = json.loads((out / "data.json").read_text())
    mixed = data[:2] + [TEXT_ONLY] + data[2:4]  # rows 0, 1, 3, 4 have images
    (out / "mixed.json").write_text(json.dumps(mixed))
    return out


@pytest.fixture(scope="module")
def tokenizer(demo: Path):
    return train_tiny_tokenizer(texts_for_tiny_lm([demo / "data.json"]), TinyLMConfig())


@pytest.fixture(scope="module")
def preprocess():
    return load_encoder("tiny").preprocess


def dataset(demo: Path, tokenizer, preprocess, name: str = "mixed.json", **kw) -> VLMDataset:
    return VLMDataset(demo / name, demo, tokenizer, get_template("vicuna"), preprocess, **kw)


def test_items_of_image_and_text_only_samples(demo, tokenizer, preprocess) -> None:
    ds = dataset(demo, tokenizer, preprocess)
    assert len(ds) == 5
    image_item, text_item = ds[0], ds[2]
    assert image_item["pixel_values"].shape == (3, 64, 64)
    assert image_item["has_image"] and (image_item["input_ids"] == IMAGE_PLACEHOLDER_ID).sum() == 1
    prompt = ds.entries[0]["conversations"][0]["value"]
    assert image_item["sample_id"] == 0
    assert image_item["query_text"] == prompt.replace("<image>", "").strip() != prompt
    assert text_item["pixel_values"] is None and not text_item["has_image"]
    assert (text_item["input_ids"] == IMAGE_PLACEHOLDER_ID).sum() == 0
    assert text_item["sample_id"] == sample_id_to_int("text-0001")
    assert text_item["input_ids"].dtype == text_item["labels"].dtype == torch.long
    supervised = text_item["labels"][text_item["labels"] != IGNORE_INDEX].tolist()
    assert tokenizer.decode(supervised) == " Red.</s> Blue.</s>"
    ex = ds.example(1)
    assert ex.image_path == demo / ds.entries[1]["image"] and ex.sample_id == 1


def test_collate_shapes_and_masks(demo, tokenizer, preprocess) -> None:
    ds = dataset(demo, tokenizer, preprocess)
    loader = torch.utils.data.DataLoader(
        ds, batch_size=5, collate_fn=functools.partial(collate, pad_token_id=tokenizer.pad_token_id)
    )
    batch = next(iter(loader))
    items = [ds[i] for i in range(5)]
    lengths = [len(it["input_ids"]) for it in items]
    b, t = 5, max(lengths)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert batch["input_ids"].shape == (b, t)
    assert batch["attention_mask"].sum(1).tolist() == lengths
    assert batch["pixel_values"].shape == (4, 3, 64, 64)
    assert batch["image_rows"].tolist() == [0, 1, 3, 4]
    assert batch["has_image"].tolist() == [True, True, False, True, True]
    assert batch["sample_ids"].tolist() == [it["sample_id"] for it in items]
    assert (batch["input_ids"] == IMAGE_PLACEHOLDER_ID).sum(1).tolist() == [1, 1, 0, 1, 1]
    for r, it in enumerate(items):
        n = lengths[r]
        assert torch.equal(batch["input_ids"][r, :n], it["input_ids"])
        assert torch.equal(batch["labels"][r, :n], it["labels"])
        assert (batch["input_ids"][r, n:] == tokenizer.pad_token_id).all()
        assert (batch["labels"][r, n:] == IGNORE_INDEX).all()
    assert torch.equal(batch["pixel_values"][2], items[3]["pixel_values"])
    assert len(batch["query_texts"]) == b


def test_collate_without_images(demo, tokenizer, preprocess) -> None:
    ds = dataset(demo, tokenizer, preprocess)
    batch = collate([ds[2]], pad_token_id=0)
    assert batch["pixel_values"] is None and batch["image_rows"].shape == (0,)
    with pytest.raises(ValueError, match="empty"):
        collate([], pad_token_id=0)


def test_data_fraction_is_seeded_and_ordered(demo, tokenizer, preprocess) -> None:
    kw = {"name": "data.json", "data_fraction": 0.4}
    a = dataset(demo, tokenizer, preprocess, seed=3, **kw)
    b = dataset(demo, tokenizer, preprocess, seed=3, **kw)
    c = dataset(demo, tokenizer, preprocess, seed=4, **kw)
    assert len(a) == 8 and a.indices == b.indices == sorted(a.indices)
    assert a.indices != c.indices
    assert a.sample_ids == a.indices  # demo ids are the row numbers
    assert len(dataset(demo, tokenizer, preprocess, name="data.json")) == 20
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="data_fraction"):
            dataset(demo, tokenizer, preprocess, name="data.json", data_fraction=bad)


def test_missing_and_corrupt_images_name_the_file(demo, tokenizer, preprocess, tmp_path) -> None:
    data = json.loads((demo / "data.json").read_text())[:2]
    data[0]["image"], data[1]["image"] = "images/nope.png", "broken.png"
    (tmp_path / "broken.png").write_bytes(b"not a png")
    (tmp_path / "d.json").write_text(json.dumps(data))
    (tmp_path / "images").mkdir()
    ds = VLMDataset(tmp_path / "d.json", tmp_path, tokenizer, get_template("plain"), preprocess)
    with pytest.raises(FileNotFoundError, match="nope.png"):
        ds[0]
    with pytest.raises(ValueError, match="broken.png"):
        ds[1]


@pytest.mark.parametrize(
    "entry",
    [
        "just a string",
        {"conversations": TEXT_ONLY["conversations"]},  # no id
        {"id": "x", "conversations": []},
        {"id": "x", "image": 7, "conversations": TEXT_ONLY["conversations"]},
        {
            "id": "x",
            "conversations": [{"from": "gpt", "value": "a"}, {"from": "gpt", "value": "b"}],
        },
    ],
)
def test_malformed_entries_name_file_and_index(entry, tokenizer, preprocess, tmp_path) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([TEXT_ONLY, entry]))
    with pytest.raises(ValueError, match=r"bad\.json sample 1"):
        VLMDataset(path, tmp_path, tokenizer, get_template("vicuna"), preprocess, strict=True)
    ds = VLMDataset(path, tmp_path, tokenizer, get_template("vicuna"), preprocess)
    assert (len(ds), ds.skipped) == (1, 1) and "bad.json sample 1" in ds.skip_reasons[0]


def test_not_a_list_raises(tokenizer, preprocess, tmp_path) -> None:
    (tmp_path / "d.json").write_text(json.dumps({"id": 1}))
    with pytest.raises(ValueError, match="JSON list"):
        VLMDataset(tmp_path / "d.json", tmp_path, tokenizer, get_template("plain"), preprocess)
