"""Segmenting a study (`segment --data DIR --out-dir OUT`) on tiny phantoms: reports, errors, resume, compilations."""

import json
import shutil

import nibabel as nib
import numpy as np
import pytest

from jaxcascade.segmentation import cascade, dense, study as study_lib
from jaxcascade import cli, phantom
from jaxcascade.errors import UserError
from conftest import held_out_inputs, read_csv


def _crop(source, target, keep):
    """Copy a subject folder with every image cut to its first `keep` voxels on the first axis."""
    target.mkdir(parents=True)
    for path in source.glob("*.nii.gz"):
        image = nib.load(path)
        data = np.asarray(image.dataobj)[:keep]
        cropped = nib.Nifti1Image(data, image.affine, header=image.header)
        nib.save(cropped, target / path.name)


@pytest.fixture(scope="module")
def study(cohort, tmp_path_factory):
    """sub-a: the held-out subject; sub-b, sub-d: the same cut to two other shapes; sub-c: FLAIR missing."""
    root = tmp_path_factory.mktemp("study") / "data"
    shutil.copytree(cohort / "held_out", root / "sub-a")
    _crop(cohort / "held_out", root / "sub-b", keep=30)
    _crop(cohort / "held_out", root / "sub-d", keep=20)
    (root / "sub-c").mkdir()
    shutil.copy(cohort / "held_out" / "T1.nii.gz", root / "sub-c" / "T1.nii.gz")
    return root


def test_study_reports_every_subject_and_compiles_once_per_shape_bucket(trained_model, study, tmp_path, capsys):
    model = cascade.Cascade.load(trained_model)
    predictor = dense.make_tile_predictor(model.stage1.graphdef, 12, model.stage1.dense_halo, 5)
    compiled_before = predictor._cache_size()
    out = tmp_path / "out"
    # sub-c cannot be segmented: its row says why, and the exit status says that some subject failed.
    assert cli.main(["segment", "--model", str(trained_model), "--data", str(study), "--out-dir", str(out),
                     "--probabilities"]) == 1
    assert "4 subjects: 3 segmented, 0 already done, 1 failed (see lesions.csv)" in capsys.readouterr().out
    # Three volume shapes (40, 30 and 20 planes: 4, 3 and 2 tiles) fall in one padded bucket: at most one
    # compilation (none where training already compiled it), where each shape would compile its own.
    assert predictor._cache_size() - compiled_before <= 1

    rows = {row["participant_id"]: row for row in read_csv(out / "lesions.csv")}
    assert rows["sub-a"]["status"] == rows["sub-b"]["status"] == rows["sub-d"]["status"] == "ok"
    assert rows["sub-c"]["status"].startswith("error: ") and "FLAIR.nii.gz: file not found" in rows["sub-c"]["status"]
    lesions = read_csv(out / "lesion_table.csv")
    for name in ("sub-a", "sub-b"):
        mask_image = nib.load(out / name / f"{name}_desc-lesion_mask.nii.gz")
        flair = nib.load(study / name / "FLAIR.nii.gz")
        np.testing.assert_array_equal(mask_image.affine, flair.affine)
        assert mask_image.shape == flair.shape
        mask = np.asarray(mask_image.dataobj)
        voxel_ml = float(np.prod(flair.header.get_zooms()[:3])) / 1000
        assert float(rows[name]["lesion_volume_ml"]) == pytest.approx(mask.sum() * voxel_ml)
        own = [lesion for lesion in lesions if lesion["participant_id"] == name]
        assert int(rows[name]["lesion_count"]) == len(own) > 0
        assert sum(int(lesion["voxels"]) for lesion in own) == mask.sum()
        assert 0 <= float(rows[name]["dsc"]) <= 1
        # The volume error beside DSC, from the same volumes the row reports.
        volume, truth = float(rows[name]["lesion_volume_ml"]), float(rows[name]["true_volume_ml"])
        assert float(rows[name]["volume_error_percent"]) == pytest.approx(100 * (volume - truth) / truth, abs=0.01)
        assert (out / name / f"{name}_desc-stage2_probseg.nii.gz").exists() and (out / name / f"{name}_desc-qc.png").exists()
    # A lesion's centroid lies in scanner space inside the image's extent.
    corners = nib.affines.apply_affine(nib.load(study / "sub-a" / "FLAIR.nii.gz").affine,
                                       np.array([[0, 0, 0], [39, 47, 39]]))
    centroid = np.array([[float(lesions[0][f"centroid_{axis}_mm"]) for axis in "xyz"]])
    assert ((centroid >= corners.min(0)) & (centroid <= corners.max(0))).all()


