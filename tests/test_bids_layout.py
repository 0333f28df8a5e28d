"""BIDS datasets as they really arrive, read by `bids_layout` and segmented as a study.

The layouts follow the public BIDS example datasets (bids-standard/bids-examples; file layouts only, no
file of theirs is copied: trees are generated here with phantom images):
- raw datasets with no derivatives/ (ds001, ds051, 7t_trt): most scanner exports and public datasets;
- derivatives of other pipelines: ds000117 and ds000248 keep derivatives/freesurfer/ without a
  dataset_description.json, eeg_rest_fmri keeps derivatives/sub-XX/ with no pipeline folder at all;
- several images of one suffix: ds051 and ds052 have sub-01_run-01_T1w and sub-01_run-02_T1w (zero-padded
  runs), ds004332 has T1w images differing in acq- and rec- (and carrying a task- entity), ds000117 an
  acq-mprage T1w beside echo- runs of another suffix;
- sessions: 7t_trt and synthetic have ses-1/ses-2 (ses-01/ses-02) in every participant; the specification
  allows sessions in some participants only, generated here too;
- uncompressed .nii (ds004332) beside .nii.gz; JSON sidecars beside every image; participants.tsv;
- DataLad / git-annex trees, whose files are symbolic links into .git/annex/objects (broken where the
  content was never fetched), as datasets installed with `datalad install` arrive.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from jaxcascade.data import bids_layout
from jaxcascade import cli, phantom
from jaxcascade.errors import UserError
from conftest import read_csv

MODALITIES = ("T1", "FLAIR")
SUFFIXES = bids_layout.DEFAULT_SUFFIXES


@pytest.fixture(scope="module")
def phantom_bids(tmp_path_factory):
    """A two-subject phantom BIDS dataset with lesion-mask derivatives, written once."""
    root = tmp_path_factory.mktemp("bids") / "ds"
    phantom.write_cohort(root, 2, seed=9, size="tiny", layout="bids")
    return root


def _copy(source: Path, target: Path) -> Path:
    shutil.copytree(source, target, symlinks=True)
    return target


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("jaxcascade: error: ") and "Traceback" not in err, err
    return lines[0]


def test_a_raw_dataset_without_derivatives_is_segmented(trained_model, phantom_bids, tmp_path, capsys):
    raw = _copy(phantom_bids, tmp_path / "raw")
    shutil.rmtree(raw / "derivatives")
    out = tmp_path / "out"
    assert cli.main(["segment", "--model", str(trained_model), "--data", str(raw), "--out-dir", str(out)]) == 0
    rows = read_csv(out / "lesions.csv")
    assert [(r["participant_id"], r["session_id"], r["status"]) for r in rows] == [
        ("sub-01", "ses-1", "ok"), ("sub-02", "ses-1", "ok")]
    assert all(r["dsc"] == "" for r in rows)  # nothing to score against
    assert (out / "sub-01" / "ses-1" / "anat" / "sub-01_ses-1_desc-lesion_mask.nii.gz").is_file()
    # Training needs lesion masks: one line saying where they go.
    status = cli.main(["train", "--data", str(raw), "--workdir", str(tmp_path / "wd"), "--config", "demo"])
    assert status == 2 and "no session has a lesion mask" in _one_line_error(capsys)


def test_other_pipelines_derivatives_are_ignored_and_lesion_masks_found_in_any_pipeline(phantom_bids, tmp_path):
    ds = _copy(phantom_bids, tmp_path / "ds")
    (ds / "derivatives" / "lesion_masks").rename(ds / "derivatives" / "manual")  # any pipeline name
    (ds / "derivatives" / "manual" / "dataset_description.json").unlink()  # and no description
    fmriprep = ds / "derivatives" / "fmriprep" / "sub-01" / "ses-1" / "anat"
    fmriprep.mkdir(parents=True)
    for name in ("sub-01_ses-1_desc-preproc_T1w.nii.gz", "sub-01_ses-1_desc-brain_mask.nii.gz",
                 "sub-01_ses-1_space-MNI152NLin2009cAsym_label-lesion_mask.nii.gz", "sub-01_ses-1_dseg.tsv"):
        shutil.copy(ds / "sub-01" / "ses-1" / "anat" / "sub-01_ses-1_T1w.nii.gz", fmriprep / name)
    (ds / "derivatives" / "freesurfer" / "sub-01" / "mri").mkdir(parents=True)
    entries = bids_layout.sessions(ds, MODALITIES, SUFFIXES)
    assert [e["problem"] for e in entries] == [None, None]
    assert entries[0]["truth"].parent.parts[-5:] == ("derivatives", "manual", "sub-01", "ses-1", "anat")
    assert entries[0]["brain_mask"].name == "sub-01_ses-1_desc-brain_mask.nii.gz"  # a native-space mask
    assert entries[0]["lesion_masks"] == [entries[0]["truth"]]  # the MNI-space one is skipped
    assert entries[1]["brain_mask"] is None


def test_several_runs_take_the_last_with_a_note_and_other_entities_ask_for_a_filter(phantom_bids, tmp_path,
                                                                                   trained_model, capsys):
    ds = _copy(phantom_bids, tmp_path / "ds")
    anat1, anat2 = (ds / f"sub-0{i}" / "ses-1" / "anat" for i in (1, 2))
    flair1 = anat1 / "sub-01_ses-1_FLAIR.nii.gz"
    flair1.rename(anat1 / "sub-01_ses-1_run-1_FLAIR.nii.gz")
    shutil.copy(anat1 / "sub-01_ses-1_run-1_FLAIR.nii.gz", anat1 / "sub-01_ses-1_run-2_FLAIR.nii.gz")
    shutil.copy(anat2 / "sub-02_ses-1_FLAIR.nii.gz", anat2 / "sub-02_ses-1_acq-3d_FLAIR.nii.gz")
    (anat2 / "sub-02_ses-1_FLAIR.nii.gz").rename(anat2 / "sub-02_ses-1_acq-2d_FLAIR.nii.gz")
    notes = []
    entries = bids_layout.sessions(ds, MODALITIES, SUFFIXES, log=notes.append)
    assert entries[0]["inputs"]["FLAIR"].name == "sub-01_ses-1_run-2_FLAIR.nii.gz" and entries[0]["problem"] is None
    assert notes == ["sub-01 ses-1: 2 runs of *_FLAIR; using the last, sub-01_ses-1_run-2_FLAIR.nii.gz "
                     "(choose with bids_filters=['FLAIR:run=N'])"]
    assert entries[1]["problem"] == ("2 *_FLAIR images differ in acq (sub-02_ses-1_acq-2d_FLAIR.nii.gz, "
                                     "sub-02_ses-1_acq-3d_FLAIR.nii.gz); choose one with bids_filters=['FLAIR:acq=VALUE']")
    chosen = bids_layout.sessions(ds, MODALITIES, SUFFIXES, filters=["FLAIR:acq=3d", "FLAIR:run=1"])
    # Each filter chooses where several images carry its entity: acq among sub-02's, run among sub-01's.
    assert [e["inputs"]["FLAIR"].name for e in chosen] == ["sub-01_ses-1_run-1_FLAIR.nii.gz",
                                                           "sub-02_ses-1_acq-3d_FLAIR.nii.gz"]
    wrong = bids_layout.sessions(ds, MODALITIES, SUFFIXES, filters=["acq=5d"])
    assert wrong[0]["inputs"]["FLAIR"].name == "sub-01_ses-1_run-2_FLAIR.nii.gz"  # no acq there
    assert wrong[1]["problem"] == ("none of 2 *_FLAIR images has acq-5d (sub-02_ses-1_acq-2d_FLAIR.nii.gz, "
                                   "sub-02_ses-1_acq-3d_FLAIR.nii.gz); fix bids_filters=...")

    # Through the CLI: the note on stdout, the ambiguous session an error row with its name once.
    out = tmp_path / "out"
    assert cli.main(["segment", "--model", str(trained_model), "--data", str(ds), "--out-dir", str(out)]) == 1
    printed = capsys.readouterr().out
    assert "using the last, sub-01_ses-1_run-2_FLAIR.nii.gz" in printed
    assert printed.count("sub-02 ses-1: ") == 1 and "sub-02 ses-1: sub-02" not in printed
    rows = read_csv(out / "lesions.csv")
    assert rows[0]["status"] == "ok" and rows[1]["status"].startswith("error: 2 *_FLAIR images differ in acq")
    assert cli.main(["segment", "--model", str(trained_model), "--data", str(ds), "--out-dir", str(out),
                     "--bids-filter", "FLAIR:acq=3d", "--participant-label", "02"]) == 0
    # sub-02 redone with the filter; sub-01's row, from its report, stays in the table.
    assert [(r["participant_id"], r["status"]) for r in read_csv(out / "lesions.csv")] == [("sub-01", "ok"),
                                                                                           ("sub-02", "ok")]


def test_sessions_in_some_participants_nii_symlinks_and_participants_tsv(phantom_bids, tmp_path):
    ds = tmp_path / "annexed"
    annex = ds / ".git" / "annex" / "objects"
    annex.mkdir(parents=True)
    shutil.copy(phantom_bids / "dataset_description.json", ds)
    source = phantom_bids / "sub-01" / "ses-1" / "anat"
    # sub-01: two sessions, files as DataLad symlinks into the annex; sub-02: no sessions, plain .nii files.
    for session in ("ses-1", "ses-2"):
        anat = ds / "sub-01" / session / "anat"
        anat.mkdir(parents=True)
        for suffix in ("T1w", "FLAIR"):
            content = annex / f"{session}-{suffix}.nii.gz"
            shutil.copy(source / f"sub-01_ses-1_{suffix}.nii.gz", content)
            os.symlink(os.path.relpath(content, anat), anat / f"sub-01_{session}_{suffix}.nii.gz")
    (annex / "ses-2-FLAIR.nii.gz").unlink()  # content never fetched: a broken link
    anat = ds / "sub-02" / "anat"
    anat.mkdir(parents=True)
    import nibabel as nib

    for suffix in ("T1w", "FLAIR"):
        nib.save(nib.load(source / f"sub-01_ses-1_{suffix}.nii.gz"), anat / f"sub-02_{suffix}.nii")
        (anat / f"sub-02_{suffix}.json").write_text("{}")  # sidecars are not images
    (ds / "participants.tsv").write_text("participant_id\tage\nsub-01\t31\nsub-02\t42\nsub-03\t29\n")
    # ds051-style zero-padded T1w runs and a ds004332-style task- entity on sub-02's FLAIR; a lesion mask
    # kept in derivatives/sub-02/anat with no pipeline folder (as eeg_rest_fmri keeps its derivatives).
    (anat / "sub-02_T1w.nii").rename(anat / "sub-02_run-01_T1w.nii")
    shutil.copy(anat / "sub-02_run-01_T1w.nii", anat / "sub-02_run-02_T1w.nii")
    (anat / "sub-02_FLAIR.nii").rename(anat / "sub-02_task-rest_FLAIR.nii")
    (ds / "derivatives" / "sub-02" / "anat").mkdir(parents=True)
    shutil.copy(anat / "sub-02_run-01_T1w.nii", ds / "derivatives" / "sub-02" / "anat" / "sub-02_label-lesion_mask.nii")
    notes = []
    entries = bids_layout.sessions(ds, MODALITIES, SUFFIXES, log=notes.append)
    assert [(e["participant_id"], e["session_id"]) for e in entries] == [
        ("sub-01", "ses-1"), ("sub-01", "ses-2"), ("sub-02", "")]
    assert entries[0]["problem"] is None and entries[0]["inputs"]["FLAIR"].is_symlink()
    assert entries[1]["problem"].startswith("sub-01_ses-2_FLAIR.nii.gz is a broken symbolic link")
    assert entries[2]["problem"] is None and entries[2]["inputs"]["T1"].name == "sub-02_run-02_T1w.nii"
    assert entries[2]["inputs"]["FLAIR"].name == "sub-02_task-rest_FLAIR.nii"
    assert entries[2]["truth"].name == "sub-02_label-lesion_mask.nii"
    assert notes == [f"{ds}: participants.tsv lists sub-03 without a folder; skipped",
                     "sub-02: 2 runs of *_T1w; using the last, sub-02_run-02_T1w.nii (choose with bids_filters=['T1:run=N'])"]
    only = bids_layout.sessions(ds, MODALITIES, SUFFIXES, participants=bids_layout.participant_labels(["sub-02"]))
    assert [e["participant_id"] for e in only] == ["sub-02"]
    with pytest.raises(UserError, match=r"no participant sub-07 \(the dataset has sub-01, sub-02\)"):
        bids_layout.sessions(ds, MODALITIES, SUFFIXES, participants=["07"])


def test_participant_label_and_filter_mistakes_are_one_line(trained_model, phantom_bids, tmp_path, capsys):
    base = ["segment", "--model", str(trained_model), "--data", str(phantom_bids), "--out-dir", str(tmp_path / "o")]
    assert cli.main([*base, "--participant-label", "sub-09"]) == 2
    assert "no participant sub-09" in _one_line_error(capsys)
    assert cli.main([*base, "--bids-filter", "FLAIR:acq"]) == 2
    assert "--bids-filter FLAIR:acq: expected [MODALITY:]ENTITY=VALUE" in _one_line_error(capsys)
    assert cli.main([*base, "--participant-label", "0/1"]) == 2
    assert "--participant-label 0/1: a participant label is letters and digits" in _one_line_error(capsys)
    assert not (tmp_path / "o").exists()
    assert bids_layout.participant_labels(["01", "sub-02", "03,04"]) == ["01", "02", "03", "04"]


# --- the class of layouts, generated -------------------------------------------------------------------

ENTITY_VALUES = {"run": ("1", "2", "3"), "acq": ("2d", "3d"), "rec": ("norm",), "ce": ("gd",)}
_file = st.fixed_dictionaries({
    "entities": st.dictionaries(st.sampled_from(sorted(ENTITY_VALUES)), st.sampled_from(("1", "2", "3d")),
                                max_size=2),
    "extension": st.sampled_from((".nii.gz", ".nii")),
    "kind": st.sampled_from(("file", "file", "file", "symlink", "broken")),
})
_session = st.fixed_dictionaries({"T1w": st.lists(_file, max_size=3), "FLAIR": st.lists(_file, max_size=3),
                                  "junk": st.booleans()})
_subject = st.fixed_dictionaries({"sessions": st.one_of(st.just([]), st.lists(st.integers(1, 3), min_size=1,
                                                                               max_size=2, unique=True)),
                                  "content": st.lists(_session, min_size=3, max_size=3)})


def _name(subject, session, entities, suffix, extension):
    parts = [f"sub-{subject}"] + ([f"ses-{session}"] if session else [])
    parts += [f"{key}-{entities[key]}" for key in ("acq", "ce", "rec", "run") if key in entities]
    return "_".join(parts + [suffix]) + extension


def _expected(files: list[tuple[dict, str, str]]):
    """(name or None, problem or None) for one modality's files [(entities, extension, kind)] by the rules."""
    if not files:
        return None, "no "
    names = {}
    for entities, extension, kind in files:
        names.setdefault(tuple(sorted(entities.items())), []).append((extension, kind))
    keys = {k for entities, _, _ in files for k in entities}
    differing = [k for k in sorted(keys) if len({e.get(k) for e, _, _ in files}) > 1]
    def run(f):
        return int(f[0].get("run", "")) if f[0].get("run", "").isdigit() else -1

    if len(files) == 1:
        chosen = files[0]
    elif differing == ["run"] and len({run(f) for f in files}) == len(files):
        chosen = max(files, key=run)
    else:
        return None, "differ"
    return chosen, None


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(subjects=st.lists(_subject, min_size=1, max_size=3))
def test_any_layout_gives_the_right_files_or_a_one_line_reason(subjects):
    """Generated trees (runs, acquisitions, sessions or none, .nii/.nii.gz, links, broken links, junk):
    every session is found, with exactly the file the rules choose, or a one-line problem; never an exception."""
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        (root / "dataset_description.json").write_text('{"Name": "x", "BIDSVersion": "1.9.0"}')
        (root / "blobs").mkdir()
        expected = {}
        for number, subject in enumerate(subjects, 1):
            label = f"{number:02d}"
            for position, session in enumerate(subject["sessions"] or [""]):
                session = str(session) if session != "" else ""
                anat = root / f"sub-{label}" / (f"ses-{session}" if session else "") / "anat"
                anat.mkdir(parents=True, exist_ok=True)
                content = subject["content"][position]
                if content["junk"]:
                    (anat / f"sub-{label}_T1w.json").write_text("{}")
                    (anat / "README").write_text("not an image")
                    (anat / f"sub-{label}_desc-bad name_T1w.nii.gz").write_bytes(b"")
                for suffix in ("T1w", "FLAIR"):
                    files = []
                    for spec in content[suffix]:
                        name = _name(label, session, spec["entities"], suffix, spec["extension"])
                        if (anat / name).exists() or (anat / name).is_symlink():
                            continue
                        blob = root / "blobs" / name
                        if spec["kind"] == "file":
                            (anat / name).write_bytes(b"nifti")
                        else:
                            if spec["kind"] == "symlink":
                                blob.write_bytes(b"nifti")
                            os.symlink(blob, anat / name)
                        files.append((spec["entities"], spec["extension"], spec["kind"], name))
                    expected[(f"sub-{label}", f"ses-{session}" if session else "", suffix)] = files
        entries = bids_layout.sessions(root, MODALITIES, SUFFIXES)
        found = {(e["participant_id"], e["session_id"]): e for e in entries}
        assert set(found) == {key[:2] for key in expected}
        for (participant, session, suffix), files in expected.items():
            entry = found[(participant, session)]
            modality = "T1" if suffix == "T1w" else "FLAIR"
            problem = entry["problem"]
            assert problem is None or ("\n" not in problem and not problem.startswith((f"{participant}:", f"{participant} ses-")))
            chosen, reason = _expected([(e, x, k) for e, x, k, _ in files])
            if reason is not None or chosen[2] == "broken":
                assert modality not in entry["inputs"] and problem is not None
                assert (f"*_{suffix}" in problem) or "broken symbolic link" in problem
            else:
                name = next(n for e, x, k, n in files if (e, x, k) == chosen)
                assert entry["inputs"][modality].name == name and entry["inputs"][modality].exists()
        if all(not e["problem"] for e in entries):
            assert all(set(e["inputs"]) == set(MODALITIES) for e in entries)
