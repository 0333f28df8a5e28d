"""Partial annotation: a subject's labelled region limits both stages' training voxels to it."""

import shutil

import nibabel as nib
import numpy as np
import pytest

from jaxcascade import errors
from jaxcascade.configs import default
from jaxcascade.data.normalisation import candidate_mask
from jaxcascade.data.subjects import load_training_subjects
from jaxcascade.training import sampling


def _with_region(cohort, tmp_path, region_of):
    data = tmp_path / "data"
    shutil.copytree(cohort / "train", data)
    for folder in sorted(data.iterdir()):
        lesion = nib.load(folder / "lesion.nii.gz")
        region = region_of(lesion.shape).astype(np.uint8)
        nib.save(nib.Nifti1Image(region, lesion.affine, lesion.header), folder / "labelled.nii.gz")
    return data


def _half(shape):
    region = np.zeros(shape, bool)
    region[: shape[0] // 2] = True
    return region


def test_both_stages_sample_only_inside_the_labelled_region(cohort, tmp_path):
    data = _with_region(cohort, tmp_path, _half)
    config = default.get_config()
    subjects = load_training_subjects(data, config)
    assert all(s.labelled is not None and s.labelled.any() and not s.labelled.all() for s in subjects)
    centres, labels = sampling.stage1_training_centres(subjects, config)
    for subject, c, l in zip(subjects, centres, labels):
        assert subject.labelled[tuple(c.T)].all()
        inside = subject.lesion & subject.labelled
        assert l.sum() == inside.sum()  # every labelled lesion voxel, none outside
        assert (subject.lesion & ~subject.labelled).any()  # the test means something: lesions lie outside too
    # Stage 2: a CNN1 that calls everything a lesion makes every candidate a hard negative.
    centres2, _ = sampling.stage2_training_centres(
        subjects, lambda s: candidate_mask(s.flair, config.candidates.min_th).astype(np.float32), config)
    for subject, c in zip(subjects, centres2):
        assert subject.labelled[tuple(c.T)].all()


def test_without_a_region_file_the_whole_image_is_labelled(cohort):
    subjects = load_training_subjects(cohort / "train", default.get_config())
    assert all(s.labelled is None for s in subjects)


def test_an_empty_labelled_region_is_one_clear_error(cohort, tmp_path):
    data = _with_region(cohort, tmp_path, lambda shape: np.zeros(shape, bool))
    with pytest.raises(errors.UserError, match="labelled.nii.gz: the labelled region is empty"):
        load_training_subjects(data, default.get_config())


def test_a_region_without_lesions_anywhere_is_refused_as_nothing_to_learn(cohort, tmp_path):
    # Only the background is labelled: no lesion voxel to train on.
    data = _with_region(cohort, tmp_path, lambda shape: np.pad(np.ones((1, 1, 1), bool),
                                                                [(0, n - 1) for n in shape]))
    with pytest.raises(errors.UserError, match="no lesion voxels"):
        load_training_subjects(data, default.get_config())
