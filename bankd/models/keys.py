"""The key function: frozen patch features -> one L2-normalised search key per image.

Keys are computed from the frozen vision tower the VLM also uses, so
the bank builder and the trainer compute them from the same features with this same
code and these same weights, and query keys never drift while the VLM trains.

Attention pooling ("attnpool-v1"), parameter-free. For patch features p_1..p_P (D dims):

    q      = mean_i p_i                                   # (B, D) the image's own summary
    w_i    = softmax_i(<p_i, q> / (sqrt(D) * temperature))
    pooled = sum_i w_i p_i                                # (B, D)
    key    = normalize(pooled - center)

``center`` is the mean pooled feature over the bank (``fit_center``). Every encoder,
random or trained, puts a large component common to all images into its features;
subtracting it spreads the cosine similarities out so the nearest neighbours are
decided by what differs between images.

Optional text component (``text_weight`` = lambda > 0, only when the text width equals
the vision width): t = normalize(masked mean of token features - text_center) and
key = normalize((1 - lambda) * normalize(pooled - center) + lambda * t).
A query never contains its own answer: callers pass only the question / instruction
text (the human turn), never the caption or answer, both when building and at query time.

``KeyConfig.feature_layer`` records which hidden state the features must come from
(the second-to-last by default); the caller selects that layer.

``KeyConfig.feature_precision`` records the precision the frozen towers computed the
bank's key features in (fp32, or bf16 on a GPU build). Pooling and centering always run
in fp32; the towers' precision is what differs between a bf16 and an fp32 forward, so
every query side (trainer, eval, generate, the Embed rpc) runs its towers in the
recorded precision, whatever precision it trains in. Query keys then equal the stored
keys up to the kernels' float noise. A config written before this field existed reads
as fp32.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

KEY_FUNCTION_NAME = "attnpool-v1"


@dataclass(frozen=True)
class KeyConfig:
    feature_layer: int = -2
    temperature: float = 1.0
    text_weight: float = 0.0
    feature_precision: str = "fp32"  # what the towers computed key features in

    def __post_init__(self) -> None:
        if self.feature_precision not in ("fp32", "bf16", "fp16"):
            raise ValueError(
                f"feature_precision must be fp32, bf16 or fp16, got {self.feature_precision!r}"
            )
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0.0 <= self.text_weight <= 1.0:
            raise ValueError(f"text_weight must be in [0, 1], got {self.text_weight}")


def masked_mean(features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of (B, T, D) features over the positions where mask (B, T) is 1."""
    m = mask.to(features.dtype).unsqueeze(-1)  # (B, T, 1)
    return (features * m).sum(1) / m.sum(1).clamp_min(1.0)


class KeyFunction(nn.Module):
    """Parameter-free attention pooling minus a fitted center, L2-normalised (float32)."""

    def __init__(self, dim: int, config: KeyConfig | None = None, text_dim: int | None = None):
        super().__init__()
        self.config = config or KeyConfig()
        self.dim = dim
        if self.config.text_weight > 0 and text_dim != dim:
            raise ValueError(
                f"text_weight {self.config.text_weight} needs text features of the vision "
                f"width {dim}, got text width {text_dim}"
            )
        self.register_buffer("center", torch.zeros(dim))
        self.register_buffer("text_center", torch.zeros(dim))

    @property
    def uses_text(self) -> bool:
        return self.config.text_weight > 0

    def pool(self, features: torch.Tensor) -> torch.Tensor:
        """Attention-pool patch features (B, P, D) -> (B, D) float32, before centering."""
        if features.dim() != 3 or features.shape[-1] != self.dim:
            raise ValueError(f"expected features (B, P, {self.dim}), got {tuple(features.shape)}")
        p = features.float()
        q = p.mean(1, keepdim=True)  # (B, 1, D)
        scores = (p * q).sum(-1) / (math.sqrt(self.dim) * self.config.temperature)  # (B, P)
        w = scores.softmax(-1)
        return (w.unsqueeze(-1) * p).sum(1)  # (B, D)

    def pool_text(self, text_features: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """Masked mean of question-token features (B, T, D) -> (B, D) float32."""
        return masked_mean(text_features.float(), text_mask)

    @torch.no_grad()
    def fit_center(
        self,
        pooled_batches: Iterable[torch.Tensor],
        text_pooled_batches: Iterable[torch.Tensor] | None = None,
    ) -> None:
        """Set ``center`` (and ``text_center``) to the mean of pooled (B, D) batches."""
        for name, batches in (("center", pooled_batches), ("text_center", text_pooled_batches)):
            if batches is None:
                continue
            total = torch.zeros(self.dim, dtype=torch.float64)
            count = 0
            for b in batches:
                total += b.detach().to("cpu", torch.float64).sum(0)
                count += b.shape[0]
            if count == 0:
                raise ValueError(f"fit_center got no pooled features for {name}")
            getattr(self, name).copy_((total / count).to(torch.float32))

    def keys_from_pooled(
        self, pooled: torch.Tensor, text_pooled: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Pooled (B, D) [+ pooled question text (B, D)] -> keys (B, D) float32."""
        key = F.normalize(pooled.float() - self.center, dim=-1)
        if self.uses_text:
            if text_pooled is None:
                raise ValueError("this key function has a text component: pass the question text")
            lam = self.config.text_weight
            t = F.normalize(text_pooled.float() - self.text_center, dim=-1)
            key = F.normalize((1.0 - lam) * key + lam * t, dim=-1)
        return key

    @torch.no_grad()
    def forward(
        self,
        features: torch.Tensor,
        text_features: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Patch features (B, P, D) [+ question features (B, T, D), mask (B, T)] -> (B, D)."""
        with torch.autocast(features.device.type, enabled=False):
            text_pooled = None
            if self.uses_text and text_features is not None:
                if text_mask is None:
                    text_mask = torch.ones(text_features.shape[:2], device=text_features.device)
                text_pooled = self.pool_text(text_features, text_mask)
            return self.keys_from_pooled(self.pool(features), text_pooled)

    def to_config(self) -> dict:
        """JSON-able description; with ``weights_bytes`` it rebuilds this function exactly."""
        return {"name": KEY_FUNCTION_NAME, "dim": self.dim, **asdict(self.config)}

    def weights_bytes(self) -> bytes:
        state = {k: v.detach().to("cpu").contiguous() for k, v in self.state_dict().items()}
        return save_safetensors(state, metadata={"name": KEY_FUNCTION_NAME})

    @classmethod
    def from_config_and_weights(cls, config: dict, weights: bytes) -> KeyFunction:
        if config.get("name") != KEY_FUNCTION_NAME:
            raise ValueError(
                f"unknown key function {config.get('name')!r}, expected {KEY_FUNCTION_NAME!r}"
            )
        fields = {k: config[k] for k in ("feature_layer", "temperature", "text_weight")}
        fields["feature_precision"] = config.get("feature_precision", "fp32")
        dim = int(config["dim"])
        kf = cls(dim, KeyConfig(**fields), text_dim=dim)
        state = load_safetensors(weights)
        if set(state) != set(kf.state_dict()):
            raise ValueError(f"key function weights hold {sorted(state)}, expected center buffers")
        kf.load_state_dict(state)
        return kf
