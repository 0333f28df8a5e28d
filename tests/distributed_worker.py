"""Training runs for test_distributed.py, each in a process whose device count is forced by XLA_FLAGS.

    python tests/distributed_worker.py fit OUT.npz WORKDIR [COORDINATOR NUM_PROCESSES PROCESS_ID]
        CNN1 for one short epoch on a fixed tiny patch set; the best weights go to OUT.npz.
    python tests/distributed_worker.py cascade DATA WORKDIR SUMMARY.json DATA_SHARDS [COORDINATOR ...]
        `train_cascade` (both stages, one epoch each); this process's summary goes to SUMMARY.json.<process index>,
        the stage-2 training centres and labels it mined to SUMMARY.json.<process index>.stage2.npz.
The caller sets XLA_FLAGS=--xla_force_host_platform_device_count=N before this process imports jax.
"""

import json
import sys

import numpy as np


def _join(config, distributed_args):
    if distributed_args:
        address, count, index = distributed_args
        config.distributed.coordinator_address = address
        config.distributed.num_processes = int(count)
        config.distributed.process_id = int(index)


def fit(out, workdir, *distributed_args):
    from jaxcascade import config as config_lib, phantom
    from jaxcascade.runtime import distributed
    from jaxcascade.networks import models
    from jaxcascade.training import sampling
    from jaxcascade.training.batching import TrainingSet
    from jaxcascade.data.normalisation import candidate_mask, normalise_channels
    from jaxcascade.training.train_loop import fit_stage

    config = config_lib.load_config("default")
    config.train.max_epochs = 1
    config.train.augmentation = "seed"
    _join(config, distributed_args)
    distributed.initialize(config.distributed)

    subject = phantom.make_subject(11, "tiny")
    volume = normalise_channels([subject["T1"], subject["FLAIR"]], "nonzero")
    lesion = subject["lesion"] > 0
    centres, labels = sampling.stage1_centres(lesion, candidate_mask(volume[..., 1], 0.5),
                                              np.random.default_rng(0))
    keep = np.random.default_rng(1).permutation(len(labels))[:512]  # 384 train = 3 steps of 128
    data = TrainingSet.from_subjects([volume], [centres[keep]], [labels[keep]], 11)
    model = models.build_network(config.model, 2, 0)
    best, history = fit_stage(stage=1, model=model, data=data, config=config, workdir=workdir,
                              log=lambda message: None)
    assert history[0]["steps"] == 3, history
    if distributed.is_primary():
        import jax

        leaves = {jax.tree_util.keystr(path): np.asarray(leaf)
                  for path, leaf in jax.tree_util.tree_leaves_with_path(best)}
        np.savez(out, devices=jax.device_count(), processes=jax.process_count(),
                 val_loss=history[0]["val_loss"], **leaves)


def cascade(data, workdir, summary_path, data_shards, *distributed_args):
    import jax

    from jaxcascade import config as config_lib
    from jaxcascade.training import pipeline, sampling

    mine = sampling.stage2_training_centres

    def mine_and_keep(subjects, stage1_probability, config):  # the real mining; its result is also written for the test
        centres, labels = mine(subjects, stage1_probability, config)
        np.savez(f"{summary_path}.{jax.process_index()}.stage2.npz", *centres, *labels)
        return centres, labels

    sampling.stage2_training_centres = mine_and_keep
    config = config_lib.load_config("default")
    config.train.max_epochs = 1
    config.distributed.data_shards = int(data_shards)
    _join(config, distributed_args)
    summary = pipeline.train_cascade(data, workdir, config, log=lambda message: None)
    summary.update(process=jax.process_index(), processes=jax.process_count(), devices=jax.device_count())
    with open(f"{summary_path}.{jax.process_index()}", "w") as f:
        json.dump(summary, f)


if __name__ == "__main__":
    {"fit": fit, "cascade": cascade}[sys.argv[1]](*sys.argv[2:])
