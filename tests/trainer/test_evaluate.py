"""``tinyalign eval``: LLaVA's question and answers formats, batched greedy decoding equal
to one question at a time, resuming, retrieval in process and over gRPC, the summary."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tinyalign.cli import main
from tinyalign.evaluate import ANSWER_FIELDS, EvalConfig, read_answers, run_eval
from tinyalign.scoring import score_answers
from tinyalign.train import train


@pytest.fixture(scope="module")
def eval_set(demo: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(questions.jsonl, answers_gt.jsonl): 5 questions on held-out images, 2 text-only."""
    held = json.loads(demo.heldout.read_text())
    root = tmp_path_factory.mktemp("eval_set")
    kinds = [
        ("short", "What shape is it?", lambda a: a["shape"]),
        (
            "yesno",
            "Is the background white?",
            lambda a: "yes" if a["background"] == "white" else "no",
        ),
        ("choice", "Which colour? A. red B. cyan C. green", lambda a: "B"),
        ("short", "How many shapes?", lambda a: [str(a["count"])] * 3 + ["many"] * 7),
        ("yesno", "Is there a star?", lambda a: "yes" if a["shape"] == "star" else "no"),
    ]
    questions, gold = [], []
    for i, (category, text, answer) in enumerate(kinds):
        item = held[i]
        questions.append(
            {"question_id": f"q{i}", "image": item["image"], "text": text, "category": category}
        )
        gold.append({"question_id": f"q{i}", "answer": answer(item["attributes"])})
    for i in range(2):
        questions.append(
            {"question_id": f"t{i}", "text": f"Say the number {i}.", "category": "short"}
        )
        gold.append({"question_id": f"t{i}", "answer": f"The number is {i}."})
    q, g = root / "questions.jsonl", root / "answers_gt.jsonl"
    q.write_text("".join(json.dumps(x) + "\n" for x in questions))
    g.write_text("".join(json.dumps(x) + "\n" for x in gold))
    return q, g


def config(demo: Any, eval_set: tuple[Path, Path], answers: Path, **kw: Any) -> EvalConfig:
    fields: dict[str, Any] = dict(
        questions=str(eval_set[0]),
        image_folder=str(demo.images),
        answers_file=str(answers),
        gold=str(eval_set[1]),
        batch_size=3,
        max_new_tokens=5,
        device="cpu",
    )
    fields.update(kw)
    return EvalConfig(**fields)


def texts(path: Path) -> dict[str, str]:
    return {row["question_id"]: row["text"] for row in read_answers(path)}


def test_answers_file_in_llava_format_and_scored_summary(
    demo: Any, stage1: Path, eval_set: tuple[Path, Path], tmp_path: Path
) -> None:
    answers = tmp_path / "eval" / "answers.jsonl"
    cfg = config(demo, eval_set, answers, model=str(stage1), bank=str(demo.bank))
    summary = run_eval(cfg, progress=False)
    rows = [json.loads(line) for line in answers.read_text().splitlines()]
    assert [r["question_id"] for r in rows] == ["q0", "q1", "q2", "q3", "q4", "t0", "t1"]
    for r in rows:
        assert set(r) == set(ANSWER_FIELDS)
        assert isinstance(r["text"], str) and r["model_id"] == stage1.name
        assert len(r["answer_id"]) == 22
    assert len({r["answer_id"] for r in rows}) == len(rows)
    assert rows[5]["prompt"] == "Say the number 0."
    on_disk = json.loads(cfg.summary_path.read_text())
    assert cfg.summary_path == answers.with_name("answers.summary.json")
    assert on_disk["counts"] == {"questions": 7, "answered": 7, "new": 7}
    assert on_disk["retrieval"] is True and on_disk["top_k"] == 2
    assert on_disk["decoding"]["max_new_tokens"] == 5 and on_disk["decoding"]["greedy"]
    gold = {json.loads(x)["question_id"]: json.loads(x)["answer"] for x in eval_set[1].open()}
    cats = {json.loads(x)["question_id"]: json.loads(x)["category"] for x in eval_set[0].open()}
    expected = score_answers(texts(answers), gold, cats)
    assert on_disk["scores"] == json.loads(json.dumps(expected))
    assert summary["scores"]["overall"]["count"] == 7
    assert set(summary["scores"]["by_category"]) == {"short", "yesno", "choice"}
    assert "pope" in summary["scores"]["by_category"]["yesno"]


