"""The report of ``tinyalign study``: tables with 95% CIs over seeds, plots, data efficiency.

    summary = write_report(config, out, plan)   # reads out/runs/**/result.json

Writes ``report.md`` (the paper's layout: arms x metrics at the full data fraction, mean
± 95% CI over seeds from the t-distribution, and each arm's paired difference from the
baseline, seed by seed, with its CI), ``accuracy_vs_fraction.png`` (Fig. 3),
``loss_curves.png`` (Fig. 2a: stage-1 and stage-2 training loss, mean over seeds with a
band from the lowest to the highest seed), ``results.csv`` (one row per finished run) and
``summary.json``. The data-efficiency line is computed: the smallest fraction at which
TinyAlign's mean accuracy reaches the full-data baseline's. Runs not finished yet are
left out, and the report says how many seeds each number rests on.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .plots import plot_loss_curves, plt
from .study_config import StudyConfig

RESULT = "result.json"

# Two-sided 95% quantiles of Student's t for 1..30 degrees of freedom.
T975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip


def t_quantile(df: int) -> float:
    """t_{0.975, df}; beyond the table, the Cornish-Fisher expansion around 1.96."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if df <= len(T975):
        return T975[df - 1]
    z = 1.959964
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def mean_ci(values: Sequence[float]) -> tuple[float, float]:
    """(mean, half-width of its 95% CI); the half-width is nan for one value."""
    n = len(values)
    if n == 0:
        return math.nan, math.nan
    mean = sum(values) / n
    if n == 1:
        return mean, math.nan
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, t_quantile(n - 1) * sd / math.sqrt(n)


def paired(arm: dict[int, float], base: dict[int, float]) -> tuple[float, float, int]:
    """(mean difference, CI half-width, seeds) of arm - baseline over the seeds both have."""
    seeds = sorted(set(arm) & set(base))
    mean, half = mean_ci([arm[s] - base[s] for s in seeds])
    return mean, half, len(seeds)


def collect(config: StudyConfig, out: Path) -> dict[str, Any]:
    """Finished results: stage2[(arm, fraction, seed)] and stage1[(arm, seed)]."""
    stage1, stage2 = {}, {}
    for arm in config.arms:
        for seed in config.seeds:
            base = out / "runs" / arm / f"seed{seed}"
            if (base / "stage1" / RESULT).is_file():
                stage1[(arm, seed)] = json.loads((base / "stage1" / RESULT).read_text())
            for f in config.fractions:
                path = base / f"frac{f:g}" / RESULT
                if path.is_file():
                    stage2[(arm, f, seed)] = json.loads(path.read_text())
    return {"stage1": stage1, "stage2": stage2}


def metrics_of(result: dict) -> dict[str, float]:
    """Accuracy overall and per category, and the held-out loss, of one stage-2 run."""
    scores = result["scores"]["scores"] if "scores" in result["scores"] else result["scores"]
    row = {"accuracy": float(scores["overall"]["accuracy"])}
    for name, s in sorted(scores.get("by_category", {}).items()):
        row[name] = float(s["accuracy"])
    row["heldout_loss"] = float(result["heldout_loss"])
    return row


def _fmt(mean: float, half: float, digits: int = 3) -> str:
    if math.isnan(mean):
        return "–"
    return f"{mean:.{digits}f}" if math.isnan(half) else f"{mean:.{digits}f} ± {half:.{digits}f}"


def _per_seed(stage2: dict, arm: str, f: float, metric: str) -> dict[int, float]:
    return {s: metrics_of(r)[metric] for (a, ff, s), r in stage2.items() if a == arm and ff == f}


