"""Real-world files that the phantoms never produce: headers that lie, backgrounds that are not quite 0, lesion
masks in another convention, long names, dangling links, BIDS datasets beyond anatomy. Each gets the right
answer or one line naming the file, and a study goes on past it."""

from __future__ import annotations

import gzip
import os
import io
import warnings

import nibabel as nib
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from jaxcascade.data import nifti
from jaxcascade.errors import UserError


def _lying_header(path, shape=(8000, 8000, 8000)) -> None:
    """A small gzip'ed image whose header claims `shape` voxels (what a damaged converter leaves)."""
    image = nib.Nifti1Image(np.random.default_rng(0).random((100, 100, 30)).astype(np.float32), np.eye(4))
    image.header.set_data_shape(shape)
    data = image.header.binaryblock + b"\0" * 4 + np.random.default_rng(0).bytes(1_200_000)
    path.write_bytes(gzip.compress(data, compresslevel=1))


def test_a_header_claiming_more_voxels_than_the_file_holds_is_one_line(tmp_path):
    path = tmp_path / "FLAIR.nii.gz"
    _lying_header(path)
    with pytest.raises(UserError) as caught:
        nifti.load_image(path)
    message = str(caught.value)
    assert message.startswith(str(path)) and "8000x8000x8000" in message and "\n" not in message
    raw = tmp_path / "T1.nii"
    nib.save(nib.Nifti1Image(np.ones((4, 4, 4), np.float32), np.eye(4)), raw)
    raw.write_bytes(raw.read_bytes()[:-40])  # a cut-short uncompressed file
    with pytest.raises(UserError, match="truncated"):
        nifti.load_image(raw)


def test_an_sform_that_disagrees_with_pixdim_is_taken_and_warned_about(tmp_path):
    path = tmp_path / "FLAIR.nii.gz"
    data = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6) + 1
    image = nib.Nifti1Image(data, np.diag([2.0, 2.0, 2.0, 1.0]))
    image.header.set_qform(None, code=0)
    image.header.set_zooms((1.0, 1.0, 1.0))  # pixdim 1 mm under a 2 mm sform
    nib.save(image, path)
    with pytest.warns(UserWarning, match="affine's is used") as caught:
        loaded = nifti.load_image(path)
    assert len(caught) == 1 and "\n" not in str(caught[0].message)
    assert loaded.voxel_volume_ml == pytest.approx(8e-3)
    assert loaded.nifti.header.get_zooms()[:3] == pytest.approx((2.0, 2.0, 2.0))


# Every datatype nibabel writes, intensities or not (complex, RGB and bool-like must be one line, never a crash).
DATATYPES = (np.uint8, np.int8, np.int16, np.uint16, np.int32, np.uint32, np.int64, np.float32, np.float64,
             np.complex64)


@st.composite
def headers(draw):
    shape = tuple(draw(st.lists(st.integers(1, 5), min_size=3, max_size=3)))
    if draw(st.booleans()):
        shape += (draw(st.sampled_from([1, 2])),)
    dtype = draw(st.sampled_from(DATATYPES))
    pixdim = draw(st.lists(st.sampled_from([0.0, -1.0, 0.5, 1.0, 1.2, 3.0]), min_size=3, max_size=3))
    sform = np.diag([*draw(st.lists(st.sampled_from([0.0, -2.0, 0.7, 1.0, 2.0]), min_size=3, max_size=3)), 1.0])
    if draw(st.booleans()):  # oblique
        angle = draw(st.floats(-0.5, 0.5))
        rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
        sform[:3, :3] = rotation @ sform[:3, :3]
    sform[:3, 3] = draw(st.lists(st.floats(-100, 100), min_size=3, max_size=3))
    return {"shape": shape, "dtype": dtype, "pixdim": pixdim, "sform": sform,
            "sform_code": draw(st.sampled_from([0, 1, 2, 4])), "qform_code": draw(st.sampled_from([0, 1, 2])),
            "slope": draw(st.sampled_from([np.nan, 0.0, 1.0, 2.5, -1.0, 1e-3, 1e30])),
            "inter": draw(st.sampled_from([0.0, -1024.0, 1e-6, 3.5])),
            "gz": draw(st.booleans()), "nifti2": draw(st.booleans()), "seed": draw(st.integers(0, 2**16)),
            # after writing, the header's first dimension is multiplied by this (a header that lies)
            "claim": draw(st.sampled_from([1, 1, 1, 2, 8000]))}


