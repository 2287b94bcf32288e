"""``tinyalign eval``: answers to LLaVA-format questions, written and scored as LLaVA does.

CPU::

    tinyalign eval --model runs/stage2 --bank localhost:50051 \\
        --questions data/shapes/eval/questions.jsonl --image-folder data/shapes \\
        --answers-file runs/stage2/eval/answers.jsonl --gold data/shapes/eval/answers_gt.jsonl
    tinyalign eval --model runs/baseline --no-retrieval ...        # a model without H_R

Python (what ``tinyalign study`` calls)::

    from tinyalign.evaluate import EvalConfig, run_eval
    summary = run_eval(EvalConfig(model=..., questions=..., image_folder=...,
                                  answers_file=..., bank="bank/bank.faiss", gold=...))

Questions: one JSON a line with ``question_id``, ``text``, ``image`` (a path under
``--image-folder``; absent or null for a text-only question) and optionally ``category``
and ``scorer`` (LLaVA's question files). Answers: one JSON a line with ``question_id``,
``prompt`` (the question text), ``text`` (the answer), ``answer_id``, ``model_id`` and
``metadata`` (LLaVA's answers files, so its scoring scripts read them), each line
flushed as soon as its batch is done. A rerun with the same settings skips the question
ids already answered (a line cut short by a kill is dropped and asked again); a rerun
with other settings into the same file is refused. Decoding is greedy and batched
(left padding; the same answers as one question at a time), with the model's chat
template and the bank opened as ``tinyalign generate`` opens it, so retrieval settings
saved with the model apply.

Gold: one JSON a line with ``question_id`` and ``answer`` (a string, or a list of
reference answers for VQAv2's soft accuracy), optionally ``category`` / ``scorer``
overriding the question's. The summary (scores by ``tinyalign.scoring``, counts,
decoding settings, model, bank, retrieval on/off) is written next to the answers as
``<answers stem>.summary.json`` and returned.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from bankd.models.encoders import resolve_device
from bankd_client import errors
from bankd_client.credentials import add_connection_flags, connection_options

from .inference import generate, load_vlm, open_retriever
from .reporting import open_reporter, resolve_report_to
from .scoring import SCORERS, ScorerRules, score_answers

log = logging.getLogger(__name__)

ANSWER_FIELDS = ("question_id", "prompt", "text", "answer_id", "model_id", "metadata")
# shortuuid's alphabet (no 0/O, 1/I/l): LLaVA's answer ids are 22 of these characters.
_ID_ALPHABET = "23456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"


@dataclass(frozen=True)
class EvalConfig:
    """One evaluation of a model directory on a question file."""

    model: str
    questions: str
    image_folder: str
    answers_file: str
    bank: str | None = None  # HOST:PORT or a bank.faiss path, as --bank elsewhere
    no_retrieval: bool = False  # a model without retrieval (the baseline)
    gold: str | None = None
    batch_size: int = 16
    max_new_tokens: int = 16
    top_k: int | None = None  # default: the model's
    limit: int | None = None  # the first N questions only
    model_id: str | None = None  # default: the model directory's name
    device: str = "auto"
    precision: str = "auto"
    allow_encoder_mismatch: bool = False
    bank_patience: float = 30.0
    # category -> scorer, tried before the default rules (tinyalign.scoring.ScorerRules)
    scorer_map: tuple[tuple[str, str], ...] = ()
    bank_tls: bool = False
    bank_tls_ca: str | None = None
    bank_tls_cert: str | None = None
    bank_tls_key: str | None = None
    bank_tls_server_name: str | None = None
    bank_auth_token_file: str | None = None
    bank_lb_policy: str | None = None
    # scores to TensorBoard / wandb in the model's run directory (reporting.py)
    report_to: str = "auto"

    def __post_init__(self) -> None:
        resolve_report_to(self.report_to)  # validates
        if self.batch_size < 1 or self.max_new_tokens < 1:
            raise ValueError("batch_size and max_new_tokens must be >= 1")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1, got {self.limit}")
        if self.no_retrieval and self.bank:
            raise ValueError("give --bank or --no-retrieval, not both")
        for _, scorer in self.scorer_map:
            if scorer not in SCORERS:
                raise ValueError(f"unknown scorer {scorer!r} (choose from {SCORERS})")

    @property
    def summary_path(self) -> Path:
        path = Path(self.answers_file)
        return path.with_name(path.stem + ".summary.json")


def answer_id() -> str:
    """A unique 22-character id in shortuuid's alphabet (what LLaVA writes)."""
    n, out = uuid.uuid4().int, []
    for _ in range(22):
        n, r = divmod(n, len(_ID_ALPHABET))
        out.append(_ID_ALPHABET[r])
    return "".join(out)