def tables(config: StudyConfig, stage2: dict) -> tuple[str, list[str], dict]:
    """(markdown table at the largest fraction, metric names, numbers behind it)."""
    full = max(config.fractions)
    metrics: list[str] = []
    for r in stage2.values():
        metrics = [m for m in metrics_of(r) if m not in metrics] + metrics
    metrics = ["accuracy"] + sorted(m for m in metrics if m not in ("accuracy", "heldout_loss"))
    metrics.append("heldout_loss")
    head = "| arm | seeds | " + " | ".join(metrics) + " | Δ accuracy vs baseline (paired) |"
    lines = [head, "|" + "---|" * (len(metrics) + 3)]
    numbers: dict[str, Any] = {}
    base_acc = _per_seed(stage2, "baseline", full, "accuracy")
    for arm in config.arms:
        per = {m: _per_seed(stage2, arm, full, m) for m in metrics}
        if not per["accuracy"]:
            continue
        cells = [_fmt(*mean_ci(list(per[m].values()))) for m in metrics]
        d_mean, d_half, n = paired(per["accuracy"], base_acc)
        delta = "–" if arm == "baseline" or n == 0 else f"{_fmt(d_mean, d_half)} (n={n})"
        lines.append(f"| {arm} | {len(per['accuracy'])} | " + " | ".join(cells) + f" | {delta} |")
        numbers[arm] = {
            m: dict(zip(("mean", "ci95"), mean_ci(list(per[m].values())), strict=True))
            for m in metrics
        }
        numbers[arm]["paired_accuracy_diff"] = {"mean": d_mean, "ci95": d_half, "seeds": n}
    return "\n".join(lines), metrics, numbers


def fraction_table(config: StudyConfig, stage2: dict) -> tuple[str, dict]:
    """Mean accuracy ± CI per arm and fraction (the numbers of Fig. 3)."""
    fr = sorted(config.fractions)
    lines = ["| arm | " + " | ".join(f"{f:g}" for f in fr) + " |", "|" + "---|" * (len(fr) + 1)]
    curve: dict[str, dict[float, tuple[float, float]]] = {}
    for arm in config.arms:
        curve[arm] = {f: mean_ci(list(_per_seed(stage2, arm, f, "accuracy").values())) for f in fr}
        lines.append(f"| {arm} | " + " | ".join(_fmt(*curve[arm][f]) for f in fr) + " |")
    return "\n".join(lines), curve


def versus_tinyalign(config: StudyConfig, stage2: dict) -> tuple[str, dict]:
    """TinyAlign minus each other arm, seed by seed, per fraction: does it beat the controls?"""
    fr = sorted(config.fractions)
    lines = [
        "| tinyalign − arm | " + " | ".join(f"{f:g}" for f in fr) + " |",
        "|" + "---|" * (len(fr) + 1),
    ]
    numbers: dict[str, dict[str, Any]] = {}
    if "tinyalign" not in config.arms:
        return "", numbers
    for arm in config.arms:
        if arm == "tinyalign":
            continue
        cells, numbers[arm] = [], {}
        for f in fr:
            mean, half, n = paired(
                _per_seed(stage2, "tinyalign", f, "accuracy"), _per_seed(stage2, arm, f, "accuracy")
            )
            numbers[arm][f"{f:g}"] = {"mean": mean, "ci95": half, "seeds": n}
            cells.append("–" if n == 0 else f"{_fmt(mean, half)} (n={n})")
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return "\n".join(lines), numbers


def data_efficiency(config: StudyConfig, curve: dict) -> str:
    """The smallest fraction where TinyAlign's mean accuracy reaches the full baseline's."""
    full = max(config.fractions)
    if "tinyalign" not in curve or math.isnan(curve["baseline"][full][0]):
        return "data efficiency: not computed (needs baseline at the full fraction and tinyalign)"
    target = curve["baseline"][full][0]
    reached = [f for f in sorted(curve["tinyalign"]) if curve["tinyalign"][f][0] >= target]
    if not reached:
        best = max(
            curve["tinyalign"].values(), key=lambda m: -math.inf if math.isnan(m[0]) else m[0]
        )
        return (
            f"data efficiency: TinyAlign does not reach the full-data baseline's accuracy "
            f"({target:.3f}) at any fraction tried (its best mean is {best[0]:.3f})"
        )
    f = reached[0]
    return (
        f"data efficiency: TinyAlign reaches the full-data ({full:g}) baseline's mean accuracy "
        f"{target:.3f} with {100 * f:g}% of the instruction data "
        f"(mean {curve['tinyalign'][f][0]:.3f})"
    )


