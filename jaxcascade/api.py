"""The public API: train a cascade, load it, segment one subject or a whole study, score a mask.

Thin, keyword-only wrappers over the modules that do the work (`pipeline`, `study`, `cascade`,
`metrics`), so that a script, a notebook and the command line make the same calls:

    model = jaxcascade.train("data", "runs/a", config="demo")
    result = jaxcascade.segment(model, {"T1": "t1.nii.gz", "FLAIR": "flair.nii.gz"}, out="seg.nii.gz")
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

import nibabel as nib
import numpy as np

from jaxcascade import config as config_lib
from jaxcascade.segmentation import nifti_files, study
from jaxcascade.segmentation.options import SegmentOptions, StudyOptions
from jaxcascade.evaluation import metrics
from jaxcascade.storage import model_directory, shipped
from jaxcascade.data import nifti
from jaxcascade.segmentation.cascade import Cascade, Segmentation
from jaxcascade.errors import warn as warn_user
from jaxcascade.errors import UserError

if TYPE_CHECKING:  # the longitudinal package (SimpleITK, nilearn) is imported when a change is asked for
    from jaxcascade.longitudinal.pipeline import ChangeOptions, ChangeRun

_LOG = logging.getLogger(__name__)

PathLike = str | os.PathLike


def load_model(model_dir: PathLike = shipped.DEFAULT_MODEL, *, compute_dtype: str | None = None) -> Cascade:
    """A trained (or imported) model directory as a `Cascade` (both stages and the model's config).

    Args:
        model_dir: a `jaxcascade train` workdir, a `jaxcascade import-keras` output, or the name of a
            model that ships with jaxcascade (`shipped_models()`); the shipped 'default' if left out.
        compute_dtype: 'float32' or 'bfloat16' for the convolutions' products; the model's own by default.
    """
    return Cascade.load(shipped.locate(model_dir), compute_dtype=compute_dtype)


def shipped_models() -> dict[str, dict]:
    """The models inside the package, each with its card: training data, licence, measured accuracy."""
    return {name: shipped.card(name) for name in shipped.names()}


def train(data_dir: PathLike, workdir: PathLike, *, config: str | object | None = None, overrides: Sequence[str] = (),
          init_from: PathLike | None = None, participants: Sequence[str] | None = None,
          log: Callable[[str], None] = _LOG.info, progress: Callable | None = None) -> Cascade:
    """Train both stages on data_dir's subjects in workdir (resuming whatever a previous run left).

    Args:
        data_dir: one folder per subject (`T1.nii.gz`, `FLAIR.nii.gz`, ..., `lesion.nii.gz`) or a BIDS dataset.
        workdir: where the config, metrics, checkpoints and final weights go; rerunning resumes.
        config: a packaged config name ('default', 'demo', 'robust'), a file with `get_config()`, or a
            `ml_collections.ConfigDict`; 'default' if None. With init_from the model's own config is used, and
            config may name a fine-tuning recipe (e.g. 'oneshot': a file with `fine_tuning_overrides()`)
            whose overrides come before `overrides`.
        overrides: `--config.a.b=value` strings, type-checked like the command line's.
        init_from: a model directory (or a shipped model's name, e.g. 'default') to fine-tune instead of
            training from scratch.
        participants: train on these participants only (BIDS labels, `01` or `sub-01`; folder names).
        log: called with one line per event (epochs, resumes).
        progress: wraps iterables for a progress bar (e.g. `tqdm.auto.tqdm`); None shows none.

    Returns:
        The trained cascade, loaded from workdir.
    """
    if init_from is not None:
        # A recipe's overrides first, so that the caller's own overrides win.
        recipe = config_lib.load_fine_tuning_recipe(config) if config is not None else []
        settings = model_directory.fine_tuning_config(shipped.locate(init_from), [*recipe, *overrides])
    else:
        base = config_lib.load_config(config or "default") if isinstance(config, (str, type(None))) else config
        settings = config_lib.apply_overrides(base, list(overrides))
    if participants is not None:
        from jaxcascade.data import bids_layout

        participants = bids_layout.participant_labels(participants)
    # Imported here: training brings orbax (and tensorstore), which segmenting never needs: 0.3 s of
    # every `segment`'s start-up otherwise.
    from jaxcascade.training import pipeline

    pipeline.train_cascade(data_dir, workdir, settings, log=log, progress=progress, participants=participants)
    return load_model(workdir)


def segment(model: Cascade | PathLike | None, inputs: Mapping[str, PathLike | nib.Nifti1Image], *,
            out: PathLike | None = None, probabilities: PathLike | None = None, brain_mask: PathLike | None = None,
            threshold: float | None = None, min_lesion_voxels: int | None = None,
            min_lesion_volume_mm3: float | None = None, method: str | None = None, tta: bool | None = None,
            compute_dtype: str | None = None, resample: str = "auto", thick_slices: str = "auto",
            overwrite: bool = False, warn: Callable[[str], None] = warn_user,
            progress: Callable | None = None) -> Segmentation:
    """Segment one subject: its sequences by modality name, as NIfTI paths or nibabel images.

    Every input and output is checked before any work, as the command line checks them (an image in memory
    passes exactly the checks its saved file would, and is left as it is). The mask is on the FLAIR's own
    voxel grid.

    Args:
        model: a `Cascade` (from `load_model` or `train`), a model directory, a shipped model's name, or
            None for the shipped 'default' model.
        inputs: exactly the model's modalities, e.g. `{"T1": "t1.nii.gz", "FLAIR": "flair.nii.gz"}`.
        out: where to write the mask (.nii.gz or .nii, with the FLAIR's header); None writes nothing.
        probabilities: a folder for both stages' probability maps (stage1.nii.gz, stage2.nii.gz).
        brain_mask: a mask file for images that are not skull-stripped.
        threshold, min_lesion_voxels, min_lesion_volume_mm3, method, tta: override the model's config
            (t_bin, the smallest lesion kept, 'auto'/'dense'/'patch', test-time augmentation).
        compute_dtype: 'float32' or 'bfloat16' products, for a model given as a directory.
        resample: 'auto' segments inputs of another voxel size at the model's; 'never' keeps their grid.
        thick_slices: 'auto' applies the model's thick-slice settings (config.inference.thick_slices) to a
            FLAIR whose thickest voxel edge is at least their from_mm; 'on' always, 'off' never.
        overwrite: replace existing outputs.
        warn: called with a one-line warning (an image that does not look skull-stripped, ...).

    Returns:
        A `Segmentation`: `mask` (bool), `stage1_probability`, `stage2_probability` (float32) on the FLAIR
        file's own voxel grid and axis order, the arrays written to `out` and `probabilities` (so they
        compare with arrays read from the subject's files as they are stored), and the candidate counts.
    """
    options = SegmentOptions(threshold=threshold, min_lesion_voxels=min_lesion_voxels,
                             min_lesion_volume_mm3=min_lesion_volume_mm3, method=method, tta=tta, resample=resample,
                             thick_slices=thick_slices)
    return nifti_files.segment_files(model, dict(inputs), out, options=options, probabilities_dir=probabilities,
                                     brain_mask=brain_mask, compute_dtype=compute_dtype, overwrite=overwrite,
                                     progress=progress, warn=warn)


def segment_study(model: PathLike | None, data_dir: PathLike, out_dir: PathLike, *, probabilities: bool = False,
                  overwrite: bool = False, compute_dtype: str | None = None, tta: bool | None = None,
                  resample: str = "auto", min_lesion_volume_mm3: float | None = None, thick_slices: str = "auto",
                  participants: Sequence[str] | None = None, bids_suffixes: Mapping[str, str] | None = None,
                  bids_filters: Sequence[str] = (), shard: tuple[int, int] | str | None = None,
                  log: Callable[[str], None] = _LOG.info, progress: Callable | None = None) -> list[dict]:
    """Segment every subject (or BIDS session) of data_dir into out_dir, the model compiled once.

    Args:
        model: a model directory, a shipped model's name, or None for the shipped 'default'.
        data_dir: one folder per subject, or a BIDS dataset.
        out_dir: per-subject masks, QC pictures and reports, `lesions.csv` and `lesion_table.csv`
            (a BIDS derivatives dataset when data_dir is BIDS). Rerunning skips finished subjects.
        probabilities: also write both stages' probability maps.
        overwrite: redo subjects already finished.
        compute_dtype, tta, resample, min_lesion_volume_mm3, thick_slices: as `segment`'s.
        participants: labels (`01` or `sub-01`; folder names in the training layout) to segment; all if None.
        bids_suffixes: {modality: BIDS suffix} where not the defaults (T1 -> T1w, FLAIR -> FLAIR, ...).
        bids_filters: `[MODALITY:]ENTITY=VALUE` strings, e.g. `FLAIR:acq=3d`, `run=1`.
        shard: (i, n) or 'i/n' or 'slurm': this process segments subjects i, i + n, ... (see docs/studies.md).
        log: called with one line per subject; progress: wraps iterables for a progress bar.

    Returns:
        One row per subject (the rows of `lesions.csv`): status, lesion count and volume, and the
        scores where a lesion mask exists.
    """
    from jaxcascade.data import bids_layout

    if isinstance(shard, str) or shard is None:
        shard = study.parse_shard(shard)
    options = StudyOptions(
        segment=SegmentOptions(tta=tta, resample=resample, min_lesion_volume_mm3=min_lesion_volume_mm3,
                               thick_slices=thick_slices),
        probabilities=probabilities, overwrite=overwrite, compute_dtype=compute_dtype,
        bids_suffixes=dict(bids_suffixes) if bids_suffixes else None,
        bids_filters=bids_layout.parse_filters(bids_filters),
        participants=None if participants is None else bids_layout.participant_labels(participants),
        shard=tuple(shard))
    return study.segment_study(model, data_dir, out_dir, options, log=log, progress=progress)


def evaluate(prediction: PathLike | np.ndarray, truth: PathLike | np.ndarray, *,
             voxel_volume_ml: float | None = None) -> dict[str, float]:
    """Voxel- and lesion-level scores of a predicted mask against the true one (see `jaxcascade.evaluation.metrics`).

    Args:
        prediction, truth: two NIfTI paths (on one grid) or two arrays of one shape.
        voxel_volume_ml: for arrays, the volume of one voxel, to report volumes in ml; read from the
            truth's header for paths.

    Returns:
        `dsc`, `ppv`, `tpr`, `rvd`, `lesion_tpr`, `lesion_fpr`, `lesion_f1`, the counts and, with a voxel
        volume, `pred_volume_ml` and `truth_volume_ml`.
    """
    if isinstance(truth, (str, os.PathLike)) or isinstance(prediction, (str, os.PathLike)):
        if not isinstance(truth, (str, os.PathLike)) or not isinstance(prediction, (str, os.PathLike)):
            raise UserError("evaluate: give two NIfTI paths or two arrays, not one of each")
        truth_image = nifti.load_image(truth, allow_all_zero=True)
        prediction = nifti.load_lesion_mask(prediction, truth_image)
        truth = nifti.load_lesion_mask(truth, truth_image)
        voxel_volume_ml = truth_image.voxel_volume_ml if voxel_volume_ml is None else voxel_volume_ml
    return metrics.segmentation_metrics(prediction, truth, voxel_volume_ml)


def detect_changes(model: Cascade | PathLike | None, baseline: Mapping[str, PathLike],
                   followup: Mapping[str, PathLike], *, out_dir: PathLike | None = None,
                   baseline_transforms: Mapping[str, PathLike] | None = None,
                   followup_transforms: Mapping[str, PathLike] | None = None,
                   options: "ChangeOptions | None" = None, overwrite: bool = False) -> "ChangeRun":
    """New and enlarging lesions between two visits of one patient (`jaxcascade change`).

    Args:
        model: a `Cascade`, a model directory, a shipped model's name, or None for the shipped 'default'.
        baseline, followup: each visit's sequences by modality (the model's, FLAIR among them), any grids,
            skull on or off: each visit's sequences are registered onto its FLAIR, the follow-up onto the
            baseline, and a brain mask is extracted where the FLAIR is not skull-stripped.
        out_dir: where to write the outputs (`longitudinal.pipeline.OUTPUTS`); None writes nothing.
        baseline_transforms, followup_transforms: ITK text transforms already estimated, used instead of
            registering: `T1` (the visit's FLAIR points -> T1 points, i.e. the T1's registration onto the
            FLAIR), and `FLAIR` for both visits (a common space -> that visit's FLAIR).
        options: a `longitudinal.pipeline.ChangeOptions` (alignment, change criteria, subtraction check).
        overwrite: replace outputs of an earlier run in out_dir.

    Returns:
        A `ChangeRun`: the aligned visits, both segmentations and `changes` (change mask, one row per lesion
        group, the summary) on the working grid (`aligned.grid_affine`).
    """
    from jaxcascade.longitudinal import pipeline, visits

    options = options or pipeline.ChangeOptions()
    if out_dir is not None:
        pipeline.check_outputs(out_dir, overwrite=overwrite)
    cascade = model if isinstance(model, Cascade) else load_model(model or shipped.DEFAULT_MODEL)
    run = pipeline.detect_changes(cascade, visits.Visit(dict(baseline), dict(baseline_transforms or {})),
                                  visits.Visit(dict(followup), dict(followup_transforms or {})), options)
    if out_dir is not None:
        pipeline.write_change(run, out_dir)
    return run


def change_study(model: PathLike | None, data_dir: PathLike, out_dir: PathLike, *,
                 options: "ChangeOptions | None" = None,
                 participants: Sequence[str] | None = None, bids_suffixes: Mapping[str, str] | None = None,
                 bids_filters: Sequence[str] | None = None, overwrite: bool = False,
                 log: Callable[[str], None] = _LOG.info) -> list[dict]:
    """`detect_changes` for every two consecutive sessions of each participant of a study (BIDS sessions, or
    folder names in the training layout, in label order); outputs under OUT/sub-X/ses-A_to_ses-B/ and one row
    per pair in OUT/change_summary.csv (returned). bids_suffixes: {modality: BIDS suffix}; bids_filters:
    `[MODALITY:]ENTITY=VALUE` strings, as `jaxcascade segment --bids-filter` takes them."""
    from jaxcascade.longitudinal import pipeline

    cascade = load_model(model or shipped.DEFAULT_MODEL)
    from jaxcascade.data import bids_layout

    subjects = study.study_subjects(data_dir, cascade.config, dict(bids_suffixes or {}) or None,
                                    participants=participants, bids_filters=bids_layout.parse_filters(bids_filters),
                                    log=log)
    return pipeline.change_study(cascade, subjects, out_dir, options or pipeline.ChangeOptions(),
                                 overwrite=overwrite, log=log)
