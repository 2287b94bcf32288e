"""Answers from a trained TinyAlign VLM, with retrieval at prefill.

CPU::

    tinyalign generate --model runs/stage2 --bank localhost:50051 \\
        --image data/shapes/images/00001.png --prompt "What is in the image?"

Python, batched::

    from tinyalign.inference import generate, load_vlm
    vlm = load_vlm("runs/stage2", "cpu")               # (model, tokenizer, template)
    generate(vlm, ["a.png", "b.png"], ["What is it?", "Which colour?"], bank="localhost:50051")

Each prompt is laid out with the model's chat template exactly as in training
(``build_prompt``), the image's frozen features are computed once, its top-k values are
retrieved (no exclusion unless ``exclude_ids`` are given) and decoding is greedy unless
other ``generate`` keyword arguments say otherwise. A model without retrieval (the
baseline) needs no bank.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from bankd.models.encoders import preprocess_images, resolve_device
from bankd_client import Bank

from .components import LoadedVLM, load_vlm
from .config import open_checked_bank
from .conversation import IMAGE_TOKEN, build_prompt
from .pipeline import autocast, resolve_precision
from .retrieval import Retriever

log = logging.getLogger(__name__)

__all__ = ["generate", "image_inputs", "load_vlm", "open_retriever", "LoadedVLM"]

NO_EXCLUSION = -1  # no bank entry has a negative id, so excluding it excludes nothing


def _image(item: Image.Image | str | Path | None) -> Image.Image | None:
    if item is None or isinstance(item, Image.Image):
        return item
    path = Path(item)
    if not path.is_file():
        raise FileNotFoundError(f"image {path} not found")
    with Image.open(path) as im:
        return im.convert("RGB")


def _retriever(
    bank: str | Path | Bank | Retriever,
    vlm: LoadedVLM,
    top_k: int | None,
    allow_mismatch: bool,
    patience: float,
    bank_options: dict[str, Any] | None = None,
):
    """(retriever, owned): a Retriever for ``bank`` (target string, open bank or Retriever)."""
    if isinstance(bank, Retriever):
        return bank, False
    opened = isinstance(bank, (str, Path))
    if opened:
        handle = open_checked_bank(str(bank), patience, **(bank_options or {}))
    elif isinstance(bank, Bank):
        handle = bank  # the caller's: left open
    else:
        raise TypeError(
            f"bank must be an address, a .faiss path, a bank (bankd_client.Bank) or a "
            f"Retriever, got {type(bank).__name__}"
        )
    try:
        retriever = Retriever.from_bank(
            handle,
            vlm.model.vision,
            top_k or vlm.model.config.top_k,
            feature_layer=vlm.model.config.feature_layer,
            allow_encoder_mismatch=allow_mismatch,
            retry_for_s=patience,
            owns_bank=opened,
            value_shape=vlm.model.config.value_shape,
            mode=vlm.model.config.retrieval_mode,  # the shuffled control answers shuffled
        )
    except Exception:
        if opened:
            handle.close()
        raise
    return retriever, True


def open_retriever(
    vlm: LoadedVLM,
    bank: Any,
    top_k: int | None = None,
    *,
    allow_encoder_mismatch: bool = False,
    bank_patience: float = 30.0,
    bank_options: dict[str, Any] | None = None,
) -> tuple[Retriever | None, bool]:
    """(retriever, owned): the retriever ``generate`` would open for ``vlm`` and ``bank``.

    Open it once and pass it as ``bank=`` to many ``generate`` calls (``tinyalign eval``);
    close it when ``owned``. None for a model without retrieval.
    """
    if not vlm.model.config.retrieval:
        return None, False
    if bank is None:
        raise ValueError("this model was trained with retrieval: pass a bank (--bank)")
    return _retriever(bank, vlm, top_k, allow_encoder_mismatch, bank_patience, bank_options)


@torch.no_grad()
def generate(
    model: str | Path | LoadedVLM | tuple,
    images: list[Image.Image | str | Path | None],
    prompts: list[str],
    bank: str | Path | Bank | Retriever | None = None,
    max_new_tokens: int = 64,
    top_k: int | None = None,
    *,
    device: str = "auto",
    precision: str = "auto",
    batch_size: int = 8,
    exclude_ids: list[int] | None = None,
    allow_encoder_mismatch: bool = False,
    bank_patience: float = 30.0,
    bank_options: dict[str, Any] | None = None,
    **generate_kwargs: Any,
) -> list[str]:
    """One answer per (image, prompt); ``None`` as an image gives a text-only prompt.

    ``model``: a model directory or what ``load_vlm`` returned. ``bank``: "host:port", a
    ``.faiss`` path, an open bank (``bankd_client.Bank``: BankClient, ShardedBankClient,
    LocalBank), or a ``Retriever``; required
    when the model uses retrieval. ``top_k`` defaults to the model's. ``exclude_ids``:
    one bank entry id per image to leave out of its search (e.g. evaluating on bank data).
    ``bank_options``: ``BankClient`` keywords (TLS, token) when ``bank`` is an address.
    """
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    if exclude_ids is not None and len(exclude_ids) != len(images):
        raise ValueError(f"{len(exclude_ids)} exclude_ids for {len(images)} images")
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError("batch_size and max_new_tokens must be >= 1")
    if isinstance(model, (str, Path)):
        vlm = load_vlm(model, resolve_device(device), progress=False)
    else:
        vlm = LoadedVLM(*model)
    dev = next(vlm.model.connector.parameters()).device
    precision = resolve_precision(precision, dev)
    retriever, owned = None, False
    if vlm.model.config.retrieval:
        if bank is None:
            raise ValueError("this model was trained with retrieval: pass a bank (--bank)")
        retriever, owned = _retriever(
            bank, vlm, top_k, allow_encoder_mismatch, bank_patience, bank_options
        )
    try:
        answers: list[str] = []
        for start in range(0, len(prompts), batch_size):
            end = start + batch_size
            excl = exclude_ids[start:end] if exclude_ids is not None else None
            answers += _generate_batch(
                vlm,
                images[start:end],
                prompts[start:end],
                retriever,
                excl,
                dev,
                precision,
                max_new_tokens,
                generate_kwargs,
            )
        return answers
    finally:
        if owned:
            retriever.close()


def query_of(prompt: str) -> str:
    """A prompt as a bank's text key reads it: without ``<image>``, as the builder does."""
    return prompt.replace(IMAGE_TOKEN, "").strip()


