"""The experiment launchers' smoke variants end to end, and the MNI phantom where nilearn is installed.

The launchers run in-process so that they share compiled functions: compile
time, not training, dominates a 1-epoch run on the tiny phantom.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # experiments/ is a folder of the repository, not an installed package

from experiments import launch, protocol  # noqa: E402
from jaxcascade import cli, phantom  # noqa: E402
from jaxcascade.data import nifti
from jaxcascade.errors import UserError  # noqa: E402
from conftest import read_csv  # noqa: E402

pytestmark = pytest.mark.slow  # see setup.cfg's markers

UNIT_INTERVAL = ("dsc", "ppv", "tpr", "lesion_tpr", "lesion_fpr", "lesion_f1")


def smoke_config(name: str, results_dir: Path, *overrides: str):
    return launch.load_experiment(str(ROOT / "experiments" / f"{name}.py"),
                                  ["--config.smoke=true", f"--config.results_dir={results_dir}", *overrides])


def weight_mtimes(results_dir: Path) -> dict:
    return {str(p): p.stat().st_mtime_ns for p in sorted((results_dir / "folds").rglob("*"))
            if p.is_file() and ("weights" in p.parts or p.name == "metrics.json")}


@pytest.fixture(scope="module")
def leave_one_out_run(tmp_path_factory):
    results = tmp_path_factory.mktemp("experiments") / "loo"
    messages: list[str] = []
    summary = launch.run(smoke_config("leave_one_out", results), log=messages.append)
    return results, summary, messages


def test_smoke_overrides_shrink_the_run_and_the_command_line_wins(tmp_path):
    full = launch.load_experiment(str(ROOT / "experiments" / "leave_one_out.py"), [])
    assert not full.smoke and full.cohort.size == "small"
    smoke = smoke_config("leave_one_out", tmp_path, "--config.cohort.subjects=2")
    assert smoke.cohort.size == "tiny" and smoke.cascade.train.max_epochs == 1
    assert smoke.cohort.subjects == 2 and smoke.results_dir == str(tmp_path)
    with pytest.raises(UserError, match="unknown config key"):
        smoke_config("leave_one_out", tmp_path, "--config.cohort.sise=tiny")


def test_leave_one_out_smoke_writes_sane_tables(leave_one_out_run):
    results, summary, _ = leave_one_out_run
    rows = read_csv(results / "leave_one_out.csv")
    assert [r["subject"] for r in rows] == ["sub-01", "sub-02", "sub-03", "mean"]
    for row in rows:
        for key in UNIT_INTERVAL:
            if row[key]:  # blank = undefined (e.g. PPV of an empty prediction)
                assert 0.0 <= float(row[key]) <= 1.0, (row["subject"], key, row[key])
    assert (results / "leave_one_out.md").read_text().startswith("| subject | DSC |")
    assert (results / "leave_one_out.png").stat().st_size > 1000
    assert (results / "leave_one_out_worst.png").stat().st_size > 1000
    for name in ("sub-01", "sub-02", "sub-03"):
        assert (results / "folds" / name / f"{name}_segmentation.nii.gz").exists()
        assert protocol.fold_finished(results / "folds" / name)
    assert math.isclose(summary["mean"]["dsc"], np.mean([float(r["dsc"]) for r in rows[:3]]), abs_tol=1e-5)


def test_leave_one_out_on_the_users_own_data(cohort, tmp_path):
    """--config.cohort.data_dir: the protocol runs on a folder of the user's subjects, no phantom written."""
    import shutil

    data = tmp_path / "my_study"
    for name in ("sub-01", "sub-02", "sub-03"):
        shutil.copytree(cohort / "train" / name, data / f"patient-{name[-1]}")
    results = tmp_path / "results"
    summary = launch.run(smoke_config("leave_one_out", results, f"--config.cohort.data_dir={data}"),
                         log=lambda _: None)
    rows = read_csv(results / "leave_one_out.csv")
    assert [r["subject"] for r in rows] == ["patient-1", "patient-2", "patient-3", "mean"]
    assert not (results / "cohort").exists() and (results / "leave_one_out_worst.png").exists()
    assert math.isclose(summary["mean"]["dsc"], np.mean([float(r["dsc"]) for r in rows[:3]]), abs_tol=1e-5)


