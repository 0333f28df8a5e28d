"""Lesion change between two visits: classes, table, summary, scoring, intensity matching and the QC picture.

The synthetic two-visit phantom (`phantom.longitudinal`) knows every lesion group's fate, the head's motion
and that the scanner changed; generated configurations of boxes, each given a fate, check the classifier
over shapes, sizes and voxel sizes the phantom does not draw.
"""

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from scipy import ndimage

from jaxcascade.data.intensity_matching import match_intensities
from jaxcascade.errors import UserError
from jaxcascade.evaluation import plots
from jaxcascade.evaluation.change import (CHANGE_CLASSES, CHANGE_CODES, MIRRORED, ChangeCriteria, classify_changes,
                                          score_change, summary_row, table_rows)
from jaxcascade.phantom import longitudinal


@pytest.fixture(scope="module", params=[3, 11])
def pair(request):
    return longitudinal.make_pair(request.param)


def _matched_classes(rows, truths, tolerance_mm: float) -> list[tuple[str, str]]:
    """(found class, true class) for each true group, matched to the row whose centroid is nearest."""
    centres = np.array([row.centroid_mm for row in rows])
    pairs, used = [], set()
    for truth in truths:
        distance = np.linalg.norm(centres - np.array(truth.centre_mm), axis=1)
        nearest = int(np.argmin(distance))
        assert distance[nearest] < tolerance_mm, f"no group near the {truth.change_class} one at {truth.centre_mm}"
        used.add(nearest)
        pairs.append((rows[nearest].change_class, truth.change_class))
    assert len(used) == len(truths) == len(rows)
    return pairs


def test_the_phantom_moves_the_head_and_changes_the_scanner(pair):
    angle = np.degrees(np.arccos(np.clip((np.trace(pair.motion[:3, :3]) - 1) / 2, -1, 1)))
    assert angle > 0.5 and np.linalg.norm(pair.motion[:3, 3]) > 1.0
    # On its own grid the follow-up's lesions are not where the baseline's grid holds them...
    unmoved, moved = pair.followup_mask_unmoved.astype(bool), pair.followup_mask.astype(bool)
    assert (unmoved & moved).sum() < 0.8 * unmoved.sum()
    # ...and the known motion brings them back.
    back = longitudinal.followup_onto_baseline(pair, pair.followup_mask).astype(bool)
    assert 2 * (back & unmoved).sum() / (back.sum() + unmoved.sum()) > 0.9
    # Another scanner: the lesion-to-white-matter contrast of the FLAIR differs between the visits.
    def contrast(image, mask, brain):
        return np.median(image[mask.astype(bool)]) / np.median(image[brain & ~mask.astype(bool)])
    flair_back = longitudinal.followup_onto_baseline(pair, pair.followup["FLAIR"], order=1)
    assert abs(contrast(pair.baseline["FLAIR"], pair.baseline_mask, pair.brain_mask)
               - contrast(flair_back, back, pair.brain_mask)) > 0.02


def test_every_phantom_group_gets_its_true_class(pair):
    back = longitudinal.followup_onto_baseline(pair, pair.followup_mask)
    for followup in (back, pair.followup_mask_unmoved):
        changes = classify_changes(pair.baseline_mask, followup, pair.affine)
        pairs = _matched_classes(changes.rows, pair.changes, tolerance_mm=6.0)
        assert [found for found, _ in pairs] == [true for _, true in pairs]
        spec = longitudinal.LongitudinalSpec()
        summary = changes.summary
        assert (summary.new_count, summary.enlarging_count, summary.shrinking_count, summary.disappearing_count,
                summary.merging_count, summary.splitting_count, summary.stable_count) == (
            spec.new, spec.enlarging, spec.shrinking, spec.disappearing, spec.merging, spec.splitting, spec.stable)
        assert summary.ignored_small_count == 0 and summary.complex_count == 0


# Generated cases: a row of 12-voxel cells, each holding one group with a known fate, 2+ voxels between cells.
FATE_OR_SPECK = st.sampled_from(CHANGE_CLASSES + ("speck",))


