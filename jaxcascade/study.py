"""Segmenting a study: every subject (and session) of a data folder with one loaded model, and a report.

For each subject, OUT/<subject>/ (BIDS input: OUT/sub-X/[ses-Y/]anat/, a derivatives dataset) gets
    <prefix>_desc-lesion_mask.nii.gz        on the subject's FLAIR grid, with its header
    <prefix>_desc-stage{1,2}_probseg.nii.gz  with probabilities
    <prefix>_desc-qc.png                    FLAIR with the mask outline on the most lesioned slices
    <prefix>_desc-lesion_report.json        the subject's row and its lesions (written last)
and OUT/lesions.csv has one row per subject/session (status, count, volume, metrics), OUT/lesion_table.csv
one row per lesion (volume, RAS centroid, probabilities).

The data folder is the training layout (`<subject>/<MODALITY><suffix>`, the lesion file optional) or a
BIDS dataset (`bids_layout.py`). The model is loaded and compiled once: the kernels see volumes padded
to shape buckets, so subjects of different shapes share compilations. A subject whose files fail a
check becomes a row with its one-line error and the others go on. A subject whose report exists is not
redone (rerun to resume) unless overwrite. Every file is written atomically and the CSVs are rebuilt
from the reports, so they always describe exactly the subjects finished.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import time
from pathlib import Path
from typing import Callable

import numpy as np
from scipy import ndimage

from jaxcascade import bids_layout, metrics, nifti, plots
from jaxcascade.cascade import Cascade
from jaxcascade.errors import UserError
from jaxcascade.outputs import check_output_path, write_json, write_text
from jaxcascade.pipeline import segment_images

SUBJECT_COLUMNS = ("participant_id", "session_id", "status", "lesion_count", "lesion_volume_ml", "voxel_size_mm",
                   "skull_stripped", "seconds", "dsc", "ppv", "tpr", "lesion_f1", "true_volume_ml")
LESION_COLUMNS = ("participant_id", "session_id", "label", "volume_ml", "centroid_x_mm", "centroid_y_mm",
                  "centroid_z_mm", "voxels", "mean_probability", "max_probability")


@dataclasses.dataclass
class StudySubject:
    participant_id: str
    session_id: str  # "" without sessions
    inputs: dict  # modality -> Path
    truth: Path | None  # a lesion mask to score against, if any
    folder: Path  # outputs, relative to OUT
    prefix: str  # of every output file name
    problem: str | None = None  # a reason it cannot be segmented, found while discovering
    brain_mask: Path | None = None  # restricts normalisation and candidates


def study_subjects(data_dir, config, bids_suffixes: dict | None = None, *, participants=None,
                   bids_filters=None, log: Callable | None = None) -> list[StudySubject]:
    """The subjects (and sessions) of a training-layout folder or a BIDS dataset.

    participants: labels (01 or sub-01) to keep, as BIDS Apps' --participant-label; in a training-layout
    folder they name subject folders. bids_filters: `[MODALITY:]ENTITY=VALUE` strings (bids_layout).
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise UserError(f"{data_dir}: data folder not found")
    modalities = tuple(config.data.modalities)
    if bids_layout.is_bids(data_dir):
        found = bids_layout.sessions(data_dir, modalities, bids_suffixes or bids_layout.DEFAULT_SUFFIXES,
                                     participants=participants, filters=bids_filters, log=log)
        return [StudySubject(entry["participant_id"], entry["session_id"], entry["inputs"], entry["truth"],
                             *bids_layout.output_location(entry["participant_id"], entry["session_id"]),
                             problem=entry["problem"], brain_mask=entry["brain_mask"]) for entry in found]
    if bids_filters:
        raise UserError(f"{data_dir}: --bids-filter applies to BIDS datasets (this folder has no "
                        "dataset_description.json)")
    names = [f"{m}{config.data.suffix}" for m in modalities]
    folders = sorted(p for p in data_dir.iterdir() if p.is_dir() and not p.name.startswith(".")
                     and any((p / name).exists() for name in names))
    if not folders:
        raise UserError(f"{data_dir}: no subject folders with {' or '.join(names)} (expected "
                        f"{data_dir}/<subject>/{names[0]} ..., or a BIDS dataset with dataset_description.json)")
    if participants:
        wanted = {str(label) for label in participants} | {f"sub-{label}" for label in participants}
        missing = [label for label in participants if not {label, f"sub-{label}"} & {f.name for f in folders}]
        if missing:
            raise UserError(f"{data_dir}: no subject folder {', '.join(map(str, missing))} (it has "
                            f"{', '.join(f.name for f in folders[:10])}{' ...' if len(folders) > 10 else ''})")
        folders = [f for f in folders if f.name in wanted]
    subjects = []
    for folder in folders:
        truth, brain = folder / f"{config.data.lesion}{config.data.suffix}", folder / f"brain_mask{config.data.suffix}"
        subjects.append(StudySubject(folder.name, "", {m: folder / f"{m}{config.data.suffix}" for m in modalities},
                                     truth if truth.exists() else None, Path(folder.name), folder.name,
                                     brain_mask=brain if brain.exists() else None))
    return subjects