def test_k_fold_on_a_bids_dataset_keeps_each_participants_sessions_together(tmp_path):
    """--config.cohort.data_dir=BIDS --config.folds=2: sessions are the rows, participants the folds."""
    data = tmp_path / "bids"
    phantom.write_cohort(data, 3, seed=5, size="tiny", layout="bids", sessions=2)
    results = tmp_path / "results"
    summary = launch.run(smoke_config("leave_one_out", results, f"--config.cohort.data_dir={data}",
                                      "--config.folds=2"), log=lambda _: None)
    sessions = [f"sub-0{s}_ses-{n}" for s in (1, 2, 3) for n in (1, 2)]
    rows = read_csv(results / "leave_one_out.csv")
    assert sorted(r["subject"] for r in rows[:-1]) == sessions and rows[-1]["subject"] == "mean"
    records = [protocol.json.loads((results / "folds" / name / "metrics.json").read_text())
               for name in ("fold1of2", "fold2of2")]
    assert sorted(n for r in records for n in r["test"]) == sessions  # every session held out exactly once
    for record in records:
        tested = {protocol.bids_layout.participant_of(n) for n in record["test"]}
        trained = {protocol.bids_layout.participant_of(n) for n in record["train"]}
        assert tested and not tested & trained
        assert all(f"{p}_ses-{n}" in record["test"] for p in tested for n in (1, 2))
    # The links point into the BIDS dataset, whose lesion masks are the derivative ones.
    link = results / "bids_view" / "sub-02_ses-1" / "lesion.nii.gz"
    assert link.is_symlink() and "derivatives" in str(link.resolve())
    assert math.isclose(summary["mean"]["dsc"], np.mean([float(r["dsc"]) for r in rows[:-1]]), abs_tol=1e-5)


def test_cross_validation_folds_by_participant():
    names = ["sub-01_ses-1", "sub-01_ses-2", "sub-02_ses-1", "sub-03_ses-1", "sub-03_ses-2", "sub-04_ses-1"]
    loo = protocol.cross_validation_folds(names, 0, seed=0)
    assert [f.name for f in loo] == ["sub-01", "sub-02", "sub-03", "sub-04"]
    assert loo[0].test == ("sub-01_ses-1", "sub-01_ses-2") and "sub-01_ses-2" not in loo[0].train
    folds = protocol.cross_validation_folds(names, 3, seed=1)
    assert sorted(n for f in folds for n in f.test) == sorted(names)
    assert sorted(len({protocol.bids_layout.participant_of(n) for n in f.test}) for f in folds) == [1, 1, 2]
    assert folds == protocol.cross_validation_folds(names, 3, seed=1)
    for k in (1, 5):
        with pytest.raises(UserError, match="2 <= k <= 4"):
            protocol.cross_validation_folds(names, k, seed=0)
    with pytest.raises(UserError, match="several sessions of one participant"):
        protocol.training_size_folds(names, (1, 2), test_subjects=1, repeats=1, seed=0)


def test_link_folder_holds_exactly_the_split(tmp_path):
    """A folder of links trained from never keeps a link of an earlier split."""
    for name in ("a", "b", "c"):
        (tmp_path / "data" / name).mkdir(parents=True)
    links = tmp_path / "train"
    protocol.link_folder(links, {"a": tmp_path / "data" / "a", "b": tmp_path / "data" / "b"})
    protocol.link_folder(links, {"b": tmp_path / "data" / "c", "c": tmp_path / "data" / "c"})
    assert sorted(p.name for p in links.iterdir()) == ["b", "c"]
    assert (links / "b").resolve() == (tmp_path / "data" / "c").resolve()
    (links / "stray").mkdir()
    with pytest.raises(UserError, match="not a link the experiments made"):
        protocol.link_folder(links, {})