def _draw_cell(fate: str, size: int, before: np.ndarray, after: np.ndarray) -> None:
    """Boxes of one fate in a 12^3 cell's views (sizes in voxels; volumes set against the criteria below)."""
    s = size
    if fate == "stable":
        before[1:1 + s, 1:1 + s, 1:1 + s] = after[1:1 + s, 1:1 + s, 1:1 + s] = True
    elif fate in ("enlarging", "shrinking"):
        small, large = (before, after) if fate == "enlarging" else (after, before)
        small[2:2 + s, 2:2 + s, 2:2 + s] = True
        large[1:3 + s, 1:3 + s, 1:3 + s] = True
    elif fate in ("new", "disappearing"):
        (after if fate == "new" else before)[1:1 + s, 2:2 + s, 1:4] = True
    elif fate in ("merging", "splitting"):
        apart, joined = (before, after) if fate == "merging" else (after, before)
        apart[1:4, 1:1 + s, 1:4] = True
        apart[5:8, 1:1 + s, 1:4] = True
        joined[1:8, 1:1 + s, 1:4] = True
    elif fate == "complex":
        before[1:9, 1:3, 1:1 + s] = before[1:9, 5:7, 1:1 + s] = True
        after[1:3, 1:9, 1:1 + s] = after[5:7, 1:9, 1:1 + s] = True
    else:  # a one-voxel new lesion: under any sensible minimum, ignored
        after[5, 5, 5] = True


@settings(max_examples=60, deadline=None)
@given(fates=st.lists(FATE_OR_SPECK, min_size=1, max_size=6), sizes=st.lists(st.integers(3, 6), min_size=6, max_size=6),
       spacing=st.tuples(*(st.sampled_from([0.5, 1.0, 1.3, 2.0]),) * 3), flips=st.tuples(*(st.booleans(),) * 3),
       axes=st.permutations([0, 1, 2]))
def test_generated_fates_are_recovered_and_mirror_when_the_visits_swap(fates, sizes, spacing, flips, axes):
    before = np.zeros((12 * len(fates), 12, 12), bool)
    after = before.copy()
    for index, (fate, size) in enumerate(zip(fates, sizes)):
        cell = np.s_[12 * index:12 * index + 12]
        _draw_cell(fate, size, before[cell], after[cell])
    # The grid in any orientation and voxel size: transposed, flipped, anisotropic.
    before, after = before.transpose(axes), after.transpose(axes)
    for axis, flip in enumerate(flips):
        if flip:
            before, after = np.flip(before, axis), np.flip(after, axis)
    affine = np.diag([*spacing, 1.0])
    voxel_mm3 = float(np.prod(spacing))
    # 9 voxels is the smallest new lesion (3x3x1 at the smallest size), growth of 20 voxels the least counted.
    criteria = ChangeCriteria(min_relative_growth=0.5, min_absolute_growth_mm3=20 * voxel_mm3,
                              min_new_lesion_mm3=8 * voxel_mm3)
    forward = classify_changes(before, after, affine, criteria)
    backward = classify_changes(after, before, affine, criteria)
    expected = sorted(fate for fate in fates if fate != "speck")
    assert sorted(row.change_class for row in forward.rows) == expected
    assert forward.summary.ignored_small_count == fates.count("speck")
    # Swapping the visits: the same groups (same centroids), each with its mirrored class.
    assert len(backward.rows) == len(forward.rows)
    by_centre = {tuple(np.round(row.centroid_mm, 6)): row.change_class for row in backward.rows}
    for row in forward.rows:
        assert by_centre[tuple(np.round(row.centroid_mm, 6))] == MIRRORED[row.change_class]
    # The masks agree with the table: every group's voxels carry its code, activity is the grown tissue.
    for row in forward.rows:
        assert np.all(forward.change_mask[forward.group_mask == row.group] == CHANGE_CODES[row.change_class])
    assert not np.any(forward.activity_mask & before)
    assert forward.summary.new_and_enlarging_volume_ml == pytest.approx(
        sum(row.grown_volume_ml for row in forward.rows if row.active))


