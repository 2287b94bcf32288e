"""lmms-eval: the local task made from an eval set (always), and ``--model tinyalign`` run
through the harness offline on it (only where the ``lmms`` extra is installed)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from tinyalign.evaluate import EvalConfig, read_answers, run_eval
from tinyalign.lmms_task import (
    aggregate_yesno_f1,
    aggregate_yesno_yes_ratio,
    doc_to_target,
    doc_to_visual,
    process_results,
    write_task,
)


def test_local_task_docs_and_scoring(demo: Any, eval_set: tuple[Path, Path], tmp_path: Path):
    yaml = write_task(*eval_set, demo.images, tmp_path / "tasks", name="demo_eval")
    assert yaml.name == "demo_eval.yaml" and "dataset_path: json" in yaml.read_text()
    docs = [json.loads(x) for x in (tmp_path / "tasks" / "demo_eval.jsonl").open()]
    assert [d["scorer"] for d in docs] == ["short", "yesno", "choice", "short", "yesno"] + [
        "short"
    ] * 2
    assert Path(docs[0]["image"]).is_absolute() and docs[5]["image"] is None
    assert len(doc_to_visual(docs[0])) == 1 and doc_to_visual(docs[5]) == []
    assert doc_to_target(docs[3]) == json.loads(docs[3]["answer_json"])[0]
    choice = process_results(docs[2], ["The answer is B."])
    assert choice == {"accuracy": 1.0, "yesno_f1": None, "yesno_yes_ratio": None}
    gold1 = json.loads(docs[1]["answer_json"])
    yes = process_results(docs[1], ["Yes, it is."])
    assert yes["accuracy"] == float(gold1 == "yes")
    items = [yes["yesno_f1"], choice["yesno_f1"], ("no", "no")]
    assert aggregate_yesno_yes_ratio(items) == 0.5
    assert aggregate_yesno_f1(items) == (1.0 if gold1 == "yes" else 0.0)
    with pytest.raises(ValueError, match="task name"):
        write_task(*eval_set, demo.images, tmp_path / "tasks", name="bad name")


def test_lmms_eval_runs_tinyalign_on_the_local_task_offline(
    demo: Any, stage1: Path, eval_set: tuple[Path, Path], tmp_path: Path, monkeypatch: Any
) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")  # before `datasets` reads them
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    pytest.importorskip("lmms_eval", reason="the lmms extra is not installed")
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    write_task(*eval_set, demo.images, tmp_path / "tasks", name="demo_eval", max_new_tokens=5)
    results = simple_evaluate(
        model="tinyalign",
        model_args=f"pretrained={stage1},bank={demo.bank},device=cpu",
        tasks=["demo_eval"],
        batch_size=3,
        task_manager=TaskManager(include_path=str(tmp_path / "tasks")),
        log_samples=True,
    )
    metrics = results["results"]["demo_eval"]
    for name in ("accuracy,none", "yesno_f1,none", "yesno_yes_ratio,none"):
        assert 0.0 <= metrics[name] <= 1.0, name
    # the harness got the answers `tinyalign eval` writes with the same decoding
    answers = tmp_path / "answers.jsonl"
    run_eval(
        EvalConfig(
            model=str(stage1),
            questions=str(eval_set[0]),
            image_folder=str(demo.images),
            answers_file=str(answers),
            bank=str(demo.bank),
            max_new_tokens=5,
            device="cpu",
        ),
        progress=False,
    )
    ours = {row["question_id"]: row["text"] for row in read_answers(answers)}
    samples = results["samples"]["demo_eval"]
    theirs = {s["doc"]["question_id"]: s["filtered_resps"][0] for s in samples}
    assert theirs == ours


def test_lmms_loglikelihood_matches_the_training_loss(demo: Any, stage1: Path) -> None:
    pytest.importorskip("lmms_eval", reason="the lmms extra is not installed")
    import torch
    from lmms_eval.api.instance import Instance

    from tinyalign.conversation import IGNORE_INDEX, tokenize_conversation
    from tinyalign.inference import image_inputs
    from tinyalign.lmms import TinyAlignLMM

    def request(kind: str, args: tuple, doc: int) -> Instance:
        meta = {"task": "t", "doc_id": doc, "repeats": 1}
        return Instance(kind, (*args, doc_to_visual, doc, "t", "test"), 0, meta)

    lm = TinyAlignLMM(pretrained=str(stage1), bank=str(demo.bank), device="cpu")
    image = str(demo.images / "images" / "00001.png")
    lm.task_dict = {"t": {"test": [{"image": image}]}}
    prompt, answer = "What is in the image?", "A small red circle."
    (short, _), (longer, longer_greedy) = lm.loglikelihood(
        [request("loglikelihood", (prompt, answer), 0)]
        + [request("loglikelihood", (prompt, answer + " zebra zebra"), 0)]
    )
    assert longer < short < 0 and not longer_greedy  # more tokens only lower the sum
    # the same sum from the model's own loss (HF's shifted cross-entropy, mean per token)
    vlm = lm.vlm
    turns = [{"from": "human", "value": prompt}, {"from": "gpt", "value": answer}]
    sample = tokenize_conversation(turns, vlm.tokenizer, vlm.template, 512, has_image=True)
    labels = [*sample.labels[:-1], IGNORE_INDEX]
    with Image.open(image) as im:
        features, retrieved, mask = image_inputs(
            vlm, [im.convert("RGB")], lm.retriever, None, lm.device, "fp32"
        )
    ids = torch.tensor([sample.input_ids])
    with torch.no_grad():
        loss = vlm.model(
            ids,
            torch.ones_like(ids),
            torch.tensor([labels]),
            features,
            torch.tensor([0]),
            retrieved,
            mask,
        ).loss
    n = sum(label != IGNORE_INDEX for label in labels)
    assert short == pytest.approx(-float(loss) * n, rel=1e-4)