def plot_study_losses(config: StudyConfig, stage1: dict, stage2: dict, path: Path) -> None:
    """Fig. 2a: stage-1 and full-fraction stage-2 training loss per arm, seed bands."""
    full = max(config.fractions)
    one = {a: [r["losses"] for (x, _), r in sorted(stage1.items()) if x == a] for a in config.arms}
    two = {
        a: [r["losses"] for (x, f, _), r in sorted(stage2.items()) if x == a and f == full]
        for a in config.arms
    }
    panels = {
        "stage 1 (pretraining pairs)": one,
        f"stage 2 (fraction {full:g} of the instructions)": two,
    }
    plot_loss_curves(panels, path, "training loss: mean over seeds, band = lowest to highest")


def plot_accuracy(config: StudyConfig, curve: dict, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    for arm, points in curve.items():
        fr = [f for f in sorted(points) if not math.isnan(points[f][0])]
        if not fr:
            continue
        mean = [points[f][0] for f in fr]
        half = [0.0 if math.isnan(points[f][1]) else points[f][1] for f in fr]
        (line,) = ax.plot(fr, mean, marker="o", label=arm)
        lo = [m - h for m, h in zip(mean, half, strict=True)]
        hi = [m + h for m, h in zip(mean, half, strict=True)]
        ax.fill_between(fr, lo, hi, color=line.get_color(), alpha=0.15, linewidth=0)
    ax.set(xlabel="fraction of the instruction data", ylabel="eval accuracy")
    ax.set_title("accuracy vs data fraction (mean, 95% CI over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(config: StudyConfig, out: str | Path, plan: dict) -> dict[str, Any]:
    """Write report.md, the plots, results.csv and summary.json; the summary."""
    out = Path(out)
    found = collect(config, out)
    stage1, stage2 = found["stage1"], found["stage2"]
    table, metrics, numbers = tables(config, stage2)
    ftable, curve = fraction_table(config, stage2)
    efficiency = data_efficiency(config, curve)
    vs_table, vs_numbers = versus_tinyalign(config, stage2)
    plot_accuracy(config, curve, out / "accuracy_vs_fraction.png")
    if stage1:
        plot_study_losses(config, stage1, stage2, out / "loss_curves.png")
    with (out / "results.csv").open("w") as f:
        f.write("arm,fraction,seed,steps," + ",".join(metrics) + "\n")
        for (arm, fr, seed), r in sorted(stage2.items()):
            m = metrics_of(r)
            f.write(
                f"{arm},{fr:g},{seed},{r['steps']},"
                + ",".join(f"{m.get(k, math.nan):.6f}" for k in metrics)
                + "\n"
            )
    planned = len(config.arms) * len(config.seeds) * len(config.fractions)
    wider = ""
    if plan.get("wider_spec"):
        wider = (
            f"`wider` connector `{plan['wider_spec']}`: +{plan['wider_added_params']:,} "
            f"parameters; TinyAlign's RAG connector: {plan['rag_connector_params']:,}.\n"
        )
    fractions = ", ".join(f"{f:g}" for f in sorted(config.fractions))
    seeds = ", ".join(map(str, config.seeds))
    report = f"""# TinyAlign study

{len(stage2)} of {planned} stage-2 runs finished (arms {", ".join(config.arms)};
fractions {fractions}; seeds {seeds}).
Metrics: eval accuracy (overall and per category, scored as VQAv2 / POPE / ScienceQA score
them) and the held-out loss of the gold answers; mean ± 95% CI over seeds (t-distribution);
Δ = arm − baseline, seed by seed, mean ± 95% CI.

## At the full instruction data ({max(config.fractions):g})

{table}

## Accuracy by fraction of the instruction data

{ftable}

{efficiency}

## TinyAlign against each arm (accuracy difference, paired by seed, mean ± 95% CI)

{vs_table}

{wider}
![accuracy vs fraction](accuracy_vs_fraction.png)
![loss curves](loss_curves.png)

Settings: `study_config.json`; per-run numbers: `results.csv`.
"""
    (out / "report.md").write_text(report)
    summary = {
        "finished_stage2_runs": len(stage2),
        "planned_stage2_runs": planned,
        "table": table,
        "fraction_table": ftable,
        "data_efficiency": efficiency,
        "versus_tinyalign": vs_table,
        "numbers": numbers,
        "tinyalign_minus_arm": vs_numbers,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary
