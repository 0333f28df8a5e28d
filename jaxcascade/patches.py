"""Patch extraction (pure, jit-able) and the seed's training-set sampling.

A patch is the p^3 neighbourhood of a voxel, offsets -p//2..+p//2 on each axis,
zero outside the image. Extraction is one vectorised gather: the volume is
zero-padded by p//2 once and every patch is a `dynamic_slice` of it, vmapped
over centres, so no Python loop ever visits voxels.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


def pad_volume(volume: jax.Array | np.ndarray, patch_size: int) -> jax.Array:
    """Zero-pad the three spatial axes of a (D, H, W, C) volume by patch_size // 2."""
    half = patch_size // 2
    return jnp.pad(jnp.asarray(volume), ((half, half), (half, half), (half, half), (0, 0)))


def gather_patches(padded_volumes: jax.Array, index: jax.Array, patch_size: int) -> jax.Array:
    """Patches from a stack of padded volumes.

    Args:
      padded_volumes: (subjects, D + 2h, H + 2h, W + 2h, C), h = patch_size // 2.
      index: (N, 4) int rows (subject, z, y, x) of centres in unpadded coordinates.
      patch_size: p.

    Returns:
      (N, p, p, p, C) patches.
    """
    channels = padded_volumes.shape[-1]

    def one(row):
        # In padded coordinates the patch corner is the unpadded centre.
        start = (row[0], row[1], row[2], row[3], jnp.zeros((), row.dtype))
        patch = lax.dynamic_slice(padded_volumes, start, (1, patch_size, patch_size, patch_size, channels))
        return patch[0]

    return jax.vmap(one)(index)


@functools.partial(jax.jit, static_argnames="patch_size")
def extract_patches(volume: jax.Array, centres: jax.Array, patch_size: int = 11) -> jax.Array:
    """(N, p, p, p, C) patches of a (D, H, W, C) volume around (N, 3) integer centres."""
    padded = pad_volume(volume, patch_size)[None]
    centres = jnp.asarray(centres, jnp.int32)
    index = jnp.concatenate([jnp.zeros((centres.shape[0], 1), jnp.int32), centres], axis=1)
    return gather_patches(padded, index, patch_size)


def balanced_centres(
    positive_mask: np.ndarray, negative_mask: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """All positive voxels plus as many negatives drawn without replacement.

    Where there are fewer negatives than positives, all negatives are used (the
    seed code's `permutation(...)[:count]` behaves the same).

    Returns:
      centres (N, 3) int32 and labels (N,) int32 (1 lesion, 0 not), positives first.
    """
    positive = np.argwhere(positive_mask)
    negative = np.argwhere(negative_mask & ~positive_mask)
    chosen = rng.permutation(len(negative))[: len(positive)]
    negative = negative[np.sort(chosen)]
    centres = np.concatenate([positive, negative]).astype(np.int32).reshape(-1, 3)
    labels = np.concatenate([np.ones(len(positive), np.int32), np.zeros(len(negative), np.int32)])
    return centres, labels


def stage1_centres(lesion_mask, candidate_mask, rng):
    """CNN1's training voxels: all lesion voxels + the same number of non-lesion candidates."""
    return balanced_centres(lesion_mask, candidate_mask & ~lesion_mask, rng)


def hard_negative_mask(lesion_mask, stage1_probability, flair_normalised, *, probability_threshold, fallback_flair):
    """Non-lesion voxels CNN1 calls lesion; where there are none, bright FLAIR voxels (the seed's fallback)."""
    hard = (stage1_probability > probability_threshold) & ~lesion_mask
    if not hard.any():
        hard = (flair_normalised > fallback_flair) & ~lesion_mask
    return hard


def stage2_centres(lesion_mask, hard_negatives, rng):
    """CNN2's training voxels: all lesion voxels + the same number of CNN1's hard negatives."""
    return balanced_centres(lesion_mask, hard_negatives, rng)


def stratified_split(labels: np.ndarray, validation_fraction: float, rng: np.random.Generator):
    """Indices (train, validation) with each class split in the same proportion."""
    train, validation = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        n_val = int(round(len(members) * validation_fraction))
        validation.append(members[:n_val])
        train.append(members[n_val:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(validation))
