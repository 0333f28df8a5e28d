"""Tests of the synthetic MS cohort generator (tiny grid unless stated)."""

import os

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from jaxcascade import phantom
from jaxcascade.phantom import core as phantom_core
from jaxcascade.errors import UserError

SEEDS = (0, 1, 2, 3, 4)
CONNECTIVITY_26 = np.ones((3, 3, 3), bool)


@pytest.fixture(scope="module")
def tiny():
    """Subjects by seed; generated once because several tests read them."""
    return {seed: phantom.make_subject(seed, "tiny") for seed in SEEDS}


def tissue_labels(seed, size="tiny"):
    # make_subject draws the anatomy first from a fresh generator, so the same
    # call here reproduces its tissue labels.
    shape, voxel = phantom.SIZES[size]
    label, _ = phantom.anatomy(np.random.default_rng(seed), shape, voxel)
    return label


def normalised(image):
    """The method's per-image normalisation over nonzero voxels."""
    inside = image != 0
    return (image - image[inside].mean()) / image[inside].std()


def test_size_table():
    assert phantom.SIZES["full"] == ((197, 233, 189), 1.0)
    for name in ("tiny", "small", "full"):
        shape, voxel = phantom.SIZES[name]
        assert len(shape) == 3 and voxel > 0
    with pytest.raises(UserError):
        phantom.make_subject(0, "huge")


def test_shapes_dtypes_affine(tiny):
    shape, voxel = phantom.SIZES["tiny"]
    subject = tiny[0]
    assert set(subject) == {"T1", "FLAIR", "lesion", "affine"}
    for key in ("T1", "FLAIR"):
        assert subject[key].shape == shape and subject[key].dtype == np.float32
        assert np.isfinite(subject[key]).all()
    assert subject["lesion"].shape == shape and subject["lesion"].dtype == np.uint8
    affine = subject["affine"]
    assert affine.shape == (4, 4) and affine.dtype == np.float64
    np.testing.assert_allclose(np.diag(affine), [voxel, voxel, voxel, 1.0])
    centre = affine @ np.append((np.array(shape) - 1) / 2, 1.0)
    np.testing.assert_allclose(centre[:3], 0.0, atol=1e-9)


def test_deterministic_and_seed_dependent(tiny):
    again = phantom.make_subject(0, "tiny")
    for key in ("T1", "FLAIR", "lesion", "affine"):
        np.testing.assert_array_equal(again[key], tiny[0][key])
    for key in ("T1", "FLAIR", "lesion"):
        assert not np.array_equal(tiny[0][key], tiny[1][key])


def test_subject_names_and_seeds():
    assert [phantom.subject_name(i) for i in (0, 1, 9)] == ["sub-01", "sub-02", "sub-10"]
    assert phantom.subject_seed(7, 3) == phantom.subject_seed(7, 3)
    seeds = {phantom.subject_seed(7, i) for i in range(20)}
    assert len(seeds) == 20
    assert phantom.subject_seed(7, 0) != phantom.subject_seed(8, 0)


def test_background_exactly_zero_outside_head(tiny):
    for subject in tiny.values():
        head_t1 = subject["T1"] != 0
        np.testing.assert_array_equal(head_t1, subject["FLAIR"] != 0)
        assert (subject["T1"] >= 0).all() and (subject["FLAIR"] >= 0).all()
        # The head is a sizeable, single blob that does not touch the grid edge.
        assert 0.2 < head_t1.mean() < 0.7
        assert ndimage.label(head_t1)[1] == 1
        assert not head_t1[[0, -1]].any() and not head_t1[:, [0, -1]].any()


def test_lesions_binary_inside_white_matter(tiny):
    for seed, subject in tiny.items():
        lesion = subject["lesion"]
        assert set(np.unique(lesion)) == {0, 1}
        inside = lesion.astype(bool)
        assert (subject["T1"][inside] > 0).all() and (subject["FLAIR"][inside] > 0).all()
        assert (tissue_labels(seed)[inside] == phantom_core.WM).all()


def test_lesion_count_and_sizes(tiny):
    for subject in tiny.values():
        labels, count = ndimage.label(subject["lesion"], CONNECTIVITY_26)
        assert 4 <= count <= 10
        sizes = np.bincount(labels.ravel())[1:]
        # Large enough to survive removal of components of <= 20 voxels.
        assert sizes.min() > 20 and sizes.max() <= 300


def test_tissue_contrast(tiny):
    for seed, subject in tiny.items():
        label = tissue_labels(seed)
        lesion = subject["lesion"].astype(bool)

        def mean(image, tissue):
            return image[(label == tissue) & ~lesion].mean()

        t1, flair = subject["T1"], subject["FLAIR"]
        assert mean(t1, phantom_core.WM) > mean(t1, phantom_core.GM) > mean(t1, phantom_core.CSF)
        assert mean(flair, phantom_core.GM) > mean(flair, phantom_core.WM) > mean(flair, phantom_core.CSF)
        flair_ratio = flair[lesion].mean() / mean(flair, phantom_core.WM)
        t1_ratio = t1[lesion].mean() / mean(t1, phantom_core.WM)
        assert 1.3 < flair_ratio < 1.9
        assert 0.55 < t1_ratio < 0.9


