"""LLaVA-format datasets for TinyAlign training, and the collate function that batches them.

    ds = VLMDataset("data/shapes/data.json", "data/shapes", tokenizer, get_template("plain"),
                    encoder.preprocess, max_length=512, data_fraction=0.4)
    loader = DataLoader(ds, batch_size=8, collate_fn=partial(collate, pad_token_id=pad_id))

Entries are checked when the file is loaded. The released LLaVA files hold a few
malformed samples (turns that do not alternate, a missing id or conversation); these are
skipped and counted, and the load logs how many with the first reasons (file, index, id,
what is wrong), so one bad sample does not stop a 665K-sample run. ``strict=True``
(``--strict``) raises on the first one instead. A leading non-human turn is dropped as
LLaVA does (``conversation.parse_turns``). Tokenisation and image decoding happen per
item. A sample without an
``"image"`` key is text-only: no placeholder, no pixels. ``collate`` stacks pixels only for
the rows that have an image and says which rows those are (``image_rows``), which is
what ``TinyAlignVLM.assemble`` expects. Each item carries its sample id (as the int a
bank entry records) so retrieval can exclude the sample's own entry.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from bankd_client import sample_id_to_int

from .conversation import (
    IGNORE_INDEX,
    ChatTemplate,
    parse_turns,
    query_text,
    tokenize_conversation,
)

log = logging.getLogger(__name__)

SKIP_REASONS_SHOWN = 5  # malformed samples named in the load's summary

ImageProcessorFn = Callable[[list[Image.Image]], torch.Tensor]  # list[PIL] -> (B, 3, H, W)


@dataclass
class Example:
    """One tokenised sample before image decoding."""

    sample_id: int
    input_ids: list[int]
    labels: list[int]
    image_path: Path | None
    query_text: str


def _select(n: int, data_fraction: float, seed: int) -> list[int]:
    """A seeded subset of round(fraction * n) indices (at least one), in original order."""
    if not 0.0 < data_fraction <= 1.0:
        raise ValueError(f"data_fraction must be in (0, 1], got {data_fraction}")
    if data_fraction == 1.0:
        return list(range(n))
    keep = max(1, round(data_fraction * n))
    rng = np.random.default_rng(seed)
    return sorted(int(i) for i in rng.permutation(n)[:keep])


class VLMDataset(torch.utils.data.Dataset):
    """Samples of a LLaVA JSON file: ids, labels, pixel values, sample id."""

    def __init__(
        self,
        json_path: str | Path,
        image_folder: str | Path | None,
        tokenizer,
        template: ChatTemplate,
        image_processor_fn: ImageProcessorFn,
        max_length: int = 512,
        data_fraction: float = 1.0,
        seed: int = 0,
        strict: bool = False,
    ) -> None:
        self.json_path = Path(json_path)
        self.image_folder = (
            Path(image_folder) if image_folder is not None else self.json_path.parent
        )
        self.tokenizer = tokenizer
        self.template = template
        self.image_processor_fn = image_processor_fn
        self.max_length = max_length
        try:
            entries = json.loads(self.json_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read dataset {self.json_path}: {e}") from e
        if not isinstance(entries, list):
            raise ValueError(f"{self.json_path}: expected a JSON list of samples")
        valid: list[tuple[int, int]] = []  # (row of the file, sample id)
        reasons: list[str] = []
        for i, entry in enumerate(entries):
            try:
                valid.append((i, self._check(entry, i)))
            except ValueError as e:
                if strict:
                    raise ValueError(f"{e} (--strict: a malformed sample stops the run)") from e
                reasons.append(str(e))
        self.skipped = len(reasons)
        self.skip_reasons = reasons[:SKIP_REASONS_SHOWN]
        if reasons:
            log.warning(
                "dataset %s: skipped %d malformed of %d samples (--strict to stop instead); "
                "first reasons:\n  %s",
                self.json_path,
                len(reasons),
                len(entries),
                "\n  ".join(self.skip_reasons),
            )
        if not valid:
            raise ValueError(f"{self.json_path}: none of its {len(entries)} samples is usable")
        picked = _select(len(valid), data_fraction, seed)
        self.indices = [valid[j][0] for j in picked]  # rows of the full file
        self.entries = [entries[i] for i in self.indices]
        self.sample_ids = [valid[j][1] for j in picked]
        n_images = sum(1 for e in self.entries if e.get("image") is not None)
        log.info(
            "dataset %s: %d of %d samples (fraction %g, seed %d), %d with images",
            self.json_path,
            len(self.entries),
            len(entries),
            data_fraction,
            seed,
            n_images,
        )

    def _check(self, entry: Any, index: int) -> int:
        """The entry's int sample id; ValueError naming file and index if malformed."""
        where = f"{self.json_path} sample {index}"
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: expected an object, got {type(entry).__name__}")
        if "id" not in entry:
            raise ValueError(f"{where}: missing 'id'")
        image = entry.get("image")
        if image is not None and (not isinstance(image, str) or not image):
            raise ValueError(f"{where}: 'image' must be a relative path string, got {image!r}")
        try:
            parse_turns(entry.get("conversations"))
            return sample_id_to_int(entry["id"])
        except ValueError as e:
            raise ValueError(f"{where} (id {entry.get('id')!r}): {e}") from e

    def __len__(self) -> int:
        return len(self.entries)

    def example(self, i: int) -> Example:
        """Item ``i`` tokenised, image not yet loaded."""
        entry = self.entries[i]
        has_image = entry.get("image") is not None
        tokens = tokenize_conversation(
            entry["conversations"],
            self.tokenizer,
            self.template,
            self.max_length,
            has_image=has_image,
            name=f"{entry['id']!r} ({self.json_path} index {self.indices[i]})",
        )
        return Example(
            sample_id=self.sample_ids[i],
            input_ids=tokens.input_ids,
            labels=tokens.labels,
            image_path=self.image_folder / entry["image"] if has_image else None,
            query_text=query_text(entry["conversations"]),
        )

    def load_image(self, path: Path) -> Image.Image:
        """The RGB image at ``path``; errors name the file."""
        try:
            with Image.open(path) as im:
                return im.convert("RGB")
        except FileNotFoundError as e:
            raise FileNotFoundError(f"image {path} not found (dataset {self.json_path})") from e
        except (OSError, UnidentifiedImageError) as e:
            raise ValueError(f"cannot read image {path} (dataset {self.json_path}): {e}") from e

    def __getitem__(self, i: int) -> dict[str, Any]:
        ex = self.example(i)
        pixel_values = None
        if ex.image_path is not None:
            pixel_values = self.image_processor_fn([self.load_image(ex.image_path)])[0]  # (3,H,W)
        return {
            "input_ids": torch.tensor(ex.input_ids, dtype=torch.long),
            "labels": torch.tensor(ex.labels, dtype=torch.long),
            "pixel_values": pixel_values,
            "sample_id": ex.sample_id,
            "has_image": ex.image_path is not None,
            "query_text": ex.query_text,
        }


