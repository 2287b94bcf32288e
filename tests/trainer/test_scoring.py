"""The scorers against hand-computed cases: VQAv2 normalisation and soft accuracy, POPE's
yes/no metrics, ScienceQA's letter extraction, scorer choice and the summary."""

from __future__ import annotations

import pytest

from tinyalign.scoring import (
    ScorerRules,
    extract_choice_letter,
    normalize_vqa_answer,
    pope_label,
    pope_metrics,
    score_answers,
    scorer_for,
    vqa_soft_accuracy,
)


@pytest.mark.parametrize(
    ("raw", "normalised"),
    [
        ("Two dogs.", "2 dogs"),  # number word, trailing period
        ("The cat", "cat"),  # article
        ("an apple and a pear", "apple and pear"),
        ("None", "0"),
        ("isnt", "isn't"),  # contraction spelled as VQA does
        ("dont know", "don't know"),
        ("Yes!", "yes"),
        ("1,000", "1000"),  # commas go first
        ("3.5", "3.5"),  # a period before a digit stays
        ("black-and-white", "black and white"),  # punctuation without spaces -> a space
        ("black - white", "black white"),  # punctuation next to a space -> removed
        ("a man's hat", "man 's hat"),
        ("  Red\n", "red"),
        ("(left)", "left"),
        ("Where?", "where"),
    ],
)
def test_vqa_normalisation(raw: str, normalised: str) -> None:
    assert normalize_vqa_answer(raw) == normalised


def test_vqa_soft_accuracy_over_ten_references() -> None:
    refs = ["2"] * 3 + ["3"] * 7
    # leaving out one of the three "2": 2 matches -> 2/3; leaving out a "3": 3 -> 1
    assert vqa_soft_accuracy("two", refs) == pytest.approx((3 * 2 / 3 + 7 * 1) / 10)
    # "3" always has >= 6 matches
    assert vqa_soft_accuracy("Three.", refs) == pytest.approx(1.0)
    refs = ["2"] * 2 + ["3"] * 8
    assert vqa_soft_accuracy("2", refs) == pytest.approx((2 * 1 / 3 + 8 * 2 / 3) / 10)
    assert vqa_soft_accuracy("4", refs) == 0.0


def test_vqa_single_reference_is_exact_match() -> None:
    assert vqa_soft_accuracy("A red circle.", "red circle") == 1.0
    assert vqa_soft_accuracy("red", ["red circle"]) == 0.0
    with pytest.raises(ValueError, match="at least one reference"):
        vqa_soft_accuracy("red", [])


def test_pope_parsing_and_metrics() -> None:
    preds = ["Yes, there is.", "No.", "There is not a dog.", "yes", "I see no cat", "Nope"]
    assert [pope_label(p) for p in preds] == ["yes", "no", "no", "yes", "no", "yes"]
    # "No" only counts in the first sentence
    assert pope_label("Yes. No dog is there.") == "yes"
    gold = ["yes", "no", "Yes", "no", "NO", "yes"]
    m = pope_metrics(preds, gold)
    # pred Y N N Y N Y vs gold Y N Y N N Y: TP 2, TN 2, FP 1, FN 1
    assert (m["tp"], m["tn"], m["fp"], m["fn"]) == (2, 2, 1, 1)
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 / 3)
    assert m["yes_ratio"] == pytest.approx(0.5)
    none_yes = pope_metrics(["no", "no"], ["yes", "no"])
    assert none_yes["precision"] == 0.0 and none_yes["f1"] == 0.0
    assert none_yes["accuracy"] == 0.5 and none_yes["yes_ratio"] == 0.0
    with pytest.raises(ValueError, match="'yes' or 'no'"):
        pope_metrics(["yes"], ["maybe"])
    with pytest.raises(ValueError, match="1 predictions but 2"):
        pope_metrics(["yes"], ["yes", "no"])


@pytest.mark.parametrize(
    ("text", "letter"),
    [
        ("B", "B"),
        ("C. blue", "C"),
        ("The answer is D.", "D"),
        ("I think A", None),
        ("F", None),
        ("b", None),
        ("", None),
        ("The answer is A. The answer is B.", None),  # two answers: failed
        ("A.", None),  # not "A. " and not the whole answer
    ],
)
def test_choice_letter_extraction(text: str, letter: str | None) -> None:
    assert extract_choice_letter(text) == letter


def test_scorer_choice_by_category_then_answer_shape() -> None:
    rules = ScorerRules()
    assert scorer_for("yesno", "red", rules) == "yesno"
    assert scorer_for("adversarial", "yes", rules) == "yesno"  # POPE's splits
    assert scorer_for("choice", "B", rules) == "choice"
    assert scorer_for("short", "yes", rules) == "short"  # the category wins over the shape
    assert scorer_for(None, "Yes", rules) == "yesno"
    assert scorer_for("colour", "C", rules) == "choice"
    assert scorer_for("colour", "red", rules) == "short"
    assert scorer_for("yesno", "red", rules, explicit="short") == "short"
    custom = ScorerRules.from_mapping({"counting": "short", "random": "choice"})
    assert scorer_for("random", "A", custom) == "choice"
    assert scorer_for("popular", "no", custom) == "yesno"
    with pytest.raises(ValueError, match="unknown scorer"):
        ScorerRules(patterns=(("x", "bleu"),))
    with pytest.raises(ValueError, match="unknown scorer"):
        scorer_for("x", "y", rules, explicit="bleu")


def test_score_answers_summary() -> None:
    gold = {1: "red", 2: ["2"] * 3 + ["3"] * 7, 3: "yes", 4: "no", 5: "B", 6: "blue"}
    categories = {1: "short", 2: "short", 3: "yesno", 4: "yesno", 5: "choice", 6: "short"}
    answers = {1: "Red.", 2: "two", 3: "No, it is not.", 4: "no", 5: "The answer is B.", 7: "x"}
    s = score_answers(answers, gold, categories)
    assert s["missing"] == 1 and s["unscored"] == 1  # question 6 unanswered, 7 has no gold
    assert s["overall"]["count"] == 5
    assert s["overall"]["accuracy"] == pytest.approx((1 + 0.9 + 0 + 1 + 1) / 5)
    assert s["by_category"]["short"]["accuracy"] == pytest.approx((1 + 0.9) / 2)
    assert s["by_scorer"]["choice"] == {"count": 1, "accuracy": 1.0}
    yesno = s["by_category"]["yesno"]
    assert yesno["accuracy"] == 0.5
    assert yesno["pope"]["yes_ratio"] == 0.0 and yesno["pope"]["recall"] == 0.0
    assert s["scorer_of"] == {"1": "short", "2": "short", "3": "yesno", "4": "yesno", "5": "choice"}
    with pytest.raises(ValueError, match="letter A-E"):
        score_answers({1: "A"}, {1: "blue"}, {1: "choice"})
