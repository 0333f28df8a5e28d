"""Procedural synthetic MS cohort: skull-stripped T1, FLAIR and a lesion mask.

Each subject is an analytic brain (a deformed ellipsoid with a folded cortical
ribbon, lateral ventricles and deep grey nuclei) rendered with sequence-typical
contrast, partial-volume blur, a multiplicative bias field and Rician noise.
White-matter lesions are irregular blobs, some periventricular, always inside
white matter. FLAIR-bright non-lesions (cortex, periventricular caps, choroid
plexus) make lesion detection a real classification task rather than a
threshold. Nothing is downloaded; a seed fully determines a subject.
"""

from __future__ import annotations

import os
import secrets

import numpy as np
from scipy import ndimage

from jaxcascade.errors import UserError

SIZES = {
    "tiny": ((40, 48, 40), 4.0),
    "small": ((80, 96, 80), 2.0),
    "full": ((197, 233, 189), 1.0),
}

# Lesion count, main-ellipsoid radius (mm) and accepted size (voxels) per grid.
# At 4 mm a physical 1.5-7.5 mm radius would be 0-2 voxels and vanish under
# the <= 20-voxel post-processing, so "tiny" lesions are larger in mm to stay
# resolvable (radius 2-3.5 voxels). At 2 mm the smallest physical lesions are
# clipped to 5 mm diameter for the same reason.
_LESION_SPEC = {
    "tiny": {"count": (4, 10), "radius_mm": (8.0, 14.0), "voxels": (25, 300)},
    "small": {"count": (5, 40), "radius_mm": (2.5, 7.5), "voxels": (6, 3000)},
    "full": {"count": (5, 40), "radius_mm": (1.5, 7.5), "voxels": (10, 20000)},
}
_PERIVENTRICULAR_SHARE = 0.4

_BG, _CSF, _GM, _WM, _DEEP_GM, _CAP, _CHOROID = range(7)
# Intensity relative to white matter, indexed by label. T1: WM > deep GM > GM
# > CSF. FLAIR: CSF suppressed, GM brighter than WM; periventricular caps and
# choroid plexus are FLAIR-hyperintense non-lesions (hard negatives).
_T1_CONTRAST = np.array([0.0, 0.25, 0.62, 1.0, 0.78, 0.93, 0.55])
_FLAIR_CONTRAST = np.array([0.0, 0.18, 1.2, 1.0, 1.07, 1.3, 1.25])
_FLAIR_LESION = (1.4, 1.8)
_T1_LESION = (0.6, 0.85)


def subject_name(index: int) -> str:
    """BIDS-style name of the subject at 0-based `index`: 0 -> "sub-01"."""
    return f"sub-{index + 1:02d}"


def subject_seed(seed: int, index: int) -> int:
    """Seed of subject `index` in a cohort seeded with `seed`.

    Depends only on (seed, index), so a subject is the same whatever the
    cohort size.
    """
    state = np.random.SeedSequence([seed, index]).generate_state(2, np.uint32)
    return int(state[0]) << 32 | int(state[1])


def make_subject(seed: int, size: str = "small") -> dict:
    """Generate one synthetic subject on the grid named `size` (see SIZES).

    Returns {"T1", "FLAIR": float32 arrays, exactly 0 outside the
    intracranial mask; "lesion": uint8 0/1 array; "affine": 4x4 float64 RAS
    voxel-to-mm matrix with the grid centre at the origin}.
    """
    if size not in SIZES:
        raise UserError(f"phantom size {size!r} is unknown; use one of {sorted(SIZES)}")
    shape, voxel = SIZES[size]
    rng = np.random.default_rng(seed)
    affine = np.diag([voxel, voxel, voxel, 1.0])
    affine[:3, 3] = -(np.array(shape) - 1) / 2 * voxel

    label, ventricles = _anatomy(rng, shape, voxel)
    lesion_id, n_lesions = _place_lesions(rng, label, ventricles, voxel, size)
    head = label != _BG
    images = {}
    for name, contrast, lesion_range, gain in (
        ("T1", _T1_CONTRAST, _T1_LESION, (400.0, 1200.0)),
        ("FLAIR", _FLAIR_CONTRAST, _FLAIR_LESION, (200.0, 800.0)),
    ):
        # Per-subject tissue contrast varies a little; WM stays the reference.
        jitter = rng.uniform(0.97, 1.03, contrast.size)
        jitter[_WM] = 1.0
        lesion_factor = rng.uniform(*lesion_range, n_lesions)
        clean = _tissue_image(label, lesion_id, contrast * jitter, lesion_factor)
        images[name] = _acquire(rng, clean, head, voxel) * rng.uniform(*gain)
    return {
        "T1": images["T1"],
        "FLAIR": images["FLAIR"],
        "lesion": (lesion_id > 0).astype(np.uint8),
        "affine": affine,
    }


