"""The ``tinyalign`` command: pretrain (stage 1), finetune (stage 2), generate, eval.

CPU::

    tinyalign pretrain --data data/shapes/data.json --image-folder data/shapes \\
        --bank localhost:50051 --vision tiny --llm tiny --out runs/stage1 [--no-retrieval]
    tinyalign finetune --data instruct.json --image-folder data/shapes \\
        --bank localhost:50051 --from runs/stage1 --out runs/stage2 [--data-fraction 0.4]
    tinyalign generate --model runs/stage2 --bank localhost:50051 \\
        --image x.png --prompt "What is in the image?"
    tinyalign eval --model runs/stage2 --bank localhost:50051 --questions q.jsonl \\
        --image-folder data/shapes --answers-file answers.jsonl [--gold answers_gt.jsonl]

Data-parallel (one process per GPU; the same flags)::

    torchrun --nproc_per_node 8 -m tinyalign pretrain ...

A bank behind TLS and a token: ``--bank-tls-ca ca.crt [--bank-tls-cert client.crt
--bank-tls-key client.key] --bank-auth-token-file token.txt`` (docs/operations.md, Security).
Bank replicas behind one name (a Kubernetes headless Service): ``--bank
dns:///bankd-headless.<namespace>.svc.cluster.local:50051 --bank-lb-policy round_robin``.

``python -m tinyalign`` is the same command. Flags fill a ``TrainConfig``; bad arguments,
missing files, an unreachable bank and a mismatched vision encoder end with a one-line
message and exit code 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from bankd_client import errors
from bankd_client.credentials import add_connection_flags, connection_options

from .config import TrainConfig
from .llm import DEFAULT_PRETRAIN_STEPS

EXIT_USAGE = 2


def _training_flags(p: argparse.ArgumentParser, stage: int) -> None:
    p.add_argument("--data", required=True, help="LLaVA-format JSON")
    p.add_argument("--image-folder", help="root of the JSON's image paths (default: its folder)")
    p.add_argument("--bank", help='bankd address "host:port", or a bank .faiss path (in-process)')
    p.add_argument("--out", required=True, help="run directory: model, checkpoints, metrics")
    if stage == 1:
        p.add_argument("--vision", default="tiny", help="vision tower: tiny, hub id or directory")
        p.add_argument("--vision-seed", type=int, default=0, help="seed of the tiny vision tower")
        p.add_argument("--llm", default="tiny", help="causal LM: tiny, hub id or directory")
        p.add_argument(
            "--no-retrieval", action="store_true", help="baseline: no RAG connector, no bank"
        )
        p.add_argument("--connector", default="mlp2x_gelu")
        p.add_argument("--rag-connector", default="mlp2x_gelu")
        p.add_argument("--feature-layer", type=int, default=-2)
    else:
        p.add_argument("--from", dest="init_from", required=True, help="stage-1 run directory")
    p.add_argument("--top-k", type=int, help="retrieved values per image (default 5, or --from's)")
    p.add_argument(
        "--retrieval-mode",
        choices=["topk", "shuffled"],
        help="shuffled: random non-top-k entries, a control (default topk, or --from's)",
    )
    p.add_argument(
        "--allow-encoder-mismatch",
        action="store_true",
        help="train even if the bank was built with another vision encoder",
    )
    p.add_argument(
        "--template",
        choices=["plain", "vicuna"],
        help="chat template (default: plain for pretrain, vicuna for finetune)",
    )
    p.add_argument("--batch-size", type=int, default=8, help="per rank and micro-batch")
    p.add_argument("--grad-accum", type=int, default=1)
    length = p.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, help="optimizer steps")
    length.add_argument("--epochs", type=float, help="passes over the data (default 1)")
    p.add_argument("--lr", type=float, help="default 1e-3 (pretrain) / 2e-5 (finetune)")
    p.add_argument("--warmup-ratio", type=float, default=0.03)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--max-length", type=int, default=512, help="text tokens per sample")
    p.add_argument("--data-fraction", type=float, default=1.0, help="seeded share of the data")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"])
    p.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps")
    p.add_argument("--keep-checkpoints", type=int, default=2)
    p.add_argument("--resume", action="store_true", help="continue from --out's last checkpoint")
    p.add_argument("--stop-after", type=int, help="stop (with a checkpoint) after this step")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument(
        "--bank-patience", type=float, default=300.0, help="seconds to wait for an unreachable bank"
    )
    add_connection_flags(p, prefix="bank-")
    p.add_argument("--eval-data", help="held-out JSON: loss at the end and every --eval-every")
    p.add_argument("--eval-every", type=int, default=0)
    p.add_argument("--eval-batch-size", type=int)
    p.add_argument(
        "--tiny-llm-steps",
        type=int,
        default=DEFAULT_PRETRAIN_STEPS,
        help="pretraining steps of the tiny LLM (cached)",
    )
    if stage == 1:
        p.add_argument(
            "--tiny-llm-corpus",
            help="JSON list of more texts to build the tiny LLM from "
            "(default: lm_corpus.json next to --data, when present)",
        )
    p.add_argument(
        "--report-to",
        default="auto",
        help="tensorboard, wandb or none, comma-joined (auto: tensorboard when installed)",
    )
    p.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="recompute the LLM's layers in backward instead of keeping their activations",
    )
    if stage == 2:
        p.add_argument("--lora", action="store_true", help="LoRA adapters on the LLM (peft)")
        p.add_argument("--lora-r", type=int, default=64, help="LoRA rank")
        p.add_argument("--lora-alpha", type=float, default=16.0, help="LoRA scale numerator")
        p.add_argument("--lora-dropout", type=float, default=0.05)
        p.add_argument(
            "--lora-target-modules",
            default="all-linear",
            help="'all-linear' or comma-separated module names (q_proj,k_proj,v_proj,o_proj)",
        )
        p.add_argument(
            "--lora-merge", action="store_true", help="save the LLM with the adapters folded in"
        )
    p.add_argument(
        "--fsdp",
        action="store_true",
        help="shard weights, gradients and optimizer state over the torchrun ranks (torch FSDP)",
    )
    p.add_argument(
        "--strict",
        action="store_true",
        help="stop at the first malformed sample (default: skip, count and name the first few)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tinyalign", description="Train and run TinyAlign VLMs with a bankd memory bank."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _training_flags(sub.add_parser("pretrain", help="stage 1: train the connectors"), 1)
    _training_flags(sub.add_parser("finetune", help="stage 2: also train the LLM"), 2)
    from . import experiment

    e = sub.add_parser("experiment", help="baseline vs TinyAlign stage 1 on the same data")
    experiment.add_arguments(e)
    from . import evaluate

    v = sub.add_parser("eval", help="answer a LLaVA question file, score it against gold")
    evaluate.add_arguments(v)
    from . import study

    st = sub.add_parser("study", help="the paper's protocol: arms x fractions x seeds, a report")
    study.add_arguments(st)
    g = sub.add_parser("generate", help="answer prompts about images")
    g.add_argument("--model", required=True, help="a pretrain/finetune --out directory")
    g.add_argument("--bank", help='"host:port" or a bank .faiss path (retrieval models)')
    g.add_argument("--image", nargs="+", default=[], help="image file(s); none: text-only")
    g.add_argument("--prompt", nargs="+", required=True, help="one prompt, or one per image")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--top-k", type=int, help="default: the model's")
    g.add_argument("--batch-size", type=int, default=8)
    g.add_argument("--device", default="auto")
    g.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"])
    g.add_argument("--allow-encoder-mismatch", action="store_true")
    g.add_argument("--bank-patience", type=float, default=30.0)
    add_connection_flags(g, prefix="bank-")
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    stage = 1 if args.command == "pretrain" else 2
    shared = {
        name: getattr(args, name)
        for name in (
            "data",
            "image_folder",
            "bank",
            "out",
            "top_k",
            "retrieval_mode",
            "allow_encoder_mismatch",
            "template",
            "batch_size",
            "grad_accum",
            "steps",
            "epochs",
            "lr",
            "warmup_ratio",
            "weight_decay",
            "max_grad_norm",
            "max_length",
            "data_fraction",
            "seed",
            "workers",
            "device",
            "precision",
            "save_every",
            "keep_checkpoints",
            "resume",
            "stop_after",
            "log_every",
            "bank_patience",
            "eval_data",
            "eval_every",
            "eval_batch_size",
            "tiny_llm_steps",
            "bank_tls",
            "bank_tls_ca",
            "bank_tls_cert",
            "bank_tls_key",
            "bank_tls_server_name",
            "bank_auth_token_file",
            "bank_lb_policy",
            "strict",
            "gradient_checkpointing",
            "report_to",
            "fsdp",
        )
    }
    if stage == 1:
        return TrainConfig(
            stage=1,
            vision=args.vision,
            vision_seed=args.vision_seed,
            llm=args.llm,
            retrieval=not args.no_retrieval,
            connector=args.connector,
            rag_connector=args.rag_connector,
            feature_layer=args.feature_layer,
            tiny_llm_corpus=args.tiny_llm_corpus,
            progress=not args.no_progress,
            **shared,
        )
    lora = {
        n: getattr(args, n)
        for n in ("lora", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules")
    }
    return TrainConfig(
        stage=2,
        init_from=args.init_from,
        progress=not args.no_progress,
        lora_merge=args.lora_merge,
        **lora,
        **shared,
    )


def _generate(args: argparse.Namespace) -> int:
    from .inference import generate

    images: list = list(args.image) or [None]
    prompts = list(args.prompt)
    if len(images) == 1 and len(prompts) > 1:
        images = images * len(prompts)
    elif len(prompts) == 1 and len(images) > 1:
        prompts = prompts * len(images)
    answers = generate(
        args.model,
        images,
        prompts,
        bank=args.bank,
        max_new_tokens=args.max_new_tokens,
        top_k=args.top_k,
        device=args.device,
        precision=args.precision,
        batch_size=args.batch_size,
        allow_encoder_mismatch=args.allow_encoder_mismatch,
        bank_patience=args.bank_patience,
        bank_options=connection_options(args, prefix="bank-"),
    )
    for answer in answers:
        print(answer)
    return 0


def _setup_logging() -> None:
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s %(levelname)s [rank {rank}] %(name)s: %(message)s"
        if "WORLD_SIZE" in os.environ
        else "%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # FAISS's loader reports at INFO each CPU-specific build it tries and does not find.
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging()
    try:
        if args.command == "generate":
            return _generate(args)
        if args.command == "eval":
            from . import evaluate

            return evaluate.run(args)
        if args.command == "study":
            from . import study

            return study.run(args)
        if args.command == "experiment":
            from . import experiment

            return experiment.run(args)
        from .train import train

        result = train(config_from_args(args))
        if int(os.environ.get("RANK", "0")) == 0:
            state = "done" if result.completed else "stopped"
            held_out = (
                f", held-out loss {result.eval_loss:.4f}" if result.eval_loss is not None else ""
            )
            print(
                f"{state}: {result.steps} steps, final loss {result.final_loss:.4f}{held_out}; "
                f"model in {result.out}"
            )
        return 0
    except (ValueError, FileNotFoundError, errors.BankError) as e:
        print(f"tinyalign: error: {e}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
