"""Figures: training curves and a FLAIR overlay with truth and prediction contours (PNG, atomic)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless clusters: never ask for a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from jaxcascade.outputs import atomic_path  # noqa: E402


def _save(figure, path) -> None:
    with atomic_path(path) as tmp:
        figure.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
    plt.close(figure)


def training_curves(records: list[dict], path: str | Path) -> None:
    """Train and validation loss per epoch, one panel per stage; the best epoch marked."""
    stages = sorted({r["stage"] for r in records})
    if not stages:
        return
    figure, axes = plt.subplots(1, len(stages), figsize=(5 * len(stages), 3.6), squeeze=False)
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


def overlay(flair: np.ndarray, truth: np.ndarray | None, prediction: np.ndarray, path: str | Path) -> None:
    """Three axial slices through the most lesioned planes: truth green, prediction red."""
    reference = truth if truth is not None and truth.any() else prediction
    per_slice = reference.reshape(-1, reference.shape[-1]).sum(axis=0) if reference.any() else None
    if per_slice is None:
        slices = [flair.shape[2] // 2] * 3
    else:
        slices = sorted(np.argsort(per_slice)[-3:][::-1].tolist())
    figure, axes = plt.subplots(1, len(slices), figsize=(4 * len(slices), 4))
    for axis, z in zip(np.atleast_1d(axes), slices):
        axis.imshow(np.rot90(flair[:, :, z]), cmap="gray")
        if truth is not None and truth[:, :, z].any():
            axis.contour(np.rot90(truth[:, :, z]), levels=[0.5], colors="lime", linewidths=1.0)
        if prediction[:, :, z].any():
            axis.contour(np.rot90(prediction[:, :, z]), levels=[0.5], colors="red", linewidths=1.0)
        axis.set_title(f"axial slice {z}")
        axis.axis("off")
    figure.suptitle("FLAIR: truth (green), prediction (red)" if truth is not None else "FLAIR: segmentation (red)")
    _save(figure, path)
