"""NIfTI in and out, with every check a user's files can fail.

Images are processed in one voxel orientation (RAS+ unless the model says
otherwise), reached by axis permutations and flips only: exact, no
resampling. The CNNs are not invariant to flips and axis order, so the same
anatomy stored LPS or RAS must reach them the same way round. Outputs are
mapped back and lie on exactly the input's grid, with its header, and are
written atomically (`outputs.atomic_path`). Every problem raises `UserError`
with one line naming the file.
"""

from __future__ import annotations

import dataclasses
import os
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np

from jaxcascade.data import prefetch
from jaxcascade.data.normalisation import zero_background
from jaxcascade.errors import UserError, warn
from jaxcascade.runtime.outputs import atomic_path

AFFINE_TOLERANCE_MM = 1e-3
# Below this share of the reference's field of view, two sequences are taken as not co-registered.
MIN_OVERLAP = 0.5
# Deflate never compresses better than about 1032:1, so a .gz file of n bytes holds at most this many
# times n bytes of data (the margin covers the header and gzip's own fields).
GZIP_MAX_RATIO = 1100


NATIVE = "native"  # process images in the voxel order they are stored in (nicMSlesions' behaviour)


@dataclasses.dataclass
class Image:
    path: Path
    data: np.ndarray  # float32, 3D, in the processing orientation
    nifti: nib.Nifti1Image  # as stored: its voxel grid is where outputs go
    orientation: str = NATIVE  # the processing orientation, e.g. 'RAS', or 'native'
    resampled_from: str = ""  # the file's own grid ('182x218x182 at 1x1x1 mm') when resampled onto another

    @property
    def affine(self) -> np.ndarray:
        return self.nifti.affine

    def to_file_grid(self, array: np.ndarray) -> np.ndarray:
        """An array on the processing grid -> the same values on the file's own voxel grid."""
        transform = _reorientation(self.nifti.affine, self.orientation, inverse=True)
        return array if transform is None else np.ascontiguousarray(nib.orientations.apply_orientation(array, transform))

    def from_file_grid(self, array: np.ndarray) -> np.ndarray:
        """An array on the file's own voxel grid -> the same values on the processing grid."""
        transform = _reorientation(self.nifti.affine, self.orientation)
        return array if transform is None else np.ascontiguousarray(nib.orientations.apply_orientation(array, transform))

    @property
    def grid_affine(self) -> np.ndarray:
        """Voxel indices of the processing grid (`data`) -> scanner millimetres."""
        transform = _reorientation(self.nifti.affine, self.orientation)
        if transform is None:
            return self.nifti.affine
        return self.nifti.affine @ nib.orientations.inv_ornt_aff(transform, self.nifti.shape[:3])

    @property
    def voxel_volume_ml(self) -> float:
        """The voxel volume in ml, the absolute determinant of the affine, whatever pixdim says."""
        zooms_mm3 = float(np.prod(self.nifti.header.get_zooms()[:3]))
        det_mm3 = abs(float(np.linalg.det(self.nifti.affine[:3, :3])))
        # Where pixdim agrees with the affine (every file `load_image` passed on unchanged, unless its axes are
        # sheared), its product is kept: volumes and voxel counts stay what they always were, bit for bit.
        return (zooms_mm3 if abs(zooms_mm3 - det_mm3) <= 1e-6 * det_mm3 else det_mm3) / 1000.0