def _write(header: dict, path):
    rng = np.random.default_rng(header["seed"])
    dtype = np.dtype(header["dtype"])
    if dtype.kind in "fc":
        raw = rng.normal(100, 30, header["shape"]).astype(dtype)
    else:
        info = np.iinfo(dtype)
        raw = rng.integers(max(info.min, -1000), min(info.max, 1000), header["shape"], endpoint=True).astype(dtype)
    kind = nib.Nifti2Image if header["nifti2"] else nib.Nifti1Image
    image = kind(raw, None, dtype=dtype)
    image.header.set_sform(header["sform"], code=header["sform_code"])
    singular = abs(np.linalg.det(header["sform"][:3, :3])) < 1e-9  # a qform cannot hold it: its own rotation
    image.header.set_qform(np.eye(4) if singular else header["sform"], code=header["qform_code"])
    # pixdim as a converter may leave it, whatever the affine says (nibabel would write the affine's).
    image.header["pixdim"][1:4] = header["pixdim"]
    image.header["scl_slope"], image.header["scl_inter"] = header["slope"], header["inter"]
    nib.save(image, path)
    if header["claim"] != 1:
        _claim_more(path, header["claim"])
    return raw


def _claim_more(path, factor: int) -> None:
    """Rewrite the file's header so that it claims `factor` times the voxels along its first axis."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as file:
        content = file.read()
    stored = nib.load(str(path)).header
    lying = type(stored).from_fileobj(io.BytesIO(content))  # as on disk (a loaded image's header is not)
    lying["dim"][1] = min(int(lying["dim"][1]) * factor, 32767)  # an int16 field
    with opener(path, "wb") as file:
        file.write(lying.binaryblock + content[len(lying.binaryblock):])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(header=headers())
def test_generated_headers_give_the_right_image_or_one_line(header, tmp_path_factory):
    """Whatever the header: the data written (scaled as NIfTI says) on a voxel of |det(affine)|, or one
    UserError line naming the file."""
    path = tmp_path_factory.mktemp("header") / ("image.nii.gz" if header["gz"] else "image.nii")
    raw = _write(header, path)
    stored = nib.load(str(path))
    if header["claim"] != 1:
        with pytest.raises(UserError) as caught:
            nifti.load_image(path, allow_all_zero=True)
        assert str(caught.value).startswith(str(path)) and "\n" not in str(caught.value)
        return
    # The scaling the file holds, as NIfTI defines it (a slope of 0 or NaN: none), which nibabel keeps with the data.
    slope, inter = stored.dataobj.slope, stored.dataobj.inter
    expected = raw.real.astype(np.float64) * slope + inter
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            image = nifti.load_image(path, allow_all_zero=True)
        except UserError as error:
            message = str(error)
            assert message.startswith(str(path)) and "\n" not in message
            return
    for warning in caught:
        assert "\n" not in str(warning.message)
    assert np.dtype(header["dtype"]).kind != "c"  # a complex image is no intensity
    if expected.ndim == 4:
        assert expected.shape[3] == 1
        expected = expected[..., 0]
    assert np.allclose(image.to_file_grid(image.data), expected.astype(np.float32), rtol=1e-6, atol=1e-6)
    assert image.voxel_volume_ml * 1000 == pytest.approx(abs(np.linalg.det(stored.affine[:3, :3])), rel=1e-5)


@pytest.mark.parametrize("method", ["nonzero", "nicms", "percentile", "wm_peak"])
def test_a_background_that_is_not_quite_zero_gives_the_clean_images_candidates(cohort, tmp_path, method):
    """A skull-stripped FLAIR whose background is 1e-6, or int16 whose scl_slope/inter puts the stored 0 at
    -1024, is normalised (and selects candidates) as its clean twin with a background of exactly 0."""
    from jaxcascade.data.normalisation import candidate_mask, normalise_channels

    clean_file = nib.load(str(cohort / "held_out" / "FLAIR.nii.gz"))
    clean = np.asarray(clean_file.dataobj, np.float32)
    assert (clean == 0).mean() > 0.3  # a skull-stripped phantom
    offset = tmp_path / "offset.nii.gz"
    nib.save(nib.Nifti1Image(np.where(clean == 0, np.float32(1e-6), clean), clean_file.affine), offset)
    scaled = tmp_path / "scaled.nii.gz"
    stored = np.round(clean / clean.max() * 3000).astype(np.int16)
    image = nib.Nifti1Image(stored, clean_file.affine, dtype=np.int16)
    image.header.set_slope_inter(0.5, -1024.0)
    nib.save(image, scaled)
    twin = stored.astype(np.float32) * 0.5  # the same image with its background at 0

    def candidates(data):
        normalised = normalise_channels([data], method)[..., 0]
        return normalised, candidate_mask(normalised, 0.5)

    expected, expected_candidates = candidates(nifti.load_image(cohort / "held_out" / "FLAIR.nii.gz").data)
    got, got_candidates = candidates(nifti.load_image(offset).data)
    assert np.array_equal(got_candidates, expected_candidates) and np.allclose(got, expected, atol=1e-4)
    expected, expected_candidates = candidates(nifti.load_image(scaled).from_file_grid(twin))
    got, got_candidates = candidates(nifti.load_image(scaled).data)
    assert np.array_equal(got_candidates, expected_candidates) and np.allclose(got, expected, atol=1e-4)
    # Arrays given directly (the API) are treated the same way.
    got, got_candidates = candidates(np.where(clean == 0, np.float32(1e-6), clean))
    assert np.array_equal(got_candidates, candidates(clean)[1])


def _segment(model, data, out, *extra) -> int:
    from jaxcascade import cli

    return cli.main(["segment", "--model", str(model), "--data", str(data), "--out-dir", str(out), *extra])


def test_a_study_segments_every_subject_whatever_its_lesion_mask_or_header(trained_model, cohort, tmp_path):
    """Lesion masks of 0/255, labels 1/2, probabilities, on another grid or not fetched (DataLad) are scored as
    meant or left unscored with a note, never an error row; a FLAIR whose header lies is that subject's error
    row and the subjects after it still run; a background of 1e-6 gives the clean subject's lesions."""
    import shutil

    from conftest import read_csv

    source = cohort / "train" / "sub-01"
    lesion_file = nib.load(str(source / "lesion.nii.gz"))
    lesion = np.asarray(lesion_file.dataobj) > 0
    data = tmp_path / "data"
    names = ("a-clean", "b-255", "c-labels", "d-probabilities", "e-grid", "f-not-fetched", "g-lying", "h-offset")
    for name in names:
        shutil.copytree(source, data / name)

    def truth(name, values, affine=lesion_file.affine):
        (data / name / "lesion.nii.gz").unlink()
        nib.save(nib.Nifti1Image(values, affine), data / name / "lesion.nii.gz")

    truth("b-255", lesion.astype(np.uint8) * 255)
    labels = lesion.astype(np.uint8)
    labels[lesion & (np.indices(lesion.shape)[0] % 2 == 0)] = 2
    truth("c-labels", labels)
    truth("d-probabilities", np.where(lesion, 0.9, np.where(np.indices(lesion.shape)[1] % 3 == 0, 0.3, 0.0)))
    shifted = lesion_file.affine.copy()
    shifted[:3, 3] -= shifted[:3, :3] @ [2, 2, 2]  # the same space, two voxels more on every side
    truth("e-grid", np.pad(lesion.astype(np.uint8), 2), shifted)
    (data / "f-not-fetched" / "lesion.nii.gz").unlink()
    (data / "f-not-fetched" / "lesion.nii.gz").symlink_to("../.git/annex/objects/XX/SHA256E-s1--0.nii.gz")
    _lying_header(data / "g-lying" / "FLAIR.nii.gz")
    for sequence in ("T1", "FLAIR"):
        image = nib.load(str(source / f"{sequence}.nii.gz"))
        values = np.asarray(image.dataobj, np.float32)
        nib.save(nib.Nifti1Image(np.where(values == 0, np.float32(1e-6), values), image.affine),
                 data / "h-offset" / f"{sequence}.nii.gz")

    assert _segment(trained_model, data, tmp_path / "out") == 1  # one error row: the lying header's
    rows = {row["participant_id"]: row for row in read_csv(tmp_path / "out" / "lesions.csv")}
    assert list(rows) == list(names)
    assert rows["g-lying"]["status"].startswith("error: ") and "8000x8000x8000" in rows["g-lying"]["status"]
    ok = [name for name in names if name != "g-lying"]
    assert all(rows[name]["status"] == "ok" for name in ok)
    for name in ok:  # the same images: the same segmentation
        assert rows[name]["lesion_count"] == rows["a-clean"]["lesion_count"]
        assert rows[name]["lesion_volume_ml"] == rows["a-clean"]["lesion_volume_ml"]
    assert rows["a-clean"]["dsc"] != "" and rows["a-clean"]["scoring"] == ""
    for name in ("b-255", "c-labels", "d-probabilities", "e-grid"):  # the same truth, read as meant
        assert rows[name]["dsc"] == rows["a-clean"]["dsc"] and rows[name]["scoring"], name
    assert "0/255" in rows["b-255"]["scoring"] and "labels 0, 1, 2" in rows["c-labels"]["scoring"]
    assert "probabilities" in rows["d-probabilities"]["scoring"] and "nearest" in rows["e-grid"]["scoring"]
    assert rows["f-not-fetched"]["dsc"] == "" and "datalad get" in rows["f-not-fetched"]["scoring"]
    assert rows["f-not-fetched"]["scoring"].startswith("not scored: ")
    assert all(os.path.exists(tmp_path / "out" / name / f"{name}_desc-lesion_mask.nii.gz") for name in ok)


