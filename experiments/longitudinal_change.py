"""New and enlarging lesions on the real two-visit patient01 (Lesjak et al. 2016, CC-BY), scored against the experts.

    python -m experiments.longitudinal_change [--out experiments/measured/longitudinal]

Runs `jaxcascade.detect_changes` with the shipped default model on the raw visits twice: registering
everything itself, and with the database's own transforms given instead. Each change mask is taken into
the ground truth's common space through the database's baseline FLAIR -> common transform and scored
there (voxel DSC, lesion-wise TPR/PPV/F1 of change lesions, volume), beside the subtraction check off.
The thick-slice question: how much of the experts' change lesions the follow-up's own segmentation
covers. Writes patient01.json and the QC picture (change_qc.png) into --out.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

import jaxcascade
from jaxcascade.evaluation import change, metrics
from jaxcascade.longitudinal import pipeline
from jaxcascade.registration import transforms

PATIENT01 = Path(__file__).resolve().parents[2] / "shared" / "data" / "ljubljana-ms" / "longitudinal" / "patient01"


def visit(study: int) -> dict:
    return {"T1": PATIENT01 / f"study{study}_T1W.nii.gz", "FLAIR": PATIENT01 / f"study{study}_FLAIR.nii.gz"}


def given_transforms(study: int) -> dict:
    return {"T1": PATIENT01 / f"study{study}_T1W_intrastudy_to_FLAIR.txt",
            "FLAIR": PATIENT01 / f"study{study}_FLAIR_to_common_space.txt"}


def in_common_space(mask: np.ndarray, grid_affine: np.ndarray, truth: nib.Nifti1Image) -> np.ndarray:
    common_to_baseline = transforms.read_itk_transform(PATIENT01 / "study1_FLAIR_to_common_space.txt")
    image = nib.Nifti1Image(np.asarray(mask, np.uint8), grid_affine)
    return transforms.resample(image, truth, common_to_baseline, order=0).get_fdata() > 0.5


def score(run, truth: nib.Nifti1Image, activity: np.ndarray) -> dict:
    found = in_common_space(activity, run.aligned.grid_affine, truth)
    expected = truth.get_fdata() > 0.5
    voxel_ml = float(np.prod(truth.header.get_zooms()[:3])) / 1000
    result = change.score_change(found, expected)
    return {"dsc": result.dsc, "lesion_tpr": result.lesion_tpr, "lesion_ppv": result.lesion_ppv,
            "lesion_f1": result.lesion_f1, "true_lesions": result.true_lesions,
            "predicted_lesions": result.predicted_lesions, "found_ml": found.sum() * voxel_ml,
            "truth_ml": expected.sum() * voxel_ml,
            "volume_error_percent": 100 * (found.sum() / expected.sum() - 1)}


def thick_slice(run, truth: nib.Nifti1Image) -> dict:
    """How much of the experts' change lesions the follow-up's own segmentation covers (voxels, lesions)."""
    followup = in_common_space(run.followup.mask, run.aligned.grid_affine, truth)
    expected = truth.get_fdata() > 0.5
    detection = metrics.segmentation_metrics(followup, expected)
    return {"voxels_covered": float((followup & expected).sum() / expected.sum()),
            "lesions_touched_tpr": float(detection["lesion_tpr"])}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("experiments/measured/longitudinal"))
    args = parser.parse_args(argv)
    model = jaxcascade.load_model()
    truth = nib.load(PATIENT01 / "gt.nii.gz")
    report = {"patient": "Ljubljana longitudinal MS database, patient01 (Lesjak et al. 2016, CC-BY)",
              "model": "default", "runs": {}}
    with tempfile.TemporaryDirectory() as scratch:
        for name, transforms_given in (("own registration", False), ("database transforms", True)):
            started = time.perf_counter()
            run = jaxcascade.detect_changes(
                model, visit(1), visit(2), out_dir=Path(scratch) / name,
                baseline_transforms=given_transforms(1) if transforms_given else None,
                followup_transforms=given_transforms(2) if transforms_given else None)
            seconds = time.perf_counter() - started
            unchecked = change.classify_changes(run.baseline.mask, run.followup.mask, run.aligned.grid_affine)
            report["runs"][name] = {
                "seconds": seconds, "phases": run.seconds, "summary": change.summary_row(run.changes),
                "score": score(run, truth, run.changes.activity_mask),
                "score_without_subtraction_check": score(run, truth, unchecked.activity_mask),
                "score_with_cnn1_evidence": score(run, truth, pipeline.match_visits(
                    model, run.aligned, run.baseline, run.followup,
                    pipeline.ChangeOptions(one_visit_evidence="cnn1")).activity_mask),
                "followup_segmentation_on_change_lesions": thick_slice(run, truth)}
            print(name, json.dumps(report["runs"][name]["score"]), f"{seconds:.1f} s")
            if not transforms_given:
                args.out.mkdir(parents=True, exist_ok=True)
                shutil.copy(Path(scratch) / name / "change_qc.png", args.out / "change_qc.png")
    (args.out / "patient01.json").write_text(json.dumps(report, indent=2, default=float) + "\n")
    print(f"wrote {args.out / 'patient01.json'}")


if __name__ == "__main__":
    main()
