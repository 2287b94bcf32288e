"""Scorers of generated answers, as the benchmarks the paper reports score them (no torch).

    from tinyalign.scoring import score_answers
    summary = score_answers(answers, gold, categories)   # dicts keyed by question_id
    summary["overall"]["accuracy"], summary["by_category"]["yesno"]["f1"]

Three scorers, each a faithful port of the benchmark's own rules:

* ``short`` (VQAv2 / TextVQA, EvalAI's answer processor): both answer and references
  are normalised (lower case; commas, ``?`` and the listed punctuation removed or
  spaced; periods not between digits dropped; number words zero..ten to digits;
  articles removed; contractions spelled as VQA spells them). A list of two or more
  references gives VQAv2's soft accuracy, ``min(#matching / 3, 1)`` averaged over the
  leave-one-out subsets of the list; a single reference (a string or a one-item list)
  gives exact match of the normalised strings.
* ``yesno`` (POPE): the answer's first sentence, commas removed, split on spaces, is
  "no" when it contains the word ``No``, ``no`` or ``not``, else "yes"; the reference is
  "no" iff it is "no" (any case). Accuracy, precision, recall and F1 of "yes" as the
  positive class, and the yes-ratio of the predictions.
* ``choice`` (ScienceQA-IMG as LLaVA scores it): the letter is the whole answer when it
  is one of the options, the first character when followed by ``". "``, or the X of one
  ``"The answer is X."``; anything else fails (scored wrong). The reference is a letter.

Which scorer a question gets (``scorer_for``): an explicit ``scorer`` given for it,
else the first pattern of ``ScorerRules.patterns`` that its category matches, else the
shape of its reference (yes/no -> ``yesno``, one capital letter A-E -> ``choice``,
anything else -> ``short``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

SCORERS = ("short", "yesno", "choice")

# The VQA evaluation's contraction table, "written:spelled" pairs (its quirks kept:
# keys with capitals never match after lower-casing, "somebody'd" maps to "somebodyd").
_CONTRACTION_PAIRS = """
aint:ain't arent:aren't cant:can't couldve:could've couldnt:couldn't
couldn'tve:couldn't've couldnt've:couldn't've didnt:didn't doesnt:doesn't dont:don't
hadnt:hadn't hadnt've:hadn't've hadn'tve:hadn't've hasnt:hasn't havent:haven't hed:he'd
hed've:he'd've he'dve:he'd've hes:he's howd:how'd howll:how'll hows:how's Id've:I'd've
I'dve:I'd've Im:I'm Ive:I've isnt:isn't itd:it'd itd've:it'd've it'dve:it'd've itll:it'll
let's:let's maam:ma'am mightnt:mightn't mightnt've:mightn't've mightn'tve:mightn't've
mightve:might've mustnt:mustn't mustve:must've neednt:needn't notve:not've oclock:o'clock
oughtnt:oughtn't ow's'at:'ow's'at 'ows'at:'ow's'at 'ow'sat:'ow's'at shant:shan't
shed've:she'd've she'dve:she'd've she's:she's shouldve:should've shouldnt:shouldn't
shouldnt've:shouldn't've shouldn'tve:shouldn't've somebody'd:somebodyd
somebodyd've:somebody'd've somebody'dve:somebody'd've somebodyll:somebody'll
somebodys:somebody's someoned:someone'd someoned've:someone'd've someone'dve:someone'd've
someonell:someone'll someones:someone's somethingd:something'd
somethingd've:something'd've something'dve:something'd've somethingll:something'll
thats:that's thered:there'd thered've:there'd've there'dve:there'd've therere:there're
theres:there's theyd:they'd theyd've:they'd've they'dve:they'd've theyll:they'll
theyre:they're theyve:they've twas:'twas wasnt:wasn't wed've:we'd've we'dve:we'd've
weve:we've werent:weren't whatll:what'll whatre:what're whats:what's whatve:what've
whens:when's whered:where'd wheres:where's whereve:where've whod:who'd whod've:who'd've
who'dve:who'd've wholl:who'll whos:who's whove:who've whyll:why'll whyre:why're whys:why's
wont:won't wouldve:would've wouldnt:wouldn't wouldnt've:wouldn't've wouldn'tve:wouldn't've
yall:y'all yall'll:y'all'll y'allll:y'all'll yall'd've:y'all'd've y'alld've:y'all'd've
y'all'dve:y'all'd've youd:you'd youd've:you'd've you'dve:you'd've youll:you'll
youre:you're youve:you've
"""
CONTRACTIONS: dict[str, str] = dict(p.split(":", 1) for p in _CONTRACTION_PAIRS.split())
NUMBER_WORDS = {
    w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten".split())
}
NUMBER_WORDS["none"] = "0"
ARTICLES = frozenset({"a", "an", "the"})
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<")
PUNCTUATION += ("@", "`", ",", "?", "!")
# Both patterns as the reference has them; the first one's "(?!<=\d)" is a lookahead
# for the text "<=digit" (never there), so a period is kept only before a digit.
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
_DIGIT_COMMA = re.compile(r"(?<=\d)(\,)+(?=\d)")
# The reference passes re.UNICODE (32) positionally as sub()'s count.
_PERIOD_COUNT = 32
_ANSWER_IS = re.compile(r"The answer is ([A-Z]).")
CHOICE_LETTERS = "ABCDE"


def normalize_vqa_answer(text: str) -> str:
    """An answer as VQAv2's evaluation compares it (EvalAI's answer processor)."""
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    spaced = text
    for p in PUNCTUATION:
        if p + " " in text or " " + p in text or _DIGIT_COMMA.search(text) is not None:
            spaced = spaced.replace(p, "")
        else:
            spaced = spaced.replace(p, " ")
    spaced = _PERIOD.sub("", spaced, count=_PERIOD_COUNT)
    words = [NUMBER_WORDS.get(w, w) for w in spaced.lower().split()]
    words = [CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES]
    return " ".join(words)


def vqa_soft_accuracy(answer: str, references: str | list[str]) -> float:
    """VQAv2's accuracy of ``answer``: soft over a list of references, else exact match."""
    if isinstance(references, str):
        references = [references]
    if not references:
        raise ValueError("a short-answer question needs at least one reference answer")
    pred = normalize_vqa_answer(answer)
    refs = [normalize_vqa_answer(r) for r in references]
    if len(refs) == 1:
        return float(pred == refs[0])
    accs = []
    for left_out in range(len(refs)):
        matching = sum(1 for j, r in enumerate(refs) if j != left_out and r == pred)
        accs.append(min(1.0, matching / 3))
    return sum(accs) / len(accs)


