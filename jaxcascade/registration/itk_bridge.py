"""nibabel images <-> SimpleITK images, and SimpleITK linear transforms -> RAS matrices.

The only module of the package that touches SimpleITK types; they never leave `rigid` and `brain`.
SimpleITK is imported on first use, so that `jaxcascade.registration.transforms` works without it.
"""

from __future__ import annotations

import nibabel as nib
import numpy as np

from jaxcascade.errors import UserError
from jaxcascade.registration.transforms import lps_to_ras, ras_to_lps

INSTALL_HINT = "pip install 'jaxcascade[clinical]' (or pip install SimpleITK nilearn)"
_FLIP_XY3 = np.diag([-1.0, -1.0, 1.0])


def simpleitk(purpose: str = "registration"):
    """The SimpleITK module, or a one-line UserError with the install hint."""
    try:
        import SimpleITK
    except ImportError:
        raise UserError(f"{purpose} needs SimpleITK: {INSTALL_HINT}") from None
    return SimpleITK


def to_sitk(image: nib.spatialimages.SpatialImage, dtype=np.float32):
    """A SimpleITK image with the same voxels and world geometry (LPS origin and direction)."""
    sitk = simpleitk()
    data = np.asarray(image.dataobj, dtype)
    # SimpleITK arrays are indexed (z, y, x): the transpose keeps voxel (i, j, k) at ITK index (i, j, k).
    result = sitk.GetImageFromArray(np.ascontiguousarray(data.transpose(2, 1, 0)))
    affine = np.asarray(image.affine, np.float64)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    result.SetSpacing([float(value) for value in spacing])
    result.SetOrigin([float(value) for value in _FLIP_XY3 @ affine[:3, 3]])
    result.SetDirection([float(value) for value in (_FLIP_XY3 @ affine[:3, :3] / spacing).ravel()])
    return result


def from_sitk(image) -> nib.Nifti1Image:
    """A nibabel image (float32 or the image's integer type) with the SimpleITK image's geometry."""
    sitk = simpleitk()
    data = sitk.GetArrayFromImage(image).transpose(2, 1, 0)
    affine = np.eye(4)
    direction = np.array(image.GetDirection()).reshape(3, 3)
    affine[:3, :3] = _FLIP_XY3 @ direction @ np.diag(image.GetSpacing())
    affine[:3, 3] = _FLIP_XY3 @ np.array(image.GetOrigin())
    return nib.Nifti1Image(np.ascontiguousarray(data), affine)


def transform_to_ras(transform) -> np.ndarray:
    """The 4x4 RAS fixed -> moving matrix of a SimpleITK linear (matrix-offset) transform."""
    sitk = simpleitk()
    if transform.GetName() == "CompositeTransform":
        composite = sitk.CompositeTransform(transform)
        # ITK applies a composite's last-added transform first.
        matrices = [transform_to_ras(composite.GetNthTransform(index))
                    for index in range(composite.GetNumberOfTransforms())]
        result = np.eye(4)
        for matrix in matrices:
            result = result @ matrix
        return result
    points = np.array([[0.0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]])
    # Read the map off four points: works for every linear ITK transform without knowing its parameters.
    mapped = np.array([transform.TransformPoint([float(value) for value in point]) for point in points])
    lps = np.eye(4)
    lps[:3, 3] = mapped[0]
    lps[:3, :3] = (mapped[1:] - mapped[0]).T
    return lps_to_ras(lps)


def ras_to_transform(matrix: np.ndarray):
    """A SimpleITK AffineTransform equal to the RAS fixed -> moving `matrix`."""
    sitk = simpleitk()
    lps = ras_to_lps(matrix)
    return sitk.AffineTransform([float(value) for value in lps[:3, :3].ravel()],
                                [float(value) for value in lps[:3, 3]])
