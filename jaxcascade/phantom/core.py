"""What both synthetic MS phantoms share: labels, lesions, acquisition, cohort files.

phantom.py (procedural anatomy) and phantom_mni.py (MNI152 anatomy) differ in
where the brain comes from and how each tissue is rendered; from a tissue label
map on they are the same generator. This module holds that common part:

- the tissue labels both label maps use (BG ... CHOROID);
- subject naming and per-subject seeding of a cohort;
- smooth random fields and rotations, the building blocks of warps, bias
  fields and lesion shapes;
- lesion placement in white matter, with its per-grid size table;
- acquisition: partial volume, 2D slice profile, bias field and Rician noise,
  at a scanner's settings (scanners.py);
- the cohort writer, which stores subjects as NIfTI files atomically.
"""

from __future__ import annotations

import os

import numpy as np
from scipy import ndimage

from jaxcascade.data import bids_layout
from jaxcascade.runtime import outputs
from jaxcascade.phantom import scanners
from jaxcascade.errors import UserError

# Tissue labels, in the order the procedural contrast tables are indexed by.
# CAP (periventricular caps) and CHOROID (choroid plexus) are FLAIR-bright
# non-lesions; only the procedural anatomy draws them.
BG, CSF, GM, WM, DEEP_GM, CAP, CHOROID = range(7)

# NIfTI qform/sform codes: the procedural grid is centred on an arbitrary
# scanner origin, the MNI phantom lives in the template's space.
SCANNER_SPACE = 1
MNI152_SPACE = 4

# Lesion count, main-ellipsoid radius (mm) and accepted size (voxels) per grid.
# At 4 mm a physical 1.5-7.5 mm radius would be 0-2 voxels and vanish under
# the <= 20-voxel post-processing, so "tiny" lesions are larger in mm to stay
# resolvable (radius 2-3.5 voxels). At 2 mm the smallest physical lesions are
# clipped to 5 mm diameter for the same reason.
LESION_SPEC = {
    "tiny": {"count": (4, 10), "radius_mm": (8.0, 14.0), "voxels": (25, 300)},
    "small": {"count": (5, 40), "radius_mm": (2.5, 7.5), "voxels": (6, 3000)},
    "full": {"count": (5, 40), "radius_mm": (1.5, 7.5), "voxels": (10, 20000)},
}
_PERIVENTRICULAR_SHARE = 0.4


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


# Where a BIDS cohort's lesion masks go (a derivatives dataset); contrasts get bids_layout's suffixes.
LESION_DERIVATIVE = "derivatives/lesion_masks"


def write_cohort(out_dir, subjects: int, seed: int, make_subject, keys, space_code: int, *,
                 layout: str = "folders", sessions: int = 1, scanner_name: str = "default") -> list[str]:
    """Write `subjects` phantoms: out_dir/<name>/<key>.nii.gz, or a BIDS dataset.

    `make_subject(subject_seed)` returns a dict holding `keys` and "affine";
    subject k is made from subject_seed(seed, k), so it depends only on
    (seed, k). "lesion" is stored as uint8, every other key as float32, with
    qform and sform set to the affine under `space_code` (SCANNER_SPACE or
    MNI152_SPACE). Each file is written atomically. Returns the names.

    layout "bids": sub-XX/ses-N/anat/sub-XX_ses-N_<T1w|FLAIR|T2w|PDw>.nii.gz for
    `sessions` sessions (each a fresh draw: session s of subject k is draw
    k * sessions + s), dataset_description.json, and the lesion masks as
    LESION_DERIVATIVE/sub-XX/ses-N/anat/sub-XX_ses-N_label-lesion_mask.nii.gz.
    Both dataset descriptions name `scanner_name` (see scanners.py) under GeneratedBy.
    """
    if layout not in ("folders", "bids"):
        raise UserError(f"layout={layout!r}: use 'folders' or 'bids'")
    out_dir = os.fspath(out_dir)
    names = []
    for index in range(subjects):
        name = subject_name(index)
        if layout == "folders":
            subject = make_subject(subject_seed(seed, index))
            for key in keys:
                _write_image(subject, key, space_code, os.path.join(out_dir, name, f"{key}.nii.gz"))
        else:
            for session in range(sessions):
                subject = make_subject(subject_seed(seed, index * sessions + session))
                entities = f"{name}_ses-{session + 1}"
                anat = os.path.join(name, f"ses-{session + 1}", "anat")
                for key in keys:
                    target = (os.path.join(out_dir, LESION_DERIVATIVE, anat, f"{entities}_label-lesion_mask.nii.gz")
                              if key == "lesion" else
                              os.path.join(out_dir, anat, f"{entities}_{bids_layout.DEFAULT_SUFFIXES[key]}.nii.gz"))
                    _write_image(subject, key, space_code, target)
        names.append(name)
    if layout == "bids":
        generated_by = [{"Name": "jaxcascade phantom", "Description": f"scanner {scanner_name}"}]
        description = {"Name": "jaxcascade phantom cohort", "BIDSVersion": "1.9.0", "DatasetType": "raw",
                       "GeneratedBy": generated_by}
        outputs.write_json(description, os.path.join(out_dir, "dataset_description.json"))
        outputs.write_json({**description, "Name": "phantom lesion masks", "DatasetType": "derivative"},
                           os.path.join(out_dir, LESION_DERIVATIVE, "dataset_description.json"))
    return names


def _write_image(subject: dict, key: str, space_code: int, path: str) -> None:
    import nibabel as nib

    os.makedirs(os.path.dirname(path), exist_ok=True)
    dtype = np.uint8 if key == "lesion" else np.float32
    image = nib.Nifti1Image(subject[key].astype(dtype), subject["affine"])
    image.set_qform(subject["affine"], code=space_code)
    image.set_sform(subject["affine"], code=space_code)
    image.header.set_data_dtype(dtype)
    image.header.set_xyzt_units("mm")
    with outputs.atomic_path(path) as temporary:
        nib.save(image, str(temporary))


