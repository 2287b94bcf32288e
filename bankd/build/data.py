"""Reading LLaVA-format image-caption data for the bank builder.

LLaVA-Pretrain JSON is a list of samples::

    {"id": "00017", "image": "images/00017.png",
     "conversations": [{"from": "human", "value": "<image>\\nDescribe the image."},
                       {"from": "gpt", "value": "A red circle on the left."}],
     "attributes": {...}}                       # optional, kept for probes

``read_llava_json`` turns it into ``Sample``s, skipping and naming malformed entries
(``load_llava_json`` raises on the first instead: ``bankd build --strict``). As LLaVA
does, a leading turn that is not from the human is dropped before the caption and the
prompt are read.

Duplicate ids (the released instruction mix, llava_v1_5_mix665k, repeats some): the bank
keeps the FIRST sample of each entry id in file order and skips the later ones
(``first_of_each_id``; the build report counts them as ``skipped_duplicate_ids``). Two
ids that map to the same int entry id (``sample_id_to_int``) count as duplicates too.
A trainer excludes a sample's entry by its id, so a skipped duplicate trained on later
still cannot retrieve the kept entry of its id: no leakage either way.

``select_entries``, ``entry_ids`` and
``split_pairs`` pick, number and split them for a bank (caption = first gpt turn, prompt = first
human turn without the ``<image>`` tag). ``ImageCaptionDataset`` opens, decodes and
preprocesses images and tokenizes captions in ``__getitem__``, so a ``DataLoader``'s
worker processes do that work; ``collate`` stacks the fixed-size items.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from bankd.models.embedder import QUERY_TEXT_TOKENS
from bankd.models.encoders import preprocess_images, tokenize_texts
from bankd_client.identity import sample_id_to_int

IMAGE_TAG = "<image>"


@dataclass(frozen=True)
class Sample:
    id: str
    image: str | None  # path relative to the image folder; None for text-only samples
    caption: str  # first gpt turn
    prompt: str  # first human turn, <image> tag removed
    attributes: dict | None = None


_ROLES = {"human": "human", "user": "human", "gpt": "gpt", "assistant": "gpt"}


def drop_leading_non_human(conversations: list) -> list:
    """The turns without a first one that is not from the human (LLaVA drops it)."""
    first = conversations[0] if conversations else None
    if isinstance(first, dict) and _ROLES.get(str(first.get("from", "")).lower()) != "human":
        return conversations[1:]
    return conversations


def _first_turn(conversations: list, speaker: str) -> str | None:
    for turn in conversations:
        if _ROLES.get(str(turn.get("from", "")).lower()) == speaker:
            return turn.get("value")
    return None


def _parse(entry: object, where: str) -> Sample:
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: expected an object, got {type(entry).__name__}")
    sample_id = entry.get("id")
    if isinstance(sample_id, bool) or not isinstance(sample_id, (str, int)) or sample_id == "":
        raise ValueError(f"{where}: missing or invalid 'id' ({sample_id!r})")
    image = entry.get("image")
    if image is not None and (not isinstance(image, str) or not image):
        raise ValueError(f"{where}: 'image' must be a non-empty string, got {image!r}")
    conversations = entry.get("conversations")
    if not isinstance(conversations, list) or not all(isinstance(t, dict) for t in conversations):
        raise ValueError(f"{where}: 'conversations' must be a list of turns")
    conversations = drop_leading_non_human(conversations)
    caption = _first_turn(conversations, "gpt")
    if not isinstance(caption, str) or not caption.strip():
        raise ValueError(f"{where}: no non-empty 'gpt' turn to use as caption")
    prompt = _first_turn(conversations, "human") or ""
    if not isinstance(prompt, str):
        raise ValueError(f"{where}: the 'human' turn value must be a string")
    attributes = entry.get("attributes")
    if attributes is not None and not isinstance(attributes, dict):
        raise ValueError(f"{where}: 'attributes' must be an object")
    return Sample(
        id=str(sample_id),
        image=image,
        caption=caption.strip(),
        prompt=prompt.replace(IMAGE_TAG, "").strip(),
        attributes=attributes,
    )


def read_llava_json(
    path: str | os.PathLike, strict: bool = False
) -> tuple[list[Sample], list[str]]:
    """(samples, reasons): a LLaVA-format JSON list with each malformed entry skipped and
    its reason (file, index, problem) listed; ``strict`` raises on the first instead."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read LLaVA JSON {path}: {e}") from e
    if not isinstance(raw, list):
        raise ValueError(f"{path}: expected a JSON list of samples, got {type(raw).__name__}")
    samples, reasons = [], []
    for i, entry in enumerate(raw):
        try:
            samples.append(_parse(entry, f"{path} entry {i}"))
        except ValueError as e:
            if strict:
                raise
            reasons.append(str(e))
    return samples, reasons


