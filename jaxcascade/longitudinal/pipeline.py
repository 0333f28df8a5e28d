"""New and enlarging lesions between two visits: align, segment both visits on one grid, match lesions.

    run = detect_changes(model, Visit({"T1": ..., "FLAIR": ...}), Visit({...}))
    write_change(run, "out/")

Both visits are segmented by the same model on the same working grid (`visits.align`), so a lesion's
change is measured between two masks made alike, never between a mask and a resampled mask of another
grid. The outputs, their names and codes are listed in OUTPUTS and in docs/longitudinal.md.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from jaxcascade.evaluation import change, plots
from jaxcascade.longitudinal import visits
from jaxcascade.registration import transforms
from jaxcascade.runtime import outputs
from jaxcascade.segmentation.cascade import Cascade, Segmentation
from jaxcascade.segmentation.images import segment_images
from jaxcascade.segmentation.options import SegmentOptions
from jaxcascade.segmentation.study_report import csv_text
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
    # A lesion voxel seen at one visit only counts as change where the FLAIR changed that way by more than
    # this many robust standard deviations of the difference image (None: the masks alone decide).
    difference_z: float | None = 3.0
    # Which segmentation offers the voxels seen at one visit only to that check: "cascade" (the visit's
    # lesion mask) or "cnn1" (also CNN1's candidates for CNN2, stage-1 probability above the model's
    # stage2_min_probability). CNN2 exists to remove CNN1's false positives in one scan; for a change the
    # subtraction check is the stronger evidence, and CNN2 drops small new lesions it has not seen whole.
    one_visit_evidence: str = "cascade"

    def __post_init__(self):
        if self.difference_z is not None and not self.difference_z >= 0:
            raise UserError(f"difference_z={self.difference_z}: give a number of standard deviations >= 0, or None")
        if self.one_visit_evidence not in ONE_VISIT_EVIDENCE:
            raise UserError(f"one_visit_evidence={self.one_visit_evidence!r}: choose one of "
                            f"{', '.join(ONE_VISIT_EVIDENCE)}")
        if self.one_visit_evidence == "cnn1" and self.difference_z is None:
            raise UserError("one_visit_evidence='cnn1' needs the subtraction check (difference_z), which stands "
                            "in for CNN2 on one-visit voxels")


ONE_VISIT_EVIDENCE = ("cascade", "cnn1")


def confirmed_masks(baseline_mask, followup_mask, baseline_flair, followup_flair, brain_mask,
                    difference_z: float | None, offered=None):
    """(baseline, follow-up) masks in which a voxel marked at one visit only is kept where the FLAIR changed.

    Two segmentations of the same brain disagree at lesion edges and on faint lesions even where
    nothing changed (a thick-slice FLAIR, another position in the scanner); subtraction imaging, the
    radiologist's check, asks whether the signal itself changed. The difference image's spread is
    1.4826 x its median absolute deviation inside the brain (most of the brain did not change), so
    z = 3 asks a one-visit voxel to be brighter (new) or darker (gone) than 99.9 % of unchanged tissue.
    Voxels marked at both visits are kept whatever the difference. Swapping the visits swaps the result.

    offered: None, or (baseline, follow-up) masks of more voxels offered to the check at each visit (a
    superset of the lesion masks, e.g. CNN1's candidates); a voxel offered at one visit and not marked at
    the other then counts where the FLAIR changed. Voxels marked at both visits stay as they are.
    """
    baseline_mask, followup_mask = np.asarray(baseline_mask, bool), np.asarray(followup_mask, bool)
    if difference_z is None:
        return baseline_mask, followup_mask
    offered_baseline, offered_followup = ((baseline_mask, followup_mask) if offered is None else
                                          (baseline_mask | np.asarray(offered[0], bool),
                                           followup_mask | np.asarray(offered[1], bool)))
    difference = np.asarray(followup_flair, np.float64) - np.asarray(baseline_flair, np.float64)
    inside = difference[np.asarray(brain_mask, bool)]
    spread = 1.4826 * np.median(np.abs(inside - np.median(inside))) if inside.size else 0.0
    brighter, darker = difference > difference_z * spread, difference < -difference_z * spread
    both = baseline_mask & followup_mask
    return (both | (offered_baseline & ~followup_mask & darker),
            both | (offered_followup & ~baseline_mask & brighter))


# Both visits get the model's own decision settings, whatever their slices: a stricter thick-slice threshold
# would miss small new lesions, and grey matter that thick slices blur into lesion at both visits is matched
# as stable (and dropped by the subtraction check where seen at one visit only).
_SEGMENTING = SegmentOptions(resample="never", thick_slices="off")


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
        results[key] = segment_images(model, images, _SEGMENTING, brain_mask=aligned.brain_mask)
    seconds["segment both visits"] = time.perf_counter() - started
    started = time.perf_counter()
    changes = match_visits(model, aligned, results["baseline"], results["followup"], options)
    seconds["match lesions"] = time.perf_counter() - started
    return ChangeRun(aligned, results["baseline"], results["followup"], changes, seconds)


def match_visits(model: Cascade, aligned: visits.Aligned, baseline: Segmentation, followup: Segmentation,
                 options: ChangeOptions = ChangeOptions()) -> change.LesionChanges:
    """The two visits' segmentations (on aligned's grid) checked against the FLAIR's change and matched."""
    channel = aligned.flair_channel
    offered = None
    if options.one_visit_evidence == "cnn1":
        voxel_ml = float(np.prod(model.voxel_size_mm or (1.0, 1.0, 1.0))) / 1000
        cut = _SEGMENTING.inference(model.config, voxel_ml).stage2_min_probability
        offered = (baseline.stage1_probability > cut, followup.stage1_probability > cut)
    baseline_mask, followup_mask = confirmed_masks(
        baseline.mask, followup.mask, aligned.baseline[channel], aligned.followup[channel], aligned.brain_mask,
        options.difference_z, offered)
    return change.classify_changes(baseline_mask, followup_mask, aligned.grid_affine, options.criteria)


