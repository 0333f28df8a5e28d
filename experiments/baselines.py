"""The floor every learned method must clear: FLAIR above a threshold inside white matter.

White matter is where the T1 is brightest: the brain voxels above the 55th percentile of the T1's
nonzero intensities, closed by 3 voxels so that lesions (darker than white matter on T1) fall inside the
mask they interrupt. A lesion is a white-matter voxel whose normalised FLAIR exceeds a threshold,
connected components of at most the cascade's min_lesion_voxels removed as for the cascade. The
threshold is the one of highest mean DSC on the training subjects, so the baseline learns exactly one
number from the same data as the networks.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import numpy as np
from scipy import ndimage

from experiments.protocol import load_subject
from jaxcascade.evaluation import metrics
from jaxcascade.segmentation import postprocess
from jaxcascade.data.normalisation import normalise

THRESHOLDS = np.round(np.arange(0.5, 4.01, 0.1), 2)  # normalised FLAIR (z units of the nonzero voxels)
_WHITE_MATTER_PERCENTILE = 55
_CLOSING_VOXELS = 3


def white_matter_mask(t1: np.ndarray) -> np.ndarray:
    brain = t1 != 0
    bright = t1 > np.percentile(t1[brain], _WHITE_MATTER_PERCENTILE)
    closed = ndimage.binary_closing(bright, iterations=_CLOSING_VOXELS, border_value=0)
    return closed & brain


def threshold_mask(flair_z: np.ndarray, white_matter: np.ndarray, threshold: float, cascade_config) -> np.ndarray:
    mask = (flair_z > threshold) & white_matter
    inference = cascade_config.inference
    return postprocess.remove_small_lesions(mask, inference.min_lesion_voxels, inference.connectivity)


def _load(subject: Path, cascade_config):
    images, truth = load_subject(subject, cascade_config.data, ("T1", cascade_config.data.flair))
    flair_z = normalise(images[1].data, cascade_config.normalisation)
    return white_matter_mask(images[0].data), flair_z, truth, images[1].voxel_volume_ml


def fit_threshold(subjects: list[Path], cascade_config, log: Callable) -> tuple[float, float]:
    """(threshold of highest mean training DSC, seconds spent)."""
    started = time.perf_counter()
    loaded = [_load(subject, cascade_config) for subject in subjects]
    mean_dsc = [np.mean([metrics.segmentation_metrics(threshold_mask(flair, wm, t, cascade_config), truth)["dsc"]
                         for wm, flair, truth, _ in loaded]) for t in THRESHOLDS]
    best = float(THRESHOLDS[int(np.nanargmax(mean_dsc))])
    log(f"FLAIR threshold baseline: {best} (training DSC {np.nanmax(mean_dsc):.3f})")
    return best, time.perf_counter() - started


def threshold_scores(subjects: list[Path], threshold: float, cascade_config, key: Callable) -> dict[str, dict]:
    scores = {}
    for subject in subjects:
        white_matter, flair_z, truth, voxel_ml = _load(subject, cascade_config)
        scores[key(subject)] = metrics.segmentation_metrics(threshold_mask(flair_z, white_matter, threshold,
                                                                           cascade_config), truth, voxel_ml)
    return scores
