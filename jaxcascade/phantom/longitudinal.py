"""Two synthetic visits: lesions appear, grow, shrink, vanish, merge and split; the head moves; the scanner changes.

The procedural anatomy (`procedural.anatomy`) is imaged twice. Its lesions are analytic ellipsoids, each
group of them given one fate between the visits (`evaluation.change`'s classes): stable, enlarging
(radii x 1.45, about 3x the volume), shrinking (radii x 0.6, about 0.2x), disappearing, new, merging (two
lesions 4 voxels apart joined by a bridge) and splitting (the bridge gone). Groups lie at least 4 voxels
apart, so that each keeps its fate after a nearest-neighbour resampling onto the other visit's grid.

Between the visits the head moves rigidly (`motion`: a rotation about the grid centre and a translation)
and the scanner changes (another `scanners.Scanner`: lesion and grey-matter contrast, noise, bias field,
gain). The follow-up is rendered in its own position, lesions included, rather than resampled from the
baseline, so its masks are exact on its own grid, as a real follow-up's would be.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy import ndimage

from jaxcascade.errors import UserError
from jaxcascade.phantom import core as phantom_core, procedural, scanners
from jaxcascade.phantom.core import BG, WM

FATES = ("stable", "enlarging", "shrinking", "disappearing", "new", "merging", "splitting")
_GROW, _SHRINK = 1.45, 0.6
_GAP_VOXELS = 4  # between groups and between the two halves of a merge/split, in voxels


@dataclasses.dataclass(frozen=True)
class LongitudinalSpec:
    """How many lesion groups of each fate, the motion's range and the two visits' scanners."""

    stable: int = 3
    enlarging: int = 2
    shrinking: int = 2
    disappearing: int = 2
    new: int = 2
    merging: int = 1
    splitting: int = 1
    size: str = "small"
    max_rotation_deg: float = 5.0
    max_translation_mm: float = 5.0
    baseline_scanner: str = "default"
    followup_scanner: str = "1.5T"

    def counts(self) -> dict[str, int]:
        return {fate: getattr(self, fate) for fate in FATES}


@dataclasses.dataclass(frozen=True)
class TrueChange:
    """One lesion group's fate, and its centre in baseline world coordinates (mm)."""

    change_class: str
    centre_mm: tuple[float, float, float]


@dataclasses.dataclass(frozen=True)
class LongitudinalPhantom:
    """Two visits of one synthetic patient.

    `baseline` / `followup`: {"FLAIR", "T1"} float32 images, each on the grid of `affine`, the follow-up
    with the head moved. `motion`: 4x4 world-to-world matrix taking a point of the head at the baseline to
    where it is at the follow-up (so the follow-up's voxel v is the baseline's anatomy at
    inv(motion) @ affine @ v). `baseline_mask`, `followup_mask`: uint8 lesion masks on each visit's own
    images; `followup_mask_unmoved`: the follow-up's lesions rendered without the motion, on the baseline's
    grid. `changes`: the true fate of every group.
    """

    baseline: dict
    followup: dict
    baseline_mask: np.ndarray
    followup_mask: np.ndarray
    followup_mask_unmoved: np.ndarray
    brain_mask: np.ndarray
    affine: np.ndarray
    motion: np.ndarray
    changes: tuple[TrueChange, ...]


@dataclasses.dataclass(frozen=True)
class _Ellipsoid:
    centre: np.ndarray  # mm, baseline world
    radii: np.ndarray  # mm
    turn: np.ndarray  # 3x3, columns = the ellipsoid's axes

    def inside(self, points: list[np.ndarray]) -> np.ndarray:
        d = [p - c for p, c in zip(points, self.centre)]
        rho = sum((sum(d[j] * self.turn[j, k] for j in range(3)) / self.radii[k]) ** 2 for k in range(3))
        return rho < 1.0

    def scaled(self, factor: float) -> "_Ellipsoid":
        return dataclasses.replace(self, radii=self.radii * factor)


def _group(rng, fate: str, centre: np.ndarray, voxel: float) -> tuple[list[_Ellipsoid], list[_Ellipsoid], float]:
    """The ellipsoids of one group at baseline and at follow-up, and the group's extent (mm from centre)."""
    turn = phantom_core.rotation(rng.uniform(-np.pi, np.pi, 3))
    if fate in ("merging", "splitting"):
        radius = rng.uniform(5.0, 6.0)
        axis = turn[:, 0]
        # Two balls whose facing surfaces lie _GAP_VOXELS apart; the bridge spans the gap with a thick waist.
        half_gap = radius + _GAP_VOXELS * voxel / 2
        halves = [_Ellipsoid(centre + s * half_gap * axis, np.full(3, radius), turn) for s in (-1, 1)]
        bridge = _Ellipsoid(centre, np.array([half_gap + 0.5 * radius, 0.75 * radius, 0.75 * radius]), turn)
        joined, apart = halves + [bridge], halves
        before, after = (apart, joined) if fate == "merging" else (joined, apart)
        return before, after, half_gap + radius
    radius = rng.uniform(7.0, 9.0)
    lesion = _Ellipsoid(centre, radius * rng.uniform(0.85, 1.15, 3), turn)
    before, after = {
        "stable": ([lesion], [lesion]),
        "enlarging": ([lesion], [lesion.scaled(_GROW)]),
        "shrinking": ([lesion], [lesion.scaled(_SHRINK)]),
        "disappearing": ([lesion], []),
        "new": ([], [lesion]),
    }[fate]
    return before, after, float(lesion.radii.max()) * (_GROW if fate == "enlarging" else 1.0)


