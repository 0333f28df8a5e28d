"""Train CNN1 for one short epoch on a fixed tiny set and save the weights (run by test_distributed.py).

    python tests/distributed_worker.py OUT.npz WORKDIR [COORDINATOR NUM_PROCESSES PROCESS_ID]
The device count comes from XLA_FLAGS=--xla_force_host_platform_device_count=N,
set by the caller before this process imports jax.
"""

import sys

import numpy as np


def main(out, workdir, *distributed_args):
    from jaxcascade import cascade, config as config_lib, distributed, models, phantom
    from jaxcascade import patches as patches_lib
    from jaxcascade.fit import TrainingSet, fit_stage

    config = config_lib.load_config("default")
    config.train.max_epochs = 1
    config.train.augmentation = "seed"
    if distributed_args:
        address, count, index = distributed_args
        config.distributed.coordinator_address = address
        config.distributed.num_processes = int(count)
        config.distributed.process_id = int(index)
        distributed.initialize(config.distributed)

    subject = phantom.make_subject(11, "tiny")
    volume = cascade.normalise_channels([subject["T1"], subject["FLAIR"]], "nonzero")
    lesion = subject["lesion"] > 0
    centres, labels = patches_lib.stage1_centres(lesion, cascade.candidate_mask(volume[..., 1], 0.5),
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


if __name__ == "__main__":
    main(*sys.argv[1:])