def test_batched_equals_one_at_a_time_in_process_and_remote(
    demo: Any, stage1: Path, eval_set: tuple[Path, Path], tmp_path: Path, bank_server: Any
) -> None:
    batched = tmp_path / "batched.jsonl"
    run_eval(
        config(demo, eval_set, batched, model=str(stage1), bank=str(demo.bank)), progress=False
    )
    single = tmp_path / "single.jsonl"
    run_eval(
        config(demo, eval_set, single, model=str(stage1), bank=str(demo.bank), batch_size=1),
        progress=False,
    )
    assert texts(single) == texts(batched)
    remote = tmp_path / "remote.jsonl"
    address = f"127.0.0.1:{bank_server.port}"
    run_eval(config(demo, eval_set, remote, model=str(stage1), bank=address), progress=False)
    assert texts(remote) == texts(batched)


def test_rerun_resumes_and_refuses_other_settings(
    demo: Any, stage1: Path, eval_set: tuple[Path, Path], tmp_path: Path
) -> None:
    answers = tmp_path / "answers.jsonl"
    run_eval(
        config(demo, eval_set, answers, model=str(stage1), bank=str(demo.bank), limit=3),
        progress=False,
    )
    first = answers.read_text().splitlines()
    assert len(first) == 3
    with answers.open("a") as f:  # a line cut short by a kill
        f.write('{"question_id": "q3", "prompt": "How ma')
    summary = run_eval(
        config(demo, eval_set, answers, model=str(stage1), bank=str(demo.bank)), progress=False
    )
    lines = answers.read_text().splitlines()
    assert lines[:3] == first  # answered ids kept as they were, not asked again
    assert [json.loads(x)["question_id"] for x in lines] == [
        "q0",
        "q1",
        "q2",
        "q3",
        "q4",
        "t0",
        "t1",
    ]
    assert summary["counts"] == {"questions": 7, "answered": 7, "new": 4}
    again = run_eval(
        config(demo, eval_set, answers, model=str(stage1), bank=str(demo.bank)), progress=False
    )
    assert again["counts"]["new"] == 0 and answers.read_text().splitlines() == lines
    with pytest.raises(ValueError, match="other settings"):
        run_eval(
            config(
                demo, eval_set, answers, model=str(stage1), bank=str(demo.bank), max_new_tokens=6
            ),
            progress=False,
        )


def test_cli_baseline_without_retrieval_and_errors(
    demo: Any,
    stage1: Path,
    eval_set: tuple[Path, Path],
    make_config: Any,
    tmp_path: Path,
    capsys: Any,
) -> None:
    baseline = train(make_config(retrieval=False, bank=None, steps=1)).out
    common = [
        "--questions",
        str(eval_set[0]),
        "--image-folder",
        str(demo.images),
        "--gold",
        str(eval_set[1]),
        "--max-new-tokens",
        "3",
        "--no-progress",
    ]
    answers = tmp_path / "base.jsonl"
    code = main(
        [
            "eval",
            "--model",
            str(baseline),
            "--no-retrieval",
            "--answers-file",
            str(answers),
            "--scorer",
            "short=short",
            *common,
        ]
    )
    out = capsys.readouterr().out
    assert code == 0 and "retrieval off" in out and "overall" in out
    summary = json.loads(answers.with_name("base.summary.json").read_text())
    assert summary["retrieval"] is False and summary["bank"] is None
    code = main(
        [
            "eval",
            "--model",
            str(stage1),
            "--no-retrieval",
            "--answers-file",
            str(tmp_path / "x.jsonl"),
            *common,
        ]
    )
    assert code == 2 and "trained with retrieval" in capsys.readouterr().err
    code = main(
        [
            "eval",
            "--model",
            str(baseline),
            "--no-retrieval",
            "--answers-file",
            str(tmp_path / "y.jsonl"),
            "--scorer",
            "short=bleu",
            *common,
        ]
    )
    assert code == 2 and "unknown scorer 'bleu'" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question_id": 1, "text": "a"}\n{"question_id": 1, "text": "b"}\n')
    code = main(
        [
            "eval",
            "--model",
            str(baseline),
            "--no-retrieval",
            "--questions",
            str(bad),
            "--image-folder",
            str(demo.images),
            "--answers-file",
            str(tmp_path / "z.jsonl"),
        ]
    )
    assert code == 2 and "appears twice" in capsys.readouterr().err