def _place_groups(rng, label, affine, voxel, counts):
    """Centres (mm) of lesion groups deep enough in the brain and apart from each other, in random order."""
    fates = [fate for fate, n in counts.items() for _ in range(n)]
    rng.shuffle(fates)
    brain_depth = ndimage.distance_transform_edt(label != BG) * voxel
    wm_centres = np.argwhere((label == WM) & (brain_depth >= 12.0))
    groups = []
    for fate in fates:
        for _ in range(500 if len(wm_centres) else 0):
            centre = affine[:3, :3] @ wm_centres[rng.integers(len(wm_centres))] + affine[:3, 3]
            before, after, extent = _group(rng, fate, centre, voxel)
            index = tuple(np.round(np.linalg.solve(affine[:3, :3], centre - affine[:3, 3])).astype(int))
            if brain_depth[index] < extent + 2 * voxel:
                continue
            if all(np.linalg.norm(centre - c) >= extent + e + _GAP_VOXELS * voxel for c, e, *_ in groups):
                groups.append((centre, extent, fate, before, after))
                break
        else:
            raise UserError(f"longitudinal phantom: no room for a {fate} lesion group; ask for fewer groups or a larger size")
    return groups


def _render(ellipsoids: list[_Ellipsoid], points: list[np.ndarray]) -> np.ndarray:
    mask = np.zeros(points[0].shape, bool)
    for ellipsoid in ellipsoids:
        mask |= ellipsoid.inside(points)
    return mask


def _image(rng, label, lesion, head, voxel, scanner: scanners.Scanner) -> dict:
    """FLAIR and T1 of a label map and lesion mask at a scanner's contrast, noise and bias (as procedural's)."""
    images = {}
    for name, table, gain in (("T1", procedural.T1_CONTRAST, (400.0, 1200.0)),
                              ("FLAIR", procedural.FLAIR_CONTRAST, (200.0, 800.0))):
        contrast = table.copy()
        contrast[procedural.GM] = scanner.grey_matter[name]
        lesion_factor = np.array([rng.uniform(*scanner.lesion[name])])
        clean = procedural.tissue_image(label, lesion.astype(np.uint8), contrast, lesion_factor)
        image = phantom_core.acquire(rng, clean, head, voxel, scanner, scanner.slice_mm(name))
        images[name] = image * rng.uniform(*gain)
    return images


def make_pair(seed: int, spec: LongitudinalSpec = LongitudinalSpec()) -> LongitudinalPhantom:
    """Two visits of one synthetic patient drawn from `seed` (everything depends on it alone)."""
    shape, voxel = procedural.SIZES[spec.size]
    rng = np.random.default_rng(seed)
    affine = np.diag([voxel, voxel, voxel, 1.0])
    affine[:3, 3] = -(np.array(shape) - 1) / 2 * voxel
    label, _ = procedural.anatomy(rng, shape, voxel)
    groups = _place_groups(rng, label, affine, voxel, spec.counts())

    grid = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij")
    world = [affine[i, i] * grid[i] + affine[i, 3] for i in range(3)]
    angles = np.deg2rad(rng.uniform(-spec.max_rotation_deg, spec.max_rotation_deg, 3))
    motion = np.eye(4)
    motion[:3, :3] = phantom_core.rotation(angles)
    motion[:3, 3] = rng.uniform(-spec.max_translation_mm, spec.max_translation_mm, 3)
    # Each follow-up voxel shows the anatomy that sat at inv(motion) @ its world position at baseline.
    back = np.linalg.inv(motion)
    moved_world = [sum(back[i, j] * world[j] for j in range(3)) + back[i, 3] for i in range(3)]
    moved_index = [(moved_world[i] - affine[i, 3]) / affine[i, i] for i in range(3)]
    moved_label = ndimage.map_coordinates(label, moved_index, order=0, mode="constant", cval=BG)

    before = [e for _, _, _, b, _ in groups for e in b]
    after = [e for _, _, _, _, a in groups for e in a]
    baseline_mask = _render(before, world) & (label != BG)
    followup_unmoved = _render(after, world) & (label != BG)
    followup_mask = _render(after, moved_world) & (moved_label != BG)
    baseline = _image(rng, label, baseline_mask, label != BG, voxel, scanners.get_scanner(spec.baseline_scanner))
    followup = _image(rng, moved_label, followup_mask, moved_label != BG, voxel,
                      scanners.get_scanner(spec.followup_scanner))
    changes = tuple(TrueChange(fate, tuple(float(c) for c in centre)) for centre, _, fate, _, _ in groups)
    return LongitudinalPhantom(baseline, followup, baseline_mask.astype(np.uint8), followup_mask.astype(np.uint8),
                               followup_unmoved.astype(np.uint8), label != BG, affine, motion, changes)


def followup_onto_baseline(phantom: LongitudinalPhantom, image: np.ndarray, order: int = 0) -> np.ndarray:
    """A follow-up array resampled onto the baseline's grid by the true motion (order 0: nearest, for masks)."""
    to_followup_voxels = np.linalg.inv(phantom.affine) @ phantom.motion @ phantom.affine
    return ndimage.affine_transform(image, to_followup_voxels[:3, :3], to_followup_voxels[:3, 3], order=order,
                                    mode="constant", cval=0)
