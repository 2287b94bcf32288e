"""Stage-2 and evaluation data for the demo: instructions, eval questions, a text corpus.

``bankd demo-data --out data/shapes --n 2000`` writes, besides the pretraining pairs of
``bankd.build.demo_data``, from image pools of their own (ids continue after the held-out pairs,
so no instruction or eval image is a pretraining image)::

    data/shapes/instruct.json           # LLaVA-v1.5 instruction set, multi-turn, some text-only
    data/shapes/eval/questions.jsonl    # LLaVA eval questions: question_id, image, text, category
    data/shapes/eval/answers_gt.jsonl   # question_id, answer (and category, attribute)
    data/shapes/lm_corpus.json          # JSON list of chat texts the tiny LM pretrains on

Questions are about the attributes a picture shows, in LLaVA-v1.5's three answer styles:
short answer ("...\\nAnswer the question using a single word or phrase."), yes/no (half
of them true) and multiple choice with lettered options ("...\\nAnswer with the option's
letter from the given choices directly."). Text-only samples ask about shapes, colours and
numbers in general. ``lm_corpus.json`` holds questions and answers of the same kinds about
random attribute draws (no image, so the answers there carry no visual information): the
text a tiny LM must be able to read and write before it can learn to answer from an image,
as a real LLM has read such text before any VLM training. Everything is a pure function of
the seed; the image of eval sample ``i`` depends only on ``(seed, "eval", i)``.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from . import demo_data
from .demo_data import ATTRIBUTES, COUNT_WORDS, PLURALS, DemoDataConfig, pick

SHORT_SUFFIX = "Answer the question using a single word or phrase."
CHOICE_SUFFIX = "Answer with the option's letter from the given choices directly."
CATEGORIES = ("short_answer", "yes_no", "multiple_choice")
LETTERS = "ABCD"
# Split numbers continue demo_data's (train 0, heldout 1) so every RNG stream is distinct.
SPLITS: dict[str, int] = {"instruct": 2, "eval": 3, "corpus": 4, "text": 5}


@dataclass(frozen=True)
class InstructConfig:
    """Sizes of the stage-2 and eval sets; validated on construction."""

    instruct: int = 1000  # instruction samples (images plus text-only ones)
    eval_images: int = 150  # held-out images, one question of each category per image
    text_only: float = 0.1  # share of instruction samples without an image
    corpus: int = 4000  # texts in lm_corpus.json

    def __post_init__(self) -> None:
        for name in ("instruct", "eval_images", "corpus"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.text_only < 1.0:
            raise ValueError(f"text_only must be in [0, 1), got {self.text_only}")


def _noun(attrs: dict) -> str:
    return "shapes" if int(attrs["count"]) > 1 else "shape"


def _be(attrs: dict) -> str:
    return "are" if int(attrs["count"]) > 1 else "is"


def short_question(attrs: dict, name: str, rng: np.random.Generator) -> tuple[str, str]:
    """(question, answer) asking for attribute ``name`` in a word."""
    noun, be = _noun(attrs), _be(attrs)
    do = "do" if int(attrs["count"]) > 1 else "does"
    options = {
        "shape": (f"What {noun} {be} shown in the image?", "Which shape appears in the picture?"),
        "color": (f"What color {be} the {noun}?", f"Which color {do} the {noun} have?"),
        "size": (f"{be.capitalize()} the {noun} small or large?", f"How big {be} the {noun}?"),
        "position": (f"Where {be} the {noun} in the image?", f"Where {be} the {noun} placed?"),
        "count": ("How many shapes are there?", "How many shapes are in the image?"),
        "background": ("What color is the background?", "Which color is the background?"),
    }[name]
    # Counts are answered in digits, the form VQAv2's normalisation maps number words to.
    return str(pick(rng, options)), str(attrs[name])


def _other(name: str, value: str | int, rng: np.random.Generator, avoid=()) -> str | int:
    choices = tuple(v for v in ATTRIBUTES[name] if v != value and v not in avoid)
    return pick(rng, choices)


def yes_no_question(attrs: dict, rng: np.random.Generator) -> tuple[str, str, str]:
    """(question, "Yes"/"No", attribute) about one attribute; true half of the time."""
    name = str(pick(rng, ("shape", "color", "count", "position", "background")))
    truth = bool(rng.integers(2))
    asked = dict(attrs)
    if not truth:
        avoid = (attrs["background"],) if name == "color" else (attrs["color"],)
        avoid = avoid if name in ("color", "background") else ()
        asked[name] = _other(name, attrs[name], rng, avoid)
    count = int(asked["count"])
    if name in ("shape", "color"):
        thing = f"{asked['color']} {PLURALS[asked['shape']]}" if count > 1 else None
        thing = thing or f"{demo_data.article(str(asked['color']))} {asked['shape']}"
        text = f"Is there {thing} in the image?" if count == 1 else f"Are there {thing}?"
    elif name == "count":
        noun = "shape" if count == 1 else "shapes"
        text = f"Are there exactly {COUNT_WORDS[count]} {noun} in the image?"
    elif name == "position":
        text = f"{_be(attrs).capitalize()} the {_noun(attrs)} at the {asked['position']}?"
    else:
        text = f"Is the background {asked['background']}?"
    return text, "Yes" if truth else "No", name


def choice_question(attrs: dict, rng: np.random.Generator) -> tuple[str, str, str]:
    """(question with lettered options, the right letter, attribute)."""
    name = str(pick(rng, ("shape", "color", "size", "position", "count", "background")))
    values = [v for v in ATTRIBUTES[name] if not (name == "color" and v == attrs["background"])]
    others = [v for v in values if v != attrs[name]]
    n_options = min(len(LETTERS), len(values))
    picked = [attrs[name]] + [others[i] for i in rng.permutation(len(others))[: n_options - 1]]
    order = rng.permutation(n_options)
    options = [picked[i] for i in order]
    stem, _ = short_question(attrs, name, rng)
    lines = [stem] + [f"{LETTERS[i]}. {v}" for i, v in enumerate(options)]
    right = LETTERS[options.index(attrs[name])]
    return "\n".join(lines), right, name


def ask(attrs: dict, category: str, rng: np.random.Generator) -> tuple[str, str, str]:
    """(prompt with LLaVA's answer-style suffix, answer, attribute) of one category."""
    if category == "short_answer":
        name = str(pick(rng, tuple(ATTRIBUTES)))
        question, answer = short_question(attrs, name, rng)
        return f"{question}\n{SHORT_SUFFIX}", answer, name
    if category == "yes_no":
        question, answer, name = yes_no_question(attrs, rng)
        return f"{question}\n{SHORT_SUFFIX}", answer, name
    if category == "multiple_choice":
        question, answer, name = choice_question(attrs, rng)
        return f"{question}\n{CHOICE_SUFFIX}", answer, name
    raise ValueError(f"unknown question category {category!r} (choose from {CATEGORIES})")


SIDES = {"triangle": 3, "square": 4, "diamond": 4}
MIXES = {("red", "yellow"): "orange", ("blue", "yellow"): "green", ("red", "blue"): "purple"}


def text_question(rng: np.random.Generator) -> tuple[str, str]:
    """A question needing no image: general knowledge about shapes, colours and numbers."""
    kind = int(rng.integers(5))
    if kind == 0:
        shape = str(pick(rng, tuple(SIDES)))
        return f"How many sides does {demo_data.article(shape)} have?", str(SIDES[shape])
    if kind == 1:
        shape = str(pick(rng, tuple(PLURALS)))
        return f"What is the plural of {shape}?", PLURALS[shape]
    if kind == 2:
        (a, b), mix = pick(rng, tuple(MIXES.items()))
        return f"What color do you get by mixing {a} and {b}?", mix
    if kind == 3:
        a, b = (int(x) for x in rng.choice(10, size=2, replace=False))
        return f"Which number is larger, {a} or {b}?", str(max(a, b))
    word = str(pick(rng, ATTRIBUTES["color"] + ATTRIBUTES["shape"]))
    answer = "Yes" if word in ATTRIBUTES["color"] else "No"
    return f"Is {word} a color?", answer


def _turns(pairs: list[tuple[str, str]], with_image: bool) -> list[dict]:
    turns = []
    for i, (q, a) in enumerate(pairs):
        turns.append({"from": "human", "value": ("<image>\n" if with_image and i == 0 else "") + q})
        turns.append({"from": "gpt", "value": a})
    return turns


def instruct_sample(
    config: DemoDataConfig, spec: InstructConfig, index: int, sample_id: str
) -> tuple[dict, object]:
    """One instruction sample and its image (None for a text-only one)."""
    rng = np.random.default_rng([config.seed, SPLITS["instruct"], index])
    if rng.random() < spec.text_only:
        pairs = [text_question(rng) for _ in range(int(rng.integers(1, 3)))]
        return {"id": sample_id, "conversations": _turns(pairs, with_image=False)}, None
    attrs = demo_data.sample_attributes(rng)
    n_turns = int(rng.integers(2, 5))
    categories = [CATEGORIES[i % 3] for i in rng.permutation(max(3, n_turns))[:n_turns]]
    pairs = [ask(attrs, c, rng)[:2] for c in categories]
    image = demo_data.render_image(attrs, config.image_size, rng)
    sample = {
        "id": sample_id,
        "image": f"images/{sample_id}.png",
        "conversations": _turns(pairs, with_image=True),
        "attributes": attrs,
    }
    return sample, image


def eval_items(
    config: DemoDataConfig, index: int, sample_id: str, first_qid: int
) -> tuple[list[dict], list[dict], object]:
    """(questions, gold answers, image) of eval image ``index``: one question a category."""
    rng = np.random.default_rng([config.seed, SPLITS["eval"], index])
    attrs = demo_data.sample_attributes(rng)
    image = demo_data.render_image(attrs, config.image_size, rng)
    questions, gold = [], []
    for j, category in enumerate(CATEGORIES):
        text, answer, name = ask(attrs, category, rng)
        qid = first_qid + j
        where = f"images/{sample_id}.png"
        questions.append({"question_id": qid, "image": where, "text": text, "category": category})
        gold.append({"question_id": qid, "answer": answer, "category": category, "attribute": name})
    return questions, gold, image


# The system line of LLaVA-v1.5's chat layout (vicuna_v1), which every stage-2 prompt opens with.
CHAT_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


def corpus_texts(config: DemoDataConfig, n: int) -> list[str]:
    """``n`` chats (``[system] USER: q ASSISTANT: a ...``, the layout of LLaVA-v1.5's
    prompts, half of them with its system line) about random attributes and general facts."""
    texts = []
    for i in range(n):
        rng = np.random.default_rng([config.seed, SPLITS["corpus"], i])
        if rng.random() < 0.15:
            pairs = [text_question(rng)]
        else:
            attrs = demo_data.sample_attributes(rng)
            pairs = [ask(attrs, str(pick(rng, CATEGORIES)), rng)[:2] for _ in range(2)]
        chat = " ".join(f"USER: {q} ASSISTANT: {a}" for q, a in pairs)
        texts.append(f"{CHAT_SYSTEM} {chat}" if rng.random() < 0.5 else chat)
    return texts


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    tmp.replace(path)


def generate_instruct(config: DemoDataConfig, spec: InstructConfig, progress: bool = True) -> dict:
    """Write instruct.json, eval/ and lm_corpus.json under ``config.out``; a summary."""
    out = Path(config.out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "eval").mkdir(exist_ok=True)
    first = config.n + config.heldout  # ids after the pretraining and held-out pairs
    total = first + spec.instruct + spec.eval_images
    width = max(5, len(str(total - 1)))
    instruct, questions, gold = [], [], []
    jobs = [("instruct", i) for i in range(spec.instruct)]
    jobs += [("eval", i) for i in range(spec.eval_images)]
    for split, i in tqdm(jobs, desc="demo-data instruct/eval", unit="img", disable=not progress):
        number = first + i if split == "instruct" else first + spec.instruct + i
        sample_id = f"{number:0{width}d}"
        if split == "instruct":
            sample, image = instruct_sample(config, spec, i, sample_id)
            instruct.append(sample)
        else:
            q, g, image = eval_items(config, i, sample_id, first_qid=len(questions))
            questions += q
            gold += g
        if image is not None:
            image.save(out / "images" / f"{sample_id}.png", format="PNG")
    demo_data.write_json_atomic(out / "instruct.json", instruct)
    _write_jsonl(out / "eval" / "questions.jsonl", questions)
    _write_jsonl(out / "eval" / "answers_gt.jsonl", gold)
    demo_data.write_json_atomic(out / "lm_corpus.json", corpus_texts(config, spec.corpus))
    demo_data.write_json_atomic(out / "demo_instruct.config.json", asdict(spec))
    return {
        "instruct_json": str(out / "instruct.json"),
        "questions": str(out / "eval" / "questions.jsonl"),
        "answers_gt": str(out / "eval" / "answers_gt.jsonl"),
        "lm_corpus": str(out / "lm_corpus.json"),
        "n_instruct": len(instruct),
        "n_text_only": sum(1 for s in instruct if "image" not in s),
        "n_questions": len(questions),
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``bankd demo-data``: the pretraining pairs' and these."""
    demo_data.add_arguments(parser)
    d = InstructConfig()
    parser.add_argument(
        "--instruct", type=int, default=d.instruct, help=f"instruction samples ({d.instruct})"
    )
    parser.add_argument(
        "--eval-images",
        type=int,
        default=d.eval_images,
        help=f"held-out eval images, 3 questions each ({d.eval_images})",
    )
    parser.add_argument(
        "--corpus", type=int, default=d.corpus, help=f"texts for the tiny LM ({d.corpus})"
    )


def run(args: argparse.Namespace) -> int:
    """Entry point of ``bankd demo-data``; bad values raise ValueError."""
    spec = InstructConfig(instruct=args.instruct, eval_images=args.eval_images, corpus=args.corpus)
    demo_data.run(args)
    summary = generate_instruct(demo_data.config_from_args(args), spec, progress=True)
    print(
        f"demo-data: wrote {summary['n_instruct']} instruction samples "
        f"({summary['n_text_only']} text-only), {summary['n_questions']} eval questions and "
        f"the tiny LM's text corpus"
    )
    return 0
