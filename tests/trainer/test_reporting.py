"""--report-to: TensorBoard event files hold the logged scalars and the config; wandb
runs offline; the choice is checked."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tinyalign.reporting import resolve_report_to
from tinyalign.train import train

SCALARS = (
    "train/loss",
    "train/lr",
    "train/grad_norm",
    "train/samples_per_s",
    "train/retrieval_wait_ms",
    "eval/loss",
)


def test_tensorboard_event_files_hold_the_scalars(demo: Any, make_config: Any) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = train(make_config(steps=2, report_to="tensorboard", eval_data=str(demo.heldout)))
    events = EventAccumulator(str(result.out / "tensorboard"))
    events.Reload()
    assert set(SCALARS) <= set(events.Tags()["scalars"])
    losses = [e.value for e in events.Scalars("train/loss")]
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2]
    assert losses == pytest.approx(result.losses, rel=1e-6)
    assert events.Scalars("eval/loss")[-1].value == pytest.approx(result.eval_loss, rel=1e-6)
    assert all(e.value > 0 for e in events.Scalars("train/grad_norm"))
    assert "config/text_summary" in events.Tags()["tensors"]


def test_wandb_offline_run(make_config: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    result = train(make_config(steps=1, report_to="wandb"))
    runs = list((Path(result.out) / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))


def test_report_to_is_checked() -> None:
    assert resolve_report_to("none") == []
    assert resolve_report_to("wandb,tensorboard") == ["wandb", "tensorboard"]
    with pytest.raises(ValueError, match="unknown --report-to"):
        resolve_report_to("mlflow")
    with pytest.raises(ValueError, match="cannot be combined"):
        resolve_report_to("none,wandb")


def test_eval_scores_go_next_to_the_training_curves(
    demo: Any, stage1: Path, eval_set: tuple[Path, Path], tmp_path: Path
) -> None:
    pytest.importorskip("tensorboard")
    import shutil

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from tinyalign.evaluate import EvalConfig, run_eval

    model = Path(shutil.copytree(stage1, tmp_path / "model"))
    shutil.rmtree(model / "tensorboard", ignore_errors=True)
    summary = run_eval(
        EvalConfig(
            model=str(model),
            questions=str(eval_set[0]),
            image_folder=str(demo.images),
            answers_file=str(tmp_path / "answers.jsonl"),
            gold=str(eval_set[1]),
            bank=str(demo.bank),
            max_new_tokens=3,
            device="cpu",
            report_to="tensorboard",
        ),
        progress=False,
    )
    events = EventAccumulator(str(model / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert "eval/overall/count" in tags and any(t.startswith("eval/yesno/pope/") for t in tags)
    count = events.Scalars("eval/overall/count")[-1]
    assert count.value == summary["scores"]["overall"]["count"] and count.step == 3
