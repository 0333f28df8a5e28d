"""Every mistake a user can make: one line on stderr naming the file, exit 2, no output left behind."""

import os
import signal
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from jaxcascade import cli
from conftest import held_out_inputs


def _save(data, path, affine=None, dtype=np.float32):
    image = nib.Nifti1Image(np.asarray(data, dtype), np.eye(4) if affine is None else affine)
    image.set_qform(image.affine, code=1)
    image.set_sform(image.affine, code=1)
    nib.save(image, str(path))
    return path


def assert_user_error(capsys, argv, *fragments, out_files=()):
    capsys.readouterr()
    status = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert status == 2, captured
    assert len(lines) == 1, lines
    assert lines[0].startswith("jaxcascade: error: ")
    assert "Traceback" not in captured.err
    for fragment in fragments:
        assert str(fragment) in lines[0], (fragment, lines[0])
    for path in out_files:
        assert not os.path.exists(path), path
    leftovers = [p for p in os.listdir(os.path.dirname(out_files[0]))] if out_files else []
    assert not [p for p in leftovers if ".tmp-" in p]
    return lines[0]


@pytest.fixture
def subject(cohort):
    held = cohort / "held_out"
    return {name: nib.load(held / f"{name}.nii.gz") for name in ("T1", "FLAIR", "lesion")}


def _segment(trained_model, t1, flair, out):
    return ["segment", "--model", trained_model, "--input", f"T1={t1}", "--input", f"FLAIR={flair}", "--out", out]


def test_missing_file(trained_model, cohort, tmp_path, capsys):
    out = tmp_path / "seg.nii.gz"
    missing = tmp_path / "nope.nii.gz"
    assert_user_error(capsys, _segment(trained_model, missing, cohort / "held_out" / "FLAIR.nii.gz", out),
                      missing, "not found", out_files=[out])


def test_sequences_on_another_grid_are_resampled_onto_the_flair_grid(trained_model, subject, tmp_path, capsys):
    """A thick-slice T1 (every other plane, twice the spacing) and a cropped FLAIR: the mask is on the FLAIR's grid."""
    thick = subject["T1"].affine @ np.diag([1.0, 1.0, 2.0, 1.0])
    t1 = _save(np.asarray(subject["T1"].dataobj)[:, :, ::2], tmp_path / "T1.nii.gz", thick)
    flair = _save(np.asarray(subject["FLAIR"].dataobj)[:-2], tmp_path / "FLAIR.nii.gz", subject["FLAIR"].affine)
    out = tmp_path / "seg.nii.gz"
    assert cli.main([str(arg) for arg in _segment(trained_model, t1, flair, out)]) == 0
    written = nib.load(out)
    assert written.shape == nib.load(flair).shape
    np.testing.assert_array_equal(written.affine, nib.load(flair).affine)


def test_sequences_that_barely_overlap_are_refused_with_both_affines(trained_model, subject, tmp_path, capsys):
    shifted = subject["FLAIR"].affine.copy()
    shifted[0, 3] += 500.0  # half a metre away: not the same scanner space
    flair = _save(subject["FLAIR"].dataobj, tmp_path / "FLAIR.nii.gz", subject["FLAIR"].affine)
    t1 = _save(subject["T1"].dataobj, tmp_path / "T1.nii.gz", shifted)
    out = tmp_path / "seg.nii.gz"
    line = assert_user_error(capsys, _segment(trained_model, t1, flair, out), t1, "not co-registered",
                             out_files=[out])
    assert line.count("[[") == 2 and "0%" in line  # both affines printed, the overlap named


@pytest.mark.parametrize("inputs, fragment", [
    (["T2=a.nii.gz", "FLAIR=b.nii.gz"], "missing T1"),
    (["T1=a.nii.gz", "FLAIR=b.nii.gz", "PD=c.nii.gz"], "not used by the model: PD"),
    (["T1=a.nii.gz", "T1=b.nii.gz"], "given twice"),
    (["T1", "FLAIR=b.nii.gz"], "NAME=PATH"),
])
def test_wrong_channel_names(trained_model, tmp_path, capsys, inputs, fragment):
    out = tmp_path / "seg.nii.gz"
    argv = ["segment", "--model", trained_model, "--out", out]
    for item in inputs:
        argv += ["--input", item]
    assert_user_error(capsys, argv, fragment, out_files=[out])


def test_non_3d_image_and_trailing_singleton(trained_model, subject, cohort, tmp_path, capsys):
    data = np.asarray(subject["FLAIR"].dataobj)
    four_d = _save(np.stack([data, data], -1), tmp_path / "FLAIR4d.nii.gz", subject["FLAIR"].affine)
    out = tmp_path / "seg.nii.gz"
    t1 = cohort / "held_out" / "T1.nii.gz"
    assert_user_error(capsys, _segment(trained_model, t1, four_d, out), four_d, "3D", out_files=[out])
    singleton = _save(data[..., None], tmp_path / "FLAIR1.nii.gz", subject["FLAIR"].affine)
    assert cli.main([str(a) for a in _segment(trained_model, t1, singleton, out)]) == 0
    assert out.exists()