def test_study_matches_one_segment_call_and_resumes(trained_model, study, cohort, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["segment", "--model", str(trained_model), "--data", str(study), "--out-dir", str(out)]
    assert cli.main(argv) == 1
    single = tmp_path / "single.nii.gz"
    assert cli.main(["segment", "--model", str(trained_model), *held_out_inputs(cohort), "--out", str(single)]) == 0
    np.testing.assert_array_equal(np.asarray(nib.load(out / "sub-a" / "sub-a_desc-lesion_mask.nii.gz").dataobj),
                                  np.asarray(nib.load(single).dataobj))
    report = out / "sub-a" / "sub-a_desc-lesion_report.json"
    written = report.stat().st_mtime_ns
    capsys.readouterr()
    assert cli.main(argv) == 1  # resume: finished subjects are read back, the broken one retried
    log = capsys.readouterr().out
    assert "sub-a:" not in log and "sub-c:" in log and report.stat().st_mtime_ns == written
    assert "4 subjects: 0 segmented, 3 already done, 1 failed" in log
    assert len(read_csv(out / "lesions.csv")) == 4
    assert cli.main([*argv, "--overwrite"]) == 1
    assert report.stat().st_mtime_ns != written


@pytest.mark.parametrize("extra, fragment", [
    (["--input", "T1=x.nii.gz"], "without --input/--out"),
    (["--threshold", "0.5"], "apply to one subject"),
    (["--probabilities", "maps"], "takes no folder for a study"),
])
def test_study_option_mistakes(trained_model, study, tmp_path, capsys, extra, fragment):
    argv = ["segment", "--model", str(trained_model), "--data", str(study), "--out-dir", str(tmp_path / "o"), *extra]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert fragment in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_bids_dataset_in_and_derivatives_out(trained_model, tmp_path, capsys):
    """Two subjects x two sessions of a BIDS phantom; lesion masks as a derivative are scored."""
    source = tmp_path / "bids"
    phantom.write_cohort(source, 2, seed=3, size="tiny", layout="bids", sessions=2)
    (source / "sub-02" / "ses-2" / "anat" / "sub-02_ses-2_FLAIR.nii.gz").unlink()  # a broken session
    out = tmp_path / "derivatives"
    assert cli.main(["segment", "--model", str(trained_model), "--data", str(source), "--out-dir", str(out)]) == 1
    rows = read_csv(out / "lesions.csv")
    assert [(r["participant_id"], r["session_id"]) for r in rows] == [
        ("sub-01", "ses-1"), ("sub-01", "ses-2"), ("sub-02", "ses-1"), ("sub-02", "ses-2")]
    assert [r["status"] for r in rows[:3]] == ["ok"] * 3 and "no *_FLAIR image" in rows[3]["status"]
    assert all(0 <= float(r["dsc"]) <= 1 for r in rows[:3])  # scored against the derivative masks
    mask = out / "sub-01" / "ses-2" / "anat" / "sub-01_ses-2_desc-lesion_mask.nii.gz"
    flair = nib.load(source / "sub-01" / "ses-2" / "anat" / "sub-01_ses-2_FLAIR.nii.gz")
    np.testing.assert_array_equal(nib.load(mask).affine, flair.affine)
    description = json.loads((out / "dataset_description.json").read_text())
    assert description["DatasetType"] == "derivative" and description["GeneratedBy"][0]["Name"] == "jaxcascade"
    lesions = read_csv(out / "lesion_table.csv")
    assert {(r["participant_id"], r["session_id"]) for r in lesions} <= {(r["participant_id"], r["session_id"])
                                                                         for r in rows[:3]}


def test_a_study_split_over_two_shards_ends_in_one_complete_report(trained_model, study, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["segment", "--model", str(trained_model), "--data", str(study), "--out-dir", str(out)]
    assert cli.main([*argv, "--shard", "0/2"]) == 1  # sub-c is shard 0's and fails
    statuses = {row["participant_id"]: row["status"] for row in read_csv(out / "lesions.csv")}
    # Sorted sub-a, sub-b, sub-c, sub-d: shard 0 takes sub-a and sub-c.
    assert statuses["sub-a"] == "ok" and statuses["sub-b"] == statuses["sub-d"] == "pending: shard 1/2"
    assert cli.main([*argv, "--shard", "1/2"]) == 0  # its own subjects all succeed
    statuses = {row["participant_id"]: row["status"] for row in read_csv(out / "lesions.csv")}
    assert statuses["sub-b"] == statuses["sub-d"] == "ok" and statuses["sub-c"].startswith("error")
    assert ("4 subjects: 2 segmented, 1 already done, 0 failed, 1 left to or failed in other shards"
            in capsys.readouterr().out)


def test_shard_settings():
    assert study_lib.parse_shard(None) == (0, 1) and study_lib.parse_shard("2/3") == (2, 3)
    assert study_lib.parse_shard("slurm", {"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_MIN": "4",
                                           "SLURM_ARRAY_TASK_MAX": "7"}) == (1, 4)
    for bad in ("3/3", "a/b", "1", "-1/2"):
        with pytest.raises(UserError, match="expected 'I/N'"):
            study_lib.parse_shard(bad)
    with pytest.raises(UserError, match="SLURM_ARRAY_TASK_ID is not set"):
        study_lib.parse_shard("slurm", {})


def test_brain_mask_for_an_image_that_is_not_skull_stripped(trained_model, cohort, tmp_path, capsys):
    """Background noise outside the head: a warning without a mask; with it, the clean image's segmentation."""
    held_out = cohort / "held_out"
    head = np.asarray(nib.load(held_out / "FLAIR.nii.gz").dataobj) != 0
    noisy = {}
    for name in ("T1", "FLAIR"):
        image = nib.load(held_out / f"{name}.nii.gz")
        data = np.asarray(image.dataobj, np.float32)
        data[~head] = np.random.default_rng(0).uniform(1, 5, int((~head).sum()))
        noisy[name] = tmp_path / f"{name}.nii.gz"
        nib.save(nib.Nifti1Image(data, image.affine, header=image.header), noisy[name])
    mask_path = tmp_path / "brain.nii.gz"
    nib.save(nib.Nifti1Image(head.astype(np.uint8), nib.load(held_out / "FLAIR.nii.gz").affine), mask_path)
    inputs = ["--input", f"T1={noisy['T1']}", "--input", f"FLAIR={noisy['FLAIR']}"]
    capsys.readouterr()
    assert cli.main(["segment", "--model", str(trained_model), *inputs, "--out", str(tmp_path / "plain.nii.gz")]) == 0
    warning = capsys.readouterr().err.strip().splitlines()
    assert len(warning) == 1 and "does not look skull-stripped" in warning[0] and "--brain-mask" in warning[0]
    assert cli.main(["segment", "--model", str(trained_model), *inputs, "--brain-mask", str(mask_path),
                     "--out", str(tmp_path / "masked.nii.gz")]) == 0
    assert capsys.readouterr().err == ""
    clean = tmp_path / "clean.nii.gz"
    assert cli.main(["segment", "--model", str(trained_model), *held_out_inputs(cohort), "--out", str(clean)]) == 0
    np.testing.assert_array_equal(np.asarray(nib.load(tmp_path / "masked.nii.gz").dataobj),
                                  np.asarray(nib.load(clean).dataobj))
    # In a study the mask is the subject's brain_mask.nii.gz, and the report says which subjects had one.
    data = tmp_path / "data"
    for subject, with_mask in (("sub-x", True), ("sub-y", False)):
        (data / subject).mkdir(parents=True)
        for name in ("T1", "FLAIR"):
            shutil.copy(noisy[name], data / subject / f"{name}.nii.gz")
        if with_mask:
            shutil.copy(mask_path, data / subject / "brain_mask.nii.gz")
    assert cli.main(["segment", "--model", str(trained_model), "--data", str(data), "--out-dir",
                     str(tmp_path / "out")]) == 0
    assert [row["skull_stripped"] for row in read_csv(tmp_path / "out" / "lesions.csv")] == ["masked", "no"]


def test_test_time_augmentation_averages_eight_flips(trained_model, cohort, tmp_path):
    """--tta: probabilities are the mean over the flips (the identity view among them), with their spread."""
    plain, tta = tmp_path / "plain", tmp_path / "tta"
    for folder, extra in ((plain, []), (tta, ["--tta"])):
        folder.mkdir()
        assert cli.main(["segment", "--model", str(trained_model), *held_out_inputs(cohort), "--out",
                         str(folder / "seg.nii.gz"), "--probabilities", str(folder), *extra]) == 0
    one = np.asarray(nib.load(plain / "stage1.nii.gz").dataobj)
    mean = np.asarray(nib.load(tta / "stage1.nii.gz").dataobj)
    spread = np.asarray(nib.load(tta / "stage2_std.nii.gz").dataobj)
    candidates = one > 0
    assert np.array_equal(mean > 0, candidates | (mean > 0)) and not np.allclose(mean, one)
    assert np.abs(mean - one)[candidates].mean() < 0.1  # eight views of a trained model mostly agree
    assert spread.max() > 0 and not spread[np.asarray(nib.load(tta / "stage2.nii.gz").dataobj) == 0].any()
    assert not (tmp_path / "plain" / "stage2_std.nii.gz").exists()
