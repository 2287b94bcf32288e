"""Evaluation of one study run: eval answers with their scores, and the held-out loss.

``evaluate_answers`` writes a LLaVA answers file (question_id, prompt, text, answer_id,
model_id) and scores it with ``tinyalign.scoring`` (VQAv2 / POPE / ScienceQA rules by
category); ``heldout_loss`` is the token-weighted loss of the gold answers, with
retrieval as the model was trained (its saved top-k and retrieval mode).
"""

from __future__ import annotations

import json
import os
from functools import partial
from pathlib import Path

from .study_config import StudyConfig


def _write_json(path: Path, payload: object) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1) + "\n")
    os.replace(tmp, path)


def _jsonl(path: str | Path) -> list[dict]:
    return [json.loads(x) for x in Path(path).read_text().splitlines() if x.strip()]


def evaluate_answers(
    config: StudyConfig, model_dir: Path, bank: str | None, out: Path, progress: bool
) -> dict:
    """``tinyalign eval`` of one run: greedy answers (a LLaVA answers file) and scores.

    The bank is opened as ``tinyalign generate`` opens it, so the model's saved top-k and
    retrieval mode apply (the shuffled arm answers with shuffled retrieval)."""
    from .evaluate import EvalConfig, run_eval

    summary = run_eval(
        EvalConfig(
            model=str(model_dir),
            questions=config.questions,
            image_folder=config.image_folder,
            answers_file=str(out / "answers.jsonl"),
            bank=bank,
            no_retrieval=bank is None,
            gold=config.answers,
            batch_size=config.eval_batch_size,
            max_new_tokens=config.max_new_tokens,
            model_id="-".join(model_dir.parts[-4:-1]),  # arm-seedS-fracF
            device=config.device,
            precision=config.precision,
            allow_encoder_mismatch=True,  # the mismatched arm trained so; others match
        ),
        progress=progress,
    )
    return summary["scores"]


def eval_conversations(config: StudyConfig, path: Path) -> str:
    """The eval questions with their gold answers as one-turn LLaVA conversations (the
    held-out loss set); ids are the images' own, so no question retrieves its image."""
    gold = {g["question_id"]: g["answer"] for g in _jsonl(config.answers)}
    items = []
    for q in _jsonl(config.questions):
        answer = gold[q["question_id"]]
        answer = answer[0] if isinstance(answer, list) else answer
        items.append(
            {
                "id": Path(q["image"]).stem,
                "image": q["image"],
                "conversations": [
                    {"from": "human", "value": "<image>\n" + q["text"]},
                    {"from": "gpt", "value": str(answer)},
                ],
            }
        )
    _write_json(path, items)
    return str(path)


def heldout_loss(
    config: StudyConfig, model_dir: Path, bank: str | None, data: str, seed: int
) -> float:
    """Token-weighted loss of the gold answers to the eval questions."""
    from bankd.models.encoders import preprocess_images, resolve_device

    from .components import load_vlm
    from .config import open_checked_bank
    from .data import VLMDataset
    from .pipeline import evaluate, resolve_precision
    from .retrieval import Retriever

    device = resolve_device(config.device)
    model, tokenizer, template = load_vlm(model_dir, device, progress=False)
    dataset = VLMDataset(
        data,
        config.image_folder,
        tokenizer,
        template,
        partial(preprocess_images, model.vision.image_processor),
        max_length=config.max_length,
    )
    retriever = None
    if model.config.retrieval:
        retriever = Retriever.from_bank(
            open_checked_bank(bank, 30.0),
            model.vision,
            model.config.top_k,
            feature_layer=model.config.feature_layer,
            allow_encoder_mismatch=True,  # the mismatched arm trained so; others match
            mode=model.config.retrieval_mode,
            seed=seed,
        )
    try:
        return evaluate(
            model,
            dataset,
            retriever,
            batch_size=config.eval_batch_size,
            device=device,
            precision=resolve_precision(config.precision, device),
        )
    finally:
        if retriever is not None:
            retriever.close()
