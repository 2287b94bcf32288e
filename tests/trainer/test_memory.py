"""Memory options on CPU: weights in the training precision, gradient checkpointing,
LoRA (only adapters train; merged equals adapted; an unmerged save loads back)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from tinyalign.components import load_vlm
from tinyalign.config import TrainConfig
from tinyalign.lora import LoraSettings, add_lora, merge_lora, parse_targets
from tinyalign.memory import llm_weight_dtype
from tinyalign.train import train


def test_weight_dtype_policy() -> None:
    assert llm_weight_dtype("bf16", stage=1, lora=False) == torch.bfloat16  # frozen
    assert llm_weight_dtype("fp16", stage=2, lora=True) == torch.float16  # frozen base
    assert llm_weight_dtype("bf16", stage=2, lora=False) == torch.float32  # trained: masters
    assert llm_weight_dtype("fp32", stage=1, lora=False) == torch.float32


def test_stage1_in_bf16_holds_the_llm_in_bf16(make_config: Any) -> None:
    result = train(make_config(precision="bf16", steps=2))
    model = result.model
    assert {p.dtype for p in model.llm.parameters()} == {torch.bfloat16}
    for name in ("connector", "rag_connector", "vision"):  # trained, or the key path
        assert {p.dtype for p in getattr(model, name).parameters()} == {torch.float32}
    assert all(torch.isfinite(torch.tensor(result.losses)))


def test_gradient_checkpointing_gives_the_same_losses(make_config: Any, tmp_path: Path) -> None:
    plain = train(make_config(out=str(tmp_path / "plain"), steps=3))
    ckpt = train(make_config(out=str(tmp_path / "ckpt"), steps=3, gradient_checkpointing=True))
    llm = ckpt.model.llm
    assert getattr(llm, "is_activation_checkpointing", None) or llm.is_gradient_checkpointing
    torch.testing.assert_close(
        torch.tensor(ckpt.losses), torch.tensor(plain.losses), rtol=1e-5, atol=1e-6
    )


def _finetune(make_config: Any, stage1: Path, out: Path, **kw: Any) -> TrainConfig:
    return make_config(
        stage=2, init_from=str(stage1), out=str(out), steps=2, lr=1e-2, max_length=256, **kw
    )


def test_lora_trains_only_adapters_and_merged_equals_adapted(
    make_config: Any, stage1: Path, tmp_path: Path
) -> None:
    before = load_vlm(stage1, "cpu", progress=False).model
    base = {k: v.clone() for k, v in before.llm.state_dict().items()}
    result = train(
        _finetune(make_config, stage1, tmp_path / "lora", lora=True, lora_r=4, lora_alpha=8)
    )
    llm = result.model.llm
    names = {n for n, p in llm.named_parameters() if p.requires_grad}
    assert names and all("lora_" in n for n in names)
    for n, p in llm.named_parameters():  # base weights unchanged, adapters moved
        if "lora_" not in n:
            key = n.removeprefix("base_model.model.").replace(".base_layer", "")
            torch.testing.assert_close(p, base[key], rtol=0, atol=0)
    assert any(p.abs().sum() > 0 for n, p in llm.named_parameters() if "lora_B" in n)

    ids = torch.randint(3, 50, (2, 12), generator=torch.Generator().manual_seed(0))
    llm.eval()
    with torch.no_grad():
        adapted = llm(input_ids=ids).logits
        merge_lora(result.model)
        merged = result.model.llm(input_ids=ids).logits
    assert not hasattr(result.model.llm, "peft_config")
    torch.testing.assert_close(merged, adapted, rtol=1e-4, atol=1e-4)

    # The unmerged save is adapters on the recorded base: it loads back as trained.
    reloaded = load_vlm(tmp_path / "lora", "cpu", progress=False).model
    with torch.no_grad():
        torch.testing.assert_close(
            reloaded.llm(input_ids=ids).logits, adapted, rtol=1e-4, atol=1e-4
        )


def test_lora_merge_saves_an_ordinary_llm(make_config: Any, stage1: Path, tmp_path: Path) -> None:
    out = tmp_path / "merged"
    train(_finetune(make_config, stage1, out, lora=True, lora_r=2, lora_merge=True))
    assert (out / "llm" / "config.json").is_file()
    assert not (out / "llm" / "adapter_config.json").exists()
    assert not hasattr(load_vlm(out, "cpu", progress=False).model.llm, "peft_config")


def test_lora_settings_are_checked(make_config: Any, stage1: Path) -> None:
    with pytest.raises(ValueError, match="stage 2"):
        make_config(lora=True)
    with pytest.raises(ValueError, match="rank"):
        make_config(stage=2, init_from=str(stage1), lora=True, lora_r=0)
    with pytest.raises(ValueError, match="needs --lora"):
        make_config(stage=2, init_from=str(stage1), lora_merge=True)
    assert parse_targets("q_proj, v_proj") == ("q_proj", "v_proj")
    assert LoraSettings(target_modules=("q_proj",)).target_modules == ("q_proj",)


def test_add_lora_on_named_modules_only(make_config: Any, stage1: Path) -> None:
    model = load_vlm(stage1, "cpu", progress=False).model
    add_lora(model, LoraSettings(r=2, target_modules=("q_proj",)))
    adapted = {n.split(".lora_")[0] for n, _ in model.llm.named_parameters() if "lora_A" in n}
    assert adapted and all(n.endswith("q_proj") for n in adapted)
