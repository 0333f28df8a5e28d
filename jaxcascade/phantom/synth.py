"""Domain-randomised MNI phantoms: real anatomy, lesions and acquisitions drawn wide enough to cover real scans.

A network trained on the `mni` phantom learns that phantom's own tells: every lesion of one
intensity with a sharp edge, deep in white matter, at least ten voxels, under one scanner's
contrasts. Real FLAIR lesions fade into the white matter around them, touch the ventricles and
the cortex, come in clusters of one-voxel specks to confluent caps, and the contrasts between
tissues differ from scanner to scanner. In the manner of SynthSeg and WMH-SynthSeg
(Billot et al. 2023; Laso et al. 2024) each subject here draws, from its seed alone:

- tissue intensities per contrast (grey matter, CSF, the periventricular rim) from wide ranges
  around those of 1.5-3 T scanners, a gamma and a gain per image;
- 8-80 lesions (log-uniform) at periventricular (touching the ventricles' edge), juxtacortical (touching
  grey matter), deep white-matter and infratentorial sites, radii log-uniform over 0.7-9 mm,
  overlapping freely, so that confluent lesions occur;
- each lesion a soft presence map (an irregular ellipsoid union whose edge fades over 0.3-1.5 mm)
  with its own peak intensity and a smooth inner texture: the mask is where presence exceeds
  one half, as a rater outlines a lesion by its visible edge;
- a smooth tissue texture, a blur of 0.3-1.2 voxels (real images are interpolated), with
  probability 0.35 a 2D FLAIR of 2-5 mm slices, a bias field of 0-30 % and Rician noise of
  0.5-6 % of white matter.

Contrasts keep their sense (FLAIR lesions brighter than white matter, T1 lesions darker): the
network's channels are named sequences, so inverting them would teach it nothing true. Images are
rendered in numpy ahead of training (about 10 s a 1 mm subject on one core) and written as an
ordinary cohort, so every training feature (sharding, resuming, augmentation) applies unchanged.
"""

from __future__ import annotations

import functools

import numpy as np
from scipy import ndimage

from jaxcascade.phantom import core as phantom_core, mni
from jaxcascade.errors import UserError

# Per contrast: ranges (relative to white matter = 1) of grey matter, CSF, the ependymal rim,
# lesion peaks, and the image gain. Wider than any one scanner: 1.5 T and 3 T, 2D and 3D FLAIR.
RANGES = {
    "FLAIR": {"gm": (1.05, 1.40), "csf": (0.05, 0.45), "rim": (1.00, 1.15), "lesion": (1.20, 2.20),
              "gain": (50.0, 800.0)},
    "T1": {"gm": (0.55, 0.85), "csf": (0.10, 0.45), "rim": (0.95, 1.00), "lesion": (0.45, 0.97),
           "gain": (200.0, 1200.0)},
    "T2": {"gm": (1.20, 1.70), "csf": (2.00, 4.00), "rim": (1.10, 1.50), "lesion": (1.40, 2.60),
           "gain": (100.0, 800.0)},
    "PD": {"gm": (1.05, 1.30), "csf": (1.05, 1.60), "rim": (1.02, 1.15), "lesion": (1.08, 1.50),
           "gain": (200.0, 900.0)},
}
LESION_COUNT = (8, 80)  # log-uniform: from a few lesions to a heavy, confluent load
RADIUS_MM = (0.7, 9.0)  # log-uniform: most lesions small, a few large
EDGE_MM = (0.3, 1.5)  # width of a lesion's fading edge
# Sites and their shares; infratentorial lesions lie below this MNI height (mm): pons, cerebellum.
SITES = {"periventricular": 0.4, "juxtacortical": 0.2, "deep": 0.3, "infratentorial": 0.1}
_INFRATENTORIAL_Z_MM = -18.0
_BLUR_VOXELS = (0.2, 0.9)
_SLICE_PROBABILITY, _SLICE_MM = 0.35, (2.0, 5.0)
_NOISE = (0.005, 0.06)
_BIAS = (0.0, 0.30)
_GAMMA = (0.8, 1.25)
_TEXTURE = (0.0, 0.04)  # smooth multiplicative tissue texture, relative amplitude