def test_table_and_summary_on_a_known_case():
    before = np.zeros((20, 20, 20), bool)
    after = before.copy()
    before[2:5, 2:5, 2:5] = after[2:5, 2:5, 2:5] = True  # stable, 27 voxels
    before[10:12, 2:4, 2:4] = True  # enlarging: 8 -> 64 voxels
    after[10:14, 2:6, 2:6] = True
    after[15:18, 15:18, 15:18] = True  # new, 27 voxels
    before[2:5, 15:18, 15:18] = True  # disappearing, 27 voxels
    affine = np.array([[-2.0, 0, 0, 90], [0, 2.0, 0, -120], [0, 0, 2.0, -70], [0, 0, 0, 1]])  # 8 mm^3 voxels
    changes = classify_changes(before, after.astype(np.uint8), affine)
    rows = {row.change_class: row for row in changes.rows}
    assert sorted(rows) == ["disappearing", "enlarging", "new", "stable"]
    assert rows["enlarging"].baseline_volume_ml == pytest.approx(8 * 8 / 1000)
    assert rows["enlarging"].followup_volume_ml == pytest.approx(64 * 8 / 1000)
    assert rows["enlarging"].grown_volume_ml == pytest.approx(56 * 8 / 1000)
    assert rows["new"].centroid_mm == pytest.approx((90 - 2 * 16, -120 + 2 * 16, -70 + 2 * 16))
    assert rows["stable"].centroid_mm == pytest.approx((90 - 2 * 3, -120 + 2 * 3, -70 + 2 * 3))
    assert [rows[name].active for name in ("new", "enlarging", "stable", "disappearing")] == [True, True, False, False]
    summary = changes.summary
    assert (summary.new_count, summary.enlarging_count, summary.stable_count, summary.disappearing_count,
            summary.active_count) == (1, 1, 1, 1, 2)
    assert summary.new_and_enlarging_volume_ml == pytest.approx((27 + 56) * 8 / 1000)
    assert summary.baseline_volume_ml == pytest.approx((27 + 8 + 27) * 8 / 1000)
    assert summary.followup_volume_ml == pytest.approx((27 + 64 + 27) * 8 / 1000)
    assert np.array_equal(changes.activity_mask, after & ~before)
    # The default criterion at 8 mm^3 voxels: +4 voxels (32 mm^3, +50 %) enlarges, +1 voxel does not.
    assert ChangeCriteria().grew(64.0, 96.0) and not ChangeCriteria().grew(64.0, 72.0)
    assert not ChangeCriteria().grew(1000.0, 1400.0)  # +40 %: within measurement variability
    # Flat rows for a CSV: one per group, the centroid in three columns; the summary with its criterion.
    table = table_rows(changes)
    assert [row["change_class"] for row in table] == [row.change_class for row in changes.rows]
    assert (table[0]["centroid_x_mm"], table[0]["centroid_y_mm"]) == changes.rows[0].centroid_mm[:2]
    assert "centroid_mm" not in table[0] and table[0]["group"] == 1
    flat_summary = summary_row(changes)
    assert flat_summary["new_count"] == 1 and flat_summary["min_relative_growth"] == 0.5
    empty = classify_changes(np.zeros((4, 4, 4)), np.zeros((4, 4, 4)), np.eye(4))
    assert empty.rows == () and empty.summary.active_count == 0 and not empty.change_mask.any()


def test_criteria_and_masks_are_checked():
    with pytest.raises(UserError, match="min_relative_growth"):
        ChangeCriteria(min_relative_growth=-0.1)
    with pytest.raises(UserError, match="min_new_lesion_mm3"):
        ChangeCriteria(min_new_lesion_mm3=float("nan"))
    with pytest.raises(ValueError, match="binary"):
        classify_changes(np.full((3, 3, 3), 0.5), np.zeros((3, 3, 3)), np.eye(4))
    with pytest.raises(ValueError, match="differs"):
        classify_changes(np.zeros((3, 3, 3)), np.zeros((3, 3, 4)), np.eye(4))


def test_change_scores_on_known_cases():
    truth = np.zeros((20, 20, 20), bool)
    truth[1:4, 1:4, 1:4] = True  # 27 voxels, found
    truth[10:13, 10:13, 10:13] = True  # 27 voxels, missed
    predicted = np.zeros_like(truth)
    predicted[1:4, 1:4, 1:3] = True  # 18 voxels inside the first
    predicted[15:18, 1:4, 1:4] = True  # 27 voxels, a false positive
    score = score_change(predicted, truth)
    assert score.dsc == pytest.approx(2 * 18 / (45 + 54))
    assert (score.lesion_tpr, score.lesion_ppv, score.lesion_f1) == pytest.approx((0.5, 0.5, 0.5))
    assert (score.true_lesions, score.predicted_lesions, score.detected_lesions, score.false_positive_lesions) == (
        2, 2, 1, 1)
    perfect = score_change(truth, truth)
    assert (perfect.dsc, perfect.lesion_tpr, perfect.lesion_ppv, perfect.lesion_f1) == (1.0, 1.0, 1.0, 1.0)
    nothing = score_change(np.zeros_like(truth), np.zeros_like(truth))
    assert (nothing.dsc, nothing.lesion_f1) == (1.0, 1.0)
    missed = score_change(np.zeros_like(truth), truth)
    assert (missed.dsc, missed.lesion_tpr, missed.lesion_f1) == (0.0, 0.0, 0.0) and np.isnan(missed.lesion_ppv)