def read_jsonl(path: str | Path, required: tuple[str, ...], what: str) -> list[dict[str, Any]]:
    """Lines of a JSONL file as dicts; ValueError naming the line for bad or duplicate ones."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} file {path} not found")
    rows, seen = [], set()
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not JSON ({e})") from None
        if not isinstance(row, dict) or any(k not in row for k in required):
            raise ValueError(f"{path}:{n}: a {what} line needs the fields {list(required)}")
        qid = row["question_id"]
        if qid in seen:
            raise ValueError(f"{path}:{n}: question_id {qid!r} appears twice")
        seen.add(qid)
        rows.append(row)
    return rows


def read_answers(path: Path) -> list[dict[str, Any]]:
    """Complete answer lines of an answers file; a torn last line (a kill) is cut off."""
    if not path.is_file():
        return []
    raw = path.read_text(encoding="utf-8")
    lines, answers = raw.splitlines(keepends=True), []
    for n, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if n == len(lines):  # written up to the kill: drop it, ask again
                log.warning("%s: dropping its unfinished last line", path)
                path.write_text("".join(lines[:-1]), encoding="utf-8")
                break
            raise ValueError(f"{path}:{n}: not an answers line") from None
        if not isinstance(row, dict) or any(k not in row for k in ANSWER_FIELDS):
            raise ValueError(f"{path}:{n}: an answers line needs the fields {ANSWER_FIELDS}")
        answers.append(row)
    return answers


def _settings(
    config: EvalConfig, model_id: str, retrieval: bool, top_k: int | None, bank: Any
) -> dict:
    """What decides the answers: a resumed file must have been written with the same."""
    if not retrieval:
        bank = None
    elif bank is not None:  # a caller's open bank: name its kind
        bank = f"<{type(bank).__name__}>"
    else:
        bank = config.bank
    return {
        "model": str(Path(config.model).resolve()),
        "model_id": model_id,
        "retrieval": retrieval,
        "bank": bank,
        "top_k": top_k,
        "decoding": {
            "greedy": True,
            "do_sample": False,
            "num_beams": 1,
            "max_new_tokens": config.max_new_tokens,
            "precision": config.precision,
        },
    }


def run_eval(config: EvalConfig, bank: Any | None = None, progress: bool = True) -> dict:
    """Answer the questions not yet in the answers file, then summarise (and score with gold).

    ``bank``: an open bank (``BankClient``, ``LocalBank``) or a ``Retriever`` to use
    instead of opening ``config.bank``; it is not closed here.
    """
    t0 = time.perf_counter()
    questions = read_jsonl(config.questions, ("question_id", "text"), "questions")
    if config.limit is not None:
        questions = questions[: config.limit]
    folder = Path(config.image_folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"--image-folder {folder} not found")
    gold = read_jsonl(config.gold, ("question_id", "answer"), "gold") if config.gold else None
    answers_path = Path(config.answers_file)
    done = read_answers(answers_path)
    answered = {row["question_id"] for row in done}
    todo = [q for q in questions if q["question_id"] not in answered]

    vlm = load_vlm(config.model, resolve_device(config.device), progress=False)
    retrieval = vlm.model.config.retrieval
    if retrieval and config.no_retrieval:
        raise ValueError(
            f"{config.model} was trained with retrieval; --no-retrieval is for models "
            "without it (the baseline): pass --bank"
        )
    if not retrieval and (config.bank or bank is not None):
        log.warning("%s has no retrieval: the bank is not used", config.model)
    model_id = config.model_id or Path(config.model).resolve().name
    retriever, owned = None, False
    if retrieval and todo:
        retriever, owned = open_retriever(
            vlm,
            bank if bank is not None else config.bank,
            config.top_k,
            allow_encoder_mismatch=config.allow_encoder_mismatch,
            bank_patience=config.bank_patience,
            bank_options=connection_options(config, prefix="bank_"),
        )
    top_k = None
    if retrieval:
        top_k = retriever.k if retriever else config.top_k or vlm.model.config.top_k
    settings = _settings(config, model_id, retrieval, top_k, bank)
    if done and done[0]["metadata"].get("settings") != settings:
        if owned:
            retriever.close()
        raise ValueError(
            f"{answers_path} holds answers made with other settings "
            f"({done[0]['metadata'].get('settings')}); pass another --answers-file"
        )
    answers_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with (
            answers_path.open("a", encoding="utf-8") as out,
            tqdm(
                total=len(questions),
                initial=len(questions) - len(todo),
                desc="eval",
                unit="q",
                disable=not progress,
            ) as bar,
        ):
            for start in range(0, len(todo), config.batch_size):
                batch = todo[start : start + config.batch_size]
                images = [folder / q["image"] if q.get("image") else None for q in batch]
                texts = generate(
                    vlm,
                    images,
                    [q["text"] for q in batch],
                    bank=retriever,
                    max_new_tokens=config.max_new_tokens,
                    precision=config.precision,
                    batch_size=len(batch),
                )
                for q, text in zip(batch, texts, strict=True):
                    row = {
                        "question_id": q["question_id"],
                        "prompt": q["text"],
                        "text": text,
                        "answer_id": answer_id(),
                        "model_id": model_id,
                        "metadata": {"settings": settings},
                    }
                    out.write(json.dumps(row) + "\n")
                out.flush()
                bar.update(len(batch))
    finally:
        if owned:
            retriever.close()
    summary = summarise(config, questions, gold, settings, len(todo))
    summary["seconds"] = time.perf_counter() - t0
    config.summary_path.write_text(json.dumps(summary, indent=1, sort_keys=True) + "\n")
    report_scores(config, summary)
    return summary


def report_scores(config: EvalConfig, summary: dict[str, Any]) -> None:
    """Scores as ``eval/<group>/<metric>`` scalars in the model's run directory, at the
    step the model was trained to (``train_result.json``), next to its training curves."""
    scores = summary.get("scores")
    if not scores or not resolve_report_to(config.report_to):
        return
    groups = {"overall": scores["overall"], **scores.get("by_category", {})}
    values: dict[str, float] = {}

    def add(prefix: str, metrics: dict[str, Any]) -> None:
        for name, v in metrics.items():
            if isinstance(v, dict):
                add(f"{prefix}/{name}", v)  # e.g. POPE's precision / recall / F1
            elif isinstance(v, (int, float)) and not isinstance(v, bool):
                values[f"{prefix}/{name}"] = float(v)

    for group, metrics in groups.items():
        add(f"eval/{group}", metrics)
    result = Path(config.model) / "train_result.json"
    step = int(json.loads(result.read_text()).get("steps", 0)) if result.is_file() else 0
    reporter = open_reporter(config.report_to, Path(config.model), hparams=asdict(config))
    reporter.scalars(step, values)
    reporter.close()


def summarise(
    config: EvalConfig,
    questions: list[dict[str, Any]],
    gold: list[dict[str, Any]] | None,
    settings: dict[str, Any],
    new: int,
) -> dict[str, Any]:
    """Counts and settings; scores of the questions' answers when gold is given.

    Question ids are matched as strings, so a gold file writing 7 answers question "7"."""
    by_q = {str(q["question_id"]): q for q in questions}
    answers = {
        str(row["question_id"]): row["text"]
        for row in read_answers(Path(config.answers_file))
        if str(row["question_id"]) in by_q
    }
    summary: dict[str, Any] = {
        **settings,
        "questions": config.questions,
        "answers_file": config.answers_file,
        "gold": config.gold,
        "batch_size": config.batch_size,
        "counts": {"questions": len(questions), "answered": len(answers), "new": new},
    }
    if gold is not None:
        refs: dict[str, Any] = {}
        categories: dict[str, str | None] = {}
        scorers: dict[str, str] = {}
        for g in gold:  # the gold line's category / scorer over the question's
            qid = str(g["question_id"])
            if qid not in by_q:
                continue
            refs[qid] = g["answer"]
            categories[qid] = g.get("category") or by_q[qid].get("category")
            scorer = g.get("scorer") or by_q[qid].get("scorer")
            if scorer is not None:
                scorers[qid] = scorer
        rules = ScorerRules.from_mapping(dict(config.scorer_map))
        summary["scores"] = score_answers(answers, refs, categories, rules=rules, scorers=scorers)
    return summary


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of ``tinyalign eval``."""
    p.add_argument("--model", required=True, help="a pretrain/finetune --out directory")
    bank = p.add_mutually_exclusive_group()
    bank.add_argument("--bank", help='"host:port" or a bank .faiss path (retrieval models)')
    bank.add_argument(
        "--no-retrieval", action="store_true", help="a model without retrieval: no bank"
    )
    p.add_argument("--questions", required=True, help="LLaVA question file (JSONL)")
    p.add_argument("--image-folder", required=True, help="root of the questions' image paths")
    p.add_argument("--answers-file", required=True, help="LLaVA answers file (JSONL); resumed")
    p.add_argument("--gold", help="reference answers (JSONL: question_id, answer)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--top-k", type=int, help="default: the model's")
    p.add_argument("--limit", type=int, help="only the first N questions")
    p.add_argument("--model-id", help="model_id in the answers (default: the model's folder)")
    p.add_argument(
        "--scorer",
        action="append",
        default=[],
        metavar="CATEGORY=SCORER",
        help=f"score a category with one of {', '.join(SCORERS)} (repeatable)",
    )
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"])
    p.add_argument("--allow-encoder-mismatch", action="store_true")
    p.add_argument("--bank-patience", type=float, default=30.0)
    add_connection_flags(p, prefix="bank-")
    p.add_argument(
        "--report-to",
        default="auto",
        help="scores to tensorboard / wandb in the model directory, or none "
        "(auto: tensorboard when installed)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _scorer_map(items: list[str]) -> tuple[tuple[str, str], ...]:
    pairs = []
    for item in items:
        category, sep, scorer = item.partition("=")
        if not sep or not category:
            raise ValueError(f"--scorer takes CATEGORY=SCORER, got {item!r}")
        pairs.append((category, scorer))
    return tuple(pairs)


def format_summary(summary: dict[str, Any]) -> str:
    """A few lines for the terminal: counts, then accuracy overall and per category."""
    c = summary["counts"]
    lines = [
        f"{summary['model_id']}: {c['answered']}/{c['questions']} answered "
        f"({c['new']} now), retrieval {'on' if summary['retrieval'] else 'off'}"
    ]
    scores = summary.get("scores")
    if scores:
        groups = {"overall": scores["overall"], **scores["by_category"]}
        for name, g in groups.items():
            line = f"  {name:12s} n={g['count']:<5d} accuracy {100 * g['accuracy']:.2f}"
            if "pope" in g:
                pope = g["pope"]
                line += f"  F1 {100 * pope['f1']:.2f}  yes-ratio {pope['yes_ratio']:.2f}"
            lines.append(line)
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Entry point of ``tinyalign eval``: prints the summary; 2 on bad input."""
    try:
        config = EvalConfig(
            model=args.model,
            questions=args.questions,
            image_folder=args.image_folder,
            answers_file=args.answers_file,
            bank=args.bank,
            no_retrieval=args.no_retrieval,
            gold=args.gold,
            batch_size=args.batch_size,
            max_new_tokens=args.max_new_tokens,
            top_k=args.top_k,
            limit=args.limit,
            model_id=args.model_id,
            device=args.device,
            precision=args.precision,
            allow_encoder_mismatch=args.allow_encoder_mismatch,
            bank_patience=args.bank_patience,
            scorer_map=_scorer_map(args.scorer),
            report_to=args.report_to,
            **connection_options_fields(args),
        )
        log.info("eval config: %s", json.dumps(asdict(config), sort_keys=True))
        summary = run_eval(config, progress=not args.no_progress)
    except (ValueError, FileNotFoundError, errors.BankError) as e:
        print(f"tinyalign eval: error: {e}", file=sys.stderr)
        return 2
    print(format_summary(summary))
    print(f"answers: {config.answers_file}; summary: {config.summary_path}")
    return 0


def connection_options_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The ``--bank-tls*`` / token / lb-policy flags as ``EvalConfig`` fields."""
    names = ("tls", "tls_ca", "tls_cert", "tls_key", "tls_server_name")
    names += ("auth_token_file", "lb_policy")
    return {f"bank_{n}": getattr(args, f"bank_{n}") for n in names}
