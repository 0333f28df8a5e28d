"""Random intensity transforms of training patches, inside the jitted train step.

`augment_intensity(patches, rng, settings)` changes the intensities of
(B, p, p, p, C) patches of normalised images, independently per sample and per
channel, and leaves their geometry (hence their labels) alone. Each transform
fires with its own probability and draws its parameter uniformly from its
range; the order is that of an acquisition followed by a normalisation:

  tail         x' = k + s * (x - k) above the knee k (z units), x below it: the
               brightest tissue's contrast to the rest compressed (s < 1) or
               stretched (s > 1), as lesion contrast differs between scanners
  bias field   x' = lo + (x - lo) * exp(f), f trilinear between 8 random corner
               values in [-bias_field_max_log, +bias_field_max_log]
  gamma        x' = lo + (hi - lo) * ((x - lo) / (hi - lo)) ** gamma, log(gamma) uniform
  contrast     x' = mean + c * (x - mean)
  brightness   x' = scale * x + shift
  noise        x' = x + sigma * N(0, 1) per voxel

where lo, hi and mean are the patch's own minimum, maximum and mean (per
channel), and every number is in the normalised (z) units the network sees.

The seed code has none of this: `config.train.intensity_augmentation.enabled`
is False in the faithful default and True in configs/robust.py. Disabled, the
function returns its input and the train step traces no extra operation.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxcascade.errors import UserError


@dataclasses.dataclass(frozen=True)
class IntensityAugmentation:
    """Probabilities and ranges of the transforms; hashable, so a static argument of the jitted step.

    The defaults change nothing (IntensityAugmentation() is 'off').
    """

    enabled: bool = False
    tail_probability: float = 0.0
    tail_knee: tuple[float, float] = (0.0, 0.0)
    tail_slope: tuple[float, float] = (1.0, 1.0)
    bias_field_probability: float = 0.0
    bias_field_max_log: float = 0.0  # the field stays within [exp(-m), exp(m)]
    gamma_probability: float = 0.0
    gamma: tuple[float, float] = (1.0, 1.0)
    contrast_probability: float = 0.0
    contrast: tuple[float, float] = (1.0, 1.0)
    brightness_probability: float = 0.0
    brightness_scale: tuple[float, float] = (1.0, 1.0)
    brightness_shift: tuple[float, float] = (0.0, 0.0)
    noise_probability: float = 0.0
    noise_std: tuple[float, float] = (0.0, 0.0)

    @classmethod
    def from_config(cls, block) -> "IntensityAugmentation":
        """The settings of config.train.intensity_augmentation (absent or disabled: off), checked."""
        if block is None or not block.enabled:
            return OFF  # one 'off' value, so every disabled config shares one compiled step
        prefix = "config.train.intensity_augmentation"
        values = {"enabled": True}
        for field in dataclasses.fields(cls):
            if field.name == "enabled":
                continue
            if field.name not in block:
                raise UserError(f"{prefix}.{field.name}: missing (see jaxcascade/configs/default.py)")
            values[field.name] = _checked(f"{prefix}.{field.name}", block[field.name], field.name)
        return cls(**values)


OFF = IntensityAugmentation()


def _checked(key: str, value, name: str):
    if name.endswith("_probability") or name == "bias_field_max_log":
        number = _number(key, value)
        if name.endswith("_probability") and not 0.0 <= number <= 1.0:
            raise UserError(f"{key}={value}: a probability lies in [0, 1]")
        if number < 0:
            raise UserError(f"{key}={value}: must be >= 0")
        return number
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise UserError(f"{key}={value!r}: expected a range (low, high), e.g. --config.{key[7:]}=0.8,1.2")
    low, high = (_number(key, v) for v in value)
    if low > high:
        raise UserError(f"{key}={value!r}: low end above high end")
    if name in ("gamma", "contrast", "brightness_scale", "tail_slope") and low <= 0:
        raise UserError(f"{key}={value!r}: factors must be > 0")
    if name == "noise_std" and low < 0:
        raise UserError(f"{key}={value!r}: a standard deviation is >= 0")
    return (low, high)


def _number(key: str, value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise UserError(f"{key}={value!r}: expected a number") from None


def augment_intensity(patches: jax.Array, rng: jax.Array, settings: IntensityAugmentation) -> jax.Array:
    """Randomly transformed intensities of (B, p, p, p, C) patches; see the module docstring."""
    if not settings.enabled:
        return patches
    bias_rng, gamma_rng, contrast_rng, brightness_rng, noise_rng, tail_rng = jax.random.split(rng, 6)
    patches = _tail(patches, tail_rng, settings)
    patches = _bias_field(patches, bias_rng, settings)
    patches = _gamma(patches, gamma_rng, settings)
    patches = _contrast(patches, contrast_rng, settings)
    patches = _brightness(patches, brightness_rng, settings)
    return _noise(patches, noise_rng, settings)


def _per_image_shape(patches: jax.Array) -> tuple[int, ...]:
    """One value per sample and channel, broadcasting over the three spatial axes."""
    return (patches.shape[0], 1, 1, 1, patches.shape[-1])


def _where_drawn(rng: jax.Array, probability: float, patches: jax.Array, transformed: jax.Array) -> jax.Array:
    # jnp.where, not a parameter set to its identity value, so that an image the
    # draw skips keeps its exact values (no rounding through x ** 1.0 etc.).
    apply = jax.random.bernoulli(rng, probability, _per_image_shape(patches))
    return jnp.where(apply, transformed, patches)


def _spatial_min_max(patches: jax.Array) -> tuple[jax.Array, jax.Array]:
    return patches.min(axis=(1, 2, 3), keepdims=True), patches.max(axis=(1, 2, 3), keepdims=True)


def _tail(patches, rng, settings):
    # In the normalised units the whole image shares (not per patch, unlike gamma), so one
    # knee means the same tissue in every patch: above it lie lesions on FLAIR, white matter on T1.
    apply_rng, knee_rng, slope_rng = jax.random.split(rng, 3)
    knee = jax.random.uniform(knee_rng, _per_image_shape(patches), minval=settings.tail_knee[0],
                              maxval=settings.tail_knee[1])
    log_slope = jax.random.uniform(slope_rng, _per_image_shape(patches), minval=jnp.log(settings.tail_slope[0]),
                                   maxval=jnp.log(settings.tail_slope[1]))
    remapped = jnp.where(patches > knee, knee + jnp.exp(log_slope) * (patches - knee), patches)
    return _where_drawn(apply_rng, settings.tail_probability, patches, remapped)


def _bias_field(patches, rng, settings):
    # Normalised patches have no zero intensity to multiply about; the patch
    # minimum stands in for it (as in the gamma transform), so the darkest
    # voxel keeps its value and brighter ones are scaled by the field.
    apply_rng, corner_rng = jax.random.split(rng)
    batch, *spatial, channels = patches.shape
    limit = settings.bias_field_max_log
    corners = jax.random.uniform(corner_rng, (batch, 2, 2, 2, channels), minval=-limit, maxval=limit)
    # Trilinear interpolation is a convex combination of the corners, so the
    # log field stays within [-limit, limit] everywhere in the patch.
    weights = [jnp.stack([1.0 - t, t]) for t in (jnp.linspace(0.0, 1.0, n) for n in spatial)]
    log_field = jnp.einsum("nabcz,ai,bj,ck->nijkz", corners, *weights)
    low, _ = _spatial_min_max(patches)
    return _where_drawn(apply_rng, settings.bias_field_probability, patches,
                        low + (patches - low) * jnp.exp(log_field))


def _gamma(patches, rng, settings):
    # A power law needs values in [0, 1]: each patch channel is rescaled by its
    # own range and mapped back, so the transform keeps its minimum and maximum.
    apply_rng, gamma_rng = jax.random.split(rng)
    low_gamma, high_gamma = settings.gamma
    log_gamma = jax.random.uniform(gamma_rng, _per_image_shape(patches),
                                   minval=jnp.log(low_gamma), maxval=jnp.log(high_gamma))
    low, high = _spatial_min_max(patches)
    spread = jnp.maximum(high - low, 1e-6)  # a constant patch stays constant
    unit = (patches - low) / spread
    return _where_drawn(apply_rng, settings.gamma_probability, patches, low + spread * unit ** jnp.exp(log_gamma))


def _contrast(patches, rng, settings):
    apply_rng, factor_rng = jax.random.split(rng)
    factor = jax.random.uniform(factor_rng, _per_image_shape(patches),
                                minval=settings.contrast[0], maxval=settings.contrast[1])
    mean = patches.mean(axis=(1, 2, 3), keepdims=True)
    return _where_drawn(apply_rng, settings.contrast_probability, patches, mean + factor * (patches - mean))


def _brightness(patches, rng, settings):
    # On normalised images a raw intensity scale cancels; what survives is the
    # normalisation's own error: a spread estimated `1/scale` off and a centre
    # `shift` spreads off (lesion load, bias fields, another scanner).
    apply_rng, scale_rng, shift_rng = jax.random.split(rng, 3)
    scale = jax.random.uniform(scale_rng, _per_image_shape(patches),
                               minval=settings.brightness_scale[0], maxval=settings.brightness_scale[1])
    shift = jax.random.uniform(shift_rng, _per_image_shape(patches),
                               minval=settings.brightness_shift[0], maxval=settings.brightness_shift[1])
    return _where_drawn(apply_rng, settings.brightness_probability, patches, scale * patches + shift)


def _noise(patches, rng, settings):
    apply_rng, std_rng, noise_rng = jax.random.split(rng, 3)
    std = jax.random.uniform(std_rng, _per_image_shape(patches),
                             minval=settings.noise_std[0], maxval=settings.noise_std[1])
    noise = jax.random.normal(noise_rng, patches.shape, patches.dtype)
    return _where_drawn(apply_rng, settings.noise_probability, patches, patches + std * noise)
