"""Procedural synthetic MS cohort: skull-stripped T1, FLAIR and a lesion mask.

Each subject is an analytic brain (a deformed ellipsoid with a folded cortical
ribbon, lateral ventricles and deep grey nuclei) rendered with sequence-typical
contrast, partial-volume blur, a multiplicative bias field and Rician noise
at a named scanner's settings (scanners.py).
White-matter lesions are irregular blobs, some periventricular, always inside
white matter. FLAIR-bright non-lesions (cortex, periventricular caps, choroid
plexus) make lesion detection a real classification task rather than a
threshold. Nothing is downloaded; a seed fully determines a subject.

This module holds the procedural anatomy, its contrasts and `make_subject`;
lesion placement, acquisition, subject naming and the cohort writer are
phantom_core's, shared with the MNI phantom (phantom_mni.py).
"""

from __future__ import annotations

import functools

import numpy as np

from jaxcascade.phantom import core as phantom_core, scanners
from jaxcascade.errors import UserError
from jaxcascade.phantom.core import BG, CAP, CHOROID, CSF, DEEP_GM, GM, WM

SIZES = {
    "tiny": ((40, 48, 40), 4.0),
    "small": ((80, 96, 80), 2.0),
    "full": ((197, 233, 189), 1.0),
}

# Intensity relative to white matter, indexed by label. T1: WM > deep GM > GM
# > CSF. FLAIR: CSF suppressed, GM brighter than WM; periventricular caps and
# choroid plexus are FLAIR-hyperintense non-lesions (hard negatives). The GM
# entry is the default scanner's; make_subject takes the scanner's GM, and its
# lesion intensities (scanners.py).
T1_CONTRAST = np.array([0.0, 0.25, 0.62, 1.0, 0.78, 0.93, 0.55])
FLAIR_CONTRAST = np.array([0.0, 0.18, 1.2, 1.0, 1.07, 1.3, 1.25])


def make_subject(seed: int, size: str = "small", scanner: str | scanners.Scanner = "default") -> dict:
    """Generate one synthetic subject on the grid named `size` (see SIZES), imaged by `scanner`.

    `scanner` names one of scanners.SCANNERS (or is a Scanner); the anatomy
    and lesions depend only on `seed`, the intensities also on the scanner.
    Returns {"T1", "FLAIR": float32 arrays, exactly 0 outside the
    intracranial mask; "lesion": uint8 0/1 array; "affine": 4x4 float64 RAS
    voxel-to-mm matrix with the grid centre at the origin}.
    """
    if size not in SIZES:
        raise UserError(f"phantom size {size!r} is unknown; use one of {sorted(SIZES)}")
    scanner = scanners.get_scanner(scanner)
    shape, voxel = SIZES[size]
    rng = np.random.default_rng(seed)
    affine = np.diag([voxel, voxel, voxel, 1.0])
    affine[:3, 3] = -(np.array(shape) - 1) / 2 * voxel

    label, ventricles = anatomy(rng, shape, voxel)
    lesion_id, n_lesions = phantom_core.place_lesions(rng, label, ventricles, voxel, size)
    head = label != BG
    images = {}
    for name, table, gain in (("T1", T1_CONTRAST, (400.0, 1200.0)), ("FLAIR", FLAIR_CONTRAST, (200.0, 800.0))):
        contrast = table.copy()
        contrast[GM] = scanner.grey_matter[name]
        # Per-subject tissue contrast varies a little; WM stays the reference.
        jitter = rng.uniform(0.97, 1.03, contrast.size)
        jitter[WM] = 1.0
        lesion_factor = rng.uniform(*scanner.lesion[name], n_lesions)
        clean = tissue_image(label, lesion_id, contrast * jitter, lesion_factor)
        images[name] = (phantom_core.acquire(rng, clean, head, voxel, scanner, scanner.slice_mm(name))
                        * rng.uniform(*gain))
    return {
        "T1": images["T1"],
        "FLAIR": images["FLAIR"],
        "lesion": (lesion_id > 0).astype(np.uint8),
        "affine": affine,
    }


def write_cohort(out_dir, subjects: int, seed: int, size: str = "small", *, layout: str = "folders",
                 sessions: int = 1, scanner: str | scanners.Scanner = "default") -> list[str]:
    """Write `subjects` phantoms as out_dir/<name>/{T1,FLAIR,lesion}.nii.gz (or BIDS, see phantom_core).

    Names and per-subject seeds are phantom_core's, so subject k depends only
    on (seed, k) and `scanner`. Every file is written atomically. Returns the names.
    """
    scanner = scanners.get_scanner(scanner)
    return phantom_core.write_cohort(out_dir, subjects, seed,
                                     functools.partial(make_subject, size=size, scanner=scanner),
                                     ("T1", "FLAIR", "lesion"), phantom_core.SCANNER_SPACE, layout=layout,
                                     sessions=sessions, scanner_name=scanner.name)


def anatomy(rng, shape, voxel):
    """Tissue label map (phantom_core labels) and lateral-ventricle mask of one random brain."""
    # The helpers draw from rng in this order; a subject's anatomy depends on it.
    u = _anatomical_coordinates(rng, shape, voxel)
    label, depth = _cortex(rng, u, shape, voxel)

    # Deep grey nuclei (thalamus, lentiform), left-right symmetric.
    for side in (-1, 1):
        for centre, semi_axes in (((10, -14, 2), (8, 13, 8)), ((22, 3, -1), (6, 14, 8))):
            nucleus = _ellipsoid(u, (side * centre[0], *centre[1:]), semi_axes)
            label[nucleus & (label == WM)] = DEEP_GM

    ventricles = _ventricles(rng, u, label, voxel)
    label[depth <= 0] = BG  # after all structures, so none pokes outside
    return label, ventricles


