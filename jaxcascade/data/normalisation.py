"""Intensity normalisation of each image before it reaches the networks.

The seed code standardises every image by the mean and standard deviation of
its nonzero (brain) voxels; candidates are then voxels whose normalised FLAIR
exceeds config.candidates.min_th, so the normalisation decides both what the
networks see and which voxels they are asked about. A new method is a branch
of `normalise` and a name in NORMALISATIONS (config.normalisation).

Every method is (x - centre) / spread over the nonzero voxels, so each is
unchanged by an affine change a*x + b (a > 0) of the brain's intensities, and
each keeps the units of a z-score, where min_th = 0.5 means "half a spread
above the centre". They differ in what moves the centre and the spread:

  nonzero     mean, std                 the seed. Bright lesions pull both up,
                                        so the more lesion load, the dimmer a lesion.
  nicms       mean, std with background nicMSlesions' variant.
  percentile  median, IQR / 1.349       robust statistics: a lesion load of a few
                                        per cent of the brain barely moves them.
  wm_peak     white-matter peak,        the centre is a tissue: the mode of the
              IQR / 1.349               smoothed histogram, which lesions (in the
                                        tail) and atrophy (more CSF) do not move.

IQR / 1.349 is the standard deviation of a normal distribution with that
interquartile range, so both robust methods match the seed's units on a
bell-shaped histogram, and min_th keeps roughly its meaning: on procedural
phantoms (phantom.make_subject, seeds 0-3, 'small') FLAIR > 0.5 keeps 30-32 %
of the brain under each of 'nonzero', 'percentile' and 'wm_peak', and every
lesion voxel. A brain's histogram is not bell-shaped, though: its
IQR / 1.349 is about half its std there, so lesions sit about twice as many
units above the centre, and settings in those units that lie far in the tail
(sampling.hard_negative_fallback_flair) mean something else.
Bias-field correction (`bias_field.py`) runs before any of them.

"Nonzero" presumes a background of exactly 0. Skull-stripping tools and
converters do not always leave one: a float background of 1e-6, or an int16
image whose scl_slope/inter puts the stored 0 at -1024. `zero_background`
takes the background to be the value that most of the field of view's border
shares and moves it to 0 (the whole image shifted by it), so such an image
gives what its clean twin gives; an image whose border is mostly 0 already,
or does not mostly share one value (an unstripped head), is left as it is.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from jaxcascade.data import bias_field
from jaxcascade.errors import UserError

NORMALISATIONS = ("nonzero", "nicms", "percentile", "wm_peak")

# Interquartile range of the standard normal distribution.
_NORMAL_IQR = 1.3489795
# The white-matter peak: a histogram of the nonzero voxels between their 1st
# and 99th percentiles (bright lesions and dark partial-volume edges left
# out), smoothed over 3 of its 200 bins so that noise cannot make a peak.
_HISTOGRAM_BINS = 200
_HISTOGRAM_SMOOTHING_BINS = 3.0
# Voxels this close to the background value (a share of the image's intensity range) are background:
# a float background written as 1e-6 +- rounding, never a tissue (which lies far above it).
_BACKGROUND_TOLERANCE = 1e-4
# The share of the border that must hold the background value for it to be taken as one.
_BACKGROUND_SHARE = 0.5


def background_level(image: np.ndarray) -> float:
    """The value most of the field of view's six faces hold (within tolerance), or 0.0 if there is none."""
    image = np.asarray(image)
    if image.ndim != 3 or min(image.shape) < 1:
        return 0.0
    border = np.concatenate([face.ravel() for face in (image[0], image[-1], image[:, 0], image[:, -1],
                                                       image[:, :, 0], image[:, :, -1])])
    level = float(np.median(border))
    if level == 0.0:
        return 0.0
    tolerance = _BACKGROUND_TOLERANCE * float(np.ptp(image))
    return level if np.mean(np.abs(border - level) <= tolerance) > _BACKGROUND_SHARE else 0.0


def zero_background(image: np.ndarray) -> np.ndarray:
    """The image with its background (`background_level`) at exactly 0: itself, unchanged, when it is already."""
    level = background_level(image)
    if level == 0.0:
        return image
    tolerance = _BACKGROUND_TOLERANCE * float(np.ptp(image))
    shifted = (np.asarray(image, np.float64) - level).astype(np.float32)
    shifted[np.abs(np.asarray(image, np.float64) - level) <= tolerance] = 0.0
    return shifted


