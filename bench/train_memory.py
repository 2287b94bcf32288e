"""Peak memory and samples/s of TinyAlign training steps per memory option, at the paper's
model sizes, with random weights built from configs written out here (no downloads).

    python bench/train_memory.py                                   # GPU: all LLMs, so400m
    python bench/train_memory.py --llm qwen2-0.5b --batch-size 8 --steps 10
    python bench/train_memory.py --llm tiny --vision tiny --device cpu --steps 2   # CPU-sized

For each LLM and each option (stage 1; stage 2 full; stage 2 with gradient checkpointing;
stage 2 LoRA; stage 2 LoRA with checkpointing) a child process builds the VLM the way
``tinyalign`` does (``memory.llm_weight_dtype``, ``apply_stage``, ``apply_memory``), runs
``--steps`` optimizer steps on random tokens, pixels and retrieved values (the search
itself is not measured: bench/train_step.py does that), and prints one JSON row:
peak memory (GPU: ``torch.cuda.max_memory_allocated``; CPU: the process's peak resident
set, which includes the interpreter and libraries) and samples/s after a warm-up step.
A separate process per row makes every peak its own. Options that need more memory than
the device has are reported as ``"oom"``. bench/README.md holds measured figures.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import transformers

# Written out from the released checkpoints' config.json files (random weights here).
LLM_CONFIGS: dict[str, tuple[type, dict[str, Any]]] = {
    "qwen2-0.5b": (
        transformers.Qwen2Config,
        dict(
            vocab_size=151936,
            hidden_size=896,
            intermediate_size=4864,
            num_hidden_layers=24,
            num_attention_heads=14,
            num_key_value_heads=2,
            max_position_embeddings=32768,
            rope_theta=1_000_000.0,
            rms_norm_eps=1e-6,
            tie_word_embeddings=True,
        ),
    ),
    "tinyllama-1.1b": (
        transformers.LlamaConfig,
        dict(
            vocab_size=32000,
            hidden_size=2048,
            intermediate_size=5632,
            num_hidden_layers=22,
            num_attention_heads=32,
            num_key_value_heads=4,
            max_position_embeddings=2048,
            rms_norm_eps=1e-5,
        ),
    ),
    "phi-2": (
        transformers.PhiConfig,
        dict(
            vocab_size=51200,
            hidden_size=2560,
            intermediate_size=10240,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=32,
            max_position_embeddings=2048,
            partial_rotary_factor=0.4,
            layer_norm_eps=1e-5,
            resid_pdrop=0.1,
        ),
    ),
    "tiny": (
        transformers.Qwen2Config,
        dict(
            vocab_size=512,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=1024,
        ),
    ),
}
VISION_CONFIGS: dict[str, dict[str, Any]] = {
    "siglip-so400m": dict(  # google/siglip-so400m-patch14-384's vision tower
        hidden_size=1152,
        intermediate_size=4304,
        num_hidden_layers=27,
        num_attention_heads=16,
        image_size=384,
        patch_size=14,
    ),
    "tiny": dict(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        image_size=64,
        patch_size=8,
    ),
}
# option -> (stage, gradient checkpointing, LoRA)
OPTIONS: dict[str, tuple[int, bool, bool]] = {
    "stage1": (1, False, False),
    "stage1+ckpt": (1, True, False),
    "stage2": (2, False, False),
    "stage2+ckpt": (2, True, False),
    "stage2+lora": (2, False, True),
    "stage2+lora+ckpt": (2, True, True),
}
TEXT_TOKENS = 128  # caption / instruction tokens per sample
TOP_K = 5


def build(llm: str, vision: str, option: str, precision: str, device: torch.device):
    """The TinyAlign VLM the trainer would build for this option, random weights."""
    from bankd.models.encoders import DualEncoder, build_tiny_image_processor
    from tinyalign.components import apply_stage
    from tinyalign.lora import LoraSettings
    from tinyalign.memory import MemoryConfig, apply_memory, llm_weight_dtype
    from tinyalign.model import TinyAlignConfig, TinyAlignVLM

    stage, ckpt, lora = OPTIONS[option]
    torch.manual_seed(0)
    tower = transformers.SiglipVisionModel(
        transformers.SiglipVisionConfig(**VISION_CONFIGS[vision])
    )
    encoder = DualEncoder(tower, None, build_tiny_image_processor(), vision)
    cls, fields = LLM_CONFIGS[llm]
    dtype = llm_weight_dtype(precision, stage, lora)
    lm = transformers.AutoModelForCausalLM.from_config(cls(**fields), dtype=dtype)
    model = TinyAlignVLM(TinyAlignConfig(top_k=TOP_K), encoder, lm)
    apply_stage(model, stage)
    memory = MemoryConfig(ckpt, LoraSettings(r=64, alpha=16) if lora else None)
    apply_memory(model, memory, stage=stage, precision=precision)
    return model.to(device)


def run_one(args: argparse.Namespace) -> dict[str, Any]:
    from tinyalign.conversation import IMAGE_PLACEHOLDER_ID
    from tinyalign.pipeline import autocast

    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    model = build(args.llm, args.vision, args.option, args.precision, device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    vc = VISION_CONFIGS[args.vision]
    b, vocab = args.batch_size, LLM_CONFIGS[args.llm][1]["vocab_size"]
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (b, TEXT_TOKENS), generator=gen)
    ids[:, 1] = IMAGE_PLACEHOLDER_ID
    batch = {
        "input_ids": ids.to(device),
        "attention_mask": torch.ones_like(ids).to(device),
        "labels": ids.clamp(min=0).to(device),
        "image_rows": torch.arange(b, device=device),
        "retrieved": torch.randn(b, TOP_K, 32, 96, generator=gen).half().to(device),
    }
    pixels = torch.randn(b, 3, vc["image_size"], vc["image_size"], generator=gen).to(device)
    times = []
    for _ in range(args.steps + 1):  # the first step warms up (allocator, kernels)
        t0 = time.perf_counter()
        with autocast(args.precision, device):
            feats = model.image_features(pixels, precision=args.precision)
            loss = model(**batch, features=feats).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    steady = times[1:] or times
    return {
        "llm": args.llm,
        "vision": args.vision,
        "option": args.option,
        "precision": args.precision,
        "batch_size": b,
        "trainable": sum(p.numel() for p in params),
        "peak_gib": round(peak / 2**30, 3),
        "samples_per_s": round(b * len(steady) / sum(steady), 2),
        "loss": round(loss.item(), 4),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--llm", nargs="+", default=["qwen2-0.5b", "tinyllama-1.1b", "phi-2"])
    p.add_argument("--vision", default="siglip-so400m", choices=sorted(VISION_CONFIGS))
    p.add_argument("--option", nargs="+", default=list(OPTIONS), choices=list(OPTIONS))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", default=None, help="bf16 on CUDA, fp32 on the CPU")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # a child's row
    args = p.parse_args(argv)
    unknown = [n for n in args.llm if n not in LLM_CONFIGS]
    if unknown:
        p.error(f"unknown --llm {unknown} (choose from {sorted(LLM_CONFIGS)})")
    if args.precision is None:
        args.precision = "bf16" if args.device.startswith("cuda") else "fp32"
    if args.one:
        args.llm, args.option = args.llm[0], args.option[0]
        print(json.dumps(run_one(args)), flush=True)
        return 0
    for llm in args.llm:
        for option in args.option:
            cmd = [sys.executable, str(Path(__file__).resolve()), "--one", "--llm", llm]
            cmd += ["--option", option, "--vision", args.vision, "--device", args.device]
            cmd += ["--precision", args.precision, "--batch-size", str(args.batch_size)]
            cmd += ["--steps", str(args.steps)]
            child = subprocess.run(cmd, capture_output=True, text=True)
            rows = [line for line in child.stdout.splitlines() if line.startswith("{")]
            if child.returncode == 0 and rows:
                print(rows[-1], flush=True)
                continue
            oom = "out of memory" in child.stderr.lower()
            tail = child.stderr.strip().splitlines()[-1:] or ["?"]
            print(json.dumps({"llm": llm, "option": option, "error": "oom" if oom else tail[0]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