def collate(items: list[dict[str, Any]], pad_token_id: int) -> dict[str, Any]:
    """Right-padded batch; pixels only for the rows that have an image.

    Returns input_ids, attention_mask, labels (B, T); pixel_values (Bi, 3, H, W) or None;
    image_rows (Bi,) rows with an image, ascending; sample_ids (B,); has_image (B,) bool;
    query_texts: list of B strings.
    """
    if not items:
        raise ValueError("cannot collate an empty batch")
    b, t = len(items), max(len(it["input_ids"]) for it in items)
    input_ids = torch.full((b, t), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((b, t), dtype=torch.long)
    labels = torch.full((b, t), IGNORE_INDEX, dtype=torch.long)
    for r, it in enumerate(items):
        n = len(it["input_ids"])
        input_ids[r, :n], attention_mask[r, :n], labels[r, :n] = it["input_ids"], 1, it["labels"]
    rows = [r for r, it in enumerate(items) if it["has_image"]]
    pixels = [items[r]["pixel_values"] for r in rows]
    if any(p is None for p in pixels):
        raise ValueError("an item marked has_image has no pixel_values")
    if len({tuple(p.shape) for p in pixels}) > 1:
        raise ValueError(f"images of different shapes in one batch: {[p.shape for p in pixels]}")
    return {
        "input_ids": input_ids,  # (B, T); IMAGE_PLACEHOLDER_ID stays where it is
        "attention_mask": attention_mask,  # (B, T)
        "labels": labels,  # (B, T)
        "pixel_values": torch.stack(pixels) if pixels else None,  # (Bi, 3, H, W)
        "image_rows": torch.tensor(rows, dtype=torch.long),  # (Bi,)
        "sample_ids": torch.tensor([it["sample_id"] for it in items], dtype=torch.long),  # (B,)
        "has_image": torch.tensor([it["has_image"] for it in items], dtype=torch.bool),  # (B,)
        "query_texts": [it.get("query_text", "") for it in items],
    }
