"""What ``tinyalign study`` runs: its config (a TOML file or a preset) and the arms.

A config file is flat TOML whose keys are ``StudyConfig``'s fields (paths relative to the
file's folder); unknown keys are refused. The demo preset's values are documented where
they are set (``demo_preset``) with the measurements that chose them.

Arms (``ARMS``), each a name in ``arms``:

    baseline            no retrieval, connector mlp2x_gelu
    tinyalign           top-k values of the bank built from the pretraining pairs
    wider               no retrieval, a connector with about the RAG connector's extra params
    shuffled            like tinyalign, but each image gets k bank entries outside its top-k
    untrained-values    a bank whose values come from the same Perceiver, untrained
    top1, top10         tinyalign with k = 1 or 10
    ood-bank            a bank built from ``ood_data`` (other pairs)
    mismatched-encoder  a bank whose keys come from another vision encoder
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from .llm import DEFAULT_PRETRAIN_STEPS, TINY_NAME, TinyLMConfig
from .model import WIDE_PREFIX, build_connector
from .retrieval import SHUFFLED, TOPK

MAIN, UNTRAINED, OOD, MISMATCHED = "main", "untrained", "ood", "mismatched"


@dataclass(frozen=True)
class Arm:
    """One arm: what differs from the baseline (everything else is shared)."""

    name: str
    retrieval: bool
    bank: str | None = None  # which bank (MAIN, UNTRAINED, OOD, MISMATCHED)
    top_k: int | None = None  # None: the study's top_k
    mode: str = TOPK
    wider: bool = False


ARMS: dict[str, Arm] = {
    a.name: a
    for a in (
        Arm("baseline", retrieval=False),
        Arm("tinyalign", retrieval=True, bank=MAIN),
        Arm("wider", retrieval=False, wider=True),
        Arm("shuffled", retrieval=True, bank=MAIN, mode=SHUFFLED),
        Arm("untrained-values", retrieval=True, bank=UNTRAINED),
        Arm("top1", retrieval=True, bank=MAIN, top_k=1),
        Arm("top10", retrieval=True, bank=MAIN, top_k=10),
        Arm("ood-bank", retrieval=True, bank=OOD),
        Arm("mismatched-encoder", retrieval=True, bank=MISMATCHED),
    )
}


@dataclass(frozen=True)
class StudyConfig:
    """One study; saved as study_config.json in its output folder."""

    pretrain_data: str  # LLaVA-Pretrain JSON: stage 1, and the bank
    instruct_data: str  # LLaVA-v1.5 instruction JSON: stage 2 (fractions of it)
    questions: str  # LLaVA eval questions (jsonl)
    answers: str  # question_id, answer (jsonl)
    image_folder: str
    arms: tuple[str, ...] = ("baseline", "tinyalign", "wider", "shuffled")
    fractions: tuple[float, ...] = (0.2, 0.4, 0.6, 0.8, 1.0)
    seeds: tuple[int, ...] = (0, 1, 2)
    vision: str = "tiny"  # vision tower: tiny, hub id or directory
    llm: str = "tiny"  # causal LM: tiny, hub id or directory
    tiny_llm_corpus: str | None = None  # more texts for the tiny LM (lm_corpus.json)
    tiny_llm_steps: int = DEFAULT_PRETRAIN_STEPS
    mismatched_encoder: str | None = None  # default: "tiny" built from another seed
    ood_data: str | None = None  # pairs of another domain for the ood-bank arm
    ood_image_folder: str | None = None
    top_k: int = 5
    perceiver_steps: int = 1500  # bank value compressor
    bank_seed: int = 0
    stage1_steps: int = 250
    stage1_lr: float = 1e-3
    stage2_epochs: float = 1.0  # over each fraction: less data, proportionally fewer steps
    stage2_lr: float = 2e-5
    batch_size: int = 8
    grad_accum: int = 1
    max_length: int = 512
    precision: str = "auto"
    device: str = "auto"
    eval_batch_size: int = 16
    max_new_tokens: int = 16
    workers: int = 0  # DataLoader workers per training run

    def __post_init__(self) -> None:
        unknown = [a for a in self.arms if a not in ARMS]
        if unknown or not self.arms:
            raise ValueError(f"unknown arms {unknown} (choose from {list(ARMS)})")
        if "baseline" not in self.arms:
            raise ValueError("arms must include 'baseline': every arm is compared with it")
        if not self.fractions or not all(0.0 < f <= 1.0 for f in self.fractions):
            raise ValueError(f"fractions must be in (0, 1], got {self.fractions}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct and not empty, got {self.seeds}")
        for name in ("top_k", "stage1_steps", "batch_size", "grad_accum", "max_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("stage1_lr", "stage2_lr", "stage2_epochs"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if "ood-bank" in self.arms and not self.ood_data:
            raise ValueError("the ood-bank arm needs ood_data (pairs of another domain)")
        if "mismatched-encoder" in self.arms and self.vision != TINY_NAME:
            if not self.mismatched_encoder:
                raise ValueError("the mismatched-encoder arm needs mismatched_encoder")

    def arm(self, name: str) -> Arm:
        return ARMS[name]

    def k_of(self, arm: Arm) -> int:
        return arm.top_k or self.top_k

    def banks(self) -> list[str]:
        """The banks the chosen arms need, each built once."""
        return sorted({ARMS[a].bank for a in self.arms if ARMS[a].bank is not None})

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)


def load_config(path: str | Path) -> StudyConfig:
    """A ``StudyConfig`` from flat TOML; relative paths are taken from the file's folder."""
    try:
        import tomllib  # Python 3.11+
    except ImportError:  # pragma: no cover - Python 3.10
        raise ValueError("study config files need Python 3.11 or later (tomllib)") from None
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ValueError(f"cannot read study config {path}: {e}") from e
    known = {f.name: f for f in fields(StudyConfig)}
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise ValueError(f"{path}: unknown keys {unknown} (known: {sorted(known)})")
    paths = ("pretrain_data", "instruct_data", "questions", "answers", "image_folder")
    paths += ("tiny_llm_corpus", "ood_data", "ood_image_folder")
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key in paths and isinstance(value, str):
            value = str((path.parent / value).resolve()) if not Path(value).is_absolute() else value
        if key in ("arms", "fractions", "seeds"):
            value = tuple(value)
        values[key] = value
    return StudyConfig(**values)