def test_names_too_long_for_a_file_system_are_shortened_with_a_hash(trained_model, cohort, tmp_path):
    """A 240-character subject folder: its outputs get a shortened name (start and hash), recorded in the
    report, and a rerun finds them done; a valid 220-character BIDS label likewise."""
    import json
    import shutil

    from conftest import read_csv

    from jaxcascade.runtime import outputs

    data = tmp_path / "data"
    long_name = "patient_" + "x" * 232
    shutil.copytree(cohort / "train" / "sub-01", data / long_name)
    out = tmp_path / "out"
    assert _segment(trained_model, data, out) == 0
    [row] = read_csv(out / "lesions.csv")
    assert row["participant_id"] == long_name and row["status"] == "ok"
    [report_path] = (out / long_name).glob("*_desc-lesion_report.json")
    report = json.loads(report_path.read_text())
    assert report["file_prefix"]["shortened_from"] == long_name
    assert report_path.name == f"{report['file_prefix']['used']}_desc-lesion_report.json"
    assert all(len(p.name.encode()) <= 255 for p in out.rglob("*"))
    assert (out / long_name / f"{report['file_prefix']['used']}_desc-lesion_mask.nii.gz").is_file()
    assert _segment(trained_model, data, out) == 0  # a rerun: already done
    # The same name always maps to the same prefix, and two long names that share a start to two.
    assert outputs.fitting_prefix(long_name, 30) == outputs.fitting_prefix(long_name, 30)
    assert outputs.fitting_prefix(long_name, 30) != outputs.fitting_prefix(long_name[:-1] + "y", 30)
    assert outputs.fitting_prefix("sub-01", 30) == "sub-01"
    # BIDS: sub-<220 characters>.
    bids = tmp_path / "bids"
    label = "a" * 220
    anat = bids / f"sub-{label}" / "anat"
    anat.mkdir(parents=True)
    (bids / "dataset_description.json").write_text('{"Name": "long", "BIDSVersion": "1.9.0"}')
    for sequence, suffix in (("T1", "T1w"), ("FLAIR", "FLAIR")):
        shutil.copy(cohort / "train" / "sub-01" / f"{sequence}.nii.gz", anat / f"sub-{label}_{suffix}.nii.gz")
    assert _segment(trained_model, bids, tmp_path / "bids-out") == 0
    [row] = read_csv(tmp_path / "bids-out" / "lesions.csv")
    assert row["participant_id"] == f"sub-{label}" and row["status"] == "ok"