def write_cohort(out_dir, subjects: int, seed: int, size: str = "small") -> list[str]:
    """Write `subjects` phantoms as out_dir/<name>/{T1,FLAIR,lesion}.nii.gz.

    Each file is written under a temporary name in its folder and then
    renamed, so a reader never sees a half-written file. Returns the names.
    """
    import nibabel as nib

    names = []
    for index in range(subjects):
        name = subject_name(index)
        subject = make_subject(subject_seed(seed, index), size)
        folder = os.path.join(os.fspath(out_dir), name)
        os.makedirs(folder, exist_ok=True)
        for key, dtype in (("T1", np.float32), ("FLAIR", np.float32), ("lesion", np.uint8)):
            image = nib.Nifti1Image(subject[key].astype(dtype), subject["affine"])
            image.set_qform(subject["affine"], code=1)
            image.set_sform(subject["affine"], code=1)
            image.header.set_data_dtype(dtype)
            image.header.set_xyzt_units("mm")
            final = os.path.join(folder, f"{key}.nii.gz")
            # The .nii.gz suffix must stay last so nibabel picks the format.
            temporary = os.path.join(folder, f".tmp-{secrets.token_hex(6)}-{key}.nii.gz")
            try:
                nib.save(image, temporary)
                os.replace(temporary, final)
            finally:
                if os.path.exists(temporary):
                    os.remove(temporary)
        names.append(name)
    return names


def _smooth_field(rng, shape, voxel, spacing_mm):
    """Zero-mean, unit-std random field with features about `spacing_mm` wide.

    Gaussian interpolation of a random control lattice, done one axis at a
    time so the cost is a few small matrix products even on the 1 mm grid.
    """
    weights = []
    for n in shape:
        position = np.arange(n) * voxel
        n_ctrl = int(np.ceil(n * voxel / spacing_mm)) + 3
        ctrl = (np.arange(n_ctrl) - 1.0) * spacing_mm
        w = np.exp(-0.5 * ((position[:, None] - ctrl[None, :]) / (0.7 * spacing_mm)) ** 2)
        weights.append((w / w.sum(axis=1, keepdims=True)).astype(np.float32))
    field = rng.standard_normal([w.shape[1] for w in weights]).astype(np.float32)
    field = np.tensordot(weights[0], field, axes=(1, 0))
    field = np.tensordot(weights[1], field, axes=(1, 1)).transpose(1, 0, 2)
    field = field @ weights[2].T
    field -= field.mean()
    return field / field.std()


def _rotation(angles):
    """Rotation matrix from three Euler angles (radians) about x, y, z."""
    cx, cy, cz = np.cos(angles)
    sx, sy, sz = np.sin(angles)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def _ellipsoid(u, centre, radii, rotation=None):
    """Mask of points u (3 arrays, mm) inside a rotated ellipsoid."""
    rotation = np.eye(3) if rotation is None else rotation
    d = [u[i] - centre[i] for i in range(3)]
    rho = 0.0
    for k in range(3):  # coordinates along the ellipsoid's own axes
        along = d[0] * rotation[0, k] + d[1] * rotation[1, k] + d[2] * rotation[2, k]
        rho = rho + (along / radii[k]) ** 2
    return rho < 1.0


