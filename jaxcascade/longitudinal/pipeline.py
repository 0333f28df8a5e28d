"""New and enlarging lesions between two visits: align, segment both visits on one grid, match lesions.

    run = detect_changes(model, Visit({"T1": ..., "FLAIR": ...}), Visit({...}))
    write_change(run, "out/")

Both visits are segmented by the same model on the same working grid (`visits.align`), so a lesion's
change is measured between two masks made alike, never between a mask and a resampled mask of another
grid. The outputs, their names and codes are listed in OUTPUTS and in docs/longitudinal.md.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from jaxcascade.evaluation import change, plots
from jaxcascade.longitudinal import visits
from jaxcascade.registration import transforms
from jaxcascade.runtime import outputs
from jaxcascade.segmentation.cascade import Cascade, Segmentation
from jaxcascade.segmentation.files import segment_images
from jaxcascade.data.normalisation import flair_channel
from jaxcascade.errors import UserError

OUTPUTS = {
    "change_mask.nii.gz": "every lesion of either visit coded by its change class (evaluation.change.CHANGE_CODES)",
    "new_and_enlarging.nii.gz": "the voxels that appeared: new lesions and the growth of enlarging ones",
    "baseline_mask.nii.gz": "the baseline's lesions", "followup_mask.nii.gz": "the follow-up's lesions",
    "brain_mask.nii.gz": "the brain both visits were segmented in",
    "baseline_FLAIR.nii.gz": "the baseline FLAIR on the working grid",
    "followup_FLAIR.nii.gz": "the follow-up FLAIR on the working grid, aligned (and intensity-matched)",
    "changes.csv": "one row per lesion group: class, volumes at both visits, growth, centroid",
    "summary.csv": "one row: counts per class, new+enlarging count and volume, seconds per phase",
    "change_qc.png": "both visits side by side on the slices through new and enlarging lesions",
    "followup_to_baseline.txt": "ITK transform: baseline FLAIR points -> follow-up FLAIR points (LPS)",
}


@dataclasses.dataclass(frozen=True)
class ChangeOptions:
    alignment: visits.AlignmentOptions = visits.AlignmentOptions()
    criteria: change.ChangeCriteria = change.ChangeCriteria()


@dataclasses.dataclass(frozen=True)
class ChangeRun:
    aligned: visits.Aligned
    baseline: Segmentation
    followup: Segmentation
    changes: change.LesionChanges
    seconds: dict


def detect_changes(model: Cascade, baseline: visits.Visit, followup: visits.Visit,
                   options: ChangeOptions = ChangeOptions()) -> ChangeRun:
    """Both visits aligned, segmented with `model` on one grid, and their lesions matched."""
    modalities = model.modalities
    flair = modalities[flair_channel(model.config)]
    voxel_mm = model.voxel_size_mm or (1.0, 1.0, 1.0)
    aligned = visits.align(modalities, baseline, followup, voxel_mm, options.alignment, flair=flair)
    seconds = dict(aligned.seconds)
    started = time.perf_counter()
    results = {}
    for key, channels in (("baseline", aligned.baseline), ("followup", aligned.followup)):
        images = visits.as_images(channels, aligned.grid_affine, modalities, key)
        results[key] = segment_images(model, images, brain_mask=aligned.brain_mask, resample="never")
    seconds["segment both visits"] = time.perf_counter() - started
    started = time.perf_counter()
    changes = change.classify_changes(results["baseline"].mask, results["followup"].mask, aligned.grid_affine,
                                      options.criteria)
    seconds["match lesions"] = time.perf_counter() - started
    return ChangeRun(aligned, results["baseline"], results["followup"], changes, seconds)


def check_outputs(out_dir, *, overwrite: bool = False) -> None:
    """One line, before any work, if out_dir cannot take the outputs (or holds them and overwrite is off)."""
    out_dir = Path(out_dir)
    outputs.check_output_path(out_dir, overwrite=True, is_dir=True)
    if not overwrite:
        present = [name for name in OUTPUTS if (out_dir / name).exists()]
        if present:
            raise UserError(f"{out_dir}: holds {present[0]} (and {len(present) - 1} more outputs) of an earlier "
                            "run; pass --overwrite or choose another --out-dir")


def write_change(run: ChangeRun, out_dir, *, title: str = "") -> dict:
    """Write OUTPUTS into out_dir (each file atomically); returns the summary row."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    affine, aligned = run.aligned.grid_affine, run.aligned
    flair = aligned.flair_channel
    volumes = {"change_mask.nii.gz": (run.changes.change_mask, np.uint8),
               "new_and_enlarging.nii.gz": (run.changes.activity_mask, np.uint8),
               "baseline_mask.nii.gz": (run.baseline.mask, np.uint8),
               "followup_mask.nii.gz": (run.followup.mask, np.uint8),
               "brain_mask.nii.gz": (aligned.brain_mask, np.uint8),
               "baseline_FLAIR.nii.gz": (aligned.baseline[flair], np.float32),
               "followup_FLAIR.nii.gz": (aligned.followup[flair], np.float32)}
    for name, (data, dtype) in volumes.items():
        image = nib.Nifti1Image(np.asarray(data).astype(dtype), affine)
        image.header.set_qform(affine, code=1)
        image.header.set_sform(affine, code=1)
        with outputs.atomic_path(out_dir / name) as tmp:
            nib.save(image, str(tmp))
    summary = {**change.summary_row(run.changes),
               **{f"seconds_{phase.replace(' ', '_').replace('-', '')}": round(value, 3)
                  for phase, value in run.seconds.items()},
               "brain_extracted": aligned.brain_extracted}
    _write_csv(out_dir / "changes.csv", change.table_rows(run.changes))
    _write_csv(out_dir / "summary.csv", [summary])
    plots.change_overlay(aligned.baseline[flair], aligned.followup[flair], run.changes.change_mask,
                         out_dir / "change_qc.png", title=title)
    with outputs.atomic_path(out_dir / "followup_to_baseline.txt") as tmp:
        transforms.write_itk_transform(tmp, aligned.followup_to_baseline)
    return summary


def _write_csv(path: Path, rows: list[dict]) -> None:
    text = io.StringIO()
    columns = list(rows[0]) if rows else ["group"]
    writer = csv.DictWriter(text, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    outputs.write_text(text.getvalue(), path)
