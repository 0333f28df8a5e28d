"""Real MS scans: the shipped default model on the Ljubljana patient in ../shared, and the one-subject recipe.

The data (Lesjak et al. 2018, CC-BY) is read from ../shared, never copied. patient26 is the real subject
the default model was adapted on, so the DSC floor here guards against regressions (a model or a code
path that stops finding real lesions); the accuracy on scans it never saw is measured by the half-brain
protocol in docs/real-scans.md.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from jaxcascade import api, cli
from jaxcascade.storage import shipped

PATIENT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ljubljana-ms" / "cross-sectional" / "patient26"
# The 32 axial slices holding 7,920 of the patient's 8,227 lesion voxels.
SLAB = slice(79, 111)
# Measured on this slab with the shipped default (2-core AMD EPYC): DSC 0.834, lesion F1 0.67, volume +2 %;
# the floors leave room for CPU-to-CPU rounding, not for a model that finds fewer lesions.
DSC_FLOOR = 0.78


@pytest.fixture(scope="module")
def slab(tmp_path_factory):
    """patient26's T1, FLAIR and lesion mask cut to SLAB, as NIfTI files with the slab's own affine."""
    if not PATIENT.is_dir():
        pytest.fail(f"{PATIENT}: the real scans of ../shared are missing (see ../shared/data/ljubljana-ms/README.md)")
    folder = tmp_path_factory.mktemp("patient26") / "patient26"
    folder.mkdir()
    for name in ("T1", "FLAIR", "lesion"):
        image = nib.load(PATIENT / f"{name}.nii.gz")
        part = image.slicer[:, :, SLAB]
        data = np.asarray(part.dataobj)
        nib.save(nib.Nifti1Image(data.astype(np.uint8 if name == "lesion" else np.float32), part.affine),
                 folder / f"{name}.nii.gz")
    return folder


@pytest.fixture(scope="module")
def default_segmentation(slab, tmp_path_factory):
    out = tmp_path_factory.mktemp("seg") / "seg.nii.gz"
    # No --model: the shipped default, as on a fresh install.
    status = cli.main(["segment", "--input", f"T1={slab / 'T1.nii.gz'}", "--input", f"FLAIR={slab / 'FLAIR.nii.gz'}",
                       "--out", str(out)])
    assert status == 0
    return out


def test_the_default_model_finds_real_lesions(slab, default_segmentation):
    scores = api.evaluate(default_segmentation, slab / "lesion.nii.gz")
    assert scores["dsc"] >= DSC_FLOOR, scores
    assert scores["lesion_f1"] >= 0.6, scores
    assert abs(scores["rvd"]) <= 0.3, scores  # volumes within 30 %


def test_the_default_is_the_shipped_model_named_default(slab, default_segmentation, tmp_path):
    named = tmp_path / "named.nii.gz"
    assert cli.main(["segment", "--model", "default", "--input", f"T1={slab / 'T1.nii.gz'}",
                     "--input", f"FLAIR={slab / 'FLAIR.nii.gz'}", "--out", str(named)]) == 0
    assert np.array_equal(np.asarray(nib.load(named).dataobj), np.asarray(nib.load(default_segmentation).dataobj))


def test_models_lists_every_shipped_model_with_its_card(capsys):
    assert cli.main(["models", "--json"]) == 0
    cards = json.loads(capsys.readouterr().out)
    assert shipped.DEFAULT_MODEL in cards
    for name, card in cards.items():
        for key in ("summary", "inputs", "training_data", "licence", "accuracy", "training"):
            assert card[key], (name, key)
        for row in card["accuracy"]:
            assert 0.0 <= row["dsc"] <= 1.0 and 0.0 <= row["lesion_f1"] <= 1.0
        model = api.load_model(name)
        assert list(model.modalities) == card["inputs"]
    assert cli.main(["models"]) == 0
    listing = capsys.readouterr().out
    assert "default (used when --model is left out)" in listing and "DSC" in listing


def test_a_missing_model_names_the_shipped_ones(capsys):
    with pytest.raises(Exception) as caught:
        api.load_model("no-such-model")
    assert "shipped: " in str(caught.value) and "default" in str(caught.value)


def test_the_oneshot_recipe_fine_tunes_the_default_on_a_labelled_region(slab, tmp_path):
    # One subject whose rater outlined one hemisphere only: the recipe starts from the shipped default.
    data = tmp_path / "data" / "patient26"
    data.mkdir(parents=True)
    for name in ("T1", "FLAIR", "lesion"):
        (data / f"{name}.nii.gz").symlink_to(slab / f"{name}.nii.gz")
    lesion = nib.load(slab / "lesion.nii.gz")
    region = np.zeros(lesion.shape, np.uint8)
    region[: lesion.shape[0] // 2] = 1
    nib.save(nib.Nifti1Image(region, lesion.affine), data / "labelled.nii.gz")
    workdir = tmp_path / "tuned"
    assert cli.main(["train", "--init-from", "default", "--config", "oneshot", "--data", str(tmp_path / "data"),
                     "--workdir", str(workdir), "--config.train.max_epochs=1"]) == 0
    config = json.loads((workdir / "config.json").read_text())
    assert config["train"]["learning_rate"] == 0.5 and config["train"]["max_epochs"] == 1  # the user's override wins
    assert config["model"] == json.loads((shipped.locate("default") / "config.json").read_text())["model"]
    tuned = api.load_model(workdir)
    assert tuned.modalities == ("T1", "FLAIR")


def test_a_recipe_must_be_a_recipe(tmp_path, capsys):
    status = cli.main(["train", "--init-from", "default", "--config", "demo", "--data", str(tmp_path),
                       "--workdir", str(tmp_path / "w")])
    assert status != 0
    assert "with --init-from, --config takes a fine-tuning recipe" in capsys.readouterr().err
