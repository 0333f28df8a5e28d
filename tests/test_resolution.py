"""Models run at their training voxel size: inputs of another voxel size are resampled there and back."""

import csv
import itertools
import json
import shutil

import nibabel as nib
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from scipy import ndimage

from jaxcascade import cli
from jaxcascade.storage import model_directory
from jaxcascade.config import load_config
from jaxcascade.data import nifti, resolution
from jaxcascade.errors import UserError
from jaxcascade.segmentation.options import THICK_SLICE_MODES, SegmentOptions
from conftest import held_out_inputs


def _finer(cohort, tmp_path):
    """The held-out subject resampled from 4 mm to a 2 x 2 x 4 mm grid (T1, FLAIR trilinear, lesion nearest)."""
    paths = {}
    reference = nifti.load_image(cohort / "held_out" / "FLAIR.nii.gz")
    shape, affine = resolution.working_grid(reference, (2.0, 2.0, 4.0))
    for name, order in (("T1", 1), ("FLAIR", 1), ("lesion", 0)):
        image = nifti.load_image(cohort / "held_out" / f"{name}.nii.gz", allow_all_zero=True)
        moved = resolution.onto(image, shape, affine, order=order)
        paths[name] = tmp_path / f"{name}.nii.gz"
        data = moved.to_file_grid(moved.data)
        nib.save(nib.Nifti1Image(data.astype(np.uint8 if name == "lesion" else np.float32), affine), paths[name])
    return paths


def test_the_model_records_its_training_voxel_size(trained_model):
    assert model_directory.recorded_voxel_size(trained_model) == (4.0, 4.0, 4.0)  # the tiny phantom's grid
    assert json.loads((trained_model / model_directory.TRAINING_DATA).read_text())["flair_voxel_size_mm"] == [4, 4, 4]


def test_working_grid_round_trip_is_exact_on_the_same_grid(cohort):
    flair = nifti.load_image(cohort / "held_out" / "FLAIR.nii.gz")
    shape, affine = resolution.working_grid(flair, (4.0, 4.0, 4.0))
    assert shape == flair.data.shape and np.allclose(affine, flair.affine)
    np.testing.assert_allclose(resolution.onto(flair, shape, affine).data, flair.data, atol=1e-4)
    assert not resolution.differs(flair, (4.0, 4.0, 4.4)) and resolution.differs(flair, (4.0, 4.0, 6.0))


def test_finer_input_is_segmented_at_the_model_resolution_and_returned_on_its_grid(trained_model, cohort, tmp_path,
                                                                                   capsys):
    paths = _finer(cohort, tmp_path)
    inputs = ["--input", f"T1={paths['T1']}", "--input", f"FLAIR={paths['FLAIR']}"]
    native = tmp_path / "native.nii.gz"
    assert cli.main(["segment", "--model", str(trained_model), *held_out_inputs(cohort), "--out", str(native)]) == 0
    auto = tmp_path / "auto.nii.gz"
    assert cli.main(["segment", "--model", str(trained_model), *inputs, "--out", str(auto)]) == 0
    written = nib.load(auto)
    assert written.shape == nib.load(paths["FLAIR"]).shape
    np.testing.assert_array_equal(written.affine, nib.load(paths["FLAIR"]).affine)
    truth = np.asarray(nib.load(paths["lesion"]).dataobj) > 0
    found = np.asarray(written.dataobj) > 0
    dsc = 2 * (found & truth).sum() / (found.sum() + truth.sum())
    native_found = np.asarray(nib.load(native).dataobj) > 0
    native_truth = np.asarray(nib.load(cohort / "held_out" / "lesion.nii.gz").dataobj) > 0
    native_dsc = 2 * (native_found & native_truth).sum() / (native_found.sum() + native_truth.sum())
    capsys.readouterr()
    never = tmp_path / "never.nii.gz"
    assert cli.main(["segment", "--model", str(trained_model), *inputs, "--out", str(never),
                     "--resample", "never"]) == 0
    never_found = np.asarray(nib.load(never).dataobj) > 0
    never_dsc = 2 * (never_found & truth).sum() / (never_found.sum() + truth.sum())
    # At the model's resolution and brought back, the segmentation beats one at the input's resolution
    # and stays near the model's on the native grid. The test model trains for 4 epochs, so how near
    # depends on the CPU's rounding: (auto, never, native) = (0.656, 0.513, 0.782) on an AMD EPYC.
    assert dsc > never_dsc + 0.05 and dsc > native_dsc - 0.2, (dsc, never_dsc, native_dsc)
    warning = capsys.readouterr().err.strip().splitlines()
    assert len(warning) == 1 and "voxel size 2x2x4 mm, the model was trained at 4x4x4 mm" in warning[0]


