"""The frozen dual encoder (vision + text towers) that keys and values are computed from.

``load_encoder(name)`` accepts three kinds of name:

* ``"tiny"``: a small SigLIP built in code from a config, seeded, with a byte-level
  tokenizer and a 64 px image processor. Nothing is downloaded; the same seed gives the
  same weights (and fingerprint) on every machine.
* a local directory written by ``DualEncoder.save_pretrained`` (or any saved SigLIP/CLIP
  dual encoder: model + tokenizer + image processor);
* a Hugging Face hub id of a SigLIP or CLIP dual encoder (``google/siglip-base-patch16-224``);
* a vision-only checkpoint: a ``SiglipVisionModel`` or ``CLIPVisionModel`` saved with
  ``save_pretrained`` next to its image processor (what LLaVA-style VLMs ship as their
  vision tower). It serves as a VLM's vision tower and gives the same features and
  fingerprint as the dual encoder it was cut from, so it queries that encoder's banks;
  it has no text tower, so it cannot build a bank or query text-keyed keys
  (``has_text`` is False and the text properties say so).

Patch features are ``hidden_states[feature_layer]`` of the vision tower (the
second-to-last layer by default, as LLaVA-style VLMs use), without CLIP's class token.
Images are preprocessed with the PIL backend of the image processor everywhere, so the
bank builder and a trainer on another machine see the same pixels.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import transformers
from PIL import Image
from torch import nn

if TYPE_CHECKING:
    from bankd_client.identity import EncoderFingerprint

TINY_NAME = "tiny"
TINY_IMAGE_SIZE = 64
# The tiny tokenizer is byte-level (about one token per character), so captions need
# more positions than a subword tokenizer's 64.
TINY_TEXT_POSITIONS = 128
_SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")


_DUAL = (transformers.SiglipModel, transformers.CLIPModel)
_VISION_ONLY = (transformers.SiglipVisionModel, transformers.CLIPVisionModel)


@dataclass(frozen=True)
class EncoderConfig:
    """Which encoder, its construction seed (``tiny`` only) and the patch-feature layer."""

    name: str = TINY_NAME
    seed: int = 0
    feature_layer: int = -2


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` means CUDA when available, else CPU."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def autocast_context(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA (the frozen towers only); full precision on CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# The precisions a frozen tower may compute key features in (recorded in the key config).
FEATURE_PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def default_feature_precision(device: torch.device) -> str:
    """What a bank built on ``device`` computes its key features in: bf16 on CUDA, else fp32."""
    return "bf16" if device.type == "cuda" else "fp32"


@contextlib.contextmanager
def precision_context(device: torch.device, precision: str):
    """Run a tower in exactly ``precision``, whatever autocast the caller has open.

    The caller's autocast (a trainer's ``--precision``) is switched off first, so the
    features that keys come from are computed the same way by the builder and by every
    trainer, whatever precision those train in.
    """
    if precision not in FEATURE_PRECISIONS:
        raise ValueError(
            f"unknown feature precision {precision!r} (choose from {sorted(FEATURE_PRECISIONS)})"
        )
    with torch.autocast(device.type, enabled=False):
        if precision == "fp32":
            yield
        else:
            with torch.autocast(device.type, dtype=FEATURE_PRECISIONS[precision]):
                yield


def build_tiny_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """Byte-level tokenizer with no merges: every UTF-8 byte is a token, plus pad/eos/unk.

    Needs no training data; ``</s>`` is appended to every sequence.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(_SPECIAL_TOKENS)}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", vocab["</s>"])]
    )
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=TINY_TEXT_POSITIONS,
    )


def _pil_image_processor_class(kind: str) -> type:
    """The PIL-backend image processor class (transformers 5 names it ``...Pil``)."""
    name = {"siglip": "SiglipImageProcessor", "clip": "CLIPImageProcessor"}[kind]
    return getattr(transformers, name + "Pil", None) or getattr(transformers, name)


def build_tiny_image_processor():
    cls = _pil_image_processor_class("siglip")
    return cls(
        size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )


