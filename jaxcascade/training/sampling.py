"""Which voxels each stage trains on: the seed's balanced sampling and CNN2's hard negatives.

CNN1 trains on every lesion voxel plus as many random non-lesion candidates;
where a subject's labelled region is given, both stages draw inside it only;
CNN2 on every lesion voxel plus as many of CNN1's hard negatives (non-lesion
voxels CNN1 scores above config.sampling.hard_negative_probability). Each
subject's draw comes from its own random stream (`seeding`), so it does not
depend on which process loads the subject. How the drawn rows are then split,
shuffled and fed to the devices is `batching.py`.
"""

from __future__ import annotations

import numpy as np

from typing import Callable

from jaxcascade.runtime import seeding
from jaxcascade.data.normalisation import candidate_mask


def stage1_training_centres(subjects, config) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per subject: CNN1's training centres (N, 3) and labels (N,)."""
    centres, labels = [], []
    for subject in subjects:
        candidates = candidate_mask(subject.flair, config.candidates.min_th)
        rng = seeding.stream(config.seed, "sampling", stage=1, subject=subject.number)
        c, l = stage1_centres(subject.sampling_region(subject.lesion), subject.sampling_region(candidates), rng)
        centres.append(c)
        labels.append(l)
    return centres, labels


def stage2_training_centres(subjects, stage1_probability: Callable, config) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per subject: CNN2's training centres and labels, mined with the trained CNN1.

    stage1_probability(subject) is CNN1's lesion probability over the subject's volume (0 off its
    candidates); the caller runs the network, so choosing voxels needs no inference code.
    """
    centres, labels = [], []
    for subject in subjects:
        probability = stage1_probability(subject)
        hard = hard_negative_mask(
            subject.lesion, probability, subject.flair,
            probability_threshold=config.sampling.hard_negative_probability,
            fallback_flair=config.sampling.hard_negative_fallback_flair,
        )
        rng = seeding.stream(config.seed, "sampling", stage=2, subject=subject.number)
        c, l = stage2_centres(subject.sampling_region(subject.lesion), subject.sampling_region(hard), rng)
        centres.append(c)
        labels.append(l)
    return centres, labels


def balanced_centres(
    positive_mask: np.ndarray, negative_mask: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """All positive voxels plus as many negatives drawn without replacement.

    Where there are fewer negatives than positives, all negatives are used (the
    seed code's `permutation(...)[:count]` behaves the same).

    Returns:
      centres (N, 3) int32 and labels (N,) int32 (1 lesion, 0 not), positives first.
    """
    positive = np.argwhere(positive_mask)
    negative = np.argwhere(negative_mask & ~positive_mask)
    chosen = rng.permutation(len(negative))[: len(positive)]
    negative = negative[np.sort(chosen)]
    centres = np.concatenate([positive, negative]).astype(np.int32).reshape(-1, 3)
    labels = np.concatenate([np.ones(len(positive), np.int32), np.zeros(len(negative), np.int32)])
    return centres, labels


def stage1_centres(lesion_mask, candidate_mask, rng):
    """CNN1's training voxels: all lesion voxels + the same number of non-lesion candidates."""
    return balanced_centres(lesion_mask, candidate_mask & ~lesion_mask, rng)


def hard_negative_mask(lesion_mask, stage1_probability, flair_normalised, *, probability_threshold, fallback_flair):
    """Non-lesion voxels CNN1 calls lesion; where there are none, bright FLAIR voxels (the seed's fallback)."""
    hard = (stage1_probability > probability_threshold) & ~lesion_mask
    if not hard.any():
        hard = (flair_normalised > fallback_flair) & ~lesion_mask
    return hard


def stage2_centres(lesion_mask, hard_negatives, rng):
    """CNN2's training voxels: all lesion voxels + the same number of CNN1's hard negatives."""
    return balanced_centres(lesion_mask, hard_negatives, rng)
