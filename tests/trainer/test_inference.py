"""Generation: batched, with and without retrieval, from a loaded model or a directory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from bankd.search.local import LocalBank
from tinyalign.cli import main
from tinyalign.components import load_vlm, save_model
from tinyalign.inference import generate
from tinyalign.train import train

PROMPT = "What is in the image?"


def inputs(demo: Any) -> tuple[list, list[str]]:
    """Two image paths, a PIL image and a text-only prompt, in one batch."""
    img = demo.images / "images"
    with Image.open(img / "00003.png") as im:
        pil = im.convert("RGB")
    return [img / "00001.png", str(img / "00002.png"), pil, None], [PROMPT, PROMPT, "Colour?", "Hi"]


def test_generate_with_retrieval_batched(demo: Any, stage1: Path, bank_server: Any) -> None:
    images, prompts = inputs(demo)
    vlm = load_vlm(stage1)
    local = generate(vlm, images, prompts, bank=str(demo.bank), max_new_tokens=6, batch_size=3)
    assert len(local) == 4 and all(isinstance(a, str) for a in local)
    remote = generate(vlm, images, prompts, bank=f"127.0.0.1:{bank_server.port}", max_new_tokens=6)
    assert remote == local  # the same bank in process and over gRPC
    # one at a time gives the same answers as the batch (left padding is masked)
    single = [
        generate(vlm, [i], [p], bank=str(demo.bank), max_new_tokens=6)[0]
        for i, p in zip(images, prompts, strict=True)
    ]
    assert single == local


def test_generate_without_retrieval(demo: Any, make_config: Any, stage1: Path) -> None:
    baseline = train(make_config(retrieval=False, bank=None, steps=1)).out
    images, prompts = inputs(demo)
    answers = generate(str(baseline), images, prompts, max_new_tokens=6)  # no bank needed
    assert len(answers) == 4 and all(isinstance(a, str) for a in answers)
    with pytest.raises(ValueError, match="trained with retrieval"):
        generate(str(stage1), images, prompts)  # a retrieval model without a bank
    with pytest.raises(ValueError, match="4 images but 1 prompts"):
        generate(str(baseline), images, prompts[:1])
    with pytest.raises(FileNotFoundError, match="not a TinyAlign model directory"):
        generate(str(demo.images), images, prompts)


@torch.no_grad()
@pytest.mark.parametrize("save_llm", [False, True], ids=["stage1-dir", "stage2-dir"])
def test_saved_and_reloaded_model_generates_the_same(
    demo: Any, stage1: Path, tmp_path: Path, save_llm: bool
) -> None:
    vlm = load_vlm(stage1)
    g = torch.Generator().manual_seed(0)
    # move every trained part away from what is on disk, so reloading must read it back
    parts = ("connector", "rag_connector", "llm") if save_llm else ("connector", "rag_connector")
    for name in parts:
        for p in getattr(vlm.model, name).parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    images, prompts = inputs(demo)
    bank = LocalBank(demo.bank)
    before = generate(vlm, images, prompts, bank=bank, max_new_tokens=8)
    save_model(vlm.model, vlm.tokenizer, tmp_path / "model", save_llm=save_llm)
    after = generate(str(tmp_path / "model"), images, prompts, bank=bank, max_new_tokens=8)
    assert after == before
    reloaded = load_vlm(tmp_path / "model").model
    for name in parts:
        for k, v in getattr(vlm.model, name).state_dict().items():
            assert torch.equal(v, getattr(reloaded, name).state_dict()[k]), f"{name}.{k}"


def test_cli_generate_prints_answers(demo: Any, stage1: Path, capsys: Any) -> None:
    img = demo.images / "images"
    code = main(
        [
            "generate",
            "--model",
            str(stage1),
            "--bank",
            str(demo.bank),
            "--image",
            str(img / "00001.png"),
            str(img / "00002.png"),
            "--prompt",
            PROMPT,
            "--max-new-tokens",
            "4",
        ]
    )
    assert code == 0
    assert len(capsys.readouterr().out.splitlines()) == 2
    code = main(
        [
            "generate",
            "--model",
            str(stage1),
            "--bank",
            str(demo.bank),
            "--image",
            str(img / "nope.png"),
            "--prompt",
            PROMPT,
        ]
    )
    assert code == 2 and "nope.png not found" in capsys.readouterr().err