def make_subject(seed: int, size: str = "full", contrasts=("T1", "FLAIR")) -> dict:
    """One domain-randomised subject on the MNI grid `size` (mni.SIZES): {contrast: float32, "lesion", "affine"}.

    Everything depends on `seed` only; each contrast's acquisition on (seed, contrast), so asking for
    more contrasts never changes the others.
    """
    unknown = [c for c in contrasts if c not in RANGES]
    if unknown or not contrasts:
        raise UserError(f"synthetic phantom contrasts {', '.join(contrasts) or 'none'}: "
                        f"use some of {', '.join(RANGES)}")
    base = mni.template(size)
    voxel = float(abs(base["affine"][0, 0]))
    rng = np.random.default_rng([seed, 0])
    fractions = mni.deform(rng, base, voxel)
    head = fractions["brain"] > 0.5
    for name in ("gm", "wm", "csf"):
        fractions[name] *= head
    label, ventricles = mni.tissue_labels(fractions, head, voxel)
    presence, peaks = lesion_presence(rng, fractions, label, ventricles, base["affine"], voxel)
    # The ependymal rim: a thin, faint FLAIR-bright lining, dimmer than any lesion, so that the
    # confluent periventricular lesions of real scans are not taught as its look-alikes.
    rim = ndimage.binary_dilation(ventricles, iterations=max(1, int(round(1.5 / voxel)))) & ~ventricles
    lesion = presence > 0.5

    subject = {}
    for contrast in contrasts:
        crng = np.random.default_rng([seed, 1 + tuple(RANGES).index(contrast)])
        subject[contrast] = _render(crng, contrast, fractions, rim, presence, peaks, head, voxel)
    subject["lesion"] = (lesion & head).astype(np.uint8)
    subject["affine"] = base["affine"].copy()
    return subject


def lesion_presence(rng, fractions, label, ventricles, affine, voxel) -> tuple[np.ndarray, np.ndarray]:
    """The lesions' presence (D, H, W) in [0, 1] and each voxel's relative peak intensity in [0.5, 1].

    Overlapping lesions merge (presence takes the maximum: a confluent lesion); a voxel's peak is
    that of the lesion most present there.
    """
    shape = label.shape
    wm = label == phantom_core.WM
    gm = label == phantom_core.GM
    box = ndimage.find_objects(label.astype(bool).astype(np.uint8))[0]
    near_ventricles = np.zeros(shape, bool)
    near_gm = np.zeros(shape, bool)
    near_ventricles[box] = (ndimage.distance_transform_edt(~ventricles[box]) * voxel <= 3.0) & wm[box]
    near_gm[box] = (ndimage.distance_transform_edt(~gm[box]) * voxel <= 2.5) & wm[box]
    world_z = (np.arange(shape[2]) * affine[2, 2] + affine[2, 3])
    low = np.zeros(shape, bool)
    low[:, :, world_z < _INFRATENTORIAL_Z_MM] = True
    deep = wm & ~near_ventricles & ~near_gm
    sites = {"periventricular": near_ventricles, "juxtacortical": near_gm & ~low, "deep": deep & ~low,
             "infratentorial": wm & low}
    pools = {name: np.flatnonzero(mask) for name, mask in sites.items()}
    names = [name for name in SITES if pools[name].size]
    if not names:
        raise UserError("synthetic phantom: no white matter found in the deformed template")
    shares = np.array([SITES[name] for name in names])
    host = fractions["wm"] + fractions["gm"]  # a lesion shows only where tissue is (not in CSF)

    presence = np.zeros(shape, np.float32)
    peak = np.zeros(shape, np.float32)
    count = int(np.exp(rng.uniform(*np.log(LESION_COUNT))))
    for _ in range(count):
        site = names[rng.choice(len(names), p=shares / shares.sum())]
        radius = float(np.exp(rng.uniform(*np.log(RADIUS_MM))))
        if site == "infratentorial" or site == "juxtacortical":
            radius = min(radius, 4.0)  # these sites hold small lesions
        centre = np.array(np.unravel_index(rng.choice(pools[site]), shape))
        window, soft = _soft_blob(rng, centre, radius, rng.uniform(*EDGE_MM), voxel, shape)
        soft *= np.clip(host[window] * 1.5, 0.0, 1.0)
        strength = np.float32(rng.uniform(0.5, 1.0))
        stronger = soft > presence[window]
        peak[window] = np.where(stronger, strength, peak[window])
        presence[window] = np.maximum(presence[window], soft)
    return presence, peak