def pope_label(text: str) -> str:
    """ "yes" or "no" as POPE's evaluation reads a generated answer."""
    if "." in text:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def pope_metrics(predictions: list[str], references: list[str]) -> dict[str, float]:
    """POPE's accuracy, precision, recall, F1 and yes-ratio ("yes" is the positive class).

    ``predictions`` are generated answers (parsed with ``pope_label``); ``references``
    are "yes"/"no" in any case. A ratio whose denominator is 0 is reported as 0.0.
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    pred = [pope_label(p) == "yes" for p in predictions]
    gold = []
    for r in references:
        r = r.strip().lower()
        if r not in ("yes", "no"):
            raise ValueError(f"a yes/no reference must be 'yes' or 'no', got {r!r}")
        gold.append(r == "yes")
    tp = sum(p and g for p, g in zip(pred, gold, strict=True))
    tn = sum(not p and not g for p, g in zip(pred, gold, strict=True))
    fp = sum(p and not g for p, g in zip(pred, gold, strict=True))
    fn = sum(not p and g for p, g in zip(pred, gold, strict=True))
    n = len(pred)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "accuracy": (tp + tn) / n if n else 0.0,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "yes_ratio": sum(pred) / n if n else 0.0,
        "tp": tp,
        "tn": tn,
        "fp": fp,
        "fn": fn,
    }


def extract_choice_letter(text: str, options: str = CHOICE_LETTERS) -> str | None:
    """The option letter of a multiple-choice answer (ScienceQA-IMG rules), or None."""
    if text in options:
        return text or None
    if len(text) >= 3 and text[0] in options and text[1:3] == ". ":
        return text[0]
    found = _ANSWER_IS.findall(text)
    if len(found) == 1 and found[0] in options:
        return found[0]
    return None


def _choice_reference(reference: Any) -> str:
    letter = extract_choice_letter(str(reference).strip(), CHOICE_LETTERS)
    if letter is None:
        raise ValueError(f"a multiple-choice reference must be a letter A-E, got {reference!r}")
    return letter


@dataclass(frozen=True)
class ScorerRules:
    """Which scorer a category gets: ``(regex, scorer)`` pairs tried in order on the category
    (case-insensitive search); categories matching none fall back to the answer's shape."""

    patterns: tuple[tuple[str, str], ...] = field(
        default=(
            (r"yes.?no|pope|adversarial|popular|random|binary", "yesno"),
            (r"choice|multi|mcq|sqa|science", "choice"),
            (r"short|vqa|open|gqa|ocr", "short"),
        )
    )

    def __post_init__(self) -> None:
        for pattern, scorer in self.patterns:
            if scorer not in SCORERS:
                raise ValueError(f"unknown scorer {scorer!r} (choose from {SCORERS})")
            re.compile(pattern)

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, str]) -> ScorerRules:
        """Exact category names first (``{"counting": "short"}``), then the defaults."""
        exact = tuple((f"^{re.escape(c)}$", s) for c, s in mapping.items())
        return cls(patterns=exact + cls().patterns)


