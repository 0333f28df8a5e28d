"""The dense inference method: exact whole-volume inference, tiled so memory stays bounded.

Patch-wise inference recomputes the same convolutions for every overlapping
patch (the first convolution of the default network is shared by 9^3 = 729
patches). The dense network (`Valverde2017.dense`) evaluates every voxel at
once with exactly the patch-wise result; here the volume is cut into T^3
output blocks, each read with the receptive-field halo, the blocks holding at
least one voxel to classify are batched through one jitted function (the
"vectorised sliding window"), and the results are stitched without seams
because blocks never overlap in their outputs.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Callable

import jax
import numpy as np
from flax import nnx

from jaxcascade.runtime import distributed
from jaxcascade.data import patches as patches_lib

if TYPE_CHECKING:
    from jaxcascade.segmentation.stage import Stage
    from jaxcascade.segmentation.options import InferenceOptions


def tile_geometry(shape: tuple[int, int, int], tile_size: int, halo: int, patch_size: int):
    """(padding per axis, tile origins (N, 3)) covering a volume of `shape` with T^3 output blocks.

    The padded volume starts `patch_size // 2` voxels before voxel 0 (where the
    first patch starts) and extends so the last block and its halo fit.
    """
    counts = [-(-size // tile_size) for size in shape]
    before = patch_size // 2
    pad = [(before, count * tile_size + halo - before - size) for size, count in zip(shape, counts)]
    grid = np.stack(np.meshgrid(*[np.arange(c) * tile_size for c in counts], indexing="ij"), -1)
    return pad, grid.reshape(-1, 3).astype(np.int32)


def occupied_tiles(mask: np.ndarray, origins: np.ndarray, tile_size: int) -> np.ndarray:
    """Origins of the blocks that hold at least one voxel of mask."""
    counts = [-(-size // tile_size) for size in mask.shape]
    padded = np.zeros([c * tile_size for c in counts], bool)
    padded[: mask.shape[0], : mask.shape[1], : mask.shape[2]] = mask
    blocks = padded.reshape(counts[0], tile_size, counts[1], tile_size, counts[2], tile_size).any(axis=(1, 3, 5))
    return origins[blocks.reshape(-1)]


def pair_along_x(origins: np.ndarray, tile_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(origins of x-neighbour pairs, origins of the blocks left single): each block in exactly one of them.

    A pair is evaluated as one T x T x 2T block: its halo is read and its first
    layers computed once for both (conv2 computes 14 x 14 x 26 outputs for a
    pair of 12^3 blocks instead of 2 x 14^3), where a cubic 24^3 block would
    add empty space.
    """
    origins = np.asarray(origins, np.int32).reshape(-1, 3)
    origins = origins[np.lexsort((origins[:, 2], origins[:, 1], origins[:, 0]))]
    firsts, taken, i = [], np.zeros(len(origins), bool), 0
    while i < len(origins) - 1:
        here, after = origins[i], origins[i + 1]
        if here[0] == after[0] and here[1] == after[1] and after[2] == here[2] + tile_size:
            firsts.append(i)
            taken[i] = taken[i + 1] = True
            i += 2
        else:
            i += 1
    return origins[firsts], origins[~taken]


