"""The domain-randomised phantom: reproducible, contrasts with their sense, lesions where real ones are."""

import numpy as np
import pytest
from scipy import ndimage

from jaxcascade.phantom import core as phantom_core, mni, synth


@pytest.fixture(scope="module")
def subjects():
    return [synth.make_subject(seed, "tiny", ("T1", "FLAIR")) for seed in (1, 2)]


def test_deterministic_and_each_contrast_its_own(subjects):
    again = synth.make_subject(1, "tiny", ("FLAIR",))
    assert np.array_equal(again["FLAIR"], subjects[0]["FLAIR"])
    assert np.array_equal(again["lesion"], subjects[0]["lesion"])
    assert not np.array_equal(subjects[0]["lesion"], subjects[1]["lesion"])


def test_lesions_keep_their_sense_on_every_draw(subjects):
    for subject in subjects:
        lesion = subject["lesion"] > 0
        assert lesion.any()
        brain = subject["FLAIR"] > 0
        assert np.array_equal(brain, subject["T1"] > 0)  # exactly zero outside the head, both contrasts
        assert not (lesion & ~brain).any()
        core = ndimage.binary_erosion(lesion) if ndimage.binary_erosion(lesion).any() else lesion
        flair, t1 = subject["FLAIR"], subject["T1"]
        assert np.median(flair[core]) > np.median(flair[brain & ~lesion])
        # T1: lesions are darker than white matter, the brightest tissue (the 90th percentile of the rest).
        assert np.median(t1[core]) < np.percentile(t1[brain & ~lesion], 90)


def test_draws_differ_in_contrast_not_only_gain(subjects):
    # The ratio of lesion to brain FLAIR intensity (gain-free) varies between subjects.
    ratios = [np.median(s["FLAIR"][s["lesion"] > 0]) / np.median(s["FLAIR"][s["FLAIR"] > 0]) for s in subjects]
    assert abs(ratios[0] - ratios[1]) > 0.01


def test_lesions_reach_the_ventricles_and_the_cortex():
    # Placement alone, on the tiny grid: periventricular lesions touch the ventricles' edge and
    # juxtacortical ones grey matter, unlike the mni phantom's deep-white-matter-only lesions.
    base = mni.template("tiny")
    voxel = float(abs(base["affine"][0, 0]))
    rng = np.random.default_rng(0)
    fractions = mni.deform(rng, base, voxel)
    head = fractions["brain"] > 0.5
    label, ventricles = mni.tissue_labels(fractions, head, voxel)
    presence, peaks = synth.lesion_presence(rng, fractions, label, ventricles, base["affine"], voxel)
    lesion = presence > 0.5
    assert 0.0 <= presence.min() and presence.max() <= 1.0
    assert (peaks[lesion] >= 0.5).all() and (peaks[lesion] <= 1.0).all()
    grown = ndimage.binary_dilation(lesion, iterations=1)
    assert (grown & ventricles).any() or (grown & (label == phantom_core.GM)).any()
    # Soft edges: a band of partial presence around the masks.
    assert ((presence > 0.05) & (presence < 0.5)).sum() > 0


def test_write_cohort_names_the_randomised_scanner(tmp_path):
    import json

    synth.write_cohort(tmp_path / "bids", 1, seed=3, size="tiny", layout="bids")
    description = json.loads((tmp_path / "bids" / "dataset_description.json").read_text())
    assert "synth" in description["GeneratedBy"][0]["Description"]
    assert (tmp_path / "bids" / "sub-01" / "ses-1" / "anat" / "sub-01_ses-1_FLAIR.nii.gz").exists()
