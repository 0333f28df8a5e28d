"""MNI152-based synthetic MS cohort: real anatomy, procedural lesions and acquisition.

Each subject starts from the ICBM 2009 (MNI152) grey-matter, white-matter and
brain-mask maps that the nilearn wheel ships inside its package (nothing is
downloaded), deforms them with a random affine, a smooth warp and a
ventricular enlargement, places 5-40 white-matter lesions (a share of them
periventricular, via phantom_core's lesion drawing), and renders T1, FLAIR and
optionally T2 and PD from the tissue fractions with phantom_core's partial
volume, bias field and Rician noise at a named scanner's settings
(scanners.py). Needs the `nilearn` extra:
    pip install -e '.[nilearn]'
The API mirrors phantom.py: `make_subject(seed, size)` and `write_cohort(...)`.
This module holds what is MNI-specific: the template, its deformation, the
tissue-fraction contrasts and the ventricle and rim masks.
"""

from __future__ import annotations

import functools

import numpy as np
from scipy import ndimage

from jaxcascade.phantom import core as phantom_core, scanners
from jaxcascade.errors import UserError
from jaxcascade.phantom.core import BG, CSF, GM, WM

# Template resolution (mm) loaded from nilearn, and the block size that
# averages it down to the grid. "tiny" (4 mm) exists for tests and smoke runs.
# The names are phantom.SIZES's; phantom_core.LESION_SPEC's lesion counts and
# sizes per grid apply.
SIZES = {"tiny": (2, 2), "small": (2, 1), "full": (1, 1)}
CONTRASTS = ("T1", "FLAIR", "T2", "PD")

# Intensity relative to normal white matter of CSF and the periventricular-rim
# range, typical of skull-stripped 3T MPRAGE, 3D FLAIR, T2 and PD images; grey
# matter and lesions are the scanner's (scanners.py). The rim (FLAIR/T2-bright
# ependymal lining) and the cortex are the hard negatives a FLAIR threshold
# cannot separate from lesions.
_CONTRAST = {
    "T1": {"csf": 0.25, "rim": (0.97, 1.0), "gain": (400.0, 1200.0)},
    "FLAIR": {"csf": 0.18, "rim": (1.1, 1.3), "gain": (200.0, 800.0)},
    "T2": {"csf": 3.0, "rim": (1.2, 1.5), "gain": (100.0, 400.0)},
    "PD": {"csf": 1.4, "rim": (1.05, 1.15), "gain": (300.0, 900.0)},
}
_WM_HOST_FRACTION = 0.6  # lesions grow only where white matter dominates
_VENTRICLE_DEPTH_MM = 12.0  # CSF deeper than this below the brain surface is ventricular
_RIM_MM = 2.5
_PV_BAND_VOXELS = 2


def _nilearn_datasets():
    try:
        from nilearn import datasets
    except ImportError:
        raise UserError("the MNI phantom needs nilearn: pip install -e '.[nilearn]'") from None
    return datasets


@functools.lru_cache(maxsize=3)
def template(size: str) -> dict:
    """{"gm", "wm", "csf", "brain": float32 fractions; "affine"} of the MNI grid for `size`.

    CSF is what the brain mask holds beyond GM and WM. Cached: loading and
    resampling inside nilearn costs about two seconds.
    """
    if size not in SIZES:
        raise UserError(f"MNI phantom size {size!r} is unknown; use one of {sorted(SIZES)}")
    resolution, block = SIZES[size]
    datasets = _nilearn_datasets()
    loaders = {"gm": datasets.load_mni152_gm_template, "wm": datasets.load_mni152_wm_template,
               "brain": datasets.load_mni152_brain_mask}
    images = {name: load(resolution=resolution) for name, load in loaders.items()}
    maps = {name: np.asarray(image.get_fdata(), np.float32) for name, image in images.items()}
    affine = np.array(images["brain"].affine, np.float64)
    if block > 1:
        maps = {name: _block_mean(data, block) for name, data in maps.items()}
        # A new voxel's centre is the centre of the block of old voxels it averages.
        affine[:3, 3] += affine[:3, :3] @ np.full(3, (block - 1) / 2.0)
        affine = affine @ np.diag([block, block, block, 1.0])
    brain = maps["brain"] > 0.5
    # The GM map leaks a little outside the brain mask; the mask wins.
    gm = np.clip(maps["gm"], 0.0, 1.0) * brain
    wm = np.clip(maps["wm"], 0.0, 1.0) * brain
    csf = np.clip(1.0 - gm - wm, 0.0, 1.0) * brain
    voxel = float(abs(affine[0, 0]))
    _, ventricles = tissue_labels({"gm": gm, "wm": wm, "csf": csf}, brain, voxel)
    return {"gm": gm, "wm": wm, "csf": csf, "brain": brain.astype(np.float32), "affine": affine,
            "ventricle_centre": np.array(ndimage.center_of_mass(ventricles), np.float32)}


