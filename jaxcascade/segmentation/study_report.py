"""What a study reports: one row per subject (lesions.csv) and one per lesion (lesion_table.csv), rebuilt from
every subject's report in the output folder (`write_tables`)."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np

from jaxcascade.data import nifti
from jaxcascade.evaluation.lesions import label_lesions, lesion_statistics
from jaxcascade.runtime.outputs import write_text
from jaxcascade.segmentation import study_record

LOCKS = ".locks"  # one lock file per subject being segmented (released when its process ends, however)

SUBJECT_COLUMNS = ("participant_id", "session_id", "status", "lesion_count", "lesion_volume_ml", "voxel_size_mm",
                   "skull_stripped", "seconds", "dsc", "ppv", "tpr", "lesion_f1", "volume_error_percent", "true_volume_ml",
                   "resampled", "thick_slices", "scoring")
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


def write_tables(out_dir: Path, reports: list[dict], report_paths: list[Path]) -> list[dict]:
    """lesions.csv and lesion_table.csv from every subject's report in out_dir (this run's and those of
    subjects it did not include), under a lock so that of two processes on one folder the later writer
    sees what the earlier finished; returns this run's subject rows."""
    from filelock import FileLock

    (out_dir / LOCKS).mkdir(exist_ok=True)
    with FileLock(out_dir / LOCKS / "tables.lock"):
        # Whatever a run killed while writing the tables (or their record) left goes: this process holds the lock.
        study_record.remove_temporaries(out_dir, [*study_record.TABLES, study_record.record_name(study_record.STUDY)])
        for i, (report, path) in enumerate(zip(reports, report_paths)):
            finished = study_record.read_report(path) if report["row"].get("in_progress") else None
            if finished is not None:  # finished meanwhile by the other process
                reports[i] = finished
                reports[i]["row"]["resumed"] = True
        rows = [report["row"] for report in reports]
        every = sorted([*reports, *reports_of_others(out_dir, report_paths)],
                       key=lambda report: (report["row"]["participant_id"], report["row"]["session_id"]))
        lesions = [{**lesion, "participant_id": report["row"]["participant_id"],
                    "session_id": report["row"]["session_id"]} for report in every for lesion in report["lesions"]]
        study_record.claim(out_dir, study_record.STUDY, study_record.TABLES)
        write_text(csv_text([report["row"] for report in every], SUBJECT_COLUMNS), out_dir / "lesions.csv")
        write_text(csv_text(lesions, LESION_COLUMNS), out_dir / "lesion_table.csv")
    return rows


def reports_of_others(out_dir: Path, report_paths: list[Path]) -> list[dict]:
    """The outcome (report, else error record) of every subject with files in out_dir that this run left out."""
    ours = {path.resolve() for path in report_paths}
    found = []
    for key in study_record.recorded_keys(out_dir):
        owned = study_record.owned(out_dir, key)
        for suffix in ("_desc-lesion_report.json", "_desc-lesion_error.json"):
            if key + suffix in owned and (out_dir / f"{key}_desc-lesion_report.json").resolve() not in ours:
                report = study_record.read_report(out_dir / (key + suffix))
                if report is not None and {"participant_id", "session_id"} <= report["row"].keys():
                    found.append(report)
                    break
    return found
