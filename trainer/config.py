"""``TrainConfig``: everything one training run takes, resolved once and saved with the run.

``resolve_config`` fills what a stage decides (template, learning rate) and, for
``finetune --from runs/stage1``, what the stage-1 model decides (vision tower, LLM,
retrieval, top-k); the resolved config is logged and written to ``train_config.json``.
``connect_retriever`` opens the bank, waits for it up to ``bank_patience`` seconds and
checks its encoder fingerprint against the VLM's vision tower.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from bankd_client import Bank, errors
from bankd_client.credentials import connection_options

from .components import read_config
from .conversation import get_template
from .llm import DEFAULT_PRETRAIN_STEPS, TINY_CORPUS_FILE, TINY_NAME
from .lora import LoraSettings, parse_targets
from .memory import MemoryConfig
from .model import TinyAlignConfig, build_connector
from .reporting import resolve_report_to
from .retrieval import TOPK, RetrievalUnavailable, Retriever, check_mode, open_bank

log = logging.getLogger(__name__)

STAGE_DEFAULTS = {1: {"lr": 1e-3, "template": "plain"}, 2: {"lr": 2e-5, "template": "vicuna"}}


@dataclass(frozen=True)
class TrainConfig:
    """One training run (``tinyalign pretrain`` = stage 1, ``tinyalign finetune`` = stage 2).

    ``None`` means "decided by the stage or by ``init_from``" (see ``resolve_config``).
    """

    data: str
    out: str
    stage: int = 1
    image_folder: str | None = None  # default: the data file's folder
    bank: str | None = None  # "host:port" or a bank .faiss path (in-process)
    retrieval: bool | None = None  # False: the baseline, no RAG connector, no bank
    vision: str | None = None  # "tiny", a hub id or a directory
    vision_seed: int = 0  # construction seed of the "tiny" vision tower
    llm: str | None = None  # "tiny", a hub id or a directory
    init_from: str | None = None  # a stage-1 model directory (finetune --from)
    connector: str = "mlp2x_gelu"
    rag_connector: str = "mlp2x_gelu"
    feature_layer: int = -2
    top_k: int | None = None  # default 5
    retrieval_mode: str | None = None  # "topk" (default) or "shuffled" (a control)
    allow_encoder_mismatch: bool = False
    template: str | None = None  # plain (stage 1) / vicuna (stage 2)
    batch_size: int = 8  # per rank, per micro-batch
    grad_accum: int = 1
    steps: int | None = None  # optimizer steps; default: epochs
    epochs: float | None = None  # default 1 when steps is not set
    lr: float | None = None  # 1e-3 (stage 1) / 2e-5 (stage 2)
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    max_length: int = 512
    data_fraction: float = 1.0
    seed: int = 0
    workers: int = 2
    device: str = "auto"
    precision: str = "auto"  # auto: bf16 autocast on CUDA, fp32 on the CPU
    save_every: int = 0  # checkpoint every N steps (0: only at the end)
    keep_checkpoints: int = 2
    resume: bool = False
    stop_after: int | None = None  # exit after this step (a checkpoint); --resume later
    log_every: int = 10
    bank_patience: float = 300.0  # seconds to wait for an unreachable bank
    # TLS and token of a remote bank (file paths, never their contents; docs/operations.md)
    bank_tls: bool = False  # TLS with the system's root CAs
    bank_tls_ca: str | None = None  # CA that signed the server's certificate
    bank_tls_cert: str | None = None  # client certificate (mutual TLS)
    bank_tls_key: str | None = None
    bank_tls_server_name: str | None = None
    bank_auth_token_file: str | None = None
    bank_lb_policy: str | None = None  # "round_robin": spread calls over bank replicas
    eval_data: str | None = None
    eval_every: int = 0
    eval_batch_size: int | None = None
    tiny_llm_steps: int = DEFAULT_PRETRAIN_STEPS  # pretraining of the "tiny" LLM (cached)
    # JSON list of more texts the "tiny" LLM is built from (stage 1); default: the
    # lm_corpus.json of `bankd demo-data` next to `data`, when there is one.
    tiny_llm_corpus: str | None = None
    progress: bool = True
    strict: bool = False  # a malformed sample stops the run (default: skipped and counted)
    report_to: str = "auto"  # tensorboard (auto: when installed), wandb, none; comma-joined
    # Memory (trainer/memory.py states the weight-precision policy)
    gradient_checkpointing: bool = False
    lora: bool = False  # stage 2: LoRA adapters on the LLM instead of training all of it
    lora_r: int = 64
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    lora_target_modules: str = "all-linear"  # or comma-separated names: q_proj,v_proj
    lora_merge: bool = False  # fold the adapters into the saved LLM
    fsdp: bool = False  # shard the trained weights over torchrun ranks (trainer/fsdp.py)

    def __post_init__(self) -> None:
        if self.stage not in STAGE_DEFAULTS:
            raise ValueError(f"stage must be 1 or 2, got {self.stage}")
        positive = ("batch_size", "grad_accum", "max_length", "log_every", "tiny_llm_steps")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("steps", "epochs", "lr", "top_k", "stop_after", "eval_batch_size"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        if self.steps is not None and self.epochs is not None:
            raise ValueError("give steps or epochs, not both")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if not 0.0 < self.data_fraction <= 1.0:
            raise ValueError(f"data_fraction must be in (0, 1], got {self.data_fraction}")
        for name in ("workers", "save_every", "keep_checkpoints", "eval_every", "bank_patience"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        resolve_report_to(self.report_to)  # validates
        if self.lora:
            if self.stage != 2:
                raise ValueError("--lora adapts the LLM in stage 2 (finetune); stage 1 freezes it")
            self.lora_settings()  # validates
        elif self.lora_merge:
            raise ValueError("--lora-merge needs --lora")
        if self.fsdp:
            refused = {"lora": self.lora, "resume": self.resume, "eval_data": self.eval_data}
            given = [f"--{k.replace('_', '-')}" for k, v in refused.items() if v]
            if given:
                raise ValueError(f"--fsdp does not combine with {', '.join(given)} yet")
        if self.stage == 2 and self.init_from is None:
            raise ValueError("stage 2 (finetune) starts from a stage-1 model: pass --from DIR")

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    def lora_settings(self) -> LoraSettings | None:
        if not self.lora:
            return None
        return LoraSettings(
            r=self.lora_r,
            alpha=self.lora_alpha,
            dropout=self.lora_dropout,
            target_modules=parse_targets(self.lora_target_modules),
            merge=self.lora_merge,
        )

    def memory(self) -> MemoryConfig:
        return MemoryConfig(self.gradient_checkpointing, self.lora_settings())


def resolve_config(config: TrainConfig) -> TrainConfig:
    """Fill the ``None`` fields; ValueError for missing files or conflicting settings."""
    for name in ("data", "eval_data"):
        path = getattr(config, name)
        if path is not None and not Path(path).is_file():
            raise FileNotFoundError(f"--{name.replace('_', '-')} {path} not found")
    folder = config.image_folder or str(Path(config.data).parent)
    if not Path(folder).is_dir():
        raise FileNotFoundError(f"--image-folder {folder} not found")
    fill: dict[str, Any] = {"image_folder": folder}
    if config.init_from is not None:
        base = read_config(config.init_from)
        given = {"vision": config.vision, "llm": config.llm, "retrieval": config.retrieval}
        for name, value in given.items():
            if value is not None and value != getattr(base, name):
                raise ValueError(
                    f"--from {config.init_from} has {name}={getattr(base, name)!r}, "
                    f"not {value!r}; a stage-2 model keeps its stage-1 components"
                )
        fill.update(
            vision=base.vision,
            vision_seed=base.vision_seed,
            llm=base.llm,
            retrieval=base.retrieval,
            feature_layer=base.feature_layer,
            connector=base.connector,
            rag_connector=base.rag_connector,
        )
        fill["top_k"] = config.top_k or base.top_k
        fill["retrieval_mode"] = config.retrieval_mode or base.retrieval_mode
    else:
        corpus = config.tiny_llm_corpus
        default_corpus = Path(config.data).parent / TINY_CORPUS_FILE
        if corpus is None and (config.llm or TINY_NAME) == TINY_NAME and default_corpus.is_file():
            corpus = str(default_corpus)
        if corpus is not None and not Path(corpus).is_file():
            raise FileNotFoundError(f"--tiny-llm-corpus {corpus} not found")
        fill["tiny_llm_corpus"] = corpus
        fill.update(
            vision=config.vision or "tiny",
            llm=config.llm or "tiny",
            retrieval=config.retrieval is not False,
            top_k=config.top_k or 5,
            retrieval_mode=config.retrieval_mode or TOPK,
        )
    defaults = STAGE_DEFAULTS[config.stage]
    fill["template"] = config.template or defaults["template"]
    fill["lr"] = config.lr or defaults["lr"]
    if config.steps is None:
        fill["epochs"] = config.epochs or 1.0
    resolved = replace(config, **fill)
    get_template(resolved.template)  # ValueError if unknown
    check_mode(resolved.retrieval_mode)
    for spec in (resolved.connector, resolved.rag_connector):
        build_connector(spec, 1, 1)  # ValueError if unknown
    return resolved


def model_config(config: TrainConfig) -> TinyAlignConfig:
    """The ``TinyAlignConfig`` a resolved training config asks for."""
    extra: dict[str, Any] = {}
    if config.init_from is not None:
        extra = dict(read_config(config.init_from).extra)
    return TinyAlignConfig(
        vision=config.vision,
        vision_seed=config.vision_seed,
        llm=config.llm,
        connector=config.connector,
        rag_connector=config.rag_connector,
        retrieval=bool(config.retrieval),
        top_k=config.top_k,
        retrieval_mode=config.retrieval_mode or TOPK,
        feature_layer=config.feature_layer,
        template=config.template,
        extra=extra,
    )


def open_checked_bank(target: str, patience_s: float, **client_options: Any) -> Bank:
    """Open a bank by address or index path; wait up to ``patience_s`` for a server.

    ``client_options`` (TLS, token: ``connection_options``) go to ``BankClient``."""
    if target.endswith(".faiss") and not Path(target).is_file():
        raise FileNotFoundError(f"bank index {target} not found")
    bank = open_bank(target, **client_options)
    try:
        bank.wait_ready(timeout=patience_s)
    except errors.Unavailable as e:
        bank.close()
        raise RetrievalUnavailable(
            f"the memory bank at {target} is unreachable ({e}) after waiting "
            f"{patience_s:.0f} s (--bank-patience); is `bankd serve` running there?"
        ) from None
    return bank


def connect_retriever(
    config: TrainConfig, vision: Any, model: TinyAlignConfig, bank: Bank | None = None
) -> Retriever | None:
    """The run's retriever for a model with this config and vision tower (DualEncoder).

    None without retrieval: no bank is contacted. Raises ``EncoderMismatch`` when the
    bank's keys come from another encoder, unless ``allow_encoder_mismatch``. A ``bank``
    given here is the caller's: used, never closed.
    """
    if not model.retrieval:
        return None
    if bank is None and not config.bank:
        raise ValueError("this model uses retrieval: pass --bank HOST:PORT (or --no-retrieval)")
    owned = bank is None
    if bank is None:
        options = connection_options(config, prefix="bank_")
        bank = open_checked_bank(config.bank, config.bank_patience, **options)
    try:
        return Retriever.from_bank(
            bank,
            vision,
            model.top_k,
            feature_layer=model.feature_layer,
            allow_encoder_mismatch=config.allow_encoder_mismatch,
            retry_for_s=config.bank_patience,
            owns_bank=owned,
            value_shape=model.value_shape,
            mode=model.retrieval_mode,
            seed=config.seed,
        )
    except Exception:
        if owned:
            bank.close()
        raise