def check_orientation(orientation: str, setting: str = "data.orientation") -> str:
    """'native', or three axis codes saying where each voxel axis points (one of L/R, A/P, S/I each)."""
    codes = orientation.upper()
    axes = sorted("LRAPSI".index(code) // 2 for code in codes if code in "LRAPSI")
    if orientation != NATIVE and (len(codes) != 3 or axes != [0, 1, 2]):
        raise UserError(f"--config.{setting}={orientation!r}: expected 'native' or axis codes such as 'RAS' "
                        "or 'LPS' (one of L/R, A/P, S/I each)")
    return orientation


def _reorientation(affine: np.ndarray, orientation: str, inverse: bool = False):
    """nibabel's transform between the stored voxel order and `orientation` (None: nothing to do)."""
    if orientation == NATIVE:
        return None
    stored = nib.orientations.io_orientation(affine)
    wanted = nib.orientations.axcodes2ornt(tuple(orientation.upper()))
    transform = nib.orientations.ornt_transform(wanted, stored) if inverse else nib.orientations.ornt_transform(
        stored, wanted)
    identity = np.array([[0, 1], [1, 1], [2, 1]], float)
    return None if np.array_equal(transform, identity) else transform


def load_image(source: str | os.PathLike | nib.Nifti1Image, *, allow_all_zero: bool = False,
               orientation: str = "RAS", name: str = "image") -> Image:
    """Read a 3D NIfTI image (a 4D one with a trailing singleton axis is accepted) into `orientation`.

    source: a file, or a nibabel image in memory (read as its saved bytes would be, so it passes exactly a
    file's checks; the caller's object is left as it is). name: what messages call an image in memory
    without a file name ('<FLAIR in memory>').
    """
    if isinstance(source, (nib.Nifti1Image, nib.Nifti2Image)):
        path = Path(source.get_filename() or f"<{name} in memory>")
        nifti = type(source).from_bytes(source.to_bytes())
        with np.errstate(over="ignore", invalid="ignore"):
            return _checked(path, nifti, np.asarray(nifti.dataobj, dtype=np.float32), allow_all_zero, orientation)
    path = Path(source)
    if not path.exists() and path.is_symlink():
        raise UserError(f"{path}: a broken symbolic link (content not fetched? for DataLad or git-annex: "
                        "datalad get / git annex get)")
    if not path.exists():
        raise UserError(f"{path}: file not found")
    if not os.access(path, os.R_OK) or path.is_dir():
        raise UserError(f"{path}: cannot be read (check permissions)")
    inflated = prefetch.take(path)
    try:
        nifti, data = _read(path, inflated)
    except (UserError, nib.filebasedimages.ImageFileError, EOFError, zlib.error, OSError, ValueError):
        if inflated is None:
            raise
        nifti, data = _read(path, None)  # whatever is wrong is said as the file itself shows it
    return _checked(path, nifti, data, allow_all_zero, orientation)


def _checked(path: Path, nifti, data: np.ndarray, allow_all_zero: bool, orientation: str) -> Image:
    """The image of nifti (its float32 data given), refused in one line naming path where it cannot be used."""
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise UserError(f"{path}: expected a 3D image, got shape {data.shape}; give one volume per file")
    _check_qform_sform(path, nifti)
    _take_affine_voxel_size(path, nifti)
    finite = np.isfinite(data)
    if not finite.all():
        raise UserError(f"{path}: {int((~finite).sum())} voxels are NaN or Inf; fix or mask them before use")
    if not allow_all_zero:
        # An intensity image's background is 0 from here on, whatever the file stored it as (a mask is left as is).
        data = zero_background(data)
        if not data.any():
            raise UserError(f"{path}: image is all zero")
        nonzero = data[data != 0]
        if nonzero.min() == nonzero.max():
            raise UserError(f"{path}: image is constant ({nonzero[0]:g} wherever nonzero); it cannot be normalised")
    transform = _reorientation(nifti.affine, orientation)
    if transform is not None:
        data = np.ascontiguousarray(nib.orientations.apply_orientation(data, transform))
    return Image(path=path, data=data, nifti=nifti, orientation=orientation)


def _read(path: Path, inflated: bytes | None):
    """(the nibabel image, its data as float32) of path, or of its bytes inflated ahead (`prefetch.py`)."""
    try:
        nifti = _from_bytes(inflated) if inflated is not None else nib.load(str(path))
        if not isinstance(nifti, (nib.Nifti1Image, nib.Nifti2Image)):
            raise UserError(f"{path}: not a NIfTI image ({type(nifti).__name__}); convert it to .nii/.nii.gz")
        # A lying header is refused before its data is read: a 1 MB file claiming 8000^3 voxels must not
        # make the reader ask for 2 TB (a MemoryError reads as the machine's fault, and stops a study).
        check_header(path, nifti.header, getattr(nifti.dataobj, "offset", 0))
        with np.errstate(over="ignore", invalid="ignore"):  # an overflowing scale shows up as Inf, refused below
            return nifti, np.asarray(nifti.dataobj, dtype=np.float32)
    except UserError:
        raise
    except (nib.filebasedimages.ImageFileError, EOFError, zlib.error, OSError, ValueError) as error:
        if inflated is not None:
            raise
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UserError(f"{path}: not a readable NIfTI image, or truncated ({reason})") from None


def _from_bytes(raw: bytes):
    """The image in a file's inflated bytes (`prefetch.py`), NIfTI-1 or -2 by its header size."""
    for order in ("little", "big"):
        size = int.from_bytes(raw[:4], order)
        if size in (348, 540):
            return (nib.Nifti1Image if size == 348 else nib.Nifti2Image).from_bytes(raw)
    raise ValueError("no NIfTI header size (348 or 540) in its first bytes")


def check_header(path: Path, header, data_offset: int = 0) -> None:
    """Refuse a header whose data cannot be in the file: no voxels, a type that is no intensity, or more
    bytes than the file holds (raw) or could hold (gzip, at deflate's best ratio)."""
    shape = tuple(int(n) for n in header.get_data_shape())
    if not shape or min(shape) < 1:
        raise UserError(f"{path}: the header's dimensions {shape} hold no voxel; the header is damaged")
    dtype = header.get_data_dtype()
    if dtype.kind not in "biuf" or dtype.fields is not None:
        raise UserError(f"{path}: voxel type {dtype} (datatype {int(header['datatype'])}) is not an intensity; "
                        "convert the image to an integer or floating-point type")
    claimed = int(np.prod(shape, dtype=object)) * dtype.itemsize
    size = path.stat().st_size
    compressed = path.suffix in (".gz", ".bz2", ".zst")
    room = size * GZIP_MAX_RATIO if compressed else size - int(data_offset)
    if claimed > room:
        raise UserError(
            f"{path}: the header claims {'x'.join(map(str, shape))} voxels of {dtype} ({_bytes(claimed)}), "
            f"more than this {_bytes(size)} file {'can hold' if compressed else 'holds'}; the file is truncated "
            "or its header damaged: export it again")
    if not np.all(np.isfinite(header.get_best_affine())):
        raise UserError(f"{path}: the header's affine holds NaN or Inf; fix its sform/qform")


def _bytes(count: int) -> str:
    for unit in ("bytes", "kB", "MB", "GB", "TB"):
        if count < 1000 or unit == "TB":
            return f"{count:.3g} {unit}" if unit != "bytes" else f"{count} bytes"
        count /= 1000
    return ""


def _take_affine_voxel_size(path: Path, nifti) -> None:
    """Voxel sizes are the affine's: where pixdim disagrees, it is corrected (with one warning).

    nibabel's affine is the sform (else the qform, else pixdim's own); a converter that wrote a 2 mm sform
    over 1 mm pixdim would otherwise have volumes measured 8x too small. The qform is built from pixdim,
    so only an sform can disagree with it.
    """
    affine = nifti.affine
    if abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise UserError(f"{path}: the affine {_fmt_affine(affine)} is singular (a voxel of no volume); "
                        "fix the header's sform/qform and pixdim")
    from_affine = np.sqrt(np.sum(affine[:3, :3] ** 2, axis=0))
    zooms = np.abs(np.array(nifti.header.get_zooms()[:3], np.float64))
    if not np.allclose(zooms, from_affine, rtol=1e-3, atol=AFFINE_TOLERANCE_MM):
        warn(f"{path}: the header's voxel size (pixdim {'x'.join(f'{z:.4g}' for z in zooms)} mm) disagrees with "
             f"its affine's ({'x'.join(f'{z:.4g}' for z in from_affine)} mm); the affine's is used")
        nifti.header.set_zooms((*from_affine, *nifti.header.get_zooms()[3:]))


def _check_qform_sform(path: Path, nifti) -> None:
    header = nifti.header
    if int(header["qform_code"]) > 0 and int(header["sform_code"]) > 0:
        qform, sform = header.get_qform(), header.get_sform()
        if not np.allclose(qform, sform, atol=AFFINE_TOLERANCE_MM):
            raise UserError(
                f"{path}: qform and sform disagree (qform {_fmt_affine(qform)} vs sform {_fmt_affine(sform)}); "
                "fix the header so both describe the same grid"
            )


def _fmt_affine(affine: np.ndarray) -> str:
    return np.array2string(np.asarray(affine)[:3], precision=3, separator=",").replace("\n", "")


def check_same_grid(images: list[Image]) -> None:
    """All images share shape and affine (within AFFINE_TOLERANCE_MM)."""
    reference = images[0]
    for image in images[1:]:
        if image.data.shape != reference.data.shape:
            raise UserError(
                f"{image.path}: shape {image.data.shape} differs from {reference.path} {reference.data.shape}; "
                "co-register the sequences to one grid"
            )
        if not np.allclose(image.affine, reference.affine, atol=AFFINE_TOLERANCE_MM):
            raise UserError(
                f"{image.path}: affine {_fmt_affine(image.affine)} differs from {reference.path} "
                f"{_fmt_affine(reference.affine)}; co-register the sequences to one grid"
            )


def load_lesion_mask(path: str | os.PathLike, reference: Image) -> np.ndarray:
    """A binary lesion mask on the reference's grid (in its processing orientation), as bool."""
    image = load_image(path, allow_all_zero=True, orientation=reference.orientation)
    check_same_grid([reference, image])
    values = np.unique(image.data)
    unexpected = values[(values != 0) & (values != 1)]
    if unexpected.size:
        shown = ", ".join(f"{v:g}" for v in unexpected[:5]) + (", ..." if unexpected.size > 5 else "")
        raise UserError(f"{image.path}: lesion mask must hold only 0 and 1, found {shown}")
    return image.data > 0


def read_lesion_mask(path: str | os.PathLike, reference: Image) -> tuple[np.ndarray, str]:
    """A lesion mask to score against, on the reference's grid (processing orientation) as bool, and how
    it was read ('' if as is).

    Unlike training's `load_lesion_mask`, scoring takes masks in the conventions their authors meant: 0/255
    or labels (every value > 0 is lesion), probabilities (>= 0.5), another grid of the same space (nearest
    neighbour).
    UserError, one line, for a mask that none of these fits.
    """
    image = load_image(path, allow_all_zero=True, orientation=reference.orientation)
    notes = []
    if image.data.shape != reference.data.shape or not np.allclose(image.affine, reference.affine,
                                                                    atol=AFFINE_TOLERANCE_MM):
        image = on_grid_of(image, reference, order=0)
        notes.append(f"lesion mask resampled (nearest) from {image.resampled_from}")
    mask, note = lesion_mask_values(image.data)
    if mask is None:
        raise UserError(f"{image.path}: {note}")
    return mask, "; ".join([*notes, note] if note else notes)


def lesion_mask_values(data: np.ndarray) -> tuple[np.ndarray | None, str]:
    """(lesion voxels, how they were read) for a mask's values; (None, why not) where no convention fits."""
    values = np.unique(data)
    shown = ", ".join(f"{v:g}" for v in values[:5]) + (", ..." if values.size > 5 else "")
    if np.all((values == 0) | (values == 1)):
        return data > 0, ""
    if values.min() < 0:
        return None, f"a lesion mask holds negative values ({shown}); give 0 (background) and 1 (lesion)"
    if np.all(values == np.round(values)):
        what = f"a 0/{values[-1]:g} mask" if values.size <= 2 else f"labels {shown}"
        return data > 0, f"lesion mask read as {what}: every value above 0 is lesion"
    if values.max() <= 1:
        return data >= 0.5, "lesion mask read as probabilities: 0.5 and above is lesion"
    return None, f"a lesion mask of values {shown} (neither labels nor probabilities); give 0 and 1"


def _world_box(nifti) -> tuple[np.ndarray, np.ndarray]:
    """Scanner-space bounding box (mm) of an image's field of view, voxel edges included."""
    shape = np.array(nifti.shape[:3])
    corners = np.array(np.meshgrid(*[(-0.5, n - 0.5) for n in shape], indexing="ij")).reshape(3, -1).T
    world = corners @ nifti.affine[:3, :3].T + nifti.affine[:3, 3]
    return world.min(axis=0), world.max(axis=0)


def on_grid_of(image: Image, reference: Image, order: int = 1) -> Image:
    """`image` resampled (spline `order`, trilinear by default, through both affines) onto the reference's grid.

    Sequences of one session share the scanner's space but often not its grid (a 1 mm 3D T1 and a
    3 mm 2D FLAIR). Images whose fields of view barely overlap are not co-registered: that is refused.
    """
    if image.data.shape == reference.data.shape and np.allclose(image.affine, reference.affine,
                                                                 atol=AFFINE_TOLERANCE_MM):
        return image
    low, high = _world_box(image.nifti)
    ref_low, ref_high = _world_box(reference.nifti)
    shared = np.prod(np.clip(np.minimum(high, ref_high) - np.maximum(low, ref_low), 0, None))
    covered = shared / np.prod(ref_high - ref_low)
    if covered < MIN_OVERLAP:
        raise UserError(
            f"{image.path}: its field of view covers {covered:.0%} of {reference.path}'s in scanner space "
            f"(affine {_fmt_affine(image.affine)} vs {_fmt_affine(reference.affine)}); the sequences are not "
            "co-registered: register them first (e.g. ANTs, FSL FLIRT, SPM)"
        )
    resampled = resample_onto(image, reference.nifti.shape[:3], reference.affine, order=order, like=reference.nifti)
    resampled.resampled_from = describe_grid(image.nifti)
    return resampled


def describe_grid(nifti) -> str:
    """'182x218x182 at 1x1x1 mm, origin (-90, -126, -72)': a voxel grid as a person compares two."""
    shape = "x".join(str(n) for n in nifti.shape[:3])
    zooms = "x".join(f"{z:.3g}" for z in nifti.header.get_zooms()[:3])
    origin = ", ".join(f"{v:.4g}" for v in nifti.affine[:3, 3])
    return f"{shape} at {zooms} mm, origin ({origin})"


def resampling_notes(images: list[Image], modalities: tuple[str, ...], reference: str) -> list[str]:
    """One line per sequence that `load_sequences` resampled onto the reference's grid: what, from what."""
    grid = images[modalities.index(reference) if reference in modalities else 0]
    return [f"{modality} resampled from {image.resampled_from} onto the {reference} grid "
            f"({describe_grid(grid.nifti)})" for modality, image in zip(modalities, images) if image.resampled_from]


def resample_onto(image: Image, shape, affine, *, order: int = 1, like=None) -> Image:
    """The image resampled (spline `order`, through both affines) onto the grid (shape, affine).

    The result keeps the image's processing orientation; its file grid is `like` (a NIfTI image on
    that grid, whose header outputs will carry) or a bare one in millimetres.
    """
    from nibabel.processing import resample_from_to

    stored = nib.Nifti1Image(image.to_file_grid(image.data).astype(np.float32), image.affine)
    data = np.asarray(resample_from_to(stored, (tuple(shape), affine), order=order).dataobj, np.float32)
    if like is None:
        like = nib.Nifti1Image(np.zeros(tuple(shape), np.uint8), affine)
        like.header.set_xyzt_units("mm")
    grid = Image(path=image.path, data=data, nifti=like, orientation=image.orientation)
    grid.data = grid.from_file_grid(data)
    return grid


def load_brain_mask(path: str | os.PathLike, reference: Image) -> np.ndarray:
    """A brain mask (binary or probabilistic, > 0.5 is brain) on the reference's processing grid, resampled if need be."""
    mask = on_grid_of(load_image(path, allow_all_zero=True, orientation=reference.orientation), reference).data > 0.5
    if not mask.any():
        raise UserError(f"{path}: the brain mask holds no voxel above 0.5 on {reference.path}'s grid")
    return mask


def looks_skull_stripped(data: np.ndarray) -> bool:
    """False when nonzero voxels cover more than 5 % of four or more of the field of view's six faces.

    The method's statistics and candidates come from nonzero voxels, which presumes a skull-stripped
    image; an unstripped head (and its background noise) reaches the borders.
    """
    faces = (data[0], data[-1], data[:, 0], data[:, -1], data[:, :, 0], data[:, :, -1])
    return sum(float(np.mean(face != 0)) > 0.05 for face in faces) < 4


def load_sequences(inputs: dict, modalities: tuple[str, ...], source: str = "the model", *,
                   orientation: str = "RAS", reference: str | None = None) -> list[Image]:
    """Load the named sequences (files or nibabel images, by modality) in the model's channel order into
    `orientation`, all on one grid.

    The grid is the `reference` modality's (the FLAIR's, as callers pass it; default the first):
    the others are resampled onto it where their grids differ (`on_grid_of`).
    """
    missing = [m for m in modalities if m not in inputs]
    extra = [m for m in inputs if m not in modalities]
    if missing or extra:
        problems = []
        if missing:
            problems.append(f"missing {', '.join(missing)}")
        if extra:
            problems.append(f"not used by {source}: {', '.join(extra)}")
        raise UserError(
            f"inputs {', '.join(inputs) or 'none'} do not match {source}'s modalities "
            f"{', '.join(modalities)} ({'; '.join(problems)})"
        )
    for modality, value in inputs.items():
        if not isinstance(value, (str, os.PathLike, nib.Nifti1Image, nib.Nifti2Image)):
            raise UserError(f"input {modality}: give a NIfTI path or a nibabel.Nifti1Image, not {type(value).__name__}")
    images = [load_image(inputs[m], orientation=orientation, name=m) for m in modalities]
    grid = images[modalities.index(reference) if reference in modalities else 0]
    return [on_grid_of(image, grid) for image in images]


def save_like(data: np.ndarray, like: Image, path: str | os.PathLike, dtype=np.uint8) -> None:
    """Write `data` (on like's processing grid) on like's file grid, with its header, qform and sform."""
    save_on_file_grid(like.to_file_grid(data), like, path, dtype)


def save_on_file_grid(data: np.ndarray, like: Image, path: str | os.PathLike, dtype=np.uint8) -> None:
    """Write `data`, already on like's file grid (`Image.to_file_grid`), with like's header, qform and sform."""
    reference = like.nifti
    header = reference.header.copy()
    header.set_data_dtype(dtype)
    image = nib.Nifti1Image(np.asarray(data, dtype=dtype), reference.affine, header=header)
    image.set_qform(reference.header.get_qform(), code=int(reference.header["qform_code"]))
    image.set_sform(reference.header.get_sform(), code=int(reference.header["sform_code"]))
    # The reference's intensity scaling must not rescale a mask or probabilities.
    image.header.set_slope_inter(1.0, 0.0)
    with atomic_path(path) as tmp:
        nib.save(image, str(tmp))
