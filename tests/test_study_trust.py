"""A study is trusted with folders that hold other tools' files and with results that may have gone stale:
it touches only the files it recorded as its own, redoes a subject whose model, settings or inputs
changed, reads a damaged report as "not done", and takes no option out of its range."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil

import nibabel as nib
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import jaxcascade
from jaxcascade import cli, phantom
from jaxcascade.errors import UserError
from jaxcascade.runtime import outputs
from conftest import held_out_inputs, read_csv

SUBJECTS = ("sub-01", "sub-02")


@pytest.fixture(scope="module")
def data(cohort, tmp_path_factory):
    """Two valid subjects of the tiny cohort (the training layout)."""
    root = tmp_path_factory.mktemp("trust") / "data"
    for name in SUBJECTS:
        shutil.copytree(cohort / "train" / name, root / name)
    return root


def _segment(model, data, out, *extra) -> int:
    return cli.main(["segment", "--model", str(model), "--data", str(data), "--out-dir", str(out), *extra])


def _summary(log: str) -> str:
    """The study's last line, from its subject count on: 'N subjects: a segmented, b already done, ...'."""
    line = [line for line in log.splitlines() if " subjects: " in line][-1]
    return line[line.index(" subjects: ") - 1:]


def _plant_nifti(path) -> bytes:
    """Another tool's mask (and its JSON sidecar) at path; returns the mask's bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.ones((4, 4, 4), np.uint8), np.eye(4)), path)
    path.with_name(path.name.replace(".nii.gz", ".json")).write_text('{"Type": "Brain"}\n')
    return path.read_bytes()


def _files(folder) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _truncate(path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


# Data loss: the study deletes and overwrites only the files it recorded as its own.

def test_a_failed_subject_removes_only_what_jaxcascade_wrote(trained_model, data, tmp_path, capsys):
    study = tmp_path / "data"
    shutil.copytree(data, study)
    _truncate(study / "sub-02" / "FLAIR.nii.gz")
    out = tmp_path / "out"
    planted = [out / "sub-02" / "sub-02_desc-brain_mask.nii.gz", out / "sub-01" / "sub-01_desc-brain_mask.nii.gz"]
    for path in planted:
        _plant_nifti(path)
    (out / "notes.txt").write_text("kept\n")
    foreign = _files(out)
    assert _segment(trained_model, study, out) == 1
    statuses = {row["participant_id"]: row["status"] for row in read_csv(out / "lesions.csv")}
    assert statuses["sub-01"] == "ok" and "truncated" in statuses["sub-02"]
    assert {name: content for name, content in _files(out).items() if name in foreign} == foreign
    # A rerun that fails again cleans up again: still only its own files.
    assert _segment(trained_model, study, out) == 1
    assert {name: content for name, content in _files(out).items() if name in foreign} == foreign


def test_an_out_dir_that_another_pipeline_describes_is_refused_in_one_line(trained_model, tmp_path, capsys):
    """The issue's case: `--out-dir ds/derivatives/masks`, a brain-masking tool's derivatives dataset."""
    source = tmp_path / "ds"
    phantom.write_cohort(source, 1, seed=3, size="tiny", layout="bids")
    _truncate(source / "sub-01" / "ses-1" / "anat" / "sub-01_ses-1_FLAIR.nii.gz")
    out = source / "derivatives" / "masks"
    out.mkdir(parents=True)
    (out / "dataset_description.json").write_text(json.dumps({
        "Name": "brain masks", "BIDSVersion": "1.9.0", "DatasetType": "derivative",
        "GeneratedBy": [{"Name": "brainmasker", "Version": "2.1"}]}))
    _plant_nifti(out / "sub-01" / "ses-1" / "anat" / "sub-01_ses-1_desc-brain_mask.nii.gz")
    before = _files(out)
    capsys.readouterr()
    assert _segment(trained_model, source, out) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert "dataset_description.json" in err and "brainmasker" in err and "--out-dir" in err
    assert _files(out) == before and sorted(p.name for p in out.iterdir()) == ["dataset_description.json", "sub-01"]


@pytest.mark.parametrize("content", [b"{not json", b'{"Name": "x"}', b"[]"])
def test_a_description_that_is_not_jaxcascade_s_is_never_overwritten(trained_model, data, tmp_path, content):
    out = tmp_path / "out"
    out.mkdir()
    (out / "dataset_description.json").write_bytes(content)
    assert _segment(trained_model, data, out) == 2  # a file that cannot be read may be anyone's
    assert (out / "dataset_description.json").read_bytes() == content and os.listdir(out) == [
        "dataset_description.json"]


def test_a_file_of_another_tool_at_an_output_name_is_never_replaced(trained_model, data, tmp_path, capsys):
    out = tmp_path / "out"
    picture = out / "sub-01" / "sub-01_desc-qc.png"
    picture.parent.mkdir(parents=True)
    picture.write_bytes(b"another tool's picture")
    capsys.readouterr()
    assert _segment(trained_model, data, out) == 1
    rows = {row["participant_id"]: row["status"] for row in read_csv(out / "lesions.csv")}
    assert rows["sub-02"] == "ok" and rows["sub-01"].startswith("error: ") and str(picture) in rows["sub-01"]
    assert "not written by jaxcascade" in rows["sub-01"]
    assert picture.read_bytes() == b"another tool's picture"
    assert not (out / "sub-01" / "sub-01_desc-lesion_mask.nii.gz").exists()
    # Moved away, the next run segments the subject.
    picture.unlink()
    assert _segment(trained_model, data, out) == 0
    assert "1 segmented, 1 already done, 0 failed" in _summary(capsys.readouterr().out)


def test_a_table_of_another_tool_is_refused_before_any_work(trained_model, data, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "lesions.csv").write_text("id,volume\n1,2\n")
    capsys.readouterr()
    assert _segment(trained_model, data, out) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "lesions.csv" in err and "not written by jaxcascade" in err
    assert (out / "lesions.csv").read_text() == "id,volume\n1,2\n" and sorted(os.listdir(out)) == ["lesions.csv"]


# Stale results: a rerun redoes a subject whose model, settings or inputs differ from its record.

@pytest.fixture
def finished(trained_model, data, tmp_path, capsys):
    """A study run to its end once; returns its out-dir."""
    out = tmp_path / "out"
    assert _segment(trained_model, data, out) == 0
    capsys.readouterr()
    return out


@pytest.mark.parametrize("extra", [["--tta"], ["--min-lesion-volume", "300"], ["--resample", "never"],
                                   ["--probabilities"]])
def test_a_rerun_with_other_settings_redoes_every_subject(trained_model, data, finished, capsys, extra):
    assert _segment(trained_model, data, finished, *extra) == 0
    assert _summary(capsys.readouterr().out).startswith("2 subjects: 2 segmented, 0 already done")
    assert _segment(trained_model, data, finished, *extra) == 0
    assert _summary(capsys.readouterr().out).startswith("2 subjects: 0 segmented, 2 already done")
    assert _segment(trained_model, data, finished) == 0  # and back
    assert _summary(capsys.readouterr().out).startswith("2 subjects: 2 segmented, 0 already done")


def test_a_rerun_with_another_model_redoes_every_subject(trained_model, data, finished, tmp_path, capsys):
    strict = tmp_path / "strict-model"
    shutil.copytree(trained_model, strict)
    config = json.loads((strict / "config.json").read_text())
    config["inference"]["threshold"] = 0.999
    (strict / "config.json").write_text(json.dumps(config))
    before = {row["participant_id"]: float(row["lesion_volume_ml"]) for row in read_csv(finished / "lesions.csv")}
    assert _segment(strict, data, finished) == 0
    assert _summary(capsys.readouterr().out).startswith("2 subjects: 2 segmented, 0 already done")
    after = {row["participant_id"]: float(row["lesion_volume_ml"]) for row in read_csv(finished / "lesions.csv")}
    assert all(after[name] <= before[name] for name in SUBJECTS) and after != before


def test_a_rerun_after_an_input_was_replaced_redoes_that_subject(trained_model, data, finished, tmp_path, capsys):
    study = tmp_path / "data"
    shutil.copytree(data, study)
    assert _segment(trained_model, study, finished) == 0  # the same files (copied): nothing to redo
    assert _summary(capsys.readouterr().out).startswith("2 subjects: 0 segmented, 2 already done")
    shutil.copy(study / "sub-01" / "FLAIR.nii.gz", study / "sub-02" / "FLAIR.nii.gz")
    assert _segment(trained_model, study, finished) == 0
    log = capsys.readouterr().out
    assert _summary(log).startswith("2 subjects: 1 segmented, 1 already done") and "sub-02: " in log


def test_a_rerun_of_some_participants_keeps_the_others_rows(trained_model, data, finished, capsys):
    rows = read_csv(finished / "lesions.csv")
    lesions = read_csv(finished / "lesion_table.csv")
    assert _segment(trained_model, data, finished, "--participant-label", "sub-02") == 0
    assert read_csv(finished / "lesions.csv") == rows and read_csv(finished / "lesion_table.csv") == lesions
    assert _segment(trained_model, data, finished, "--participant-label", "sub-02", "--tta") == 0
    now = read_csv(finished / "lesions.csv")
    assert [row["participant_id"] for row in now] == list(SUBJECTS) and now[0] == rows[0]
    assert [row for row in read_csv(finished / "lesion_table.csv") if row["participant_id"] == "sub-01"] == \
        [row for row in lesions if row["participant_id"] == "sub-01"]


# Damaged reports: what a lost node leaves is "not done", never a traceback.

@pytest.mark.parametrize("damage", [b"", b'{"row": {"status": "ok"', b"\x00" * 64, b"[]"],
                         ids=["zero-length", "cut-short", "zeros", "not-a-report"])
def test_a_damaged_report_means_not_done(trained_model, data, finished, capsys, damage):
    report = finished / "sub-01" / "sub-01_desc-lesion_report.json"
    report.write_bytes(damage)
    assert _segment(trained_model, data, finished) == 0  # a JSONDecodeError would fail here
    captured = capsys.readouterr()
    assert captured.err == ""
    assert _summary(captured.out).startswith("2 subjects: 1 segmented, 1 already done")
    assert json.loads(report.read_text())["row"]["status"] == "ok"


def test_reports_and_tables_reach_the_disk_before_they_are_renamed_into_place(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    outputs.write_json({"row": {}}, tmp_path / "report.json")
    outputs.write_text("a,b\n", tmp_path / "lesions.csv")
    assert [os.path.basename(path).startswith(".report.json.tmp-") for path in synced[:1]] == [True]
    assert str(tmp_path) in synced  # the folder too: the rename itself is durable
    assert sum(".lesions.csv.tmp-" in path for path in synced) == 1


# Option ranges: the parser refuses a value outside its range in one line; the Python API raises UserError.

@pytest.mark.parametrize("option, value", [("--threshold", "1.5"), ("--threshold", "-0.1"), ("--threshold", "nan"),
                                           ("--min-lesion-volume", "-5"), ("--min-lesion-voxels", "-1")])
def test_an_option_out_of_range_is_one_line(trained_model, cohort, tmp_path, capsys, option, value):
    out = tmp_path / "seg.nii.gz"
    assert cli.main(["segment", "--model", str(trained_model), *held_out_inputs(cohort), "--out", str(out),
                     option, value]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and option in err and value in err and "Traceback" not in err
    assert not out.exists()


def test_the_python_api_refuses_the_same_ranges(trained_model, cohort, data, tmp_path):
    inputs = {name: cohort / "held_out" / f"{name}.nii.gz" for name in ("T1", "FLAIR")}
    for options in ({"threshold": 1.5}, {"threshold": float("nan")}, {"min_lesion_voxels": -1},
                    {"min_lesion_volume_mm3": -5.0}):
        with pytest.raises(UserError, match="|".join(options)):
            jaxcascade.segment(trained_model, inputs, **options)
    with pytest.raises(UserError, match="min_lesion_volume_mm3"):
        jaxcascade.segment_study(trained_model, data, tmp_path / "out", min_lesion_volume_mm3=-5.0)
    assert not (tmp_path / "out").exists()


# Generated histories: reruns with other models and settings, participant subsets, inputs replaced, broken
# and restored, reports damaged. After every run the answer is the right one and nothing foreign is lost.

@pytest.fixture(scope="module")
def strict_model(trained_model, tmp_path_factory):
    """The trained model with another threshold: another model to the study, with another mask."""
    strict = tmp_path_factory.mktemp("strict") / "model"
    shutil.copytree(trained_model, strict)
    config = json.loads((strict / "config.json").read_text())
    config["inference"]["threshold"] = 0.999
    (strict / "config.json").write_text(json.dumps(config))
    return strict


_RUN = st.tuples(st.just("run"), st.fixed_dictionaries({
    "model": st.sampled_from(["trained", "strict"]),
    "min_lesion_volume": st.sampled_from([None, 300.0]),
    "probabilities": st.booleans(),
    "tta": st.sampled_from([False, False, True]),
    "participants": st.sampled_from([None, ("sub-01",), ("sub-02",)]),
}))
_CHANGE = st.tuples(st.sampled_from(["replace", "break", "restore", "empty-report", "cut-report"]),
                    st.sampled_from(SUBJECTS))
HISTORY_EXAMPLES = int(os.environ.get("HISTORY_EXAMPLES", 12))  # 60 pass in ~80 s on 2 cores


def _history_run(models, data, out, step) -> tuple[int, str]:
    argv = ["segment", "--model", str(models[step["model"]]), "--data", str(data), "--out-dir", str(out)]
    argv += ["--min-lesion-volume", str(step["min_lesion_volume"])] if step["min_lesion_volume"] else []
    argv += ["--probabilities"] * step["probabilities"] + ["--tta"] * step["tta"]
    argv += ["--participant-label", *step["participants"]] if step["participants"] else []
    with contextlib.redirect_stdout(io.StringIO()) as printed, contextlib.redirect_stderr(io.StringIO()) as err:
        status = cli.main(argv)
    assert "Traceback" not in err.getvalue(), err.getvalue()
    return status, printed.getvalue()


@settings(max_examples=HISTORY_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(history=st.lists(st.one_of(_RUN, _CHANGE), min_size=1, max_size=4).map(
    lambda steps: [*steps, ("run", {"model": "trained", "min_lesion_volume": None, "probabilities": False,
                                    "tta": False, "participants": None})]))
def test_a_generated_study_history_gives_the_right_answer_and_loses_nothing(trained_model, strict_model, data,
                                                                           tmp_path_factory, history):
    root = tmp_path_factory.mktemp("history")
    study, out = root / "data", root / "out"
    shutil.copytree(data, study)
    originals = {name: (study / name / "FLAIR.nii.gz").read_bytes() for name in SUBJECTS}
    models = {"trained": trained_model, "strict": strict_model}
    # Other tools' files, some at names beside the study's own.
    _plant_nifti(out / "sub-01" / "sub-01_desc-brain_mask.nii.gz")
    _plant_nifti(out / "sub-02" / "sub-02_desc-brain_mask.nii.gz")
    (out / "logs").mkdir()
    (out / "logs" / "other-tool.log").write_text("kept\n")
    (out / "notes.txt").write_text("kept\n")
    foreign = _files(out)

    # The model of the study: per subject, its FLAIR's content and version, whether it is broken, and
    # what its last outcome was made from (None: failed or never run) and whether that report is intact.
    content = {name: name for name in SUBJECTS}
    version = {name: 0 for name in SUBJECTS}
    broken = {name: False for name in SUBJECTS}
    made_of = {name: None for name in SUBJECTS}
    outcome = {name: None for name in SUBJECTS}
    masks = {}  # a subject's mask for (model, volume, tta, its FLAIR's content): the first run's
    for kind, detail in history:
        if kind == "run":
            selected = list(detail["participants"] or SUBJECTS)
            status, printed = _history_run(models, study, out, detail)
            expected = {"segmented": 0, "already done": 0, "failed": 0}
            for name in selected:
                key = (detail["model"], detail["min_lesion_volume"], detail["tta"], detail["probabilities"],
                       version[name])
                if broken[name]:
                    expected["failed"] += 1
                    made_of[name], outcome[name] = None, "error"
                elif made_of[name] == key and outcome[name] == "ok":
                    expected["already done"] += 1
                else:
                    expected["segmented"] += 1
                    made_of[name], outcome[name] = key, "ok"
            assert status == (1 if expected["failed"] else 0), printed
            assert _summary(printed).startswith(
                f"{len(selected)} subjects: {expected['segmented']} segmented, "
                f"{expected['already done']} already done, {expected['failed']} failed"), printed
        elif kind in ("replace", "restore", "break"):
            flair = study / detail / "FLAIR.nii.gz"
            if kind == "break":
                _truncate(flair)
            else:
                other = SUBJECTS[1 - SUBJECTS.index(detail)] if kind == "replace" else detail
                flair.write_bytes(originals[other])
                content[detail] = other
            broken[detail] = kind == "break"
            version[detail] += 1
            os.utime(flair, ns=(version[detail] * 10**9, version[detail] * 10**9))  # coarse clocks: a new mtime
        elif outcome[detail] == "ok":  # a damaged report (only where there is one)
            report = out / detail / f"{detail}_desc-lesion_report.json"
            report.write_bytes(b"" if kind == "empty-report" else report.read_bytes()[:40])
            outcome[detail] = "damaged"

        # Nothing foreign touched; after a run, every subject's files and row are those of its last outcome.
        assert {name: data for name, data in _files(out).items() if name in foreign} == foreign
        if kind != "run":
            continue
        rows = {row["participant_id"]: row for row in read_csv(out / "lesions.csv")}
        assert sorted(rows) == sorted(name for name in SUBJECTS if outcome[name] in ("ok", "error"))
        for name in SUBJECTS:
            own = {p.name for p in (out / name).iterdir()} - {p.rsplit("/", 1)[-1] for p in foreign}
            if outcome[name] == "error":
                assert rows[name]["status"].startswith("error: ") and own == {f"{name}_desc-lesion_error.json"}
            if outcome[name] != "ok":
                continue
            model, volume, tta, probabilities, _ = made_of[name]
            maps = ["stage1_probseg.nii.gz", "stage2_probseg.nii.gz"] + ["stage2std_probseg.nii.gz"] * tta
            assert rows[name]["status"] == "ok" and own == {f"{name}_desc-{desc}" for desc in [
                "lesion_mask.nii.gz", "qc.png", "lesion_report.json", *(maps if probabilities else [])]}
            mask = np.asarray(nib.load(out / name / f"{name}_desc-lesion_mask.nii.gz").dataobj)
            reference = masks.setdefault((name, model, volume, tta, content[name]), mask)
            np.testing.assert_array_equal(mask, reference)  # never a stale mask
