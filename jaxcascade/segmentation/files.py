"""Segmenting one subject from its NIfTI files: every output checked first, the images loaded and
resampled where their grid is not the model's, the cascade run, the mask and maps written together.

`segment_files(model_dir, inputs, out)` is what `jaxcascade segment --input ... --out` runs;
`segment_images(model, images)` the same on loaded images (a study calls it once per subject).
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Callable

import numpy as np

from jaxcascade.data import nifti, resolution
from jaxcascade.segmentation.cascade import Cascade, Segmentation, segment_volume
from jaxcascade.storage import shipped
from jaxcascade.errors import UserError
from jaxcascade.errors import warn as warn_user
from jaxcascade.segmentation.inference import InferenceOptions, resolve_method
from jaxcascade.data.normalisation import flair_channel, normalise_channels
from jaxcascade.runtime.outputs import NIFTI_SUFFIXES, check_free_space, check_output_path


def check_overrides(*, threshold=None, min_lesion_voxels=None, min_lesion_volume_mm3=None) -> None:
    """Refuse a setting outside its range in one line, before any work (the command line's parser does
    the same for its options): a threshold of 1.5 would keep no voxel and say nothing."""
    if threshold is not None and not 0 <= threshold <= 1:
        raise UserError(f"threshold {threshold}: a probability, from 0 to 1")
    if min_lesion_voxels is not None and not min_lesion_voxels >= 0:
        raise UserError(f"min_lesion_voxels {min_lesion_voxels}: a number of voxels, 0 or more")
    if min_lesion_volume_mm3 is not None and not 0 <= min_lesion_volume_mm3 < float("inf"):
        raise UserError(f"min_lesion_volume_mm3 {min_lesion_volume_mm3}: a volume in mm^3, 0 or more")


def segment_images(model: Cascade, images: list[nifti.Image], *, threshold=None, min_lesion_voxels=None,
                   min_lesion_volume_mm3=None, method=None, tta=None, brain_mask: np.ndarray | None = None,
                   resample: str = "auto", warn: Callable = warn_user, progress=None) -> Segmentation:
    """Segment one subject given its images in the model's channel order (restricted to brain_mask if given).

    Images whose voxel size is not the model's are segmented on a grid of the model's voxel size and the
    result brought back (`resolution.py`), unless resample is 'never' (then `warn` says so).
    min_lesion_volume_mm3, if given, sets the smallest kept lesion in mm^3 on the grid the cascade runs on.
    """
    if resample not in resolution.RESAMPLE_MODES:
        raise UserError(f"--resample {resample}: use one of {', '.join(resolution.RESAMPLE_MODES)}")
    reference = images[flair_channel(model.config)]
    working = images
    if resolution.differs(reference, model.voxel_size_mm):
        zooms = "x".join(f"{z:g}" for z in resolution.voxel_size(reference))
        trained = "x".join(f"{z:g}" for z in model.voxel_size_mm)
        if resample == "never":
            warn(f"{reference.path}: voxel size {zooms} mm, the model was trained at {trained} mm; segmenting at "
                 "the input's resolution as asked (--resample never)")
        else:
            shape, affine = resolution.working_grid(reference, model.voxel_size_mm)
            working = [resolution.onto(image, shape, affine) for image in images]
            if brain_mask is not None:
                mask_image = nifti.Image(reference.path, brain_mask.astype(np.float32), reference.nifti,
                                         reference.orientation)
                brain_mask = resolution.onto(mask_image, shape, affine).data > 0.5
    if min_lesion_volume_mm3 is not None:
        min_lesion_voxels = int(min_lesion_volume_mm3 // (working[0].voxel_volume_ml * 1000))
    result = _segment_on_grid(model, working, threshold, min_lesion_voxels, method, tta, brain_mask, progress)
    if working is images:
        return result
    on_grid = working[flair_channel(model.config)]
    return Segmentation(
        stage1_probability=resolution.back(result.stage1_probability, on_grid, reference),
        stage2_probability=resolution.back(result.stage2_probability, on_grid, reference),
        mask=resolution.back(result.mask.astype(np.float32), on_grid, reference) > 0.5,
        candidate_count=result.candidate_count, stage2_candidate_count=result.stage2_candidate_count,
        stage2_std=None if result.stage2_std is None else resolution.back(result.stage2_std, on_grid, reference),
        seconds=result.seconds,
    )


def _segment_on_grid(model, images, threshold, min_lesion_voxels, method, tta, brain_mask, progress) -> Segmentation:
    config = model.config
    options = InferenceOptions.from_config(config, threshold=threshold, min_lesion_voxels=min_lesion_voxels,
                                           method=method, tta=tta)
    # Outside the mask every image is 0: left out of the normalisation statistics and never a candidate.
    channels = [image.data if brain_mask is None else image.data * brain_mask for image in images]
    started = time.perf_counter()
    volume = normalise_channels(channels, config.normalisation, bias_correction=config.bias_correction)
    normalised = time.perf_counter() - started
    result = segment_volume(model.stage1, model.stage2, volume, flair_channel(config), options,
                            voxel_volume_ml=images[0].voxel_volume_ml, progress=progress)
    result.seconds = {"normalise": normalised, **result.seconds}
    return result


def check_segmentation_outputs(out, probabilities_dir=None, *, inputs=(), overwrite=False, tta=False) -> list[Path]:
    """Every output of one subject's segmentation checked before any work; returns the probability maps' paths.

    out: a NIfTI file name, not an input (None: no mask file); probabilities_dir: a folder (made later)
    whose maps do not exist yet unless overwrite, apart from out.
    """
    if out is not None:
        out = check_output_path(out, overwrite=overwrite, nifti=True, inputs=[i for i in inputs if i])
    if probabilities_dir is None:
        return []
    folder = check_output_path(probabilities_dir, is_dir=True)
    if folder.name.endswith(NIFTI_SUFFIXES) and not folder.is_dir():
        raise UserError(f"{probabilities_dir}: --probabilities takes a folder for the maps, not a NIfTI file name")
    paths = [folder / "stage1.nii.gz", folder / "stage2.nii.gz"] + ([folder / "stage2_std.nii.gz"] if tta else [])
    for path in paths:
        if out is not None and Path(os.path.abspath(path)) == Path(os.path.abspath(out)):
            raise UserError(f"{out}: is also where --probabilities writes {path.name}; choose another name")
        if path.exists() and not overwrite:
            raise UserError(f"{path}: already exists; pass --overwrite to replace it")
    if out is not None and Path(os.path.abspath(folder)) == Path(os.path.abspath(out)):
        raise UserError(f"{probabilities_dir}: is also --out; give the maps their own folder")
    return paths


def segment_files(model: Cascade | str | os.PathLike, inputs: dict, out=None, *, probabilities_dir=None,
                  threshold=None, min_lesion_voxels=None, min_lesion_volume_mm3=None, method=None,
                  compute_dtype=None, tta=None, brain_mask=None, resample="auto", overwrite=False, progress=None,
                  warn: Callable = warn_user) -> Segmentation:
    """Segment one subject's NIfTI files and write the mask (and probability maps), all checks first.

    model: a loaded `Cascade` or a model directory; out: the mask's file (None: returned, not written).
    brain_mask: a mask file restricting normalisation and candidates (for images not skull-stripped);
    without one, an image that does not look skull-stripped gets a one-line `warn`.
    Returns the mask and maps on the FLAIR file's own voxel grid and axis order, the arrays written.
    """
    check_overrides(threshold=threshold, min_lesion_voxels=min_lesion_voxels,
                    min_lesion_volume_mm3=min_lesion_volume_mm3)
    probability_paths = check_segmentation_outputs(out, probabilities_dir, inputs=[*inputs.values(), brain_mask],
                                                   overwrite=overwrite, tta=bool(tta))
    if not isinstance(model, Cascade):
        model = Cascade.load(shipped.locate(model), compute_dtype=compute_dtype)
    if method is not None:
        resolve_method(model.stage1, method)  # refuse an impossible --inference before any work
    images = nifti.load_sequences(inputs, model.modalities, orientation=model.config.data.orientation,
                                  reference=model.config.data.flair)
    reference = images[model.modalities.index(model.config.data.flair)]
    resampled = [image for image in images if image.resampled_from]  # the notes' order
    for image, note in zip(resampled, nifti.resampling_notes(images, model.modalities, model.config.data.flair)):
        warn(f"{image.path}: {note}")
    mask = nifti.load_brain_mask(brain_mask, reference) if brain_mask else None
    if mask is None and not nifti.looks_skull_stripped(reference.data):
        warn(f"{reference.path}: nonzero voxels reach most faces of the field of view; the image does not look "
             "skull-stripped (pass --brain-mask)")
    voxels = int(np.prod(reference.nifti.shape[:3]))
    # Uncompressed sizes (gzip only shrinks them) and a margin: a full disk found before the work.
    if out is not None or probability_paths:
        folder = Path(out).parent if out is not None else probability_paths[0].parent
        check_free_space(folder, voxels * (1 + 4 * len(probability_paths)) + 2**20, "the segmentation")
    result = segment_images(model, images, threshold=threshold, min_lesion_voxels=min_lesion_voxels,
                            min_lesion_volume_mm3=min_lesion_volume_mm3, method=method, tta=tta, brain_mask=mask,
                            resample=resample, warn=warn, progress=progress)
    maps = [result.stage1_probability, result.stage2_probability, result.stage2_std][:len(probability_paths)]
    written = []
    try:  # all of the outputs or none of them
        if probability_paths:
            probability_paths[0].parent.mkdir(exist_ok=True)
        for values, path in zip(maps, probability_paths):
            nifti.save_like(values, reference, path, dtype=np.float32)
            written.append(path)
        if out is not None:
            nifti.save_like(result.mask, reference, out, dtype=np.uint8)
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    return on_file_grid(result, reference)


def on_file_grid(result: Segmentation, reference: nifti.Image) -> Segmentation:
    """result's arrays (on the processing grid) on the reference file's own voxel grid, as `save_like` writes
    them: a caller scores them against arrays read from files, in the files' axis order (an LPS truth
    scored against the RAS mask read DSC 0.04 where the written mask was right)."""
    def file_grid(array, dtype=np.float32):
        return None if array is None else reference.to_file_grid(array).astype(dtype, copy=False)

    return dataclasses.replace(result, mask=file_grid(result.mask, bool),
                               stage1_probability=file_grid(result.stage1_probability),
                               stage2_probability=file_grid(result.stage2_probability),
                               stage2_std=file_grid(result.stage2_std))