def test_intensity_matching_undoes_another_scanner_and_keeps_new_lesions_bright(pair):
    # The follow-up FLAIR on the baseline's grid: another scanner's gain, contrast, bias and noise.
    flair = longitudinal.followup_onto_baseline(pair, pair.followup["FLAIR"], order=1)
    lesions = longitudinal.followup_onto_baseline(pair, pair.followup_mask).astype(bool)
    brain = ndimage.binary_erosion(pair.brain_mask, iterations=2)
    tissue = brain & ~lesions & ~pair.baseline_mask.astype(bool)
    matched = match_intensities(flair, pair.baseline["FLAIR"], brain, brain)
    reference = pair.baseline["FLAIR"]
    # The brain's distribution now matches the baseline's: its deciles within 3 % of the baseline's median.
    deciles = np.linspace(0.1, 0.9, 9)
    scale = np.median(reference[tissue])
    before = np.abs(np.quantile(flair[tissue], deciles) - np.quantile(reference[tissue], deciles)).max() / scale
    after = np.abs(np.quantile(matched[tissue], deciles) - np.quantile(reference[tissue], deciles)).max() / scale
    assert before > 0.2 and after < 0.03
    # Monotone: the order of intensities is kept, so lesions (new ones too) stay brighter than white matter.
    order = np.argsort(flair[brain], kind="stable")
    assert np.all(np.diff(matched[brain][order]) >= -1e-3)
    assert np.median(matched[lesions & brain]) > 1.2 * np.median(matched[tissue])


def test_intensity_matching_inverts_a_monotone_map_outside_the_new_lesions():
    rng = np.random.default_rng(0)
    reference = rng.gamma(20.0, 30.0, (40, 40, 40)).astype(np.float32)
    mask = np.ones(reference.shape, bool)
    moving = 3.0 * reference**1.15 + 50.0
    new_lesions = rng.random(reference.shape) < 0.02  # 2 % of the brain, far brighter, at the follow-up only
    moving[new_lesions] = moving.max() * 1.5
    matched = match_intensities(moving, reference, mask, mask)
    relative = np.abs(matched - reference)[~new_lesions] / reference[~new_lesions]
    # The unseen new lesions take the top 2 % of the follow-up's quantiles, which costs the brightest tissue
    # a few percent; told where they are (a segmentation of the follow-up), the map is within 1 %.
    assert np.median(relative) < 0.01 and np.quantile(relative, 0.95) < 0.05
    told = match_intensities(moving, reference, ~new_lesions, mask)
    told_relative = np.abs(told - reference)[~new_lesions] / reference[~new_lesions]
    assert np.quantile(told_relative, 0.95) < 0.01 < np.quantile(relative, 0.95)
    # Beyond the outermost landmark the map goes on linearly: the lesions stay above the brain's bright tail.
    for mapped in (matched, told):
        assert mapped[new_lesions].min() > np.quantile(reference, 0.99)
    with pytest.raises(UserError, match="needs at least"):
        match_intensities(moving, reference, np.zeros_like(mask), mask)


def test_the_change_picture_is_written(pair, tmp_path):
    back = longitudinal.followup_onto_baseline(pair, pair.followup_mask)
    changes = classify_changes(pair.baseline_mask, back, pair.affine)
    figure = plots.change_figure(pair.baseline["FLAIR"], pair.followup["FLAIR"], changes.change_mask, count=2)
    assert len(figure.axes) == 4
    path = tmp_path / "change.png"
    plots.change_overlay(pair.baseline["FLAIR"], longitudinal.followup_onto_baseline(pair, pair.followup["FLAIR"], 1),
                         changes.change_mask, path, title="phantom")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 20_000
    assert [p.name for p in tmp_path.iterdir()] == ["change.png"]  # written atomically: no temporary left
    # Its slices go through the new and enlarging lesions.
    active = np.isin(changes.change_mask, [CHANGE_CODES["new"], CHANGE_CODES["enlarging"]])
    assert all(active[:, :, z].any() for z in plots.overlay_slices(active, 3))


def test_the_phantom_is_its_seed_and_its_spec():
    spec = dataclasses.replace(longitudinal.LongitudinalSpec(), stable=1, enlarging=1, shrinking=0, disappearing=0,
                               new=1, merging=0, splitting=0, size="tiny", max_rotation_deg=0.0,
                               max_translation_mm=0.0)
    one, two = longitudinal.make_pair(5, spec), longitudinal.make_pair(5, spec)
    assert np.array_equal(one.followup["FLAIR"], two.followup["FLAIR"])
    assert sorted(c.change_class for c in one.changes) == ["enlarging", "new", "stable"]
    assert np.allclose(one.motion, np.eye(4))
    assert np.array_equal(one.followup_mask, one.followup_mask_unmoved)


def test_a_phantom_with_no_room_says_so_in_one_line():
    crowded = dataclasses.replace(longitudinal.LongitudinalSpec(), stable=40, size="tiny")
    with pytest.raises(UserError, match="no room"):
        longitudinal.make_pair(0, crowded)
