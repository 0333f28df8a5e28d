"""Bias-field correction before normalisation: N4 (Tustison et al. 2010) through SimpleITK.

Real MS pipelines run N4 first: a scanner's smooth multiplicative gain makes
the same tissue brighter on one side of the brain, which a per-image
normalisation cannot undo and which moves voxels across the candidate
threshold. `correct(image, "n4")` divides the image by N4's field, fitted on
its nonzero voxels; zeros (background, or outside a brain mask) stay zero, so
normalisation statistics still see the same voxels. SimpleITK is an optional
extra: pip install 'jaxcascade[n4]'.

Settings, chosen to cost seconds rather than minutes on CPU:
  - the fit runs on the image shrunk by an integer factor so that its longest
    axis has about 64 voxels (at most 4, ANTs' usual factor for 1 mm brains);
    the field, a B-spline, is then evaluated at full resolution;
  - 3 fitting levels (SimpleITK's default 4 control points per axis, its B-spline mesh doubled at each level) of
    at most 30 iterations each, convergence threshold 1e-3 (SimpleITK's default);
    N4's field is smooth across the brain whatever the voxel size.
"""

from __future__ import annotations

import numpy as np

from jaxcascade.errors import UserError

BIAS_CORRECTIONS = ("none", "n4")
_FIT_AXIS_VOXELS = 64
_MAX_SHRINK = 4
_ITERATIONS_PER_LEVEL = (30, 30, 30)
_CONVERGENCE_THRESHOLD = 1e-3
_INSTALL_HINT = "pip install 'jaxcascade[n4]' (or pip install SimpleITK)"


def check_method(method: str) -> None:
    """Refuse an unknown method, or 'n4' without SimpleITK, with a one-line UserError."""
    if method not in BIAS_CORRECTIONS:
        raise UserError(f"config bias_correction={method!r}: use one of {', '.join(BIAS_CORRECTIONS)}")
    if method == "n4":
        _simpleitk()


def _simpleitk():
    try:
        import SimpleITK
    except ImportError:
        raise UserError(f"config bias_correction='n4' needs SimpleITK: {_INSTALL_HINT}") from None
    return SimpleITK


def shrink_factor(shape: tuple[int, ...]) -> int:
    """The integer shrink that brings the longest axis near _FIT_AXIS_VOXELS (1 for small images)."""
    return int(np.clip(round(max(shape) / _FIT_AXIS_VOXELS), 1, _MAX_SHRINK))


def correct(image: np.ndarray, method: str) -> np.ndarray:
    """The image with its bias field removed ('n4'), or unchanged ('none')."""
    if method == "none":
        return image
    check_method(method)
    return n4(image)


def n4(image: np.ndarray) -> np.ndarray:
    """N4-corrected float32 image; the fit uses the voxels above 0 (N4 works on log intensities)."""
    sitk = _simpleitk()
    image = np.asarray(image, np.float32)
    mask = image > 0
    if not mask.any():
        return image
    full = sitk.GetImageFromArray(image)
    factor = shrink_factor(image.shape)
    shrunk = sitk.Shrink(full, [factor] * 3)
    shrunk_mask = sitk.Shrink(sitk.GetImageFromArray(mask.astype(np.uint8)), [factor] * 3)
    corrector = sitk.N4BiasFieldCorrectionImageFilter()
    corrector.SetMaximumNumberOfIterations(list(_ITERATIONS_PER_LEVEL))
    corrector.SetConvergenceThreshold(_CONVERGENCE_THRESHOLD)
    corrector.Execute(shrunk, shrunk_mask)
    log_field = sitk.GetArrayFromImage(corrector.GetLogBiasFieldAsImage(full))
    corrected = image / np.exp(log_field)
    return np.where(mask, corrected, image).astype(np.float32)