def test_flair_candidates_cover_lesions_and_many_negatives(tiny):
    for subject in tiny.values():
        lesion = subject["lesion"].astype(bool)
        candidates = normalised(subject["FLAIR"]) > 0.5
        assert (candidates & lesion).sum() >= 0.95 * lesion.sum()
        assert (candidates & ~lesion).sum() >= 2 * lesion.sum()


def test_small_grid_lesions_and_candidates():
    subject = phantom.make_subject(11, "small")
    lesion = subject["lesion"].astype(bool)
    assert subject["T1"].shape == phantom.SIZES["small"][0]
    count = ndimage.label(lesion, CONNECTIVITY_26)[1]
    assert 5 <= count <= 40
    candidates = normalised(subject["FLAIR"]) > 0.5
    assert (candidates & lesion).sum() >= 0.95 * lesion.sum()
    assert (candidates & ~lesion).sum() >= 2 * lesion.sum()


def test_write_cohort(tmp_path):
    names = phantom.write_cohort(tmp_path / "cohort", subjects=2, seed=5, size="tiny")
    assert names == ["sub-01", "sub-02"]
    for index, name in enumerate(names):
        folder = tmp_path / "cohort" / name
        assert sorted(os.listdir(folder)) == ["FLAIR.nii.gz", "T1.nii.gz", "lesion.nii.gz"]
        expected = phantom.make_subject(phantom.subject_seed(5, index), "tiny")
        for key, dtype in (("T1", np.float32), ("FLAIR", np.float32), ("lesion", np.uint8)):
            image = nib.load(folder / f"{key}.nii.gz")
            assert image.get_data_dtype() == dtype
            assert int(image.header["qform_code"]) == 1 and int(image.header["sform_code"]) == 1
            np.testing.assert_allclose(image.affine, expected["affine"], atol=1e-5)
            np.testing.assert_array_equal(np.asanyarray(image.dataobj), expected[key])


def test_subject_independent_of_cohort_size(tmp_path):
    phantom.write_cohort(tmp_path / "two", subjects=2, seed=9, size="tiny")
    phantom.write_cohort(tmp_path / "three", subjects=3, seed=9, size="tiny")
    for key in ("T1", "FLAIR", "lesion"):
        two = nib.load(tmp_path / "two" / "sub-02" / f"{key}.nii.gz").get_fdata()
        three = nib.load(tmp_path / "three" / "sub-02" / f"{key}.nii.gz").get_fdata()
        np.testing.assert_array_equal(two, three)
    first = nib.load(tmp_path / "three" / "sub-01" / "FLAIR.nii.gz").get_fdata()
    second = nib.load(tmp_path / "three" / "sub-02" / "FLAIR.nii.gz").get_fdata()
    assert not np.array_equal(first, second)


def test_write_cohort_is_atomic_and_in_scanner_space(tmp_path, monkeypatch):
    folder = tmp_path / "cohort" / "sub-01"
    phantom.write_cohort(tmp_path / "cohort", subjects=1, seed=5, size="tiny")
    # os.listdir shows hidden files too, so no temporary is left behind.
    assert sorted(os.listdir(folder)) == ["FLAIR.nii.gz", "T1.nii.gz", "lesion.nii.gz"]
    for key in ("T1", "FLAIR", "lesion"):
        header = nib.load(folder / f"{key}.nii.gz").header
        assert int(header["qform_code"]) == 1 and int(header["sform_code"]) == 1
        assert header.get_xyzt_units()[0] == "mm"

    # A save that fails after writing part of a file leaves neither it nor its temporary.
    save = nib.save

    def save_then_fail(image, filename):
        save(image, filename)
        if "FLAIR" in os.path.basename(filename):
            raise OSError("disk full")

    monkeypatch.setattr(nib, "save", save_then_fail)
    with pytest.raises(OSError, match="disk full"):
        phantom.write_cohort(tmp_path / "failed", subjects=1, seed=5, size="tiny")
    assert os.listdir(tmp_path / "failed" / "sub-01") == ["T1.nii.gz"]


def test_cohort_writer_stores_the_space_code_and_dtypes(tmp_path):
    affine = np.diag([2.0, 2.0, 2.0, 1.0])

    def make_subject(seed):
        rng = np.random.default_rng(seed)
        return {"T2": rng.random((3, 4, 5)), "lesion": rng.random((3, 4, 5)) > 0.5, "affine": affine}

    names = phantom_core.write_cohort(tmp_path, 2, 0, make_subject, ("T2", "lesion"), phantom_core.MNI152_SPACE)
    assert names == ["sub-01", "sub-02"]
    expected = make_subject(phantom_core.subject_seed(0, 1))
    for key, dtype in (("T2", np.float32), ("lesion", np.uint8)):
        image = nib.load(tmp_path / "sub-02" / f"{key}.nii.gz")
        assert image.get_data_dtype() == dtype
        assert int(image.header["qform_code"]) == 4 and int(image.header["sform_code"]) == 4
        np.testing.assert_array_equal(image.affine, affine)
        np.testing.assert_array_equal(np.asanyarray(image.dataobj), expected[key].astype(dtype))