def lesion_rows(mask: np.ndarray, probability: np.ndarray, reference: nifti.Image) -> list[dict]:
    """One row per 26-connected lesion of mask (processing grid): volume, scanner-space centroid, probabilities."""
    labels, count = ndimage.label(mask, metrics.LESION_CONNECTIVITY)
    if count == 0:
        return []
    index = np.arange(1, count + 1)
    voxels = np.bincount(labels.ravel(), minlength=count + 1)[1:]
    # Centroids in the file's own voxel grid, then through its affine into scanner (RAS) millimetres.
    file_labels = reference.to_file_grid(labels)
    file_centres = np.array(ndimage.center_of_mass(file_labels > 0, file_labels, index)).reshape(count, 3)
    world = file_centres @ reference.affine[:3, :3].T + reference.affine[:3, 3]
    mean = ndimage.mean(probability, labels, index)
    peak = ndimage.maximum(probability, labels, index)
    return [{"label": int(k), "voxels": int(n), "volume_ml": round(float(n) * reference.voxel_volume_ml, 6),
             "centroid_x_mm": round(float(x), 3), "centroid_y_mm": round(float(y), 3),
             "centroid_z_mm": round(float(z), 3), "mean_probability": round(float(m), 5),
             "max_probability": round(float(p), 5)}
            for k, n, (x, y, z), m, p in zip(index, voxels, world, mean, peak)]


def _segment_subject(model: Cascade, subject: StudySubject, out: Path, probabilities: bool, settings: dict,
                     progress) -> dict:
    """Segment one subject, write its files into out, return its report (row and lesions)."""
    config = model.config
    started = time.perf_counter()
    if subject.problem:
        raise UserError(subject.problem)
    images = nifti.load_sequences(subject.inputs, model.modalities, subject.participant_id,
                                  orientation=config.data.orientation, reference=config.data.flair)
    reference = images[model.modalities.index(config.data.flair)]
    brain_mask = nifti.load_brain_mask(subject.brain_mask, reference) if subject.brain_mask else None
    stripped = "masked" if brain_mask is not None else "yes" if nifti.looks_skull_stripped(reference.data) else "no"
    result = segment_images(model, images, brain_mask=brain_mask, progress=progress, **settings)
    out.mkdir(parents=True, exist_ok=True)
    nifti.save_like(result.mask, reference, out / f"{subject.prefix}_desc-lesion_mask.nii.gz", dtype=np.uint8)
    if probabilities:
        for stage, values in ((1, result.stage1_probability), (2, result.stage2_probability)):
            nifti.save_like(values, reference, out / f"{subject.prefix}_desc-stage{stage}_probseg.nii.gz",
                            dtype=np.float32)
        if result.stage2_std is not None:
            nifti.save_like(result.stage2_std, reference, out / f"{subject.prefix}_desc-stage2std_probseg.nii.gz",
                            dtype=np.float32)
    truth = nifti.load_lesion_mask(subject.truth, reference) if subject.truth else None
    plots.overlay(reference.data, truth, result.mask, out / f"{subject.prefix}_desc-qc.png")
    lesions = lesion_rows(result.mask, result.stage2_probability, reference)
    row = {"participant_id": subject.participant_id, "session_id": subject.session_id, "status": "ok",
           "lesion_count": len(lesions),
           "lesion_volume_ml": round(float(result.mask.sum()) * reference.voxel_volume_ml, 6),
           "voxel_size_mm": "x".join(f"{z:g}" for z in reference.nifti.header.get_zooms()[:3]),
           "skull_stripped": stripped}
    if truth is not None:
        scores = metrics.segmentation_metrics(result.mask, truth, reference.voxel_volume_ml)
        row.update({key: round(scores[key], 5) for key in ("dsc", "ppv", "tpr", "lesion_f1")},
                   true_volume_ml=round(scores["truth_volume_ml"], 6))
    row["seconds"] = round(time.perf_counter() - started, 3)
    return {"row": row, "lesions": lesions}


def _csv(rows: list[dict], columns: tuple[str, ...]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: ("" if row.get(key) is None or row.get(key) != row.get(key) else row.get(key))
                         for key in columns})
    return buffer.getvalue()


