"""Real MS scans: models scored on the Ljubljana patient in ../shared, whole brain or one hemisphere.

The data: `../shared/data/ljubljana-ms/cross-sectional/patient26` (Lesjak et al. 2018, CC-BY; see
docs/real-scans.md for the citation). With one labelled patient, a model that saw part of it is
scored on the part it did not see: the half-brain protocol labels one hemisphere (a `labelled.nii.gz`
beside the lesion mask, `config.data.labelled`), trains, and scores the other; then the two swap.

Run from the repository root:

    python -m experiments.real_scans folds OUT            # the two half-brain subject folders (links, no copies)
    python -m experiments.real_scans score MODEL OUT.json [--region left|right|all] [--sweep]
    python -m experiments.real_scans figure OUT.png         # synthetic FLAIRs beside the real one

`score` segments the patient once with both stages' probabilities kept down to CNN1 > 0.3, then
applies the model's own threshold and minimum lesion size (and, with --sweep, a grid of both, for
the calibration recorded in docs/real-scans.md), scoring only inside the region.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

PATIENT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ljubljana-ms" / "cross-sectional" / "patient26"
SEQUENCES = ("T1", "FLAIR", "T2")
REGIONS = ("left", "right", "all")
# The lowest CNN1 probability at which CNN2 is evaluated for the sweep: below any threshold tried.
SWEEP_STAGE2_FROM = 0.3


def region_mask(shape, region: str) -> np.ndarray:
    """The voxels of one half of the first (left-right) voxel axis, or all of them."""
    mask = np.zeros(shape, bool)
    middle = shape[0] // 2
    mask[{"left": slice(0, middle), "right": slice(middle, None), "all": slice(None)}[region]] = True
    return mask


def write_folds(out: Path, patient: Path = PATIENT) -> dict[str, Path]:
    """out/half_<region>/patient26 for region left and right: links to the scans and a labelled-region mask."""
    lesion = nib.load(patient / "lesion.nii.gz")
    folds = {}
    for region in ("left", "right"):
        folder = out / f"half_{region}" / patient.name
        folder.mkdir(parents=True, exist_ok=True)
        for name in (*SEQUENCES, "lesion"):
            link = folder / f"{name}.nii.gz"
            if not link.exists():
                link.symlink_to(patient / f"{name}.nii.gz")
        labelled = region_mask(lesion.shape, region).astype(np.uint8)
        nib.save(nib.Nifti1Image(labelled, lesion.affine, lesion.header), folder / "labelled.nii.gz")
        folds[region] = folder.parent
    return folds


def score_probabilities(stage1, stage2, truth, region, *, stage2_from, threshold, min_lesion_voxels,
                        connectivity, voxel_volume_ml) -> dict:
    from jaxcascade.evaluation import metrics
    from jaxcascade.segmentation import postprocess

    mask = (stage1 > stage2_from) & postprocess.binarise(stage2, threshold)
    mask = postprocess.remove_small_lesions(mask, min_lesion_voxels, connectivity)
    scores = metrics.segmentation_metrics(mask & region, truth & region, voxel_volume_ml)
    return {key: scores[key] for key in ("dsc", "lesion_f1", "lesion_tpr", "lesion_fpr", "tpr", "ppv", "rvd",
                                         "true_lesions", "pred_lesions", "pred_volume_ml", "truth_volume_ml")}


# The calibration grid of `score(sweep=True)`: (CNN1 candidate threshold, CNN2 threshold, smallest lesion).
SWEEP_GRID = ((0.3, 0.5, 0.8), (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9), (2, 5, 10, 20))


def score(model_dir, region: str = "all", sweep: bool = False, patient: Path = PATIENT,
          grid: tuple = SWEEP_GRID) -> dict:
    import jaxcascade

    model = jaxcascade.load_model(model_dir)
    inputs = {name: str(patient / f"{name}.nii.gz") for name in model.modalities}
    truth_image = nib.load(patient / "lesion.nii.gz")
    truth = np.asarray(truth_image.dataobj) > 0
    inference = model.config.inference.to_dict()
    with model.config.unlocked():
        model.config.inference.stage2_min_probability = min(SWEEP_STAGE2_FROM, inference["stage2_min_probability"])
    inference = model.config.inference.__class__(inference)
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        jaxcascade.segment(model, inputs, probabilities=folder)
        seconds = time.perf_counter() - start
        stage1 = np.asarray(nib.load(os.path.join(folder, "stage1.nii.gz")).dataobj)
        stage2 = np.asarray(nib.load(os.path.join(folder, "stage2.nii.gz")).dataobj)
    region_voxels = region_mask(truth.shape, region)
    common = dict(connectivity=int(inference.connectivity),
                  voxel_volume_ml=float(np.prod(truth_image.header.get_zooms()[:3])) / 1000.0)
    result = {"model": str(model_dir), "region": region, "segment_seconds": round(seconds, 2),
              "settings": {"stage2_min_probability": float(inference.stage2_min_probability),
                           "threshold": float(inference.threshold),
                           "min_lesion_voxels": int(inference.min_lesion_voxels)},
              "scores": score_probabilities(stage1, stage2, truth, region_voxels,
                                            stage2_from=float(inference.stage2_min_probability),
                                            threshold=float(inference.threshold),
                                            min_lesion_voxels=int(inference.min_lesion_voxels), **common)}
    if sweep:
        result["sweep"] = [
            {"stage2_min_probability": s, "threshold": t, "min_lesion_voxels": m,
             **score_probabilities(stage1, stage2, truth, region_voxels, stage2_from=s, threshold=t,
                                   min_lesion_voxels=m, **common)}
            for s in grid[0] for t in grid[1] for m in grid[2] if t >= s or s == min(grid[0])]
    return result


SHIPPED_FILES = ("config.json", "training_data.json", "metrics.jsonl")


def ship(model_dir: Path, name: str, card: dict) -> Path:
    """Copy a trained model's directory (no checkpoints) into the package as shipped model `name`, with its card.

    The config's `train.init_from` names a folder of the machine that trained it; the card records
    the model's history instead.
    """
    import shutil

    from jaxcascade.storage import shipped

    target = shipped.SHIPPED_ROOT / name
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    for file in SHIPPED_FILES:
        shutil.copy2(model_dir / file, target / file)
    shutil.copytree(model_dir / "weights", target / "weights")
    config = json.loads((target / "config.json").read_text())
    config["train"]["init_from"] = ""
    (target / "config.json").write_text(json.dumps(config, indent=1) + "\n")
    (target / shipped.MODEL_CARD).write_text(json.dumps(card, indent=1, ensure_ascii=False) + "\n")
    return target


def synthetic_figure(out: Path, seeds=(101, 102, 103), patient: Path = PATIENT) -> None:
    """The real FLAIR and three `synth` phantoms' FLAIRs, an axial slice each, lesion outlines below."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from jaxcascade.phantom import synth

    def canonical(path):
        return np.asarray(nib.as_closest_canonical(nib.load(path)).dataobj, np.float32)

    panels = [("real: Ljubljana patient26 (Lesjak et al. 2018, CC-BY)", canonical(patient / "FLAIR.nii.gz"),
               canonical(patient / "lesion.nii.gz") > 0)]
    for seed in seeds:
        subject = synth.make_subject(seed, "full", ("FLAIR",))
        panels.append((f"synth phantom, seed {seed}", subject["FLAIR"], subject["lesion"] > 0))
    figure, axes = plt.subplots(2, len(panels), figsize=(3.2 * len(panels), 7.2))
    for column, (title, image, lesion) in enumerate(panels):
        z = int(np.argmax(lesion.sum(axis=(0, 1))))
        top = np.percentile(image[image > 0], 99.5)
        for row in range(2):
            axes[row, column].imshow(image[:, :, z].T, origin="lower", cmap="gray", vmin=0, vmax=top)
            axes[row, column].axis("off")
        axes[1, column].contour(lesion[:, :, z].T, [0.5], colors="red", linewidths=0.6)
        axes[0, column].set_title(title, fontsize=8)
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=90)
    plt.close(figure)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    folds = commands.add_parser("folds", help="write the half-brain subject folders")
    folds.add_argument("out", type=Path)
    scoring = commands.add_parser("score", help="score a model on the patient")
    scoring.add_argument("model")
    scoring.add_argument("out", type=Path)
    scoring.add_argument("--region", choices=REGIONS, default="all")
    scoring.add_argument("--sweep", action="store_true")
    drawing = commands.add_parser("figure", help="synthetic FLAIRs beside the real one")
    drawing.add_argument("out", type=Path)
    args = parser.parse_args(argv)
    if args.command == "figure":
        synthetic_figure(args.out)
        return
    if args.command == "folds":
        print(json.dumps({k: str(v) for k, v in write_folds(args.out).items()}))
        return
    result = score(args.model, args.region, args.sweep)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps({**result, "sweep": None}, indent=1))


if __name__ == "__main__":
    main()
