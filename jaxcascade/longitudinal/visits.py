"""Two clinical visits into one space: each visit's sequences onto its FLAIR, the follow-up onto the baseline,
a brain mask, and a working grid at the model's voxel size around the brain.

Everything is expressed as world -> world point maps in RAS millimetres (`registration.transforms`: a
map takes a point of the fixed image to the matching point of the moving image). The working grid is
axis-aligned in RAS at the model's voxel size over the baseline brain's bounding box, so the cascade
runs where the brain is and at the resolution it was trained at, whatever the FLAIR's own slices.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from jaxcascade.data import nifti
from jaxcascade.data.intensity_matching import match_intensities
from jaxcascade.errors import UserError
from jaxcascade.registration import brain, rigid, transforms

BRAIN_MASK_MODES = ("auto", "extract", "none")
# Beyond the brain's bounding box, so that the patches at its edge see their neighbourhood.
GRID_MARGIN_MM = 6.0


@dataclasses.dataclass(frozen=True)
class Visit:
    """One visit's sequences by modality name (paths) and, optionally, ITK transforms already estimated:
    `NAME -> file` maps this visit's FLAIR points onto NAME's (NAME's registration onto the FLAIR), and
    `FLAIR -> file` maps a space common to both visits onto this visit's FLAIR (given for both visits,
    it replaces the registration of the follow-up onto the baseline)."""

    images: dict[str, str | os.PathLike]
    transforms: dict[str, str | os.PathLike] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class AlignmentOptions:
    registration: rigid.RegistrationOptions = rigid.RegistrationOptions()
    brain_mask: str = "auto"  # auto: extract where the FLAIR is not skull-stripped; extract: always; none: never
    match_intensities: bool = True  # the follow-up's intensities onto the baseline's, inside the brain

    def __post_init__(self):
        if self.brain_mask not in BRAIN_MASK_MODES:
            raise UserError(f"brain_mask={self.brain_mask!r}: use one of {', '.join(BRAIN_MASK_MODES)}")


@dataclasses.dataclass(frozen=True)
class Aligned:
    """Both visits on one working grid (channels in the model's order), and how they got there."""

    grid_affine: np.ndarray
    baseline: list[np.ndarray]
    followup: list[np.ndarray]
    brain_mask: np.ndarray
    followup_to_baseline: np.ndarray  # baseline FLAIR points -> follow-up FLAIR points (RAS mm)
    to_flair: dict  # (visit, modality) -> that visit's FLAIR points -> the modality's points
    brain_extracted: bool
    flair_channel: int
    seconds: dict


def _load(path, modality: str) -> nib.Nifti1Image:
    """A sequence as stored (its own grid), through the project's reader's checks (headers, NaN, zeros)."""
    image = nifti.load_image(path, orientation=nifti.NATIVE)
    return nib.Nifti1Image(image.data, image.affine)


def _given_transform(visit: Visit, name: str) -> np.ndarray | None:
    path = visit.transforms.get(name)
    return None if path is None else transforms.read_itk_transform(path)


def _within_visit(visit: Visit, images: dict[str, nib.Nifti1Image], modality: str, flair: str,
                  options) -> np.ndarray:
    given = _given_transform(visit, modality)
    if given is not None:
        return given
    return rigid.register(images[flair], images[modality], options.registration)


def working_grid(mask: nib.Nifti1Image, voxel_mm: tuple[float, float, float]) -> tuple[tuple, np.ndarray]:
    """(shape, affine) of an RAS grid of voxel_mm over the mask's bounding box (+ GRID_MARGIN_MM)."""
    voxels = np.argwhere(np.asarray(mask.dataobj) > 0)
    if voxels.size == 0:
        raise UserError("the brain mask is empty: give the visit's FLAIR (head or skull-stripped brain) or "
                        "brain_mask='none' if the images are already masked")
    low, high = voxels.min(0) - 0.5, voxels.max(0) + 0.5
    corners = np.array(list(itertools.product(*zip(low, high))))  # the box's 8 corners, in voxels
    world = transforms.apply(np.asarray(mask.affine, np.float64), corners)
    start, stop = world.min(0) - GRID_MARGIN_MM, world.max(0) + GRID_MARGIN_MM
    spacing = np.asarray(voxel_mm, np.float64)
    shape = tuple(int(n) for n in np.ceil((stop - start) / spacing))
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = start + spacing / 2
    return shape, affine


def align(modalities: tuple[str, ...], baseline: Visit, followup: Visit, voxel_mm,
          options: AlignmentOptions = AlignmentOptions(), *, flair: str = "FLAIR") -> Aligned:
    """Both visits' sequences (in `modalities`' order) on one RAS working grid at voxel_mm, masked to the brain.

    `flair` names the sequence both visits are aligned on (the model's FLAIR)."""
    seconds: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(phase):
        nonlocal clock
        now = time.perf_counter()
        seconds[phase] = seconds.get(phase, 0.0) + now - clock
        clock = now

    for name, visit in (("baseline", baseline), ("follow-up", followup)):
        missing = [m for m in modalities if m not in visit.images]
        if missing or flair not in visit.images:
            raise UserError(f"{name} visit: missing {', '.join(missing or [flair])}; the model reads "
                            f"{', '.join(modalities)} and the visits are aligned on their FLAIRs")
    loaded = {key: {m: _load(visit.images[m], m) for m in modalities}
              for key, visit in (("baseline", baseline), ("followup", followup))}
    lap("load")
    to_flair = {(key, m): (np.eye(4) if m == flair else _within_visit(visit, loaded[key], m, flair, options))
                for key, visit in (("baseline", baseline), ("followup", followup)) for m in modalities}
    lap("register within visits")
    reference = loaded["baseline"][flair]
    extracted = options.brain_mask == "extract" or (
        options.brain_mask == "auto" and not brain.looks_skull_stripped(reference))
    mask = brain.extract_brain(reference) if extracted else nib.Nifti1Image(
        (np.asarray(reference.dataobj) != 0).astype(np.uint8), reference.affine)
    lap("brain mask")
    common_b, common_f = _given_transform(baseline, flair), _given_transform(followup, flair)
    if common_b is not None and common_f is not None:
        # baseline FLAIR -> common space -> follow-up FLAIR
        followup_to_baseline = transforms.chain(transforms.invert(common_b), common_f)
    else:
        followup_to_baseline = rigid.register(reference, loaded["followup"][flair], options.registration,
                                              fixed_mask=mask)
    lap("register visits")
    shape, affine = working_grid(mask, voxel_mm)
    grid = nib.Nifti1Image(np.zeros(shape, np.uint8), affine)
    brain_on_grid = transforms.resample(mask, grid, order=0).get_fdata() > 0.5

    def on_grid(key: str, modality: str) -> np.ndarray:
        first = np.eye(4) if key == "baseline" else followup_to_baseline
        data = transforms.resample(loaded[key][modality], grid, transforms.chain(first, to_flair[(key, modality)]))
        return np.where(brain_on_grid, np.asarray(data.dataobj, np.float32), np.float32(0))

    channels = {key: [on_grid(key, m) for m in modalities] for key in ("baseline", "followup")}
    lap("resample")
    if options.match_intensities:
        channels["followup"] = [
            np.where(brain_on_grid, match_intensities(f, b, brain_on_grid & (f != 0), brain_on_grid & (b != 0)), 0)
            .astype(np.float32) for b, f in zip(channels["baseline"], channels["followup"])]
        lap("match intensities")
    return Aligned(grid_affine=affine, baseline=channels["baseline"], followup=channels["followup"],
                   brain_mask=brain_on_grid, followup_to_baseline=followup_to_baseline, to_flair=to_flair,
                   brain_extracted=extracted, flair_channel=modalities.index(flair), seconds=seconds)


def as_images(channels: list[np.ndarray], affine: np.ndarray, modalities, label: str) -> list[nifti.Image]:
    """The channels as the cascade's images (already in RAS on the working grid)."""
    return [nifti.Image(path=Path(f"{label} {m}"), data=data, nifti=nib.Nifti1Image(data, affine), orientation="RAS")
            for m, data in zip(modalities, channels)]
