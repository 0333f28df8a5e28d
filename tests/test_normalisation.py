"""Normalisation methods (invariance, lesion load, the white-matter peak) and N4 bias-field correction."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from jaxcascade.data import bias_field, normalisation
from jaxcascade import config as config_lib
from jaxcascade.errors import UserError

INVARIANT = ("nonzero", "percentile", "wm_peak")  # nicms counts the background, so b moves it


def flair_like(lesion_load: float = 0.0, seed: int = 0, voxels: int = 60000) -> np.ndarray:
    """A brain's FLAIR histogram (WM 1.0, GM 1.2, CSF 0.25), a share of WM made lesion (1.7), then background."""
    rng = np.random.default_rng(seed)
    tissue = rng.choice(3, voxels, p=[0.5, 0.38, 0.12])
    values = np.array([1.0, 1.2, 0.25])[tissue] * (1 + 0.05 * rng.normal(size=voxels))
    lesion = rng.choice(np.flatnonzero(tissue == 0), int(lesion_load * voxels), replace=False)
    values[lesion] = 1.7 * (1 + 0.05 * rng.normal(size=lesion.size))
    return np.concatenate([values, np.zeros(voxels // 3)]).astype(np.float32)


@pytest.mark.parametrize("method", INVARIANT)
def test_affine_intensity_changes_of_the_brain_do_not_change_the_result(method):
    image = 100.0 * flair_like(0.02)
    changed = np.where(image != 0, 3.7 * image + 250.0, 0.0)
    brain = image != 0
    np.testing.assert_allclose(normalisation.normalise(changed, method)[brain],
                               normalisation.normalise(image, method)[brain], atol=2e-3)


def _normalised_tissue(image: np.ndarray, method: str, intensities) -> np.ndarray:
    """Where given raw intensities land under the method's statistics of `image`."""
    probe = np.concatenate([image, np.asarray(intensities, np.float32)])
    return normalisation.normalise(probe, method)[-len(intensities):]


def test_lesion_load_moves_white_matter_least_under_the_robust_methods():
    # White matter (1.0) and lesion (1.7) intensities, normalised without lesions and with 5 % of the
    # brain lesioned; the shift of WM is measured in units of the WM-lesion contrast.
    shift = {}
    for method in INVARIANT:
        (wm_clean, lesion_clean), (wm_loaded, _) = (
            _normalised_tissue(flair_like(load), method, [1.0, 1.7]) for load in (0.0, 0.05))
        shift[method] = abs(wm_loaded - wm_clean) / (lesion_clean - wm_clean)
    assert shift["nonzero"] > 0.04  # the seed's rule: WM moves 4.6 % of the contrast
    assert shift["percentile"] < shift["nonzero"] / 2
    assert shift["wm_peak"] < 0.005  # the mode does not see lesions at all


@pytest.mark.parametrize("wm, others", [(1.0, (1.2, 0.25)), (1.0, (0.62, 0.25))])  # FLAIR-like, T1-like
def test_white_matter_peak_is_the_commonest_tissue(wm, others):
    rng = np.random.default_rng(1)
    tissue = rng.choice(3, 50000, p=[0.5, 0.35, 0.15])
    values = np.array([wm, *others])[tissue] + 0.04 * rng.normal(size=tissue.size)  # MRI noise is additive
    assert abs(normalisation.white_matter_peak(values) - wm) < 0.01


def test_robust_methods_keep_z_units_on_a_bell_shaped_histogram():
    # On a normal histogram median = mean and IQR / 1.349 = std, so min_th means the same.
    values = np.random.default_rng(2).normal(100.0, 10.0, 200000).astype(np.float32)
    seed = normalisation.normalise(values, "nonzero")
    for method in ("percentile", "wm_peak"):
        np.testing.assert_allclose(normalisation.normalise(values, method), seed, atol=0.05)


def test_unknown_settings_are_user_errors(monkeypatch):
    config = config_lib.load_config()
    normalisation.check_settings(config)
    config.normalisation = "histogram"
    with pytest.raises(UserError, match="use one of nonzero, nicms, percentile, wm_peak"):
        normalisation.check_settings(config)
    config.normalisation, config.bias_correction = "nonzero", "n3"
    with pytest.raises(UserError, match="use one of none, n4"):
        normalisation.check_settings(config)
    monkeypatch.setitem(sys.modules, "SimpleITK", None)  # as if the extra were not installed
    with pytest.raises(UserError, match=r"pip install 'jaxcascade\[n4\]'"):
        bias_field.correct(np.ones((4, 4, 4), np.float32), "n4")


def test_n4_removes_a_smooth_multiplicative_bias():
    pytest.importorskip("SimpleITK")
    size = 32
    grid = np.stack(np.meshgrid(*[np.arange(size) - size / 2 + 0.5] * 3, indexing="ij"))
    radius = np.sqrt((grid ** 2).sum(0))
    white_matter, brain = radius < 9, radius < 14
    clean = np.where(white_matter, 1.0, 1.2) * brain * (1 + 0.02 * np.random.default_rng(0).normal(size=radius.shape))
    bias = np.exp(0.25 * grid[0] / 14 + 0.15 * grid[2] / 14)  # about +-30 % across the brain
    image = (100 * clean * bias).astype(np.float32)

    def variation(a):
        return a[white_matter].std() / a[white_matter].mean()

    corrected = bias_field.correct(image, "n4")
    assert corrected.shape == image.shape and corrected.dtype == np.float32
    assert np.array_equal(corrected == 0, image == 0)  # the background stays out of the statistics
    assert variation(image) > 3 * variation(clean)
    assert variation(corrected) < 1.5 * variation(clean)
    volume = normalisation.normalise_channels([image, image], "nonzero", bias_correction="n4")
    np.testing.assert_allclose(volume[..., 0], normalisation.normalise(corrected, "nonzero"), atol=1e-5)
    assert bias_field.shrink_factor((256, 256, 170)) == 4 and bias_field.shrink_factor(image.shape) == 1
