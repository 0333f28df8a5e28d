"""Rigid and affine registration by Mattes mutual information (SimpleITK), coarse to fine.

    transform = register(fixed_image, moving_image, RegistrationOptions(kind="rigid"))
    on_fixed = transforms.resample(moving_image, fixed_image, transform)

`register` returns the 4x4 RAS fixed -> moving world matrix (see `transforms`); no SimpleITK type
leaves it. Clinical scans are anisotropic (0.5-0.9 mm in plane, 3-4 mm slices), so the pyramid is
built per axis: at each level both images are block-averaged to about `level_spacings_mm` (a 0.72 x
0.72 x 4 mm FLAIR becomes 4.3 x 4.3 x 4 mm, then 2.2 x 2.2 x 4 mm), rather than shrunk by one
factor on every axis, which would leave slices 16 mm apart. The finest level is 2 mm: on patient01 a
further 1 mm level (10% sampling) took 15-34 s a pair instead of 1-3 s, for mean residuals of
0.31-0.95 mm instead of 0.35-1.14 mm against the database's transforms.

Deterministic: the metric samples a fixed random subset (`seed`) and the registration, filters included,
runs on `threads` threads (default 1): two runs with the same options give bitwise the same matrix (with
more threads, the same up to ITK's floating-point summation order). The
starting point is the scanner's own world alignment (the headers) or `initial`. Needs SimpleITK
(`pip install 'jaxcascade[clinical]'`).

Why SimpleITK (experiments/measured/clinical_preprocessing/, patient01, one thread): it is already the
project's optional dependency (N4) and pins nothing, where antspyx 0.6.3 pins numpy<2.4 and scipy<1.16.
Its rigid registration here takes 0.9-1.9 s a pair and lands 0.35 mm (mean; max 0.63) from the database's
follow-up-to-baseline transform and 0.76-1.14 mm (max 2.03) from its T1W/T2W-to-FLAIR ones, mostly
a shift along the 3-4 mm slices. Those are affine, but nearly rigid (the nearest rigid transform lands
0.13-0.41 mm from them), and `kind="affine"` moves ours by -0.08 to +0.01 mm: the gap is in the search,
not the model (docs/longitudinal.md, "Registration and brain extraction"). ANTsPy's `Rigid` lands
closer (0.24-0.48 mm mean) but takes 41-142 s a pair, its `QuickRigid` 7-19 s for 0.40-1.81 mm (that
run shared the machine: ours took 2.0-5.9 s in it). picsl-greedy was not measured.
"""

from __future__ import annotations

import dataclasses

import nibabel as nib
import numpy as np

from jaxcascade.errors import UserError
from jaxcascade.registration import itk_bridge, transforms

KINDS = ("rigid", "affine")
# The rigid optimiser's first step (mm of motion at most, its scales being physical shifts).
_FIRST_STEP_MM = 2.0


@dataclasses.dataclass(frozen=True)
class RegistrationOptions:
    """How `register` searches. The defaults were measured on patient01's five pairs."""

    kind: str = "rigid"  # "affine" adds a 12-parameter pass at the finest level
    level_spacings_mm: tuple[float, ...] = (4.0, 2.0)  # pyramid, coarse to fine
    histogram_bins: int = 32
    sampling_fraction: float = 0.25  # of each level's voxels, drawn once with `seed`
    iterations: int = 200  # at most, per level
    # The optimiser halves its step at each reversal and stops below min_step_mm or when the gradient's norm
    # falls below gradient_tolerance. A 1e-3 mm floor stopped after ~20 iterations 2.7 mm from a known
    # motion (tests/test_registration.py); these stop within 0.45 mm of it.
    min_step_mm: float = 1e-4
    gradient_tolerance: float = 3e-5
    seed: int = 1
    threads: int = 1

    def __post_init__(self):
        if self.kind not in KINDS:
            raise UserError(f"registration kind={self.kind!r}: use one of {', '.join(KINDS)}")
        if not self.level_spacings_mm or min(self.level_spacings_mm) <= 0:
            raise UserError(f"registration level_spacings_mm={self.level_spacings_mm!r}: give positive sizes in mm")
        if not 0 < self.sampling_fraction <= 1:
            raise UserError(f"registration sampling_fraction={self.sampling_fraction}: use a fraction in (0, 1]")