def scorer_for(
    category: str | None, reference: Any, rules: ScorerRules, explicit: str | None = None
) -> str:
    """The scorer of one question (rule in the module docstring)."""
    if explicit is not None:
        if explicit not in SCORERS:
            raise ValueError(f"unknown scorer {explicit!r} (choose from {SCORERS})")
        return explicit
    if category:
        for pattern, scorer in rules.patterns:
            if re.search(pattern, category, re.IGNORECASE):
                return scorer
    if isinstance(reference, str):
        if reference.strip().lower() in ("yes", "no"):
            return "yesno"
        if len(reference.strip()) == 1 and reference.strip() in CHOICE_LETTERS:
            return "choice"
    return "short"


def score_one(scorer: str, answer: str, reference: Any) -> float:
    """The score (0..1) of one answer; for ``yesno`` whether POPE's parse is right."""
    if scorer == "short":
        return vqa_soft_accuracy(answer, reference)
    if scorer == "yesno":
        return float(pope_label(answer) == str(reference).strip().lower())
    if scorer == "choice":
        return float(extract_choice_letter(answer.strip()) == _choice_reference(reference))
    raise ValueError(f"unknown scorer {scorer!r} (choose from {SCORERS})")


def _group(items: list[tuple[str, str, Any, float]]) -> dict[str, Any]:
    """Count and mean score of (scorer, answer, reference, score) rows; POPE metrics for
    the yes/no ones."""
    out: dict[str, Any] = {
        "count": len(items),
        "accuracy": sum(s for *_, s in items) / len(items) if items else 0.0,
    }
    yesno = [(a, r) for kind, a, r, _ in items if kind == "yesno"]
    if yesno:
        out["pope"] = pope_metrics([a for a, _ in yesno], [str(r) for _, r in yesno])
    return out


def score_answers(
    answers: Mapping[Any, str],
    gold: Mapping[Any, Any],
    categories: Mapping[Any, str | None] | None = None,
    *,
    rules: ScorerRules | None = None,
    scorers: Mapping[Any, str] | None = None,
) -> dict[str, Any]:
    """Scores of ``answers`` against ``gold`` (both keyed by question id).

    ``categories``: a category per question id (missing: none); ``scorers``: an explicit
    scorer per question id. Returns ``overall``, ``by_scorer`` and ``by_category`` groups
    (count, mean accuracy, POPE metrics where yes/no questions are in it), the scorer of
    each question id (``scorer_of``) and counts of gold questions without an answer
    (``missing``, not scored) and answers without gold (``unscored``).
    """
    rules = rules or ScorerRules()
    categories = categories or {}
    scorers = scorers or {}
    rows: list[tuple[str, str, str, Any, float]] = []
    scorer_of: dict[str, str] = {}
    for qid, reference in gold.items():
        if qid not in answers:
            continue
        category = categories.get(qid)
        kind = scorer_for(category, reference, rules, scorers.get(qid))
        scorer_of[str(qid)] = kind
        score = score_one(kind, answers[qid], reference)
        rows.append((str(category), kind, answers[qid], reference, score))
    by_scorer = {
        k: _group([(kind, a, r, s) for _, kind, a, r, s in rows if kind == k])
        for k in SCORERS
        if any(kind == k for _, kind, *_ in rows)
    }
    by_category = {
        c: _group([(kind, a, r, s) for cat, kind, a, r, s in rows if cat == c])
        for c in sorted({cat for cat, *_ in rows})
    }
    return {
        "overall": _group([(kind, a, r, s) for _, kind, a, r, s in rows]),
        "by_scorer": by_scorer,
        "by_category": by_category,
        "scorer_of": scorer_of,
        "missing": sum(1 for q in gold if q not in answers),
        "unscored": sum(1 for q in answers if q not in gold),
    }
