"""Training and segmentation from files: the library functions the CLI calls.

`train_cascade(data_dir, workdir, config)` trains CNN1 then CNN2 (resuming
whatever a previous run left); `segment_files(model_dir, inputs, out)` applies
a trained cascade to one subject's NIfTI files. Each step they chain lives in
its own module: subjects (loading), sampling (which voxels each stage trains
on), batching, train_loop (epochs), model_dir (the directory format), cascade
and inference (segmenting).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable

import numpy as np

from jaxcascade import batching, checkpoints, distributed, history, model_dir as model_dir_lib, models, nifti
from jaxcascade import resolution, sampling, seeding
from jaxcascade.cascade import Cascade, Segmentation, Stage, segment_volume
from jaxcascade.normalisation import candidate_mask, flair_channel
from jaxcascade.errors import warn as warn_user
from jaxcascade.errors import UserError
from jaxcascade.inference import InferenceOptions, classify, resolve_method
from jaxcascade.intensity_augmentation import IntensityAugmentation
from jaxcascade.normalisation import check_settings as check_preprocessing, normalise_channels
from jaxcascade.optimizer import trainable_modules
from jaxcascade.outputs import NIFTI_SUFFIXES, check_free_space, check_output_path
from jaxcascade.subjects import load_training_subjects
from jaxcascade.train_loop import fit_stage

_LOG = logging.getLogger(__name__)


def _silent(*_args, **_kwargs) -> None:
    pass


def _fit(stage, subjects, num_shards, centres, labels, config, workdir, log, progress, histories) -> Stage:
    channels = subjects[0].volume.shape[-1]
    model = models.build_network(config.model, channels, seeding.init_seed(config.seed, stage), config.compute_dtype)
    data = batching.TrainingSet.from_subjects([s.volume for s in subjects], centres, labels, config.model.patch_size,
                                              subject_shards=[s.shard for s in subjects], num_shards=num_shards)

    def on_epoch(stage_history):
        histories[stage] = stage_history
        history.write_history(workdir, histories)

    initial = None
    if config.train.init_from:
        _, template = models.split_model(model)
        initial = checkpoints.load_weights(config.train.init_from, stage, template)
        log(f"stage {stage}: starting from {config.train.init_from}")
    best, stage_history = fit_stage(
        stage=stage, model=model, data=data, config=config, workdir=workdir, log=log, on_epoch=on_epoch,
        progress=progress, initial_variables=initial,
    )
    histories[stage] = stage_history
    history.write_history(workdir, histories)
    checkpoints.save_weights(workdir, stage, best)
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
    IntensityAugmentation.from_config(config.train.get("intensity_augmentation"))
    subjects = load_training_subjects(data_dir, config, num_shards, participants)
    # Settings that can only be checked against a built network fail before the workdir exists.
    probe = models.build_network(config.model, subjects[0].volume.shape[-1], 0, config.compute_dtype)
    trainable_modules(config.train.trainable, models.split_model(probe)[1]["params"])
    distributed.agree(lambda: model_dir_lib.prepare_workdir(workdir, config), "preparing the workdir")
    model_dir_lib.record_voxel_size(workdir, np.median([s.voxel_size_mm for s in subjects], axis=0))
    log(f"training on {distributed.describe()}")
    if num_shards == 1:
        log(f"{len(subjects)} training subjects: {', '.join(s.name for s in subjects)}")
    else:
        log(f"{num_shards} data shards; process 0 loads {len(subjects)} subjects: "
            f"{', '.join(s.name for s in subjects)}")
    histories = history.read_history(workdir)
    fit = dict(subjects=subjects, num_shards=num_shards, config=config, workdir=workdir, log=log,
               progress=progress, histories=histories)

    if checkpoints.stage_done(workdir, 1):
        log("stage 1: already trained, skipping")
        stage1 = Stage.load(workdir, 1, config)
    else:
        centres, labels = sampling.stage1_training_centres(subjects, config)
        stage1 = _fit(1, centres=centres, labels=labels, **fit)

    if checkpoints.stage_done(workdir, 2):
        log("stage 2: already trained, skipping")
    else:
        options = InferenceOptions.from_config(config)

        def stage1_probability(subject):
            candidates = candidate_mask(subject.flair, options.min_th)
            return classify(stage1, subject.volume, candidates, options)

        centres, labels = sampling.stage2_training_centres(subjects, stage1_probability, config)
        _fit(2, centres=centres, labels=labels, **fit)
    return {"workdir": str(workdir), "subjects": [s.name for s in subjects], "epochs": {
        stage: len(h) for stage, h in histories.items()}}


def segment_images(model: Cascade, images: list[nifti.Image], *, threshold=None, min_lesion_voxels=None,
                   min_lesion_volume_mm3=None, method=None, tta=None, brain_mask: np.ndarray | None = None,
                   resample: str = "auto", warn: Callable = warn_user, progress=None) -> Segmentation:
    """Segment one subject given its images in the model's channel order (restricted to brain_mask if given).

    Images whose voxel size is not the model's are segmented on a grid of the model's voxel size and the
    result brought back (`resolution.py`), unless resample is 'never' (then `warn` says so).
    min_lesion_volume_mm3, if given, sets the smallest kept lesion in mm^3 on the grid the cascade runs on.
    """
    if resample not in resolution.RESAMPLE_MODES:
        raise UserError(f"--resample {resample}: use one of {', '.join(resolution.RESAMPLE_MODES)}")
    reference = images[flair_channel(model.config)]
    working = images
    if resolution.differs(reference, model.voxel_size_mm):
        zooms = "x".join(f"{z:g}" for z in resolution.voxel_size(reference))
        trained = "x".join(f"{z:g}" for z in model.voxel_size_mm)
        if resample == "never":
            warn(f"{reference.path}: voxel size {zooms} mm, the model was trained at {trained} mm; segmenting at "
                 "the input's resolution as asked (--resample never)")
        else:
            shape, affine = resolution.working_grid(reference, model.voxel_size_mm)
            working = [resolution.onto(image, shape, affine) for image in images]
            if brain_mask is not None:
                mask_image = nifti.Image(reference.path, brain_mask.astype(np.float32), reference.nifti,
                                         reference.orientation)
                brain_mask = resolution.onto(mask_image, shape, affine).data > 0.5
    if min_lesion_volume_mm3 is not None:
        min_lesion_voxels = int(min_lesion_volume_mm3 // (working[0].voxel_volume_ml * 1000))
    result = _segment_on_grid(model, working, threshold, min_lesion_voxels, method, tta, brain_mask, progress)
    if working is images:
        return result
    on_grid = working[flair_channel(model.config)]
    return Segmentation(
        stage1_probability=resolution.back(result.stage1_probability, on_grid, reference),
        stage2_probability=resolution.back(result.stage2_probability, on_grid, reference),
        mask=resolution.back(result.mask.astype(np.float32), on_grid, reference) > 0.5,
        candidate_count=result.candidate_count, stage2_candidate_count=result.stage2_candidate_count,
        stage2_std=None if result.stage2_std is None else resolution.back(result.stage2_std, on_grid, reference),
    )


def _segment_on_grid(model, images, threshold, min_lesion_voxels, method, tta, brain_mask, progress) -> Segmentation:
    config = model.config
    options = InferenceOptions.from_config(config, threshold=threshold, min_lesion_voxels=min_lesion_voxels,
                                           method=method, tta=tta)
    # Outside the mask every image is 0: left out of the normalisation statistics and never a candidate.
    channels = [image.data if brain_mask is None else image.data * brain_mask for image in images]
    volume = normalise_channels(channels, config.normalisation, bias_correction=config.bias_correction)
    return segment_volume(model.stage1, model.stage2, volume, flair_channel(config), options,
                          voxel_volume_ml=images[0].voxel_volume_ml, progress=progress)


def check_segmentation_outputs(out, probabilities_dir=None, *, inputs=(), overwrite=False, tta=False) -> list[Path]:
    """Every output of one subject's segmentation checked before any work; returns the probability maps' paths.

    out: a NIfTI file name, not an input; probabilities_dir: a folder (made later) whose maps do not
    exist yet unless overwrite, apart from out.
    """
    out = check_output_path(out, overwrite=overwrite, nifti=True, inputs=[i for i in inputs if i])
    if probabilities_dir is None:
        return []
    folder = check_output_path(probabilities_dir, is_dir=True)
    if folder.name.endswith(NIFTI_SUFFIXES) and not folder.is_dir():
        raise UserError(f"{probabilities_dir}: --probabilities takes a folder for the maps, not a NIfTI file name")
    paths = [folder / "stage1.nii.gz", folder / "stage2.nii.gz"] + ([folder / "stage2_std.nii.gz"] if tta else [])
    for path in paths:
        if Path(os.path.abspath(path)) == Path(os.path.abspath(out)):
            raise UserError(f"{out}: is also where --probabilities writes {path.name}; choose another name")
        if path.exists() and not overwrite:
            raise UserError(f"{path}: already exists; pass --overwrite to replace it")
    if Path(os.path.abspath(folder)) == Path(os.path.abspath(out)):
        raise UserError(f"{probabilities_dir}: is also --out; give the maps their own folder")
    return paths


def segment_files(model_dir, inputs: dict, out, *, probabilities_dir=None, threshold=None, min_lesion_voxels=None,
                  min_lesion_volume_mm3=None, method=None, compute_dtype=None, tta=None, brain_mask=None,
                  resample="auto", overwrite=False, progress=None, warn: Callable = warn_user) -> Segmentation:
    """Segment NIfTI files and write the mask (and probability maps), all checks first.

    brain_mask: a mask file restricting normalisation and candidates (for images not skull-stripped);
    without one, an image that does not look skull-stripped gets a one-line `warn`.
    """
    probability_paths = check_segmentation_outputs(out, probabilities_dir, inputs=[*inputs.values(), brain_mask],
                                                   overwrite=overwrite, tta=bool(tta))
    out = Path(out)
    model = Cascade.load(model_dir, compute_dtype=compute_dtype)
    if method is not None:
        resolve_method(model.stage1, method)  # refuse an impossible --inference before any work
    images = nifti.load_sequences(inputs, model.modalities, orientation=model.config.data.orientation,
                                  reference=model.config.data.flair)
    reference = images[model.modalities.index(model.config.data.flair)]
    for note in nifti.resampling_notes(images, model.modalities, model.config.data.flair):
        warn(f"{reference.path}: {note}")
    mask = nifti.load_brain_mask(brain_mask, reference) if brain_mask else None
    if mask is None and not nifti.looks_skull_stripped(reference.data):
        warn(f"{reference.path}: nonzero voxels reach most faces of the field of view; the image does not look "
             "skull-stripped (pass --brain-mask)")
    voxels = int(np.prod(reference.nifti.shape[:3]))
    # Uncompressed sizes (gzip only shrinks them) and a margin: a full disk found before the work.
    check_free_space(out.parent, voxels * (1 + 4 * len(probability_paths)) + 2**20, "the segmentation")
    result = segment_images(model, images, threshold=threshold, min_lesion_voxels=min_lesion_voxels,
                            min_lesion_volume_mm3=min_lesion_volume_mm3, method=method, tta=tta, brain_mask=mask,
                            resample=resample, warn=warn, progress=progress)
    maps = [result.stage1_probability, result.stage2_probability, result.stage2_std][:len(probability_paths)]
    written = []
    try:  # all of the outputs or none of them
        if probability_paths:
            probability_paths[0].parent.mkdir(exist_ok=True)
        for values, path in zip(maps, probability_paths):
            nifti.save_like(values, reference, path, dtype=np.float32)
            written.append(path)
        nifti.save_like(result.mask, reference, out, dtype=np.uint8)
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    return result