def _anatomy(rng, shape, voxel):
    """Tissue label map and lateral-ventricle mask of one random brain."""
    axes = [(np.arange(n) - (n - 1) / 2) * voxel for n in shape]
    grids = [a.reshape([-1 if i == k else 1 for i in range(3)]) for k, a in enumerate(axes)]
    rotation = _rotation(np.deg2rad(rng.uniform(-6, 6, 3)))
    shift = rng.uniform(-3, 3, 3)
    warp_mm = rng.uniform(1.5, 4.0)
    # u: anatomical coordinates (mm) of each voxel. Structures are defined in
    # u, so the rigid motion plus smooth warp deforms all of them coherently.
    u = []
    for i in range(3):
        rigid = sum(rotation[j, i] * (grids[j] - shift[j]) for j in range(3))
        u.append(rigid + warp_mm * _smooth_field(rng, shape, voxel, 45.0))

    radii = np.array([63.0, 77.0, 57.0]) * rng.uniform(0.95, 1.05, 3)
    radial = np.sqrt(u[0] ** 2 + u[1] ** 2 + u[2] ** 2)
    scaled = np.sqrt(sum((u[i] / radii[i]) ** 2 for i in range(3)))
    # Radial distance below the ellipsoid surface, with an irregular outline.
    depth = radial * (1.0 / np.maximum(scaled, 1e-3) - 1.0)
    depth += 2.0 * _smooth_field(rng, shape, voxel, 30.0)
    # Sulci run along the zero level set of a smooth random field: `sulcus`
    # is 1 on it and decays away, so a narrow CSF cleft dips into the brain
    # there, lined on both sides by a GM ribbon; WM fills the gyri between.
    folds = _smooth_field(rng, shape, voxel, max(11.0, 3.0 * voxel))
    sulcus = np.exp(-((folds / 0.35) ** 2))
    lining = np.exp(-((folds / 0.8) ** 2))
    csf_mm, gm_mm, sulcus_mm = rng.uniform(1.5, 3.0), rng.uniform(3.0, 4.5), rng.uniform(10, 16)

    label = np.full(shape, _WM, np.uint8)
    label[depth < csf_mm + gm_mm + (sulcus_mm + gm_mm) * lining] = _GM
    label[depth < csf_mm + sulcus_mm * np.clip((sulcus - 0.6) / 0.4, 0, None)] = _CSF

    # Deep grey nuclei (thalamus, lentiform), left-right symmetric.
    for side in (-1, 1):
        for centre, semi_axes in (((10, -14, 2), (8, 13, 8)), ((22, 3, -1), (6, 14, 8))):
            nucleus = _ellipsoid(u, (side * centre[0], *centre[1:]), semi_axes)
            label[nucleus & (label == _WM)] = _DEEP_GM

    # Lateral ventricles: enlarged in atrophied subjects, diverging posteriorly.
    enlarge = rng.uniform(0.8, 1.5)
    vent_radii = np.array([5.0 * enlarge, 24.0 * enlarge**0.3, 8.0 * enlarge])
    gap = rng.uniform(1.5, 3.0)
    centre_yz = (rng.uniform(-6, 0), rng.uniform(8, 14))
    splay = np.deg2rad(rng.uniform(8, 15))
    ventricles = np.zeros(shape, bool)
    choroid = np.zeros(shape, bool)
    small = 1.2 * voxel  # keeps thin structures visible on coarse grids
    for side in (-1, 1):
        centre = np.array([side * (vent_radii[0] + gap), *centre_yz])
        turn = _rotation((0.0, 0.0, side * splay))
        tips = [1.0] + ([-1.0] if rng.random() < 0.5 else [])
        for tip in tips:  # FLAIR-bright caps at the horn tips
            cap_centre = centre + turn @ np.array([0.0, tip * (vent_radii[1] + 1.5), 0.0])
            cap = _ellipsoid(u, cap_centre, (max(4.0, small), max(3.0, small), max(4.0, small)), turn)
            label[cap & (label == _WM)] = _CAP
        ventricles |= _ellipsoid(u, centre, vent_radii, turn)
        choroid_centre = centre + turn @ (vent_radii * np.array([0.0, -0.55, -0.3]))
        choroid_radii = np.maximum(vent_radii * np.array([0.45, 0.2, 0.35]), small)
        choroid |= _ellipsoid(u, choroid_centre, choroid_radii, turn)
    label[ventricles] = _CSF
    label[ventricles & choroid] = _CHOROID
    label[depth <= 0] = _BG  # after all structures, so none pokes outside
    return label, ventricles


