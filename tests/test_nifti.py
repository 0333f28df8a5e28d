"""NIfTI round trips: the output lies on the input's grid with the input's header."""

import os

import nibabel as nib
import numpy as np
import pytest

from jaxcascade import cli
from jaxcascade.data import nifti
from jaxcascade.runtime import outputs
from jaxcascade.errors import UserError
from conftest import held_out_inputs


def _orientations():
    ras = np.diag([2.0, 2.0, 2.0, 1.0])
    ras[:3, 3] = [-40, -48, -40]
    lps = np.diag([-2.0, -2.0, 2.0, 1.0])
    lps[:3, 3] = [40, 48, -40]
    permuted = np.array([[0, 0, 2.0, -40], [2.0, 0, 0, -48], [0, 2.0, 0, -40], [0, 0, 0, 1]])
    oblique = ras.copy()
    c, s = np.cos(0.2), np.sin(0.2)
    oblique[:3, :3] = ras[:3, :3] @ np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
    return {"RAS": ras, "LPS": lps, "permuted": permuted, "oblique": oblique}


@pytest.mark.parametrize("orientation", list(_orientations()))
@pytest.mark.parametrize("codes", [(1, 1), (1, 0), (0, 2)])
def test_save_like_round_trips_affine_and_header(tmp_path, orientation, codes):
    affine = _orientations()[orientation]
    qform_code, sform_code = codes
    image = nib.Nifti1Image(np.random.default_rng(0).random((6, 7, 5)).astype(np.float32), None)
    image.set_qform(affine, code=qform_code)
    image.set_sform(affine if sform_code else np.eye(4), code=sform_code)
    image.header["descrip"] = b"scanner X"
    image.header.set_xyzt_units("mm", "sec")
    source = tmp_path / "in.nii.gz"
    nib.save(image, source)

    loaded = nifti.load_image(source)
    mask = loaded.data > 0.5
    out = tmp_path / "out.nii.gz"
    nifti.save_like(mask, loaded, out)
    written = nib.load(out)
    np.testing.assert_allclose(written.affine, nib.load(source).affine, atol=1e-6)
    assert int(written.header["qform_code"]) == qform_code
    assert int(written.header["sform_code"]) == sform_code
    np.testing.assert_allclose(written.header.get_qform(), nib.load(source).header.get_qform(), atol=1e-6)
    assert written.header["descrip"] == image.header["descrip"]
    assert written.header.get_xyzt_units() == ("mm", "sec")
    assert written.get_data_dtype() == np.uint8
    stored = np.asarray(nib.load(source).dataobj) > 0.5  # the mask lands on the file's own voxel grid
    np.testing.assert_array_equal(np.asarray(written.dataobj), stored.astype(np.uint8))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.nii.gz", "out.nii.gz"]


def test_every_storage_order_of_one_anatomy_reaches_the_network_the_same_way_round(tmp_path):
    """The same voxels stored RAS, LPS and with permuted axes load as one RAS array; 'native' keeps
    the stored order; and outputs go back to each file's grid."""
    ras_data = np.random.default_rng(1).random((6, 7, 5)).astype(np.float32) + 1
    ras = _orientations()["RAS"]
    stored = {"RAS": (ras_data, ras)}
    lps_flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    lps_flip[:2, 3] = [5, 6]
    stored["LPS"] = (ras_data[::-1, ::-1], ras @ lps_flip)
    stored["SRA"] = (ras_data.transpose(2, 0, 1), ras[:, [2, 0, 1, 3]])
    loaded = {}
    for name, (data, affine) in stored.items():
        nib.save(nib.Nifti1Image(np.ascontiguousarray(data), affine), tmp_path / f"{name}.nii.gz")
        loaded[name] = nifti.load_image(tmp_path / f"{name}.nii.gz")
        assert "".join(nib.aff2axcodes(loaded[name].affine)) == name
        np.testing.assert_array_equal(loaded[name].data, ras_data)
        native = nifti.load_image(tmp_path / f"{name}.nii.gz", orientation=nifti.NATIVE)
        np.testing.assert_array_equal(native.data, data)
        nifti.save_like(loaded[name].data, loaded[name], tmp_path / f"{name}_out.nii.gz", dtype=np.float32)
        np.testing.assert_array_equal(np.asarray(nib.load(tmp_path / f"{name}_out.nii.gz").dataobj), data)
    for bad in ("RRS", "XYZ", "RA"):
        with pytest.raises(UserError, match="expected 'native' or axis codes"):
            nifti.check_orientation(bad)


def test_scaled_input_does_not_rescale_the_output(tmp_path):
    image = nib.Nifti1Image(np.arange(60, dtype=np.int16).reshape(3, 4, 5), np.eye(4))
    image.header.set_slope_inter(2.0, 10.0)
    nib.save(image, tmp_path / "in.nii.gz")
    loaded = nifti.load_image(tmp_path / "in.nii.gz")
    assert loaded.data.max() == 59 * 2 + 10
    nifti.save_like(np.ones((3, 4, 5)), loaded, tmp_path / "out.nii.gz")
    assert np.asarray(nib.load(tmp_path / "out.nii.gz").dataobj).max() == 1