def check_outputs(out_dir, *, overwrite: bool = False) -> None:
    """One line, before any work, if out_dir cannot take the outputs (or holds them and overwrite is off)."""
    out_dir = Path(out_dir)
    outputs.check_output_path(out_dir, overwrite=True, is_dir=True, parents=True)
    if not overwrite:
        present = [name for name in OUTPUTS if (out_dir / name).exists()]
        if present:
            raise UserError(f"{out_dir}: holds {present[0]} (and {len(present) - 1} more outputs) of an earlier "
                            "run; pass overwrite=True or choose another out_dir=...")


def write_change(run: ChangeRun, out_dir, *, title: str = "") -> dict:
    """Write OUTPUTS into out_dir, all or none; returns the summary row.

    Everything is written into a staging folder inside out_dir first (synced), then renamed into place:
    a full disk or a killed process leaves out_dir as it was (and no staging folder, but for a kill),
    never half of a run's outputs that a rerun would take for finished.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".jaxcascade-change.tmp-", dir=out_dir))
    try:
        summary = _write_outputs(run, staging, title)
        for name in OUTPUTS:
            os.replace(staging / name, out_dir / name)
        outputs.sync_folder(out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return summary


def _write_outputs(run: ChangeRun, folder: Path, title: str) -> dict:
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
        with outputs.atomic_path(folder / name) as tmp:
            nib.save(image, str(tmp))
    summary = {**change.summary_row(run.changes),
               **{f"seconds_{phase.replace(' ', '_').replace('-', '')}": round(value, 3)
                  for phase, value in run.seconds.items()},
               "brain_extracted": aligned.brain_extracted}
    _write_csv(folder / "changes.csv", change.table_rows(run.changes))
    _write_csv(folder / "summary.csv", [summary])
    plots.change_overlay(aligned.baseline[flair], aligned.followup[flair], run.changes.change_mask,
                         folder / "change_qc.png", title=title)
    with outputs.atomic_path(folder / "followup_to_baseline.txt") as tmp:
        transforms.write_itk_transform(tmp, aligned.followup_to_baseline)
    return summary


def _write_csv(path: Path, rows: list[dict]) -> None:
    columns = tuple(dict.fromkeys(key for row in rows for key in row)) or ("group",)
    outputs.write_text(csv_text(rows, columns), path)


def visit_pairs(subjects) -> list[tuple]:
    """(baseline, follow-up) StudySubjects: every two consecutive sessions of each participant, by label."""
    by_participant: dict[str, list] = {}
    for subject in subjects:
        by_participant.setdefault(subject.participant_id, []).append(subject)
    pairs = []
    for participant in sorted(by_participant):
        sessions = sorted(by_participant[participant], key=lambda s: s.session_id or "")
        pairs.extend(zip(sessions, sessions[1:]))
    return pairs


def change_study(model: Cascade, subjects, out_dir, options: ChangeOptions = ChangeOptions(), *,
                 overwrite: bool = False, log=lambda line: None) -> list[dict]:
    """`detect_changes` for every consecutive pair of sessions; one summary row per pair (status ok/error).

    A pair's own problem (a missing sequence, an unreadable file, an empty brain) is its error row and
    the study goes on; its outputs go to OUT/sub-X/ses-A_to_ses-B/ and the rows to OUT/change_summary.csv.
    """
    out_dir = Path(out_dir)
    outputs.check_output_path(out_dir, overwrite=True, is_dir=True, parents=True)
    if (out_dir / "change_summary.csv").exists() and not overwrite:
        raise UserError(f"{out_dir}: holds change_summary.csv of an earlier run; pass overwrite=True or choose "
                        "another out_dir=...")
    rows = []
    for first, second in visit_pairs(subjects):
        folder = out_dir / first.participant_id / f"{first.session_id}_to_{second.session_id}"
        row = {"participant_id": first.participant_id, "baseline_session": first.session_id,
               "followup_session": second.session_id, "status": "ok", "message": ""}
        try:
            problem = first.problem or second.problem
            if problem:
                raise UserError(problem)
            check_outputs(folder, overwrite=overwrite)
            run = detect_changes(model, visits.Visit(dict(first.inputs)), visits.Visit(dict(second.inputs)), options)
            row.update(write_change(run, folder, title=f"{first.participant_id}: {first.session_id} -> "
                                                       f"{second.session_id}"))
            log(f"{folder}: {row['new_count']} new, {row['enlarging_count']} enlarging lesions "
                f"({row['new_and_enlarging_volume_ml']:.2f} ml)")
        except UserError as error:
            row.update(status="error", message=str(error))
            log(f"{first.participant_id} {first.session_id} -> {second.session_id}: {error}")
        rows.append(row)
    if not rows:
        raise UserError(f"{out_dir}: no participant has two sessions with the model's sequences; nothing to compare")
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_csv(out_dir / "change_summary.csv", rows)
    return rows