def demo_preset(data: Path) -> StudyConfig:
    """The demo study on ``bankd demo-data`` output in ``data``, sized for a 2-core CPU.

    Chosen from measurements on the demo data (the how-to lists them): the tiny LM reads
    its corpus (lm_corpus.json), so instruction words are tokens and answers have the
    right form even at stage 2's default lr 2e-5; what the tiny VLM learns to SEE comes
    slowly, so stage 1 runs 2 epochs of the 2000 pairs at lr 2e-3 (1 epoch at 1e-3 left
    colour and shape at chance in its captions) and stage 2 runs 2 epochs at lr 1e-3
    over the LLM and both connectors (1 epoch left eval answers near chance).
    """
    return StudyConfig(
        pretrain_data=str(data / "data.json"),
        instruct_data=str(data / "instruct.json"),
        questions=str(data / "eval" / "questions.jsonl"),
        answers=str(data / "eval" / "answers_gt.jsonl"),
        image_folder=str(data),
        tiny_llm_corpus=str(data / "lm_corpus.json"),
        arms=("baseline", "tinyalign", "wider", "shuffled"),
        fractions=(0.4, 1.0),
        seeds=(0, 1, 2),
        perceiver_steps=800,
        stage1_steps=500,
        stage1_lr=2e-3,
        stage2_epochs=2.0,
        stage2_lr=1e-3,
        max_length=256,
        max_new_tokens=8,
        eval_batch_size=32,
    )


def llm_width(llm: str) -> int:
    """Hidden size of the LLM (the connectors' output width), without loading weights."""
    if llm == TINY_NAME:
        return TinyLMConfig().hidden_size
    import transformers

    cfg = transformers.AutoConfig.from_pretrained(llm)
    return int(cfg.get_text_config().hidden_size)


def param_count(spec: str, d_in: int, d_out: int) -> int:
    return sum(p.numel() for p in build_connector(spec, d_in, d_out).parameters())


def wider_connector(
    connector: str, rag_connector: str, vision_dim: int, width: int, value_dim: int
) -> tuple[str, int, int]:
    """(spec, added params, RAG connector params): a 2-layer connector whose hidden layer
    is widened so it gains about as many parameters as the RAG connector has (Table 2's
    Wider-Conn). Each extra hidden unit adds vision_dim + 1 + width parameters."""
    rag = param_count(rag_connector, value_dim, width)
    base = param_count(connector, vision_dim, width)
    hidden = width + round(rag / (vision_dim + 1 + width))
    spec = f"{WIDE_PREFIX}{hidden}"
    return spec, param_count(spec, vision_dim, width) - base, rag
