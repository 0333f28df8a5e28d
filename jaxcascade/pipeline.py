"""Training and segmentation from files: the library functions the CLI calls.

`train_cascade(data_dir, workdir, config)` trains CNN1 then CNN2 (resuming
whatever a previous run left); `load_cascade(model_dir)` and
`segment_files(...)` apply a trained cascade to one subject's NIfTI files.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Callable

import numpy as np

from jaxcascade import __version__, cascade, checkpoints, config as config_lib, distributed, io, models, plots
from jaxcascade import seeding
from jaxcascade import patches as patches_lib
from jaxcascade import shards as shards_lib
from jaxcascade.errors import UserError
from jaxcascade.fit import TrainingSet, fit_stage, trainable_modules
from jaxcascade.train import split_model

FORMAT_VERSION = 1


@dataclasses.dataclass
class Subject:
    name: str
    volume: np.ndarray  # (D, H, W, C) normalised, channels in config.data.modalities order
    lesion: np.ndarray  # bool (D, H, W)
    flair_channel: int
    number: int = 0  # position among all training subjects (seeds its sampling)
    shard: int = 0  # its data shard

    @property
    def flair(self) -> np.ndarray:
        return self.volume[..., self.flair_channel]


def flair_channel(config) -> int:
    modalities = tuple(config.data.modalities)
    if config.data.flair not in modalities:
        raise UserError(
            f"config data.modalities {', '.join(modalities)} lacks {config.data.flair!r}: "
            "FLAIR is required (candidate selection uses it)"
        )
    return modalities.index(config.data.flair)


def load_training_subjects(data_dir, config, num_shards: int = 1) -> list[Subject]:
    """This process's training subjects: those of its data shards (every subject with one shard).

    Collective in a multi-process run: each process loads its own share.
    """
    modalities = tuple(config.data.modalities)
    channel = flair_channel(config)
    io.check_orientation(config.data.orientation)
    if len(set(modalities)) != len(modalities):
        raise UserError(f"config data.modalities names a modality twice: {', '.join(modalities)}")
    suffix, lesion_name = config.data.suffix, config.data.lesion
    folders = io.discover_subjects(data_dir, [f"{m}{suffix}" for m in modalities] + [f"{lesion_name}{suffix}"])
    if len(folders) < num_shards:
        raise UserError(
            f"{data_dir}: {len(folders)} subjects cannot fill {num_shards} data shards (one per process unless "
            f"--config.distributed.data_shards says otherwise); use at most {len(folders)}"
        )
    shard_of = [shards_lib.subject_shard(number, num_shards) for number in range(len(folders))]
    mine = shards_lib.owned(num_shards)

    def load() -> list[Subject]:
        subjects = []
        for number, folder in enumerate(folders):
            if shard_of[number] not in mine:
                continue
            images = io.load_sequences({m: folder / f"{m}{suffix}" for m in modalities}, modalities, folder.name,
                                       orientation=config.data.orientation)
            lesion = io.load_lesion_mask(folder / f"{lesion_name}{suffix}", images[0])
            volume = cascade.normalise_channels([image.data for image in images], config.normalisation)
            subjects.append(Subject(folder.name, volume, lesion, channel, number, shard_of[number]))
        return subjects

    subjects = distributed.agree(load, "loading its training subjects")
    lesion_voxels = np.zeros(num_shards, np.int64)
    for subject in subjects:
        lesion_voxels[subject.shard] += int(subject.lesion.sum())
    lesion_voxels = distributed.allgather(lesion_voxels).sum(axis=0)
    if not lesion_voxels.any():
        raise UserError(f"{data_dir}: no lesion voxels in any subject's {lesion_name}{suffix}; nothing to learn from")
    for shard in np.flatnonzero(lesion_voxels == 0):
        names = [folder.name for folder, s in zip(folders, shard_of) if s == shard]
        raise UserError(
            f"{data_dir}: data shard {shard} of {num_shards} ({', '.join(names)}) has no lesion voxels; "
            "every shard needs some: use fewer --config.distributed.data_shards (or processes)"
        )
    return subjects


def _stored_config(config) -> dict:
    # How a run is spread over processes is not part of the model.
    stored = config_lib.to_dict(config)
    stored.pop("distributed", None)
    return stored


def prepare_workdir(workdir: Path, config) -> None:
    if not distributed.is_primary():
        return
    workdir.mkdir(parents=True, exist_ok=True)
    record = {"jaxcascade": {"format_version": FORMAT_VERSION, "version": __version__}, **_stored_config(config)}
    path = workdir / "config.json"
    if path.exists():
        previous = json.loads(path.read_text())
        previous.pop("jaxcascade", None)
        changed = config_lib.differences(previous, _stored_config(config))
        if changed:
            raise UserError(
                f"{path}: this workdir was trained with a different config ({', '.join(changed)} differ); "
                "use a new --workdir or the same config to resume"
            )
    io.write_json(record, path)


def _silent(*_args, **_kwargs) -> None:
    pass


def _fit(stage, subjects, num_shards, centres, labels, config, workdir, log, progress,
         histories) -> cascade.Stage:
    channels = subjects[0].volume.shape[-1]
    model = models.build_network(config.model, channels, seeding.init_seed(config.seed, stage))
    data = TrainingSet.from_subjects([s.volume for s in subjects], centres, labels, config.model.patch_size,
                                     subject_shards=[s.shard for s in subjects], num_shards=num_shards)

    def on_epoch(history):
        histories[stage] = history
        _write_history(workdir, histories)

    initial = None
    if config.train.init_from:
        _, template = split_model(model)
        initial = checkpoints.load_weights(config.train.init_from, stage, template)
        log(f"stage {stage}: starting from {config.train.init_from}")
    best, history = fit_stage(
        stage=stage, model=model, data=data, config=config, workdir=workdir, log=log, on_epoch=on_epoch,
        progress=progress, initial_variables=initial,
    )
    histories[stage] = history
    _write_history(workdir, histories)
    checkpoints.save_weights(workdir, stage, best)
    return _stage(model, best, config)


def _write_history(workdir: Path, histories: dict) -> None:
    if not distributed.is_primary():
        return
    records = [r for stage in sorted(histories) for r in histories[stage]]
    io.write_text("".join(json.dumps(r) + "\n" for r in records), workdir / "metrics.jsonl")
    plots.training_curves(records, workdir / "training_curves.png")


def _read_history(workdir: Path) -> dict:
    histories: dict = {1: [], 2: []}
    path = workdir / "metrics.jsonl"
    if path.exists():
        for line in path.read_text().splitlines():
            record = json.loads(line)
            histories[record["stage"]].append(record)
    return histories


def train_cascade(data_dir, workdir, config, *, log: Callable = print, progress: Callable | None = None) -> dict:
    """Train (or resume) both stages in workdir; returns a summary dict.

    With config.distributed settings (or JAX_COORDINATOR_ADDRESS etc.) the
    processes of a multi-host run join first; all of them then run this same
    function. Each process loads only the subjects of its data shards, mines
    CNN2's hard negatives on them, and feeds its rows of every batch to its
    own devices (see `shards`).
    """
    workdir = Path(workdir)
    distributed.initialize(config.distributed)
    num_shards = shards_lib.shard_count(config)
    distributed.check_divisible(config.train.batch_size, "train.batch_size", num_shards)
    distributed.check_divisible(config.train.eval_batch_size, "train.eval_batch_size", num_shards)
    if not distributed.is_primary():
        log, progress = _silent, None
    subjects = load_training_subjects(data_dir, config, num_shards)
    # Settings that can only be checked against a built network fail before the workdir exists.
    probe = models.build_network(config.model, subjects[0].volume.shape[-1], 0)
    trainable_modules(config.train.trainable, split_model(probe)[1]["params"])
    distributed.agree(lambda: prepare_workdir(workdir, config), "preparing the workdir")
    log(f"training on {distributed.describe()}")
    if num_shards == 1:
        log(f"{len(subjects)} training subjects: {', '.join(s.name for s in subjects)}")
    else:
        log(f"{num_shards} data shards; process 0 loads {len(subjects)} subjects: "
            f"{', '.join(s.name for s in subjects)}")
    histories = _read_history(workdir)
    options = cascade.InferenceOptions.from_config(config)
    min_th = options.min_th

    if checkpoints.stage_done(workdir, 1):
        log("stage 1: already trained, skipping")
        stage1 = _load_stage(workdir, config, 1)
    else:
        centres, labels = [], []
        for subject in subjects:
            candidates = cascade.candidate_mask(subject.flair, min_th)
            rng = seeding.stream(config.seed, "sampling", stage=1, subject=subject.number)
            c, l = patches_lib.stage1_centres(subject.lesion, candidates, rng)
            centres.append(c)
            labels.append(l)
        stage1 = _fit(1, subjects, num_shards, centres, labels, config, workdir, log, progress, histories)

    if checkpoints.stage_done(workdir, 2):
        log("stage 2: already trained, skipping")
    else:
        centres, labels = [], []
        for subject in subjects:
            candidates = cascade.candidate_mask(subject.flair, min_th)
            probability = cascade.classify(stage1, subject.volume, candidates, options)
            hard = patches_lib.hard_negative_mask(
                subject.lesion, probability, subject.flair,
                probability_threshold=config.sampling.hard_negative_probability,
                fallback_flair=config.sampling.hard_negative_fallback_flair,
            )
            rng = seeding.stream(config.seed, "sampling", stage=2, subject=subject.number)
            c, l = patches_lib.stage2_centres(subject.lesion, hard, rng)
            centres.append(c)
            labels.append(l)
        _fit(2, subjects, num_shards, centres, labels, config, workdir, log, progress, histories)
    return {"workdir": str(workdir), "subjects": [s.name for s in subjects], "epochs": {
        stage: len(h) for stage, h in histories.items()}}


# ----------------------------------------------------------------------------- inference


@dataclasses.dataclass
class Cascade:
    config: object
    stage1: cascade.Stage
    stage2: cascade.Stage

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(self.config.data.modalities)


def fine_tuning_config(model_dir, overrides: list[str]):
    """The config of an existing model, set to start from its weights; overrides then apply.

    The network, channels and normalisation must stay those of the model, so
    the starting point is the model's own config rather than a config file.
    """
    config = read_model_config(model_dir)
    for stage in (1, 2):
        if not checkpoints.stage_done(model_dir, stage):
            raise UserError(f"{model_dir}: stage {stage} has no trained weights to start from")
    config.train.init_from = str(Path(model_dir).resolve())
    config = config_lib.apply_overrides(config, overrides)
    fixed = ["model", "data.modalities", "data.orientation", "normalisation"]
    changed = [key for key in config_lib.differences(_stored_config(read_model_config(model_dir)),
                                                     _stored_config(config))
               if any(key == f or key.startswith(f + ".") for f in fixed)]
    if changed:
        raise UserError(f"--init-from {model_dir}: {', '.join(changed)} cannot change when fine-tuning a model")
    return config


def read_model_config(model_dir) -> object:
    model_dir = Path(model_dir)
    path = model_dir / "config.json"
    if not model_dir.is_dir():
        raise UserError(f"{model_dir}: model directory not found")
    if not path.exists():
        raise UserError(f"{model_dir}: not a jaxcascade model directory (no config.json); pass a train --workdir")
    try:
        record = json.loads(path.read_text())
        stamp = record.pop("jaxcascade")
    except (json.JSONDecodeError, KeyError, AttributeError):
        raise UserError(f"{path}: not a jaxcascade model config (unreadable or no 'jaxcascade' stamp)") from None
    if stamp.get("format_version") != FORMAT_VERSION:
        raise UserError(
            f"{path}: written by jaxcascade {stamp.get('version', '?')} in model format "
            f"{stamp.get('format_version')}, this jaxcascade {__version__} reads format {FORMAT_VERSION}"
        )
    # Models saved before data.orientation existed saw images as stored.
    record.setdefault("data", {}).setdefault("orientation", io.NATIVE)
    return config_lib.from_dict(record, str(path))


def _stage(model, variables, config) -> cascade.Stage:
    graphdef, _ = split_model(model)
    exact = models.NETWORKS[config.model.network].dense_exact
    return cascade.Stage(graphdef, variables, config.model.patch_size, model.dense_halo if exact else None)


def _load_stage(model_dir, config, stage: int) -> cascade.Stage:
    model = models.build_network(config.model, len(config.data.modalities), 0)
    _, template = split_model(model)
    return _stage(model, checkpoints.load_weights(model_dir, stage, template), config)


def load_cascade(model_dir) -> Cascade:
    config = read_model_config(model_dir)
    for stage in (1, 2):
        if not checkpoints.stage_done(model_dir, stage):
            raise UserError(f"{model_dir}: stage {stage} is not trained yet; finish `jaxcascade train` first")
    return Cascade(config, _load_stage(model_dir, config, 1), _load_stage(model_dir, config, 2))


def segment_images(model: Cascade, images: list[io.Image], *, threshold=None, min_lesion_size=None,
                   method=None, progress=None) -> cascade.Segmentation:
    """Segment one subject given its images in the model's channel order."""
    config = model.config
    options = cascade.InferenceOptions.from_config(
        config, threshold=threshold, min_lesion_voxels=min_lesion_size, method=method)
    volume = cascade.normalise_channels([image.data for image in images], config.normalisation)
    return cascade.segment_volume(model.stage1, model.stage2, volume, flair_channel(config), options,
                                  voxel_volume_ml=images[0].voxel_volume_ml, progress=progress)


