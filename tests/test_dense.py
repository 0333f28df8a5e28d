"""The dense whole-volume kernel reproduces patch-wise outputs exactly, borders included."""

import jax
import nibabel as nib
import numpy as np
import pytest

from jaxcascade import cascade, cli, dense, models, train
from jaxcascade.configs import default
from jaxcascade.errors import UserError
from conftest import held_out_inputs


def _random_stage(patch_size=11, seed=0):
    config = default.get_config().model
    config.patch_size = patch_size
    model = models.build_network(config, 2, seed)
    graphdef, variables = train.split_model(model)
    rng = np.random.default_rng(seed)
    # Perturb every weight and give BatchNorm non-trivial running statistics.
    variables = jax.tree.map(lambda a: a + 0.1 * rng.normal(size=a.shape).astype(np.float32), variables)
    variables["batch_stats"] = jax.tree.map(lambda a: np.abs(a) + 0.5, variables["batch_stats"])
    return cascade.Stage(graphdef, variables, patch_size, model.dense_halo)


@pytest.mark.parametrize("tile_size, tiles_per_batch", [(8, 3), (16, 2)])
def test_dense_equals_patchwise_everywhere(tile_size, tiles_per_batch):
    stage = _random_stage()
    volume = np.random.default_rng(1).normal(size=(21, 17, 23, 2)).astype(np.float32)
    everywhere = np.ones(volume.shape[:3], bool)
    patchwise = cascade.classify_voxels(stage, volume, everywhere, batch_size=512)
    dense_result = dense.classify_voxels_dense(
        stage.graphdef, stage.variables, volume, everywhere, halo=stage.dense_halo, patch_size=11,
        tile_size=tile_size, tiles_per_batch=tiles_per_batch)
    assert 0.01 < patchwise.mean() < 0.99  # a non-degenerate network
    # float32 reassociation between the two formulations stays far below 1e-4.
    assert np.abs(dense_result - patchwise).max() <= 1e-4


def test_dense_respects_the_mask_and_skips_empty_tiles():
    stage = _random_stage()
    volume = np.random.default_rng(2).normal(size=(20, 20, 20, 2)).astype(np.float32)
    mask = np.zeros(volume.shape[:3], bool)
    mask[0, 0, 0] = mask[19, 19, 19] = mask[3, 15, 9] = True
    patchwise = cascade.classify_voxels(stage, volume, mask, batch_size=512)
    pad, origins = dense.tile_geometry(mask.shape, 8, stage.dense_halo, 11)
    assert len(dense.occupied_tiles(mask, origins, 8)) == 3 < len(origins) == 27
    got = dense.classify_voxels_dense(stage.graphdef, stage.variables, volume, mask, halo=stage.dense_halo,
                                      patch_size=11, tile_size=8, tiles_per_batch=2)
    assert np.count_nonzero(got) == 3
    assert np.abs(got - patchwise).max() <= 1e-4


def test_dense_with_a_wider_patch_uses_a_dilated_dense_layer():
    stage = _random_stage(patch_size=15)  # 15 -> 13 -> 6 -> 4 -> 2: dense1 is a 2^3 kernel
    volume = np.random.default_rng(3).normal(size=(12, 13, 11, 2)).astype(np.float32)
    everywhere = np.ones(volume.shape[:3], bool)
    patchwise = cascade.classify_voxels(stage, volume, everywhere, batch_size=512)
    got = dense.classify_voxels_dense(stage.graphdef, stage.variables, volume, everywhere, halo=stage.dense_halo,
                                      patch_size=15, tile_size=8, tiles_per_batch=2)
    assert np.abs(got - patchwise).max() <= 1e-4


def test_dense_is_refused_where_it_is_not_exact():
    config = default.get_config().model
    config.network = "valverde2017"
    assert not models.NETWORKS["valverde2017"].dense_exact
    model = models.build_network(config, 2, 0)
    graphdef, variables = train.split_model(model)
    same_stage = cascade.Stage(graphdef, variables, 11, None)
    assert cascade.resolve_method(same_stage, "auto") == "patch"
    with pytest.raises(UserError, match="no exact dense form"):
        cascade.resolve_method(same_stage, "dense")
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
        assert np.abs(dense_map - patch_map).max() <= 1e-4
