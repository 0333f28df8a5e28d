"""World-space affine transforms: ITK text files in and out, LPS/RAS, composition, resampling.

A transform is a 4x4 float64 matrix mapping a world point (mm, RAS+, as nibabel affines use) of the
fixed image to the matching point of the moving image: `resample(moving, fixed, transform)` puts the
moving image on the fixed grid. ITK files store the same direction (fixed -> moving, which is why a
file named "T1W_to_FLAIR" holds a map from FLAIR points to T1W points) but in LPS coordinates and
with a centre of rotation among its "FixedParameters".

API:
  read_itk_transform(path) -> 4x4 RAS          write_itk_transform(path, transform)
  lps_to_ras(m) / ras_to_lps(m)                invert(m), chain(m1, m2, ...): m1 applied first
  resample(moving, reference, transform, order) -> nibabel image on the reference grid
  displacement_mm(a, b, points) -> |a(x) - b(x)| per point;  mask_points(image) -> world points
Needs only numpy, scipy and nibabel (no SimpleITK).
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from jaxcascade.errors import UserError

# Flips x and y: LPS (ITK, DICOM) <-> RAS (NIfTI world, nibabel). Its own inverse.
_FLIP_XY = np.diag([-1.0, -1.0, 1.0, 1.0])
_MAGIC = "#Insight Transform File V1.0"
# Transform type (without its _double_3_3 / _float_3_3 suffix) -> number of Parameters.
_PARAMETER_COUNTS = {"MatrixOffsetTransformBase": 12, "AffineTransform": 12, "Euler3DTransform": 6,
                     "VersorRigid3DTransform": 6, "Similarity3DTransform": 7, "TranslationTransform": 3}


def lps_to_ras(transform_lps: np.ndarray) -> np.ndarray:
    """The same point map written in RAS coordinates (x and y negated on both sides)."""
    return _FLIP_XY @ np.asarray(transform_lps, np.float64) @ _FLIP_XY


ras_to_lps = lps_to_ras  # the flip is its own inverse, so is the conversion


def invert(transform: np.ndarray) -> np.ndarray:
    """The inverse point map (moving -> fixed)."""
    return np.linalg.inv(np.asarray(transform, np.float64))


def chain(*transforms: np.ndarray) -> np.ndarray:
    """The point map that applies `transforms[0]` first, then `transforms[1]`, and so on."""
    result = np.eye(4)
    for transform in transforms:
        result = np.asarray(transform, np.float64) @ result
    return result


def apply(transform: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Points (N, 3) mapped through `transform`."""
    points = np.asarray(points, np.float64)
    return points @ transform[:3, :3].T + transform[:3, 3]


