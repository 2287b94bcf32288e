"""Synthetic image-caption pairs in LLaVA-Pretrain format: the offline default dataset.

``bankd demo-data --out data/shapes --n 2000`` writes::

    data/shapes/data.json      # n training samples (LLaVA-Pretrain JSON list)
    data/shapes/heldout.json   # held-out samples, same distribution, ids continue after training
    data/shapes/images/00000.png ...
    data/shapes/demo_data.config.json  # the config that made them

Each picture shows 1-3 identical shapes (shape, colour, size) in one region of a plain
background, and its caption states every attribute in one of a few English templates. The
``attributes`` dict of each sample is kept so informativeness probes and tests can read the
ground truth. Output is a pure function of the config: sample ``i`` of a split is drawn from
its own RNG seeded by ``(seed, split, i)``, so the same config gives byte-identical files.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

log = logging.getLogger(__name__)

COLORS_RGB: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 30),
    "orange": (245, 140, 20),
    "purple": (140, 50, 170),
    "pink": (240, 120, 180),
    "cyan": (30, 200, 210),
}
BACKGROUNDS_RGB: dict[str, tuple[int, int, int]] = {
    "gray": (128, 128, 128),
    "black": (0, 0, 0),
    "white": (255, 255, 255),
    "beige": (235, 225, 195),
}

# Values here are exactly the values stored in each sample's "attributes" (count is an int),
# so a probe can use ATTRIBUTES[name].index(sample["attributes"][name]) as a class label.
ATTRIBUTES: dict[str, tuple[str | int, ...]] = {
    "shape": ("circle", "square", "triangle", "diamond", "cross", "star"),
    "color": tuple(COLORS_RGB),
    "size": ("small", "large"),
    "position": ("left", "right", "top", "bottom", "center"),
    "count": (1, 2, 3),
    "background": tuple(BACKGROUNDS_RGB),
}

PLURALS: dict[str, str] = {
    "circle": "circles",
    "square": "squares",
    "triangle": "triangles",
    "diamond": "diamonds",
    "cross": "crosses",
    "star": "stars",
}
COUNT_WORDS: dict[int, str] = {1: "one", 2: "two", 3: "three"}
SIZE_WORDS: dict[str, tuple[str, ...]] = {"small": ("small", "little"), "large": ("large", "big")}
POSITION_PHRASES: dict[str, tuple[str, ...]] = {
    "left": ("on the left", "at the left", "on the left side"),
    "right": ("on the right", "at the right", "on the right side"),
    "top": ("at the top", "near the top", "along the top"),
    "bottom": ("at the bottom", "near the bottom", "along the bottom"),
    "center": ("in the center", "at the center", "around the center"),
}
CAPTION_TEMPLATES: tuple[str, ...] = (
    "{np} {pos} over {a_bg} background.",
    "{a_bg} background with {np} {pos}.",
    "{np} {be} placed {pos} on {a_bg} background.",
    "on {a_bg} background, {np} {be} shown {pos}.",
    "there {be} {np} {pos}, against {a_bg} background.",
    "{np} {pos}; the background is {bg}.",
)
PROMPTS: tuple[str, ...] = (
    "Describe the image briefly.",
    "Give a short description of this picture.",
    "What is shown in the image?",
    "Write a brief caption for the image.",
    "Summarize the visual content of the image.",
    "Provide a one-sentence caption for this image.",
)

# Regions as fractions of the side (x0, y0, x1, y1) and the (cols, rows) grid of slots in them.
# Every grid has at least 3 slots, one object per slot, so up to 3 objects never overlap.
REGIONS: dict[str, tuple[tuple[float, float, float, float], tuple[int, int]]] = {
    "left": ((0.04, 0.08, 0.46, 0.92), (1, 3)),
    "right": ((0.54, 0.08, 0.96, 0.92), (1, 3)),
    "top": ((0.08, 0.04, 0.92, 0.46), (3, 1)),
    "bottom": ((0.08, 0.54, 0.92, 0.96), (3, 1)),
    "center": ((0.22, 0.22, 0.78, 0.78), (2, 2)),
}
SIZE_FRACTIONS: dict[str, float] = {"small": 0.12, "large": 0.22}
_SPLITS: dict[str, int] = {"train": 0, "heldout": 1}


@dataclass(frozen=True)
class DemoDataConfig:
    """What to generate; validated on construction."""

    out: Path
    n: int = 2000  # training pairs
    heldout: int = 200  # held-out pairs (separate file)
    seed: int = 0
    image_size: int = 96  # square PNG side in pixels

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        if self.heldout < 0:
            raise ValueError(f"heldout must be >= 0, got {self.heldout}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if not 32 <= self.image_size <= 1024:
            raise ValueError(f"image_size must be between 32 and 1024, got {self.image_size}")


def pick(rng: np.random.Generator, options: tuple) -> object:
    # Index-based choice keeps Python types (str/int) instead of numpy scalars.
    return options[int(rng.integers(len(options)))]


def article(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def sample_attributes(rng: np.random.Generator) -> dict[str, str | int]:
    background = pick(rng, ATTRIBUTES["background"])
    colors = tuple(c for c in ATTRIBUTES["color"] if c != background)
    return {
        "shape": pick(rng, ATTRIBUTES["shape"]),
        "color": pick(rng, colors),
        "size": pick(rng, ATTRIBUTES["size"]),
        "position": pick(rng, ATTRIBUTES["position"]),
        "count": pick(rng, ATTRIBUTES["count"]),
        "background": background,
    }


def _caption(attrs: dict[str, str | int], rng: np.random.Generator) -> str:
    count = int(attrs["count"])
    noun = PLURALS[attrs["shape"]] if count > 1 else attrs["shape"]
    size_word = pick(rng, SIZE_WORDS[attrs["size"]])
    text = pick(rng, CAPTION_TEMPLATES).format(
        np=f"{COUNT_WORDS[count]} {size_word} {attrs['color']} {noun}",
        pos=pick(rng, POSITION_PHRASES[attrs["position"]]),
        a_bg=article(str(attrs["background"])),
        bg=attrs["background"],
        be="are" if count > 1 else "is",
    )
    return text[0].upper() + text[1:]


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int], fill) -> None:
    """Draw ``shape`` inside the d x d square whose top-left corner is (x, y)."""
    x, y, d = box
    x1, y1 = x + d - 1, y + d - 1  # PIL boxes are inclusive
    cx, cy = (x + x1) / 2, (y + y1) / 2
    if shape == "circle":
        draw.ellipse((x, y, x1, y1), fill=fill)
    elif shape == "square":
        inset = round(d * 0.1)  # so a square does not look bigger than a circle of the same size
        draw.rectangle((x + inset, y + inset, x1 - inset, y1 - inset), fill=fill)
    elif shape == "triangle":
        draw.polygon([(round(cx), y), (x1, y1), (x, y1)], fill=fill)
    elif shape == "diamond":
        draw.polygon([(round(cx), y), (x1, round(cy)), (round(cx), y1), (x, round(cy))], fill=fill)
    elif shape == "cross":
        half = max(1, round(d / 6))
        draw.rectangle((x, round(cy) - half, x1, round(cy) + half), fill=fill)
        draw.rectangle((round(cx) - half, y, round(cx) + half, y1), fill=fill)
    elif shape == "star":
        outer, inner = (d - 1) / 2, (d - 1) / 5
        points = []
        for k in range(10):
            r = outer if k % 2 == 0 else inner
            angle = -math.pi / 2 + k * math.pi / 5
            points.append((round(cx + r * math.cos(angle)), round(cy + r * math.sin(angle))))
        draw.polygon(points, fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def _layout(
    attrs: dict[str, str | int], size: int, rng: np.random.Generator
) -> list[tuple[int, int, int]]:
    """Boxes (x, y, d) for the objects: distinct slots of the region, jittered inside each."""
    (fx0, fy0, fx1, fy1), (cols, rows) = REGIONS[str(attrs["position"])]
    rx0, ry0, rx1, ry1 = (round(f * size) for f in (fx0, fy0, fx1, fy1))
    xs = [rx0 + round(c * (rx1 - rx0) / cols) for c in range(cols + 1)]
    ys = [ry0 + round(r * (ry1 - ry0) / rows) for r in range(rows + 1)]
    gap = max(1, round(0.04 * size))  # keeps neighbours from touching across a slot border
    min_slot = int(min(np.diff(xs).min(), np.diff(ys).min()))
    d = min(max(3, round(SIZE_FRACTIONS[str(attrs["size"])] * size)), min_slot - gap)
    assert d >= 3, f"image_size {size} too small for the region grid"
    slots = rng.permutation(cols * rows)[: int(attrs["count"])]
    boxes = []
    for slot in sorted(int(s) for s in slots):
        c, r = slot % cols, slot // cols
        x = xs[c] + int(rng.integers(xs[c + 1] - gap - d - xs[c] + 1))
        y = ys[r] + int(rng.integers(ys[r + 1] - gap - d - ys[r] + 1))
        boxes.append((x, y, d))
    return boxes


def render_image(attrs: dict[str, str | int], size: int, rng: np.random.Generator) -> Image.Image:
    image = Image.new("RGB", (size, size), BACKGROUNDS_RGB[str(attrs["background"])])
    draw = ImageDraw.Draw(image)
    for box in _layout(attrs, size, rng):
        _draw_shape(draw, str(attrs["shape"]), box, COLORS_RGB[str(attrs["color"])])
    return image


def _make_sample(config: DemoDataConfig, split: str, index: int, sample_id: str) -> tuple:
    """One sample dict and its image; depends only on (seed, split, index)."""
    rng = np.random.default_rng([config.seed, _SPLITS[split], index])
    attrs = sample_attributes(rng)
    prompt = pick(rng, PROMPTS)
    caption = _caption(attrs, rng)
    image = render_image(attrs, config.image_size, rng)
    sample = {
        "id": sample_id,
        "image": f"images/{sample_id}.png",
        "conversations": [
            {"from": "human", "value": f"<image>\n{prompt}"},
            {"from": "gpt", "value": caption},
        ],
        "attributes": attrs,
    }
    return sample, image


def _id_width(total: int) -> int:
    """Digits in a sample id: 5, or more once ``total`` samples need them."""
    return max(5, len(str(total - 1)))


def write_json_atomic(path: Path, payload: object) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def generate(config: DemoDataConfig, progress: bool = True) -> dict:
    """Write images, data.json, heldout.json and the config under ``config.out``.

    Returns a summary: output paths and the number of samples per split.
    """
    log.info("demo-data config: %s", config)
    out = Path(config.out)
    image_dir = out / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    total = config.n + config.heldout
    width = _id_width(total)
    jobs = [("train", i, i) for i in range(config.n)]
    jobs += [("heldout", j, config.n + j) for j in range(config.heldout)]
    samples: dict[str, list[dict]] = {"train": [], "heldout": []}
    for split, index, number in tqdm(jobs, desc="demo-data", unit="img", disable=not progress):
        sample_id = f"{number:0{width}d}"
        sample, image = _make_sample(config, split, index, sample_id)
        image.save(out / sample["image"], format="PNG")
        samples[split].append(sample)
    # JSON goes last, so a data.json on disk always points at images that are already written.
    data_path, heldout_path = out / "data.json", out / "heldout.json"
    write_json_atomic(data_path, samples["train"])
    write_json_atomic(heldout_path, samples["heldout"])
    saved = {k: v for k, v in asdict(config).items() if k != "out"}  # keep the folder relocatable
    write_json_atomic(out / "demo_data.config.json", saved)
    return {
        "out": str(out),
        "data_json": str(data_path),
        "heldout_json": str(heldout_path),
        "image_dir": str(image_dir),
        "n_train": config.n,
        "n_heldout": config.heldout,
        "n_images": total,
        "image_size": config.image_size,
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``bankd demo-data``."""
    parser.add_argument("--out", type=Path, required=True, help="output folder (--image-folder)")
    parser.add_argument("--n", type=int, default=2000, help="training pairs (default 2000)")
    parser.add_argument("--heldout", type=int, default=200, help="held-out pairs (default 200)")
    parser.add_argument("--seed", type=int, default=0, help="RNG seed (default 0)")
    parser.add_argument(
        "--image-size", type=int, default=96, help="square image side in pixels, 32-1024"
    )


def config_from_args(args: argparse.Namespace) -> DemoDataConfig:
    return DemoDataConfig(
        out=Path(args.out),
        n=args.n,
        heldout=args.heldout,
        seed=args.seed,
        image_size=args.image_size,
    )


def run(args: argparse.Namespace) -> int:
    """The pretraining pairs of ``bankd demo-data``; bad values raise ValueError."""
    config = config_from_args(args)
    summary = generate(config, progress=True)
    print(
        f"demo-data: wrote {summary['n_train']} training and {summary['n_heldout']} held-out "
        f"pairs ({summary['image_size']}px images) to {summary['out']}"
    )
    return 0