def test_training_reads_a_bids_dataset_as_the_training_layout(tmp_path):
    """The same phantom in both layouts loads to the same training subjects; unlabelled sessions are left out."""
    import shutil

    from jaxcascade import config as config_lib
    from jaxcascade.data import subjects

    phantom.write_cohort(tmp_path / "folders", 2, seed=4, size="tiny")
    phantom.write_cohort(tmp_path / "bids", 2, seed=4, size="tiny", layout="bids")
    config = config_lib.load_config("demo")
    from_folders = subjects.load_training_subjects(tmp_path / "folders", config)
    from_bids = subjects.load_training_subjects(tmp_path / "bids", config)
    assert [s.name for s in from_bids] == ["sub-01_ses-1", "sub-02_ses-1"]
    for a, b in zip(from_folders, from_bids):
        np.testing.assert_array_equal(a.volume, b.volume)
        np.testing.assert_array_equal(a.lesion, b.lesion)
    masks = tmp_path / "bids" / "derivatives" / "lesion_masks"
    (masks / "sub-02" / "ses-1" / "anat" / "sub-02_ses-1_label-lesion_mask.nii.gz").unlink()
    assert [s.name for s in subjects.load_training_subjects(tmp_path / "bids", config)] == ["sub-01_ses-1"]
    second_rater = masks / "sub-01" / "ses-1" / "anat" / "sub-01_ses-1_label-lesion_desc-rater2_mask.nii.gz"
    shutil.copy(masks / "sub-01" / "ses-1" / "anat" / "sub-01_ses-1_label-lesion_mask.nii.gz", second_rater)
    with pytest.raises(UserError, match="sub-01 ses-1: 2 \\*_label-lesion_mask derivatives"):
        subjects.load_training_subjects(tmp_path / "bids", config)
    second_rater.unlink()
    (tmp_path / "bids" / "sub-01" / "ses-1" / "anat" / "sub-01_ses-1_T1w.nii.gz").unlink()
    with pytest.raises(UserError, match="labelled sessions that cannot train: sub-01 ses-1: no \\*_T1w"):
        subjects.load_training_subjects(tmp_path / "bids", config)


def test_ablation_reuses_the_folds_without_training(leave_one_out_run):
    results, _, _ = leave_one_out_run
    before = weight_mtimes(results)
    messages: list[str] = []
    summary = launch.run(smoke_config("cascade_ablation", results), log=messages.append)
    assert weight_mtimes(results) == before
    assert sum("finished earlier, skipping" in m for m in messages) == 3
    assert not any("training on" in m or "epoch" in m for m in messages)
    rows = read_csv(results / "cascade_ablation.csv")
    assert len(rows) == 4 and rows[-1]["subject"] == "total / mean"
    for row in rows[:3]:
        assert int(row["stage1_fp_lesions"]) >= 0 and int(row["cascade_fp_lesions"]) >= 0
        assert 0.0 <= float(row["stage1_dsc"]) <= 1.0 and 0.0 <= float(row["cascade_dsc"]) <= 1.0
    assert int(rows[-1]["stage1_fp_lesions"]) == sum(int(r["stage1_fp_lesions"]) for r in rows[:3])
    assert isinstance(summary["claim_dsc_not_worse"], bool)
    assert (results / "cascade_ablation.png").exists() and (results / "cascade_ablation_summary.json").exists()


def test_a_changed_config_or_cohort_is_refused(leave_one_out_run):
    results, _, _ = leave_one_out_run
    with pytest.raises(UserError, match="another config"):
        launch.run(smoke_config("leave_one_out", results, "--config.cascade.train.max_epochs=2"), log=lambda _: None)
    with pytest.raises(UserError, match="another cohort"):
        launch.run(smoke_config("leave_one_out", results, "--config.cohort.seed=1"), log=lambda _: None)


def test_training_set_size_smoke(tmp_path):
    messages: list[str] = []
    summary = launch.run(smoke_config("training_set_size", tmp_path / "size"), log=messages.append)
    rows = read_csv(tmp_path / "size" / "training_set_size.csv")
    assert [int(r["train_subjects"]) for r in rows] == [1, 2]
    assert all(0.0 <= float(r["dsc_mean"]) <= 1.0 for r in rows)
    assert [f["fold"] for f in summary["folds"]] == ["train01-rep0", "train02-rep0"]
    assert (tmp_path / "size" / "training_set_size.png").stat().st_size > 1000


