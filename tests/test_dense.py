"""The dense whole-volume kernel reproduces patch-wise outputs exactly, borders included.

Parametrised over the network registry: every network with a dense form
(`dense_halo` not None) must match its own patch-wise outputs, and every
network without one must be refused by `--inference dense`.
"""

import jax
import nibabel as nib
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings, strategies as st
from hypothesis.extra.numpy import arrays

from jaxcascade.segmentation import cascade, dense, inference
from jaxcascade import cli
from jaxcascade.networks import models
from jaxcascade.errors import UserError
from conftest import held_out_inputs, model_config


def _has_dense_form(network) -> bool:
    return nnx.eval_shape(lambda: models.build_network(model_config(network), 2, 0)).dense_halo is not None


DENSE_NETWORKS = [name for name in sorted(models.NETWORKS) if _has_dense_form(name)]
PATCH_ONLY_NETWORKS = [name for name in sorted(models.NETWORKS) if not _has_dense_form(name)]


def _random_stage(network="valverde2017_valid", patch_size=11, seed=0):
    model = models.build_network(model_config(network, patch_size), 2, seed)
    _, variables = models.split_model(model)
    rng = np.random.default_rng(seed)
    # Perturb every weight and give BatchNorm non-trivial running statistics.
    variables = jax.tree.map(lambda a: a + 0.1 * rng.normal(size=a.shape).astype(np.float32), variables)
    variables["batch_stats"] = jax.tree.map(lambda a: np.abs(a) + 0.5, variables["batch_stats"])
    return cascade.Stage.from_network(model, variables)


def _options(**values):
    return inference.InferenceOptions(batch_size=512, **values)


def test_both_methods_are_registered_under_one_interface():
    assert set(inference.CLASSIFIERS) == {"dense", "patch"} and inference.METHODS[0] == "auto"


@pytest.mark.parametrize("network", DENSE_NETWORKS)
@pytest.mark.parametrize("tile_size, tiles_per_batch", [(8, 3), (16, 2)])
def test_dense_equals_patchwise_everywhere(network, tile_size, tiles_per_batch):
    stage = _random_stage(network)
    volume = np.random.default_rng(1).normal(size=(21, 17, 23, 2)).astype(np.float32)
    everywhere = np.ones(volume.shape[:3], bool)
    patchwise = inference.classify_patchwise(stage, volume, everywhere, _options())
    dense_result = dense.classify_dense(stage, volume, everywhere,
                                        _options(tile_size=tile_size, tiles_per_batch=tiles_per_batch))
    assert 0.01 < patchwise.mean() < 0.99  # a non-degenerate network
    # float32 reassociation between the two formulations stays below 1e-5 (measured 3e-7).
    assert np.abs(dense_result - patchwise).max() <= 1e-5