def preprocess_images(image_processor, images: list[Image.Image]) -> torch.Tensor:
    """PIL images -> pixel values (B, 3, H, W) float32; the one preprocessing path."""
    rgb = [im.convert("RGB") for im in images]
    return image_processor(images=rgb, return_tensors="pt")["pixel_values"].float()


def tokenize_texts(
    tokenizer, texts: list[str], max_length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Texts -> (input_ids, attention_mask), each (B, max_length) int64, padded and truncated."""
    enc = tokenizer(
        list(texts),
        padding="max_length",
        truncation=True,
        max_length=max_length,
        return_tensors="pt",
    )
    return enc["input_ids"].long(), enc["attention_mask"].long()


def tiny_siglip_config(vocab_size: int, pad_token_id: int, eos_token_id: int):
    """Config of the tiny SigLIP: 64 px images, 8 px patches (64 patches), width 128."""
    text = {
        "vocab_size": vocab_size,
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": TINY_TEXT_POSITIONS,
        "pad_token_id": pad_token_id,
        "bos_token_id": eos_token_id,
        "eos_token_id": eos_token_id,
    }
    vision = {
        "image_size": TINY_IMAGE_SIZE,
        "patch_size": 8,
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
    }
    return transformers.SiglipConfig(text_config=text, vision_config=vision)


class DualEncoder(nn.Module):
    """Frozen vision and text towers with their tokenizer and image processor.

    ``.vision_model`` is the vision tower the VLM also uses; its fingerprint goes into
    the bank.
    """

    def __init__(
        self, model: nn.Module, tokenizer, image_processor, model_id: str, feature_layer: int = -2
    ) -> None:
        super().__init__()
        if not isinstance(model, _DUAL + _VISION_ONLY):
            raise ValueError(
                f"{model_id!r} is a {type(model).__name__}, not a SigLIP or CLIP model or "
                "vision model"
            )
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.model_id = model_id
        self.feature_layer = feature_layer
        # CLIP prepends a class token to the patch sequence; LLaVA drops it ("patch" features).
        clip = (transformers.CLIPModel, transformers.CLIPVisionModel)
        self._skip_tokens = 1 if isinstance(model, clip) else 0
        self._fingerprints: dict[str, EncoderFingerprint] = {}

    def train(self, mode: bool = True) -> DualEncoder:
        return super().train(False)  # always frozen, always eval

    @property
    def vision_model(self) -> nn.Module:
        return self.model.vision_model if self.has_text else self.model

    @property
    def has_text(self) -> bool:
        """False for a vision-only checkpoint."""
        return isinstance(self.model, _DUAL)

    @property
    def text_model(self) -> nn.Module | None:
        return self.model.text_model if self.has_text else None

    @property
    def _vision_config(self):
        return self.model.config if not self.has_text else self.model.config.vision_config

    def _text_config(self):
        if not self.has_text:
            raise ValueError(
                f"{self.model_id!r} is a vision-only checkpoint: it has no text tower (a bank "
                "build and text-keyed queries need the dual encoder)"
            )
        return self.model.config.text_config

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def vision_dim(self) -> int:
        return self._vision_config.hidden_size

    @property
    def text_dim(self) -> int:
        return self._text_config().hidden_size

    @property
    def num_patches(self) -> int:
        vc = self._vision_config
        return (vc.image_size // vc.patch_size) ** 2

    @property
    def vocab_size(self) -> int:
        return self._text_config().vocab_size

    @property
    def max_text_tokens(self) -> int:
        return self._text_config().max_position_embeddings

    @property
    def pad_token_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return int(pad if pad is not None else self.tokenizer.eos_token_id)

    def preprocess(self, images: list[Image.Image]) -> torch.Tensor:
        """PIL images -> pixel values (B, 3, H, W) float32 on the CPU."""
        return preprocess_images(self.image_processor, images)

    def tokenize(self, texts: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Texts -> (input_ids, attention_mask), each (B, T) int64 with T = max_length."""
        return tokenize_texts(self.tokenizer, texts, min(max_length, self.max_text_tokens))

    @torch.no_grad()
    def image_features(
        self, pixel_values: torch.Tensor, precision: str | None = None
    ) -> torch.Tensor:
        """Patch features (B, P, Dv) from ``hidden_states[feature_layer]``.

        ``precision`` (fp32, bf16, fp16): computed in exactly that, ignoring the caller's
        autocast; None: under whatever autocast the caller has open."""
        ctx = (
            contextlib.nullcontext()
            if precision is None
            else precision_context(self.device, precision)
        )
        with ctx:
            out = self.vision_model(
                pixel_values=pixel_values.to(self.device), output_hidden_states=True
            )
        return out.hidden_states[self.feature_layer][:, self._skip_tokens :]

    @torch.no_grad()
    def text_features(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, precision: str | None = None
    ) -> torch.Tensor:
        """Token features (B, T, Dt): the text tower's last hidden state (``precision`` as
        in ``image_features``)."""
        self._text_config()  # a vision-only checkpoint says so
        ctx = (
            contextlib.nullcontext()
            if precision is None
            else precision_context(self.device, precision)
        )
        with ctx:
            out = self.text_model(
                input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device)
            )
        return out.last_hidden_state

    def vision_fingerprint(self) -> EncoderFingerprint:
        # Imported here: the bankd_client package pulls in grpc, which model code avoids.
        from bankd_client.identity import fingerprint_encoder

        if "vision" not in self._fingerprints:
            self._fingerprints["vision"] = fingerprint_encoder(self.vision_model, self.model_id)
        return self._fingerprints["vision"]

    def text_fingerprint(self) -> EncoderFingerprint:
        from bankd_client.identity import fingerprint_encoder

        self._text_config()
        if "text" not in self._fingerprints:
            self._fingerprints["text"] = fingerprint_encoder(self.text_model, self.model_id)
        return self._fingerprints["text"]

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write model, tokenizer and image processor so ``load_encoder(directory)`` works."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(directory)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(directory)
        self.image_processor.save_pretrained(directory)
        return directory


