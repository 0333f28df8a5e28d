"""Segmenting one subject's images in memory: arrays (with their grids) in, a `Segmentation` out.

`segment_images(model, images, options)` is the one inference path: the command line and
`jaxcascade.segment` (`nifti_files.segment_files`), a study (`study.py`) and the longitudinal pipeline all
call it. Images whose voxel size is not the model's are segmented on a grid of the model's voxel size and
the result brought back (`data/resolution.py`); nothing here reads or writes a file.
"""

from __future__ import annotations

import time
from typing import Callable

import numpy as np

from jaxcascade.data import nifti, resolution
from jaxcascade.data.normalisation import normalise_channels
from jaxcascade.errors import warn as warn_user
from jaxcascade.segmentation.cascade import Cascade, Segmentation, segment_volume
from jaxcascade.segmentation.options import SegmentOptions


def segment_images(model: Cascade, images: list[nifti.Image], options: SegmentOptions = SegmentOptions(), *,
                   brain_mask: np.ndarray | None = None, warn: Callable[[str], None] = warn_user,
                   progress: Callable | None = None) -> Segmentation:
    """Segment one subject given its images in the model's channel order, on one grid (restricted to
    brain_mask, on that grid, if given); the result is on the images' processing grid.

    With options.resample 'never', images of another voxel size than the model's are segmented as they
    are and `warn` says so.
    """
    reference = images[model.flair_channel]
    working, brain_mask = _working_grid(model, images, brain_mask, options.resample, warn)
    # Outside the mask every image is 0: left out of the normalisation statistics and never a candidate.
    channels = [image.data if brain_mask is None else image.data * brain_mask for image in working]
    flair_mm = resolution.voxel_size(reference)
    thick = options.thick(model.config, flair_mm)
    settings = options.inference(model.config, voxel_volume_ml=working[0].voxel_volume_ml, thick=thick)
    if thick and options.thick_slices == "auto":
        warn(f"{reference.path}: {max(flair_mm):g} mm slices: the model's thick-slice settings apply (CNN1 > "
             f"{settings.stage2_min_probability:g}, CNN2 >= {settings.threshold:g}, lesions of more than "
             f"{settings.min_lesion_voxels} voxels); thick_slices='off' keeps its own")
    started = time.perf_counter()
    volume = normalise_channels(channels, model.config.normalisation, bias_correction=model.config.bias_correction)
    normalised = time.perf_counter() - started
    result = segment_volume(model.stage1, model.stage2, volume, model.flair_channel, settings,
                            voxel_volume_ml=working[0].voxel_volume_ml, progress=progress)
    result.seconds = {"normalise": normalised, **result.seconds}
    result.thick_slices = thick
    if working is images:
        return result
    on_grid = working[model.flair_channel]
    back = lambda values: resolution.back(values, on_grid, reference)  # noqa: E731
    return Segmentation(
        stage1_probability=back(result.stage1_probability), stage2_probability=back(result.stage2_probability),
        mask=back(result.mask.astype(np.float32)) > 0.5, candidate_count=result.candidate_count,
        stage2_candidate_count=result.stage2_candidate_count,
        stage2_std=None if result.stage2_std is None else back(result.stage2_std), seconds=result.seconds,
        thick_slices=thick)


def _working_grid(model: Cascade, images: list[nifti.Image], brain_mask, resample: str, warn):
    """(images, brain_mask) on the grid the cascade runs on: the images' own, or one of the model's voxel
    size where theirs differs (unless resample is 'never')."""
    reference = images[model.flair_channel]
    if not resolution.differs(reference, model.voxel_size_mm):
        return images, brain_mask
    if resample == "never":
        zooms = "x".join(f"{z:g}" for z in resolution.voxel_size(reference))
        trained = "x".join(f"{z:g}" for z in model.voxel_size_mm)
        warn(f"{reference.path}: voxel size {zooms} mm, the model was trained at {trained} mm; segmenting at "
             "the input's resolution as asked (resample='never')")
        return images, brain_mask
    shape, affine = resolution.working_grid(reference, model.voxel_size_mm)
    working = [resolution.onto(image, shape, affine) for image in images]
    if brain_mask is not None:
        mask_image = nifti.Image(reference.path, brain_mask.astype(np.float32), reference.nifti, reference.orientation)
        brain_mask = resolution.onto(mask_image, shape, affine).data > 0.5
    return working, brain_mask
