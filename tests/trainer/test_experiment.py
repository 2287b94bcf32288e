"""``tinyalign experiment``: a tiny end-to-end comparison against a real `bankd serve`
subprocess (outputs, reductions from the recorded losses, no leftover server), the run
plan's same-epochs rule, bank reuse, and the Pillow plot."""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from tinyalign import experiment
from tinyalign.experiment import (
    ExperimentConfig,
    add_arguments,
    ensure_bank,
    final_loss,
    plan_runs,
    reduction,
    run,
)


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


@pytest.fixture
def keep_threads():
    threads = torch.get_num_threads()  # `run` sets 1 thread on the CPU, for the whole process
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_tiny_experiment_end_to_end(demo: Any, tmp_path: Path, monkeypatch, keep_threads) -> None:
    servers: list[experiment.BankServerProcess] = []

    class Recorded(experiment.BankServerProcess):
        def start(self):
            servers.append(self)
            return super().start()

    monkeypatch.setattr(experiment, "BankServerProcess", Recorded)
    out = tmp_path / "exp"
    args = parse(
        "--data",
        str(demo.data),
        "--image-folder",
        str(demo.images),
        "--out",
        str(out),
        "--steps",
        "6",
        "--batch-size",
        "4",
        "--max-length",
        "64",
        "--fractions",
        "0.5,1",
        "--perceiver-steps",
        "2",
        "--tiny-llm-steps",
        str(demo.tiny_llm_steps),
        "--workers",
        "0",
        "--no-progress",
    )
    assert run(args) == 0

    # the real server was started once, over gRPC on loopback, and is gone now
    assert len(servers) == 1 and servers[0].address.startswith("127.0.0.1:")
    assert servers[0].proc.poll() is not None

    with (out / "loss_curves.csv").open() as f:
        rows = list(csv.DictReader(f))
    losses: dict[str, list[float]] = {}
    for r in rows:
        losses.setdefault(r["run"], []).append(float(r["loss"]))
        assert int(r["step"]) == len(losses[r["run"]])
    # same epochs: 32 samples train for half the steps of 64
    assert {k: len(v) for k, v in losses.items()} == {
        "baseline": 6,
        "tinyalign": 6,
        "baseline-0.5": 3,
        "tinyalign-0.5": 3,
    }

    summary = json.loads((out / "summary.json").read_text())
    assert summary["bank"]["built_now"] and summary["eval_data"] == str(demo.heldout)
    main = summary["comparisons"][0]
    assert main["runs"] == ["baseline", "tinyalign"] and main["steps"] == 6
    b, t = final_loss(losses["baseline"]), final_loss(losses["tinyalign"])
    assert main["final_loss"]["baseline"] == pytest.approx(b, abs=1e-5)
    assert main["final_loss"]["tinyalign"] == pytest.approx(t, abs=1e-5)
    assert main["final_loss"]["reduction"] == pytest.approx((b - t) / b, abs=1e-5)
    held = main["heldout_loss"]
    assert held["baseline"] > 0 and held["tinyalign"] > 0
    assert held["reduction"] == pytest.approx(reduction(held["baseline"], held["tinyalign"]))
    (eff,) = summary["data_efficiency"]
    assert eff["runs"] == ["baseline", "tinyalign-0.5"] and eff["epochs"] == pytest.approx(0.375)
    runs = summary["runs"]
    assert eff["heldout_loss"]["reduction"] == pytest.approx(
        reduction(runs["baseline"]["heldout_loss"], runs["tinyalign-0.5"]["heldout_loss"])
    )
    assert runs["tinyalign-0.5"]["samples"] == 32
    assert any(line.startswith("stage-1 loss at step 6: baseline") for line in summary["lines"])
    for phase in ("bank build", "bank server start"):
        assert phase in summary["timings_s"]

    with Image.open(out / "loss_curves.png") as im:
        assert im.format == "PNG" and im.size[0] > 300

    # A second experiment on the same data reuses the bank instead of building it again.
    config = ExperimentConfig(data=str(demo.data), out=str(out), perceiver_steps=2, workers=0)
    assert ensure_bank(config, demo.images, out / "bank") == (out / "bank" / "bank.faiss", False)
    # ... and rebuilds it when a build setting changed.
    builds: list[Any] = []
    monkeypatch.setattr(
        "bankd.build.pipeline.build_bank", lambda config, **_: builds.append(config)
    )
    changed = ExperimentConfig(data=str(demo.data), out=str(out), perceiver_steps=3, workers=0)
    assert ensure_bank(changed, demo.images, out / "bank")[1] is True
    assert [b.perceiver_steps for b in builds] == [3]


