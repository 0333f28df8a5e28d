"""Lesion change between two visits: the overlap graph of their lesions, each group classified.

Both masks lie on ONE grid (the follow-up registered onto the baseline, or both onto a common space). A
lesion is a 26-connected component (`lesions.label_lesions`, as everywhere in jaxcascade). Baseline and
follow-up lesions that share a voxel are joined; the connected parts of that bipartite graph are the
*groups*, and each group gets one class from how many lesions it holds at each visit and how its volume
changed:

| code | class        | baseline lesions | follow-up lesions | volume                                |
|------|--------------|------------------|-------------------|---------------------------------------|
| 1    | new          | 0                | 1                 | follow-up >= min_new_lesion_mm3       |
| 2    | enlarging    | 1                | 1                 | grew by the growth criterion          |
| 3    | shrinking    | 1                | 1                 | shrank by the growth criterion, mirrored |
| 4    | disappearing | 1                | 0                 | baseline >= min_new_lesion_mm3        |
| 5    | merging      | >= 2             | 1                 | any                                   |
| 6    | splitting    | 1                | >= 2              | any                                   |
| 7    | stable       | 1                | 1                 | neither grew nor shrank               |
| 8    | complex      | >= 2             | >= 2              | any (lesions both merged and split)   |

Swapping the visits swaps new/disappearing, enlarging/shrinking and merging/splitting, and keeps the
others (`MIRRORED`): shrinking is the growth criterion read backwards in time. A new (or disappeared)
lesion smaller than `min_new_lesion_mm3` is dropped as noise: it is in neither mask nor table, only in the
summary's `ignored_small_count`.

The *activity* of a pair of visits, the MS trials' "new or enlarging T2 lesions", is the lesion tissue the
follow-up has and the baseline had not, in groups that are new or grew by the criterion, whatever their
class (a new lesion that touches an old one joins its group as merging or enlarging growth). This is
what an expert lesion-change ground truth such as Lesjak et al. 2016's outlines, and what
`score_change` compares with it.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from jaxcascade.errors import UserError
from jaxcascade.evaluation import metrics
from jaxcascade.evaluation.lesions import bounding_box, label_lesions

CHANGE_CODES: dict[str, int] = {"new": 1, "enlarging": 2, "shrinking": 3, "disappearing": 4, "merging": 5,
                                "splitting": 6, "stable": 7, "complex": 8}
CHANGE_CLASSES: tuple[str, ...] = tuple(CHANGE_CODES)
# The class a group takes when the two visits are swapped.
MIRRORED: dict[str, str] = {"new": "disappearing", "disappearing": "new", "enlarging": "shrinking",
                            "shrinking": "enlarging", "merging": "splitting", "splitting": "merging",
                            "stable": "stable", "complex": "complex"}

# A sphere 3 mm across (14.1 mm^3): the smallest lesion MS reading conventions count ("at least 3 mm").
SMALLEST_LESION_MM3 = 4.0 / 3.0 * math.pi * 1.5**3


@dataclasses.dataclass(frozen=True)
class ChangeCriteria:
    """When a lesion counts as enlarged, and how small a new lesion may be.

    A lesion of baseline volume V0 and follow-up volume V1 is *enlarging* when it grew by at least
    `min_relative_growth` x V0 AND by at least `min_absolute_growth_mm3`; *shrinking* is the same read
    backwards in time (V0 - V1 >= min_relative_growth x V1 and >= min_absolute_growth_mm3), so that swapping
    the visits swaps the two classes exactly.

    Defaults, and where they come from. Trials count "new or enlarging T2 lesions" by reader judgement,
    without one numeric rule; what bounds the rule is measurement noise. Repeated outlining of the same MS
    lesions varied by a coefficient of variation of 22.6 % for lesions under 0.67 cm^2 in-plane, so a change
    above 45.2 % (12.1 % / 24.2 % for larger lesions) is needed to exclude measurement variability (Arch
    Neurol 1992;49(3):261-263, doi:10.1001/archneur.1992.00530270075021); `min_relative_growth` = 0.5 sits
    just above that bound for the small lesions that make up most counts. The absolute minimum and the
    smallest new lesion are a sphere 3 mm across (14.1 mm^3), the "at least 3 mm" minimum lesion size of
    MS reading conventions: a growth by less than one such lesion is within a voxel's partial volume at the
    border of a typical lesion. Both are options: a trial's own charter wins.
    """

    min_relative_growth: float = 0.5
    min_absolute_growth_mm3: float = SMALLEST_LESION_MM3
    min_new_lesion_mm3: float = SMALLEST_LESION_MM3

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise UserError(f"change criterion {field.name} = {value!r}: give a finite number >= 0")

    def grew(self, before_mm3: float, after_mm3: float) -> bool:
        """Whether a lesion of `before_mm3` that became `after_mm3` enlarged by this criterion."""
        growth = after_mm3 - before_mm3
        return growth > 0 and growth >= self.min_absolute_growth_mm3 and growth >= self.min_relative_growth * before_mm3


@dataclasses.dataclass(frozen=True)
class LesionChange:
    """One group of the overlap graph: a row of the change table.

    `centroid_mm` is the centre of the group's voxels at either visit in the grid's world coordinates
    (RAS mm for a NIfTI affine); `grown_volume_ml` the follow-up lesion volume the baseline had not.
    `active` marks the groups that count as new or enlarging activity (new, or grew by the criterion).
    """

    group: int
    change_class: str
    baseline_lesions: int
    followup_lesions: int
    baseline_volume_ml: float
    followup_volume_ml: float
    grown_volume_ml: float
    centroid_mm: tuple[float, float, float]
    active: bool


@dataclasses.dataclass(frozen=True)
class ChangeSummary:
    """One participant's pair of visits: groups per class, active groups (new or grown), the activity's volume, the
    lesion volume at each visit (over the table's groups) and how many lesions were too small to count."""

    new_count: int
    enlarging_count: int
    shrinking_count: int
    disappearing_count: int
    merging_count: int
    splitting_count: int
    stable_count: int
    complex_count: int
    active_count: int
    new_and_enlarging_volume_ml: float
    baseline_volume_ml: float
    followup_volume_ml: float
    ignored_small_count: int


@dataclasses.dataclass(frozen=True)
class LesionChanges:
    """`change_mask`: each group's voxels (either visit) carry its class's CHANGE_CODES value, 0 elsewhere;
    `group_mask`: the group's number (1.. as in `rows`); `activity_mask`: new and enlarging lesion tissue."""

    change_mask: np.ndarray
    group_mask: np.ndarray
    activity_mask: np.ndarray
    rows: tuple[LesionChange, ...]
    summary: ChangeSummary
    criteria: ChangeCriteria


def _class_of(n_baseline: int, n_followup: int, before_mm3: float, after_mm3: float,
              criteria: ChangeCriteria) -> str:
    if n_baseline == 0:
        return "new"
    if n_followup == 0:
        return "disappearing"
    if n_baseline > 1 and n_followup > 1:
        return "complex"
    if n_baseline > 1:
        return "merging"
    if n_followup > 1:
        return "splitting"
    if criteria.grew(before_mm3, after_mm3):
        return "enlarging"
    if criteria.grew(after_mm3, before_mm3):
        return "shrinking"
    return "stable"


def classify_changes(baseline, followup, affine, criteria: ChangeCriteria = ChangeCriteria()) -> LesionChanges:
    """Match the lesions of two visits' masks on one grid and classify every group (module docstring).

    Args:
        baseline: the earlier visit's binary lesion mask (bool or 0/1).
        followup: the later visit's, on the same grid.
        affine: the grid's 4x4 voxel-to-world matrix (volumes from its determinant, centroids through it).
        criteria: the growth criterion and the smallest counted new lesion.

    Returns:
        `LesionChanges`: change, group and activity masks on the grid, one row per group (groups numbered
        in the order of their first baseline lesion, new lesions after), and the summary.

    Raises:
        ValueError: if the shapes differ or a mask is not binary.
    """
    baseline_mask, followup_mask = metrics.as_binary(baseline, "baseline"), metrics.as_binary(followup, "followup")
    if baseline_mask.shape != followup_mask.shape:
        raise ValueError(f"baseline shape {baseline_mask.shape} differs from follow-up shape {followup_mask.shape}")
    affine = np.asarray(affine, np.float64)
    voxel_mm3 = abs(float(np.linalg.det(affine[:3, :3])))
    shape = baseline_mask.shape
    change_mask, group_mask = np.zeros(shape, np.uint8), np.zeros(shape, np.int32)
    activity_mask = np.zeros(shape, bool)

    # Everything happens inside the two masks' joint box: a brain's few thousand lesion voxels, not its millions.
    box = bounding_box(baseline_mask | followup_mask)
    if box is None:
        empty = ChangeSummary(0, 0, 0, 0, 0, 0, 0, 0, 0, 0.0, 0.0, 0.0, 0)
        return LesionChanges(change_mask, group_mask, activity_mask, (), empty, criteria)
    groups = _overlap_groups(baseline_mask[box], followup_mask[box], box, affine, voxel_mm3)
    verdicts = _classify_groups(groups, criteria, voxel_mm3)
    change_mask[box][groups.where] = verdicts.codes[groups.members]
    group_mask[box][groups.where] = verdicts.numbers[groups.members]
    activity_mask[box][groups.where] = groups.grown & verdicts.active[groups.members]

    rows = verdicts.rows
    counts = {name: sum(row.change_class == name for row in rows) for name in CHANGE_CLASSES}
    summary = ChangeSummary(
        **{f"{name}_count": counts[name] for name in CHANGE_CLASSES},
        active_count=sum(row.active for row in rows),
        new_and_enlarging_volume_ml=float(activity_mask.sum()) * voxel_mm3 / 1000.0,
        baseline_volume_ml=sum(row.baseline_volume_ml for row in rows),
        followup_volume_ml=sum(row.followup_volume_ml for row in rows),
        ignored_small_count=verdicts.ignored)
    return LesionChanges(change_mask, group_mask, activity_mask, rows, summary, criteria)


@dataclasses.dataclass(frozen=True)
class _OverlapGroups:
    """The groups of the overlap graph, measured over the lesion voxels of either visit (in a box)."""

    where: tuple[np.ndarray, ...]  # the box's indices of those voxels
    members: np.ndarray  # each voxel's group
    grown: np.ndarray  # each voxel: lesion at follow-up only
    count_before: np.ndarray  # per group: baseline lesions, follow-up lesions, volumes (mm^3), grown voxels
    count_after: np.ndarray
    volume_before: np.ndarray
    volume_after: np.ndarray
    grown_voxels: np.ndarray
    centre_mm: np.ndarray  # per group: the union's centroid in world coordinates


def _overlap_groups(baseline_box: np.ndarray, followup_box: np.ndarray, box: tuple[slice, ...],
                    affine: np.ndarray, voxel_mm3: float) -> _OverlapGroups:
    before_lesions = label_lesions(baseline_box)
    after_lesions = label_lesions(followup_box)
    n_before, n_after = before_lesions.count, after_lesions.count
    # Every statistic below runs over the lesion voxels of either visit only, not over the box.
    union = baseline_box | followup_box
    where = np.nonzero(union)
    label_before = before_lesions.full_labels()[where]
    label_after = after_lesions.full_labels()[where]

    # The overlap graph: nodes are baseline lesions 0..n_before-1 then follow-up lesions; an edge per shared voxel.
    both = (label_before > 0) & (label_after > 0)
    graph = coo_matrix((np.ones(int(both.sum())), (label_before[both] - 1, label_after[both] - 1 + n_before)),
                       shape=(n_before + n_after,) * 2)
    _, node_group = connected_components(graph, directed=False)

    voxels_before = np.bincount(label_before, minlength=n_before + 1)[1:]
    voxels_after = np.bincount(label_after, minlength=n_after + 1)[1:]
    group_of_before, group_of_after = node_group[:n_before], node_group[n_before:]
    n_groups = int(node_group.max()) + 1
    count_before = np.bincount(group_of_before, minlength=n_groups)
    count_after = np.bincount(group_of_after, minlength=n_groups)
    volume_before = np.bincount(group_of_before, weights=voxels_before, minlength=n_groups) * voxel_mm3
    volume_after = np.bincount(group_of_after, weights=voxels_after, minlength=n_groups) * voxel_mm3

    # Each lesion voxel's group (a voxel in both visits has the same group from either, by construction).
    in_before = label_before > 0
    members = np.empty(label_before.size, np.int64)
    members[in_before] = group_of_before[label_before[in_before] - 1]
    members[~in_before] = group_of_after[label_after[~in_before] - 1]
    union_voxels = np.bincount(members, minlength=n_groups)
    centre_voxel = np.stack([np.bincount(members, weights=index + s.start, minlength=n_groups)
                             for index, s in zip(where, box)], axis=1) / np.maximum(union_voxels, 1)[:, None]
    centre_mm = centre_voxel @ affine[:3, :3].T + affine[:3, 3]
    grown = (label_after > 0) & (label_before == 0)
    grown_voxels = np.bincount(members[grown], minlength=n_groups)
    return _OverlapGroups(where, members, grown, count_before, count_after, volume_before, volume_after,
                          grown_voxels, centre_mm)


@dataclasses.dataclass(frozen=True)
class _GroupVerdicts:
    """Each group's class and activity: the table's rows, and per group its code, row number (0: dropped)."""

    rows: tuple[LesionChange, ...]
    codes: np.ndarray
    numbers: np.ndarray
    active: np.ndarray
    ignored: int  # new or disappeared lesions dropped as smaller than min_new_lesion_mm3


def _classify_groups(groups: _OverlapGroups, criteria: ChangeCriteria, voxel_mm3: float) -> _GroupVerdicts:
    count_before, count_after = groups.count_before, groups.count_after
    volume_before, volume_after = groups.volume_before, groups.volume_after
    n_groups = count_before.size
    rows, ignored = [], 0
    number = np.zeros(n_groups, np.int32)
    active_groups = np.zeros(n_groups, bool)
    codes = np.zeros(n_groups, np.uint8)
    for g in range(n_groups):
        change_class = _class_of(int(count_before[g]), int(count_after[g]), volume_before[g], volume_after[g], criteria)
        largest_mm3 = max(volume_before[g], volume_after[g])
        if change_class in ("new", "disappearing") and largest_mm3 < criteria.min_new_lesion_mm3:
            ignored += 1
            continue
        active = change_class == "new" or (count_before[g] > 0 and criteria.grew(volume_before[g], volume_after[g]))
        number[g], codes[g], active_groups[g] = len(rows) + 1, CHANGE_CODES[change_class], active
        rows.append(LesionChange(
            group=len(rows) + 1, change_class=change_class,
            baseline_lesions=int(count_before[g]), followup_lesions=int(count_after[g]),
            baseline_volume_ml=float(volume_before[g]) / 1000.0, followup_volume_ml=float(volume_after[g]) / 1000.0,
            grown_volume_ml=float(groups.grown_voxels[g]) * voxel_mm3 / 1000.0,
            centroid_mm=tuple(float(c) for c in groups.centre_mm[g]), active=bool(active)))
    return _GroupVerdicts(tuple(rows), codes, number, active_groups, ignored)


def table_rows(changes: LesionChanges) -> list[dict]:
    """The change table as flat rows (one per group, units in the column names), for a CSV or a data frame."""
    rows = []
    for row in changes.rows:
        flat = dataclasses.asdict(row)
        x, y, z = flat.pop("centroid_mm")
        rows.append({**flat, "centroid_x_mm": x, "centroid_y_mm": y, "centroid_z_mm": z})
    return rows


def summary_row(changes: LesionChanges) -> dict:
    """The per-participant summary as one flat row, with the growth criterion it was counted under."""
    return {**dataclasses.asdict(changes.summary), **dataclasses.asdict(changes.criteria)}


@dataclasses.dataclass(frozen=True)
class ChangeScore:
    """A predicted lesion change scored against a true one (binary masks of changed lesion tissue).

    `dsc` is voxel-wise; lesions are 26-connected components of each mask: `lesion_tpr` the share of true
    change lesions the prediction overlaps in >= 1 voxel, `lesion_ppv` the share of predicted change lesions
    that overlap the truth in >= 1 voxel, `lesion_f1` their harmonic mean (conventions for empty masks as in
    `metrics.segmentation_metrics`: nan where a share is undefined, perfect scores for two empty masks).
    """

    dsc: float
    lesion_tpr: float
    lesion_ppv: float
    lesion_f1: float
    true_lesions: int
    predicted_lesions: int
    detected_lesions: int
    false_positive_lesions: int


def score_change(predicted, truth) -> ChangeScore:
    """Score a predicted change mask (e.g. `LesionChanges.activity_mask`) against a ground-truth change mask."""
    scores = metrics.segmentation_metrics(predicted, truth)
    return ChangeScore(
        dsc=scores["dsc"], lesion_tpr=scores["lesion_tpr"], lesion_ppv=1.0 - scores["lesion_fpr"],
        lesion_f1=scores["lesion_f1"], true_lesions=scores["true_lesions"], predicted_lesions=scores["pred_lesions"],
        detected_lesions=scores["detected_lesions"], false_positive_lesions=scores["false_positive_lesions"])
