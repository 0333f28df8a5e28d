"""Thick-slice FLAIR: does a model that has seen thick slices segment a real 4 mm follow-up better?

    python -m experiments.thick_slices [--out experiments/measured/thick_slices] [--workdir DIR]

Clinical FLAIRs are often 2D acquisitions with 3-5 mm slices (patient01 of the Ljubljana longitudinal database:
0.72 x 0.72 x 4 mm); the shipped model was adapted to a 1 mm patient. `jaxcascade change` brings a thick scan
onto a 1 mm working grid by linear interpolation, which creates no detail. Here:

1. patient26 of the cross-sectional database (1 mm, Lesjak et al. 2018, CC-BY) is used twice: as distributed,
   and thickened: each axial slab of 4 mm (FLAIR) or 3 mm (T1) replaced by its mean, then brought back onto the
   1 mm grid by linear interpolation between slab centres, as `change` does with a thick scan (`thicken`);
2. the shipped default is fine-tuned on both with the packaged `oneshot` recipe (the expert lesion mask is the
   same for both);
3. the shipped default and the fine-tuned model each run `jaxcascade change` on patient01 (Lesjak et al. 2016,
   CC-BY) and are scored against the experts' change mask (experiments/longitudinal_change.py: change DSC,
   lesion-wise F1, and how much of the change lesions the follow-up's own segmentation covers).

patient01 is scored once per model, after the recipe was fixed; nothing is chosen on it. Writes
thick_slices.json into --out.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

import jaxcascade
from experiments import longitudinal_change

PATIENT26 = Path(__file__).resolve().parents[2] / "shared" / "data" / "ljubljana-ms" / "cross-sectional" / "patient26"
THICKNESS_MM = {"FLAIR": 4.0, "T1": 3.0}  # patient01's FLAIR and T1W slices


def axial_axis(affine: np.ndarray) -> int:
    """The voxel axis that runs closest to superior-inferior."""
    return int(np.argmax(np.abs(affine[2, :3]) / np.linalg.norm(affine[:3, :3], axis=0)))


def thicken(data: np.ndarray, axis: int, planes: int) -> np.ndarray:
    """data with every run of `planes` planes along axis replaced by their mean, then interpolated linearly
    between the slabs' centres back onto the original planes (edges held)."""
    moved = np.moveaxis(np.asarray(data, np.float32), axis, 0)
    count = -(-moved.shape[0] // planes)
    padded = np.concatenate([moved, np.repeat(moved[-1:], count * planes - moved.shape[0], axis=0)])
    slabs = padded.reshape(count, planes, *moved.shape[1:]).mean(axis=1)
    position = (np.arange(moved.shape[0]) - (planes - 1) / 2) / planes  # each plane in slab-index units
    coordinates = np.meshgrid(position, *[np.arange(n) for n in moved.shape[1:]], indexing="ij")
    back = ndimage.map_coordinates(slabs, coordinates, order=1, mode="nearest")
    return np.moveaxis(back.astype(np.float32), 0, axis)


def write_patient(target: Path, thick: bool, patient: Path = PATIENT26) -> Path:
    """target/ with the patient's T1, FLAIR and lesion mask; the T1 and FLAIR thickened (THICKNESS_MM) if thick."""
    target.mkdir(parents=True)
    for modality in ("T1", "FLAIR", "lesion"):
        image = nib.load(patient / f"{modality}.nii.gz")
        data = np.asarray(image.dataobj, np.float32)
        if thick and modality in THICKNESS_MM:
            zoom = float(image.header.get_zooms()[axial_axis(image.affine)])
            data = thicken(data, axial_axis(image.affine), round(THICKNESS_MM[modality] / zoom))
        nib.save(nib.Nifti1Image(data, image.affine, image.header), target / f"{modality}.nii.gz")
    return target


def write_training_folder(folder: Path) -> None:
    """folder/patient26 (as distributed) and folder/patient26_thick, in the training layout."""
    for name, thick in (("patient26", False), ("patient26_thick", True)):
        write_patient(folder / name, thick)


def change_scores(model) -> dict:
    """`change` on patient01 with the model, registering everything itself, scored against the experts."""
    truth = nib.load(longitudinal_change.PATIENT01 / "gt.nii.gz")
    with tempfile.TemporaryDirectory() as scratch:
        started = time.perf_counter()
        run = jaxcascade.detect_changes(model, longitudinal_change.visit(1), longitudinal_change.visit(2),
                                        out_dir=Path(scratch) / "out")
        seconds = time.perf_counter() - started
    return {"seconds": seconds, "score": longitudinal_change.score(run, truth, run.changes.activity_mask),
            "followup_segmentation_on_change_lesions": longitudinal_change.thick_slice(run, truth)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("experiments/measured/thick_slices"))
    parser.add_argument("--workdir", type=Path, default=None, help="keep the data and model here (default: a "
                        "temporary folder); rerunning resumes the training")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        workdir = args.workdir or Path(scratch)
        data = workdir / "data"
        if not data.is_dir():
            write_training_folder(data)
        tuned = jaxcascade.train(data, workdir / "model", init_from="default", config="oneshot", log=print)
        # The epochs' own record: a rerun on --workdir resumes a finished training in a second.
        epochs = [json.loads(line) for line in (workdir / "model" / "metrics.jsonl").read_text().splitlines()]
        report = {"patient": "Ljubljana longitudinal MS database, patient01 (Lesjak et al. 2016, CC-BY)",
                  "training": "the shipped default fine-tuned with the oneshot recipe on patient26 (Lesjak et al. "
                              "2018, CC-BY) as distributed and thickened (FLAIR 4 mm, T1 3 mm axial slabs)",
                  "training_epochs": {stage: sum(e["stage"] == stage for e in epochs) for stage in (1, 2)},
                  "training_seconds": sum(e["epoch_seconds"] for e in epochs),
                  "models": {"default": change_scores(jaxcascade.load_model()), "thick-slice tuned": change_scores(tuned)}}
    for name, row in report["models"].items():
        print(name, json.dumps(row["score"]), json.dumps(row["followup_segmentation_on_change_lesions"]))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "thick_slices.json").write_text(json.dumps(report, indent=2, default=float) + "\n")
    print(f"wrote {args.out / 'thick_slices.json'}")


if __name__ == "__main__":
    main()