def test_plan_runs_keeps_epochs_equal() -> None:
    config = ExperimentConfig(data="d.json", out="o", steps=250, fractions=(1.0, 0.4))
    runs = plan_runs(config, 2000)
    assert [(r.name, r.retrieval, r.steps, r.samples) for r in runs] == [
        ("baseline", False, 250, 2000),
        ("tinyalign", True, 250, 2000),
        ("baseline-0.4", False, 100, 800),
        ("tinyalign-0.4", True, 100, 800),
    ]
    with pytest.raises(ValueError, match="fewer than the batch size"):
        plan_runs(ExperimentConfig(data="d.json", out="o", fractions=(0.001, 1.0)), 2000)
    with pytest.raises(ValueError, match="fractions"):
        ExperimentConfig(data="d.json", out="o", fractions=(1.5,))


def test_final_loss_is_the_mean_of_the_last_tenth() -> None:
    assert final_loss([9.0] * 90 + [1.0] * 10) == 1.0
    assert final_loss([3.0, 2.0]) == 2.0  # at least one step
    assert reduction(2.0, 1.5) == pytest.approx(0.25)


def test_missing_data_exits_2(tmp_path: Path, capsys, keep_threads) -> None:
    args = parse("--data", str(tmp_path / "none.json"), "--out", str(tmp_path / "exp"))
    assert run(args) == 2
    assert "tinyalign experiment: error" in capsys.readouterr().err


def test_plot_draws_mean_curves_and_seed_bands(tmp_path: Path) -> None:
    from tinyalign.plots import plot_loss_curves

    seeds = [[2.0 - 0.01 * i + 0.02 * s for i in range(100)] for s in range(3)]
    path = plot_loss_curves(
        {"stage 1": {"baseline": seeds, "tinyalign": [[1.8 - 0.012 * i for i in range(100)]]}},
        tmp_path / "p.png",
        title="test",
    )
    with Image.open(path) as im:
        rgb = im.convert("RGB")
    colours = {c for _, c in rgb.getcolors(maxcolors=1 << 20)}
    assert (31, 119, 180) in colours and (255, 127, 14) in colours  # matplotlib's C0, C1
    with pytest.raises(ValueError):
        plot_loss_curves({"stage 1": {}}, tmp_path / "empty.png", title="none")


def test_seeds_are_distinct() -> None:
    assert ExperimentConfig(data="d", out="o", seeds=(0, 1)).run_seeds == (0, 1)
    assert ExperimentConfig(data="d", out="o", seed=4).run_seeds == (4,)
    with pytest.raises(ValueError, match="distinct"):
        ExperimentConfig(data="d", out="o", seeds=(1, 1))


def test_numbers_are_means_over_seeds() -> None:
    per_seed = {
        0: {"final_loss": 1.0, "last_step_loss": 1.1, "heldout_loss": 2.0, "losses": [3.0, 1.0]},
        1: {"final_loss": 3.0, "last_step_loss": 2.9, "heldout_loss": 4.0, "losses": [5.0, 3.0]},
    }
    for r in per_seed.values():
        r["seconds"] = 1.0
    mean = experiment._mean_over_seeds(per_seed)
    assert mean["final_loss"] == 2.0 and mean["heldout_loss"] == 3.0
    assert mean["losses"] == [4.0, 2.0] and set(mean["seeds"]) == {0, 1}
    assert "losses" not in mean["seeds"][0]