@pytest.mark.parametrize("command", ["segment-dir", "probabilities", "train", "phantom"])
def test_a_dangling_symbolic_link_as_an_output_folder_is_one_line_before_any_work(command, cohort, tmp_path,
                                                                                  capsys):
    from jaxcascade import cli

    link = tmp_path / "gone"
    link.symlink_to(tmp_path / "nowhere")
    arguments = {
        "segment-dir": ["segment", "--model", "demo", "--data", str(cohort / "train"), "--out-dir", str(link)],
        "probabilities": ["segment", "--model", "demo", "--input", f"T1={cohort / 'held_out' / 'T1.nii.gz'}",
                          "--input", f"FLAIR={cohort / 'held_out' / 'FLAIR.nii.gz'}", "--out",
                          str(tmp_path / "seg.nii.gz"), "--probabilities", str(link)],
        "train": ["train", "--data", str(cohort / "train"), "--workdir", str(link)],
        "phantom": ["phantom", str(link), "--subjects", "1"],
    }[command]
    assert cli.main(arguments) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(link) in err and "does not exist" in err, err
    assert not (tmp_path / "nowhere").exists() and not (tmp_path / "seg.nii.gz").exists()


def test_xla_out_of_memory_stops_a_study_as_a_fault_of_the_machine(trained_model, cohort, tmp_path, monkeypatch,
                                                                    capsys):
    """XLA's RESOURCE_EXHAUSTED (a JaxRuntimeError, not a MemoryError) is the machine's fault: exit 3 and one
    line, not an error row for every subject."""
    import shutil

    import jax

    from jaxcascade.segmentation import study

    data = tmp_path / "data"
    for name in ("sub-01", "sub-02"):
        shutil.copytree(cohort / "train" / name, data / name)

    def exhausted(*args, **kwargs):
        raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1.2GiB.\n"
                                         "BufferAssignment OOM Debugging.")

    monkeypatch.setattr(study, "segment_images", exhausted)
    assert _segment(trained_model, data, tmp_path / "out") == 3
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "out of memory" in err and "RESOURCE_EXHAUSTED" in err, err
    assert not (tmp_path / "out" / "sub-02").exists()  # stopped at the first subject