def test_blocks_pair_along_x_once_each():
    rng = np.random.default_rng(4)
    occupied = rng.random((5, 4, 7)) < 0.6
    origins = np.argwhere(occupied).astype(np.int32) * 8
    pairs, singles = dense.pair_along_x(rng.permutation(origins), 8)
    halves = np.concatenate([pairs, pairs + [0, 0, 8], singles])
    assert len(pairs) > 0 and len(singles) > 0
    # Every occupied block exactly once: as a pair's first or second half, or alone.
    assert sorted(map(tuple, halves)) == sorted(map(tuple, origins))
    assert all(occupied[tuple((p + [0, 0, 8]) // 8)] for p in pairs)


def test_a_block_gives_the_same_bits_in_a_cube_and_alone():
    # Eight occupied blocks run as one 2 x 2 x 2 box; each alone runs as a single block. Their conv2 (rows of
    # 10 and 18 outputs: Winograd tiles) starts at multiples of the tile size, 8, so a kept output falls in
    # the same tile either way, and the probabilities agree bit for bit, not just to rounding.
    stage = _random_stage()
    volume = np.random.default_rng(5).normal(size=(16, 16, 16, 2)).astype(np.float32)
    everywhere = np.ones(volume.shape[:3], bool)
    _, origins = dense.tile_geometry(everywhere.shape, 8, stage.dense_halo, 11)
    assert [group for group, _ in dense.group_blocks(origins, 8)] == [(2, 2, 2)]
    options = _options(tile_size=8, tiles_per_batch=8)
    together = dense.classify_dense(stage, volume, everywhere, options)
    alone = np.zeros_like(together)
    for z, y, x in origins:
        block = np.zeros_like(everywhere)
        block[z : z + 8, y : y + 8, x : x + 8] = True
        alone += dense.classify_dense(stage, volume, block, options)
    np.testing.assert_array_equal(alone, together)


def test_dense_respects_the_mask_and_skips_empty_tiles():
    stage = _random_stage()
    volume = np.random.default_rng(2).normal(size=(20, 20, 20, 2)).astype(np.float32)
    mask = np.zeros(volume.shape[:3], bool)
    mask[0, 0, 0] = mask[19, 19, 19] = mask[3, 15, 9] = True
    patchwise = inference.classify_patchwise(stage, volume, mask, _options())
    pad, origins = dense.tile_geometry(mask.shape, 8, stage.dense_halo, 11)
    assert len(dense.occupied_tiles(mask, origins, 8)) == 3 < len(origins) == 27
    got = dense.classify_dense(stage, volume, mask, _options(tile_size=8, tiles_per_batch=2))
    assert np.count_nonzero(got) == 3
    assert np.abs(got - patchwise).max() <= 1e-5


@pytest.mark.parametrize("network", DENSE_NETWORKS)
def test_dense_with_a_wider_patch_uses_a_dilated_dense_layer(network):
    stage = _random_stage(network, patch_size=15)  # 15 -> 13 -> 6 -> 4 -> 2: dense1 is a 2^3 kernel
    volume = np.random.default_rng(3).normal(size=(12, 13, 11, 2)).astype(np.float32)
    everywhere = np.ones(volume.shape[:3], bool)
    patchwise = inference.classify_patchwise(stage, volume, everywhere, _options())
    got = dense.classify_dense(stage, volume, everywhere, _options(tile_size=8, tiles_per_batch=2))
    assert np.abs(got - patchwise).max() <= 1e-5


@pytest.mark.parametrize("network", PATCH_ONLY_NETWORKS)
def test_dense_is_refused_where_it_is_not_exact(network):
    model = nnx.eval_shape(lambda: models.build_network(model_config(network), 2, 0))
    stage = cascade.Stage.from_network(model)
    assert stage.dense_halo is None
    assert inference.resolve_method(stage, "auto") == "patch"
    with pytest.raises(UserError, match="no exact dense form"):
        inference.resolve_method(stage, "dense")
    if hasattr(model, "dense"):
        with pytest.raises(ValueError):
            model.dense(np.zeros((1, 12, 12, 12, 2), np.float32))


def test_segment_dense_and_patch_paths_agree(trained_model, cohort, tmp_path):
    maps = {}
    for method in ("dense", "patch"):
        out = tmp_path / method
        out.mkdir()
        assert cli.main(["segment", "--model", str(trained_model), *held_out_inputs(cohort), "--out",
                         str(out / "seg.nii.gz"), "--probabilities", str(out), "--inference", method]) == 0
        maps[method] = [np.asarray(nib.load(out / f"stage{s}.nii.gz").dataobj) for s in (1, 2)]
    for dense_map, patch_map in zip(maps["dense"], maps["patch"]):
        assert np.count_nonzero(patch_map) > 0
        assert np.abs(dense_map - patch_map).max() <= 1e-5


@settings(max_examples=80, deadline=None)
@given(occupied=arrays(bool, st.tuples(*(st.integers(1, 6) for _ in range(3))), elements=st.booleans())
       | arrays(np.float64, st.tuples(*(st.integers(1, 6) for _ in range(3))), elements=st.floats(0, 1))
       .map(lambda a: a > 0.2), tile=st.sampled_from([4, 12]), seed=st.integers(0, 2**16))
def test_groups_hold_every_occupied_block_once(occupied, tile, seed):
    """Cubes, pairs and singles partition the occupied blocks; a group holds only occupied blocks."""
    origins = np.random.default_rng(seed).permutation(np.argwhere(occupied)).astype(np.int32) * tile
    members = []
    for group, starts in dense.group_blocks(origins, tile):
        assert group in ((2, 2, 2), (1, 1, 2), (1, 1, 1)) and len(starts)
        for offset in np.ndindex(*group):
            placed = starts + np.array(offset, np.int32) * tile
            assert occupied[tuple((placed // tile).T)].all()
            members += map(tuple, placed)
    assert sorted(members) == sorted(map(tuple, origins))
