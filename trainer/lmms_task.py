"""A local lmms-eval task made from a LLaVA-format eval set, so the harness runs offline.

    from tinyalign.lmms_task import write_task
    write_task("data/shapes/eval/questions.jsonl", "data/shapes/eval/answers_gt.jsonl",
               "data/shapes", "tasks", name="shapes_eval")
    lmms-eval --model tinyalign --model_args pretrained=runs/stage2,bank=localhost:50051 \\
        --tasks shapes_eval --include_path tasks --batch_size 8

``write_task`` writes ``<out>/<name>.jsonl`` (one doc per question: ``question_id``,
``text``, ``image`` as an absolute path or null, ``category``, ``scorer`` and the
reference as JSON in ``answer_json``, one type per column so the ``datasets`` JSON
builder reads it) and ``<out>/<name>.yaml``, which loads it with that builder (nothing
is downloaded) and scores each generated answer with ``tinyalign.scoring`` (the scorer
chosen per question as ``tinyalign eval`` chooses it). Metrics: ``accuracy`` (mean over
all questions) and POPE's ``yesno_f1`` and ``yesno_yes_ratio`` over the yes/no ones.
The functions below are what the YAML names; they need neither torch nor lmms-eval.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from PIL import Image

from .scoring import ScorerRules, pope_metrics, score_one, scorer_for

TASK_YAML = """\
# Written by tinyalign.lmms_task.write_task from {questions}
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_visual: !function tinyalign.lmms_task.doc_to_visual
doc_to_text: !function tinyalign.lmms_task.doc_to_text
doc_to_target: !function tinyalign.lmms_task.doc_to_target
generation_kwargs:
  max_new_tokens: {max_new_tokens}
  do_sample: false
  num_beams: 1
process_results: !function tinyalign.lmms_task.process_results
metric_list:
  - metric: accuracy
    aggregation: mean
    higher_is_better: true
  - metric: yesno_f1
    aggregation: !function tinyalign.lmms_task.aggregate_yesno_f1
    higher_is_better: true
  - metric: yesno_yes_ratio
    aggregation: !function tinyalign.lmms_task.aggregate_yesno_yes_ratio
    higher_is_better: false
metadata:
  version: 1.0
"""


def _read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def write_task(
    questions: str | Path,
    gold: str | Path,
    image_folder: str | Path,
    out: str | Path,
    *,
    name: str = "tinyalign_eval",
    max_new_tokens: int = 16,
    rules: ScorerRules | None = None,
) -> Path:
    """Write the task's data and YAML under ``out``; returns the YAML's path."""
    if not name.replace("_", "").isalnum():
        raise ValueError(f"task name must be letters, digits and '_', got {name!r}")
    rules = rules or ScorerRules()
    folder = Path(image_folder).resolve()
    refs = {g["question_id"]: g for g in _read_jsonl(gold)}
    docs = []
    for q in _read_jsonl(questions):
        g = refs.get(q["question_id"])
        if g is None:
            raise ValueError(f"question {q['question_id']!r} has no gold answer in {gold}")
        category = g.get("category") or q.get("category") or ""
        explicit = g.get("scorer") or q.get("scorer")
        image = str(folder / q["image"]) if q.get("image") else None
        if image is not None and not Path(image).is_file():
            raise FileNotFoundError(f"image {image} of question {q['question_id']!r} not found")
        docs.append(
            {
                "question_id": str(q["question_id"]),
                "text": q["text"],
                "image": image,
                "category": category,
                "scorer": scorer_for(category, g["answer"], rules, explicit),
                "answer_json": json.dumps(g["answer"]),
            }
        )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data = (out / f"{name}.jsonl").resolve()
    data.write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
    yaml = out / f"{name}.yaml"
    yaml.write_text(
        TASK_YAML.format(
            name=name,
            data=json.dumps(str(data)),
            questions=questions,
            max_new_tokens=max_new_tokens,
        )
    )
    return yaml


def doc_to_visual(doc: dict[str, Any]) -> list[Image.Image]:
    if not doc.get("image"):
        return []
    with Image.open(doc["image"]) as im:
        return [im.convert("RGB")]


def doc_to_text(doc: dict[str, Any], lmms_eval_specific_kwargs: dict | None = None) -> str:
    kwargs = lmms_eval_specific_kwargs or {}
    return f"{kwargs.get('pre_prompt', '')}{doc['text']}{kwargs.get('post_prompt', '')}"


def doc_to_target(doc: dict[str, Any]) -> str:
    """The first reference (loglikelihood and few-shot use one string)."""
    answer = json.loads(doc["answer_json"])
    return str(answer[0] if isinstance(answer, list) else answer)


def process_results(doc: dict[str, Any], results: list[str]) -> dict[str, Any]:
    answer, reference = results[0], json.loads(doc["answer_json"])
    yesno = (answer, str(reference)) if doc["scorer"] == "yesno" else None
    return {
        "accuracy": score_one(doc["scorer"], answer, reference),
        "yesno_f1": yesno,
        "yesno_yes_ratio": yesno,
    }


def _pope(items: list[tuple[str, str] | None]) -> dict[str, float]:
    pairs = [x for x in items if x is not None]
    return pope_metrics([a for a, _ in pairs], [r for _, r in pairs])


def aggregate_yesno_f1(items: list[tuple[str, str] | None]) -> float:
    return _pope(items)["f1"]


def aggregate_yesno_yes_ratio(items: list[tuple[str, str] | None]) -> float:
    return _pope(items)["yes_ratio"]
