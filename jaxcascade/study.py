"""Segmenting a study: every subject of a data folder with one loaded model, a report per subject and lesion.

    OUT/<subject>/<subject>_lesion_mask.nii.gz   on the subject's FLAIR grid, with its header
    OUT/<subject>/<subject>_stage{1,2}_probability.nii.gz   with probabilities
    OUT/<subject>/<subject>_qc.png               FLAIR with the mask outline on the most lesioned slices
    OUT/<subject>/<subject>_report.json          the subject's row and its lesions (written last)
    OUT/lesions.csv                              one row per subject: status, count, volume, metrics
    OUT/lesion_table.csv                         one row per lesion: volume, RAS centroid, probabilities

The data folder has the training layout (`<subject>/<MODALITY><suffix>`, the lesion file optional). The
model is loaded and compiled once: the kernels see volumes padded to shape buckets (`dense.py`), so
subjects of different shapes share compilations. A subject whose files fail a check becomes a row with
its one-line error and the others go on. A subject whose report exists is not redone (rerun to resume)
unless overwrite. Every file is written atomically and the CSVs are rebuilt from the reports, so they
always describe exactly the subjects finished.
"""

from __future__ import annotations

import csv
import io
import json
import time
from pathlib import Path
from typing import Callable

import numpy as np
from scipy import ndimage

from jaxcascade import metrics, nifti, plots
from jaxcascade.cascade import Cascade
from jaxcascade.errors import UserError
from jaxcascade.outputs import check_output_path, write_json, write_text
from jaxcascade.pipeline import segment_images

SUBJECT_COLUMNS = ("participant_id", "session_id", "status", "lesion_count", "lesion_volume_ml", "voxel_size_mm",
                   "seconds", "dsc", "ppv", "tpr", "lesion_f1", "true_volume_ml")
LESION_COLUMNS = ("participant_id", "session_id", "label", "volume_ml", "centroid_x_mm", "centroid_y_mm",
                  "centroid_z_mm", "voxels", "mean_probability", "max_probability")
# Lesions are counted as the metrics count them: 26-connected components.
_COMPONENTS = np.ones((3, 3, 3), bool)


def study_subjects(data_dir, config) -> list[Path]:
    """Subject folders of a training-layout data folder (those holding at least one file of the model's)."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise UserError(f"{data_dir}: data folder not found")
    names = [f"{m}{config.data.suffix}" for m in config.data.modalities]
    folders = sorted(p for p in data_dir.iterdir() if p.is_dir() and not p.name.startswith(".")
                     and any((p / name).exists() for name in names))
    if not folders:
        raise UserError(f"{data_dir}: no subject folders with {' or '.join(names)} (expected "
                        f"{data_dir}/<subject>/{names[0]} ...)")
    return folders


def lesion_rows(mask: np.ndarray, probability: np.ndarray, reference: nifti.Image) -> list[dict]:
    """One row per 26-connected lesion of mask (processing grid): volume, scanner-space centroid, probabilities."""
    labels, count = ndimage.label(mask, _COMPONENTS)
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


def _segment_subject(model: Cascade, folder: Path, out: Path, probabilities: bool, progress) -> dict:
    """Segment one subject folder, write its files, return its report (row and lesions)."""
    config, name = model.config, folder.name
    started = time.perf_counter()
    inputs = {m: folder / f"{m}{config.data.suffix}" for m in model.modalities}
    absent = [str(path) for path in inputs.values() if not path.exists()]
    if absent:
        raise UserError(f"{absent[0]}: file not found ({len(absent)} of the model's sequences missing)")
    images = nifti.load_sequences(inputs, model.modalities, name, orientation=config.data.orientation)
    reference = images[model.modalities.index(config.data.flair)]
    result = segment_images(model, images, progress=progress)
    out.mkdir(exist_ok=True)
    nifti.save_like(result.mask, reference, out / f"{name}_lesion_mask.nii.gz", dtype=np.uint8)
    if probabilities:
        for stage, values in ((1, result.stage1_probability), (2, result.stage2_probability)):
            nifti.save_like(values, reference, out / f"{name}_stage{stage}_probability.nii.gz", dtype=np.float32)
    truth_path = folder / f"{config.data.lesion}{config.data.suffix}"
    truth = nifti.load_lesion_mask(truth_path, reference) if truth_path.exists() else None
    plots.overlay(reference.data, truth, result.mask, out / f"{name}_qc.png")
    lesions = lesion_rows(result.mask, result.stage2_probability, reference)
    row = {"participant_id": name, "session_id": "", "status": "ok", "lesion_count": len(lesions),
           "lesion_volume_ml": round(float(result.mask.sum()) * reference.voxel_volume_ml, 6),
           "voxel_size_mm": "x".join(f"{z:g}" for z in reference.nifti.header.get_zooms()[:3])}
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


def segment_study(model_dir, data_dir, out_dir, *, probabilities: bool = False, overwrite: bool = False,
                  compute_dtype: str | None = None, log: Callable = print, progress: Callable | None = None) -> list[dict]:
    """Segment every subject of data_dir into out_dir; returns the subject rows (also in OUT/lesions.csv)."""
    out_dir = check_output_path(out_dir, is_dir=True)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{out_dir}: exists and is not a folder; choose another --out-dir")
    model = Cascade.load(model_dir, compute_dtype=compute_dtype)
    folders = study_subjects(data_dir, model.config)
    out_dir.mkdir(exist_ok=True)
    reports = []
    subjects = progress(folders, "subjects") if progress else folders
    for folder in subjects:
        report_path = out_dir / folder.name / f"{folder.name}_report.json"
        if report_path.exists() and not overwrite:
            reports.append(json.loads(report_path.read_text()))
            continue
        try:
            report = _segment_subject(model, folder, out_dir / folder.name, probabilities, progress)
        except UserError as error:
            report = {"row": {"participant_id": folder.name, "session_id": "", "status": f"error: {error}"},
                      "lesions": []}
            log(f"{folder.name}: {error}")
        else:
            write_json(report, report_path)  # last: a subject without a report is redone
            log(f"{folder.name}: {report['row']['lesion_count']} lesions, "
                f"{report['row']['lesion_volume_ml']:.2f} ml ({report['row']['seconds']:.1f} s)")
        reports.append(report)
    rows = [report["row"] for report in reports]
    lesions = [{**lesion, "participant_id": report["row"]["participant_id"],
                "session_id": report["row"]["session_id"]} for report in reports for lesion in report["lesions"]]
    write_text(_csv(rows, SUBJECT_COLUMNS), out_dir / "lesions.csv")
    write_text(_csv(lesions, LESION_COLUMNS), out_dir / "lesion_table.csv")
    return rows