def smooth_field(rng, shape, voxel, spacing_mm):
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


def rotation(angles):
    """Rotation matrix from three Euler angles (radians) about x, y, z."""
    cx, cy, cz = np.cos(angles)
    sx, sy, sz = np.sin(angles)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def place_lesions(rng, label, ventricles, voxel, size):
    """Label map (0 = none, k = k-th lesion) of WM lesions, and their count.

    `size` names the grid's row of LESION_SPEC. Lesions avoid every non-WM
    voxel and the WM voxels that touch one, so the lesion mask is free of
    partial volume with CSF and GM, and they are kept apart so that each is
    its own 26-connected component. A share of them lies within a few voxels
    of `ventricles`.
    """
    spec = LESION_SPEC[size]
    shape = label.shape
    wm = label == WM
    # Distances are only needed inside the head / near the ventricles; crop
    # to keep the Euclidean distance transforms cheap on the 1 mm grid.
    head_box = ndimage.find_objects((label != BG).astype(np.uint8))[0]
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


def _lesion_blob(rng, centre, radius, voxel, shape):
    """Box around `centre` and the mask of an irregular blob inside it.

    A union of 1-3 overlapping rotated ellipsoids whose outline is perturbed
    by smooth noise.
    """
    box, u, wobble = blob_frame(rng, centre, radius, int(np.ceil(2.0 * radius / voxel)) + 1, voxel, shape)
    blob = np.zeros(wobble.shape, bool)
    for rho, _ in ellipsoid_parts(rng, u, radius, main=(0.75, 1.25), offset=(0.4, 0.8), part=(0.45, 0.8)):
        blob |= rho < 1.0 + wobble
    return box, blob


def blob_frame(rng, centre, radius, half, voxel, shape):
    """A lesion's box (`half` voxels each side of `centre`, clipped), its voxels' offsets (mm) from the
    centre, and a smooth random perturbation of the outline (relative, std 0.15)."""
    lo = np.maximum(centre - half, 0)
    hi = np.minimum(centre + half + 1, shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    u = np.meshgrid(*[(np.arange(a, b) - c) * voxel for a, b, c in zip(lo, hi, centre)], indexing="ij")
    wobble = ndimage.gaussian_filter(rng.standard_normal(u[0].shape), max(1.0, 0.4 * radius / voxel))
    wobble *= 0.15 / max(wobble.std(), 1e-6)
    return box, u, wobble


def ellipsoid_parts(rng, u, radius, *, main, offset, part):
    """For each of 1-3 rotated ellipsoids making one lesion: the normalised radius of every offset in `u`
    (1 on its surface) and its radii (mm). The first is centred with radii `radius` x uniform(`main`);
    the others sit `radius` x uniform(`offset`) away in a random direction, radii `radius` x uniform(`part`).
    """
    for index in range(rng.integers(1, 4)):
        if index == 0:
            shift, radii = np.zeros(3), radius * rng.uniform(*main, 3)
        else:
            direction = rng.standard_normal(3)
            shift = direction / np.linalg.norm(direction) * radius * rng.uniform(*offset)
            radii = radius * rng.uniform(*part, 3)
        turn = rotation(rng.uniform(-np.pi, np.pi, 3))
        d = [u[i] - shift[i] for i in range(3)]
        yield np.sqrt(sum((sum(d[j] * turn[j, k] for j in range(3)) / radii[k]) ** 2 for k in range(3))), radii


def acquire(rng, clean, head, voxel, scanner: scanners.Scanner = scanners.DEFAULT, slice_mm=None):
    """Partial volume, slice profile, bias field and Rician noise; exactly 0 outside `head`.

    `scanner` sets the noise and bias ranges; `slice_mm` (None: a 3D
    acquisition) the thickness of 2D slices stacked along the last axis.
    The random draws are the same whatever the scanner, so one seed gives the
    same bias field shape and noise pattern, only scaled differently.
    """
    # Blur by half a voxel: border voxels mix the tissues they straddle.
    image = ndimage.gaussian_filter(clean, 0.5)
    if slice_mm is not None:
        image = slice_profile(image, slice_mm, voxel)
    bias = smooth_field(rng, clean.shape, voxel, 70.0)
    low, high = bias[head].min(), bias[head].max()
    peak_to_peak = rng.uniform(*scanner.bias_peak_to_peak)
    image *= 1.0 + peak_to_peak * ((bias - low) / (high - low) - 0.5)
    sigma = np.float32(rng.uniform(*scanner.noise_sigma))
    real = image + sigma * rng.standard_normal(clean.shape, np.float32)
    imaginary = sigma * rng.standard_normal(clean.shape, np.float32)
    image = np.hypot(real, imaginary)
    image[~head] = 0.0
    return image.astype(np.float32)


def slice_profile(image, slice_mm, voxel):
    """`image` as if acquired in `slice_mm`-thick slices along its last axis, on the same grid.

    A slice averages a slab `slice_mm` thick; a voxel already averages one
    `voxel` thick. A Gaussian with the variance the slab adds to the voxel's
    own ((slice^2 - voxel^2) / 12, as for box profiles) blurs through-plane
    only; noise is added afterwards, as the scanner's noise is per voxel.
    """
    extra_variance_mm2 = (slice_mm**2 - voxel**2) / 12.0
    if extra_variance_mm2 <= 0:
        return image  # slices no thicker than the voxels: nothing to add
    return ndimage.gaussian_filter1d(image, np.sqrt(extra_variance_mm2) / voxel, axis=-1)
