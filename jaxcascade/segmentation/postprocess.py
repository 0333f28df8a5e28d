"""Turn a lesion probability map into a final binary lesion mask.

These follow the post-processing of the nicMSlesions seed code: threshold the
probability map, drop lesions that are too small, and discard the whole
segmentation when its total volume is below a minimum ("min_error").
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from jaxcascade.evaluation.lesions import label_lesions

# Neighbourhood size -> rank passed to generate_binary_structure(3, rank):
# 6 shares a face, 18 a face or an edge, 26 a face, an edge or a corner.
_CONNECTIVITY_RANK = {6: 1, 18: 2, 26: 3}


def binarise(probability, threshold: float) -> np.ndarray:
    """Return the bool mask ``probability >= threshold``."""
    return np.asarray(probability) >= threshold


def remove_small_lesions(mask, min_lesion_voxels: int, connectivity: int = 6) -> np.ndarray:
    """Keep only the lesions with strictly more than `min_lesion_voxels` voxels.

    Args:
        mask: 3D binary mask (bool or 0/1).
        min_lesion_voxels: a lesion of exactly this many voxels is removed,
            one of ``min_lesion_voxels + 1`` is kept (as in the seed code);
            0 keeps every lesion.
        connectivity: 6, 18 or 26, the neighbourhood that joins voxels into one
            lesion. The default 6 is scipy.ndimage.label's default, which the
            seed code relies on.

    Returns:
        A new bool array of the same shape.

    Raises:
        ValueError: if `mask` is not 3D, `connectivity` is not 6, 18 or 26, or
            `min_lesion_voxels` is negative.
    """
    mask = np.asarray(mask) != 0
    if mask.ndim != 3:
        raise ValueError(f"mask must be 3D, got shape {mask.shape}")
    if connectivity not in _CONNECTIVITY_RANK:
        raise ValueError(f"connectivity must be 6, 18 or 26, got {connectivity}")
    if min_lesion_voxels < 0:
        raise ValueError(f"min_lesion_voxels must be >= 0, got {min_lesion_voxels}")

    structure = ndimage.generate_binary_structure(3, _CONNECTIVITY_RANK[connectivity])
    lesions = label_lesions(mask, structure)  # inside the mask's bounding box: a brain's worth faster
    keep = np.bincount(lesions.labels.ravel(), minlength=lesions.count + 1) > min_lesion_voxels
    keep[0] = False  # label 0 is the background
    kept = np.zeros_like(mask)
    kept[lesions.box] = keep[lesions.labels]
    return kept


def apply_min_volume(mask, min_volume_ml: float, voxel_volume_ml: float) -> np.ndarray:
    """Empty the mask when its total volume is below `min_volume_ml`.

    This is nicMSlesions' "min_error" rule: a segmentation smaller than the
    minimum volume is treated as noise and discarded as a whole. The test is
    strict (a volume of exactly `min_volume_ml` is kept); ``min_volume_ml=0``
    disables the rule.

    Args:
        mask: binary lesion mask (bool or 0/1), any shape.
        min_volume_ml: minimum total lesion volume in millilitres.
        voxel_volume_ml: volume of one voxel in millilitres.

    Returns:
        A new bool array: `mask` unchanged, or all False.

    Raises:
        ValueError: if `min_volume_ml` is negative or `voxel_volume_ml` is not
            positive.
    """
    if not min_volume_ml >= 0:
        raise ValueError(f"min_volume_ml must be >= 0, got {min_volume_ml}")
    if not voxel_volume_ml > 0:
        raise ValueError(f"voxel_volume_ml must be positive, got {voxel_volume_ml}")
    mask = np.asarray(mask) != 0
    volume_ml = np.count_nonzero(mask) * voxel_volume_ml
    if volume_ml < min_volume_ml:
        return np.zeros_like(mask)
    return mask
