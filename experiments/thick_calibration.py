"""Thick-slice FLAIR: the decision thresholds a 1 mm model needs when its FLAIR had 4 mm slices.

    python -m experiments.thick_calibration LEFT_MODEL RIGHT_MODEL [--out experiments/measured/thick_slices]

A model adapted to a 1 mm patient sees a 4 mm FLAIR, brought onto its 1 mm grid by interpolation, as a
blurred one: thin lesions lose contrast and its probabilities fall, so the thresholds chosen at 1 mm keep
less of them. The thresholds for thick scans are chosen here the way the 1 mm ones were (the half-brain
protocol of docs/real-scans.md), on patient26 of the cross-sectional database (Lesjak et al. 2018, CC-BY)
thickened as `experiments.thick_slices.thicken` does (each 4 mm FLAIR and 3 mm T1 axial slab replaced by its
mean, interpolated back):

- LEFT_MODEL and RIGHT_MODEL: the shipped default's procedure (synthetic pre-training, then the `oneshot`
  recipe) on the lesions of one hemisphere (`python -m experiments.real_scans folds`);
- each is scored on the other hemisphere, thick and as distributed, over thresholds on CNN2's probability
  (the model's CNN1 threshold and smallest lesion kept: see `choose`);
- the threshold with the best mean of DSC and lesion F1 over both folds is the thick-slice one (and, as a
  check of the protocol, the 1 mm one); each fold's own best is checked on the other fold.

The longitudinal patient (patient01) plays no part in the choice. Writes thick_calibration.json into --out.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

from experiments import real_scans, thick_slices

FOLDS = {"left": "right", "right": "left"}  # labelled hemisphere -> the hemisphere it is scored on
# The model's own CNN1 threshold and smallest lesion (0.5, 20 for the default's procedure), and CNN2's
# threshold from real_scans' range on to 0.98: a blurred FLAIR may ask for a stricter or a looser one.
GRID = ((0.3, 0.5), (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98), (20,))


def objective(row: dict) -> float:
    return (row["dsc"] + row["lesion_f1"]) / 2


def choose(sweeps: dict[str, list[dict]], settings: dict) -> dict:
    """CNN2's threshold best on average over the folds, the model's other settings kept; each fold's best
    checked on the other fold.

    One patient's two hemispheres (9 and 10 lesions) cannot calibrate three settings: only the threshold
    on CNN2's probability, the last decision, is chosen. CNN1's candidate threshold and the smallest
    lesion stay the model's own, the same for thick and thin slices.
    """
    fixed = (settings["stage2_min_probability"], settings["min_lesion_voxels"])
    by_fold = {fold: {row["threshold"]: row for row in rows
                      if (row["stage2_min_probability"], row["min_lesion_voxels"]) == fixed}
               for fold, rows in sweeps.items()}
    thresholds = sorted(set.intersection(*(set(rows) for rows in by_fold.values())))
    best = max(thresholds, key=lambda t: np.mean([objective(rows[t]) for rows in by_fold.values()]))
    checks = {}
    for fold, rows in by_fold.items():
        own = max(thresholds, key=lambda t: objective(rows[t]))
        checks[f"chosen on the {fold}-labelled fold"] = {"threshold": own, "on its own fold": rows[own],
                                                        "on the other fold": by_fold[FOLDS[fold]][own]}
    table = {t: {fold: {name: rows[t][name] for name in ("dsc", "lesion_f1", "rvd")} for fold, rows in by_fold.items()}
             for t in thresholds}
    return {"settings": {**settings, "threshold": best}, "per_fold": {fold: rows[best] for fold, rows in by_fold.items()},
            "cross_checks": checks, "by_threshold": table}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("left_model", type=Path, help="trained on the left hemisphere's lesions")
    parser.add_argument("right_model", type=Path, help="trained on the right hemisphere's lesions")
    parser.add_argument("--out", type=Path, default=Path("experiments/measured/thick_slices"))
    args = parser.parse_args(argv)
    models = {"left": args.left_model, "right": args.right_model}
    report = {"patient": "patient26, Ljubljana cross-sectional MS database (Lesjak et al. 2018, CC-BY)",
              "thickened": {name: f"{mm:g} mm axial slabs" for name, mm in thick_slices.THICKNESS_MM.items()},
              "objective": "mean of DSC and lesion F1 on the held-out hemisphere", "inputs": {}}
    with tempfile.TemporaryDirectory() as scratch:
        thick = thick_slices.write_patient(Path(scratch) / real_scans.PATIENT.name, thick=True,
                                            patient=real_scans.PATIENT)
        for label, patient in (("1 mm", real_scans.PATIENT), ("thick", thick)):
            runs = {fold: real_scans.score(models[fold], FOLDS[fold], sweep=True, patient=patient,
                                           grid=GRID) for fold in FOLDS}
            report["inputs"][label] = {
                "model_settings": {fold: {**run["settings"], **run["scores"]} for fold, run in runs.items()},
                "choice": choose({fold: run["sweep"] for fold, run in runs.items()}, runs["left"]["settings"])}
            for fold, run in runs.items():
                print(label, fold, json.dumps(run["scores"]))
    for label, row in report["inputs"].items():
        print(label, "chosen:", json.dumps(row["choice"]["settings"]),
              {fold: (round(r["dsc"], 3), round(r["lesion_f1"], 3), round(r["rvd"], 3))
               for fold, r in row["choice"]["per_fold"].items()})
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "thick_calibration.json").write_text(json.dumps(report, indent=1, default=float) + "\n")
    print(f"wrote {args.out / 'thick_calibration.json'}")


if __name__ == "__main__":
    main()
