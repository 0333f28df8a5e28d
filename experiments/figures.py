"""The experiments' figures (PNG, written atomically)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless machines: never ask for a display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
import numpy as np  # noqa: E402

from jaxcascade.runtime.outputs import atomic_path  # noqa: E402


def _save(figure, path: Path) -> None:
    with atomic_path(path) as tmp:
        figure.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
    plt.close(figure)


def _grouped_bars(axis, labels: list[str], series: dict[str, list[float]]) -> None:
    width = 0.8 / len(series)
    positions = np.arange(len(labels))
    for k, (name, values) in enumerate(series.items()):
        heights = [np.nan if v is None else v for v in values]
        axis.bar(positions + (k - (len(series) - 1) / 2) * width, heights, width, label=name)
    axis.set_xticks(positions, labels, rotation=45 if len(labels) > 6 else 0)
    axis.legend(fontsize=8)


def per_subject_metrics(rows: list[dict], path: Path, title: str) -> None:
    """Held-out DSC, PPV, TPR and lesion F1 per subject."""
    figure, axis = plt.subplots(figsize=(max(5.0, 0.9 * len(rows) + 2), 3.6))
    _grouped_bars(axis, [r["subject"] for r in rows],
                  {name: [r[key] for r in rows] for key, name in
                   (("dsc", "DSC"), ("ppv", "PPV"), ("tpr", "TPR"), ("lesion_f1", "lesion F1"))})
    axis.set_ylim(0, 1.05)
    axis.set_ylabel("held-out score")
    axis.set_title(title)
    _save(figure, path)


def ablation(rows: list[dict], path: Path, title: str) -> None:
    """False-positive lesions, false-positive voxels and DSC per subject: CNN1 alone vs the cascade."""
    labels = [r["subject"] for r in rows]
    figure, axes = plt.subplots(1, 3, figsize=(max(11.0, 2.2 * len(rows) + 4), 3.6))
    for axis, key, name in zip(axes, ("fp_lesions", "fp_voxels", "dsc"),
                               ("false-positive lesions", "false-positive voxels", "DSC")):
        values = {"CNN1 alone": [r[f"stage1_{key}"] for r in rows], "cascade": [r[f"cascade_{key}"] for r in rows]}
        _grouped_bars(axis, labels, values)
        axis.set_ylabel(name)
        if key == "dsc":
            axis.set_ylim(0, 1.05)
        else:  # counts: integer ticks, and a visible axis when every count is 0
            axis.yaxis.set_major_locator(MaxNLocator(integer=True))
            axis.set_ylim(0, 1.1 * max([1, *values["CNN1 alone"], *values["cascade"]]))
    figure.suptitle(title)
    _save(figure, path)


def training_set_size(points: list[tuple[int, float]], summary: list[dict], path: Path, title: str) -> None:
    """Held-out DSC against the number of training subjects: every test subject and the mean."""
    figure, axis = plt.subplots(figsize=(5.0, 3.6))
    if points:
        n, dsc = zip(*points)
        axis.scatter(n, dsc, s=14, color="0.6", label="one test subject", zorder=2)
    sizes = [row["train_subjects"] for row in summary]
    axis.errorbar(sizes, [row["dsc_mean"] for row in summary], yerr=[row["dsc_std"] for row in summary],
                  marker="o", capsize=3, color="C0", label="mean ± std", zorder=3)
    axis.set_xscale("log", base=2)
    axis.set_xticks(sizes, [str(s) for s in sizes])
    axis.set_xlabel("training subjects")
    axis.set_ylabel("held-out DSC")
    axis.set_ylim(0, 1.05)
    axis.legend(fontsize=8)
    axis.set_title(title)
    _save(figure, path)


def new_scanner(rows: list[dict], subject_rows: list[dict], path: Path, title: str) -> None:
    """Mean DSC on scanner A and B per variant, and predicted against true lesion volume on B."""
    figure, (bars, volumes) = plt.subplots(1, 2, figsize=(13.0, 4.2), gridspec_kw={"width_ratios": [1.6, 1]})
    _grouped_bars(bars, [r["variant"] for r in rows],
                  {"DSC scanner A (seen)": [r["a_dsc"] for r in rows], "DSC scanner B (unseen)": [r["b_dsc"] for r in rows]})
    bars.set_xticks(bars.get_xticks(), bars.get_xticklabels(), rotation=30, ha="right")
    bars.set_ylim(0, 1.05)
    bars.set_ylabel("mean held-out DSC")
    largest = 1.0
    for k, row in enumerate(rows):
        points = [(s["truth_volume_ml"], s["pred_volume_ml"]) for s in subject_rows
                  if s["variant"] == row["variant"] and s["subject"].startswith("B/")]
        if points:
            true, predicted = zip(*points)
            volumes.scatter(true, predicted, s=18, color=f"C{k % 10}", label=row["variant"])
            largest = max(largest, *true, *predicted)
    volumes.plot([0, largest], [0, largest], color="0.6", linewidth=1, zorder=0)
    volumes.set_xlabel("true lesion volume, scanner B (ml)")
    volumes.set_ylabel("predicted lesion volume (ml)")
    volumes.legend(fontsize=7)
    figure.suptitle(title)
    _save(figure, path)
