import numpy as np
import pytest

from jaxcascade.training import batching, sampling


def test_stage1_sampling_is_balanced_and_seeded():
    lesion = np.zeros((10, 10, 10), bool)
    lesion[2:4, 2:4, 2:4] = True  # 8 lesion voxels
    candidates = np.zeros_like(lesion)
    candidates[1:6, 1:6, 1:6] = True  # 125 candidates, 8 of them lesion
    centres, labels = sampling.stage1_centres(lesion, candidates, np.random.default_rng(3))
    assert labels.sum() == 8 and (labels == 0).sum() == 8
    negatives = centres[labels == 0]
    assert candidates[tuple(negatives.T)].all() and not lesion[tuple(negatives.T)].any()
    assert lesion[tuple(centres[labels == 1].T)].all()
    again, _ = sampling.stage1_centres(lesion, candidates, np.random.default_rng(3))
    np.testing.assert_array_equal(centres, again)
    other, _ = sampling.stage1_centres(lesion, candidates, np.random.default_rng(4))
    assert not np.array_equal(centres, other)


def test_sampling_with_fewer_negatives_than_lesions_takes_all_negatives():
    lesion = np.zeros((6, 6, 6), bool)
    lesion[:3] = True  # 108 lesion voxels
    candidates = np.zeros_like(lesion)
    candidates[5, 5, :5] = True  # 5 non-lesion candidates
    _, labels = sampling.stage1_centres(lesion, candidates, np.random.default_rng(0))
    assert labels.sum() == 108 and (labels == 0).sum() == 5


def test_hard_negatives_and_fallback():
    lesion = np.zeros((8, 8, 8), bool)
    lesion[1:3, 1:3, 1:3] = True
    probability = np.zeros((8, 8, 8), np.float32)
    probability[5:7, 5:7, 5:7] = 0.9  # 8 confident false positives
    probability[1:3, 1:3, 1:3] = 0.95  # lesion voxels are never hard negatives
    probability[0, 7, 7] = 0.5  # not strictly above the threshold
    flair = np.zeros((8, 8, 8), np.float32)
    hard = sampling.hard_negative_mask(lesion, probability, flair, probability_threshold=0.5, fallback_flair=2.0)
    assert hard.sum() == 8 and hard[5:7, 5:7, 5:7].all()
    centres, labels = sampling.stage2_centres(lesion, hard, np.random.default_rng(0))
    assert labels.sum() == 8 and (labels == 0).sum() == 8

    flair[0, 0, :4] = 2.5  # no CNN1 false positives: bright FLAIR takes over
    hard = sampling.hard_negative_mask(lesion, np.zeros_like(probability), flair,
                                      probability_threshold=0.5, fallback_flair=2.0)
    assert hard.sum() == 4 and hard[0, 0, :4].all()


@pytest.mark.parametrize("fraction", [0.25, 0.5])
def test_stratified_split_keeps_class_proportions(fraction):
    labels = np.array([1] * 40 + [0] * 80)
    train, validation = batching.stratified_split(labels, fraction, np.random.default_rng(0))
    assert len(np.intersect1d(train, validation)) == 0 and len(train) + len(validation) == 120
    assert labels[validation].sum() == round(40 * fraction)
    assert (labels[validation] == 0).sum() == round(80 * fraction)