def normalise(image: np.ndarray, method: str = "nonzero") -> np.ndarray:
    """Standardise one image by statistics of its nonzero voxels (see the module docstring).

    'nonzero': (x - mean(nonzero)) / std(nonzero), the seed code's rule.
    'nicms': nicMSlesions subtracts the nonzero mean first and then divides by
    the std of the nonzero voxels of the *shifted* image, so background voxels
    (now at -mean) count in the std.
    'percentile': (x - median) / (IQR / 1.349) of the nonzero voxels.
    'wm_peak': (x - white_matter_peak) / (IQR / 1.349) of the nonzero voxels.
    """
    image = np.asarray(image, np.float32)
    nonzero = image[image != 0].astype(np.float64)
    if nonzero.size == 0:
        raise ValueError("image has no nonzero voxels")
    if method == "nonzero":
        centre, spread = nonzero.mean(), nonzero.std()
    elif method == "nicms":
        shifted = image - nonzero.mean()
        return (shifted / shifted[shifted != 0].astype(np.float64).std()).astype(np.float32)
    elif method == "percentile":
        centre, spread = np.median(nonzero), robust_spread(nonzero)
    elif method == "wm_peak":
        centre, spread = white_matter_peak(nonzero), robust_spread(nonzero)
    else:
        raise ValueError(f"unknown normalisation {method!r}; use one of {NORMALISATIONS}")
    return ((image - centre) / spread).astype(np.float32)


def robust_spread(values: np.ndarray) -> float:
    """IQR / 1.349: the standard deviation where the histogram is bell-shaped, blind to its tails."""
    low, high = np.percentile(values, [25, 75])
    if high > low:
        return float((high - low) / _NORMAL_IQR)
    # More than half the voxels share one value (a mask-like image): only the std is left.
    return float(values.std())


def white_matter_peak(values: np.ndarray) -> float:
    """The intensity at the highest peak of the smoothed histogram of a brain's voxels.

    White matter is the commonest and most uniform tissue of an adult brain, so
    in T1, FLAIR and T2 its peak is the histogram's tallest (a grey matter that
    outnumbers it, as in young children, would take its place). The bins span the 1st to 99th
    percentiles, so the peak moves with the image under a*x + b; a parabola
    through the top three bins gives it to a fraction of a bin.
    """
    low, high = np.percentile(values, [1, 99])
    if not high > low:
        return float(np.median(values))
    counts, edges = np.histogram(values, bins=_HISTOGRAM_BINS, range=(low, high))
    smooth = ndimage.gaussian_filter1d(counts.astype(np.float64), _HISTOGRAM_SMOOTHING_BINS, mode="constant")
    top = int(np.argmax(smooth))
    offset = 0.0
    if 0 < top < len(smooth) - 1:
        left, centre, right = smooth[top - 1:top + 2]
        curvature = left - 2 * centre + right
        if curvature < 0:
            offset = 0.5 * (left - right) / curvature
    width = edges[1] - edges[0]
    return float(edges[0] + (top + 0.5 + offset) * width)


def check_settings(config) -> None:
    """Refuse an unknown normalisation or bias correction before any image is read."""
    if config.normalisation not in NORMALISATIONS:
        raise UserError(f"config normalisation={config.normalisation!r}: use one of {', '.join(NORMALISATIONS)}")
    bias_field.check_method(config.bias_correction)


def normalise_channels(channels: list[np.ndarray], method: str, *, bias_correction: str = "none") -> np.ndarray:
    """Stack the images, bias-corrected (config.bias_correction) then normalised, into a (D, H, W, C) float32 volume.

    Voxels at 0 (outside the brain, or outside a brain mask the caller applied)
    stay out of every statistic and of the bias-field fit; a background at another
    value is moved to 0 first (`zero_background`).
    """
    return np.stack([normalise(bias_field.correct(zero_background(image), bias_correction), method)
                     for image in channels], axis=-1)


def flair_channel(config) -> int:
    """The channel that selects candidates (config.data.flair among config.data.modalities)."""
    modalities = tuple(config.data.modalities)
    if config.data.flair not in modalities:
        raise UserError(
            f"config data.modalities {', '.join(modalities)} lacks {config.data.flair!r}: "
            "FLAIR is required (candidate selection uses it)"
        )
    return modalities.index(config.data.flair)


def candidate_mask(flair_normalised: np.ndarray, min_th: float) -> np.ndarray:
    """Voxels worth classifying: normalised FLAIR above min_th."""
    return flair_normalised > min_th
