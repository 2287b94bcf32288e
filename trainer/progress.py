"""What a training run reports as it goes: a tqdm bar, a periodic log line, ``metrics.csv``.

``metrics.csv`` in the run directory has one row per optimizer step::

    step,loss,lr,samples_per_s,retrieval_wait_ms

``loss`` is the step's mean over micro-batches and ranks, ``samples_per_s`` counts
every rank's samples, ``retrieval_wait_ms`` is the time a micro-batch waited for its
prefetched search (near 0 when retrieval hides behind compute). A resumed run keeps
the rows up to the step it resumed from. Only rank 0 writes, logs and shows the bar.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

from tqdm import tqdm

log = logging.getLogger(__name__)

METRICS_FIELDS = ("step", "loss", "lr", "samples_per_s", "retrieval_wait_ms")


class ProgressLog:
    """Per-step metrics to the bar, the CSV and (every ``log_every`` steps) the log."""

    def __init__(
        self,
        out: Path,
        *,
        start_step: int,
        stop_step: int,
        total_steps: int,
        samples_per_step: int,
        log_every: int,
        enabled: bool,
        bar: bool,
        desc: str,
    ) -> None:
        self.total, self.stop = total_steps, stop_step
        self.samples_per_step, self.log_every = samples_per_step, log_every
        self.window: list[tuple[float, float, float]] = []  # (loss, seconds, wait ms)
        self.file = None
        self.bar = tqdm(
            total=stop_step, initial=start_step, desc=desc, unit="step", disable=not bar
        )
        if not enabled:
            return
        path = out / "metrics.csv"
        rows = []
        if start_step and path.is_file():
            with path.open() as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= start_step]
        self.file = path.open("w", newline="")
        self.writer = csv.DictWriter(self.file, fieldnames=METRICS_FIELDS)
        self.writer.writeheader()
        self.writer.writerows(rows)

    def step(self, step: int, loss: float, lr: float, seconds: float, wait_ms: float) -> None:
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{loss:.4f}", wait_ms=f"{wait_ms:.1f}")
        if self.file is not None:
            row = (
                step,
                f"{loss:.6f}",
                f"{lr:.6e}",
                f"{self.samples_per_step / seconds:.2f}",
                f"{wait_ms:.2f}",
            )
            self.writer.writerow(dict(zip(METRICS_FIELDS, row, strict=True)))
            self.file.flush()
        self.window.append((loss, seconds, wait_ms))
        if step % self.log_every == 0 or step == self.stop:
            n = len(self.window)
            log.info(
                "step %d/%d  loss %.4f  lr %.2e  %.1f samples/s  retrieval wait %.1f ms",
                step,
                self.total,
                sum(w[0] for w in self.window) / n,
                lr,
                self.samples_per_step * n / sum(w[1] for w in self.window),
                sum(w[2] for w in self.window) / n,
            )
            self.window.clear()

    def close(self) -> None:
        self.bar.close()
        if self.file is not None:
            self.file.close()
            self.file = None