def test_segmentation_keeps_an_lps_input_grid(trained_model, cohort, tmp_path):
    """A non-canonical input is segmented in its own grid and written back on it."""
    lps = {}
    for name in ("T1", "FLAIR"):
        source = nib.load(cohort / "held_out" / f"{name}.nii.gz")
        flip = np.diag([-1.0, -1.0, 1.0, 1.0])
        flip[:2, 3] = [source.shape[0] - 1, source.shape[1] - 1]
        data = np.asarray(source.dataobj)[::-1, ::-1]
        image = nib.Nifti1Image(data, source.affine @ flip)  # same anatomy, LPS voxel order
        nib.save(image, tmp_path / f"{name}.nii.gz")
        lps[name] = image
    out = tmp_path / "seg.nii.gz"
    assert cli.main(["segment", "--model", str(trained_model), "--input", f"T1={tmp_path / 'T1.nii.gz'}",
                     "--input", f"FLAIR={tmp_path / 'FLAIR.nii.gz'}", "--out", str(out)]) == 0
    written = nib.load(out)
    np.testing.assert_allclose(written.affine, nib.load(tmp_path / "FLAIR.nii.gz").affine)
    assert nib.aff2axcodes(written.affine) == ("L", "P", "S")
    # The same voxels as segmenting the original (RAS) files, read in LPS order; and lesions found.
    ras_out = tmp_path / "seg_ras.nii.gz"
    assert cli.main(["segment", "--model", str(trained_model), *held_out_inputs(cohort), "--out", str(ras_out)]) == 0
    ras_mask = np.asarray(nib.load(ras_out).dataobj)
    np.testing.assert_array_equal(np.asarray(written.dataobj), ras_mask[::-1, ::-1])
    truth = np.asarray(nib.load(cohort / "held_out" / "lesion.nii.gz").dataobj)[::-1, ::-1]
    assert ((np.asarray(written.dataobj) > 0) & (truth > 0)).sum() > 0.25 * truth.sum()


def test_atomic_outputs_get_the_usual_permissions(tmp_path):
    previous = os.umask(0o022)
    try:
        with outputs.atomic_path(tmp_path / "out.json") as tmp:
            tmp.write_text("{}")
    finally:
        os.umask(previous)
    assert (tmp_path / "out.json").stat().st_mode & 0o777 == 0o644


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "result.json"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with outputs.atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash mid-write")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]


def test_qform_sform_disagreement_is_refused(tmp_path):
    image = nib.Nifti1Image(np.ones((4, 4, 4), np.float32), np.eye(4))
    shifted = np.eye(4)
    shifted[0, 3] = 5.0
    image.set_qform(np.eye(4), code=1)
    image.set_sform(shifted, code=1)
    nib.save(image, tmp_path / "x.nii.gz")
    with pytest.raises(UserError, match="qform and sform disagree"):
        nifti.load_image(tmp_path / "x.nii.gz")


def test_constant_image_is_refused(tmp_path):
    nib.save(nib.Nifti1Image(np.full((4, 4, 4), 3.0, np.float32), np.eye(4)), tmp_path / "c.nii.gz")
    with pytest.raises(UserError, match="constant"):
        nifti.load_image(tmp_path / "c.nii.gz")


def test_resampling_onto_another_grid_is_exact_on_the_same_grid_and_close_across_grids(tmp_path):
    """A smooth image written at 2 mm and at 4 mm through-plane: the 4 mm one brought back is close."""
    z = np.linspace(0, np.pi, 32)
    volume = (np.sin(z)[None, None, :] * np.ones((20, 24, 1)) * 100 + 10).astype(np.float32)
    fine_affine = np.diag([2.0, 2.0, 2.0, 1.0])
    fine = tmp_path / "fine.nii.gz"
    coarse = tmp_path / "coarse.nii.gz"
    nib.save(nib.Nifti1Image(volume, fine_affine), fine)
    # Every other plane, at twice the spacing, centred where those planes are.
    nib.save(nib.Nifti1Image(volume[:, :, ::2], fine_affine @ np.diag([1.0, 1.0, 2.0, 1.0])), coarse)
    reference = nifti.load_image(fine)
    assert nifti.on_grid_of(reference, reference) is reference
    back = nifti.on_grid_of(nifti.load_image(coarse), reference)
    assert back.data.shape == reference.data.shape and back.nifti is reference.nifti
    inside = back.data[:, :, :-1]  # the last plane lies beyond the coarse grid's last voxel centre
    assert np.abs(inside - reference.data[:, :, :-1]).max() < 0.05 * volume.max()
