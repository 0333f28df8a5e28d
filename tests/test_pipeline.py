"""End to end through the CLI on the tiny phantom: train, resume, segment, evaluate."""

import json

import nibabel as nib
import numpy as np
import pytest

from jaxcascade.storage import model_directory, weights
from jaxcascade import cli
from jaxcascade.evaluation import metrics
from conftest import QUICK_OVERRIDES, held_out_inputs


def test_trained_workdir_has_everything(trained_model):
    config = json.loads((trained_model / "config.json").read_text())
    assert config["data"]["modalities"] == ["T1", "FLAIR"]
    assert config["jaxcascade"]["format_version"] == model_directory.FORMAT_VERSION
    records = [json.loads(line) for line in (trained_model / "metrics.jsonl").read_text().splitlines()]
    assert {r["stage"] for r in records} == {1, 2}
    assert all(np.isfinite(r["val_loss"]) for r in records)
    assert (trained_model / "training_curves.png").stat().st_size > 1000
    assert weights.stage_done(trained_model, 1) and weights.stage_done(trained_model, 2)


def test_segment_held_out_beats_trivial_baseline(trained_model, cohort, tmp_path, capsys):
    out = tmp_path / "seg.nii.gz"
    status = cli.main(["segment", "--model", str(trained_model), *held_out_inputs(cohort),
                       "--out", str(out), "--probabilities", str(tmp_path / "probs")])
    assert status == 0
    prediction = nib.load(out)
    truth = nib.load(cohort / "held_out" / "lesion.nii.gz")
    np.testing.assert_array_equal(prediction.affine, truth.affine)
    assert prediction.get_data_dtype() == np.uint8
    scores = metrics.segmentation_metrics(np.asarray(prediction.dataobj), np.asarray(truth.dataobj))
    # The trivial baseline (every candidate a lesion, or nothing) scores far lower.
    assert scores["dsc"] > 0.5, scores
    stage1 = np.asarray(nib.load(tmp_path / "probs" / "stage1.nii.gz").dataobj)
    stage2 = np.asarray(nib.load(tmp_path / "probs" / "stage2.nii.gz").dataobj)
    assert stage1.dtype == np.float32 and stage1.max() <= 1 and stage1.min() >= 0
    # Stage 2 runs only where stage 1 is confident: zero elsewhere.
    assert not stage2[stage1 <= 0.8].any()
    assert ((stage2 > 0) <= (stage1 > 0.8)).all()

    capsys.readouterr()
    assert cli.main(["evaluate", "--pred", str(out), "--truth", str(cohort / "held_out" / "lesion.nii.gz"),
                     "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["dsc"] == pytest.approx(scores["dsc"])


def test_thresholds_from_the_command_line(trained_model, cohort, tmp_path):
    strict, loose = tmp_path / "strict.nii.gz", tmp_path / "loose.nii.gz"
    assert cli.main(["segment", "--model", str(trained_model), *held_out_inputs(cohort), "--out", str(strict),
                     "--threshold", "0.99", "--min-lesion-voxels", "40"]) == 0
    assert cli.main(["segment", "--model", str(trained_model), *held_out_inputs(cohort), "--out", str(loose),
                     "--threshold", "0.5", "--min-lesion-size", "0"]) == 0
    assert np.asarray(nib.load(strict).dataobj).sum() < np.asarray(nib.load(loose).dataobj).sum()


def test_rerun_skips_finished_stages(trained_model, cohort, capsys):
    before = {p: p.stat().st_mtime_ns for p in (trained_model / "weights").rglob("*") if p.is_file()}
    status = cli.main(["train", "--data", str(cohort / "train"), "--workdir", str(trained_model),
                       "--config", "demo", *QUICK_OVERRIDES])
    assert status == 0
    out = capsys.readouterr().out
    assert "stage 1: already trained" in out and "stage 2: already trained" in out
    after = {p: p.stat().st_mtime_ns for p in (trained_model / "weights").rglob("*") if p.is_file()}
    assert before == after


def test_workdir_written_before_a_setting_existed_still_resumes(trained_model, cohort, tmp_path, capsys):
    """A setting added to the defaults later (here inference.tta) takes its default, as when a model is read."""
    import shutil

    older = tmp_path / "older"
    shutil.copytree(trained_model, older)
    record = json.loads((older / "config.json").read_text())
    del record["inference"]["tta"]
    (older / "config.json").write_text(json.dumps(record))
    assert cli.main(["train", "--data", str(cohort / "train"), "--workdir", str(older), "--config", "demo",
                     *QUICK_OVERRIDES]) == 0
    assert "stage 2: already trained" in capsys.readouterr().out


def test_workdir_with_another_config_is_refused(trained_model, cohort, capsys):
    status = cli.main(["train", "--data", str(cohort / "train"), "--workdir", str(trained_model),
                       "--config", "demo", "--config.train.max_epochs=9"])
    assert status == 2
    err = capsys.readouterr().err
    assert "train.max_epochs" in err and len(err.strip().splitlines()) == 1


def test_bfloat16_segmentation_stays_within_a_hundredth_of_float32(trained_model, cohort, tmp_path):
    """`segment --compute-dtype bfloat16`: bfloat16 products, float32 sums; the result barely moves."""
    truth = np.asarray(nib.load(cohort / "held_out" / "lesion.nii.gz").dataobj)
    maps, dsc = {}, {}
    for dtype in ("float32", "bfloat16"):
        out = tmp_path / dtype
        out.mkdir()
        assert cli.main(["segment", "--model", str(trained_model), *held_out_inputs(cohort), "--out",
                         str(out / "seg.nii.gz"), "--probabilities", str(out), "--compute-dtype", dtype]) == 0
        maps[dtype] = np.asarray(nib.load(out / "stage1.nii.gz").dataobj)
        dsc[dtype] = metrics.segmentation_metrics(np.asarray(nib.load(out / "seg.nii.gz").dataobj), truth)["dsc"]
    difference = np.abs(maps["bfloat16"] - maps["float32"])
    assert 0 < difference.max() < 0.05, difference.max()  # it did compute in bfloat16, and closely
    assert abs(dsc["bfloat16"] - dsc["float32"]) <= 0.01, dsc


def test_weights_that_do_not_fit_the_network_are_one_line_naming_the_file(trained_model, cohort, tmp_path, capsys):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(trained_model, model)
    stored = weights.load(model, 1)
    stored["params"]["conv1"]["kernel"] = stored["params"]["conv1"]["kernel"][..., :3]  # a narrower layer
    weights.save(model, 1, stored)
    subject = cohort / "held_out"
    status = cli.main(["segment", "--model", str(model), "--input", f"T1={subject / 'T1.nii.gz'}",
                       "--input", f"FLAIR={subject / 'FLAIR.nii.gz'}", "--out", str(tmp_path / "seg.nii.gz")])
    error = capsys.readouterr().err.strip()
    assert status == 2 and "\n" not in error and "stage1.npz" in error and "conv1/kernel" in error
    assert not (tmp_path / "seg.nii.gz").exists()
    assert np.asarray(weights.load(trained_model, 1)["params"]["conv1"]["kernel"]).shape[-1] > 3
