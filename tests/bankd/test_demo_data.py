"""Tests for bankd.build.demo_data: determinism, LLaVA-Pretrain schema, pixels that match
captions."""

from __future__ import annotations

import argparse
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bankd.build import demo_data
from bankd.build.demo_data import (
    ATTRIBUTES,
    BACKGROUNDS_RGB,
    COLORS_RGB,
    COUNT_WORDS,
    REGIONS,
    SIZE_WORDS,
    DemoDataConfig,
    generate,
)

N, HELDOUT, SIZE = 40, 10, 64


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict], list[dict]]:
    out = tmp_path_factory.mktemp("shapes")
    generate(DemoDataConfig(out=out, n=N, heldout=HELDOUT, image_size=SIZE), progress=False)
    data = json.loads((out / "data.json").read_text(encoding="utf-8"))
    heldout = json.loads((out / "heldout.json").read_text(encoding="utf-8"))
    return out, data, heldout


def _pixels(out: Path, sample: dict) -> np.ndarray:
    return np.asarray(Image.open(out / sample["image"]).convert("RGB"))  # (H, W, 3)


def _object_mask(out: Path, sample: dict) -> np.ndarray:
    rgb = COLORS_RGB[sample["attributes"]["color"]]
    return np.all(_pixels(out, sample) == rgb, axis=-1)  # (H, W) bool


def _components(mask: np.ndarray) -> int:
    """Number of 4-connected components; a tiny flood fill is enough at test sizes."""
    seen = np.zeros_like(mask)
    count = 0
    for y, x in np.argwhere(mask):
        if seen[y, x]:
            continue
        count += 1
        stack = [(y, x)]
        seen[y, x] = True
        while stack:
            cy, cx = stack.pop()
            for ny, nx in ((cy + 1, cx), (cy - 1, cx), (cy, cx + 1), (cy, cx - 1)):
                inside = 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1]
                if inside and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
    return count


def test_same_config_gives_identical_bytes(tmp_path: Path) -> None:
    paths = []
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        out = tmp_path / name
        generate(DemoDataConfig(out=out, n=12, heldout=3, seed=seed, image_size=48), progress=False)
        paths.append(out)
    a, b, c = paths
    for rel in ("data.json", "heldout.json", "images/00000.png", "images/00007.png"):
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    assert (a / "images/00014.png").read_bytes() == (b / "images/00014.png").read_bytes()
    assert (a / "data.json").read_bytes() != (c / "data.json").read_bytes()
    images = [f"images/{i:05d}.png" for i in range(12)]
    assert any((a / rel).read_bytes() != (c / rel).read_bytes() for rel in images)


def test_regenerating_overwrites_in_place(tmp_path: Path) -> None:
    config = DemoDataConfig(out=tmp_path, n=5, heldout=2, image_size=32)
    generate(config, progress=False)
    first = (tmp_path / "data.json").read_bytes()
    generate(config, progress=False)
    assert (tmp_path / "data.json").read_bytes() == first
    assert not list(tmp_path.glob("*.tmp"))


def test_schema_ids_images_and_conversations(dataset) -> None:
    out, data, heldout = dataset
    assert len(data) == N
    assert [s["id"] for s in data] == [f"{i:05d}" for i in range(N)]
    for sample in data + heldout:
        assert set(sample) == {"id", "image", "conversations", "attributes"}
        assert sample["image"] == f"images/{sample['id']}.png"
        with Image.open(out / sample["image"]) as image:
            assert image.size == (SIZE, SIZE)
        human, gpt = sample["conversations"]
        assert human["from"] == "human" and human["value"].startswith("<image>\n")
        assert gpt["from"] == "gpt" and "<image>" not in gpt["value"]
        for name, value in sample["attributes"].items():
            assert value in ATTRIBUTES[name], (name, value)
        assert sample["attributes"]["color"] != sample["attributes"]["background"]


def test_caption_mentions_every_attribute(dataset) -> None:
    _, data, heldout = dataset
    for sample in data + heldout:
        attrs, caption = sample["attributes"], sample["conversations"][1]["value"].lower()
        words = {
            "shape": (attrs["shape"],),  # plurals start with the singular
            "color": (attrs["color"],),
            "size": SIZE_WORDS[attrs["size"]],
            "position": (attrs["position"],),
            "count": (COUNT_WORDS[attrs["count"]],),
            "background": (attrs["background"],),
        }
        for name, options in words.items():
            assert any(re.search(rf"\b{w}", caption) for w in options), (name, caption)


