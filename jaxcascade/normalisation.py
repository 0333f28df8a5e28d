"""Intensity normalisation of each image before it reaches the networks.

The seed code standardises every image by the mean and standard deviation of
its nonzero (brain) voxels; candidates are then voxels whose normalised FLAIR
exceeds config.candidates.min_th, so the normalisation decides both what the
networks see and which voxels they are asked about. A new method is a branch
of `normalise` and a name in NORMALISATIONS (config.normalisation).
"""

from __future__ import annotations

import numpy as np

NORMALISATIONS = ("nonzero", "nicms")


def normalise(image: np.ndarray, method: str = "nonzero") -> np.ndarray:
    """Standardise one image by the statistics of its nonzero voxels.

    'nonzero': (x - mean(nonzero)) / std(nonzero), the seed code's rule.
    'nicms': nicMSlesions subtracts the nonzero mean first and then divides by
    the std of the nonzero voxels of the *shifted* image, so background voxels
    (now at -mean) count in the std.
    """
    image = np.asarray(image, np.float32)
    nonzero = image[image != 0]
    if nonzero.size == 0:
        raise ValueError("image has no nonzero voxels")
    mean = nonzero.astype(np.float64).mean()
    if method == "nonzero":
        std = nonzero.astype(np.float64).std()
        out = (image - mean) / std
    elif method == "nicms":
        shifted = image - mean
        std = shifted[shifted != 0].astype(np.float64).std()
        out = shifted / std
    else:
        raise ValueError(f"unknown normalisation {method!r}; use one of {NORMALISATIONS}")
    return out.astype(np.float32)


def normalise_channels(channels: list[np.ndarray], method: str) -> np.ndarray:
    """Stack normalised images into a (D, H, W, C) float32 volume."""
    return np.stack([normalise(image, method) for image in channels], axis=-1)
