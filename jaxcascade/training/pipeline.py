"""Training a cascade from files: `train_cascade(data_dir, workdir, config)`, what `jaxcascade train` runs.

It trains CNN1 then CNN2, resuming whatever a previous run left. Each step it
chains lives in its own module: subjects (loading), sampling (which voxels
each stage trains on), batching, train_loop (epochs), model_directory (the
directory format); CNN2's hard negatives are mined with CNN1 through the
inference methods.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Callable

import numpy as np

from jaxcascade.training import batching, history
from jaxcascade.storage import model_directory, weights
from jaxcascade.runtime import distributed
from jaxcascade.networks import models
from jaxcascade.training import sampling
from jaxcascade.runtime import seeding
from jaxcascade.segmentation.stage import Stage
from jaxcascade.data.normalisation import candidate_mask
from jaxcascade.segmentation.inference import InferenceOptions, classify
from jaxcascade.training.intensity_augmentation import IntensityAugmentation
from jaxcascade.data.normalisation import check_settings as check_preprocessing
from jaxcascade.training.optimizer import trainable_modules
from jaxcascade.runtime.outputs import check_output_path
from jaxcascade.data.subjects import load_training_subjects
from jaxcascade.training.train_loop import fit_stage

_LOG = logging.getLogger(__name__)


def _silent(*_args, **_kwargs) -> None:
    pass


@dataclasses.dataclass(frozen=True)
class _Training:
    """What both stages' training shares."""

    subjects: list  # this process's loaded subjects (`data.subjects.TrainingSubject`)
    num_shards: int
    config: object
    workdir: Path
    log: Callable
    progress: Callable | None
    histories: dict  # stage -> its epochs' records, rewritten after every epoch
    intensity: IntensityAugmentation  # the patches' intensity augmentation (config.train.intensity_augmentation)


def _fit(run: _Training, stage: int, centres, labels) -> Stage:
    config = run.config
    channels = run.subjects[0].volume.shape[-1]
    model = models.build_network(config.model, channels, seeding.init_seed(config.seed, stage), config.compute_dtype)
    data = batching.TrainingSet.from_subjects([s.volume for s in run.subjects], centres, labels,
                                              config.model.patch_size, subject_shards=[s.shard for s in run.subjects],
                                              num_shards=run.num_shards)

    def on_epoch(stage_history):
        run.histories[stage] = stage_history
        history.write_history(run.workdir, run.histories)

    initial = None
    if config.train.init_from:
        _, template = models.split_model(model)
        initial = weights.load(config.train.init_from, stage, template)
        run.log(f"stage {stage}: starting from {config.train.init_from}")
    best, stage_history = fit_stage(
        stage=stage, model=model, data=data, config=config, workdir=run.workdir, log=run.log, on_epoch=on_epoch,
        progress=run.progress, initial_variables=initial, intensity=run.intensity,
    )
    run.histories[stage] = stage_history
    history.write_history(run.workdir, run.histories)
    weights.save(run.workdir, stage, best)
    return Stage.from_network(model, best)


def train_cascade(data_dir, workdir, config, *, log: Callable = _LOG.info, progress: Callable | None = None,
                  participants=None) -> dict:
    """Train (or resume) both stages in workdir; returns a summary dict.

    With config.distributed settings (or JAX_COORDINATOR_ADDRESS etc.) the
    processes of a multi-host run join first; all of them then run this same
    function. Each process loads only the subjects of its data shards, mines
    CNN2's hard negatives on them, and feeds its rows of every batch to its
    own devices (see `batching`).
    """
    workdir = check_output_path(workdir, is_dir=True, parents=True)
    distributed.initialize(config.distributed)
    num_shards = batching.shard_count(config)
    distributed.check_divisible(config.train.batch_size, "train.batch_size", num_shards)
    distributed.check_divisible(config.train.eval_batch_size, "train.eval_batch_size", num_shards)
    if not distributed.is_primary():
        log, progress = _silent, None
    check_preprocessing(config)
    intensity = IntensityAugmentation.from_config(config.train.get("intensity_augmentation"))  # checked here, once
    subjects = load_training_subjects(data_dir, config, num_shards, participants)
    # Settings that can only be checked against the network's structure fail before the workdir exists.
    trainable_modules(config.train.trainable, models.variables_template(config)["params"])
    distributed.agree(lambda: model_directory.prepare_workdir(workdir, config), "preparing the workdir")
    model_directory.record_voxel_size(workdir, np.median([s.voxel_size_mm for s in subjects], axis=0))
    log(f"training on {distributed.describe()}")
    if num_shards == 1:
        log(f"{len(subjects)} training subjects: {', '.join(s.name for s in subjects)}")
    else:
        log(f"{num_shards} data shards; process 0 loads {len(subjects)} subjects: "
            f"{', '.join(s.name for s in subjects)}")
    histories = history.read_history(workdir)
    run = _Training(subjects, num_shards, config, workdir, log, progress, histories, intensity)

    if weights.stage_done(workdir, 1):
        log("stage 1: already trained, skipping")
        stage1 = Stage.load(workdir, 1, config)
    else:
        centres, labels = sampling.stage1_training_centres(subjects, config)
        stage1 = _fit(run, 1, centres, labels)

    if weights.stage_done(workdir, 2):
        log("stage 2: already trained, skipping")
    else:
        options = InferenceOptions.from_config(config)

        def stage1_probability(subject):
            candidates = candidate_mask(subject.flair, options.min_th)
            return classify(stage1, subject.volume, candidates, options)

        centres, labels = sampling.stage2_training_centres(subjects, stage1_probability, config)
        _fit(run, 2, centres, labels)
    return {"workdir": str(workdir), "subjects": [s.name for s in subjects], "epochs": {
        stage: len(h) for stage, h in histories.items()}}
