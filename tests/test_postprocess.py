"""Post-processing: thresholding, small-lesion removal, minimum total volume."""

import numpy as np
import pytest

from jaxcascade.segmentation.postprocess import apply_min_volume, binarise, remove_small_lesions

SHAPE = (6, 6, 6)


def _two_voxels(second):
    mask = np.zeros(SHAPE, dtype=bool)
    mask[1, 1, 1] = True
    mask[second] = True
    return mask


def test_binarise_includes_the_threshold():
    probability = np.array([0.2, 0.5, 0.8])
    np.testing.assert_array_equal(binarise(probability, 0.5), [False, True, True])
    assert binarise(probability, 0.5).dtype == bool


def test_edge_neighbours_are_separate_under_6_joined_under_18_and_26():
    mask = _two_voxels((1, 2, 2))  # shares an edge with (1, 1, 1)
    # Each voxel alone has 1 voxel (removed with min 1); joined they have 2 (kept).
    assert not remove_small_lesions(mask, 1, connectivity=6).any()
    np.testing.assert_array_equal(remove_small_lesions(mask, 1, connectivity=18), mask)
    np.testing.assert_array_equal(remove_small_lesions(mask, 1, connectivity=26), mask)


def test_corner_neighbours_are_joined_only_under_26():
    mask = _two_voxels((2, 2, 2))  # shares only a corner with (1, 1, 1)
    assert not remove_small_lesions(mask, 1, connectivity=6).any()
    assert not remove_small_lesions(mask, 1, connectivity=18).any()
    np.testing.assert_array_equal(remove_small_lesions(mask, 1, connectivity=26), mask)


def test_default_connectivity_is_6():
    mask = _two_voxels((1, 2, 2))
    np.testing.assert_array_equal(
        remove_small_lesions(mask, 1), remove_small_lesions(mask, 1, connectivity=6)
    )


def test_lesions_must_be_strictly_larger_than_the_minimum():
    mask = np.zeros(SHAPE, dtype=bool)
    mask[0, 0, 0:3] = True  # 3 voxels
    mask[4, 4, 0:4] = True  # 4 voxels
    kept = remove_small_lesions(mask, 3)
    expected = np.zeros(SHAPE, dtype=bool)
    expected[4, 4, 0:4] = True
    np.testing.assert_array_equal(kept, expected)
    np.testing.assert_array_equal(remove_small_lesions(mask, 2), mask)
    assert not remove_small_lesions(mask, 4).any()


def test_min_zero_keeps_everything_and_input_is_not_modified():
    mask = np.zeros(SHAPE, dtype=np.uint8)
    mask[2, 2, 2] = 1
    original = mask.copy()
    kept = remove_small_lesions(mask, 0)
    assert kept.dtype == bool
    np.testing.assert_array_equal(kept, mask.astype(bool))
    np.testing.assert_array_equal(mask, original)


def test_empty_mask_stays_empty():
    assert not remove_small_lesions(np.zeros(SHAPE, dtype=bool), 5).any()


@pytest.mark.parametrize(
    "mask, min_voxels, connectivity",
    [
        (np.zeros(SHAPE), 1, 8),
        (np.zeros((6, 6)), 1, 6),
        (np.zeros(SHAPE), -1, 6),
    ],
)
def test_remove_small_lesions_rejects_bad_arguments(mask, min_voxels, connectivity):
    with pytest.raises(ValueError):
        remove_small_lesions(mask, min_voxels, connectivity=connectivity)


def test_min_volume_empties_a_segmentation_below_the_minimum():
    mask = np.zeros(SHAPE, dtype=bool)
    mask[0, 0, 0:4] = True  # 4 voxels of 0.5 ml = 2 ml
    assert not apply_min_volume(mask, 2.5, 0.5).any()
    np.testing.assert_array_equal(apply_min_volume(mask, 2.0, 0.5), mask)  # equal is kept
    np.testing.assert_array_equal(apply_min_volume(mask, 1.5, 0.5), mask)


def test_min_volume_zero_disables_the_rule():
    mask = np.zeros(SHAPE, dtype=bool)
    mask[0, 0, 0] = True
    np.testing.assert_array_equal(apply_min_volume(mask, 0, 0.001), mask)


def test_min_volume_returns_bool():
    mask = np.ones(SHAPE, dtype=np.uint8)
    assert apply_min_volume(mask, 0, 1.0).dtype == bool
    assert apply_min_volume(mask, 1e9, 1.0).dtype == bool


@pytest.mark.parametrize("min_volume_ml, voxel_volume_ml", [(-1.0, 1.0), (1.0, 0.0), (1.0, -1.0)])
def test_min_volume_rejects_bad_arguments(min_volume_ml, voxel_volume_ml):
    with pytest.raises(ValueError):
        apply_min_volume(np.zeros(SHAPE), min_volume_ml, voxel_volume_ml)