@pytest.mark.parametrize("bad_value", [np.nan, np.inf])
def test_non_finite_voxels(trained_model, subject, cohort, tmp_path, capsys, bad_value):
    data = np.asarray(subject["FLAIR"].dataobj).copy()
    data[3, 4, 5] = bad_value
    data[6, 7, 8] = bad_value
    flair = _save(data, tmp_path / "FLAIR.nii.gz", subject["FLAIR"].affine)
    out = tmp_path / "seg.nii.gz"
    assert_user_error(capsys, _segment(trained_model, cohort / "held_out" / "T1.nii.gz", flair, out),
                      flair, "2 voxels are NaN or Inf", out_files=[out])


def test_empty_candidate_set(trained_model, subject, cohort, tmp_path, capsys):
    # 95 % of the head at one bright value, the rest darker: nothing lies
    # 0.5 standard deviations above the mean.
    data = np.zeros(subject["FLAIR"].shape, np.float32)
    data[4:-4, 4:-4, 4:-4] = 100.0
    data[4:-4, 4:-4, 4:6] = 10.0
    flair = _save(data, tmp_path / "FLAIR.nii.gz", subject["FLAIR"].affine)
    out = tmp_path / "seg.nii.gz"
    assert_user_error(capsys, _segment(trained_model, cohort / "held_out" / "T1.nii.gz", flair, out),
                      "no candidate voxels", out_files=[out])


def test_not_nifti_and_truncated(trained_model, cohort, tmp_path, capsys):
    text = tmp_path / "FLAIR.nii.gz"
    text.write_text("hello")
    out = tmp_path / "seg.nii.gz"
    t1 = cohort / "held_out" / "T1.nii.gz"
    assert_user_error(capsys, _segment(trained_model, t1, text, out), text, out_files=[out])
    truncated = tmp_path / "trunc.nii.gz"
    truncated.write_bytes((cohort / "held_out" / "FLAIR.nii.gz").read_bytes()[:3000])
    assert_user_error(capsys, _segment(trained_model, t1, truncated, out), truncated, out_files=[out])


def test_output_rules(trained_model, cohort, tmp_path, capsys):
    out = tmp_path / "missing_folder" / "seg.nii.gz"
    assert_user_error(capsys, ["segment", "--model", trained_model, *held_out_inputs(cohort), "--out", out],
                      "does not exist")
    existing = tmp_path / "seg.nii.gz"
    existing.write_bytes(b"previous")
    assert_user_error(capsys, ["segment", "--model", trained_model, *held_out_inputs(cohort), "--out", existing],
                      existing, "--overwrite")
    assert existing.read_bytes() == b"previous"


def test_model_dir_that_is_not_a_model(tmp_path, cohort, capsys):
    out = tmp_path / "seg.nii.gz"
    assert_user_error(capsys, ["segment", "--model", tmp_path, *held_out_inputs(cohort), "--out", out],
                      tmp_path, "not a jaxcascade model", out_files=[out])


