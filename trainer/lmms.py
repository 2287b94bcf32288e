"""An lmms-eval model adapter: ``--model tinyalign`` runs a TinyAlign model with its bank.

    pip install -e ".[lmms]"                       # lmms-eval, an optional extra
    lmms-eval --model tinyalign \\
        --model_args pretrained=runs/stage2,bank=localhost:50051,top_k=5 \\
        --tasks pope,gqa,mme --batch_size 8
    lmms-eval --model tinyalign --model_args pretrained=runs/baseline ...   # no retrieval

The model is registered through the ``lmms_eval.models`` entry point (pyproject.toml),
so installing this package is all lmms-eval needs. ``model_args``: ``pretrained`` (a
pretrain/finetune ``--out`` directory), ``bank`` (HOST:PORT or a bank.faiss path;
required for a model with retrieval), ``top_k`` (default: the model's), ``device``,
``precision``, ``batch_size``, ``allow_encoder_mismatch``, ``bank_patience``. The bank is
opened once, as ``tinyalign generate`` opens it, so retrieval settings saved with the
model apply. One image per question (TinyAlign's VLM reads one); text-only questions
are fine.

``generate_until`` answers in batches of requests with the same generation settings
(greedy unless the task asks otherwise) and cuts each answer at the task's stop
strings. ``loglikelihood`` scores a continuation after the question laid out with the
model's chat template (the continuation in the answer's place, without the eos), with
the same visual and retrieved tokens as generation.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import torch
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from tqdm import tqdm

from bankd.models.encoders import resolve_device

from .conversation import IGNORE_INDEX, tokenize_conversation
from .inference import generate, image_inputs, load_vlm, open_retriever
from .pipeline import autocast, resolve_precision

log = logging.getLogger(__name__)

# generation settings of lmms-eval tasks that mean "greedy" or that HF generate reads
_GEN_KEYS = ("do_sample", "num_beams", "top_p", "temperature", "repetition_penalty")


def manifest() -> Any:
    """The ``lmms_eval.models`` entry point: ``--model tinyalign``."""
    # Imported here: lmms_eval.models loads the entry points while it initialises, so
    # importing it at the top would make importing this module first a circle.
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="tinyalign", simple_class_path="tinyalign.lmms.TinyAlignLMM")


def _flag(value: Any) -> bool:
    return value if isinstance(value, bool) else str(value).strip().lower() in ("1", "true")


class TinyAlignLMM(lmms):
    """A TinyAlign model directory (and its bank) behind lmms-eval's model interface."""

    is_simple = True

    def __init__(
        self,
        pretrained: str,
        bank: str | None = None,
        top_k: int | str | None = None,
        device: str = "auto",
        precision: str = "auto",
        batch_size: int | str = 8,
        allow_encoder_mismatch: bool | str = False,
        bank_patience: float | str = 30.0,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        if kwargs:
            log.warning("tinyalign: ignoring model_args %s", sorted(kwargs))
        self.vlm = load_vlm(pretrained, resolve_device(device), progress=False)
        self.device = next(self.vlm.model.connector.parameters()).device
        self.precision = resolve_precision(precision, self.device)
        self.batch_size = int(batch_size)
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.retriever, self._owned = open_retriever(
            self.vlm,
            bank,
            int(top_k) if top_k not in (None, "", "None") else None,
            allow_encoder_mismatch=_flag(allow_encoder_mismatch),
            bank_patience=float(bank_patience),
        )

    # -- requests ----------------------------------------------------------------------

    def _doc_image(self, doc_to_visual: Any, doc_id: int, task: str, split: str) -> Any:
        visuals = doc_to_visual(self.task_dict[task][split][doc_id])
        visuals = visuals if isinstance(visuals, list) else [visuals]
        visuals = [v for v in visuals if v is not None]
        if len(visuals) > 1:
            raise ValueError(f"{task} doc {doc_id}: {len(visuals)} images; tinyalign reads one")
        return visuals[0].convert("RGB") if visuals else None

    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Greedy (or the task's) answers, cut at the task's stop strings."""
        answers: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        bar = tqdm(total=len(requests), desc="tinyalign", disable=self.rank != 0)
        for key, members in groups.items():
            gen = dict(json.loads(key))
            until = gen.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(gen.pop("max_new_tokens", 128))
            kwargs = {k: gen[k] for k in _GEN_KEYS if k in gen}
            if not kwargs.get("do_sample") or float(kwargs.get("temperature") or 0) == 0:
                kwargs = {"do_sample": False, "num_beams": int(kwargs.get("num_beams", 1))}
            for start in range(0, len(members), self.batch_size):
                idx = members[start : start + self.batch_size]
                args = [requests[i].args for i in idx]
                images = [self._doc_image(a[2], a[3], a[4], a[5]) for a in args]
                texts = generate(
                    self.vlm,
                    images,
                    [a[0] for a in args],
                    bank=self.retriever,
                    max_new_tokens=max_new,
                    precision=self.precision,
                    batch_size=len(idx),
                    **kwargs,
                )
                for i, text in zip(idx, texts, strict=True):
                    for stop in until:
                        if stop:
                            text = text.split(stop)[0]
                    answers[i] = text
                bar.update(len(idx))
        bar.close()
        return [a if a is not None else "" for a in answers]

    @torch.no_grad()
    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """(sum of log p(continuation tokens), whether greedy decoding gives them)."""
        model, tok = self.vlm.model, self.vlm.tokenizer
        out: list[tuple[float, bool]] = []
        for req in tqdm(requests, desc="tinyalign loglikelihood", disable=self.rank != 0):
            context, target, doc_to_visual, doc_id, task, split = req.args
            doc = self.task_dict[task][split][doc_id]
            continuation = target if isinstance(target, str) else target(doc)
            image = self._doc_image(doc_to_visual, doc_id, task, split)
            turns = [{"from": "human", "value": context}, {"from": "gpt", "value": continuation}]
            sample = tokenize_conversation(
                turns, tok, self.vlm.template, 1 << 30, has_image=image is not None
            )
            labels = list(sample.labels[:-1]) + [IGNORE_INDEX]  # the eos is not the continuation
            features, retrieved, mask = image_inputs(
                self.vlm,
                [image] if image else [],
                self.retriever,
                None,
                self.device,
                self.precision,
                [context] if image else None,
            )
            ids = torch.tensor([sample.input_ids], device=self.device)
            with autocast(self.precision, self.device):
                embeds, attn, labs = model.assemble(
                    ids,
                    torch.ones_like(ids),
                    torch.tensor([labels], device=self.device),
                    features,
                    torch.tensor([0] if image else [], dtype=torch.long, device=self.device),
                    retrieved,
                    mask,
                )
                logits = model.llm(inputs_embeds=embeds, attention_mask=attn.long()).logits
            logp = torch.log_softmax(logits[0, :-1].float(), dim=-1)  # predicts positions 1..
            target_ids = labs[0, 1:]
            keep = target_ids != IGNORE_INDEX
            picked = logp[keep].gather(1, target_ids[keep].unsqueeze(1)).squeeze(1)
            greedy = bool((logp[keep].argmax(-1) == target_ids[keep]).all())
            out.append((float(picked.sum()), greedy))
        return out

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError("tinyalign answers single-round requests")

    def __del__(self) -> None:
        if getattr(self, "_owned", False) and self.retriever is not None:
            self.retriever.close()
