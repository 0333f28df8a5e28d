"""Segmenting one subject's NIfTI images: every output checked first, the model opened and the images
loaded (files or nibabel images in memory), `images.segment_images` run, the mask and maps written together,
and the result given back on the FLAIR file's own voxel grid.

`segment_files(model, inputs, out, options)` is what `jaxcascade segment --input ... --out` and
`jaxcascade.segment` run.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Callable

import numpy as np

from jaxcascade.data import nifti
from jaxcascade.data.subjects import load_images
from jaxcascade.errors import UserError
from jaxcascade.errors import warn as warn_user
from jaxcascade.runtime.outputs import NIFTI_SUFFIXES, check_free_space, check_output_path
from jaxcascade.segmentation.cascade import Cascade, Segmentation
from jaxcascade.segmentation.images import segment_images
from jaxcascade.segmentation.inference import resolve_method
from jaxcascade.segmentation.options import SegmentOptions
from jaxcascade.storage import model_directory, shipped


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
        raise UserError(f"{probabilities_dir}: probabilities=... takes a folder for the maps, not a NIfTI file name")
    paths = [folder / "stage1.nii.gz", folder / "stage2.nii.gz"] + ([folder / "stage2_std.nii.gz"] if tta else [])
    for path in paths:
        if out is not None and Path(os.path.abspath(path)) == Path(os.path.abspath(out)):
            raise UserError(f"{out}: is also where probabilities=... writes {path.name}; choose another name")
        if path.exists() and not overwrite:
            raise UserError(f"{path}: already exists; pass overwrite=True to replace it")
    if out is not None and Path(os.path.abspath(folder)) == Path(os.path.abspath(out)):
        raise UserError(f"{probabilities_dir}: is also out=...; give the maps their own folder")
    return paths


def segment_files(model: Cascade | str | os.PathLike, inputs: dict, out=None, *,
                  options: SegmentOptions = SegmentOptions(), probabilities_dir=None, brain_mask=None,
                  compute_dtype: str | None = None, overwrite: bool = False, progress: Callable | None = None,
                  warn: Callable[[str], None] = warn_user) -> Segmentation:
    """Segment one subject's NIfTI images and write the mask (and probability maps), all checks first.

    model: a loaded `Cascade` or a model directory (opened with compute_dtype); inputs: {modality: a file
    or a nibabel image}; out: the mask's file (None: returned, not written). brain_mask: a mask file
    restricting normalisation and candidates (for images not skull-stripped); without one, an image that
    does not look skull-stripped gets a one-line `warn`. Returns the mask and maps on the FLAIR's own
    voxel grid and axis order, the arrays written.
    """
    files = [value for value in (*inputs.values(), brain_mask) if isinstance(value, (str, os.PathLike))]
    probability_paths = check_segmentation_outputs(out, probabilities_dir, inputs=files, overwrite=overwrite,
                                                   tta=bool(options.tta))
    if not isinstance(model, Cascade):
        model = Cascade.from_model(model_directory.open_model(shipped.locate(model)), compute_dtype=compute_dtype)
    if options.method is not None:
        resolve_method(model.stage1, options.method)  # refuse an impossible method before any work
    images, mask = _load(model, inputs, brain_mask, warn)
    reference = images[model.flair_channel]
    # Uncompressed sizes (gzip only shrinks them) and a margin: a full disk found before the work.
    if out is not None or probability_paths:
        folder = Path(out).parent if out is not None else probability_paths[0].parent
        check_free_space(folder, int(np.prod(reference.nifti.shape[:3])) * (1 + 4 * len(probability_paths)) + 2**20,
                         "the segmentation")
    result = on_file_grid(segment_images(model, images, options, brain_mask=mask, warn=warn, progress=progress),
                          reference)
    maps = [result.stage1_probability, result.stage2_probability, result.stage2_std][:len(probability_paths)]
    written = []
    try:  # all of the outputs or none of them
        if probability_paths:
            probability_paths[0].parent.mkdir(exist_ok=True)
        for values, path in zip(maps, probability_paths):
            nifti.save_on_file_grid(values, reference, path, dtype=np.float32)
            written.append(path)
        if out is not None:
            nifti.save_on_file_grid(result.mask, reference, out, dtype=np.uint8)
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    return result


def _load(model: Cascade, inputs: dict, brain_mask, warn) -> tuple[list[nifti.Image], np.ndarray | None]:
    """The subject's images in the model's channel order on the FLAIR's grid, and its brain mask (if given)."""
    loaded = load_images(inputs, model.config.data, brain_mask=brain_mask)
    resampled = [image for image in loaded.images if image.resampled_from]  # the notes' order
    for image, note in zip(resampled, loaded.resampled):
        warn(f"{image.path}: {note}")
    if loaded.skull_stripped == "no":
        warn(f"{loaded.reference.path}: nonzero voxels reach most faces of the field of view; the image does not "
             "look skull-stripped (pass brain_mask=...)")
    return loaded.images, loaded.brain_mask


def on_file_grid(result: Segmentation, reference: nifti.Image) -> Segmentation:
    """result's arrays (on the processing grid) on the reference file's own voxel grid, as `save_like` writes
    them: a caller scores them against arrays read from files, in the files' axis order (an LPS truth
    scored against the RAS mask read DSC 0.04 where the written mask was right)."""
    arrays = {name: getattr(result, name) for name in ("mask", "stage1_probability", "stage2_probability",
                                                       "stage2_std")}
    moved = {name: None if array is None else reference.to_file_grid(array) for name, array in arrays.items()}
    return dataclasses.replace(result, **{name: None if array is None else array.astype(
        bool if name == "mask" else np.float32, copy=False) for name, array in moved.items()})
