"""What a study reports: one row per subject (lesions.csv) and one per lesion (lesion_table.csv)."""

from __future__ import annotations

import csv
import io

import numpy as np

from jaxcascade.evaluation.lesions import label_lesions, lesion_statistics
from jaxcascade.data import nifti

SUBJECT_COLUMNS = ("participant_id", "session_id", "status", "lesion_count", "lesion_volume_ml", "voxel_size_mm",
                   "skull_stripped", "seconds", "dsc", "ppv", "tpr", "lesion_f1", "volume_error_percent", "true_volume_ml",
                   "resampled", "scoring")
LESION_COLUMNS = ("participant_id", "session_id", "label", "volume_ml", "centroid_x_mm", "centroid_y_mm",
                  "centroid_z_mm", "voxels", "mean_probability", "max_probability")


def lesion_rows(mask: np.ndarray, probability: np.ndarray, reference: nifti.Image) -> list[dict]:
    """One row per 26-connected lesion of mask (processing grid): volume, scanner-space centroid, probabilities."""
    lesions = label_lesions(mask)
    stats = lesion_statistics(lesions, probability)
    # A centroid is a mean of voxel coordinates, so the grid's affine takes it straight to scanner (RAS) mm.
    affine = reference.grid_affine
    world = stats["centre"] @ affine[:3, :3].T + affine[:3, 3]
    return [{"label": k, "voxels": int(n), "volume_ml": round(float(n) * reference.voxel_volume_ml, 6),
             "centroid_x_mm": round(float(x), 3), "centroid_y_mm": round(float(y), 3),
             "centroid_z_mm": round(float(z), 3), "mean_probability": round(float(m), 5),
             "max_probability": round(float(p), 5)}
            for k, n, (x, y, z), m, p in zip(range(1, lesions.count + 1), stats["voxels"], world, stats["mean"],
                                             stats["max"])]


def csv_text(rows: list[dict], columns: tuple[str, ...]) -> str:
    """rows as CSV with these columns (missing and NaN values empty)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: ("" if row.get(key) is None or row.get(key) != row.get(key) else row.get(key))
                         for key in columns})
    return buffer.getvalue()
