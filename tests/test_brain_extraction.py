"""Offline brain extraction: the MNI152 template inside nilearn's wheel, on a real raw FLAIR.

patient01 and patient26 (Lesjak et al. 2016, 2018, CC-BY) are read from ../shared, never copied.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nibabel as nib
import nilearn
import numpy as np
import pytest

from jaxcascade.errors import UserError
from jaxcascade.registration import brain, transforms

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ljubljana-ms"
PATIENT01 = DATA / "longitudinal" / "patient01"
STRIPPED_FLAIR = DATA / "cross-sectional" / "patient26" / "FLAIR.nii.gz"
# Measured on study1's FLAIR against brainmask_common mapped onto it through the database's transform:
# Dice 0.954 (study2: 0.952), experiments/measured/clinical_preprocessing/patient01.json. The template
# mapped by the affine alone reaches 0.948; the floor fails a refinement or a registration gone wrong.
DICE_FLOOR = 0.93


def _require(path: Path) -> None:
    if not path.exists():
        pytest.fail(f"{path}: the real scans of ../shared are missing (see ../shared/data/ljubljana-ms/README.md)")


def test_the_template_comes_from_inside_the_nilearn_wheel():
    """Nothing to download: the files load_mni152_* read live in nilearn's own package folder."""
    from nilearn.datasets.struct import MNI152_FILE_PATH

    assert Path(MNI152_FILE_PATH).is_file()
    assert Path(nilearn.__file__).parent in Path(MNI152_FILE_PATH).parents
    template, mask = brain.mni_template()
    assert template.shape == mask.shape == (98, 116, 94)
    assert 1000 < mask.get_fdata().sum() * 8 / 1000 < 2500  # ml at 2 mm: an adult brain


def test_the_brain_of_a_raw_flair_matches_the_databases_mask():
    _require(PATIENT01)
    flair = nib.load(PATIENT01 / "study1_FLAIR.nii.gz")
    common_to_flair = transforms.read_itk_transform(PATIENT01 / "study1_FLAIR_to_common_space.txt")
    reference = transforms.resample(nib.load(PATIENT01 / "brainmask_common.nii.gz"), flair,
                                    transforms.invert(common_to_flair))
    reference = np.asarray(reference.dataobj) >= 0.5
    ours = np.asarray(brain.extract_brain(flair).dataobj) > 0
    dice = 2 * (ours & reference).sum() / (ours.sum() + reference.sum())
    assert dice > DICE_FLOOR, f"Dice {dice:.3f}"


def test_skull_stripped_or_not_is_told_apart_on_real_scans():
    _require(PATIENT01)
    _require(STRIPPED_FLAIR)
    assert brain.looks_skull_stripped(nib.load(STRIPPED_FLAIR))
    for visit in (1, 2):
        assert not brain.looks_skull_stripped(nib.load(PATIENT01 / f"study{visit}_FLAIR.nii.gz"))


def test_a_noisy_background_is_not_skull_stripped():
    rng = np.random.default_rng(0)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, 40)] * 3, indexing="ij"))
    inside = (grid ** 2).sum(0) < 0.8
    affine = np.diag([3.0, 3.0, 3.0, 1.0])  # a 1,000 ml ball in a 120 mm cube
    stripped = np.where(inside, 100.0, 0.0).astype(np.float32)
    assert brain.looks_skull_stripped(nib.Nifti1Image(stripped, affine))
    noisy = (stripped + rng.rayleigh(5.0, stripped.shape)).astype(np.float32)
    assert not brain.looks_skull_stripped(nib.Nifti1Image(noisy, affine))


def test_without_nilearn_brain_extraction_is_one_line_with_the_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "nilearn", None)  # import nilearn now raises ImportError
    brain.mni_template.cache_clear()
    try:
        with pytest.raises(UserError, match=r"needs nilearn: pip install 'jaxcascade\[clinical\]'"):
            brain.mni_template()
    finally:
        brain.mni_template.cache_clear()
