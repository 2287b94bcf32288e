"""bench/train_memory.py: its real-size configs are the released models' sizes, and its
CPU-sized variant measures a row per option."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
import transformers

SIZES = {"qwen2-0.5b": 494e6, "tinyllama-1.1b": 1.10e9, "phi-2": 2.78e9}


@pytest.mark.parametrize("name", sorted(SIZES))
def test_real_size_llm_configs(load_bench: Any, name: str) -> None:
    bench = load_bench("train_memory")
    cls, fields = bench.LLM_CONFIGS[name]
    with torch.device("meta"):  # shapes only: no memory, no download
        model = transformers.AutoModelForCausalLM.from_config(cls(**fields))
    n = sum(p.numel() for p in model.parameters())
    assert n == pytest.approx(SIZES[name], rel=0.02)


def test_so400m_vision_config(load_bench: Any) -> None:
    bench = load_bench("train_memory")
    config = transformers.SiglipVisionConfig(**bench.VISION_CONFIGS["siglip-so400m"])
    with torch.device("meta"):
        n = sum(p.numel() for p in transformers.SiglipVisionModel(config).parameters())
    assert n == pytest.approx(428e6, rel=0.02)


def test_cpu_sized_rows(load_bench: Any, capsys: pytest.CaptureFixture) -> None:
    bench = load_bench("train_memory")
    rows = {}
    for option in ("stage1", "stage2", "stage2+lora+ckpt"):
        argv = ["--one", "--llm", "tiny", "--vision", "tiny", "--device", "cpu"]
        assert bench.main([*argv, "--option", option, "--steps", "1", "--batch-size", "2"]) == 0
        rows[option] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for row in rows.values():
        assert row["peak_gib"] > 0 and row["samples_per_s"] > 0
    trainable = {k: r["trainable"] for k, r in rows.items()}
    assert trainable["stage1"] < trainable["stage2+lora+ckpt"] < trainable["stage2"]
