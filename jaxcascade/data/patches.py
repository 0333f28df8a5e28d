"""Patch extraction, pure and jit-able. Which centres are drawn for training is `sampling.py`.

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

from jaxcascade.runtime import distributed


def pad_volume(volume: jax.Array | np.ndarray, patch_size: int) -> jax.Array:
    """Zero-pad the three spatial axes of a (D, H, W, C) volume by patch_size // 2."""
    half = patch_size // 2
    return jnp.pad(jnp.asarray(volume), ((half, half), (half, half), (half, half), (0, 0)))


# Volumes reach the jitted kernels padded up to a multiple of this on each axis, so
# subjects of slightly different shapes share one compilation (segmenting a study).
SHAPE_BUCKET = 32


def bucketed_widths(shape, pad: list[tuple[int, int]], multiple: int = SHAPE_BUCKET) -> tuple:
    """np.pad widths of a (D, H, W, C) volume: `pad` on its spatial axes, each grown at its end to a multiple."""
    widths = []
    for size, (before, after) in zip(shape[:3], pad):
        widths.append((int(before), int(after + -(size + before + after) % multiple)))
    return tuple(widths) + ((0, 0),)


def put_padded(volume: np.ndarray, pad: list[tuple[int, int]]) -> jax.Array:
    """A (D, H, W, C) volume on this process's devices, padded there by `bucketed_widths(volume.shape, pad)`.

    The host sends the volume, not its padded copy (up to 1.5x larger for a
    1 mm brain): 3x less host time on a CPU, less to transfer to a GPU.
    """
    return _padder(bucketed_widths(volume.shape, pad))(distributed.put_local_replicated(volume))


@functools.lru_cache(maxsize=None)
def _padder(widths: tuple):
    return jax.jit(lambda volume: jnp.pad(volume, widths))


def with_subject_index(centres: jax.Array, subject: int = 0) -> jax.Array:
    """(N, 3) centres -> (N, 4) rows (subject, z, y, x), the index `gather_patches` takes."""
    centres = jnp.asarray(centres, jnp.int32)
    return jnp.concatenate([jnp.full((centres.shape[0], 1), subject, jnp.int32), centres], axis=1)


def gather_patches(padded_volumes: jax.Array, index: jax.Array, patch_size: int | tuple[int, int, int]) -> jax.Array:
    """Patches from a stack of padded volumes.

    Args:
      padded_volumes: (subjects, D + 2h, H + 2h, W + 2h, C), h = patch_size // 2.
      index: (N, 4) int rows (subject, z, y, x) of centres in unpadded coordinates
        (equivalently: of patch corners in padded coordinates).
      patch_size: p, or a (p_z, p_y, p_x) box (the dense kernel's blocks).

    Returns:
      (N, p, p, p, C) patches.
    """
    channels = padded_volumes.shape[-1]
    box = (patch_size,) * 3 if isinstance(patch_size, int) else tuple(patch_size)

    def one(row):
        # In padded coordinates the patch corner is the unpadded centre.
        start = (row[0], row[1], row[2], row[3], jnp.zeros((), row.dtype))
        patch = lax.dynamic_slice(padded_volumes, start, (1, *box, channels))
        return patch[0]

    return jax.vmap(one)(index)


@functools.partial(jax.jit, static_argnames="patch_size")
def extract_patches(volume: jax.Array, centres: jax.Array, patch_size: int = 11) -> jax.Array:
    """(N, p, p, p, C) patches of a (D, H, W, C) volume around (N, 3) integer centres."""
    padded = pad_volume(volume, patch_size)[None]
    return gather_patches(padded, with_subject_index(centres), patch_size)
