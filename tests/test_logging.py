"""The library logs and warns the Python way; the command line prints both, quieter with -q, and --version."""

import logging
import subprocess
import sys

import pytest

import jaxcascade
from jaxcascade import cli, phantom
from jaxcascade.errors import JaxcascadeWarning


def test_version_quiet_and_verbose(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == f"jaxcascade {jaxcascade.__version__}"
    assert cli.main(["-q", "phantom", str(tmp_path / "a"), "--subjects", "1", "--size", "tiny"]) == 0
    assert capsys.readouterr().out == ""
    assert cli.main(["phantom", str(tmp_path / "b"), "--subjects", "1", "--size", "tiny", "--quiet"]) == 0
    assert capsys.readouterr().out == ""
    assert cli.main(["phantom", str(tmp_path / "c"), "--subjects", "1", "--size", "tiny"]) == 0
    assert capsys.readouterr().out.startswith("wrote 1 tiny procedural phantom subjects")


def test_the_library_uses_logging_and_warnings_not_print(trained_model, cohort, tmp_path, capfd, caplog):
    """Without a configured handler the library prints nothing; its log records and warnings are there."""
    flair = cohort / "held_out" / "FLAIR.nii.gz"
    padded = tmp_path / "unstripped.nii.gz"
    import nibabel as nib
    import numpy as np

    image = nib.load(flair)
    data = np.asarray(image.dataobj).copy()
    # Background noise everywhere: does not look skull-stripped (a constant background is a stripped one's).
    data[data == 0] = np.random.default_rng(0).uniform(1, 5, int((data == 0).sum()))
    nib.save(nib.Nifti1Image(data, image.affine, header=image.header), padded)
    with caplog.at_level(logging.INFO, logger="jaxcascade"), pytest.warns(JaxcascadeWarning, match="skull-stripped"):
        jaxcascade.segment(trained_model, {"T1": cohort / "held_out" / "T1.nii.gz", "FLAIR": padded},
                           out=tmp_path / "seg.nii.gz")
    captured = capfd.readouterr()
    assert captured.out == ""
    phantom.write_cohort(tmp_path / "study", 1, seed=1, size="tiny")
    with caplog.at_level(logging.INFO, logger="jaxcascade"):
        jaxcascade.segment_study(trained_model, tmp_path / "study", tmp_path / "study-out")
    assert capfd.readouterr().out == ""
    assert any(record.name.startswith("jaxcascade") and "sub-01:" in record.getMessage() for record in caplog.records)


def test_importing_the_package_is_quiet_and_leaves_matplotlib_alone():
    code = ("import matplotlib; matplotlib.use('svg'); import jaxcascade, jaxcascade.training.pipeline, jaxcascade.segmentation.study;"
            "print(matplotlib.get_backend())")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "svg" and result.stderr == ""
