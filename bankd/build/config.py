"""``bankd build``'s configuration and flags, importable without torch.

``bankd.cli`` builds its parser from here so that ``bankd serve``, ``info`` and
``query`` start without loading torch; the build itself (and ``run``, the command's
entry point) is ``bankd.build.pipeline``.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import asdict, dataclass
from pathlib import Path

_FLAG_FIELDS = ("data", "image_folder", "out", "encoder", "seed", "entries", "batch_size")
_FLAG_FIELDS += ("workers", "device", "perceiver_steps", "perceiver_lr", "text_weight")
_FLAG_FIELDS += ("key_precision",)


@dataclass(frozen=True)
class BuildConfig:
    """Everything that decides the bank; logged at start and saved in its manifest."""

    data: Path
    image_folder: Path
    out: Path  # index path, e.g. bank/bank.faiss; the other files go next to it
    encoder: str = "tiny"
    seed: int = 0
    entries: int | None = None  # a seeded sample of this many pairs; None = all
    index_factory: str = "auto"  # FAISS factory string, or "auto" (bankd.search.tuning)
    memory_budget: str = "8GiB"  # what the index may take in memory ("auto" chooses by it)
    recall_target: float | None = 0.95  # efSearch / nprobe tuned to reach this recall@k
    recall_k: int = 5
    ef_construction: int | None = None  # HNSW build depth; None: FAISS's (40)
    batch_size: int = 64  # encoder batch
    # DataLoader workers decoding images (0: in the main process); None: sized to the
    # machine by ``resolve_workers``
    workers: int | None = None
    device: str = "auto"  # cuda when available
    perceiver_steps: int = 1500  # values keep improving to 3000 (docs/format.md)
    perceiver_lr: float = 1e-3
    perceiver_batch_size: int = 32
    perceiver_train_samples: int = 50_000  # seeded subset the compressor trains on
    max_text_tokens: int = 96  # caption tokens fed to the compressor (capped by the encoder)
    text_weight: float = 0.0  # weight of the question-text component of keys
    key_temperature: float = 1.0
    # Precision of the towers' key features, recorded in the bank so that query sides
    # follow it; auto: bf16 on CUDA, fp32 on the CPU.
    key_precision: str = "auto"
    eval_fraction: float = 0.1  # pairs kept out of compressor training, for the report
    feature_cache_mb: int = 2048  # cache frozen features in memory up to this size
    threads: int | None = None  # torch CPU threads; None = cores minus max(1, workers)
    progress: bool = True
    strict: bool = False  # a malformed sample stops the build (default: skipped, counted)
    keep_shards: bool = False  # under torchrun: rank r writes <out stem>-<r>-of-<W>.faiss

    def __post_init__(self) -> None:
        lowest = {"entries": 1, "batch_size": 1, "workers": 0, "perceiver_steps": 0, "threads": 1}
        lowest |= {"perceiver_batch_size": 1, "perceiver_train_samples": 1}
        lowest |= {"max_text_tokens": 1, "feature_cache_mb": 0}
        for name, low in lowest.items():
            value = getattr(self, name)
            if value is not None and value < low:
                raise ValueError(f"{name} must be >= {low}, got {value}")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError(f"eval_fraction must be in [0, 1), got {self.eval_fraction}")
        if self.recall_target is not None and not 0 < self.recall_target <= 1:
            raise ValueError(f"recall_target must be in (0, 1], got {self.recall_target}")
        if self.recall_k < 1:
            raise ValueError(f"recall_k must be >= 1, got {self.recall_k}")
        if self.ef_construction is not None and self.ef_construction < 1:
            raise ValueError(f"ef_construction must be >= 1, got {self.ef_construction}")
        from bankd.search.tuning import parse_bytes  # faiss only once a build is configured

        parse_bytes(self.memory_budget)  # validates
        if not self.perceiver_lr > 0:
            raise ValueError(f"perceiver_lr must be > 0, got {self.perceiver_lr}")
        from bankd.models.keys import KeyConfig  # torch: only once a build is configured

        KeyConfig(temperature=self.key_temperature, text_weight=self.text_weight)  # validates
        if self.key_precision not in ("auto", "fp32", "bf16", "fp16"):
            raise ValueError(
                f"key_precision must be auto, fp32, bf16 or fp16, got {self.key_precision!r}"
            )

    def to_dict(self) -> dict:
        return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items()}


def add_index_arguments(
    parser: argparse.ArgumentParser, names: tuple[str, ...] = ("--index-type",)
) -> None:
    """The index flags ``bankd build`` and ``bankd import`` share (defaults: BuildConfig's):
    --index-type (or ``names``), --memory-budget, --recall-target, --recall-k,
    --ef-construction."""
    add = parser.add_argument
    add(
        *names,
        dest="index_type",
        default=BuildConfig.index_factory,
        help="FAISS factory string (Flat, HNSW32, IVF1024,Flat, IVF4096,PQ64) or 'auto': "
        "chosen by entries, key dim and --memory-budget",
    )
    add(
        "--memory-budget",
        default=BuildConfig.memory_budget,
        help="index memory for auto (8GiB, 512MB)",
    )
    add(
        "--recall-target",
        type=float,
        default=BuildConfig.recall_target,
        help="tune efSearch / nprobe to this recall@k against exact search, for any "
        "approximate index type (0: keep FAISS's defaults, e.g. HNSW efSearch 16)",
    )
    add("--recall-k", type=int, default=BuildConfig.recall_k, help="the k of the recall target")
    add(
        "--ef-construction",
        type=int,
        default=None,
        help="HNSW build depth (candidates per insertion; FAISS's default 40): a deeper "
        "build gives a better graph, so a lower efSearch reaches the recall target, at "
        "a longer build; HNSW indexes only (also an IVF index's HNSW quantizer)",
    )


def resolve_workers(workers: int | None, device_type: str, processes: int = 1) -> int:
    """Image-decoding workers: as given, else sized to this process's share of the cores.

    On a GPU the tower outruns any one decoder, so decoding gets every core but two (the
    main process feeding the GPU and one spare), at most 16; on the CPU decoding and the
    towers share the cores, and 2 workers with the rest as torch threads measured best.
    """
    if workers is not None:
        return workers
    if device_type == "cuda":
        cores = (os.cpu_count() or 1) // max(1, processes)
        return max(2, min(16, cores - 2))
    return 2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``bankd build``."""
    d = {k: f.default for k, f in BuildConfig.__dataclass_fields__.items()}
    add = parser.add_argument
    add("--data", type=Path, required=True, help="LLaVA-format JSON")
    add("--image-folder", type=Path, required=True, help="folder image paths are relative to")
    add("--out", type=Path, required=True, help="index path, e.g. bank/bank.faiss")
    add("--encoder", default=d["encoder"], help="'tiny', a model directory or a SigLIP/CLIP hub id")
    add("--seed", type=int, default=d["seed"])
    add("--entries", type=int, default=None, help="a seeded sample of this many pairs (all)")
    add_index_arguments(parser)
    add("--batch-size", type=int, default=d["batch_size"], help="encoder batch size")
    add(
        "--workers",
        type=int,
        default=d["workers"],
        help="image-decoding workers (0: inline; default: sized to the machine, up to 16 on a "
        "GPU, 2 on the CPU)",
    )
    add("--device", default=d["device"], help="auto (cuda when available), cpu, cuda, cuda:1")
    add("--threads", type=int, default=None, help="torch CPU threads (cores left by workers)")
    add("--perceiver-steps", type=int, default=d["perceiver_steps"])
    add("--perceiver-lr", type=float, default=d["perceiver_lr"])
    add(
        "--text-weight",
        type=float,
        default=d["text_weight"],
        help="weight of the question text in keys, 0..1 (0: image only)",
    )
    add(
        "--key-precision",
        default=d["key_precision"],
        choices=("auto", "fp32", "bf16", "fp16"),
        help="precision the towers compute key features in, recorded in the bank; trainers "
        "follow it (auto: bf16 on CUDA, fp32 on the CPU)",
    )
    add(
        "--strict",
        action="store_true",
        help="stop at the first malformed sample (default: skip, count and name the first few)",
    )
    add("--no-progress", action="store_true", help="no progress bars")
    add(
        "--keep-shards",
        action="store_true",
        help="under torchrun (W processes): each rank writes its part of the bank as a shard, "
        "<out stem>-<r>-of-<W>.faiss next to --out, the layout of `bankd shard` (one bankd "
        "serve each); default: rank 0 writes one bank at --out",
    )
    add(
        "--restart",
        action="store_true",
        help="discard the checkpoints of an interrupted build of this --out and start over "
        "(default: resume when the config and data match, refuse when they do not)",
    )


def from_args(args: argparse.Namespace) -> BuildConfig:
    """The BuildConfig of parsed ``bankd build`` flags; bad values raise ValueError."""
    same_name = (*_FLAG_FIELDS, "threads")
    return BuildConfig(
        **{f: getattr(args, f) for f in same_name},
        index_factory=args.index_type,
        memory_budget=args.memory_budget,
        recall_target=args.recall_target or None,
        recall_k=args.recall_k,
        ef_construction=args.ef_construction,
        progress=not args.no_progress,
        keep_shards=args.keep_shards,
        strict=args.strict,
    )
