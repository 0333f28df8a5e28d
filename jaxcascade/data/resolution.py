"""Voxel sizes: running a model at the resolution it was trained at, whatever the input's.

A CNN trained on 1 mm patches sees an 11 mm neighbourhood; on 0.9 x 0.9 x 3 mm images the same 11^3
patch covers another anatomy. A model directory records the FLAIR voxel size of its training data
(`model_directory.record_voxel_size`; nicMSlesions' baseline: 1 mm). At segment time, an input whose voxel
size differs from it by more than RESAMPLE_TOLERANCE on any axis is resampled (trilinear, through its
affine) onto a grid of the model's voxel size over the same field of view and orientation, segmented
there, and the probabilities and mask are brought back onto the input's own grid (mask: trilinear,
then > 0.5). Post-processing thresholds in voxels therefore mean what they meant in training.
"""

from __future__ import annotations

import numpy as np

from jaxcascade.data.nifti import Image, resample_onto

RESAMPLE_TOLERANCE = 0.2
RESAMPLE_MODES = ("auto", "never")


def voxel_size(image: Image) -> np.ndarray:
    """The file's voxel size (mm) per stored axis."""
    return np.array(image.nifti.header.get_zooms()[:3], np.float64)


def differs(image: Image, model_voxel_mm) -> bool:
    """Whether the image's voxel size is more than RESAMPLE_TOLERANCE away from the model's on any axis."""
    if model_voxel_mm is None:
        return False
    # Compare as sorted triples: a model trained on 1 x 1 x 3 mm files does not care which stored axis is thick.
    ratio = np.sort(voxel_size(image)) / np.sort(np.asarray(model_voxel_mm, np.float64))
    return bool(np.any(np.abs(ratio - 1) > RESAMPLE_TOLERANCE))


def working_grid(reference: Image, model_voxel_mm) -> tuple[tuple[int, int, int], np.ndarray]:
    """(shape, affine) of a grid with the model's voxel size over the reference's field of view.

    Its axes are the reference's (same orientation and rotation); the thick axis of an anisotropic
    model goes where the reference's thickest axis is.
    """
    current = voxel_size(reference)
    target = np.empty(3)
    target[np.argsort(current)] = np.sort(np.asarray(model_voxel_mm, np.float64))
    scale = target / current
    shape = tuple(int(n) for n in np.maximum(np.ceil(np.array(reference.nifti.shape[:3]) / scale), 1))
    affine = reference.affine.copy()
    affine[:3, :3] = reference.affine[:3, :3] @ np.diag(scale)
    # Both grids start at the same field-of-view corner (half a voxel before the first voxel centre).
    affine[:3, 3] = reference.affine[:3, :3] @ ((scale - 1) / 2) + reference.affine[:3, 3]
    return shape, affine


def onto(image: Image, shape, affine, order: int = 1) -> Image:
    """The image resampled onto the grid (shape, affine), in the same processing orientation."""
    return resample_onto(image, shape, affine, order=order)


def back(values: np.ndarray, working: Image, native: Image) -> np.ndarray:
    """Values on the working grid (processing orientation) -> the native image's processing grid (trilinear)."""
    moved = resample_onto(Image(path=working.path, data=np.asarray(values, np.float32), nifti=working.nifti,
                                orientation=working.orientation), native.nifti.shape[:3], native.affine)
    return moved.data
