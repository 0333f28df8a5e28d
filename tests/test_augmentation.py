"""Intensity augmentation: shapes, ranges, determinism by key, independence, and labels untouched in the train step."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcascade import config as config_lib
from jaxcascade.training import train_steps
from jaxcascade.errors import UserError
from conftest import train_setup
from jaxcascade.training.intensity_augmentation import OFF, IntensityAugmentation, augment_intensity

BATCH, SIZE, CHANNELS = 16, 11, 2


def _only(**settings) -> IntensityAugmentation:
    """One transform switched on (probability 1 unless given), the others off."""
    return IntensityAugmentation(enabled=True, **settings)


def _patches(seed: int = 0) -> jax.Array:
    return jax.random.normal(jax.random.key(seed), (BATCH, SIZE, SIZE, SIZE, CHANNELS))


def _per_image(values: jax.Array) -> np.ndarray:
    """(B, C) rows of per-sample, per-channel statistics, voxels flattened."""
    return np.asarray(values).transpose(0, 4, 1, 2, 3).reshape(BATCH, CHANNELS, -1)


ROBUST = IntensityAugmentation.from_config(config_lib.load_config("robust").train.intensity_augmentation)
# Switched on, every probability 0: the transforms are traced but select their inputs.
ZERO = dataclasses.replace(ROBUST, **{f.name: 0.0 for f in dataclasses.fields(ROBUST)
                                      if f.name.endswith("_probability")})


def test_off_is_the_identity_and_the_default_config_is_off():
    patches = _patches()
    assert augment_intensity(patches, jax.random.key(0), OFF) is patches
    assert IntensityAugmentation.from_config(config_lib.load_config().train.intensity_augmentation) == OFF
    assert IntensityAugmentation.from_config(None) == OFF
    np.testing.assert_array_equal(augment_intensity(patches, jax.random.key(0), ZERO), patches)


def test_shape_dtype_determinism_by_key_and_jit():
    patches = _patches()
    first = augment_intensity(patches, jax.random.key(1), ROBUST)
    assert first.shape == patches.shape and first.dtype == patches.dtype
    assert bool(jnp.isfinite(first).all())
    np.testing.assert_array_equal(first, augment_intensity(patches, jax.random.key(1), ROBUST))
    assert not np.array_equal(first, augment_intensity(patches, jax.random.key(2), ROBUST))
    jitted = jax.jit(augment_intensity, static_argnums=2)
    np.testing.assert_allclose(jitted(patches, jax.random.key(1), ROBUST), first, rtol=1e-5, atol=1e-5)


def test_bias_field_stays_within_its_bounds_and_varies_smoothly_across_the_patch():
    patches = _patches()
    limit = 0.2
    out = augment_intensity(patches, jax.random.key(3), _only(bias_field_probability=1.0, bias_field_max_log=limit))
    low = patches.min(axis=(1, 2, 3), keepdims=True)
    above = np.asarray(patches - low)
    field = np.asarray(out - low)[above > 1e-3] / above[above > 1e-3]
    assert np.exp(-limit) - 1e-5 <= field.min() and field.max() <= np.exp(limit) + 1e-5
    # On a flat patch (its one dark voxel fixing the minimum at 0) the field itself shows:
    # its logarithm is trilinear, so second differences along every axis vanish.
    flat = jnp.full((BATCH, SIZE, SIZE, SIZE, CHANNELS), 2.0).at[:, 0, 0, 0, :].set(0.0)
    log_field = np.log(np.asarray(augment_intensity(flat, jax.random.key(3), _only(
        bias_field_probability=1.0, bias_field_max_log=limit)))[:, 1:, 1:, 1:] / 2.0)
    for axis in (1, 2, 3):
        np.testing.assert_allclose(np.diff(log_field, 2, axis=axis), 0.0, atol=1e-5)
    assert np.ptp(log_field, axis=(1, 2, 3)).min() > 0.01  # not a constant gain


def test_gamma_keeps_each_patch_range_and_voxel_order():
    patches = _patches()
    out = augment_intensity(patches, jax.random.key(4), _only(gamma_probability=1.0, gamma=(0.5, 2.0)))
    before, after = _per_image(patches), _per_image(out)
    np.testing.assert_allclose(after.min(-1), before.min(-1), atol=1e-5)
    np.testing.assert_allclose(after.max(-1), before.max(-1), atol=1e-5)
    # A power law is monotonic: every patch keeps its voxels' order.
    ranks = np.argsort(before, -1)
    assert np.all(np.diff(np.take_along_axis(after, ranks, -1), axis=-1) >= -1e-6)
    # The gamma is recoverable from any voxel; it lies in the range and differs per sample and channel.
    low, high = before.min(-1, keepdims=True), before.max(-1, keepdims=True)
    unit_before, unit_after = (before - low) / (high - low), (after - low) / (high - low)
    middle = (unit_before > 0.2) & (unit_before < 0.8)
    gammas = np.array([[np.median(np.log(a[m]) / np.log(b[m])) for a, b, m in zip(ra, rb, rm)]
                       for ra, rb, rm in zip(unit_after, unit_before, middle)])
    assert 0.5 - 1e-3 <= gammas.min() and gammas.max() <= 2.0 + 1e-3
    assert len(np.unique(gammas.round(4))) == BATCH * CHANNELS


def test_contrast_and_brightness_are_affine_with_factors_in_range():
    patches = _patches()
    contrast = _per_image(augment_intensity(patches, jax.random.key(5), _only(contrast_probability=1.0,
                                                                                contrast=(0.75, 1.25))))
    before = _per_image(patches)
    np.testing.assert_allclose(contrast.mean(-1), before.mean(-1), atol=1e-5)  # about the patch mean
    factors = contrast.std(-1) / before.std(-1)
    assert 0.75 - 1e-4 <= factors.min() and factors.max() <= 1.25 + 1e-4
    brightness = _per_image(augment_intensity(patches, jax.random.key(6), _only(
        brightness_probability=1.0, brightness_scale=(0.9, 1.1), brightness_shift=(-0.1, 0.1))))
    for sample in range(BATCH):
        for channel in range(CHANNELS):
            scale, shift = np.polyfit(before[sample, channel], brightness[sample, channel], 1)
            assert 0.9 - 1e-4 <= scale <= 1.1 + 1e-4 and -0.1 - 1e-4 <= shift <= 0.1 + 1e-4


def test_tail_remaps_only_values_above_the_knee_monotonically_with_slope_in_range():
    patches = _patches()
    out = augment_intensity(patches, jax.random.key(9), _only(tail_probability=1.0, tail_knee=(0.5, 1.0),
                                                              tail_slope=(0.25, 0.5)))
    x, y = _per_image(patches), _per_image(out)
    below = x <= 0.5
    np.testing.assert_array_equal(y[below], x[below])  # below the lowest knee nothing moves
    above = x > 1.0  # above the highest knee: compressed towards the knee by the slope
    assert (y[above] < x[above]).all() and (y[above] > 0.5).all()
    for b in range(BATCH):
        for c in range(CHANNELS):
            order = np.argsort(x[b, c])
            assert (np.diff(y[b, c][order]) >= -1e-6).all()  # monotone: tissue order is kept
            top = x[b, c] > 1.2
            slope = np.polyfit(x[b, c][top], y[b, c][top], 1)[0]
            assert 0.25 - 1e-4 <= slope <= 0.5 + 1e-4


def test_noise_std_in_range_and_independent_per_sample_and_channel():
    patches = _patches()
    out = augment_intensity(patches, jax.random.key(7), _only(noise_probability=1.0, noise_std=(0.05, 0.2)))
    noise = _per_image(out - patches)
    std = noise.std(-1)
    # 1331 voxels estimate a std to about 2 %.
    assert 0.05 * 0.9 <= std.min() and std.max() <= 0.2 * 1.1
    assert len(np.unique(std.round(5))) == BATCH * CHANNELS
    correlation = np.corrcoef(noise.reshape(BATCH * CHANNELS, -1))
    assert np.abs(correlation[~np.eye(BATCH * CHANNELS, dtype=bool)]).max() < 0.15


def test_each_transform_fires_per_sample_and_channel_with_its_probability():
    patches = jax.random.normal(jax.random.key(0), (256, 3, 3, 3, CHANNELS))
    out = augment_intensity(patches, jax.random.key(8), _only(contrast_probability=0.5, contrast=(2.0, 3.0)))
    changed = np.any(np.asarray(out != patches).reshape(256, -1, CHANNELS), axis=1)
    assert 0.4 < changed.mean() < 0.6
    # Channels draw apart: both, one or none of a sample's channels change.
    assert {tuple(row) for row in changed} == {(False, False), (False, True), (True, False), (True, True)}


def test_settings_from_config_are_checked():
    block = config_lib.apply_overrides(config_lib.load_config("robust"), [
        "--config.train.intensity_augmentation.gamma=0.8,1.2"]).train.intensity_augmentation
    assert IntensityAugmentation.from_config(block).gamma == (0.8, 1.2)
    for override, message in [("gamma_probability=1.5", "probability"), ("contrast=1.2,0.8", "low end"),
                              ("gamma=0,1", "> 0"), ("noise_std=a,b", "expected a number")]:
        config = config_lib.apply_overrides(config_lib.load_config("robust"),
                                            [f"--config.train.intensity_augmentation.{override}"])
        with pytest.raises(UserError, match=message):
            IntensityAugmentation.from_config(config.train.intensity_augmentation)


# ---- inside the jitted train step -------------------------------------------------------------

def _label_checksum_loss(logits, labels):
    """A loss that reports exactly which labels reached it (and nothing about the patches)."""
    return labels * jnp.arange(1, labels.shape[0] + 1) + 0.0 * logits.sum(-1)


@pytest.fixture(scope="module")
def network():
    graphdef, variables, tx, _ = train_setup(CHANNELS)
    rng = np.random.default_rng(0)
    batch = {"patches": jnp.asarray(rng.normal(size=(32, SIZE, SIZE, SIZE, CHANNELS)), jnp.float32),
             "labels": jnp.asarray(rng.integers(0, 2, 32), jnp.int32)}

    def fresh_state():  # the step donates its state: each call gets its own copy
        return train_steps.create_train_state(jax.tree.map(jnp.copy, variables), tx)

    return graphdef, fresh_state, batch


def test_train_step_without_intensity_augmentation_is_unchanged_by_its_switch(network):
    graphdef, fresh_state, batch = network
    off_state, _ = train_steps.make_train_step(graphdef, "seed")(fresh_state(), batch, jax.random.key(0))
    zero_state, _ = train_steps.make_train_step(graphdef, "seed", intensity=ZERO)(fresh_state(), batch,
                                                                                   jax.random.key(0))
    # The intensity key is folded in beside the step's split: geometric and dropout keys are the same.
    for off, zero in zip(jax.tree.leaves(off_state.variables), jax.tree.leaves(zero_state.variables)):
        np.testing.assert_array_equal(off, zero)


def test_train_step_augments_patches_and_leaves_labels_alone(network):
    graphdef, fresh_state, batch = network
    labels_before = np.asarray(batch["labels"]).copy()
    step = train_steps.make_train_step(graphdef, "seed", per_sample_loss=_label_checksum_loss,
                                       intensity=dataclasses.replace(ROBUST, gamma_probability=1.0))
    state, measurements = step(fresh_state(), batch, jax.random.key(0))
    expected = np.mean(labels_before * np.arange(1, 33))
    np.testing.assert_allclose(float(measurements["loss"]), expected, rtol=1e-6)
    np.testing.assert_array_equal(batch["labels"], labels_before)
    # The network saw other patches than without the augmentation: its first BatchNorm's statistics moved apart.
    off_state, _ = train_steps.make_train_step(graphdef, "seed")(fresh_state(), batch, jax.random.key(0))
    assert not np.allclose(state.batch_stats["bn1"]["mean"], off_state.batch_stats["bn1"]["mean"])


def test_the_intensity_key_is_neither_the_geometric_nor_the_dropout_key():
    from jaxcascade.training.train_steps import INTENSITY_STREAM

    step_key = jax.random.fold_in(jax.random.key(0), 5)
    intensity = np.asarray(jax.random.key_data(jax.random.fold_in(step_key, INTENSITY_STREAM)))
    for other in jax.random.split(step_key):
        assert not np.array_equal(intensity, np.asarray(jax.random.key_data(other)))