def test_training_data_errors(cohort, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    wd = tmp_path / "wd"
    assert_user_error(capsys, ["train", "--data", empty, "--workdir", wd], empty, "no subject folders")
    partial = tmp_path / "partial"
    (partial / "a").mkdir(parents=True)
    (partial / "b").mkdir()
    for name in ("T1", "FLAIR", "lesion"):
        (partial / "a" / f"{name}.nii.gz").write_bytes((cohort / "held_out" / f"{name}.nii.gz").read_bytes())
    (partial / "b" / "T1.nii.gz").write_bytes((cohort / "held_out" / "T1.nii.gz").read_bytes())
    assert_user_error(capsys, ["train", "--data", partial, "--workdir", wd],
                      "b lacks FLAIR.nii.gz, lesion.nii.gz")
    assert not wd.exists()


def test_lesion_mask_errors(cohort, subject, tmp_path, capsys):
    data_dir = tmp_path / "data" / "s1"
    data_dir.mkdir(parents=True)
    for name in ("T1", "FLAIR"):
        (data_dir / f"{name}.nii.gz").write_bytes((cohort / "held_out" / f"{name}.nii.gz").read_bytes())
    mask = np.asarray(subject["lesion"].dataobj).astype(np.float32)
    mask[0, 0, 0] = 2.0
    mask[0, 0, 1] = 0.5
    _save(mask, data_dir / "lesion.nii.gz", subject["lesion"].affine)
    wd = tmp_path / "wd"
    assert_user_error(capsys, ["train", "--data", tmp_path / "data", "--workdir", wd], "lesion.nii.gz",
                      "0.5, 2")
    _save(np.zeros(subject["lesion"].shape), data_dir / "lesion.nii.gz", subject["lesion"].affine)
    assert_user_error(capsys, ["train", "--data", tmp_path / "data", "--workdir", wd], "no lesion voxels")
    assert not wd.exists()


@pytest.mark.parametrize("override, fragment", [
    ("--config.train.max_epoch=3", "unknown config key 'max_epoch'"),
    ("--config.train.max_epochs=three", "expected a value of type int"),
    ("--config.nothing.here=1", "unknown config key 'nothing'"),
])
def test_config_override_errors(cohort, tmp_path, capsys, override, fragment):
    assert_user_error(capsys, ["train", "--data", cohort / "train", "--workdir", tmp_path / "wd", override],
                      fragment)
    assert not (tmp_path / "wd").exists()


def test_console_script_exit_status_and_single_line(tmp_path):
    """The installed entry point, in a real process: exit 2, one line, no traceback."""
    result = subprocess.run(
        [sys.executable, "-m", "jaxcascade.cli", "evaluate", "--pred", str(tmp_path / "p.nii.gz"),
         "--truth", str(tmp_path / "t.nii.gz")],
        capture_output=True, text=True,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"jaxcascade: error: {tmp_path / 't.nii.gz'}: file not found"]


def test_closed_output_pipe_ends_quietly(cohort):
    """`jaxcascade evaluate ... | head` with the reader gone before the table is printed: no traceback."""
    lesion = str(cohort / "held_out" / "lesion.nii.gz")
    process = subprocess.Popen([sys.executable, "-m", "jaxcascade.cli", "evaluate", "--pred", lesion, "--truth", lesion],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    process.stdout.close()  # long before the child has imported numpy and read the images
    stderr = process.stderr.read()
    assert process.wait() == 128 + signal.SIGPIPE
    assert stderr == ""


def test_model_from_an_incompatible_version(trained_model, cohort, tmp_path, capsys):
    import json
    import shutil

    copy = tmp_path / "old_model"
    shutil.copytree(trained_model, copy)
    record = json.loads((copy / "config.json").read_text())
    record["jaxcascade"]["format_version"] = 99
    (copy / "config.json").write_text(json.dumps(record))
    out = tmp_path / "seg.nii.gz"
    assert_user_error(capsys, ["segment", "--model", copy, *held_out_inputs(cohort), "--out", out],
                      "config.json", "model format 99", out_files=[out])


def test_all_zero_image_and_directory_as_file(trained_model, subject, cohort, tmp_path, capsys):
    zero = _save(np.zeros(subject["FLAIR"].shape), tmp_path / "FLAIR.nii.gz", subject["FLAIR"].affine)
    out = tmp_path / "seg.nii.gz"
    t1 = cohort / "held_out" / "T1.nii.gz"
    assert_user_error(capsys, _segment(trained_model, t1, zero, out), zero, "all zero", out_files=[out])
    folder = tmp_path / "folder.nii.gz"
    folder.mkdir()
    assert_user_error(capsys, _segment(trained_model, t1, folder, out), folder, "cannot be read", out_files=[out])


def test_lesion_mask_on_another_grid(cohort, subject, tmp_path, capsys):
    data_dir = tmp_path / "data" / "s1"
    data_dir.mkdir(parents=True)
    for name in ("T1", "FLAIR"):
        (data_dir / f"{name}.nii.gz").write_bytes((cohort / "held_out" / f"{name}.nii.gz").read_bytes())
    mask = np.asarray(subject["lesion"].dataobj)[:, :, :-1]
    _save(mask, data_dir / "lesion.nii.gz", subject["lesion"].affine)
    wd = tmp_path / "wd"
    assert_user_error(capsys, ["train", "--data", tmp_path / "data", "--workdir", wd], "lesion.nii.gz", "shape")
    assert not wd.exists()


def test_qform_sform_disagreement_through_the_cli(trained_model, subject, cohort, tmp_path, capsys):
    image = nib.Nifti1Image(np.asarray(subject["FLAIR"].dataobj, np.float32), subject["FLAIR"].affine)
    shifted = subject["FLAIR"].affine.copy()
    shifted[2, 3] += 3.0
    image.set_qform(subject["FLAIR"].affine, code=1)
    image.set_sform(shifted, code=1)
    flair = tmp_path / "FLAIR.nii.gz"
    nib.save(image, flair)
    out = tmp_path / "seg.nii.gz"
    assert_user_error(capsys, _segment(trained_model, cohort / "held_out" / "T1.nii.gz", flair, out),
                      flair, "qform and sform disagree", out_files=[out])


def test_output_folder_that_is_a_file(trained_model, cohort, tmp_path, capsys):
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("x")
    out = blocker / "seg.nii.gz"
    assert_user_error(capsys, ["segment", "--model", trained_model, *held_out_inputs(cohort), "--out", out],
                      "not_a_folder is a file, not a folder")