def test_training_size_folds_are_nested_with_a_fixed_test_set():
    names = [phantom.subject_name(i) for i in range(7)]
    folds = protocol.training_size_folds(names, (1, 2, 4), test_subjects=2, repeats=2, seed=0)
    assert len(folds) == 6 and all(f.test == ("sub-06", "sub-07") for f in folds)
    for repeat in (folds[:3], folds[3:]):
        assert set(repeat[0].train) < set(repeat[1].train) < set(repeat[2].train)
        assert all(not set(f.train) & set(f.test) for f in repeat)
    # The whole pool is one training set however often it is drawn.
    folds = protocol.training_size_folds(names, (1, 5), test_subjects=2, repeats=3, seed=0)
    assert [f.name for f in folds if len(f.train) == 5] == ["train05-rep0"]
    with pytest.raises(UserError, match="need a cohort of at least 10"):
        protocol.training_size_folds(names, (1, 8), test_subjects=2, repeats=1, seed=0)


def test_launcher_command_line_errors(capsys):
    assert launch.main([]) == launch.EXIT_USER_ERROR
    assert launch.main([str(ROOT / "experiments" / "missing.py")]) == launch.EXIT_USER_ERROR
    assert launch.main([str(ROOT / "jaxcascade" / "configs" / "demo.py")]) == launch.EXIT_USER_ERROR  # not an experiment
    assert "not an experiment config" in capsys.readouterr().err


def test_procedural_cohort_refuses_t2(tmp_path):
    config = smoke_config("leave_one_out", tmp_path)
    with pytest.raises(UserError, match="only T1 and FLAIR"):
        protocol.ensure_cohort(config.cohort, ("T1", "FLAIR", "T2"), tmp_path / "cohort", lambda _: None)


# ----------------------------------------------------------------------------- MNI phantom


def test_missing_nilearn_names_the_extra(monkeypatch):
    from jaxcascade.phantom import mni as phantom_mni

    monkeypatch.setitem(sys.modules, "nilearn", None)  # import nilearn now raises ImportError
    with pytest.raises(UserError, match=r"pip install -e '\.\[nilearn\]'"):
        phantom_mni._nilearn_datasets()


@pytest.fixture(scope="module")
def mni_subjects():
    pytest.importorskip("nilearn")
    from jaxcascade.phantom import mni as phantom_mni

    return {seed: phantom_mni.make_subject(seed, "tiny", phantom_mni.CONTRASTS) for seed in (0, 1)}


def test_mni_subject_contrasts_and_lesions(mni_subjects):
    from jaxcascade.phantom import mni as phantom_mni

    for seed, subject in mni_subjects.items():
        lesion = subject["lesion"].astype(bool)
        head = subject["FLAIR"] != 0
        assert subject["affine"].shape == (4, 4) and np.allclose(np.diag(subject["affine"])[:3], 4.0)
        for contrast in phantom_mni.CONTRASTS:
            image = subject[contrast]
            assert image.dtype == np.float32 and image.shape == lesion.shape and np.isfinite(image).all()
            assert ((image != 0) == head).all()
        assert lesion.any() and not (lesion & ~head).any()
        _, count = ndimage.label(lesion, np.ones((3, 3, 3), bool))
        assert 1 <= count <= 10  # phantom.py's lesion spec for the 4 mm grid: at most 10, large
        # Lesions are FLAIR/T2-bright and T1-dark against the white matter around them.
        surround = ndimage.binary_dilation(lesion, iterations=2) & ~ndimage.binary_dilation(lesion) & head
        for contrast, brighter in (("FLAIR", True), ("T2", True), ("T1", False)):
            lesion_median, surround_median = np.median(subject[contrast][lesion]), np.median(subject[contrast][surround])
            assert (lesion_median > surround_median) == brighter, (seed, contrast)
    assert not np.array_equal(mni_subjects[0]["lesion"], mni_subjects[1]["lesion"])


def test_mni_small_subject_has_5_to_40_lesions_and_a_periventricular_share(mni_subjects):
    from jaxcascade.phantom import mni as phantom_mni

    subject = phantom_mni.make_subject(phantom.subject_seed(0, 2), "small")
    assert subject["FLAIR"].shape == (99, 117, 95) and set(subject) == {"T1", "FLAIR", "lesion", "affine"}
    labels, count = ndimage.label(subject["lesion"], np.ones((3, 3, 3), bool))
    assert 5 <= count <= 40
    # Ventricles: CSF-dark FLAIR deep inside the brain; some lesions lie within 6 mm of them.
    head = subject["FLAIR"] != 0
    depth_mm = ndimage.distance_transform_edt(head) * 2.0
    dark = subject["FLAIR"] < 0.5 * np.median(subject["FLAIR"][head])
    ventricles = dark & head & (depth_mm > 20)
    near_mm = ndimage.distance_transform_edt(~ventricles) * 2.0
    periventricular = sum(near_mm[labels == k].min() <= 6.0 for k in range(1, count + 1))
    assert 0 < periventricular < count


