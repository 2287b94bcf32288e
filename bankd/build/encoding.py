"""The build's shared machinery: the frozen encoder, the key function (``Embedder``),
the value compressor at its seeded initialisation, and data loading, used by every
pass of ``bankd build`` (pass 1 and training in ``bankd.build.train``, pass 2 in
``bankd.build.pipeline``) and by bench/build_throughput.py.
"""

from __future__ import annotations

import numpy as np
import torch
from safetensors.torch import load as load_safetensors
from torch.utils.data import DataLoader
from tqdm import tqdm

from bankd.build.config import BuildConfig, resolve_workers
from bankd.build.data import ImageCaptionDataset, Sample, collate
from bankd.models.embedder import Embedder
from bankd.models.encoders import (
    autocast_context,
    default_feature_precision,
    load_encoder,
    resolve_device,
)
from bankd.models.keys import KeyConfig, KeyFunction
from bankd.models.perceiver import FeatureBatch, PerceiverSpec, ValueCompressor, compress


class BuildPipeline:
    """The frozen encoder, the embedder and data loading, shared by every pass."""

    def __init__(
        self,
        config: BuildConfig,
        samples: list[Sample],
        device: torch.device | None = None,
        progress: bool | None = None,
    ) -> None:
        self.config, self.samples = config, samples
        self.device = device or resolve_device(config.device)
        self.progress = config.progress if progress is None else progress
        self.encoder = load_encoder(config.encoder, seed=config.seed, device=self.device)
        key_config = KeyConfig(
            temperature=config.key_temperature,
            text_weight=config.text_weight,
            feature_precision=config.key_precision
            if config.key_precision != "auto"
            else default_feature_precision(self.device),
        )
        key_function = KeyFunction(self.encoder.vision_dim, key_config, self.encoder.text_dim)
        self.embedder = Embedder(self.encoder, key_function)
        self.text_tokens = min(config.max_text_tokens, self.encoder.max_text_tokens)

    def compressor(self, weights: bytes | None = None) -> ValueCompressor:
        """The value compressor for this encoder, at its seeded initialisation or with
        ``weights`` (safetensors bytes), on the device."""
        spec = PerceiverSpec(max_text_tokens=self.text_tokens)
        e = self.encoder
        compressor = ValueCompressor(
            spec, e.vision_dim, e.text_dim, e.num_patches, seed=self.config.seed
        )
        if weights is not None:
            compressor.load_state_dict(load_safetensors(weights))
            compressor.eval()
        return compressor.to(self.device)

    def load_trained(self, weights: dict[str, bytes]) -> ValueCompressor:
        """The training stage's results: the key function's center (set here) and the
        trained compressor, from {"keyfn": ..., "perceiver": ...} safetensors bytes."""
        self.embedder.key_function.load_state_dict(load_safetensors(weights["keyfn"]))
        return self.compressor(weights["perceiver"])

    def feature_bytes(self, n: int) -> int:
        e, t = self.encoder, self.text_tokens
        return 4 * n * (e.num_patches * e.vision_dim + t * e.text_dim + 2 * t)

    @torch.no_grad()
    def encode(self, batch: dict) -> tuple[torch.Tensor, FeatureBatch]:
        """A loader batch -> (keys (B, D), features for the compressor), on the device."""
        q_ids, q_mask = batch.get("prompt_ids"), batch.get("prompt_mask")
        pixels = batch["pixel_values"].to(self.device, non_blocking=True)
        keys, vision = self.embedder.keys_from_pixels(pixels, q_ids, q_mask)
        with autocast_context(self.device):
            text = self.encoder.text_features(batch["input_ids"], batch["attention_mask"])
        mask, ids = (batch[k].to(self.device) for k in ("attention_mask", "input_ids"))
        return keys, FeatureBatch(vision.float(), text.float(), mask, ids)

    def loader(self, rows: np.ndarray, seed: int | None = None, size: int = 0) -> DataLoader:
        """Batches of decoded, preprocessed pairs ``rows`` (DataLoader workers decode)."""
        c, uses_text = self.config, self.embedder.uses_text
        subset = [self.samples[i] for i in rows]
        data = ImageCaptionDataset(
            subset, c.image_folder, self.encoder, self.text_tokens, uses_text
        )
        gen = None if seed is None else torch.Generator().manual_seed(seed)
        workers = resolve_workers(c.workers, self.device.type)
        kw: dict = {"num_workers": workers, "collate_fn": collate, "generator": gen}
        if self.device.type == "cuda":
            # Page-locked batches copy to the GPU asynchronously (non_blocking in encode),
            # and a deeper queue keeps decoding ahead of the towers.
            kw["pin_memory"] = True
            if workers > 0:
                kw["prefetch_factor"] = 4
        return DataLoader(data, size or c.batch_size, shuffle=gen is not None, **kw)

    def batches(
        self, rows: np.ndarray, desc: str, seed: int | None = None, size: int = 0, done: int = 0
    ):
        """Yield (loader batch, keys, features) over ``rows``; in order unless shuffled.

        ``batch["index"]`` holds positions in ``rows``; ``done``: pairs the progress bar
        counts as done before these (a resumed pass).
        """
        bar = tqdm(
            total=done + len(rows),
            initial=done,
            desc=desc,
            unit="pair",
            disable=not self.progress,
        )
        for batch in self.loader(rows, seed, size):
            yield batch, *self.encode(batch)
            bar.update(len(batch["index"]))
        bar.close()

    def keys_and_values(self, compressor: ValueCompressor, rows: np.ndarray, done: int = 0):
        """Pass 2: yield (positions in ``rows``, keys (B, D) float32, values (B, 32, 96)
        float16), numpy, in order: vision tower, key function, text tower, compressor."""
        for batch, keys, feats in self.batches(rows, "pass 2 (keys, values)", done=done):
            values = compress(compressor, feats).half().cpu().numpy()
            yield batch["index"].numpy(), keys.float().cpu().numpy(), values

    def features(self, rows: np.ndarray, cache: tuple[np.ndarray, FeatureBatch] | None):
        """Features of ``rows`` on the CPU: from the pass-1 cache, else encoded again."""
        if cache is not None:
            cached_rows, feats = cache
            pos = torch.as_tensor(np.searchsorted(cached_rows, rows))
            return FeatureBatch(*(t[pos] for t in feats))
        parts = [f for _, _, f in self.batches(rows, "features")]
        return FeatureBatch(*(torch.cat(ts).cpu() for ts in zip(*parts, strict=True)))
