"""Lesion labels and statistics in one pass over the lesion voxels equal scipy.ndimage's whole-volume scans.

The fast paths (labelling inside the bounding box, bincount statistics, the study's lesion table through
the processing grid's affine) replace per-label scans of the whole volume; each is checked here against
the scan it replaces, over generated masks, values and orientations.
"""

from pathlib import Path

import nibabel as nib
import numpy as np
from hypothesis import given, settings, strategies as st
from hypothesis.extra.numpy import arrays
from scipy import ndimage

from jaxcascade.data import nifti
from jaxcascade.evaluation import metrics
from jaxcascade.evaluation.lesions import LESION_CONNECTIVITY, bounding_box, label_lesions, lesion_statistics
from jaxcascade.segmentation import postprocess
from jaxcascade.segmentation.study_report import lesion_rows

SHAPES = st.tuples(*(st.integers(1, 9) for _ in range(3)))
# Sparse and dense masks: lesions touching faces, edges, corners and the volume's border.
MASKS = SHAPES.flatmap(lambda shape: arrays(bool, shape, elements=st.booleans())
                       | arrays(np.float64, shape, elements=st.floats(0, 1)).map(lambda a: a > 0.8))
CONNECTIVITY = st.sampled_from([1, 2, 3]).map(lambda rank: ndimage.generate_binary_structure(3, rank))


@settings(max_examples=150, deadline=None)
@given(mask=MASKS, structure=CONNECTIVITY, seed=st.integers(0, 2**16))
def test_box_labels_and_statistics_equal_whole_volume_scans(mask, structure, seed):
    expected, count = ndimage.label(mask, structure)
    lesions = label_lesions(mask, structure)
    assert lesions.count == count
    np.testing.assert_array_equal(lesions.full_labels(), expected)
    box = bounding_box(mask)
    assert (box is None) == (count == 0)
    if box is not None:
        assert mask[box].sum() == mask.sum()
    values = np.random.default_rng(seed).random(mask.shape).astype(np.float32)
    stats = lesion_statistics(lesions, values)
    index = np.arange(1, count + 1)
    np.testing.assert_array_equal(stats["voxels"], ndimage.sum_labels(np.ones(mask.shape), expected, index))
    if count:
        np.testing.assert_allclose(stats["centre"], np.array(ndimage.center_of_mass(mask, expected, index)),
                                   rtol=0, atol=1e-9)
        np.testing.assert_allclose(stats["mean"], ndimage.mean(values, expected, index), rtol=1e-12)
        np.testing.assert_array_equal(stats["max"], ndimage.maximum(values, expected, index))


@settings(max_examples=100, deadline=None)
@given(mask=MASKS, pred=MASKS, minimum=st.integers(0, 6), connectivity=st.sampled_from([6, 18, 26]))
def test_cropped_post_processing_and_scores_equal_whole_volume(mask, pred, minimum, connectivity):
    rank = {6: 1, 18: 2, 26: 3}[connectivity]
    labels, _ = ndimage.label(mask, ndimage.generate_binary_structure(3, rank))
    sizes = np.bincount(labels.ravel())
    keep = sizes > minimum
    keep[0] = False
    np.testing.assert_array_equal(postprocess.remove_small_lesions(mask, minimum, connectivity), keep[labels])

    pred = np.resize(pred, mask.shape)
    scores = metrics.segmentation_metrics(pred, mask)
    true_labels, true_count = ndimage.label(mask, LESION_CONNECTIVITY)
    pred_labels, pred_count = ndimage.label(pred, LESION_CONNECTIVITY)
    assert scores["true_lesions"] == true_count and scores["pred_lesions"] == pred_count
    assert scores["detected_lesions"] == np.count_nonzero(np.unique(true_labels[pred]))
    assert scores["false_positive_lesions"] == pred_count - np.count_nonzero(np.unique(pred_labels[mask]))


def _lesion_rows_by_scans(mask, probability, reference):
    """The lesion table as computed before: centroids by scans in the file's own grid, through its affine."""
    labels, count = ndimage.label(mask, LESION_CONNECTIVITY)
    index = np.arange(1, count + 1)
    file_labels = reference.to_file_grid(labels)
    centres = np.array(ndimage.center_of_mass(file_labels > 0, file_labels, index)).reshape(count, 3)
    world = centres @ reference.affine[:3, :3].T + reference.affine[:3, 3]
    return (np.bincount(labels.ravel())[1:], world, ndimage.mean(probability, labels, index),
            ndimage.maximum(probability, labels, index))


AXCODES = st.permutations("RAS").flatmap(
    lambda axes: st.tuples(*(st.sampled_from([a, {"R": "L", "A": "P", "S": "I"}[a]]) for a in axes)))


@settings(max_examples=60, deadline=None)
@given(mask=MASKS, axcodes=AXCODES, zooms=st.tuples(*(st.sampled_from([0.8, 1.0, 3.0]) for _ in range(3))),
       tilt=st.floats(-0.5, 0.5), seed=st.integers(0, 2**16))
def test_lesion_table_centroids_equal_scans_in_the_files_grid(mask, axcodes, zooms, tilt, seed):
    """Files stored in any axis order and direction, tilted (oblique) up to ~30 degrees as scanners write them:
    scanner-space centroids as the old file-grid scans gave."""
    rng = np.random.default_rng(seed)
    ornt = nib.orientations.axcodes2ornt(axcodes)
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    cross = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    rotation = np.eye(4)
    rotation[:3, :3] = np.eye(3) + np.sin(tilt) * cross + (1 - np.cos(tilt)) * cross @ cross  # Rodrigues
    affine = rotation @ nib.orientations.inv_ornt_aff(ornt, mask.shape) @ np.diag([*zooms, 1.0])
    affine[:3, 3] = rng.uniform(-90, 90, 3)
    stored = nib.Nifti1Image(np.zeros(mask.shape, np.float32), affine)
    reference = nifti.Image(Path("flair.nii.gz"), np.zeros(0, np.float32), stored, orientation="RAS")
    processing_mask = reference.from_file_grid(mask)
    probability = rng.random(processing_mask.shape).astype(np.float32)
    rows = lesion_rows(processing_mask, probability, reference)
    voxels, world, mean, peak = _lesion_rows_by_scans(processing_mask, probability, reference)
    assert [row["voxels"] for row in rows] == voxels.tolist()
    for row, centre, m, p in zip(rows, world, mean, peak):
        assert abs(row["centroid_x_mm"] - centre[0]) <= 1.5e-3
        assert abs(row["centroid_y_mm"] - centre[1]) <= 1.5e-3
        assert abs(row["centroid_z_mm"] - centre[2]) <= 1.5e-3
        assert row["mean_probability"] == round(float(m), 5) and row["max_probability"] == round(float(p), 5)
