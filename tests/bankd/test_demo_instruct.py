"""Tests for bankd.build.demo_instruct: the instruction set, the eval set and the tiny LM corpus."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bankd.build.demo_data import ATTRIBUTES, BACKGROUNDS_RGB, COLORS_RGB, DemoDataConfig, generate
from bankd.build.demo_instruct import (
    CATEGORIES,
    CHAT_SYSTEM,
    CHOICE_SUFFIX,
    SHORT_SUFFIX,
    InstructConfig,
    ask,
    generate_instruct,
)

N, HELDOUT, SIZE = 20, 5, 64
SPEC = InstructConfig(instruct=60, eval_images=30, corpus=50)


def _make(out: Path) -> dict:
    config = DemoDataConfig(out=out, n=N, heldout=HELDOUT, image_size=SIZE)
    generate(config, progress=False)
    return generate_instruct(config, SPEC, progress=False)


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("shapes")
    return out, _make(out)


def test_same_seed_same_bytes(made: tuple[Path, dict], tmp_path: Path) -> None:
    out, _ = made
    _make(tmp_path)
    for name in ("instruct.json", "eval/questions.jsonl", "eval/answers_gt.jsonl"):
        assert (out / name).read_bytes() == (tmp_path / name).read_bytes(), name
    assert (out / "lm_corpus.json").read_bytes() == (tmp_path / "lm_corpus.json").read_bytes()


def test_instruct_is_llava_v15_multi_turn_with_text_only(made: tuple[Path, dict]) -> None:
    out, summary = made
    samples = json.loads((out / "instruct.json").read_text())
    assert len(samples) == SPEC.instruct == summary["n_instruct"]
    text_only = [s for s in samples if "image" not in s]
    assert 0 < len(text_only) < len(samples) // 3
    suffixes = Counter()
    for s in samples:
        turns = s["conversations"]
        assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
        assert ("<image>" in turns[0]["value"]) == ("image" in s)
        assert all("<image>" not in t["value"] for t in turns[1:])
        for human, gpt in zip(turns[0::2], turns[1::2], strict=True):
            suffixes[human["value"].rsplit("\n", 1)[-1]] += 1
            assert gpt["value"]
        if "image" in s:
            assert 2 <= len(turns) // 2 <= 4  # multi-turn
            assert (out / s["image"]).is_file()
    assert suffixes[SHORT_SUFFIX] > 0 and suffixes[CHOICE_SUFFIX] > 0


def test_images_disjoint_from_pretraining(made: tuple[Path, dict]) -> None:
    out, _ = made
    pretrain = {
        s["image"] for f in ("data.json", "heldout.json") for s in json.loads((out / f).read_text())
    }
    instruct = {s["image"] for s in json.loads((out / "instruct.json").read_text()) if "image" in s}
    evaluated = {q["image"] for q in _jsonl(out / "eval" / "questions.jsonl")}
    assert not pretrain & instruct and not pretrain & evaluated and not instruct & evaluated
    ids = [
        s["id"]
        for f in ("data.json", "heldout.json", "instruct.json")
        for s in json.loads((out / f).read_text())
    ]
    assert len(ids) == len(set(ids))


def test_eval_format_and_answers_match_pixels(made: tuple[Path, dict]) -> None:
    out, summary = made
    questions = _jsonl(out / "eval" / "questions.jsonl")
    gold = {g["question_id"]: g for g in _jsonl(out / "eval" / "answers_gt.jsonl")}
    assert len(questions) == 3 * SPEC.eval_images == summary["n_questions"]
    assert Counter(q["category"] for q in questions) == {c: SPEC.eval_images for c in CATEGORIES}
    for q in questions:
        assert set(q) == {"question_id", "image", "text", "category"}
        g = gold[q["question_id"]]
        assert g["category"] == q["category"]
        if q["category"] == "yes_no":
            assert g["answer"] in ("Yes", "No")
        if q["category"] == "multiple_choice":
            letters = re.findall(r"^([A-D])\. ", q["text"], flags=re.M)
            assert g["answer"] in letters and letters == list("ABCD"[: len(letters)])
        if q["category"] == "short_answer" and g["attribute"] in ("color", "background"):
            pixels = np.asarray(Image.open(out / q["image"]).convert("RGB")).reshape(-1, 3)
            table = COLORS_RGB if g["attribute"] == "color" else BACKGROUNDS_RGB
            assert (pixels == table[g["answer"]]).all(axis=1).any()
    yes = sum(
        gold[q["question_id"]]["answer"] == "Yes" for q in questions if q["category"] == "yes_no"
    )
    assert 0.2 < yes / SPEC.eval_images < 0.8


def test_every_short_answer_is_an_attribute_value() -> None:
    rng = np.random.default_rng(0)
    attrs = {
        "shape": "star",
        "color": "red",
        "size": "small",
        "position": "left",
        "count": 2,
        "background": "white",
    }
    for _ in range(50):
        text, answer, name = ask(attrs, "short_answer", rng)
        assert answer == str(attrs[name]) and text.endswith(SHORT_SUFFIX)
        assert answer in map(str, ATTRIBUTES[name])
    with pytest.raises(ValueError, match="unknown question category"):
        ask(attrs, "essay", rng)


def test_corpus_is_chat_text_and_config_is_checked(made: tuple[Path, dict]) -> None:
    out, _ = made
    corpus = json.loads((out / "lm_corpus.json").read_text())
    assert len(corpus) == SPEC.corpus
    assert all(t.startswith(("USER: ", CHAT_SYSTEM + " USER: ")) for t in corpus)
    assert all(" ASSISTANT: " in t for t in corpus)
    with pytest.raises(ValueError, match="text_only"):
        InstructConfig(text_only=1.0)
    with pytest.raises(ValueError, match="eval_images"):
        InstructConfig(eval_images=-1)
