"""Tests of the phantoms' named scanners (scanners.py) and how both phantoms apply them."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from jaxcascade import cli, phantom
from jaxcascade.phantom import core as phantom_core, scanners
from jaxcascade.errors import UserError

SEEDS = (0, 1, 2)

# (sum, sum of squares) of each image in float64, and (count, sum of flat
# indices) of the lesion voxels, as the generator made them before scanners
# existed (commit a042d5c: `phantom.make_subject(seed, "tiny")` and
# `phantom_mni.make_subject(0, "tiny", phantom_mni.CONTRASTS)`). The default
# scanner must reproduce them. Not a sha256: the smooth fields go through
# BLAS, whose last bits differ between CPU models; rtol 1e-6 absorbs that,
# while any change of a draw, a number or a blur moves these sums by far more.
UNMODIFIED_PROCEDURAL = {
    0: {"T1": (13352323.71824646, 11647524359.404938), "FLAIR": (9027307.298885345, 5233752510.439619),
        "lesion": (666, 22639104)},
    1: {"T1": (14624856.650054932, 13611323300.536007), "FLAIR": (11384941.897789001, 8035221372.542667),
        "lesion": (391, 15414997)},
}
UNMODIFIED_MNI_SEED_0 = {
    "T1": (12184862.996711731, 5718941142.900066), "FLAIR": (8326290.298286438, 2582802211.790068),
    "T2": (9506677.79171753, 3390770334.6896896), "PD": (26088758.23678589, 24919313744.495956),
    "lesion": (149, 9666672),
}


def fingerprint(subject):
    out = {}
    for key, value in subject.items():
        if key == "lesion":
            out[key] = (int(value.sum()), int(np.flatnonzero(value).sum()))
        elif key != "affine":
            wide = value.astype(np.float64)
            out[key] = (float(wide.sum()), float((wide * wide).sum()))
    return out


def assert_fingerprints_match(subject, expected):
    found = fingerprint(subject)
    assert set(found) == set(expected)
    for key, values in expected.items():
        np.testing.assert_allclose(found[key], values, rtol=1e-6, err_msg=key)


@pytest.fixture(scope="module")
def tiny_by_scanner():
    """{scanner name: {seed: procedural tiny subject}}."""
    return {name: {seed: phantom.make_subject(seed, "tiny", scanner=name) for seed in SEEDS}
            for name in scanners.SCANNERS}


@pytest.fixture(scope="module")
def mni_by_scanner():
    """{scanner name: MNI tiny subject of seed 0, all contrasts}; needs nilearn."""
    pytest.importorskip("nilearn")
    from jaxcascade.phantom import mni as phantom_mni

    return {name: phantom_mni.make_subject(0, "tiny", phantom_mni.CONTRASTS, scanner=name)
            for name in scanners.SCANNERS}


def test_table_and_lookup():
    assert next(iter(scanners.SCANNERS)) == "default"
    assert {"default", "low_contrast", "1.5T", "thick_slice"} <= set(scanners.SCANNERS)
    default = scanners.get_scanner("default")
    assert default is scanners.DEFAULT and scanners.get_scanner(default) is default
    assert default.lesion["FLAIR"] == (1.4, 1.8) and default.lesion["T1"] == (0.6, 0.85)
    assert default.noise_sigma == (0.02, 0.04) and default.bias_peak_to_peak == (0.04, 0.15)
    assert default.flair_slice_mm is None and default.slice_mm("FLAIR") is None
    for scanner in scanners.SCANNERS.values():
        assert set(scanner.lesion) == set(scanner.grey_matter) == {"T1", "FLAIR", "T2", "PD"}
        for low, high in (*scanner.lesion.values(), scanner.noise_sigma, scanner.bias_peak_to_peak):
            assert 0 <= low <= high
    assert scanners.SCANNERS["thick_slice"].slice_mm("FLAIR") == 5.0
    assert scanners.SCANNERS["thick_slice"].slice_mm("T1") is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        default.noise_sigma = (0.0, 0.0)
    with pytest.raises(TypeError):
        default.lesion["FLAIR"] = (9.0, 9.0)
    with pytest.raises(UserError, match="use one of default, low_contrast") as error:
        scanners.get_scanner("3T")
    assert "\n" not in str(error.value)


def documented_rows(text):
    """{scanner name: cells after the name} of the markdown table rows in `text`."""
    rows = {}
    for line in text.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.lstrip().startswith("|") and cells[0].strip("`") in scanners.SCANNERS:
            rows[cells[0].strip("`")] = cells[1:]
    return rows


@pytest.mark.parametrize("where", ["scanners.py", "docs/phantom.md"])
def test_documented_tables_match_the_scanners(where):
    text = (scanners.__doc__ if where == "scanners.py"
            else (Path(__file__).parents[1] / where).read_text(encoding="utf-8"))
    rows = documented_rows(text)
    assert set(rows) == set(scanners.SCANNERS), where

    def span(low_high):
        return f"{low_high[0]:.2f}-{low_high[1]:.2f}"

    for name, scanner in scanners.SCANNERS.items():
        *numbers, slices = rows[name]
        assert numbers == [span(scanner.lesion["FLAIR"]), f"{scanner.grey_matter['FLAIR']:.2f}",
                           span(scanner.lesion["T1"]), f"{scanner.grey_matter['T1']:.2f}",
                           span(scanner.lesion["T2"]), span(scanner.lesion["PD"]),
                           span(scanner.noise_sigma), span(scanner.bias_peak_to_peak)], (where, name)
        thickness = scanner.flair_slice_mm
        assert slices == "3D" if thickness is None else slices.endswith(f"{thickness:g} mm"), (where, name)


def test_default_scanner_reproduces_the_unmodified_generator(tiny_by_scanner):
    for seed, expected in UNMODIFIED_PROCEDURAL.items():
        implicit = phantom.make_subject(seed, "tiny")
        assert_fingerprints_match(implicit, expected)
        by_object = phantom.make_subject(seed, "tiny", scanner=scanners.DEFAULT)
        for explicit in (tiny_by_scanner["default"][seed], by_object):
            for key in ("T1", "FLAIR", "lesion", "affine"):
                np.testing.assert_array_equal(explicit[key], implicit[key])


def test_mni_default_scanner_reproduces_the_unmodified_generator(mni_by_scanner):
    from jaxcascade.phantom import mni as phantom_mni

    assert_fingerprints_match(mni_by_scanner["default"], UNMODIFIED_MNI_SEED_0)
    implicit = phantom_mni.make_subject(0, "tiny", phantom_mni.CONTRASTS)
    for key in (*phantom_mni.CONTRASTS, "lesion"):
        np.testing.assert_array_equal(mni_by_scanner["default"][key], implicit[key])


def test_anatomy_and_lesions_do_not_depend_on_the_scanner(tiny_by_scanner):
    for subjects in tiny_by_scanner.values():
        for seed in SEEDS:
            np.testing.assert_array_equal(subjects[seed]["lesion"], tiny_by_scanner["default"][seed]["lesion"])
            # Same head: the background is exactly 0 in the same voxels.
            np.testing.assert_array_equal(subjects[seed]["FLAIR"] == 0,
                                          tiny_by_scanner["default"][seed]["FLAIR"] == 0)
    assert not np.array_equal(tiny_by_scanner["low_contrast"][0]["FLAIR"], tiny_by_scanner["default"][0]["FLAIR"])


def test_mni_anatomy_and_lesions_do_not_depend_on_the_scanner(mni_by_scanner):
    for subject in mni_by_scanner.values():
        np.testing.assert_array_equal(subject["lesion"], mni_by_scanner["default"]["lesion"])
        np.testing.assert_array_equal(subject["T1"] == 0, mni_by_scanner["default"]["T1"] == 0)
    assert not np.array_equal(mni_by_scanner["low_contrast"]["T2"], mni_by_scanner["default"]["T2"])


def regions(seed, subject):
    """Cortical GM and interior normal WM (away from lesions) of a procedural tiny subject."""
    shape, voxel = phantom.SIZES["tiny"]
    # make_subject draws the anatomy first from a fresh generator, so this reproduces its labels.
    label, _ = phantom.anatomy(np.random.default_rng(seed), shape, voxel)
    lesion = subject["lesion"] > 0
    grey = (label == phantom_core.GM) & ~lesion
    white = ndimage.binary_erosion(label == phantom_core.WM) & ~ndimage.binary_dilation(lesion)
    return grey, white, lesion


def noise_estimate(image, region):
    """Noise sigma relative to the region's median, from neighbour differences along axis 0.

    Inside interior WM the signal is flat up to the smooth bias field, so the
    differences are noise; the median absolute deviation ignores the few
    tissue edges left.
    """
    pairs = region[1:] & region[:-1]
    steps = (image[1:] - image[:-1])[pairs]
    return np.median(np.abs(steps - np.median(steps))) / 0.6745 / np.sqrt(2) / np.median(image[region])


def bias_estimate(image, region, block=4):
    """5-95 percentile spread of WM block medians relative to the WM median (noise averages out)."""
    medians = []
    for corner in np.ndindex(*(n // block for n in region.shape)):
        box = tuple(slice(c * block, (c + 1) * block) for c in corner)
        if region[box].sum() >= block**3 // 2:
            medians.append(np.median(image[box][region[box]]))
    medians = np.array(medians) / np.median(image[region])
    return np.percentile(medians, 95) - np.percentile(medians, 5)


def measurements(tiny_by_scanner, name):
    """Per seed: FLAIR lesion/GM and lesion/WM mean ratios, FLAIR noise and bias estimates."""
    rows = []
    for seed in SEEDS:
        subject = tiny_by_scanner[name][seed]
        grey, white, lesion = regions(seed, subject)
        flair = subject["FLAIR"]
        rows.append({"lesion_to_gm": flair[lesion].mean() / flair[grey].mean(),
                     "lesion_to_wm": flair[lesion].mean() / flair[white].mean(),
                     "t1_lesion_to_wm": subject["T1"][lesion].mean() / subject["T1"][white].mean(),
                     "noise": noise_estimate(flair, white), "bias": bias_estimate(flair, white)})
    return rows


def test_low_contrast_scanner_is_the_reported_site(tiny_by_scanner):
    # Measured on this grid: FLAIR lesion/GM 1.39-1.48 (default) vs 1.11-1.18;
    # noise 0.025-0.040 vs 0.075-0.118; bias spread 0.03-0.06 vs 0.07-0.11.
    default, low = measurements(tiny_by_scanner, "default"), measurements(tiny_by_scanner, "low_contrast")
    for ours, theirs in zip(default, low):
        assert ours["lesion_to_gm"] > 1.3 and 1.0 < theirs["lesion_to_gm"] < 1.25
        assert theirs["lesion_to_wm"] < ours["lesion_to_wm"]
        assert ours["t1_lesion_to_wm"] < theirs["t1_lesion_to_wm"] < 1.0  # T1 lesions less dark
        # Paired draws: every seed's sigma is exactly 3x the default's, the bias amplitude 2.5-2x.
        assert 2.5 < theirs["noise"] / ours["noise"] < 3.5
        assert theirs["bias"] / ours["bias"] > 1.6
    for mid in measurements(tiny_by_scanner, "1.5T"):
        assert mid["lesion_to_gm"] < 1.45


def test_low_contrast_mni_flair(mni_by_scanner):
    lesion = mni_by_scanner["default"]["lesion"] > 0

    def lesion_to_brain(name):
        flair = mni_by_scanner[name]["FLAIR"]
        return flair[lesion].mean() / np.median(flair[flair > 0])

    # Measured: 1.37 default, 1.15 low_contrast, 1.31 1.5T.
    assert lesion_to_brain("low_contrast") < lesion_to_brain("1.5T") < lesion_to_brain("default")


def through_plane_ratio(image):
    """Mean squared gradient along the last (slice) axis over that in-plane."""
    energy = [np.mean(np.diff(image, axis=axis) ** 2) for axis in range(3)]
    return energy[2] / (0.5 * (energy[0] + energy[1]))


def test_thick_slice_flair_is_smooth_through_plane_only():
    # The 2 mm grid: 5 mm slices add a 0.66-voxel Gaussian along z (on the
    # 4 mm grid only 0.22 voxels, too little to measure against the noise).
    default = phantom.make_subject(0, "small")
    thick = phantom.make_subject(0, "small", scanner="thick_slice")
    np.testing.assert_array_equal(thick["T1"], default["T1"])  # only FLAIR is a 2D acquisition
    # Measured: 1.10 -> 0.85.
    assert through_plane_ratio(thick["FLAIR"]) < 0.85 * through_plane_ratio(default["FLAIR"])


def test_slice_profile_adds_the_slab_variance_along_the_last_axis():
    impulse = np.zeros((9, 9, 41), np.float32)
    impulse[4, 4, 20] = 1.0
    voxel = 1.0
    blurred = phantom_core.slice_profile(impulse, 5.0, voxel)
    np.testing.assert_array_equal(blurred[:, :, 20] > 0, impulse[:, :, 20] > 0)  # nothing in-plane
    position = np.arange(41) - 20.0
    variance = (blurred[4, 4] * position**2).sum() / blurred[4, 4].sum()
    np.testing.assert_allclose(variance, (5.0**2 - voxel**2) / 12.0, rtol=0.02)
    assert phantom_core.slice_profile(impulse, 3.0, 4.0) is impulse  # slices thinner than voxels


def test_acquire_draws_noise_and_bias_from_the_scanner_ranges():
    shape, voxel = (24, 24, 24), 4.0
    head = np.ones(shape, bool)
    pure_bias = dataclasses.replace(scanners.DEFAULT, noise_sigma=(0.0, 0.0), bias_peak_to_peak=(0.3, 0.3))
    image = phantom_core.acquire(np.random.default_rng(0), np.ones(shape, np.float32), head, voxel, pure_bias)
    np.testing.assert_allclose(image.max() - image.min(), 0.3, rtol=1e-5)
    pure_noise = dataclasses.replace(scanners.DEFAULT, noise_sigma=(0.1, 0.1), bias_peak_to_peak=(0.0, 0.0))
    # At signal 10 the Rician magnitude is all but Gaussian with the channel sigma.
    image = phantom_core.acquire(np.random.default_rng(0), np.full(shape, 10.0, np.float32), head, voxel, pure_noise)
    np.testing.assert_allclose(image.std(), 0.1, rtol=0.03)


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "jaxcascade.cli", "phantom", *args],
                          capture_output=True, text=True, timeout=120, check=False)


def test_cli_writes_the_scanner_and_rejects_unknown_ones(tmp_path):
    done = run_cli(str(tmp_path / "bids"), "--size", "tiny", "--subjects", "1", "--seed", "4",
                   "--scanner", "low_contrast", "--layout", "bids")
    assert done.returncode == 0, done.stderr
    assert "scanner low_contrast" in done.stdout
    written = nib.load(tmp_path / "bids" / "sub-01" / "ses-1" / "anat" / "sub-01_ses-1_FLAIR.nii.gz")
    expected = phantom.make_subject(phantom.subject_seed(4, 0), "tiny", scanner="low_contrast")
    np.testing.assert_array_equal(np.asanyarray(written.dataobj), expected["FLAIR"])
    description = json.loads((tmp_path / "bids" / "dataset_description.json").read_text())
    assert description["GeneratedBy"][0]["Description"] == "scanner low_contrast"

    refused = run_cli(str(tmp_path / "never"), "--size", "tiny", "--scanner", "3T")
    assert refused.returncode == cli.EXIT_USER_ERROR
    assert "Traceback" not in refused.stderr and len(refused.stderr.strip().splitlines()) == 1
    assert "'3T'" in refused.stderr and "low_contrast" in refused.stderr
    assert not (tmp_path / "never").exists()


def test_cli_mni_scanner(tmp_path):
    pytest.importorskip("nilearn")
    from jaxcascade.phantom import mni as phantom_mni

    assert cli.main(["phantom", str(tmp_path / "mni"), "--kind", "mni", "--size", "tiny", "--subjects", "1",
                     "--seed", "3", "--scanner", "1.5T"]) == 0
    written = nib.load(tmp_path / "mni" / "sub-01" / "FLAIR.nii.gz")
    expected = phantom_mni.make_subject(phantom.subject_seed(3, 0), "tiny", scanner="1.5T")
    np.testing.assert_array_equal(np.asanyarray(written.dataobj), expected["FLAIR"])