def _bids(root, sessions: dict) -> None:
    """A BIDS dataset: {relative folder: [file names]} of empty stand-ins (only names are read here)."""
    root.mkdir(parents=True)
    (root / "dataset_description.json").write_text('{"Name": "test", "BIDSVersion": "1.9.0"}')
    for folder, names in sessions.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        for name in names:
            (root / folder / name).write_bytes(b"")


def test_bids_participants_without_anatomy_are_skipped_with_a_note(tmp_path):
    """sub-emptyroom (MEG only) and a session with func/ only are no error: skipped, each with a note."""
    from jaxcascade.data import bids_layout

    root = tmp_path / "ds"
    _bids(root, {"sub-01/anat": ["sub-01_T1w.nii.gz", "sub-01_FLAIR.nii.gz"],
                 "sub-emptyroom/ses-20200101/meg": ["sub-emptyroom_ses-20200101_task-noise_meg.fif"],
                 "sub-02/ses-1/anat": ["sub-02_ses-1_T1w.nii.gz", "sub-02_ses-1_FLAIR.nii.gz"],
                 "sub-02/ses-2/func": ["sub-02_ses-2_task-rest_bold.nii.gz"]})
    notes = []
    entries = bids_layout.sessions(root, ("T1", "FLAIR"), bids_layout.DEFAULT_SUFFIXES, log=notes.append)
    assert [(e["participant_id"], e["session_id"], e["problem"]) for e in entries] == [
        ("sub-01", "", None), ("sub-02", "ses-1", None)]
    assert notes == ["sub-02 ses-2: no anat/ folder (no anatomical images); skipped",
                     "sub-emptyroom ses-20200101: no anat/ folder (no anatomical images); skipped"]


