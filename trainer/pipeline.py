"""Batches on their way to the model: deterministic order, vision features, prefetched retrieval.

Per micro-batch ``t`` the training loop sees::

    prepare(t+1): load -> frozen vision tower (once) -> query keys -> submit search
    forward/backward(t)                    # the search for t+1 runs meanwhile
    take(t+1): wait for its hits            # usually already there

``Prefetcher`` is that schedule as an iterator. ``ResumableSampler`` gives every epoch a
permutation seeded by ``(seed, epoch)`` (``DistributedSampler``'s shuffle, sharded over
ranks) and can start an epoch part-way; ``micro_batches`` walks epochs from a saved
position, so a resumed run sees the batches an uninterrupted run would have seen. Only
image rows are searched, each excluding its own sample id; text-only rows get neither
image nor retrieval. ``evaluate`` is the held-out loss through the same path.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, Subset

from .conversation import IGNORE_INDEX
from .data import VLMDataset, collate
from .distributed import DistEnv
from .model import TinyAlignVLM
from .retrieval import Retriever

PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto``: bf16 on CUDA (fp16 where bf16 is unsupported), fp32 on the CPU."""
    if precision == "auto":
        if device.type != "cuda":
            return "fp32"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r} (auto, bf16, fp16, fp32)")
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("fp16 needs a CUDA device; use bf16 or fp32 on the CPU")
    return precision


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=PRECISIONS[precision])


class ResumableSampler(Sampler[int]):
    """This rank's share of a seeded per-epoch permutation, optionally skipping a prefix."""

    def __init__(self, n: int, *, seed: int, rank: int = 0, world_size: int = 1) -> None:
        self._inner = DistributedSampler(
            range(n), num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True
        )
        self._skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Iterate epoch ``epoch`` from its ``skip``-th sample on (this rank's count)."""
        self._inner.set_epoch(epoch)
        self._skip = skip

    def __iter__(self) -> Iterator[int]:
        return iter(list(self._inner)[self._skip :])

    def __len__(self) -> int:
        return len(self._inner) - self._skip


@dataclass
class Batch:
    """One micro-batch on the device, with its features and (once taken) its retrieval."""

    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T)
    labels: torch.Tensor  # (B, T)
    features: torch.Tensor | None  # (Bi, P, Dv) frozen patch features of the image rows
    image_rows: torch.Tensor  # (Bi,)
    sample_ids: torch.Tensor  # (B,) int64, as the bank records them
    retrieved: torch.Tensor | None = None  # (Bi, k, 32, 96)
    retrieved_mask: torch.Tensor | None = None  # (Bi, k) False for missing hits
    retrieved_ids: torch.Tensor | None = None  # (Bi, k) entry ids
    wait_s: float = 0.0  # time blocked on this batch's search
    position: tuple[int, int] | None = None  # (epoch, micro-batch index in that epoch)
    pending: Future | None = field(default=None, repr=False)

    def model_inputs(self) -> dict[str, Any]:
        return {
            "input_ids": self.input_ids,
            "attention_mask": self.attention_mask,
            "labels": self.labels,
            "features": self.features,
            "image_rows": self.image_rows,
            "retrieved": self.retrieved,
            "retrieved_mask": self.retrieved_mask,
        }


