"""The public Python API is pinned: its names and their parameters change only on purpose."""

import inspect

import jaxcascade
from jaxcascade import api

PUBLIC = {
    "train": ["data_dir", "workdir", "config", "overrides", "init_from", "participants", "log", "progress"],
    "segment": ["model", "inputs", "out", "probabilities", "brain_mask", "threshold", "min_lesion_voxels",
                "min_lesion_volume_mm3", "method", "tta", "compute_dtype", "resample", "thick_slices", "overwrite", "warn",
                "progress"],
    "segment_study": ["model", "data_dir", "out_dir", "probabilities", "overwrite", "compute_dtype", "tta",
                      "resample", "min_lesion_volume_mm3", "thick_slices", "participants", "bids_suffixes", "bids_filters", "shard",
                      "log", "progress"],
    "load_model": ["model_dir", "compute_dtype"],
    "evaluate": ["prediction", "truth", "voxel_volume_ml"],
    "shipped_models": [],
    "detect_changes": ["model", "baseline", "followup", "out_dir", "baseline_transforms", "followup_transforms",
                       "options", "overwrite"],
    "change_study": ["model", "data_dir", "out_dir", "options", "participants", "bids_suffixes", "bids_filters",
                     "overwrite", "log"],
}


def test_the_public_api_is_what_the_documentation_promises():
    assert sorted(jaxcascade.__all__) == sorted(PUBLIC)
    for name, parameters in PUBLIC.items():
        function = getattr(jaxcascade, name)
        assert function is getattr(api, name)
        signature = inspect.signature(function)
        assert list(signature.parameters) == parameters, name
        assert function.__doc__ and signature.return_annotation is not inspect.Signature.empty, name
        # Everything after the positional essentials is keyword-only, so calls stay readable and stable.
        assert all(p.kind in (p.KEYWORD_ONLY, p.VAR_KEYWORD) for p in list(signature.parameters.values())[3:]), name


def test_importing_jaxcascade_does_not_load_the_networks():
    import subprocess
    import sys

    code = "import sys, jaxcascade; print(any(m.startswith('jaxcascade.networks') for m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "False", result.stderr


def test_images_in_memory_take_the_files_path_write_nothing_and_stay_as_they_were(trained_model, cohort, tmp_path,
                                                                                  monkeypatch):
    """`segment` with nibabel images: the same result as their files, no temporary file, the caller's images
    unchanged; an image without a file is named by its modality in a one-line error."""
    import tempfile

    import nibabel as nib
    import numpy as np
    import pytest

    from jaxcascade.errors import UserError

    held = cohort / "held_out"
    files = {name: held / f"{name}.nii.gz" for name in ("T1", "FLAIR")}
    from_files = jaxcascade.segment(trained_model, files)
    loaded = {name: nib.load(path) for name, path in files.items()}
    images = {"T1": loaded["T1"],  # one with its file name, one built in memory (no file name)
              "FLAIR": nib.Nifti1Image(np.asarray(loaded["FLAIR"].dataobj), loaded["FLAIR"].affine,
                                       loaded["FLAIR"].header)}
    headers = {name: image.header.binaryblock for name, image in images.items()}
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    in_memory = jaxcascade.segment(trained_model, images)
    assert np.array_equal(in_memory.mask, from_files.mask)
    assert np.array_equal(in_memory.stage2_probability, from_files.stage2_probability)
    assert not any(scratch.iterdir())
    assert all(image.header.binaryblock == headers[name] for name, image in images.items())
    empty = nib.Nifti1Image(np.zeros(loaded["FLAIR"].shape, np.float32), loaded["FLAIR"].affine)
    with pytest.raises(UserError, match=r"^<FLAIR in memory>: image is all zero$"):
        jaxcascade.segment(trained_model, {"T1": files["T1"], "FLAIR": empty})
