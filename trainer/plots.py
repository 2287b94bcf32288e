"""Loss curves with seed bands (matplotlib), shared by ``tinyalign experiment`` and ``study``.

    plot_loss_curves({"baseline": [[...seed 0...], [...seed 1...]], "tinyalign": [...]},
                     "loss_curves.png", title="stage-1 training loss")

Each run is drawn as the mean over its seeds, smoothed over about 4% of the steps
(per-step losses are noisy), with a band from the lowest to the highest seed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display is needed or wanted
import matplotlib.pyplot as plt  # noqa: E402


def smooth(values: Sequence[float], window: int) -> list[float]:
    """Centred moving average; the window shrinks at the ends."""
    h = window // 2
    return [
        sum(values[max(0, i - h) : i + h + 1]) / len(values[max(0, i - h) : i + h + 1])
        for i in range(len(values))
    ]


def loss_band(ax: Any, curves: Sequence[Sequence[float]], label: str) -> None:
    """Mean of ``curves`` (one per seed, cut to the shortest) and its lowest-highest band."""
    n = min((len(c) for c in curves), default=0)
    if n == 0:
        return
    cols = [[c[i] for c in curves] for i in range(n)]
    window = max(1, n // 25)
    mean = smooth([sum(c) / len(c) for c in cols], window)
    steps = range(1, n + 1)
    (line,) = ax.plot(steps, mean, label=f"{label} (seeds: {len(curves)})", linewidth=2)
    if len(curves) > 1:
        lo, hi = smooth([min(c) for c in cols], window), smooth([max(c) for c in cols], window)
        ax.fill_between(steps, lo, hi, color=line.get_color(), alpha=0.2, linewidth=0)


def plot_loss_curves(
    panels: Mapping[str, Mapping[str, Sequence[Sequence[float]]]], path: str | Path, title: str
) -> Path:
    """One panel per key of ``panels`` ({panel title: {run: curves per seed}}); a PNG."""
    panels = {k: {n: c for n, c in v.items() if c} for k, v in panels.items()}
    if not any(panels.values()):
        raise ValueError("no curve to plot")
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, (panel, runs) in zip(axes[0], panels.items(), strict=True):
        for name, curves in runs.items():
            loss_band(ax, curves, name)
        ax.set(title=panel, xlabel="optimizer step", ylabel="training loss")
        ax.grid(alpha=0.3)
        if runs:
            ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