def register(fixed: nib.spatialimages.SpatialImage, moving: nib.spatialimages.SpatialImage,
             options: RegistrationOptions = RegistrationOptions(), *,
             fixed_mask: nib.spatialimages.SpatialImage | None = None,
             initial: np.ndarray | None = None) -> np.ndarray:
    """The RAS fixed -> moving matrix that best aligns `moving` to `fixed` by mutual information.

    Args:
      fixed, moving: 3D images, any grids; their headers' world coordinates are the starting point.
      options: the pyramid, metric and optimiser settings.
      fixed_mask: if given, the metric only samples the fixed image's voxels where it is nonzero
        (e.g. a brain mask, so that neck and scalp do not drive a follow-up onto its baseline).
      initial: the starting fixed -> moving matrix (default identity: the scanner's alignment).
    Returns:
      4x4 float64 matrix, RAS mm; `kind="rigid"` gives a rotation and a translation.
    """
    sitk = itk_bridge.simpleitk()
    fixed_itk, moving_itk = itk_bridge.to_sitk(fixed), itk_bridge.to_sitk(moving)
    mask_itk = None if fixed_mask is None else itk_bridge.to_sitk(fixed_mask, np.uint8)
    current = np.eye(4) if initial is None else np.asarray(initial, np.float64)
    centre = fixed_itk.TransformContinuousIndexToPhysicalPoint([(size - 1) / 2 for size in fixed_itk.GetSize()])
    passes = [("rigid", spacing) for spacing in options.level_spacings_mm]
    if options.kind == "affine":
        passes.append(("affine", min(options.level_spacings_mm)))
    # ITK's metrics and filters split their sums over the process-wide default thread count whatever the
    # registration method is told, so two runs differed in the last bits, and through a brain mask's
    # thresholds and the metric's samples a later registration by 0.02 mm (patient01's change DSC moved
    # by 0.003 between runs). With the default set to `threads` (1) meanwhile, every run is bitwise the same.
    previous = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(options.threads)
    try:
        for kind, spacing_mm in passes:
            fixed_level = _block_average(sitk, fixed_itk, spacing_mm)
            moving_level = _block_average(sitk, moving_itk, spacing_mm)
            mask_level = None if mask_itk is None else _block_max(sitk, mask_itk, spacing_mm)
            current = _one_level(sitk, fixed_level, moving_level, mask_level, current, kind, centre, options)
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(previous)
    return current


def _one_level(sitk, fixed, moving, mask, initial: np.ndarray, kind: str, centre, options) -> np.ndarray:
    method = sitk.ImageRegistrationMethod()
    method.SetNumberOfThreads(options.threads)
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=options.histogram_bins)
    method.SetMetricSamplingStrategy(method.RANDOM)
    method.SetMetricSamplingPercentage(options.sampling_fraction, options.seed)
    if mask is not None:
        method.SetMetricFixedMask(mask)
    method.SetInterpolator(sitk.sitkLinear)
    if kind == "rigid":
        method.SetOptimizerAsRegularStepGradientDescent(learningRate=_FIRST_STEP_MM, minStep=options.min_step_mm,
                                                        numberOfIterations=options.iterations, relaxationFactor=0.5,
                                                        gradientMagnitudeTolerance=options.gradient_tolerance)
    else:
        # The regular-step descent walked the 12 affine parameters uphill on patient01 (scale 0.45, MI
        # -1.05 -> -0.63 from the rigid answer); a line search only accepts steps that improve the metric.
        method.SetOptimizerAsConjugateGradientLineSearch(learningRate=1.0, numberOfIterations=options.iterations,
                                                         convergenceMinimumValue=1e-6, convergenceWindowSize=10)
    # One millimetre of motion anywhere in the image weighs the same for every parameter.
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetInitialTransform(_parametrised(sitk, initial, kind, centre), inPlace=False)
    try:
        result = method.Execute(fixed, moving)
    except RuntimeError as error:
        first_line = (str(error).strip().splitlines() or [""])[-1]
        raise UserError(f"registration failed ({first_line[:160]}): do the two images overlap in world "
                        "coordinates? give an initial transform") from None
    return itk_bridge.transform_to_ras(result)


def _parametrised(sitk, matrix_ras: np.ndarray, kind: str, centre):
    """`matrix_ras` as an Euler (rigid) or affine ITK transform about `centre`, for the optimiser.

    ITK maps x to M (x - c) + t + c; the translation t is computed here because ITK's SetCenter keeps
    t and so would move the map.
    """
    lps = transforms.ras_to_lps(matrix_ras)
    matrix = lps[:3, :3]
    if kind == "rigid":
        # The nearest rotation to a (possibly scaled) starting matrix: its polar decomposition.
        u, _, vt = np.linalg.svd(matrix)
        matrix = u @ vt
    centre = np.asarray(centre, np.float64)
    translation = lps[:3, 3] - centre + matrix @ centre
    transform = sitk.AffineTransform(3) if kind == "affine" else sitk.Euler3DTransform()
    transform.SetCenter([float(value) for value in centre])
    transform.SetMatrix([float(value) for value in matrix.ravel()])
    transform.SetTranslation([float(value) for value in translation])
    return transform


def _factors(image, spacing_mm: float) -> list[int]:
    return [max(1, int(round(spacing_mm / spacing))) for spacing in image.GetSpacing()]


def _block_average(sitk, image, spacing_mm: float):
    factors = _factors(image, spacing_mm)
    return image if factors == [1, 1, 1] else sitk.BinShrink(image, factors)


def _block_max(sitk, mask, spacing_mm: float):
    factors = _factors(mask, spacing_mm)
    if factors == [1, 1, 1]:
        return mask
    # A coarse voxel belongs to the mask if any voxel of its block does.
    return sitk.Cast(sitk.BinShrink(sitk.Cast(mask, sitk.sitkFloat32), factors) > 0, sitk.sitkUInt8)