def _lesion_blob(rng, centre, radius, voxel, shape):
    """Box around `centre` and the mask of an irregular blob inside it.

    A union of 1-3 overlapping rotated ellipsoids whose outline is perturbed
    by smooth noise.
    """
    half = int(np.ceil(2.0 * radius / voxel)) + 1
    lo = np.maximum(centre - half, 0)
    hi = np.minimum(centre + half + 1, shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    u = np.meshgrid(*[(np.arange(a, b) - c) * voxel for a, b, c in zip(lo, hi, centre)],
                    indexing="ij")
    box_shape = u[0].shape
    wobble = ndimage.gaussian_filter(rng.standard_normal(box_shape), max(1.0, 0.4 * radius / voxel))
    wobble *= 0.15 / max(wobble.std(), 1e-6)
    blob = np.zeros(box_shape, bool)
    for part in range(rng.integers(1, 4)):
        if part == 0:
            offset, radii = np.zeros(3), radius * rng.uniform(0.75, 1.25, 3)
        else:
            direction = rng.standard_normal(3)
            offset = direction / np.linalg.norm(direction) * radius * rng.uniform(0.4, 0.8)
            radii = radius * rng.uniform(0.45, 0.8, 3)
        rotation = _rotation(rng.uniform(-np.pi, np.pi, 3))
        d = [u[i] - offset[i] for i in range(3)]
        rho = sum((sum(d[j] * rotation[j, k] for j in range(3)) / radii[k]) ** 2 for k in range(3))
        blob |= np.sqrt(rho) < 1.0 + wobble
    return box, blob


def _place_lesions(rng, label, ventricles, voxel, size):
    """Label map (0 = none, k = k-th lesion) of WM lesions, and their count.

    Lesions avoid every non-WM voxel and the WM voxels that touch one, so
    the lesion mask is free of partial volume with CSF and GM, and they are
    kept apart so that each is its own 26-connected component.
    """
    spec = _LESION_SPEC[size]
    shape = label.shape
    wm = label == _WM
    # Distances are only needed inside the head / near the ventricles; crop
    # to keep the Euclidean distance transforms cheap on the 1 mm grid.
    head_box = ndimage.find_objects((label != _BG).astype(np.uint8))[0]
    wm_depth = np.zeros(shape, np.float32)
    wm_depth[head_box] = ndimage.distance_transform_edt(wm[head_box]) * voxel
    margin = int(np.ceil((spec["radius_mm"][1] + 4 * voxel) / voxel))
    vent_box = tuple(
        slice(max(s.start - margin, 0), min(s.stop + margin, n))
        for s, n in zip(ndimage.find_objects(ventricles.astype(np.uint8))[0], shape)
    )
    vent_dist = np.full(shape, np.inf, np.float32)
    vent_dist[vent_box] = ndimage.distance_transform_edt(~ventricles[vent_box]) * voxel

    hosts = np.flatnonzero(wm_depth >= spec["radius_mm"][0] + 0.5 * voxel)
    host_depth = wm_depth.ravel()[hosts]
    host_vent = vent_dist.ravel()[hosts]
    interior = wm_depth > 1.01 * voxel
    lesion_id = np.zeros(shape, np.uint8)
    centres, radii = [], []
    target = rng.integers(spec["count"][0], spec["count"][1] + 1)
    for _ in range(60 * target):
        if len(centres) == target:
            break
        radius = rng.uniform(*spec["radius_mm"])
        ok = host_depth >= radius + 0.5 * voxel
        if rng.random() < _PERIVENTRICULAR_SHARE:
            ok &= host_vent <= radius + 2.5 * voxel
        candidates = np.flatnonzero(ok)
        if candidates.size == 0:
            continue
        centre = np.array(np.unravel_index(hosts[rng.choice(candidates)], shape))
        if any(np.linalg.norm((centre - c) * voxel) < radius + r + 2 * voxel
               for c, r in zip(centres, radii)):
            continue
        box, blob = _lesion_blob(rng, centre, radius, voxel, shape)
        taken = ndimage.binary_dilation(lesion_id[box] > 0, np.ones((3, 3, 3), bool))
        blob &= interior[box] & ~taken
        parts, n_parts = ndimage.label(blob, np.ones((3, 3, 3), bool))
        if n_parts == 0:
            continue
        # Keep one connected piece so that each lesion is one component.
        blob = parts == 1 + np.argmax(np.bincount(parts.ravel())[1:])
        if not spec["voxels"][0] <= blob.sum() <= spec["voxels"][1]:
            continue
        centres.append(centre)
        radii.append(radius)
        lesion_id[box][blob] = len(centres)
    return lesion_id, len(centres)


def _tissue_image(label, lesion_id, contrast, lesion_factor):
    """Noise-free intensity (WM = 1) from labels and per-lesion factors."""
    image = contrast.astype(np.float32)[label]
    lesion = lesion_id > 0
    image[lesion] = lesion_factor.astype(np.float32)[lesion_id[lesion] - 1]
    return image


def _acquire(rng, clean, head, voxel):
    """Partial volume, bias field and Rician noise; exactly 0 outside `head`."""
    # Blur by half a voxel: border voxels mix the tissues they straddle.
    image = ndimage.gaussian_filter(clean, 0.5)
    bias = _smooth_field(rng, clean.shape, voxel, 70.0)
    low, high = bias[head].min(), bias[head].max()
    peak_to_peak = rng.uniform(0.04, 0.15)
    image *= 1.0 + peak_to_peak * ((bias - low) / (high - low) - 0.5)
    sigma = np.float32(rng.uniform(0.02, 0.04))
    real = image + sigma * rng.standard_normal(clean.shape, np.float32)
    imaginary = sigma * rng.standard_normal(clean.shape, np.float32)
    image = np.hypot(real, imaginary)
    image[~head] = 0.0
    return image.astype(np.float32)