def load_llava_json(path: str | os.PathLike) -> list[Sample]:
    """Parse a LLaVA-format JSON list; malformed entries raise ValueError naming file + index."""
    return read_llava_json(path, strict=True)[0]


def first_of_each_id(samples: list[Sample]) -> tuple[list[Sample], list[str]]:
    """(the first sample of each entry id in file order, the ids of the skipped repeats)."""
    seen: set[int] = set()
    kept, repeats = [], []
    for s in samples:
        key = sample_id_to_int(s.id)
        if key in seen:
            repeats.append(s.id)
        else:
            seen.add(key)
            kept.append(s)
    return kept, repeats


def with_images(samples: list[Sample]) -> tuple[list[Sample], int]:
    """The samples that have an image, and how many were skipped (text-only ones)."""
    kept = [s for s in samples if s.image is not None]
    return kept, len(samples) - len(kept)


def select_entries(samples: list[Sample], entries: int | None, seed: int) -> list[Sample]:
    """A seeded sample of ``entries`` pairs, kept in file order; all when None."""
    if entries is None or entries == len(samples):
        return samples
    if not 1 <= entries <= len(samples):
        raise ValueError(f"entries={entries} but there are {len(samples)} pairs with an image")
    rng = np.random.default_rng([seed, 0])
    return [samples[i] for i in np.sort(rng.choice(len(samples), entries, replace=False))]


def entry_ids(samples: list[Sample]) -> np.ndarray:
    """The int64 entry id of every sample (``sample_id_to_int``); duplicates raise."""
    ids = np.array([sample_id_to_int(s.id) for s in samples], dtype=np.int64)
    uniq, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any():
        dup = {int(i) for i in uniq[counts > 1]}
        names = sorted({s.id for s in samples if sample_id_to_int(s.id) in dup})[:5]
        raise ValueError(f"duplicate sample ids in the data: {names}")
    return ids


def split_pairs(n: int, eval_fraction: float, train_cap: int, seed: int):
    """(training rows, evaluation rows) of n pairs: disjoint, seeded, sorted; at most
    ``train_cap`` training rows."""
    perm = np.random.default_rng([seed, 1]).permutation(n)
    n_eval = int(round(eval_fraction * n)) if n > 1 else 0
    return np.sort(perm[n_eval:][:train_cap]), np.sort(perm[:n_eval])


def open_image(path: str | os.PathLike) -> Image.Image:
    """Open and fully decode an image as RGB; errors name the file."""
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, ValueError) as e:  # missing, truncated or not an image
        raise ValueError(f"cannot read image {path}: {e}") from e


class ImageCaptionDataset(Dataset):
    """Item i = preprocessed pixels of sample i's image and its tokenized caption (and prompt).

    Holds only the encoder's image processor and tokenizer (not the model), so it is cheap
    to send to DataLoader workers.
    """

    def __init__(
        self,
        samples: list[Sample],
        image_folder: str | os.PathLike,
        encoder,
        max_text_tokens: int = 48,
        with_prompt: bool = False,
    ) -> None:
        missing = [s.id for s in samples if s.image is None]
        if missing:
            raise ValueError(f"samples without image cannot be embedded: ids {missing[:5]}")
        self.samples = samples
        self.image_folder = Path(image_folder)
        self.image_processor = encoder.image_processor
        self.tokenizer = encoder.tokenizer
        self.max_text_tokens = min(max_text_tokens, encoder.max_text_tokens)
        self.max_positions = encoder.max_text_tokens
        self.with_prompt = with_prompt

    def __len__(self) -> int:
        return len(self.samples)

    def _tokenize(self, text: str) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask = tokenize_texts(self.tokenizer, [text], self.max_text_tokens)
        return ids[0], mask[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        sample = self.samples[i]
        image = open_image(self.image_folder / sample.image)
        pixels = preprocess_images(self.image_processor, [image])[0]
        ids, mask = self._tokenize(sample.caption)
        item = {
            "index": torch.tensor(i),
            "pixel_values": pixels,
            "input_ids": ids,
            "attention_mask": mask,
        }
        if self.with_prompt:
            # The query side's length (Embedder.tokenize_questions), so both truncate alike.
            ids, mask = tokenize_texts(
                self.tokenizer, [sample.prompt], min(QUERY_TEXT_TOKENS, self.max_positions)
            )
            item["prompt_ids"], item["prompt_mask"] = ids[0], mask[0]
        return item


def collate(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack the fixed-size tensors of a list of items into a batch."""
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}