def displacement_mm(first: np.ndarray, second: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Distance (mm) between where `first` and `second` send each of `points` (N, 3)."""
    return np.linalg.norm(apply(first, points) - apply(second, points), axis=1)


def mask_points(image: nib.spatialimages.SpatialImage) -> np.ndarray:
    """World coordinates (N, 3, RAS mm) of the centres of the image's nonzero voxels."""
    voxels = np.argwhere(np.asarray(image.dataobj) > 0)
    return apply(np.asarray(image.affine, np.float64), voxels)


def resample(moving: nib.spatialimages.SpatialImage, reference: nib.spatialimages.SpatialImage,
             transform: np.ndarray | None = None, order: int = 1) -> nib.Nifti1Image:
    """`moving` on the grid of `reference` (float32), through the fixed -> moving `transform`.

    order=1: trilinear (images); order=0: nearest neighbour (label maps and masks). Points that fall
    outside the moving image are 0.
    """
    if order not in (0, 1):
        raise ValueError(f"order={order}: use 0 (nearest) or 1 (linear)")
    transform = np.eye(4) if transform is None else np.asarray(transform, np.float64)
    voxel_map = np.linalg.inv(np.asarray(moving.affine, np.float64)) @ transform @ np.asarray(reference.affine)
    data = np.asarray(moving.dataobj, np.float32)
    resampled = ndimage.affine_transform(data, voxel_map[:3, :3], voxel_map[:3, 3],
                                         output_shape=reference.shape[:3], order=order, mode="constant",
                                         cval=0.0, prefilter=False)
    return nib.Nifti1Image(resampled, reference.affine)


def read_itk_transform(path: str | Path) -> np.ndarray:
    """The fixed -> moving RAS matrix of an ITK text transform file (one 3D linear transform)."""
    return lps_to_ras(read_itk_transform_lps(path))


def read_itk_transform_lps(path: str | Path) -> np.ndarray:
    """The fixed -> moving matrix of an ITK text transform file, in ITK's own LPS coordinates."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise UserError(f"{path}: cannot read the transform file ({error.strerror})") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a text file; give an ITK text transform (.txt/.tfm; .mat is not read)") from None
    fields = _parse_fields(path, text)
    kind = fields["Transform"].split("_")[0]
    if kind not in _PARAMETER_COUNTS:
        raise UserError(f"{path}: transform type {fields['Transform']!r} is not supported; "
                        f"use a 3D linear one ({', '.join(_PARAMETER_COUNTS)})")
    parameters = _numbers(path, "Parameters", fields["Parameters"])
    fixed = _numbers(path, "FixedParameters", fields.get("FixedParameters", ""))
    if not fields["Transform"].endswith("_3_3") and kind != "TranslationTransform":
        raise UserError(f"{path}: {fields['Transform']!r} is not a 3D transform (its name should end in _3_3)")
    if len(parameters) != _PARAMETER_COUNTS[kind]:
        raise UserError(f"{path}: {kind} needs {_PARAMETER_COUNTS[kind]} Parameters, the file has {len(parameters)}")
    centre = np.zeros(3) if kind == "TranslationTransform" else _centre(path, fixed)
    matrix, translation = _matrix_and_translation(kind, parameters, fixed)
    transform = np.eye(4)
    transform[:3, :3] = matrix
    # ITK: y = M (x - c) + t + c
    transform[:3, 3] = translation + centre - matrix @ centre
    if abs(np.linalg.det(matrix)) < 1e-6:
        raise UserError(f"{path}: the transform's matrix is singular; the file does not describe a usable transform")
    return transform


def write_itk_transform(path: str | Path, transform: np.ndarray) -> None:
    """Write a fixed -> moving RAS matrix as an ITK AffineTransform text file (LPS, centre 0)."""
    lps = ras_to_lps(transform)
    parameters = list(lps[:3, :3].ravel()) + list(lps[:3, 3])
    lines = [_MAGIC, "#Transform 0", "Transform: AffineTransform_double_3_3",
             "Parameters: " + " ".join(repr(float(value)) for value in parameters),
             "FixedParameters: 0 0 0", ""]
    Path(path).write_text("\n".join(lines))


def _parse_fields(path: Path, text: str) -> dict[str, str]:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines or not lines[0].startswith("#Insight Transform File"):
        raise UserError(f"{path}: not an ITK text transform (the first line should be {_MAGIC!r})")
    fields: dict[str, str] = {}
    for line in lines[1:]:
        if line.startswith("#"):
            continue
        key, separator, value = line.partition(":")
        if not separator:
            raise UserError(f"{path}: line {line[:60]!r} is not 'Key: values'")
        if key.strip() in fields:
            raise UserError(f"{path}: holds more than one transform; give a single linear transform per file")
        fields[key.strip()] = value.strip()
    for key in ("Transform", "Parameters"):
        if key not in fields:
            raise UserError(f"{path}: the '{key}:' line is missing")
    return fields


def _numbers(path: Path, key: str, text: str) -> np.ndarray:
    try:
        values = np.array([float(token) for token in text.split()], np.float64)
    except ValueError:
        raise UserError(f"{path}: '{key}:' holds something that is not a number ({text[:60]!r})") from None
    if not np.isfinite(values).all():
        raise UserError(f"{path}: '{key}:' holds a non-finite value")
    return values


def _centre(path: Path, fixed: np.ndarray) -> np.ndarray:
    if len(fixed) < 3:
        raise UserError(f"{path}: 'FixedParameters:' should hold the 3 coordinates of the centre, it has {len(fixed)}")
    return fixed[:3]


def _matrix_and_translation(kind: str, parameters: np.ndarray, fixed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if kind in ("MatrixOffsetTransformBase", "AffineTransform"):
        return parameters[:9].reshape(3, 3), parameters[9:12]
    if kind == "TranslationTransform":
        return np.eye(3), parameters
    if kind == "Euler3DTransform":
        compute_zyx = len(fixed) > 3 and fixed[3] != 0
        return _euler_matrix(parameters[:3], compute_zyx), parameters[3:6]
    scale = parameters[6] if kind == "Similarity3DTransform" else 1.0
    return scale * _versor_matrix(parameters[:3]), parameters[3:6]


def _euler_matrix(angles: np.ndarray, compute_zyx: bool) -> np.ndarray:
    (cx, cy, cz), (sx, sy, sz) = np.cos(angles), np.sin(angles)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    # ITK's Euler3DTransform composes Z X Y unless its ComputeZYX flag (4th fixed parameter) is set.
    return rz @ ry @ rx if compute_zyx else rz @ rx @ ry


def _versor_matrix(versor: np.ndarray) -> np.ndarray:
    x, y, z = versor
    w = np.sqrt(max(0.0, 1.0 - x * x - y * y - z * z))
    return np.array([[1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
                     [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
                     [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)]])
