"""Voxel- and lesion-level agreement between a predicted and a true lesion mask.

A *lesion* is a connected component under full connectivity (26 neighbours in
3D, i.e. ``scipy.ndimage.label`` with ``np.ones((3, 3, 3))``), which is the
usual convention when scoring MS lesion segmentations.

Conventions for empty masks (P = prediction, T = truth):

* Both masks empty: the prediction is perfect, so every ratio takes its best
  value: ``dsc`` = ``ppv`` = ``tpr`` = 1, ``rvd`` = 0, ``lesion_tpr`` = 1,
  ``lesion_fpr`` = 0, ``lesion_f1`` = 1.
* Otherwise a ratio whose denominator is zero is mathematically undefined and
  is returned as ``float('nan')`` (serialise it as JSON ``null``):
  T empty, P not: ``tpr``, ``rvd``, ``lesion_tpr`` are nan;
  P empty, T not: ``ppv``, ``lesion_fpr`` are nan.
* ``dsc`` is never nan: its denominator |P|+|T| is zero only when both are
  empty. ``lesion_f1`` is never nan either: it is the harmonic mean of
  ``lesion_tpr`` and lesion precision (1 - ``lesion_fpr``), which is 0 as soon
  as either term is 0 whatever the other is, and exactly one empty mask makes
  one of them 0 (so, like ``dsc``, it is 0 when only one mask is empty).
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from jaxcascade.evaluation.lesions import LESION_CONNECTIVITY, bounding_box

METRIC_DEFINITIONS: dict[str, str] = {
    "dsc": "Dice similarity coefficient 2|P∩T| / (|P|+|T|) over voxels",
    "ppv": "positive predictive value (voxel precision) |P∩T| / |P|",
    "tpr": "true positive rate (voxel sensitivity) |P∩T| / |T|",
    "rvd": "signed relative volume difference (|P|-|T|) / |T|",
    "lesion_tpr": "fraction of true lesions overlapped by the prediction in >= 1 voxel",
    "lesion_fpr": "fraction of predicted lesions that overlap no true voxel",
    "lesion_f1": "harmonic mean of lesion_tpr and lesion precision (1 - lesion_fpr)",
    "true_lesions": "number of lesions (26-connected components) in the truth",
    "pred_lesions": "number of lesions (26-connected components) in the prediction",
    "detected_lesions": "number of true lesions overlapped by the prediction",
    "false_positive_lesions": "number of predicted lesions that overlap no true voxel",
    "pred_voxels": "number of voxels in the prediction |P|",
    "truth_voxels": "number of voxels in the truth |T|",
    "overlap_voxels": "number of voxels in both masks |P∩T|",
    "pred_volume_ml": "predicted lesion volume in millilitres",
    "truth_volume_ml": "true lesion volume in millilitres",
}


def as_binary(mask, name: str) -> np.ndarray:
    """Return `mask` as a bool array, refusing values other than 0 and 1."""
    array = np.asarray(mask)
    if array.dtype != bool:
        # A probability map passed by mistake would otherwise be silently
        # binarised at "!= 0" and give plausible-looking but wrong scores.
        if np.any((array != 0) & (array != 1)):
            raise ValueError(f"{name} must be binary (bool or 0/1 values)")
        array = array != 0
    return array


def _ratio(numerator: float, denominator: float) -> float:
    """`numerator / denominator`, or nan when the denominator is zero."""
    return float(numerator) / denominator if denominator else math.nan


def _count_hit_labels(labels: np.ndarray, other: np.ndarray) -> int:
    """Number of distinct non-zero labels that have a voxel inside `other`."""
    hit = np.unique(labels[other])
    return int(np.count_nonzero(hit))


def segmentation_metrics(pred, truth, voxel_volume_ml: float | None = None) -> dict[str, float]:
    """Score a binary prediction against a binary ground-truth mask.

    Args:
        pred: predicted lesion mask (bool or 0/1 array).
        truth: ground-truth lesion mask, same shape as `pred`.
        voxel_volume_ml: volume of one voxel in millilitres; when given, the
            result also holds ``pred_volume_ml`` and ``truth_volume_ml``.

    Returns:
        A dict with the ratios ``dsc``, ``ppv``, ``tpr``, ``rvd``,
        ``lesion_tpr``, ``lesion_fpr``, ``lesion_f1`` (floats) and the counts
        ``true_lesions``, ``pred_lesions``, ``detected_lesions``,
        ``false_positive_lesions``, ``pred_voxels``, ``truth_voxels``,
        ``overlap_voxels`` (ints); see `METRIC_DEFINITIONS`. Lesions are
        26-connected components. Ratios with a zero denominator are nan, except
        that two empty masks score perfectly and ``dsc`` / ``lesion_f1`` are
        0 when exactly one mask is empty (details in the module docstring).

    Raises:
        ValueError: if the shapes differ, a mask is not binary, or
            `voxel_volume_ml` is not positive.
    """
    pred_mask = as_binary(pred, "pred")
    truth_mask = as_binary(truth, "truth")
    if pred_mask.shape != truth_mask.shape:
        raise ValueError(
            f"pred shape {pred_mask.shape} differs from truth shape {truth_mask.shape}"
        )
    if voxel_volume_ml is not None and not voxel_volume_ml > 0:
        raise ValueError(f"voxel_volume_ml must be positive, got {voxel_volume_ml}")

    pred_voxels = int(np.count_nonzero(pred_mask))
    truth_voxels = int(np.count_nonzero(truth_mask))
    overlap_voxels = int(np.count_nonzero(pred_mask & truth_mask))
    true_lesions, pred_lesions, detected_lesions, false_positive_lesions = _lesion_counts(pred_mask, truth_mask)
    metrics: dict[str, float] = {
        **_ratios(pred_voxels, truth_voxels, overlap_voxels,
                  true_lesions, pred_lesions, detected_lesions, false_positive_lesions),
        "true_lesions": int(true_lesions),
        "pred_lesions": int(pred_lesions),
        "detected_lesions": detected_lesions,
        "false_positive_lesions": int(false_positive_lesions),
        "pred_voxels": pred_voxels,
        "truth_voxels": truth_voxels,
        "overlap_voxels": overlap_voxels,
    }
    if voxel_volume_ml is not None:
        metrics["pred_volume_ml"] = pred_voxels * float(voxel_volume_ml)
        metrics["truth_volume_ml"] = truth_voxels * float(voxel_volume_ml)
    return metrics


def _lesion_counts(pred_mask: np.ndarray, truth_mask: np.ndarray) -> tuple[int, int, int, int]:
    """(true lesions, predicted lesions, true lesions detected, predicted lesions overlapping no true voxel)."""
    # Components live inside the masks' joint bounding box: labelling only that box gives the same
    # lesions at a fraction of the cost of a whole brain.
    box = bounding_box(pred_mask | truth_mask) or tuple(slice(0, 0) for _ in pred_mask.shape)
    pred_mask, truth_mask = pred_mask[box], truth_mask[box]
    truth_labels, true_lesions = ndimage.label(truth_mask, structure=LESION_CONNECTIVITY)
    pred_labels, pred_lesions = ndimage.label(pred_mask, structure=LESION_CONNECTIVITY)
    detected_lesions = _count_hit_labels(truth_labels, pred_mask)
    false_positive_lesions = pred_lesions - _count_hit_labels(pred_labels, truth_mask)
    return true_lesions, pred_lesions, detected_lesions, false_positive_lesions


def _ratios(pred_voxels: int, truth_voxels: int, overlap_voxels: int, true_lesions: int, pred_lesions: int,
            detected_lesions: int, false_positive_lesions: int) -> dict[str, float]:
    """The seven ratios of `segmentation_metrics`, with the module docstring's conventions for empty masks."""
    if pred_voxels == 0 and truth_voxels == 0:
        dsc, ppv, tpr, rvd = 1.0, 1.0, 1.0, 0.0
        lesion_tpr, lesion_fpr, lesion_f1 = 1.0, 0.0, 1.0
    else:
        dsc = 2.0 * overlap_voxels / (pred_voxels + truth_voxels)
        ppv = _ratio(overlap_voxels, pred_voxels)
        tpr = _ratio(overlap_voxels, truth_voxels)
        rvd = _ratio(pred_voxels - truth_voxels, truth_voxels)
        lesion_tpr = _ratio(detected_lesions, true_lesions)
        lesion_fpr = _ratio(false_positive_lesions, pred_lesions)
        lesion_precision = 1.0 - lesion_fpr
        # The harmonic mean is 0 when either term is 0, whatever the other is
        # (even nan); this is what keeps lesion_f1 defined for one empty mask.
        if lesion_tpr == 0.0 or lesion_precision == 0.0:
            lesion_f1 = 0.0
        else:
            lesion_f1 = 2.0 * lesion_tpr * lesion_precision / (lesion_tpr + lesion_precision)
    return {"dsc": dsc, "ppv": ppv, "tpr": tpr, "rvd": rvd,
            "lesion_tpr": lesion_tpr, "lesion_fpr": lesion_fpr, "lesion_f1": lesion_f1}


def _format_value(value) -> str:
    """Counts as integers, other numbers with 4 decimals, nan/None as 'undefined'."""
    if value is None:
        # A nan that went through JSON comes back as None.
        return "undefined"
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return str(int(value))
    value = float(value)
    return "undefined" if math.isnan(value) else f"{value:.4f}"


def format_metrics(metrics: dict, *, definitions: bool = False) -> str:
    """Render `metrics` as an aligned two-column table, one metric per line.

    Names are left-aligned and values right-aligned, so decimal points line up.
    Integer values (the counts) print as integers, other numbers with 4
    decimals, and nan or None as ``undefined``. With ``definitions=True`` a
    third column gives the `METRIC_DEFINITIONS` entry of each known key.
    Keys keep the order of `metrics`.
    """
    if not metrics:
        return ""
    names = list(metrics)
    values = [_format_value(metrics[name]) for name in names]
    name_width = max(len(name) for name in names)
    value_width = max(len(value) for value in values)
    lines = []
    for name, value in zip(names, values):
        line = f"{name:<{name_width}}  {value:>{value_width}}"
        if definitions and name in METRIC_DEFINITIONS:
            line += f"  {METRIC_DEFINITIONS[name]}"
        lines.append(line)
    return "\n".join(lines)