def group_blocks(origins: np.ndarray, tile_size: int) -> list[tuple[tuple[int, int, int], np.ndarray]]:
    """Occupied blocks in groups that each run as one box: [(group shape in blocks, group origins), ...].

    Aligned 2 x 2 x 2 cubes of eight occupied blocks first (a brain's white matter is mostly such
    cubes), then x-neighbour pairs of the rest (`pair_along_x`), then single blocks; every block is
    in exactly one group. A group reads its halo once and computes its first layers once for all its
    blocks: conv2 computes 26^3 outputs for eight 12^3 blocks where pairs compute 4 x 14 x 14 x 26
    (14 % fewer) and single blocks 8 x 14^3, conv1 36 % fewer than pairs.
    """
    origins = np.asarray(origins, np.int32).reshape(-1, 3)
    groups = []
    if len(origins):
        index = origins // tile_size
        counts = 2 * (index.max(axis=0) // 2 + 1)  # an even number of blocks along each axis
        occupied = np.zeros(counts, bool)
        occupied[tuple(index.T)] = True
        halves = counts // 2
        cubes = occupied.reshape(halves[0], 2, halves[1], 2, halves[2], 2).all(axis=(1, 3, 5))
        in_cube = cubes.repeat(2, 0).repeat(2, 1).repeat(2, 2)
        groups.append(((2, 2, 2), (np.argwhere(cubes) * 2 * tile_size).astype(np.int32)))
        origins = origins[~in_cube[tuple(index.T)]]
    pairs, singles = pair_along_x(origins, tile_size)
    return [group for group in [*groups, ((1, 1, 2), pairs), ((1, 1, 1), singles)] if len(group[1])]


@functools.lru_cache(maxsize=None)
def make_tile_predictor(graphdef, tile_size: int, halo: int, before: int,
                        group: tuple[int, int, int] = (1, 1, 1)) -> Callable:
    """jitted (variables, padded_volume, padded_mask, origins (B, 3)) -> (B, gz T, gy T, gx T) lesion
    probability at the mask's voxels (0.5 elsewhere: logits 0), for groups of gz x gy x gx blocks of T^3
    (`group_blocks`).

    padded_mask is the (D', H', W', 1) bool mask of the voxels to classify, padded like the volume, which
    starts `before` voxels (patch_size // 2) ahead of voxel 0; the network computes only what they read.
    """
    box = tuple(count * tile_size + halo for count in group)
    out_box = tuple(count * tile_size for count in group)

    def predict_tiles(variables, padded_volume, padded_mask, origins):
        tiles = patches_lib.gather_patches(padded_volume[None], patches_lib.with_subject_index(origins), box)
        # Output voxel o + (i, j, k) of a block is the patch whose first voxel is padded voxel o + (i, j, k):
        # the volume's voxel there, whose mask value sits `before` further on in the padded mask.
        where = patches_lib.gather_patches(padded_mask[None], patches_lib.with_subject_index(origins + before),
                                           out_box)[..., 0]
        model = nnx.merge(graphdef, variables["params"], variables["batch_stats"])
        return jax.nn.softmax(model.dense(tiles, where=where), axis=-1)[..., 1]

    return jax.jit(predict_tiles)


def classify_dense(stage: Stage, volume: np.ndarray, mask: np.ndarray, options: InferenceOptions,
                   progress: Callable | None = None) -> np.ndarray:
    """Lesion probability at every voxel of mask (0 elsewhere), equal to the patch-wise result.

    The inference methods' classifier interface (see `inference.py`); options.tile_size
    and options.tiles_per_batch set the blocks. Peak memory grows with
    tiles_per_batch * (tile_size + halo)^3 times the widest layer (64
    channels; x9 or x27 for the taps where the GEMM formulations run instead
    of jaxcascade's CPU kernel). Small tiles
    waste more on halos but skip more empty space and stay in cache: 12^3
    blocks, 8 per call, were fastest on a 2-core CPU (benchmarks/inference.py);
    accelerators prefer larger ones. Occupied blocks that fill an aligned
    2 x 2 x 2 cube run as one 2T^3 box, and x-neighbours of the rest as one
    T x T x 2T box (`group_blocks`), which shares their halo, with
    bit-identical probabilities.
    """
    if stage.dense_halo is None:
        raise ValueError("this stage's network has no exact dense form")
    tile_size, halo = options.tile_size, stage.dense_halo
    if not mask.any():
        return np.zeros(mask.shape, np.float32)
    pad, origins = tile_geometry(mask.shape, tile_size, halo, stage.patch_size)
    origins = occupied_tiles(mask, origins, tile_size)
    # Reads stay inside the tiles, so the bucket's extra zeros are never seen.
    padded = patches_lib.put_padded(volume, pad)
    padded_mask = patches_lib.put_padded(np.asarray(mask, bool)[..., None], pad)
    variables = stage.variables  # on this process's devices since the stage was built (`Stage`)
    blocks, placed = [], []
    for group, starts in group_blocks(origins, tile_size):
        predict = make_tile_predictor(stage.graphdef, tile_size, halo, stage.patch_size // 2, group)
        out = distributed.map_batches(
            lambda chunk, predict=predict: predict(variables, padded, padded_mask, chunk), starts,
            max(1, options.tiles_per_batch // int(np.prod(group))), progress)
        for offset in np.ndindex(*group):  # a group's blocks, each at its own origin
            z, y, x = (k * tile_size for k in offset)
            blocks.append(out[:, z : z + tile_size, y : y + tile_size, x : x + tile_size])
            placed.append(starts + np.array([z, y, x], np.int32))
    full = stitch_blocks(np.concatenate(blocks), np.concatenate(placed), mask.shape, tile_size)
    return np.where(mask, full, np.float32(0))


def stitch_blocks(blocks: np.ndarray, origins: np.ndarray, shape: tuple[int, int, int], tile_size: int) -> np.ndarray:
    """(D, H, W) volume of (N, T, T, T) blocks placed at their origins (multiples of T); 0 elsewhere."""
    counts = [-(-size // tile_size) for size in shape]
    full = np.zeros([count * tile_size for count in counts], np.float32)
    # A (tile z, tile y, tile x, T, T, T) view of the same memory: one fancy assignment places every block.
    grid = full.reshape(counts[0], tile_size, counts[1], tile_size, counts[2], tile_size).transpose(0, 2, 4, 1, 3, 5)
    index = np.asarray(origins) // tile_size
    grid[index[:, 0], index[:, 1], index[:, 2]] = blocks
    d, h, w = shape
    return full[:d, :h, :w]
