"""A study meets real faults: a full disk, a read-only output folder, kill -9, two processes on one folder,
files nibabel rejects in new ways. Each for real: a tmpfs in a user namespace, SIGKILL, subprocesses."""

from __future__ import annotations

import csv
import gzip
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from jaxcascade import cli

pytestmark = pytest.mark.slow  # see setup.cfg's markers

SUBJECTS = ("sub-01", "sub-02", "sub-03", "sub-04")


@pytest.fixture(scope="module")
def data(cohort, tmp_path_factory):
    """Four valid subjects (the cohort's training subjects), segmented by one model."""
    root = tmp_path_factory.mktemp("faults") / "data"
    shutil.copytree(cohort / "train", root)
    return root


@pytest.fixture(scope="module")
def uninterrupted(trained_model, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted") / "out"
    assert cli.main(["segment", "--model", str(trained_model), "--data", str(data), "--out-dir", str(out)]) == 0
    return out


def _table(path: Path) -> list[dict]:
    """A CSV's rows without the timing column, which differs between runs."""
    with open(path, newline="") as file:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(file)]


def _temporaries(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if ".tmp-" in p.name]


def _command(model, data, out) -> str:
    return f"{sys.executable} -m jaxcascade.cli segment --model {model} --data {data} --out-dir {out}"


def _in_namespace(script: str) -> subprocess.CompletedProcess:
    """Run a shell script as root of a new user and mount namespace: mounts without privileges, gone after."""
    return subprocess.run(["unshare", "-r", "-m", "sh", "-c", script], capture_output=True, text=True, timeout=300)


def test_a_full_disk_stops_with_one_line_keeps_finished_subjects_and_a_rerun_completes(
        trained_model, data, uninterrupted, tmp_path):
    """A 100 kB tmpfs holds about two tiny subjects' outputs (about 45 kB each): a genuine ENOSPC."""
    out, kept, final = tmp_path / "out", tmp_path / "kept", tmp_path / "final"
    out.mkdir()
    run = _command(trained_model, data, out)
    result = _in_namespace(
        f"mount -t tmpfs -o size=100k tmpfs {out} && {run} > {tmp_path}/first.out 2> {tmp_path}/first.err; "
        f"echo $? > {tmp_path}/first.rc; cp -a {out}/. {kept}/; mount -o remount,size=20m {out} && "
        f"{run} > {tmp_path}/second.out 2> {tmp_path}/second.err; echo $? > {tmp_path}/second.rc; "
        f"cp -a {out}/. {final}/")
    assert result.returncode == 0, result.stderr
    first_err = (tmp_path / "first.err").read_text()
    assert (tmp_path / "first.rc").read_text().strip() == "3", first_err
    lines = first_err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in first_err, first_err
    assert lines[0].startswith("jaxcascade: error: sub-0") and "no space left on device" in lines[0]
    assert "run the same command again" in lines[0]
    # What the full disk left: finished subjects whole, nothing half-written, no temporary file.
    finished = sorted(p.parent.name for p in kept.glob("*/*_desc-lesion_report.json"))
    assert 0 < len(finished) < len(SUBJECTS), finished
    assert lines[0].startswith(f"jaxcascade: error: {SUBJECTS[len(finished)]}: ")  # the subject being written
    for name in finished:
        mask = np.asarray(nib.load(kept / name / f"{name}_desc-lesion_mask.nii.gz").dataobj)
        expected = np.asarray(nib.load(uninterrupted / name / f"{name}_desc-lesion_mask.nii.gz").dataobj)
        np.testing.assert_array_equal(mask, expected)
    assert _temporaries(kept) == []
    # With space, the same command finishes the study: the same tables as a run that never stopped.
    assert (tmp_path / "second.rc").read_text().strip() == "0", (tmp_path / "second.err").read_text()
    assert f"{len(finished)} already done" in (tmp_path / "second.out").read_text()
    assert _table(final / "lesions.csv") == _table(uninterrupted / "lesions.csv")
    assert _table(final / "lesion_table.csv") == _table(uninterrupted / "lesion_table.csv")
    assert _temporaries(final) == []