def test_mni_subject_is_determined_by_seed_and_contrast(mni_subjects):
    from jaxcascade.phantom import mni as phantom_mni

    again = phantom_mni.make_subject(0, "tiny", ("FLAIR",))
    np.testing.assert_array_equal(again["FLAIR"], mni_subjects[0]["FLAIR"])
    np.testing.assert_array_equal(again["lesion"], mni_subjects[0]["lesion"])
    with pytest.raises(UserError, match="use some of"):
        phantom_mni.make_subject(0, "tiny", ("DWI",))


def test_mni_cohort_through_the_command_line(tmp_path, mni_subjects):
    out = tmp_path / "mni"
    assert cli.main(["phantom", str(out), "--kind", "mni", "--size", "tiny", "--subjects", "1", "--seed", "3"]) == 0
    flair = nifti.load_image(out / "sub-01" / "FLAIR.nii.gz")
    lesion = nifti.load_lesion_mask(out / "sub-01" / "lesion.nii.gz", flair)
    assert lesion.any() and nifti.load_image(out / "sub-01" / "T1.nii.gz").data.shape == flair.data.shape
    assert int(flair.nifti.header["sform_code"]) == 4  # MNI152 space


# ----------------------------------------------------------------------------- new scanner


def test_new_scanner_smoke_rows_one_shot_and_resume(tmp_path):
    """Every variant, the one-shot model and the FLAIR floor get a row; one-shot trains only the dense layers."""
    from jaxcascade.storage import weights
    from jaxcascade import config as config_lib
    from jaxcascade.segmentation.cascade import Stage

    results = tmp_path / "scanner"
    dense_only = "--config.one_shot.trainable=dense1,out"  # the 2019 paper's layers; the default is all
    summary = launch.run(smoke_config("new_scanner", results, dense_only), log=lambda _: None)
    rows = read_csv(results / "new_scanner.csv")
    assert [r["variant"] for r in rows] == ["faithful", "n4", "percentile", "robust", "wm_peak",
                                            "faithful+one-shot", "FLAIR threshold"]
    for row in rows:
        for key in ("a_dsc", "b_dsc", "b_tpr", "b_lesion_f1"):
            assert 0.0 <= float(row[key]) <= 1.0, (row["variant"], key)
    manifest_b = protocol.json.loads((results / "cohort_b" / "cohort.json").read_text())
    assert manifest_b["scanner"] == "low_contrast" and manifest_b["subjects"] == 3
    subjects = read_csv(results / "new_scanner_subjects.csv")
    assert {s["subject"] for s in subjects} == {"A/sub-03", "B/sub-02", "B/sub-03"}
    for s in subjects:  # the volumes the rows summarise are the masks' volumes
        assert float(s["truth_volume_ml"]) > 0 and float(s["pred_volume_ml"]) >= 0
    models = results / "models"
    config = config_lib.load_config("demo")
    for stage in (1, 2):
        template = Stage.load(models / "faithful", stage, config).variables
        base = weights.load(models / "faithful", stage, template)["params"]
        tuned = weights.load(models / "faithful+one-shot", stage, template)["params"]
        assert np.array_equal(base["conv1"]["kernel"], tuned["conv1"]["kernel"])
        assert not np.array_equal(base["out"]["kernel"], tuned["out"]["kernel"])
    assert set(summary["targets"]) >= {"unseen_scanner_dsc", "one_shot_dsc", "robust_minus_faithful_on_a"}
    assert (results / "new_scanner.png").stat().st_size > 1000
    def weight_mtimes():
        return {str(p): p.stat().st_mtime_ns for p in sorted(models.rglob("*")) if "weights" in p.parts}

    before = weight_mtimes()
    messages: list[str] = []
    launch.run(smoke_config("new_scanner", results, dense_only), log=messages.append)
    assert before and weight_mtimes() == before and not any("epoch" in m for m in messages)
    with pytest.raises(UserError, match="trained with other settings"):  # never reported as this run's model
        launch.run(smoke_config("new_scanner", results), log=lambda _: None)
