"""The data-shard schedule: who loads which subject, and which rows fill every batch."""

import numpy as np
import pytest

from jaxcascade.training import batching
from jaxcascade import config as config_lib
from jaxcascade.runtime import distributed
from jaxcascade.errors import UserError

from test_errors import assert_user_error


def _labels(positives, negatives):
    return np.concatenate([np.ones(positives, np.int32), np.zeros(negatives, np.int32)])


def _schedule(shard_rows, labels, num_shards, batch_size=8, validation_batch_size=6, fraction=0.25, seed=0):
    return batching.schedule(shard_rows, labels, num_shards=num_shards, seed=seed, stage=1,
                           validation_fraction=fraction, batch_size=batch_size,
                           validation_batch_size=validation_batch_size)


def test_one_shard_is_one_pass_over_the_training_rows():
    labels = _labels(20, 20)
    plan = _schedule({0: np.arange(40)}, labels, 1)
    train, validation = plan.train_rows[0], plan.validation_rows[0]
    assert len(validation) == 10 and labels[validation].sum() == 5  # stratified: a quarter of each class
    assert np.intersect1d(train, validation).size == 0 and len(train) + len(validation) == 40
    epoch = plan.epoch(seed=0, stage=1, epoch=0)
    assert epoch.shape == (30 // 8, 8) == (plan.steps, 8)
    assert len(np.unique(epoch)) == epoch.size and np.isin(epoch, train).all()  # no row twice, ragged tail dropped
    assert not np.array_equal(epoch, plan.epoch(seed=0, stage=1, epoch=1))
    np.testing.assert_array_equal(epoch, plan.epoch(seed=0, stage=1, epoch=0))


def test_every_validation_row_counts_once():
    labels = _labels(21, 23)
    plan = _schedule({0: np.arange(44)}, labels, 1)
    rows, weights = plan.validation()
    assert rows.shape == weights.shape == (plan.validation_steps, 6)
    counted = rows[weights > 0]
    assert sorted(counted) == sorted(plan.validation_rows[0])
    assert weights.sum() == len(plan.validation_rows[0])


def test_two_shards_fill_their_halves_of_every_batch_and_the_small_one_wraps():
    # shard 0: rows 0..47 (24 lesion), shard 1: rows 48..63 (8 lesion)
    labels = np.concatenate([_labels(24, 24), _labels(8, 8)])
    rows = {0: np.arange(48), 1: np.arange(48, 64)}
    plan = _schedule(rows, labels, 2)
    assert plan.totals == {"training": 48, "validation": 16, "lesion": 32}
    assert plan.steps == 48 // 8
    epoch = plan.epoch(seed=0, stage=1, epoch=0)
    assert epoch.shape == (6, 8)
    assert np.isin(epoch[:, :4], plan.train_rows[0]).all() and np.isin(epoch[:, 4:], plan.train_rows[1]).all()
    assert len(np.unique(epoch[:, :4])) == 24  # 24 of shard 0's 36 training rows, none twice
    second_half = epoch[:, 4:].ravel()
    assert set(second_half) == set(plan.train_rows[1])  # all 12 of shard 1's rows, each twice
    assert np.bincount(second_half, minlength=64)[plan.train_rows[1]].tolist() == [2] * 12
    validation_rows, weights = plan.validation()
    assert validation_rows.shape == (4, 6)  # shard 0 has 12 validation rows: 4 batches of 3 per shard
    assert weights[:, 3:].sum() == 4  # shard 1's 4 validation rows, the rest padding


def test_a_shard_without_lesions_and_bad_shard_settings_are_clear_errors():
    labels = np.concatenate([_labels(4, 4), _labels(0, 0)])
    with pytest.raises(UserError, match="data shard 1 of 2 has no lesion voxels"):
        _schedule({0: np.arange(8), 1: np.arange(8, 8)}, labels, 2)
    with pytest.raises(UserError, match=r"train.batch_size=8 is not divisible by 1 devices and 3 data shards; "
                                        r"use a multiple of 3 \(e.g. 6 or 9\)"):
        _schedule({0: np.arange(4), 1: np.arange(4, 8), 2: np.arange(8, 8)}, labels, 3, validation_batch_size=6)
    config = config_lib.load_config("default")
    assert batching.shard_count(config) == 1
    config.distributed.data_shards = 3
    assert batching.shard_count(config) == 3 and list(distributed.owned_shards(3)) == [0, 1, 2]
    config.distributed.data_shards = -1
    with pytest.raises(UserError, match="data_shards=-1 must be a positive multiple of the 1 processes"):
        batching.shard_count(config)
    assert [distributed.subject_shard(i, 3) for i in range(7)] == [0, 1, 2, 0, 1, 2, 0]


def test_training_with_more_shards_than_subjects_or_a_lesion_free_shard(cohort, tmp_path, capsys):
    wd = tmp_path / "wd"
    assert_user_error(capsys, ["train", "--data", cohort / "train", "--workdir", wd,
                               "--config.distributed.data_shards=8", "--config.train.batch_size=128"],
                      "4 subjects cannot fill 8 data shards", "use at most 4")
    data = tmp_path / "data"
    for name in ("sub-01", "sub-02"):
        (data / name).mkdir(parents=True)
        for image in ("T1", "FLAIR", "lesion"):
            (data / name / f"{image}.nii.gz").write_bytes((cohort / "train" / name / f"{image}.nii.gz").read_bytes())
    import nibabel as nib

    lesion = nib.load(data / "sub-02" / "lesion.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros(lesion.shape, np.uint8), lesion.affine, lesion.header),
             data / "sub-02" / "lesion.nii.gz")
    assert_user_error(capsys, ["train", "--data", data, "--workdir", wd, "--config.distributed.data_shards=2"],
                      "data shard 1 of 2 (sub-02) has no lesion voxels")
    assert not wd.exists()


def test_random_streams_never_coincide():
    """numpy's SeedSequence ignores trailing zeros; every purpose and key still gets its own stream."""
    from jaxcascade.runtime import seeding

    assert np.array_equal(np.random.default_rng([7, 1]).random(4), np.random.default_rng([7, 1, 0]).random(4))
    draws = {}
    for stage in (1, 2):
        draws[("init", stage)] = seeding.stream(7, "init", stage=stage).random(4)
        for index in (0, 1):
            draws[("sampling", stage, index)] = seeding.stream(7, "sampling", stage=stage, subject=index).random(4)
            draws[("split", stage, index)] = seeding.stream(7, "split", stage=stage, shard=index).random(4)
            for epoch in (0, 1):
                draws[("epoch", stage, epoch, index)] = seeding.stream(
                    7, "epoch", stage=stage, epoch=epoch, shard=index).random(4)
    values = [tuple(v) for v in draws.values()]
    assert len(set(values)) == len(values)
    with pytest.raises(TypeError, match="keyed by stage, epoch, shard"):
        seeding.stream(7, "epoch", stage=1, shard=0)