def test_captions_vary_in_wording(dataset) -> None:
    _, data, _ = dataset
    openings = {s["conversations"][1]["value"].split()[0] for s in data}
    prompts = {s["conversations"][0]["value"] for s in data}
    assert len(openings) >= 3 and len(prompts) >= 3


def test_pixels_reflect_attributes(dataset) -> None:
    out, data, _ = dataset
    for sample in data[:20]:
        attrs = sample["attributes"]
        pixels = _pixels(out, sample).reshape(-1, 3)
        dominant, _ = Counter(map(tuple, pixels.tolist())).most_common(1)[0]
        assert dominant == BACKGROUNDS_RGB[attrs["background"]], sample["id"]
        mask = _object_mask(out, sample)
        assert mask.any(), sample["id"]
        # Only background and object colours: no anti-aliasing, so probes see clean classes.
        assert np.all(mask | np.all(_pixels(out, sample) == dominant, axis=-1))
        (fx0, fy0, fx1, fy1), _ = REGIONS[attrs["position"]]
        ys, xs = np.nonzero(mask)
        assert xs.min() >= round(fx0 * SIZE) and xs.max() < round(fx1 * SIZE), sample["id"]
        assert ys.min() >= round(fy0 * SIZE) and ys.max() < round(fy1 * SIZE), sample["id"]


def test_objects_do_not_overlap(tmp_path: Path) -> None:
    generate(DemoDataConfig(out=tmp_path, n=30, heldout=0, image_size=96), progress=False)
    data = json.loads((tmp_path / "data.json").read_text(encoding="utf-8"))
    for sample in data:
        count = _components(_object_mask(tmp_path, sample))
        assert count == sample["attributes"]["count"], sample


def test_small_and_large_differ_in_area(dataset) -> None:
    out, data, _ = dataset
    areas: dict[str, list[float]] = {"small": [], "large": []}
    for sample in data:
        attrs = sample["attributes"]
        areas[attrs["size"]].append(_object_mask(out, sample).sum() / attrs["count"])
    assert areas["small"] and areas["large"]
    assert max(areas["small"]) < min(areas["large"])


def test_heldout_count_and_ids(dataset) -> None:
    out, data, heldout = dataset
    assert len(heldout) == HELDOUT
    train_ids = {s["id"] for s in data}
    held_ids = [s["id"] for s in heldout]
    assert held_ids == [f"{N + j:05d}" for j in range(HELDOUT)]
    assert not train_ids & set(held_ids)
    assert all((out / s["image"]).is_file() for s in heldout)


def test_ids_widen_past_five_digits() -> None:
    # Rendering 100k images is too slow for a unit test, so only the width rule is checked.
    assert demo_data._id_width(1) == 5
    assert demo_data._id_width(100_000) == 5  # ids 00000..99999
    assert demo_data._id_width(100_001) == 6


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"n": 0}, "n must be"),
        ({"heldout": -1}, "heldout must be"),
        ({"image_size": 31}, "image_size"),
        ({"image_size": 1025}, "image_size"),
        ({"seed": -1}, "seed"),
    ],
)
def test_bad_arguments_raise_value_error(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DemoDataConfig(out=tmp_path, **kwargs)


def test_cli_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    demo_data.add_arguments(parser)
    flags = "--n 3 --heldout 1 --seed 7 --image-size 40".split()
    args = parser.parse_args(["--out", str(tmp_path / "d"), *flags])
    assert demo_data.run(args) == 0
    summary = capsys.readouterr().out.strip()
    assert "3 training" in summary and "1 held-out" in summary and str(tmp_path / "d") in summary
    assert len(summary.splitlines()) == 1
    config = json.loads((tmp_path / "d" / "demo_data.config.json").read_text(encoding="utf-8"))
    assert config == {"n": 3, "heldout": 1, "seed": 7, "image_size": 40}
    with pytest.raises(ValueError):
        demo_data.run(parser.parse_args(["--out", str(tmp_path / "e"), "--n", "0"]))
