"""Retrieval for TinyAlign: query keys from the frozen features, top-k values from bankd.

    bank = open_bank("localhost:50051")           # or "bank/bank.faiss" for an in-process bank
    retriever = Retriever.from_bank(bank, vision, k=5)
    features = vlm.image_features(pixels, precision=retriever.feature_precision)
    pending = retriever.submit(features, sample_ids, texts)  # search runs in the background
    ...                                                # the current step computes meanwhile
    got = pending.result()                             # values (Bi, k, 32, 96), mask (Bi, k)

Query keys come from the features the VLM already computed, through the bank's own
key function (config and weights from GetInfo), so the trainer runs the vision tower
once per batch. The tower runs in the precision the bank recorded for its key features
(``feature_precision``), whatever the trainer's ``--precision``, so query keys equal
the stored ones. Each sample excludes its own entry (self-exclusion: no label leakage).

A bank whose keys have a text component gets the instruction (the first human turn
without ``<image>``, as the builder used it), never the answer, encoded by the frozen
text tower of the same dual encoder through ``bankd.models.embedder.Embedder``, the
builder's own path. ``from_bank`` refuses up front what it cannot serve: another
vision or text encoder, another feature layer, a key or value shape the model does not
take, a text component without a text tower.

An unreachable bank (restarting, rescheduled) is waited for with exponential backoff
for up to ``retry_for_s`` seconds; then ``RetrievalUnavailable`` says so clearly.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bankd.models.embedder import Embedder
from bankd.models.keys import KeyFunction
from bankd_client import Bank, BankClient, errors

log = logging.getLogger(__name__)


class RetrievalUnavailable(errors.Unavailable):
    """The bank stayed unreachable for longer than the configured patience."""


def open_bank(target: str, **client_options: Any) -> Bank:
    """A bank by address ("host:port", "dns:///...") or by index path (in-process).

    ``client_options`` go to ``BankClient`` (TLS certificates, token: see
    ``bankd_client.credentials.connection_options``); an in-process bank needs none.
    """
    if target.endswith(".faiss") or Path(target).exists():
        from bankd.search.local import LocalBank  # in-process: no server, no grpc round trip

        return LocalBank(target)
    return BankClient(target, **client_options)


@dataclass
class Retrieved:
    """Top-k of the image rows of one batch."""

    values: torch.Tensor  # (Bi, k, 32, 96) float16
    mask: torch.Tensor  # (Bi, k) bool, False where the bank had no hit
    ids: torch.Tensor  # (Bi, k) int64 entry ids
    seconds: float  # wall time of the search (for logs / benchmarks)


TOPK = "topk"
SHUFFLED = "shuffled"
MODES = (TOPK, SHUFFLED)


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"unknown retrieval mode {mode!r} (choose from {list(MODES)})")
    return mode


class Retriever:
    """Keys from features, searches in a background thread, waits out bank outages.

    ``mode="shuffled"`` is the control of the study's ``shuffled`` arm: each image gets
    ``k`` bank entries that are NOT its top-k, found by a search with a random unit key
    (drawn from ``seed`` in call order) that excludes the true top-k ids. The model sees
    values of the same kind and number, unrelated to its image.
    """

    def __init__(
        self,
        bank: Bank,
        key_function: KeyFunction,
        k: int,
        *,
        retry_for_s: float = 300.0,
        backoff_s: tuple[float, float] = (0.5, 10.0),
        owns_bank: bool = True,
        encoder: Any = None,
        mode: str = TOPK,
        seed: int = 0,
    ) -> None:
        if k < 1:
            raise ValueError(f"top-k must be >= 1, got {k}")
        if key_function.uses_text and encoder is None:
            raise ValueError(
                "the bank's keys have a text component: the retriever needs the dual "
                "encoder whose text tower encodes the instructions"
            )
        self.bank = bank
        self.owns_bank = owns_bank  # False: the caller's bank, left open by close()
        self.key_function = key_function.eval()
        # The builder's key path (text tower, tokenisation, precision) for text queries.
        self.embedder = Embedder(encoder, self.key_function) if key_function.uses_text else None
        self.k = k
        self.mode = check_mode(mode)
        self.retry_for_s = retry_for_s
        self.backoff_s = backoff_s
        self._rng = np.random.default_rng(seed)
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="tinyalign-retrieval")

    @classmethod
    def from_bank(
        cls,
        bank: Bank,
        vision: Any,
        k: int,
        *,
        feature_layer: int = -2,
        allow_encoder_mismatch: bool = False,
        retry_for_s: float = 300.0,
        owns_bank: bool = True,
        value_shape: tuple[int, int] | None = None,
        mode: str = TOPK,
        seed: int = 0,
    ) -> Retriever:
        """Check the encoders against the bank and take the bank's key function.

        ``vision`` is the VLM's frozen dual encoder; ``value_shape``: what the model's
        RAG connector takes (checked against the bank's values when given)."""
        info = bank.info()
        fp = vision.vision_fingerprint()
        try:
            bank.check_encoder(fp, allow_mismatch=allow_encoder_mismatch)
        except errors.EncoderMismatch as e:
            raise errors.EncoderMismatch(
                f"{e} (pass --allow-encoder-mismatch to train anyway)"
            ) from None
        if info.key_function is None:
            raise errors.FailedPrecondition("the bank publishes no key function")
        kf = KeyFunction.from_config_and_weights(
            info.key_function.config, info.key_function.weights
        )
        if kf.config.feature_layer != feature_layer:
            raise ValueError(
                f"the bank's keys use vision layer {kf.config.feature_layer}, "
                f"the VLM uses layer {feature_layer}"
            )
        if kf.dim != info.key_dim:
            raise ValueError(f"key function dim {kf.dim} != bank key dim {info.key_dim}")
        if value_shape is not None and tuple(info.value_shape)[-2:] != tuple(value_shape):
            raise ValueError(
                f"the bank's values are {tuple(info.value_shape)[-2:]}, the model's RAG "
                f"connector takes {tuple(value_shape)}"
            )
        if kf.uses_text:
            _check_text_tower(vision, kf, info.text_encoder, allow_encoder_mismatch)
        log.info(
            "retrieval: %d entries, key dim %d, top-%d, encoder %s, key features in %s%s",
            info.entries,
            info.key_dim,
            k,
            fp.short(),
            kf.config.feature_precision,
            f", text weight {kf.config.text_weight:g}" if kf.uses_text else "",
        )
        return cls(
            bank,
            kf.to(vision.device),
            k,
            retry_for_s=retry_for_s,
            owns_bank=owns_bank,
            encoder=vision if kf.uses_text else None,
            mode=mode,
            seed=seed,
        )

    @property
    def feature_precision(self) -> str:
        """The precision the vision tower must run in for these keys (the bank's)."""
        return self.key_function.config.feature_precision

    @property
    def uses_text(self) -> bool:
        return self.key_function.uses_text

    def keys(self, features: torch.Tensor, texts: list[str] | None = None) -> torch.Tensor:
        """Query keys (Bi, d) float32 from patch features (Bi, P, D) [+ Bi instructions]."""
        if self.embedder is None:
            return self.key_function(features)
        if texts is None or len(texts) != features.shape[0]:
            got = "none" if texts is None else len(texts)
            raise ValueError(
                f"the bank's keys have a text component: pass one instruction per image "
                f"row ({features.shape[0]}), got {got}"
            )
        ids, mask = self.embedder.tokenize_questions(list(texts))
        return self.embedder.keys_from_features(features, ids, mask)

    def submit(
        self, features: torch.Tensor, sample_ids: torch.Tensor, texts: list[str] | None = None
    ) -> Future:
        """Start the search for image rows; returns a Future of ``Retrieved``.

        ``texts``: each row's instruction (never its answer); used only by text-keyed banks.
        """
        keys = self.keys(features, texts).detach().cpu().numpy()
        exclude = [[int(i)] for i in sample_ids.tolist()]
        random_keys = None
        if self.mode == SHUFFLED:  # drawn here, in call order, so runs are reproducible
            random_keys = self._rng.standard_normal(keys.shape).astype(np.float32)
            random_keys /= np.linalg.norm(random_keys, axis=1, keepdims=True)
        return self._pool.submit(self._retrieve, keys, exclude, random_keys)

    def retrieve(
        self, features: torch.Tensor, sample_ids: torch.Tensor, texts: list[str] | None = None
    ) -> Retrieved:
        return self.submit(features, sample_ids, texts).result()

    def _retrieve(
        self, keys: np.ndarray, exclude: list[list[int]], random_keys: np.ndarray | None
    ) -> Retrieved:
        t0 = time.perf_counter()
        if random_keys is None:
            hits = self._search(keys, exclude, with_values=True)
        else:
            true_ids = np.asarray(self._search(keys, exclude, with_values=False).ids)
            avoid = [
                own + [int(i) for i in row if i >= 0]
                for own, row in zip(exclude, true_ids, strict=True)
            ]
            hits = self._search(random_keys, avoid, with_values=True)
        ids = np.asarray(hits.ids)
        return Retrieved(
            values=torch.from_numpy(np.array(hits.values, copy=True)),
            mask=torch.from_numpy(ids >= 0),
            ids=torch.from_numpy(np.array(ids, copy=True)),
            seconds=time.perf_counter() - t0,
        )

    def _search(self, keys: np.ndarray, exclude: list[list[int]], with_values: bool) -> Any:
        delay, give_up = self.backoff_s[0], time.monotonic() + self.retry_for_s
        while True:
            try:
                return self.bank.search(
                    keys, k=self.k, exclude_ids=exclude, with_values=with_values
                )
            # CANCELLED too: this client never cancels a search, but gRPC's shutdown
            # answers calls that reach a stopping server so (grpc/grpc#41785).
            except (errors.Unavailable, errors.DeadlineExceeded, errors.Cancelled) as e:
                if time.monotonic() + delay > give_up:
                    raise RetrievalUnavailable(
                        f"the memory bank has been unreachable for {self.retry_for_s:.0f} s "
                        f"(last error: {e}); training stops here — restart it from the last "
                        "checkpoint with --resume once the bank is back"
                    ) from None
                log.warning("bank unavailable (%s); retrying in %.1f s", e, delay)
                time.sleep(delay)
                delay = min(delay * 2, self.backoff_s[1])

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self.owns_bank:
            self.bank.close()


def _check_text_tower(
    vision: Any, key_function: KeyFunction, expected: Any, allow_mismatch: bool
) -> None:
    """Refuse a text-keyed bank the VLM's dual encoder cannot query."""
    text_model = getattr(vision, "text_model", None)
    if text_model is None or getattr(vision, "tokenizer", None) is None:
        raise errors.FailedPrecondition(
            "the bank's keys have a text component (text weight "
            f"{key_function.config.text_weight:g}) but the VLM's vision tower "
            f"{getattr(vision, 'model_id', '?')!r} has no text tower to encode instructions"
        )
    if expected is None:
        raise errors.FailedPrecondition(
            "the bank's keys have a text component but the bank records no text encoder"
        )
    if not allow_mismatch and not vision.text_fingerprint().matches(expected):
        raise errors.EncoderMismatch(
            f"the bank's text keys come from text encoder {expected.short()}, the VLM's "
            f"dual encoder has {vision.text_fingerprint().short()} (pass "
            "--allow-encoder-mismatch to train anyway)"
        )