def parse_shard(text: str | None, environ=os.environ) -> tuple[int, int]:
    """'I/N' (0 <= I < N), 'slurm' (this SLURM array task of the array), or None: (0, 1)."""
    if not text:
        return 0, 1
    if text == "slurm":
        if "SLURM_ARRAY_TASK_ID" not in environ:
            raise UserError("--shard slurm: SLURM_ARRAY_TASK_ID is not set (run it as a job array, sbatch --array)")
        first = int(environ.get("SLURM_ARRAY_TASK_MIN", 0))
        count = int(environ.get("SLURM_ARRAY_TASK_COUNT") or int(environ["SLURM_ARRAY_TASK_MAX"]) - first + 1)
        return int(environ["SLURM_ARRAY_TASK_ID"]) - first, count
    index, sep, count = text.partition("/")
    try:
        shard = int(index), int(count)
    except ValueError:
        shard = (-1, 0)
    if not sep or not 0 <= shard[0] < shard[1]:
        raise UserError(f"--shard {text}: expected I/N with 0 <= I < N (e.g. --shard 0/4), or slurm")
    return shard


def segment_study(model_dir, data_dir, out_dir, *, probabilities: bool = False, overwrite: bool = False,
                  compute_dtype: str | None = None, bids_suffixes: dict | None = None, tta: bool | None = None,
                  resample: str = "auto", min_lesion_volume_mm3: float | None = None,
                  shard: tuple[int, int] = (0, 1), participants=None, bids_filters=None,
                  log: Callable = print, progress: Callable | None = None) -> list[dict]:
    """Segment every subject of data_dir into out_dir; returns the subject rows (also in OUT/lesions.csv).

    With shard (i, n), this process segments subjects i, i + n, ... and reports the others as far as
    their own processes have finished them; the last process to finish (or a plain rerun, which
    segments nothing new) writes the complete CSVs. No scheduler: a SLURM array or n shell jobs.
    """
    out_dir = check_output_path(out_dir, is_dir=True)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{out_dir}: exists and is not a folder; choose another --out-dir")
    model = Cascade.load(model_dir, compute_dtype=compute_dtype)
    subjects = study_subjects(data_dir, model.config, bids_suffixes, participants=participants,
                              bids_filters=bids_filters, log=log)
    out_dir.mkdir(exist_ok=True)
    if bids_layout.is_bids(data_dir):
        bids_layout.describe_derivatives(out_dir, Path(data_dir))
    reports, (index, count) = [], shard
    for number, subject in enumerate(progress(subjects, "subjects") if progress else subjects):
        name = " ".join(part for part in (subject.participant_id, subject.session_id) if part)
        report_path = out_dir / subject.folder / f"{subject.prefix}_desc-lesion_report.json"
        # A failure is recorded apart from the report: other shards read it, its own shard retries it.
        failure_path = report_path.with_name(f"{subject.prefix}_desc-lesion_error.json")
        mine = number % count == index
        if report_path.exists() and not (overwrite and mine):
            report = json.loads(report_path.read_text())
            report["row"]["resumed"] = True  # finished by an earlier run (not a CSV column)
            reports.append(report)
            continue
        if not mine:
            pending = {"row": {"participant_id": subject.participant_id, "session_id": subject.session_id,
                               "status": f"pending: shard {number % count}/{count}"}, "lesions": []}
            other = json.loads(failure_path.read_text()) if failure_path.exists() else pending
            other["row"]["resumed"] = True  # another shard's outcome, not this run's
            reports.append(other)
            continue
        try:
            settings = dict(tta=tta, resample=resample, min_lesion_volume_mm3=min_lesion_volume_mm3, warn=log)
            report = _segment_subject(model, subject, out_dir / subject.folder, probabilities, settings, progress)
        except UserError as error:
            report = {"row": {"participant_id": subject.participant_id, "session_id": subject.session_id,
                              "status": f"error: {error}"}, "lesions": []}
            log(f"{name}: {error}")
            failure_path.parent.mkdir(parents=True, exist_ok=True)
            write_json(report, failure_path)
        else:
            failure_path.unlink(missing_ok=True)
            write_json(report, report_path)  # last: a subject without a report is redone
            log(f"{name}: {report['row']['lesion_count']} lesions, "
                f"{report['row']['lesion_volume_ml']:.2f} ml ({report['row']['seconds']:.1f} s)"
                + ("; the FLAIR does not look skull-stripped: add a brain mask" if report["row"]["skull_stripped"] == "no"
                   else ""))
        reports.append(report)
    rows = [report["row"] for report in reports]
    lesions = [{**lesion, "participant_id": report["row"]["participant_id"],
                "session_id": report["row"]["session_id"]} for report in reports for lesion in report["lesions"]]
    write_text(_csv(rows, SUBJECT_COLUMNS), out_dir / "lesions.csv")
    write_text(_csv(lesions, LESION_COLUMNS), out_dir / "lesion_table.csv")
    return rows
