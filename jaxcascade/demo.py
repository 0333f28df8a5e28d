"""`jaxcascade demo`: the whole job on generated data, on a CPU budget.

Writes a phantom cohort, trains both stages with configs/demo.py on all but
the last subject, segments the held-out one, and reports its metrics, NIfTI
outputs and an overlay PNG. Re-running resumes (finished stages are kept).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable

from jaxcascade import api, config as config_lib, phantom
from jaxcascade.evaluation import metrics, plots
from jaxcascade.data import nifti
from jaxcascade.runtime import outputs

_LOG = logging.getLogger(__name__)

DEMO_SUBJECTS = 6  # 5 for training, 1 held out
DEMO_SEED = 0
DEMO_SIZE = "small"


def run_demo(workdir, *, log: Callable = _LOG.info, progress: Callable | None = None,
             subjects: int = DEMO_SUBJECTS, size: str = DEMO_SIZE, config=None) -> dict:
    """Run the demo in workdir and return the held-out subject's metrics."""
    started = time.perf_counter()
    workdir = Path(workdir)
    outputs.check_output_path(workdir, is_dir=True)
    workdir.mkdir(exist_ok=True)
    config = config or config_lib.load_config("demo")

    cohort = workdir / "cohort"
    names = [phantom.subject_name(i) for i in range(subjects)]
    train_dir, held_out = cohort / "train", cohort / "held_out" / names[-1]
    if not (held_out / "lesion.nii.gz").exists():
        log(f"writing a {size} phantom cohort of {subjects} subjects to {cohort}")
        phantom.write_cohort(cohort / "all", subjects, DEMO_SEED, size)
        train_dir.mkdir(parents=True, exist_ok=True)
        held_out.parent.mkdir(parents=True, exist_ok=True)
        for name in names[:-1]:
            (cohort / "all" / name).rename(train_dir / name)
        (cohort / "all" / names[-1]).rename(held_out)
        (cohort / "all").rmdir()

    model = api.train(train_dir, workdir / "model", config=config, log=log, progress=progress)

    log(f"segmenting held-out subject {names[-1]}")
    inputs = {m: str(held_out / f"{m}.nii.gz") for m in config.data.modalities}
    segmentation_path = workdir / f"{names[-1]}_segmentation.nii.gz"
    result = api.segment(model, inputs, out=segmentation_path, probabilities=workdir / "probabilities",
                         overwrite=True, progress=progress)
    truth_image = nifti.load_image(held_out / "lesion.nii.gz", allow_all_zero=True)
    truth = nifti.load_lesion_mask(held_out / "lesion.nii.gz", truth_image)
    scores = api.evaluate(result.mask, truth, voxel_volume_ml=truth_image.voxel_volume_ml)
    outputs.write_json(scores, workdir / "held_out_metrics.json")
    flair = nifti.load_image(inputs[config.data.flair]).data
    plots.overlay(flair, truth, result.mask, workdir / "overlay.png",
                  title=f"{names[-1]} (held out): DSC {scores['dsc']:.3f}, {scores['pred_volume_ml']:.2f} ml found, "
                        f"{scores['truth_volume_ml']:.2f} ml true")

    log(metrics.format_metrics(scores))
    elapsed = time.perf_counter() - started
    log(f"held-out DSC {scores['dsc']:.3f}; demo finished in {elapsed:.0f} s; outputs in {workdir}")
    return scores
