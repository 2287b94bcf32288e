"""Images (+ optional question text) -> search keys: the one key-computing path.

The bank builder computes every stored key through ``Embedder.keys_from_pixels`` and the
server's Embed rpc goes through ``Embedder.embed``, which only adds the shared image
preprocessing in front of it. So an image embedded at query time gets the key that the
builder stored for it (up to float noise from a different batch composition).

Question text (when the key function has a text component) is the human turn only,
never the caption: a query never contains its own answer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from .encoders import DualEncoder, load_encoder
from .keys import KeyFunction

if TYPE_CHECKING:
    from bankd_client.identity import EncoderFingerprint

# Question tokens fed to the text tower for a key's text component.
QUERY_TEXT_TOKENS = 64


class Embedder:
    """A frozen encoder plus the bank's key function."""

    def __init__(self, encoder: DualEncoder, key_function: KeyFunction) -> None:
        if key_function.dim != encoder.vision_dim:
            raise ValueError(
                f"key function expects {key_function.dim}-dim features, encoder "
                f"{encoder.model_id!r} gives {encoder.vision_dim}"
            )
        if key_function.config.feature_layer != encoder.feature_layer:
            raise ValueError(
                f"key function was fitted on layer {key_function.config.feature_layer}, "
                f"encoder gives layer {encoder.feature_layer}"
            )
        self.encoder = encoder
        self.key_function = key_function.to(encoder.device).eval()

    @classmethod
    def from_bank(
        cls,
        encoder_name: str,
        seed: int,
        key_config: dict,
        key_weights: bytes,
        expected_vision: EncoderFingerprint | None = None,
        device: str | torch.device = "cpu",
    ) -> Embedder:
        """Load ``encoder_name`` and the bank's key function; refuse a different encoder."""
        key_function = KeyFunction.from_config_and_weights(key_config, key_weights)
        encoder = load_encoder(
            encoder_name,
            seed=seed,
            device=device,
            feature_layer=key_function.config.feature_layer,
        )
        if expected_vision is not None and not encoder.vision_fingerprint().matches(
            expected_vision
        ):
            raise ValueError(
                f"vision encoder {encoder.vision_fingerprint().short()} does not match the "
                f"bank's {expected_vision.short()}"
            )
        return cls(encoder, key_function)

    @property
    def device(self) -> torch.device:
        return self.encoder.device

    @property
    def dim(self) -> int:
        return self.key_function.dim

    @property
    def uses_text(self) -> bool:
        return self.key_function.uses_text

    @property
    def feature_precision(self) -> str:
        """The precision the towers run in for keys (recorded in the key config)."""
        return self.key_function.config.feature_precision

    def tokenize_questions(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Question texts -> (ids, mask) (B, T) for the key's text component."""
        return self.encoder.tokenize(texts, QUERY_TEXT_TOKENS)

    @torch.no_grad()
    def keys_from_features(
        self,
        features: torch.Tensor,
        question_ids: torch.Tensor | None = None,
        question_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Patch features (B, P, D) [+ tokenized questions] -> keys (B, D) float32."""
        text_feats = None
        if self.uses_text:
            if question_ids is None or question_mask is None:
                raise ValueError("this bank's keys have a text component: pass question texts")
            text_feats = self.encoder.text_features(
                question_ids, question_mask, precision=self.feature_precision
            )
            question_mask = question_mask.to(self.device)
        return self.key_function(features, text_feats, question_mask)

    @torch.no_grad()
    def keys_from_pixels(
        self,
        pixel_values: torch.Tensor,
        question_ids: torch.Tensor | None = None,
        question_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Pixels (B, 3, H, W) -> (keys (B, D) float32, patch features (B, P, D)).

        The features come back so the builder can feed the same pass to the compressor.
        """
        features = self.encoder.image_features(
            pixel_values.to(self.device), precision=self.feature_precision
        )
        return self.keys_from_features(features, question_ids, question_mask), features

    def embed(self, images: list[Image.Image], texts: list[str] | None = None) -> np.ndarray:
        """PIL images [+ question texts] -> keys (B, D) float32 numpy.

        ``texts`` are ignored when the key function has no text component.
        """
        if not images:
            raise ValueError("embed needs at least one image")
        if texts is not None and len(texts) != len(images):
            raise ValueError(f"{len(texts)} texts for {len(images)} images")
        if self.uses_text and texts is None:
            raise ValueError("this bank's keys have a text component: pass question texts")
        ids = mask = None
        if self.uses_text:
            ids, mask = self.tokenize_questions(texts)
        keys, _ = self.keys_from_pixels(self.encoder.preprocess(images), ids, mask)
        return keys.float().cpu().numpy()