def _anatomical_coordinates(rng, shape, voxel):
    """u: anatomical coordinates (mm) of each voxel, 3 arrays.

    Structures are defined in u, so the rigid motion plus smooth warp deforms all of them coherently.
    """
    axes = [(np.arange(n) - (n - 1) / 2) * voxel for n in shape]
    grids = [a.reshape([-1 if i == k else 1 for i in range(3)]) for k, a in enumerate(axes)]
    rotation = phantom_core.rotation(np.deg2rad(rng.uniform(-6, 6, 3)))
    shift = rng.uniform(-3, 3, 3)
    warp_mm = rng.uniform(1.5, 4.0)
    u = []
    for i in range(3):
        rigid = sum(rotation[j, i] * (grids[j] - shift[j]) for j in range(3))
        u.append(rigid + warp_mm * phantom_core.smooth_field(rng, shape, voxel, 45.0))
    return u


def _cortex(rng, u, shape, voxel):
    """(label map of WM, the folded GM ribbon and CSF, depth below the brain's surface in mm)."""
    radii = np.array([63.0, 77.0, 57.0]) * rng.uniform(0.95, 1.05, 3)
    radial = np.sqrt(u[0] ** 2 + u[1] ** 2 + u[2] ** 2)
    scaled = np.sqrt(sum((u[i] / radii[i]) ** 2 for i in range(3)))
    # Radial distance below the ellipsoid surface, with an irregular outline.
    depth = radial * (1.0 / np.maximum(scaled, 1e-3) - 1.0)
    depth += 2.0 * phantom_core.smooth_field(rng, shape, voxel, 30.0)
    # Sulci run along the zero level set of a smooth random field: `sulcus`
    # is 1 on it and decays away, so a narrow CSF cleft dips into the brain
    # there, lined on both sides by a GM ribbon; WM fills the gyri between.
    folds = phantom_core.smooth_field(rng, shape, voxel, max(11.0, 3.0 * voxel))
    sulcus = np.exp(-((folds / 0.35) ** 2))
    lining = np.exp(-((folds / 0.8) ** 2))
    csf_mm, gm_mm, sulcus_mm = rng.uniform(1.5, 3.0), rng.uniform(3.0, 4.5), rng.uniform(10, 16)

    label = np.full(shape, WM, np.uint8)
    label[depth < csf_mm + gm_mm + (sulcus_mm + gm_mm) * lining] = GM
    label[depth < csf_mm + sulcus_mm * np.clip((sulcus - 0.6) / 0.4, 0, None)] = CSF
    return label, depth


def _ventricles(rng, u, label, voxel):
    """Paint the lateral ventricles, their FLAIR-bright caps and choroid plexus into label; return the ventricles."""
    # Enlarged in atrophied subjects, diverging posteriorly.
    enlarge = rng.uniform(0.8, 1.5)
    vent_radii = np.array([5.0 * enlarge, 24.0 * enlarge**0.3, 8.0 * enlarge])
    gap = rng.uniform(1.5, 3.0)
    centre_yz = (rng.uniform(-6, 0), rng.uniform(8, 14))
    splay = np.deg2rad(rng.uniform(8, 15))
    ventricles = np.zeros(label.shape, bool)
    choroid = np.zeros(label.shape, bool)
    small = 1.2 * voxel  # keeps thin structures visible on coarse grids
    for side in (-1, 1):
        centre = np.array([side * (vent_radii[0] + gap), *centre_yz])
        turn = phantom_core.rotation((0.0, 0.0, side * splay))
        tips = [1.0] + ([-1.0] if rng.random() < 0.5 else [])
        for tip in tips:  # FLAIR-bright caps at the horn tips
            cap_centre = centre + turn @ np.array([0.0, tip * (vent_radii[1] + 1.5), 0.0])
            cap = _ellipsoid(u, cap_centre, (max(4.0, small), max(3.0, small), max(4.0, small)), turn)
            label[cap & (label == WM)] = CAP
        ventricles |= _ellipsoid(u, centre, vent_radii, turn)
        choroid_centre = centre + turn @ (vent_radii * np.array([0.0, -0.55, -0.3]))
        choroid_radii = np.maximum(vent_radii * np.array([0.45, 0.2, 0.35]), small)
        choroid |= _ellipsoid(u, choroid_centre, choroid_radii, turn)
    label[ventricles] = CSF
    label[ventricles & choroid] = CHOROID
    return ventricles


def _ellipsoid(u, centre, radii, rotation=None):
    """Mask of points u (3 arrays, mm) inside a rotated ellipsoid."""
    rotation = np.eye(3) if rotation is None else rotation
    d = [u[i] - centre[i] for i in range(3)]
    rho = 0.0
    for k in range(3):  # coordinates along the ellipsoid's own axes
        along = d[0] * rotation[0, k] + d[1] * rotation[1, k] + d[2] * rotation[2, k]
        rho = rho + (along / radii[k]) ** 2
    return rho < 1.0


def tissue_image(label, lesion_id, contrast, lesion_factor):
    """Noise-free intensity (WM = 1) from labels and per-lesion factors."""
    image = contrast.astype(np.float32)[label]
    lesion = lesion_id > 0
    image[lesion] = lesion_factor.astype(np.float32)[lesion_id[lesion] - 1]
    return image