def image_inputs(
    vlm: LoadedVLM,
    images: list[Image.Image],
    retriever: Retriever | None,
    exclude_ids: list[int] | None,
    dev: torch.device,
    precision: str,
    prompts: list[str] | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(features (Bi, P, Dv), retrieved (Bi, k, 32, 96), mask (Bi, k)) of a batch's images.

    All None without images; the retrieved ones None without a retriever. ``prompts``:
    each image's question (never an answer), for a bank whose keys have a text part."""
    if not images:
        return None, None, None
    model = vlm.model
    pixels = preprocess_images(model.vision.image_processor, images)
    tower = retriever.feature_precision if retriever is not None else None  # the bank's
    with autocast(precision, dev):
        features = model.image_features(pixels.to(dev), precision=tower)  # (Bi, P, Dv)
    if retriever is None:
        return features, None, None
    own = [NO_EXCLUSION] * len(images) if exclude_ids is None else exclude_ids
    texts = None if prompts is None else [query_of(p) for p in prompts]
    got = retriever.submit(features, torch.tensor(own, dtype=torch.long), texts).result()
    return features, got.values.to(dev), got.mask.to(dev)


def _generate_batch(
    vlm: LoadedVLM,
    images: list[Any],
    prompts: list[str],
    retriever: Retriever | None,
    exclude_ids: list[int] | None,
    dev: torch.device,
    precision: str,
    max_new_tokens: int,
    generate_kwargs: dict[str, Any],
) -> list[str]:
    model, tok = vlm.model, vlm.tokenizer
    pil = [_image(im) for im in images]
    rows = [i for i, im in enumerate(pil) if im is not None]
    ids = [
        build_prompt(p, tok, vlm.template, has_image=im is not None)
        for p, im in zip(prompts, pil, strict=True)
    ]
    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), tok.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(ids), width), dtype=torch.long)
    for r, x in enumerate(ids):  # right-padded like training; the model re-pads on the left
        input_ids[r, : len(x)], attention_mask[r, : len(x)] = torch.tensor(x), 1
    excl = None if exclude_ids is None else [exclude_ids[r] for r in rows]
    features, retrieved, retrieved_mask = image_inputs(
        vlm, [pil[r] for r in rows], retriever, excl, dev, precision, [prompts[r] for r in rows]
    )
    kwargs = {"do_sample": False, "num_beams": 1, **generate_kwargs}
    with autocast(precision, dev):
        new = model.generate(
            input_ids.to(dev),
            attention_mask.to(dev),
            features=features,
            image_rows=torch.tensor(rows, dtype=torch.long, device=dev),
            retrieved=retrieved,
            retrieved_mask=retrieved_mask,
            max_new_tokens=max_new_tokens,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
            **kwargs,
        )
    return [text.strip() for text in tok.batch_decode(new, skip_special_tokens=True)]
