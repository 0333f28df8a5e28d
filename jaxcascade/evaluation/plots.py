"""Figures: training curves and a FLAIR overlay with truth and prediction contours (PNG, atomic).

Drawn with matplotlib's object-oriented `Figure`, never `pyplot`: importing
jaxcascade leaves the user's matplotlib backend (a notebook's inline one, an
interactive window) as it was, and headless clusters need no display.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from jaxcascade.runtime.outputs import atomic_path

# Okabe-Ito colours, told apart by the commonest colour-vision deficiencies (unlike red/green).
TRUTH_COLOUR, PREDICTION_COLOUR = "#56B4E9", "#E69F00"  # sky blue, orange


def _figure(width: float, height: float):
    from matplotlib.figure import Figure  # deferred: only drawing needs matplotlib

    return Figure(figsize=(width, height))


def _save(figure, path, *, tight: bool = True) -> None:
    with atomic_path(path) as tmp:
        figure.savefig(tmp, dpi=110, bbox_inches="tight" if tight else None, format="png")


def training_curves(records: list[dict], path: str | Path) -> None:
    """Train and validation loss per epoch, one panel per stage; the best epoch marked."""
    stages = sorted({r["stage"] for r in records})
    if not stages:
        return
    figure = _figure(5 * len(stages), 3.6)
    axes = figure.subplots(1, len(stages), squeeze=False)
    for axis, stage in zip(axes[0], stages):
        rows = [r for r in records if r["stage"] == stage]
        epochs = [r["epoch"] for r in rows]
        axis.plot(epochs, [r["train_loss"] for r in rows], label="train")
        axis.plot(epochs, [r["val_loss"] for r in rows], label="validation")
        best = [r for r in rows if r["best"]]
        if best:
            axis.scatter([best[-1]["epoch"]], [best[-1]["val_loss"]], color="k", zorder=3, label="kept")
        axis.set_title(f"CNN{stage}")
        axis.set_xlabel("epoch")
        axis.set_ylabel("cross-entropy")
        axis.legend()
    _save(figure, path)


def overlay_slices(reference: np.ndarray, count: int = 3) -> list[int]:
    """Axial planes spread through the lesions: quantiles of the lesions' central planes, each lesion once.

    The planes with the most lesion voxels are usually neighbours through one large lesion; counting each
    lesion (6-connected component) once shows their spread. Planes with the most lesion voxels fill in
    where there are fewer distinct planes than `count`; without lesions, planes spread through the volume.
    """
    from scipy import ndimage

    from jaxcascade.evaluation.lesions import label_lesions, lesion_statistics

    depth = reference.shape[2]
    quantiles = (np.arange(count) + 1) / (count + 1)
    lesions = label_lesions(reference, ndimage.generate_binary_structure(3, 1))
    if not lesions.count:
        return sorted({int(round(q * (depth - 1))) for q in quantiles})
    centres = lesion_statistics(lesions)["centre"][:, 2]
    chosen = {int(round(z)) for z in np.quantile(centres, quantiles, method="nearest")}
    by_load = np.argsort(reference.reshape(-1, depth).sum(axis=0), kind="stable")[::-1]
    for z in by_load:
        if len(chosen) >= min(count, depth):
            break
        chosen.add(int(z))
    return sorted(chosen)


def overlay(flair: np.ndarray, truth: np.ndarray | None, prediction: np.ndarray, path: str | Path,
            *, title: str = "") -> None:
    """Axial FLAIR slices spread through the lesion load: truth sky blue, prediction orange.

    `title` (e.g. the subject, its lesion count and volume) heads the picture.
    """
    reference = truth if truth is not None and truth.any() else prediction
    slices = overlay_slices(reference)
    figure = _figure(4 * len(slices), 4.6)
    # Axes placed by hand and text instead of titles: no tight-bbox pass and no tick layout, which were
    # most of the drawing time of a study subject's QC picture.
    width = 1 / len(slices)
    for index, z in enumerate(slices):
        axis = figure.add_axes((index * width + 0.005, 0.0, width - 0.01, 0.8))
        axis.set_axis_off()
        axis.imshow(np.rot90(flair[:, :, z]), cmap="gray", interpolation="nearest")
        if truth is not None and truth[:, :, z].any():
            axis.contour(np.rot90(truth[:, :, z]), levels=[0.5], colors=TRUTH_COLOUR, linewidths=1.0)
        if prediction[:, :, z].any():
            axis.contour(np.rot90(prediction[:, :, z]), levels=[0.5], colors=PREDICTION_COLOUR, linewidths=1.0)
        axis.text(0.5, 1.01, f"axial slice {z}", transform=axis.transAxes, ha="center", va="bottom")
    legend = ("FLAIR: truth (blue), prediction (orange)" if truth is not None
              else "FLAIR: segmentation (orange)")
    figure.text(0.5, 0.985, f"{title}\n{legend}" if title else legend, ha="center", va="top", fontsize="large")
    _save(figure, path, tight=False)


# Okabe-Ito again: new lesions vermilion, enlarging yellow, every other lesion of either visit sky blue.
NEW_COLOUR, ENLARGING_COLOUR, OTHER_LESION_COLOUR = "#D55E00", "#F0E442", "#56B4E9"


def change_figure(baseline: np.ndarray, followup: np.ndarray, change_mask: np.ndarray, *, title: str = "",
                  count: int = 3):
    """Both visits (rows) on axial slices through the new and enlarging lesions (columns), outlined.

    `baseline` and `followup` are one contrast (usually FLAIR) on one grid, `change_mask` the
    `evaluation.change` codes on it: new lesions are outlined vermilion, enlarging ones yellow and every
    other lesion sky blue, on both rows, so what appeared is seen beside where it was not.
    """
    from jaxcascade.evaluation.change import CHANGE_CODES

    new = change_mask == CHANGE_CODES["new"]
    enlarging = change_mask == CHANGE_CODES["enlarging"]
    other = (change_mask > 0) & ~new & ~enlarging
    active = new | enlarging
    slices = overlay_slices(active if active.any() else change_mask > 0, count)
    figure = _figure(3.4 * len(slices), 7.4)
    width, height = 1 / len(slices), 0.44
    for row, (visit, image) in enumerate((("baseline", baseline), ("follow-up", followup))):
        for index, z in enumerate(slices):
            axis = figure.add_axes((index * width + 0.005, 0.47 - row * 0.47, width - 0.01, height))
            axis.set_axis_off()
            axis.imshow(np.rot90(image[:, :, z]), cmap="gray", interpolation="nearest")
            for mask, colour, line in ((other, OTHER_LESION_COLOUR, 0.7), (enlarging, ENLARGING_COLOUR, 1.2),
                                       (new, NEW_COLOUR, 1.2)):
                if mask[:, :, z].any():
                    axis.contour(np.rot90(mask[:, :, z]), levels=[0.5], colors=colour, linewidths=line)
            axis.text(0.5, 1.01, f"{visit}, axial slice {z}", transform=axis.transAxes, ha="center", va="bottom")
    legend = "new lesions vermilion, enlarging yellow, other lesions blue"
    figure.text(0.5, 0.995, f"{title}\n{legend}" if title else legend, ha="center", va="top", fontsize="large")
    return figure


def change_overlay(baseline: np.ndarray, followup: np.ndarray, change_mask: np.ndarray, path: str | Path,
                   *, title: str = "", count: int = 3) -> None:
    """`change_figure` written to `path` as a PNG (atomically)."""
    _save(change_figure(baseline, followup, change_mask, title=title, count=count), path, tight=False)
