"""One visit's intensities mapped onto another's: piecewise-linear quantile matching inside the brain.

Two visits of one patient differ in gain, contrast and bias between scanners, sessions and protocols; a
network that thresholds both sees lesions appear and vanish with the intensities alone. The follow-up
is mapped so that its brain's intensity quantiles land on the baseline's (Nyúl and Udupa's landmark
standardisation between two images): a monotone, piecewise-linear map through matched landmarks.

Lesions are a few percent of the brain and differ between the visits (new ones are the point of the
comparison), so the landmarks stop short of the bright tail (the 2nd to 98th percentiles by default), the
voxels the caller knows to be lesion at either visit can be left out of both distributions, and beyond the
outermost landmarks the map goes on with the slope of its last segment: a lesion brighter than the 98th
percentile stays as much brighter than white matter as it was, rather than being clipped.
"""

from __future__ import annotations

import numpy as np

from jaxcascade.errors import UserError

DEFAULT_QUANTILES = tuple(np.round(np.linspace(0.02, 0.98, 25), 4))
# Landmarks from at most this many voxels (every k-th in the mask): quantiles of a million samples are within
# about 0.1 % of the whole brain's, and sorting a 1 mm brain's 1.5 M voxels twice cost most of the time.
_MAX_SAMPLES = 1_000_000


def _landmarks(image: np.ndarray, mask: np.ndarray, quantiles, name: str) -> np.ndarray:
    values = np.asarray(image)[mask]
    values = values[::max(1, values.size // _MAX_SAMPLES)]
    if values.size < 2 * len(quantiles):
        raise UserError(f"intensity matching: the {name} mask holds {values.size} voxels; it needs at least "
                        f"{2 * len(quantiles)} (is the brain mask on the image's grid?)")
    return np.quantile(values.astype(np.float64), quantiles)


def match_intensities(moving: np.ndarray, reference: np.ndarray, moving_mask: np.ndarray,
                      reference_mask: np.ndarray, *, quantiles=DEFAULT_QUANTILES) -> np.ndarray:
    """`moving` mapped monotonically so that its quantiles inside `moving_mask` equal `reference`'s in its mask.

    Args:
        moving: the image to map (e.g. the follow-up FLAIR), any grid.
        reference: the image whose distribution is the target (e.g. the baseline FLAIR), any grid.
        moving_mask, reference_mask: where each image's distribution is measured (the brain, without
            known lesions); bool arrays on their image's grid.
        quantiles: increasing landmarks in (0, 1).

    Returns:
        float32 array of `moving`'s shape. Where landmark values of `moving` tie (a flat histogram), the
        map keeps the first; beyond the outer landmarks it extends linearly.
    """
    quantiles = np.asarray(quantiles, np.float64)
    if quantiles.ndim != 1 or quantiles.size < 2 or np.any(np.diff(quantiles) <= 0) or quantiles[0] <= 0 \
            or quantiles[-1] >= 1:
        raise ValueError("quantiles must be at least two increasing values inside (0, 1)")
    source = _landmarks(moving, np.asarray(moving_mask, bool), quantiles, "moving")
    target = _landmarks(reference, np.asarray(reference_mask, bool), quantiles, "reference")
    source, first = np.unique(source, return_index=True)
    target = np.maximum.accumulate(target[first])
    values = np.asarray(moving)
    if source.size == 1:  # a constant image inside its mask: all one can do is move it onto the median
        return np.full(values.shape, np.median(target), np.float32)
    mapped = np.interp(values, source, target).astype(np.float32)
    low_slope = (target[1] - target[0]) / (source[1] - source[0])
    high_slope = (target[-1] - target[-2]) / (source[-1] - source[-2])
    below, above = values < source[0], values > source[-1]
    mapped[below] = target[0] + (values[below].astype(np.float64) - source[0]) * low_slope
    mapped[above] = target[-1] + (values[above].astype(np.float64) - source[-1]) * high_slope
    return mapped
