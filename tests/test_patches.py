import jax
import numpy as np

from jaxcascade.data import patches


def reference_patch(volume, centre, size):
    """Hand-indexed patch: explicit loops, zeros outside the image."""
    half = size // 2
    out = np.zeros((size, size, size, volume.shape[-1]), volume.dtype)
    for a in range(size):
        for b in range(size):
            for c in range(size):
                z, y, x = centre[0] + a - half, centre[1] + b - half, centre[2] + c - half
                if 0 <= z < volume.shape[0] and 0 <= y < volume.shape[1] and 0 <= x < volume.shape[2]:
                    out[a, b, c] = volume[z, y, x]
    return out


def test_extract_patches_matches_hand_indexing_including_borders():
    rng = np.random.default_rng(0)
    volume = rng.normal(size=(9, 12, 7, 2)).astype(np.float32)
    centres = np.array([[4, 6, 3], [0, 0, 0], [8, 11, 6], [0, 11, 3], [2, 1, 6], [8, 0, 0]], np.int32)
    got = np.asarray(patches.extract_patches(volume, centres, patch_size=11))
    assert got.shape == (6, 11, 11, 11, 2)
    for i, centre in enumerate(centres):
        np.testing.assert_array_equal(got[i], reference_patch(volume, centre, 11))
    # A corner patch is mostly padding: exactly the in-image part is nonzero.
    assert np.count_nonzero(got[1][..., 0]) == 6 * 6 * 6


def test_extract_patches_centre_voxel_and_small_patch():
    volume = np.arange(5 * 5 * 5, dtype=np.float32).reshape(5, 5, 5, 1)
    got = np.asarray(patches.extract_patches(volume, np.array([[2, 3, 1]]), patch_size=3))
    assert got[0, 1, 1, 1, 0] == volume[2, 3, 1, 0]
    np.testing.assert_array_equal(got[0], reference_patch(volume, (2, 3, 1), 3))


def test_extract_patches_is_jittable_inside_other_functions():
    volume = np.ones((6, 6, 6, 1), np.float32)
    total = jax.jit(lambda v, c: patches.extract_patches(v, c, 5).sum())(volume, np.array([[0, 0, 0]], np.int32))
    assert float(total) == 3 * 3 * 3


def test_gather_patches_picks_the_subject():
    a = np.zeros((4, 4, 4, 1), np.float32)
    b = np.ones((4, 4, 4, 1), np.float32)
    stack = np.stack([patches.pad_volume(a, 3), patches.pad_volume(b, 3)])
    got = np.asarray(patches.gather_patches(stack, np.array([[1, 1, 1, 1], [0, 1, 1, 1]], np.int32), 3))
    assert got[0].min() == 1.0 and got[1].max() == 0.0