def _soft_blob(rng, centre, radius, edge_mm, voxel, shape):
    """A box around `centre` and an irregular blob's presence in it: 1 inside, fading over `edge_mm`."""
    half = int(np.ceil((2.0 * radius + 2 * edge_mm) / voxel)) + 1
    window, u, wobble = phantom_core.blob_frame(rng, centre, radius, half, voxel, shape)
    distance = np.full(wobble.shape, np.inf)
    for rho, radii in phantom_core.ellipsoid_parts(rng, u, radius, main=(0.6, 1.4), offset=(0.4, 0.9),
                                                   part=(0.4, 0.8)):
        # Signed distance (mm, approximately) outside the ellipsoid's surface.
        distance = np.minimum(distance, (rho - 1.0 - wobble) * radii.min())
    soft = 1.0 / (1.0 + np.exp(distance / (edge_mm / 4.0)))
    return window, soft.astype(np.float32)


def _render(rng, contrast, fractions, rim, presence, peaks, head, voxel) -> np.ndarray:
    ranges = RANGES[contrast]
    gm_c, csf_c, rim_c = (rng.uniform(*ranges[key]) for key in ("gm", "csf", "rim"))
    low, high = ranges["lesion"]
    # A lesion's intensity: between the lowest and the highest of this image's lesion range,
    # scaled by its own strength, so bright and faint lesions occur in one image.
    image_peak = rng.uniform(low + 0.4 * (high - low), high)
    lesion_level = 1.0 + (image_peak - 1.0) * peaks
    inner = 1.0 + rng.uniform(0.0, 0.15) * phantom_core.smooth_field(rng, head.shape, voxel, 6.0)
    white = np.where(rim, np.float32(rim_c), np.float32(1.0))
    white = white * (1.0 - presence) + lesion_level * inner * presence
    clean = fractions["csf"] * csf_c + fractions["gm"] * gm_c + fractions["wm"] * white
    texture = 1.0 + rng.uniform(*_TEXTURE) * phantom_core.smooth_field(rng, head.shape, voxel, 4.0)
    image = ndimage.gaussian_filter(clean * texture, rng.uniform(*_BLUR_VOXELS))
    if contrast == "FLAIR" and rng.random() < _SLICE_PROBABILITY:
        image = phantom_core.slice_profile(image, rng.uniform(*_SLICE_MM), voxel)
    bias = phantom_core.smooth_field(rng, head.shape, voxel, 70.0)
    lo, hi = bias[head].min(), bias[head].max()
    image *= 1.0 + rng.uniform(*_BIAS) * ((bias - lo) / (hi - lo) - 0.5)
    sigma = np.float32(rng.uniform(*_NOISE))
    image = np.hypot(image + sigma * rng.standard_normal(head.shape, np.float32),
                     sigma * rng.standard_normal(head.shape, np.float32))
    image = np.maximum(image, 0.0) ** rng.uniform(*_GAMMA)
    image[~head] = 0.0
    return (image * rng.uniform(*ranges["gain"])).astype(np.float32)


def write_cohort(out_dir, subjects: int, seed: int, size: str = "full", contrasts=("T1", "FLAIR"), *,
                 layout: str = "folders", sessions: int = 1) -> list[str]:
    """Write `subjects` domain-randomised phantoms as out_dir/<name>/{<contrast>...,lesion}.nii.gz (see mni)."""
    return phantom_core.write_cohort(out_dir, subjects, seed,
                                     functools.partial(make_subject, size=size, contrasts=contrasts),
                                     (*contrasts, "lesion"), phantom_core.MNI152_SPACE, layout=layout,
                                     sessions=sessions, scanner_name="synth (domain-randomised)")