def test_bids_filter_entity_none_picks_the_images_without_it(tmp_path):
    """fMRIPrep-style derivatives: space=none picks the native desc-preproc_T1w, not the MNI one."""
    from jaxcascade.data import bids_layout

    root = tmp_path / "fmriprep"
    _bids(root, {"sub-01/anat": ["sub-01_desc-preproc_T1w.nii.gz",
                                 "sub-01_space-MNI152NLin2009cAsym_desc-preproc_T1w.nii.gz",
                                 "sub-01_FLAIR.nii.gz"]})
    [entry] = bids_layout.sessions(root, ("T1", "FLAIR"), bids_layout.DEFAULT_SUFFIXES, filters=["space=none"])
    assert entry["problem"] is None and entry["inputs"]["T1"].name == "sub-01_desc-preproc_T1w.nii.gz"
    [entry] = bids_layout.sessions(root, ("T1", "FLAIR"), bids_layout.DEFAULT_SUFFIXES, filters=["T1:space=none"])
    assert entry["inputs"]["T1"].name == "sub-01_desc-preproc_T1w.nii.gz"
    [entry] = bids_layout.sessions(root, ("T1", "FLAIR"), bids_layout.DEFAULT_SUFFIXES, filters=["desc=none"])
    assert entry["problem"].startswith("none of 2 *_T1w images has no desc-")


def test_a_participants_tsv_with_a_byte_order_mark_is_read(tmp_path):
    from jaxcascade.data import bids_layout

    root = tmp_path / "ds"
    _bids(root, {"sub-01/anat": ["sub-01_T1w.nii.gz", "sub-01_FLAIR.nii.gz"]})
    (root / "participants.tsv").write_bytes("participant_id\tage\nsub-01\t31\nsub-02\t40\n".encode("utf-8-sig"))
    notes = []
    bids_layout.sessions(root, ("T1", "FLAIR"), bids_layout.DEFAULT_SUFFIXES, log=notes.append)
    assert notes == [f"{root}: participants.tsv lists sub-02 without a folder; skipped"]


def test_participant_label_names_a_training_layout_folder(cohort, tmp_path, capsys):
    """--participant-label patient_01 picks that folder of a training layout; in BIDS, one line."""
    import shutil

    from jaxcascade import cli
    from jaxcascade.configs import default
    from jaxcascade.data import bids_layout
    from jaxcascade.segmentation import study

    data = tmp_path / "data"
    for name in ("patient_01", "patient_02"):
        shutil.copytree(cohort / "train" / "sub-01", data / name)
    labels = bids_layout.participant_labels(["patient_01"])
    assert [s.participant_id for s in study.study_subjects(data, default.get_config(), participants=labels)] == [
        "patient_01"]
    root = tmp_path / "ds"
    _bids(root, {"sub-01/anat": ["sub-01_T1w.nii.gz", "sub-01_FLAIR.nii.gz"]})
    with pytest.raises(UserError, match="a BIDS participant label is letters and digits"):
        study.study_subjects(root, default.get_config(), participants=labels)
    # The command line takes it too (it fails later, on the model, not on the label).
    assert cli.main(["segment", "--model", str(tmp_path / "no-model"), "--data", str(data), "--out-dir",
                     str(tmp_path / "out"), "--participant-label", "patient_01"]) == 2
    assert "model directory not found" in capsys.readouterr().err