def segment_files(model_dir, inputs: dict, out, *, probabilities_dir=None, threshold=None, min_lesion_size=None,
                  method=None, overwrite=False, progress=None) -> cascade.Segmentation:
    """Segment NIfTI files and write the mask (and probability maps), all checks first."""
    model = load_cascade(model_dir)
    out = io.check_output_path(out, overwrite=overwrite)
    probability_paths = []
    if probabilities_dir is not None:
        probabilities_dir = Path(probabilities_dir)
        io.check_output_path(probabilities_dir, is_dir=True)
        probability_paths = [probabilities_dir / "stage1.nii.gz", probabilities_dir / "stage2.nii.gz"]
        for path in probability_paths:
            if path.exists() and not overwrite:
                raise UserError(f"{path}: already exists; pass --overwrite to replace it")
    if method is not None:
        cascade.resolve_method(model.stage1, method)  # refuse an impossible --inference before any work
    images = io.load_sequences(inputs, model.modalities, orientation=model.config.data.orientation)
    result = segment_images(model, images, threshold=threshold, min_lesion_size=min_lesion_size, method=method,
                            progress=progress)
    reference = images[model.modalities.index(model.config.data.flair)]
    if probability_paths:
        probabilities_dir.mkdir(exist_ok=True)
        io.save_like(result.stage1_probability, reference, probability_paths[0], dtype=np.float32)
        io.save_like(result.stage2_probability, reference, probability_paths[1], dtype=np.float32)
    io.save_like(result.mask, reference, out, dtype=np.uint8)
    return result