def _block_mean(data: np.ndarray, block: int) -> np.ndarray:
    shape = [n // block for n in data.shape]
    data = data[: shape[0] * block, : shape[1] * block, : shape[2] * block]
    return data.reshape(shape[0], block, shape[1], block, shape[2], block).mean(axis=(1, 3, 5))


def make_subject(seed: int, size: str = "small", contrasts=("T1", "FLAIR"),
                 scanner: str | scanners.Scanner = "default") -> dict:
    """Generate one subject on the MNI grid named `size` (see SIZES), imaged by `scanner`.

    Returns {<contrast>: float32 arrays, exactly 0 outside the brain mask;
    "lesion": uint8 0/1; "affine": the template's 4x4 voxel-to-MNI-mm
    matrix}. The anatomy and lesions depend only on `seed`, and each
    contrast only on (seed, contrast), so asking for more contrasts never
    changes the others. `scanner` (a name in scanners.SCANNERS, or a
    Scanner) changes the intensities only, never the anatomy or lesions.
    """
    unknown = [c for c in contrasts if c not in CONTRASTS]
    if unknown or not contrasts:
        raise UserError(f"MNI phantom contrasts {', '.join(contrasts) or 'none'}: use some of {', '.join(CONTRASTS)}")
    scanner = scanners.get_scanner(scanner)
    base = template(size)
    voxel = float(abs(base["affine"][0, 0]))
    rng = np.random.default_rng(seed)
    fractions = deform(rng, base, voxel)
    head = fractions["brain"] > 0.5
    for name in ("gm", "wm", "csf"):
        fractions[name] *= head
    label, ventricles = tissue_labels(fractions, head, voxel)
    # Distances to the ventricles count from the edge of their partial-volume
    # band, which is labelled GM or CSF and would otherwise push lesions away.
    near_ventricles = ndimage.binary_dilation(ventricles, iterations=_PV_BAND_VOXELS) & (label != WM)
    lesion_id, n_lesions = phantom_core.place_lesions(rng, label, near_ventricles, voxel, size)
    lesion = lesion_id > 0
    rim = _periventricular_rim(ventricles, voxel)

    subject = {}
    for contrast in contrasts:
        crng = np.random.default_rng([seed, 1 + CONTRASTS.index(contrast)])
        spec = _CONTRAST[contrast]
        # Per-subject tissue contrast varies a little; WM stays the reference.
        csf_c, gm_c = np.array((spec["csf"], scanner.grey_matter[contrast])) * crng.uniform(0.97, 1.03, 2)
        lesion_factor = np.concatenate([[0.0], crng.uniform(*scanner.lesion[contrast], n_lesions)]).astype(np.float32)
        white = np.where(rim, np.float32(crng.uniform(*spec["rim"])), np.float32(1.0))
        # A lesion replaces the white matter of its voxels; their GM/CSF share stays.
        clean = (fractions["csf"] * csf_c + fractions["gm"] * gm_c
                 + fractions["wm"] * np.where(lesion, lesion_factor[lesion_id], white))
        image = phantom_core.acquire(crng, clean.astype(np.float32), head, voxel, scanner, scanner.slice_mm(contrast))
        subject[contrast] = image * crng.uniform(*spec["gain"])
    subject["lesion"] = lesion.astype(np.uint8)
    subject["affine"] = base["affine"].copy()
    return subject


def deform(rng, base: dict, voxel: float) -> dict:
    """Tissue maps resampled through one subject's random spatial transform.

    Output voxel x samples the template at c + A (x - c) + warp(x) - atrophy(x):
    a small rotation and scaling about the brain centre c, a smooth warp of a
    few mm, and a radial pull towards the ventricles that enlarges them as
    atrophy does (ventricular volume then varies about 1.6-fold between subjects).
    """
    shape = base["brain"].shape
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij"))
    centre = np.array(ndimage.center_of_mass(base["brain"]), np.float32)
    linear = phantom_core.rotation(np.deg2rad(rng.uniform(-5, 5, 3))) * rng.uniform(0.94, 1.06, 3)[None, :]
    offset = grid - centre[:, None, None, None]
    source = np.einsum("ij,j...->i...", linear.astype(np.float32), offset) + centre[:, None, None, None]
    warp_mm = rng.uniform(1.5, 4.0)
    for axis in range(3):
        source[axis] += warp_mm / voxel * phantom_core.smooth_field(rng, shape, voxel, 40.0)
    pull = rng.uniform(0.0, 0.3)
    distance = offset - (base["ventricle_centre"] - centre)[:, None, None, None]
    envelope = np.exp(-0.5 * (np.sqrt((distance**2).sum(0)) * voxel / 25.0) ** 2)
    source -= pull * distance * envelope
    return {name: ndimage.map_coordinates(base[name], source, order=1, mode="constant", cval=0.0).astype(np.float32)
            for name in ("gm", "wm", "csf", "brain")}


def tissue_labels(fractions: dict, head: np.ndarray, voxel: float) -> tuple[np.ndarray, np.ndarray]:
    """phantom_core tissue labels of the dominant tissue, and the ventricle mask."""
    stacked = np.stack([fractions["csf"], fractions["gm"], fractions["wm"]])
    label = np.array([CSF, GM, WM], np.uint8)[np.argmax(stacked, axis=0)]
    label[(label == WM) & (fractions["wm"] < _WM_HOST_FRACTION)] = GM
    label[~head] = BG
    depth = ndimage.distance_transform_edt(head) * voxel
    deep_csf = (label == CSF) & (depth > _VENTRICLE_DEPTH_MM)
    parts, n = ndimage.label(deep_csf)
    if n == 0:
        raise UserError("MNI phantom: no ventricles found in the deformed template (nilearn maps changed?)")
    # The lateral ventricles are the largest deep CSF bodies; drop specks.
    sizes = np.bincount(parts.ravel())[1:]
    ventricles = np.isin(parts, 1 + np.flatnonzero(sizes >= max(sizes.max() * 0.1, 2)))
    return label, ventricles


def _periventricular_rim(ventricles: np.ndarray, voxel: float) -> np.ndarray:
    # Only the white-matter share of these voxels is brightened (see make_subject).
    steps = max(1, int(round(_RIM_MM / voxel)))
    return ndimage.binary_dilation(ventricles, iterations=steps) & ~ventricles


def write_cohort(out_dir, subjects: int, seed: int, size: str = "small", contrasts=("T1", "FLAIR"), *,
                 layout: str = "folders", sessions: int = 1, scanner: str | scanners.Scanner = "default") -> list[str]:
    """Write `subjects` MNI phantoms as out_dir/<name>/{<contrast>...,lesion}.nii.gz.

    Names and per-subject seeds are phantom_core's, as for phantom.py, so
    subject k depends only on (seed, k) and `scanner`. Every file is written
    atomically. Returns the names.
    """
    scanner = scanners.get_scanner(scanner)
    return phantom_core.write_cohort(out_dir, subjects, seed,
                                     functools.partial(make_subject, size=size, contrasts=contrasts, scanner=scanner),
                                     (*contrasts, "lesion"), phantom_core.MNI152_SPACE, layout=layout,
                                     sessions=sessions, scanner_name=scanner.name)
