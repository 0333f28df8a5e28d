"""Metrics on hand-made masks whose answers are counted by hand below."""

import json
import math

import numpy as np
import pytest

from jaxcascade.evaluation.metrics import METRIC_DEFINITIONS, format_metrics, segmentation_metrics

SHAPE = (10, 10, 10)


def _two_lesions_one_hit_one_false_positive():
    """Truth: lesions A (2x2x2 = 8 voxels) and B (3x3x3 = 27 voxels).

    Prediction: a 2x2x2 cube shifted one voxel from A along x (overlapping A in
    1x2x2 = 4 voxels) and a 2x2x2 false-positive blob far from both; B missed.
    """
    truth = np.zeros(SHAPE, dtype=bool)
    truth[1:3, 1:3, 1:3] = True  # A
    truth[6:9, 6:9, 6:9] = True  # B
    pred = np.zeros(SHAPE, dtype=bool)
    pred[2:4, 1:3, 1:3] = True  # hits A
    pred[0:2, 7:9, 0:2] = True  # false positive
    return pred, truth


def test_voxel_and_lesion_metrics_on_hand_counted_masks():
    pred, truth = _two_lesions_one_hit_one_false_positive()
    m = segmentation_metrics(pred, truth)

    pred_voxels, truth_voxels, overlap = 8 + 8, 8 + 27, 4
    assert m["pred_voxels"] == pred_voxels
    assert m["truth_voxels"] == truth_voxels
    assert m["overlap_voxels"] == overlap
    assert m["dsc"] == pytest.approx(2 * 4 / (16 + 35))
    assert m["ppv"] == pytest.approx(4 / 16)
    assert m["tpr"] == pytest.approx(4 / 35)
    assert m["rvd"] == pytest.approx((16 - 35) / 35)

    assert m["true_lesions"] == 2
    assert m["pred_lesions"] == 2
    assert m["detected_lesions"] == 1
    assert m["false_positive_lesions"] == 1
    assert m["lesion_tpr"] == pytest.approx(1 / 2)
    assert m["lesion_fpr"] == pytest.approx(1 / 2)
    # precision = 1 - 0.5; f1 = 2 * 0.5 * 0.5 / (0.5 + 0.5)
    assert m["lesion_f1"] == pytest.approx(0.5)


def test_lesion_f1_is_harmonic_mean_of_tpr_and_precision():
    # Truth: three single-voxel lesions; prediction hits one and adds nothing.
    truth = np.zeros(SHAPE, dtype=bool)
    truth[0, 0, 0] = truth[5, 5, 5] = truth[9, 9, 9] = True
    pred = np.zeros(SHAPE, dtype=bool)
    pred[0, 0, 0] = True
    m = segmentation_metrics(pred, truth)
    assert m["lesion_tpr"] == pytest.approx(1 / 3)
    assert m["lesion_fpr"] == 0.0
    assert m["lesion_f1"] == pytest.approx(2 * (1 / 3) * 1 / (1 / 3 + 1))


def test_diagonal_neighbours_form_one_lesion():
    truth = np.zeros(SHAPE, dtype=bool)
    truth[0, 0, 0] = truth[1, 1, 1] = True  # touch only at a corner
    pred = np.zeros(SHAPE, dtype=bool)
    pred[0, 0, 0] = True
    m = segmentation_metrics(pred, truth)
    assert m["true_lesions"] == 1
    assert m["detected_lesions"] == 1
    assert m["lesion_tpr"] == 1.0


def test_one_prediction_spanning_two_truth_lesions_detects_both():
    truth = np.zeros(SHAPE, dtype=bool)
    truth[2, 2, 2] = truth[2, 2, 6] = True
    pred = np.zeros(SHAPE, dtype=bool)
    pred[2, 2, 2:7] = True  # a bar joining both
    m = segmentation_metrics(pred, truth)
    assert (m["true_lesions"], m["pred_lesions"]) == (2, 1)
    assert m["detected_lesions"] == 2
    assert m["false_positive_lesions"] == 0
    assert m["lesion_tpr"] == 1.0
    assert m["lesion_fpr"] == 0.0


def test_two_predictions_on_one_truth_lesion_are_both_true_positives():
    truth = np.zeros(SHAPE, dtype=bool)
    truth[2, 2, 2:7] = True
    pred = np.zeros(SHAPE, dtype=bool)
    pred[2, 2, 2] = pred[2, 2, 6] = True
    m = segmentation_metrics(pred, truth)
    assert (m["true_lesions"], m["pred_lesions"]) == (1, 2)
    assert m["detected_lesions"] == 1
    assert m["false_positive_lesions"] == 0


