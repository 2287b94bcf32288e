"""--fsdp: a full stage 2 sharded over 2 Gloo processes on the CPU trains as DDP does
(the same losses), holds half of each layer per rank and saves a whole model."""

from __future__ import annotations

import json
import os
import socket
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp

from tinyalign.components import load_vlm
from tinyalign.config import TrainConfig


def _rank_main(rank: int, port: int, config: TrainConfig, report: str) -> None:
    from tinyalign.fsdp import is_sharded
    from tinyalign.train import train

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2")
    os.environ.update(LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    result = train(config)
    layer = next(p for n, p in result.model.llm.named_parameters() if "layers.0.mlp" in n)
    local = layer.to_local() if hasattr(layer, "to_local") else layer
    Path(f"{report}.{rank}").write_text(
        json.dumps(
            {
                "losses": result.losses,
                "sharded": is_sharded(result.model),
                "local": local.numel(),
                "full": layer.numel(),
            }
        )
    )


def _spawn(config: TrainConfig, report: Path) -> list[dict[str, Any]]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank_main, args=(port, config, str(report)), nprocs=2, join=True)
    return [json.loads(Path(f"{report}.{r}").read_text()) for r in range(2)]


@pytest.mark.slow
def test_fsdp_stage2_trains_as_ddp_does(make_config: Any, stage1: Path, tmp_path: Path) -> None:
    base = make_config(
        stage=2, init_from=str(stage1), steps=2, max_length=256, batch_size=2, lr=1e-3
    )
    ddp = _spawn(replace(base, out=str(tmp_path / "ddp")), tmp_path / "ddp.json")
    fsdp = _spawn(replace(base, out=str(tmp_path / "fsdp"), fsdp=True), tmp_path / "fsdp.json")
    assert fsdp[0]["losses"] == fsdp[1]["losses"]  # the mean over ranks, on every rank
    torch.testing.assert_close(
        torch.tensor(fsdp[0]["losses"]), torch.tensor(ddp[0]["losses"]), rtol=1e-4, atol=1e-5
    )
    assert all(r["sharded"] and r["local"] * 2 == r["full"] for r in fsdp)
    saved = load_vlm(tmp_path / "fsdp", "cpu", progress=False).model
    for name in ("connector", "llm"):
        trained = dict(getattr(saved, name).named_parameters())
        assert trained and all(not hasattr(p, "to_local") for p in trained.values())


def test_fsdp_refuses_what_it_cannot_do(make_config: Any, stage1: Path) -> None:
    with pytest.raises(ValueError, match="--lora"):
        make_config(stage=2, init_from=str(stage1), fsdp=True, lora=True)
    with pytest.raises(ValueError, match="--resume"):
        make_config(fsdp=True, resume=True)