@pytest.mark.parametrize("arguments", [["segment"], ["segment", "--input", "T1", "x"],
                                       ["segment", "--data", "d", "--out-dir", "o", "--threshold", "0.5"],
                                       ["segment", "--threshold", "1.5"], ["train"], ["phantom"]])
def test_a_command_that_fails_on_its_arguments_imports_nothing_heavy(arguments):
    """No jax, flax, nibabel, scipy or matplotlib before the arguments are checked (they take seconds)."""
    import json
    import subprocess
    import sys

    wrapper = ("import json, sys\nfrom jaxcascade import cli\ntry:\n    status = cli.main(sys.argv[1:])\n"
               "except SystemExit as stop:\n    status = stop.code\n"
               "heavy = [m for m in ('jax', 'flax', 'nibabel', 'scipy', 'matplotlib') if m in sys.modules]\n"
               "print(json.dumps({'status': status, 'heavy': heavy}))\n")
    result = subprocess.run([sys.executable, "-c", wrapper, *arguments], capture_output=True, text=True, timeout=120)
    outcome = json.loads(result.stdout.strip().splitlines()[-1])
    assert outcome == {"status": 2, "heavy": []}, result.stderr


def _load_outcome(path):
    """What load_image makes of a file: its data and affine, or its one-line error."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            image = nifti.load_image(path, allow_all_zero=True)
        except UserError as error:
            return str(error)
    return image.data, image.affine, image.voxel_volume_ml


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(header=headers(), cut=st.sampled_from([None, None, 0.3, 0.9]), replaced=st.booleans())
def test_inputs_inflated_in_the_background_read_as_the_file_itself(header, cut, replaced, tmp_path_factory):
    """The command line inflates inputs while JAX imports (`data/prefetch.py`): the image read from those
    bytes equals the file read directly — same data, affine and voxel size, or the same one-line error —
    for every generated header, for truncated files, and for a file replaced after the inflating began."""
    from jaxcascade.data import prefetch

    path = tmp_path_factory.mktemp("prefetch") / ("image.nii.gz" if header["gz"] else "image.nii")
    _write(header, path)
    if cut is not None:
        content = path.read_bytes()
        path.write_bytes(content[:max(1, int(len(content) * cut))])
    prefetch.start([path])
    if replaced:  # another file at the same path (a new inode) once the thread has read the old one
        if header["gz"]:
            prefetch._pending[os.path.abspath(path)][0].join()
        _write({**header, "seed": header["seed"] + 1, "claim": 1}, path.with_name("new" + path.name))
        os.replace(path.with_name("new" + path.name), path)
    through_prefetch = _load_outcome(path)
    directly = _load_outcome(path)
    assert type(through_prefetch) is type(directly)
    if isinstance(directly, str):
        assert through_prefetch == directly
    else:
        assert np.array_equal(through_prefetch[0], directly[0]) and through_prefetch[0].dtype == directly[0].dtype
        assert np.array_equal(through_prefetch[1], directly[1]) and through_prefetch[2] == directly[2]


def test_the_prefetch_is_used_and_forgotten_after_one_read(tmp_path):
    from jaxcascade.data import prefetch

    path = tmp_path / "flair.nii.gz"
    nib.save(nib.Nifti1Image(np.arange(60, dtype=np.float32).reshape(3, 4, 5) + 1, np.eye(4)), path)
    prefetch.forget()
    prefetch.start([path, tmp_path / "missing.nii.gz", tmp_path])
    assert list(prefetch._pending) == [str(path)]  # only existing .gz files
    assert nib.Nifti1Image.from_bytes(prefetch.take(path)).get_fdata().sum() == sum(range(1, 61))
    assert prefetch.take(path) is None and not prefetch._pending
    # A command that fails before reading its inputs keeps none of them in memory.
    from jaxcascade import cli

    assert cli.main(["segment", "--model", str(tmp_path / "no-model"), "--input", f"T1={path}",
                     "--input", f"FLAIR={path}", "--out", str(tmp_path / "seg.nii.gz")]) == 2
    assert not prefetch._pending