def test_a_read_only_output_folder_is_one_line_before_any_subject(trained_model, data, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    result = _in_namespace(f"mount --bind {out} {out} && mount -o remount,bind,ro {out} && "
                           f"{_command(trained_model, data, out)}")
    lines = result.stderr.strip().splitlines()
    assert result.returncode in (2, 3) and len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert str(out) in lines[0] and ("not writable" in lines[0] or "read-only" in lines[0]), lines[0]
    assert list(out.iterdir()) == []


def test_a_subject_that_fails_in_any_way_is_an_error_row_and_the_study_goes_on(trained_model, data, tmp_path,
                                                                             capfd):
    """sub-02's FLAIR cut in half (truncated mid-copy); sub-03's with a data type code nibabel rejects
    (HeaderDataError, no UserError); sub-04's a directory where a file should be (IsADirectoryError)."""
    study = tmp_path / "data"
    shutil.copytree(data, study)
    flair = study / "sub-02" / "FLAIR.nii.gz"
    flair.write_bytes(flair.read_bytes()[: flair.stat().st_size // 2])
    raw = bytearray(gzip.decompress((study / "sub-03" / "FLAIR.nii.gz").read_bytes()))
    raw[70:72] = np.int16(1234).tobytes()  # datatype
    (study / "sub-03" / "FLAIR.nii.gz").write_bytes(gzip.compress(bytes(raw)))
    (study / "sub-04" / "T1.nii.gz").unlink()
    (study / "sub-04" / "T1.nii.gz").mkdir()
    out = tmp_path / "out"
    assert cli.main(["segment", "--model", str(trained_model), "--data", str(study), "--out-dir", str(out)]) == 1
    captured = capfd.readouterr()
    assert "Traceback" not in captured.out + captured.err
    assert "not attempting fix" not in captured.err  # nibabel's own lines: the row says it once
    rows = {row["participant_id"]: row["status"] for row in _table(out / "lesions.csv")}
    assert rows["sub-01"] == "ok"
    assert rows["sub-02"].startswith("error: ") and "truncated" in rows["sub-02"]
    assert rows["sub-03"].startswith("error: HeaderDataError: data code 1234 not recognized")
    assert rows["sub-03"].endswith("(details in logs/sub-03.log)")
    assert "Traceback (most recent call last)" in (out / "logs" / "sub-03.log").read_text()
    assert "4 subjects: 1 segmented, 0 already done, 3 failed" in captured.out
    for name in ("sub-02", "sub-03", "sub-04"):  # a failed subject leaves its error record only
        assert [p.name for p in (out / name).iterdir()] == [f"{name}_desc-lesion_error.json"]
    for name in ("sub-02", "sub-03", "sub-04"):  # one line each on the screen
        assert sum(line.startswith(f"{name}: ") for line in captured.out.splitlines()) == 1


def _wait_for(predicate, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_kill_9_at_any_moment_then_a_rerun_gives_the_uninterrupted_tables(trained_model, data, uninterrupted,
                                                                         tmp_path):
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "jaxcascade.cli", "segment", "--model", str(trained_model), "--data", str(data),
            "--out-dir", str(out)]
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    # Killed once the first subject is finished, in the middle of the study.
    assert _wait_for(lambda: (out / "sub-01" / "sub-01_desc-lesion_report.json").exists(), 120)
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL
    rerun = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert _table(out / "lesions.csv") == _table(uninterrupted / "lesions.csv")
    assert _table(out / "lesion_table.csv") == _table(uninterrupted / "lesion_table.csv")
    assert [p for p in _temporaries(out) if p.parent != out] == []


def test_what_a_killed_write_left_goes_when_its_subject_or_the_tables_are_written_again(trained_model, data,
                                                                                      uninterrupted, tmp_path):
    """kill -9 inside an atomic write leaves `.<name>.tmp-*` beside the file: of a subject's record, of the
    tables or of their record too (once seen in CI from the test above), and a rerun must not keep them."""
    out = tmp_path / "out"
    shutil.copytree(uninterrupted, out)
    (out / "sub-02" / "sub-02_desc-lesion_report.json").unlink()  # sub-02 was killed before its report
    left = [out / ".jaxcascade" / "sub-02" / ".sub-02.json.tmp-k1ll3d.json", out / ".lesions.csv.tmp-k1ll3d.csv",
            out / ".jaxcascade" / ".study.json.tmp-k1ll3d.json"]
    for path in left:
        path.write_text("{")
    assert cli.main(["segment", "--model", str(trained_model), "--data", str(data), "--out-dir", str(out)]) == 0
    assert [path for path in left if path.exists()] == []
    assert _table(out / "lesions.csv") == _table(uninterrupted / "lesions.csv")


def test_two_processes_on_one_folder_share_the_subjects_and_never_corrupt_a_file(trained_model, data,
                                                                                 uninterrupted, tmp_path):
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "jaxcascade.cli", "segment", "--model", str(trained_model), "--data", str(data),
            "--out-dir", str(out)]
    processes = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [process.communicate(timeout=300) for process in processes]
    assert [process.returncode for process in processes] == [0, 0], [err for _, err in outputs]
    # Every subject segmented by exactly one of them ("sub-0N: K lesions, ..." once in both logs together).
    logs = "".join(stdout for stdout, _ in outputs).splitlines()
    for name in SUBJECTS:
        assert sum(line.startswith(f"{name}: ") and " lesions, " in line for line in logs) == 1, logs
    assert _table(out / "lesions.csv") == _table(uninterrupted / "lesions.csv")
    for name in SUBJECTS:
        mask = np.asarray(nib.load(out / name / f"{name}_desc-lesion_mask.nii.gz").dataobj)
        expected = np.asarray(nib.load(uninterrupted / name / f"{name}_desc-lesion_mask.nii.gz").dataobj)
        np.testing.assert_array_equal(mask, expected)
    assert _temporaries(out) == []


def test_resampled_sequences_are_said_in_one_line_and_in_the_report(trained_model, data, tmp_path, capsys):
    """A T1 with a shifted field of view (another grid of the same space) is resampled onto the FLAIR's."""
    study = tmp_path / "data"
    shutil.copytree(data / "sub-01", study / "sub-01")
    t1 = nib.load(study / "sub-01" / "T1.nii.gz")
    shifted = t1.affine.copy()
    shifted[:3, 3] += shifted[:3, :3] @ np.array([2.0, 0.0, 0.0])  # two voxels along the first axis
    nib.save(nib.Nifti1Image(np.asarray(t1.dataobj)[2:], shifted, header=t1.header), study / "sub-01" / "T1.nii.gz")
    out = tmp_path / "out"
    assert cli.main(["segment", "--model", str(trained_model), "--data", str(study), "--out-dir", str(out)]) == 0
    row = _table(out / "lesions.csv")[0]
    assert row["resampled"].startswith("T1 resampled from 38x48x40 at 4x4x4 mm") and "onto the FLAIR grid" in row["resampled"]
    assert "T1 resampled from 38x48x40" in capsys.readouterr().out
    assert cli.main(["segment", "--model", str(trained_model), "--input", f"T1={study / 'sub-01' / 'T1.nii.gz'}",
                     "--input", f"FLAIR={study / 'sub-01' / 'FLAIR.nii.gz'}", "--out", str(tmp_path / "s.nii.gz")]) == 0
    err = capsys.readouterr().err
    assert "warning" in err and "T1 resampled from 38x48x40 at 4x4x4 mm" in err and len(err.strip().splitlines()) == 1
