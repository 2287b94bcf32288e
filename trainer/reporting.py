"""Experiment trackers for training runs: TensorBoard, wandb, or none (``--report-to``).

    reporter = open_reporter("auto", out, hparams=asdict(config), enabled=env.is_main)
    reporter.scalars(step, {"train/loss": 2.3, "train/lr": 1e-3})
    reporter.close({"final/loss": 1.9})

``auto`` (the default) is TensorBoard when it is installed, else none; ``tensorboard``
and ``wandb`` insist (ImportError naming the package when it is missing); several are
joined with commas. TensorBoard writes event files under ``<out>/tensorboard``; wandb
runs in the project ``$WANDB_PROJECT`` (default ``tinyalign``) under ``<out>``, and
follows ``$WANDB_MODE`` (``offline`` needs no account: the tests use it).

What a run logs (the same names in every tracker): ``train/loss``, ``train/lr``,
``train/grad_norm`` (before clipping), ``train/samples_per_s`` (all ranks),
``train/retrieval_wait_ms``, ``eval/loss`` (held-out), and the resolved configuration as
hyperparameters (TensorBoard: a ``config`` text and an hparams entry with the final
loss). Only rank 0 reports; the others get a reporter that does nothing. metrics.csv
(``progress.py``) is written in every case.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from pathlib import Path
from typing import Any, Protocol

log = logging.getLogger(__name__)

REPORT_TO = ("auto", "tensorboard", "wandb", "none")


class Reporter(Protocol):
    def scalars(self, step: int, values: dict[str, float]) -> None: ...

    def close(self, final: dict[str, float] | None = None) -> None: ...


class _Nothing:
    def scalars(self, step: int, values: dict[str, float]) -> None:
        pass

    def close(self, final: dict[str, float] | None = None) -> None:
        pass


def _scalar_hparams(hparams: dict[str, Any]) -> dict[str, Any]:
    """What TensorBoard's hparams accept: numbers, strings and bools (None as a string)."""
    out = {}
    for k, v in hparams.items():
        out[k] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out


class TensorBoardReporter:
    """Event files under ``<out>/tensorboard`` (torch's SummaryWriter)."""

    def __init__(self, out: Path, hparams: dict[str, Any]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.directory = out / "tensorboard"
        self.writer = SummaryWriter(log_dir=str(self.directory))
        self.hparams = _scalar_hparams(hparams)
        self.writer.add_text("config", f"```\n{json.dumps(hparams, indent=1, default=str)}\n```")

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def close(self, final: dict[str, float] | None = None) -> None:
        if final:
            self.writer.add_hparams(self.hparams, final, run_name=".")
        self.writer.close()


class WandbReporter:
    """A wandb run with the config as its hyperparameters."""

    def __init__(self, out: Path, hparams: dict[str, Any]) -> None:
        import wandb

        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "tinyalign"),
            dir=str(out),
            config=hparams,
            name=out.name,
            reinit="finish_previous",
        )

    def scalars(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def close(self, final: dict[str, float] | None = None) -> None:
        if final:
            self.run.summary.update(final)
        self.run.finish()


class _Several:
    def __init__(self, reporters: list[Reporter]) -> None:
        self.reporters = reporters

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for r in self.reporters:
            r.scalars(step, values)

    def close(self, final: dict[str, float] | None = None) -> None:
        for r in self.reporters:
            r.close(final)


def resolve_report_to(report_to: str) -> list[str]:
    """The trackers ``--report-to`` names (``auto`` resolved); ValueError if unknown."""
    names = [n.strip() for n in report_to.split(",") if n.strip()]
    unknown = [n for n in names if n not in REPORT_TO]
    if unknown or not names:
        raise ValueError(f"unknown --report-to {report_to!r} (choose from {', '.join(REPORT_TO)})")
    if "none" in names:
        if len(names) > 1:
            raise ValueError(f"--report-to {report_to!r}: 'none' cannot be combined")
        return []
    if "auto" in names:
        names.remove("auto")
        if importlib.util.find_spec("tensorboard") is not None and "tensorboard" not in names:
            names.insert(0, "tensorboard")
    return names


def open_reporter(
    report_to: str, out: Path, *, hparams: dict[str, Any], enabled: bool = True
) -> Reporter:
    """The run's reporter (rank 0); a do-nothing one elsewhere or for ``none``."""
    names = resolve_report_to(report_to)
    if not enabled or not names:
        return _Nothing()
    makers = {"tensorboard": TensorBoardReporter, "wandb": WandbReporter}
    reporters = []
    for name in names:
        package = "tensorboard" if name == "tensorboard" else "wandb"
        if importlib.util.find_spec(package) is None:
            raise ImportError(f"--report-to {name} needs the {package} package (pip install it)")
        reporters.append(makers[name](out, hparams))
    log.info("reporting to %s", ", ".join(names))
    return reporters[0] if len(reporters) == 1 else _Several(reporters)