def test_zero_one_integer_masks_score_like_bool_masks():
    pred, truth = _two_lesions_one_hit_one_false_positive()
    as_bool = segmentation_metrics(pred, truth)
    as_int = segmentation_metrics(pred.astype(np.uint8), truth.astype(np.int64))
    assert as_int == as_bool


def test_volumes_in_millilitres():
    pred, truth = _two_lesions_one_hit_one_false_positive()
    m = segmentation_metrics(pred, truth, voxel_volume_ml=0.001)
    assert m["pred_volume_ml"] == pytest.approx(16 * 0.001)
    assert m["truth_volume_ml"] == pytest.approx(35 * 0.001)
    assert "pred_volume_ml" not in segmentation_metrics(pred, truth)


def test_both_empty_is_a_perfect_score():
    empty = np.zeros(SHAPE, dtype=bool)
    m = segmentation_metrics(empty, empty)
    assert (m["dsc"], m["ppv"], m["tpr"], m["rvd"]) == (1.0, 1.0, 1.0, 0.0)
    assert (m["lesion_tpr"], m["lesion_fpr"], m["lesion_f1"]) == (1.0, 0.0, 1.0)
    assert m["true_lesions"] == m["pred_lesions"] == m["pred_voxels"] == 0


def test_empty_truth_leaves_truth_ratios_undefined():
    truth = np.zeros(SHAPE, dtype=bool)
    pred = np.zeros(SHAPE, dtype=bool)
    pred[4:6, 4:6, 4:6] = True
    m = segmentation_metrics(pred, truth)
    assert m["dsc"] == 0.0
    assert m["ppv"] == 0.0
    assert math.isnan(m["tpr"])
    assert math.isnan(m["rvd"])
    assert math.isnan(m["lesion_tpr"])
    assert m["lesion_fpr"] == 1.0
    assert m["lesion_f1"] == 0.0
    assert m["false_positive_lesions"] == 1


def test_empty_prediction_leaves_prediction_ratios_undefined():
    truth = np.zeros(SHAPE, dtype=bool)
    truth[4:6, 4:6, 4:6] = True
    pred = np.zeros(SHAPE, dtype=bool)
    m = segmentation_metrics(pred, truth)
    assert m["dsc"] == 0.0
    assert math.isnan(m["ppv"])
    assert m["tpr"] == 0.0
    assert m["rvd"] == -1.0
    assert m["lesion_tpr"] == 0.0
    assert math.isnan(m["lesion_fpr"])
    assert m["lesion_f1"] == 0.0


def test_values_are_plain_python_numbers_that_serialise_to_json():
    truth = np.zeros(SHAPE, dtype=bool)
    pred = np.zeros(SHAPE, dtype=bool)
    pred[0, 0, 0] = True
    m = segmentation_metrics(pred, truth, voxel_volume_ml=1.0)
    assert all(type(value) in (int, float) for value in m.values())
    as_json = json.dumps({k: None if math.isnan(v) else v for k, v in m.items()}, allow_nan=False)
    assert json.loads(as_json)["tpr"] is None


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="shape"):
        segmentation_metrics(np.zeros((4, 4, 4)), np.zeros((4, 4, 5)))


def test_non_binary_mask_raises():
    with pytest.raises(ValueError, match="binary"):
        segmentation_metrics(np.full(SHAPE, 0.7), np.zeros(SHAPE))


def test_non_positive_voxel_volume_raises():
    with pytest.raises(ValueError, match="voxel_volume_ml"):
        segmentation_metrics(np.zeros(SHAPE), np.zeros(SHAPE), voxel_volume_ml=0.0)


def test_every_metric_key_has_a_one_line_definition():
    pred, truth = _two_lesions_one_hit_one_false_positive()
    keys = set(segmentation_metrics(pred, truth, voxel_volume_ml=1.0))
    assert keys == set(METRIC_DEFINITIONS)
    assert all(text and "\n" not in text for text in METRIC_DEFINITIONS.values())


def test_format_metrics_aligns_names_and_formats_by_kind():
    table = format_metrics({"dsc": 8 / 51, "pred_voxels": 16, "tpr": math.nan, "rvd": None})
    lines = table.splitlines()
    assert lines == [
        "dsc             0.1569",
        "pred_voxels         16",
        "tpr          undefined",
        "rvd          undefined",
    ]


def test_format_metrics_can_append_definitions():
    table = format_metrics({"dsc": 1.0}, definitions=True)
    assert table == "dsc  1.0000  " + METRIC_DEFINITIONS["dsc"]
    assert format_metrics({}) == ""
