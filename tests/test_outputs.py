"""Every way an output path can be wrong is refused before any work, in one line, leaving nothing behind.

The classes: an empty name; a trailing slash; no NIfTI extension (or only one); an existing file without
--overwrite; an existing folder where a file goes, or a file where a folder goes; a missing folder above
it; a file among the folders above it; an unwritable (read-only) folder; the output equal to an input;
--out colliding with a probability map or the maps' folder; a maps folder named like a NIfTI file; too
little free space. A property-based test drives the real command line over generated combinations.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import nibabel as nib
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from jaxcascade import cli

OUT_KINDS = ("new", "odd name", "existing file", "existing folder", "no extension", "only extension", "empty",
             "trailing slash", "missing folder", "file as folder", "an input", "in maps folder")
MAPS_KINDS = (None, "new", "existing empty", "existing with maps", "a file", "missing parent", "file as parent",
              "nifti name", "same as out")


def _snapshot(root: Path) -> dict:
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


def _out_path(kind: str, box: Path, inputs: dict) -> str:
    return {
        "new": str(box / "seg.nii.gz"),
        "odd name": str(box / "s p a c e é ü.nii"),
        "existing file": str(box / "existing.nii.gz"),
        "existing folder": str(box / "folder"),
        "no extension": str(box / "seg"),
        "only extension": str(box / ".nii.gz"),
        "empty": "",
        "trailing slash": str(box / "seg.nii.gz") + "/",
        "missing folder": str(box / "nowhere" / "seg.nii.gz"),
        "file as folder": str(box / "afile" / "seg.nii.gz"),
        "an input": inputs["FLAIR"],
        "in maps folder": str(box / "maps" / "stage1.nii.gz"),
    }[kind]


def _maps_path(kind, box: Path, out: str):
    if kind is None:
        return None
    return {
        "new": str(box / "maps"),
        "existing empty": str(box / "folder"),
        "existing with maps": str(box / "full"),
        "a file": str(box / "afile"),
        "missing parent": str(box / "nowhere" / "maps"),
        "file as parent": str(box / "afile" / "maps"),
        "nifti name": str(box / "maps.nii.gz"),
        "same as out": out,
    }[kind]


def _fine(out_kind, maps_kind, overwrite) -> bool:
    """The oracle: which combinations must succeed (all others must be refused)."""
    # "in maps folder" never works: without --probabilities its folder is missing, with it the names collide.
    out_ok = out_kind in ("new", "odd name") or out_kind == "existing file" and overwrite
    maps_ok = maps_kind in (None, "new", "existing empty") or maps_kind == "existing with maps" and overwrite
    return out_ok and maps_ok and maps_kind != "same as out"


@pytest.fixture(scope="module")
def subject(cohort):
    return {"T1": str(cohort / "held_out" / "T1.nii.gz"), "FLAIR": str(cohort / "held_out" / "FLAIR.nii.gz")}


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow])
@given(out_kind=st.sampled_from(OUT_KINDS), maps_kind=st.sampled_from(MAPS_KINDS), overwrite=st.booleans())
def test_every_output_path_either_works_or_is_one_line_before_any_work(trained_model, subject, capsys,
                                                                       out_kind, maps_kind, overwrite):
    with tempfile.TemporaryDirectory() as folder:
        box = Path(folder)
        (box / "folder").mkdir()
        (box / "full").mkdir()
        for name in ("stage1.nii.gz", "stage2.nii.gz"):
            (box / "full" / name).write_bytes(b"an earlier run's map")
        (box / "afile").write_text("a file, not a folder")
        (box / "existing.nii.gz").write_bytes(b"an earlier segmentation")
        inputs = dict(subject)
        if out_kind == "an input":  # a copy of the FLAIR, so the real input stays intact
            inputs["FLAIR"] = str(box / "flair_copy.nii.gz")
            (box / "flair_copy.nii.gz").write_bytes(Path(subject["FLAIR"]).read_bytes())
        out = _out_path(out_kind, box, inputs)
        maps = _maps_path(maps_kind, box, out)
        argv = ["segment", "--model", str(trained_model), "--input", f"T1={inputs['T1']}",
                "--input", f"FLAIR={inputs['FLAIR']}", "--out", out]
        argv += ["--probabilities", maps] if maps is not None else []
        argv += ["--overwrite"] if overwrite else []
        before = _snapshot(box)
        capsys.readouterr()
        status = cli.main(argv)
        captured = capsys.readouterr()
        assert not [p for p in box.rglob("*") if ".tmp-" in p.name]
        if status == 0:
            assert _fine(out_kind, maps_kind, overwrite), (out_kind, maps_kind, overwrite)
            assert nib.load(out).shape == nib.load(inputs["FLAIR"]).shape
            if maps is not None:
                assert nib.load(Path(maps) / "stage2.nii.gz").shape == nib.load(inputs["FLAIR"]).shape
            return
        assert status == 2 and not _fine(out_kind, maps_kind, overwrite), (out_kind, maps_kind, overwrite, captured)
        lines = captured.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("jaxcascade: error: "), captured.err
        assert "Traceback" not in captured.err + captured.out
        assert _snapshot(box) == before  # nothing written, nothing half-written, nothing created
        assert set(box.rglob("*")) == set(before) | {p for p in box.rglob("*") if p.is_dir()}


def _cli(*argv, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jaxcascade.cli", *argv], capture_output=True, text=True,
                          timeout=300, **kwargs)


def test_unwritable_folders_and_a_full_file_system_are_one_line_in_a_real_process(trained_model, subject,
                                                                                  tmp_path):
    """A read-only bind mount (root ignores permission bits) and a 300 kB tmpfs, in a user namespace."""
    ro, small = tmp_path / "ro", tmp_path / "small"
    ro.mkdir()
    small.mkdir()
    segment = (f"{sys.executable} -m jaxcascade.cli segment --model {trained_model} --input T1={subject['T1']} "
               f"--input FLAIR={subject['FLAIR']}")
    script = (f"mount --bind {ro} {ro} && mount -o remount,bind,ro {ro} && "
              f"mount -t tmpfs -o size=300k tmpfs {small} && head -c 250000 /dev/zero > {small}/filler && "
              f"{segment} --out {ro}/seg.nii.gz 2> {tmp_path}/ro.err; echo $? > {tmp_path}/ro.rc; "
              f"{segment} --out {small}/seg.nii.gz --probabilities {small}/maps 2> {tmp_path}/full.err; "
              f"echo $? > {tmp_path}/full.rc; ls -A {small} > {tmp_path}/full.ls")
    result = subprocess.run(["unshare", "-r", "-m", "sh", "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    for name, fragment in (("ro", "is not writable"), ("full", "MB free, the segmentation needs about")):
        err = (tmp_path / f"{name}.err").read_text()
        assert (tmp_path / f"{name}.rc").read_text().strip() == "2", err
        assert len(err.strip().splitlines()) == 1 and fragment in err and "Traceback" not in err, err
    assert (tmp_path / "full.ls").read_text().split() == ["filler"]
    assert list(ro.iterdir()) == []


@pytest.mark.parametrize("argv, fragment", [
    ([], "choose a command: phantom, train, segment"),
    (["phantom", "{afile}"], "exists and is a file"),
    (["phantom", "{afile}/cohort"], "is a file, not a folder"),
    (["train", "--data", "x", "--workdir", "{afile}"], "exists and is a file"),
    (["demo", "--workdir", "{missing}/demo"], "does not exist"),
    (["segment", "--model", "m", "--data", "d", "--out-dir", "{afile}"], "exists and is a file"),
    (["segment", "--model", "m", "--data", "{here}", "--out-dir", "{here}"], "is --data itself"),
])
def test_other_commands_refuse_their_output_paths_in_one_line(argv, fragment, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    argv = [a.format(afile=tmp_path / "afile", missing=tmp_path / "missing", here=tmp_path) for a in argv]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and fragment in err and not err.startswith("jaxcascade: error: jaxcascade")
    assert sorted(os.listdir(tmp_path)) == ["afile"]