def _build_tiny(seed: int) -> DualEncoder:
    tokenizer = build_tiny_tokenizer()
    config = tiny_siglip_config(len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id)
    # Built on the CPU in float32 under a private RNG so the weights are the same everywhere
    # and the caller's RNG stream is untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.SiglipModel(config).float()
    return DualEncoder(model, tokenizer, build_tiny_image_processor(), TINY_NAME)


def _load_pretrained(name: str) -> DualEncoder:
    try:
        model = transformers.AutoModel.from_pretrained(name, dtype=torch.float32)
        # A vision-only checkpoint has no tokenizer; a dual encoder must have one.
        vision_only = isinstance(model, _VISION_ONLY)
        tokenizer = None if vision_only else transformers.AutoTokenizer.from_pretrained(name)
        clip = (transformers.CLIPModel, transformers.CLIPVisionModel)
        kind = "clip" if isinstance(model, clip) else "siglip"
        try:
            processor = transformers.AutoImageProcessor.from_pretrained(name, backend="pil")
        except TypeError:  # transformers < 5 has no backend argument
            processor = _pil_image_processor_class(kind).from_pretrained(name)
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"cannot load encoder {name!r}: {e}") from e
    return DualEncoder(model, tokenizer, processor, name)


def load_encoder(
    name: str, seed: int = 0, device: str | torch.device = "cpu", feature_layer: int = -2
) -> DualEncoder:
    """Load the frozen dual encoder ``name`` (``tiny``, a local directory or a hub id)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"encoder name must be a non-empty string, got {name!r}")
    if name == TINY_NAME:
        encoder = _build_tiny(seed)
    elif Path(name).is_dir():
        encoder = _load_pretrained(str(Path(name)))
    elif Path(name).exists() or name.count("/") > 1 or os.path.isabs(name):
        raise ValueError(f"encoder {name!r} is neither 'tiny', a model directory nor a hub id")
    else:
        encoder = _load_pretrained(name)
    encoder.feature_layer = feature_layer
    depth = encoder._vision_config.num_hidden_layers
    if not -(depth + 1) <= feature_layer <= depth:
        raise ValueError(f"feature_layer {feature_layer} is outside the {depth}-layer vision tower")
    return encoder.to(resolve_device(device))