class Prefetcher:
    """Turns collated CPU batches into ``Batch``es whose search started one batch early."""

    def __init__(
        self,
        model: TinyAlignVLM,
        retriever: Retriever | None,
        device: torch.device,
        precision: str = "fp32",
    ) -> None:
        if model.rag_connector is not None and retriever is None:
            raise ValueError("this model uses retrieval: a retriever (bank) is required")
        self.model = model
        self.retriever = retriever if model.rag_connector is not None else None
        self.device = device
        self.precision = precision

    def prepare(self, raw: dict[str, Any]) -> Batch:
        """Move to the device, run the vision tower, start the search (no waiting)."""
        dev = self.device
        batch = Batch(
            input_ids=raw["input_ids"].to(dev, non_blocking=True),
            attention_mask=raw["attention_mask"].to(dev, non_blocking=True),
            labels=raw["labels"].to(dev, non_blocking=True),
            features=None,
            image_rows=raw["image_rows"].to(dev),
            sample_ids=raw["sample_ids"],
            position=raw.get("position"),
        )
        if raw["pixel_values"] is not None and len(raw["image_rows"]):
            # With retrieval the tower runs in the bank's key precision, not the run's.
            tower = self.retriever.feature_precision if self.retriever is not None else None
            with autocast(self.precision, dev):
                batch.features = self.model.image_features(
                    raw["pixel_values"].to(dev), precision=tower
                )
            if self.retriever is not None:
                own = raw["sample_ids"][raw["image_rows"]]  # self-exclusion: no label leakage
                texts = raw.get("query_texts")  # instructions only: never an answer
                if texts is not None:
                    texts = [texts[r] for r in raw["image_rows"].tolist()]
                batch.pending = self.retriever.submit(batch.features, own, texts)
        return batch

    def take(self, batch: Batch) -> Batch:
        """Wait for the batch's search (if any) and attach the values."""
        if batch.pending is not None:
            t0 = time.perf_counter()
            got = batch.pending.result()
            batch.wait_s = time.perf_counter() - t0
            batch.retrieved = got.values.to(self.device, non_blocking=True)
            batch.retrieved_mask = got.mask.to(self.device)
            batch.retrieved_ids = got.ids
            batch.pending = None
        return batch

    def __call__(self, batches: Iterable[dict[str, Any]]) -> Iterator[Batch]:
        """Yield ready batches; batch t+1 is prepared before batch t is handed out."""
        it = iter(batches)
        raw = next(it, None)
        current = self.take(self.prepare(raw)) if raw is not None else None
        while current is not None:
            raw = next(it, None)
            upcoming = self.prepare(raw) if raw is not None else None
            yield current  # the caller computes on it while upcoming's search runs
            current = self.take(upcoming) if upcoming is not None else None


def micro_batches(
    dataset: Dataset,
    sampler: ResumableSampler,
    *,
    batch_size: int,
    collate_fn: Any,
    workers: int,
    start: tuple[int, int],
    count: int,
    pin_memory: bool = False,
) -> Iterator[dict[str, Any]]:
    """``count`` collated batches from position ``start`` = (epoch, batch in epoch) on,
    across epochs; each carries its ``position``. Incomplete last batches are dropped."""
    epoch, pos = start
    while count > 0:
        sampler.set_epoch(epoch, skip=pos * batch_size)
        loader = DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            collate_fn=collate_fn,
            num_workers=workers,
            drop_last=True,
            pin_memory=pin_memory,
        )
        for raw in loader:
            raw["position"] = (epoch, pos)
            yield raw
            pos, count = pos + 1, count - 1
            if count == 0:
                return
        epoch, pos = epoch + 1, 0


@torch.no_grad()
def evaluate(
    model: TinyAlignVLM,
    dataset: VLMDataset,
    retriever: Retriever | None = None,
    *,
    batch_size: int = 8,
    device: str | torch.device | None = None,
    precision: str = "fp32",
    workers: int = 0,
    env: DistEnv | None = None,
) -> float:
    """Token-weighted mean loss over ``dataset`` (self-exclusion on, as in training).

    Under torch.distributed each rank takes every world_size-th sample and the sums are
    all-reduced, so every rank returns the same number.
    """
    env = env or DistEnv()
    device = torch.device(device) if device is not None else next(model.parameters()).device
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    shard = Subset(dataset, range(env.rank, len(dataset), env.world_size))
    loader = DataLoader(
        shard,
        batch_size=batch_size,
        collate_fn=partial(collate, pad_token_id=dataset.tokenizer.pad_token_id),
        num_workers=workers,
    )
    total, tokens = 0.0, 0
    for batch in Prefetcher(model, retriever, device, precision)(loader):
        with autocast(precision, device):
            loss = model(**batch.model_inputs()).loss
        n = int((batch.labels[:, 1:] != IGNORE_INDEX).sum())  # what the shifted loss averages
        total, tokens = total + float(loss.float()) * n, tokens + n
    for m, was in modes:
        m.train(was)
    total, tokens = env.sum([total, float(tokens)])
    if tokens == 0:
        raise ValueError(f"{dataset.json_path}: no supervised tokens to evaluate")
    return total / tokens