@pytest.mark.parametrize("volume_mm3, voxels", [(1280, 20), (640, 10)])
def test_min_lesion_volume_in_mm3_equals_the_voxel_count_it_implies(trained_model, cohort, tmp_path, volume_mm3,
                                                                     voxels):
    by_volume, by_count = tmp_path / "volume.nii.gz", tmp_path / "count.nii.gz"
    base = ["segment", "--model", str(trained_model), *held_out_inputs(cohort), "--threshold", "0.5"]
    assert cli.main([*base, "--out", str(by_volume), "--min-lesion-volume", str(volume_mm3)]) == 0  # 64 mm^3 voxels
    assert cli.main([*base, "--out", str(by_count), "--min-lesion-voxels", str(voxels)]) == 0
    np.testing.assert_array_equal(np.asarray(nib.load(by_volume).dataobj), np.asarray(nib.load(by_count).dataobj))


def test_a_thick_flair_gets_the_model_s_thick_slice_settings_and_the_user_can_say_no(trained_model, cohort, tmp_path,
                                                                                     capsys):
    """A model that carries thick-slice settings applies them, and says so, to a FLAIR with slices at least
    as thick as its config's from_mm; `--thick-slices off` keeps its own; a model without them refuses 'on'."""
    calibrated = tmp_path / "calibrated"
    shutil.copytree(trained_model, calibrated, ignore=shutil.ignore_patterns("checkpoints"))
    config = json.loads((calibrated / "config.json").read_text())
    own = config["inference"]
    config["inference"]["thick_slices"] = {"from_mm": 4.0, "stage2_min_probability": own["stage2_min_probability"],
                                           "threshold": 0.9, "min_lesion_voxels": 3}
    (calibrated / "config.json").write_text(json.dumps(config))

    def run(model, *flags):
        out = tmp_path / f"{len(list(tmp_path.glob('*.nii.gz')))}.nii.gz"
        status = cli.main(["segment", "--model", str(model), *held_out_inputs(cohort), "--out", str(out), *flags])
        return status, np.asarray(nib.load(out).dataobj) if status == 0 else None, capsys.readouterr().err

    status, thick, err = run(calibrated)  # the held-out FLAIR has 4 mm voxels
    assert status == 0 and "4 mm slices: the model's thick-slice settings apply (CNN1 > " in err, err
    assert "CNN2 >= 0.9, lesions of more than 3 voxels); --thick-slices off keeps its own" in err
    _, asked, _ = run(trained_model, "--threshold", "0.9", "--min-lesion-voxels", "3")
    _, off, err_off = run(calibrated, "--thick-slices", "off")
    _, own_settings, _ = run(trained_model)
    np.testing.assert_array_equal(thick, asked)
    np.testing.assert_array_equal(off, own_settings)
    assert "thick-slice" not in err_off and thick.sum() != own_settings.sum()
    status, _, err = run(trained_model, "--thick-slices", "on")
    assert status == 2 and err.count("\n") == 1 and "--thick-slices on: the model has no thick-slice settings" in err
    # A study says per subject which settings made its lesions.
    (tmp_path / "study").mkdir()
    (tmp_path / "study" / "held_out").symlink_to(cohort / "held_out", target_is_directory=True)
    for flags, expected in (((), "yes"), (("--thick-slices", "off"), "no")):
        out_dir = tmp_path / f"study-{expected}"
        assert cli.main(["segment", "--model", str(calibrated), "--data", str(tmp_path / "study"),
                         "--out-dir", str(out_dir), *flags]) == 0
        rows = list(csv.DictReader((out_dir / "lesions.csv").open()))
        assert [row["thick_slices"] for row in rows] == [expected]
        assert int(rows[0]["lesion_count"]) == len(np.unique(ndimage.label(thick if expected == "yes" else off,
                                                                           np.ones((3, 3, 3)))[0])) - 1


@settings(max_examples=200, deadline=None)
@given(voxel=st.lists(st.floats(0.2, 8.0), min_size=3, max_size=3), from_mm=st.sampled_from([0.0, 2.5, 3.0, 5.0]),
       mode=st.sampled_from(THICK_SLICE_MODES), threshold=st.none() | st.floats(0.0, 1.0))
def test_thick_slice_settings_follow_the_thickest_edge_whatever_the_axis_order(voxel, from_mm, mode, threshold):
    config = load_config(None)
    config.inference.thick_slices.update(from_mm=from_mm, stage2_min_probability=0.42, threshold=0.97,
                                         min_lesion_voxels=7)
    options = SegmentOptions(thick_slices=mode, threshold=threshold)
    if mode == "on" and from_mm == 0:
        with pytest.raises(UserError, match="no thick-slice settings"):
            options.thick(config, voxel)
        return
    thick = options.thick(config, voxel)
    assert thick == {"on": True, "off": False, "auto": from_mm > 0 and max(voxel) >= from_mm}[mode]
    assert all(options.thick(config, list(order)) == thick for order in itertools.permutations(voxel))
    if thick and mode == "auto":  # thicker slices stay thick
        assert options.thick(config, [v + 1.0 for v in voxel])
    settings_ = options.inference(config, voxel_volume_ml=0.001, platform="cpu", thick=thick)
    own = config.inference
    assert settings_.stage2_min_probability == (0.42 if thick else own.stage2_min_probability)
    assert settings_.min_lesion_voxels == (7 if thick else own.min_lesion_voxels)
    # The user's own threshold wins over both.
    assert settings_.threshold == (threshold if threshold is not None else 0.97 if thick else own.threshold)
