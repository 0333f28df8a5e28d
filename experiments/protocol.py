"""What every experiment shares: the cohort, the folds, training and scoring a fold, tables.

A fold trains one cascade with `jaxcascade.train` on its training
subjects (in its own workdir) and scores each of its test subjects twice: the
full cascade, and CNN1 alone post-processed exactly like the cascade's output.
A fold whose model has both stages and whose `metrics.json` exists is
finished: a later run reads it back instead of training.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import time
from pathlib import Path
from typing import Callable

import numpy as np

import jaxcascade
from jaxcascade.data import bids_layout, nifti
from jaxcascade.storage import weights
from jaxcascade import config as config_lib, phantom
from jaxcascade.segmentation import images as segment_in_memory, postprocess
from jaxcascade.evaluation import metrics
from jaxcascade.training.history import read_history
from jaxcascade.segmentation.cascade import Cascade
from jaxcascade.segmentation.inference import InferenceOptions
from jaxcascade.errors import UserError
from jaxcascade.runtime.outputs import write_json, write_text
from jaxcascade.data.subjects import find_subjects

PROCEDURAL_CONTRASTS = ("T1", "FLAIR")


@dataclasses.dataclass(frozen=True)
class Fold:
    name: str
    train: tuple[str, ...]
    test: tuple[str, ...]


def leave_one_out_folds(names: list[str]) -> list[Fold]:
    """One fold per participant: trained on all the others, tested on all of its sessions.

    Names are subjects, or BIDS sessions sub-X_ses-Y: two sessions of one person never sit on both
    sides of a fold, which would let the network meet the test brain in training.
    """
    participants = sorted({bids_layout.participant_of(name) for name in names})
    if len(participants) < 2:
        raise UserError(f"leave-one-out needs at least 2 subjects, the cohort has {len(participants)}")
    return [_held_out_fold(held_out, names, [held_out]) for held_out in participants]


def k_fold_folds(names: list[str], k: int, seed: int) -> list[Fold]:
    """k folds of participants shuffled by seed (sizes differ by at most one); k = participants is leave-one-out."""
    participants = sorted({bids_layout.participant_of(name) for name in names})
    if not 2 <= k <= len(participants):
        raise UserError(f"--config.folds={k}: k-fold needs 2 <= k <= {len(participants)} (the cohort's "
                        "participants); 0 means leave-one-out")
    order = np.random.default_rng(seed).permutation(len(participants))
    groups = [sorted(participants[i] for i in order[fold::k]) for fold in range(k)]
    return [_held_out_fold(f"fold{fold + 1}of{k}", names, group) for fold, group in enumerate(groups)]


def _held_out_fold(fold_name: str, names: list[str], held_out: list[str]) -> Fold:
    test = tuple(n for n in names if bids_layout.participant_of(n) in held_out)
    return Fold(fold_name, tuple(n for n in names if n not in test), test)


def cross_validation_folds(names: list[str], folds: int, seed: int) -> list[Fold]:
    """Leave-one-out (folds = 0) or k-fold, by participant."""
    return leave_one_out_folds(names) if folds == 0 else k_fold_folds(names, folds, seed)


def training_size_folds(names: list[str], sizes, test_subjects: int, repeats: int, seed: int) -> list[Fold]:
    """Train on the first n of a shuffled pool for each n in sizes; test on a fixed held-out set.

    The last `test_subjects` subjects are the test set. Each repeat shuffles
    the pool once, so within a repeat the training sets are nested: growing n
    only adds subjects, which keeps the curve free of set-to-set noise. A
    training set drawn again by a later repeat is not trained twice.
    """
    if len({bids_layout.participant_of(name) for name in names}) < len(names):
        raise UserError("training_set_size counts subjects, and this cohort has several sessions of one participant; "
                        "use leave_one_out.py (--config.folds=K), whose folds keep a participant's sessions together")
    pool, test = names[: len(names) - test_subjects], tuple(names[len(names) - test_subjects :])
    if test_subjects < 1 or not sizes or min(sizes) < 1 or max(sizes) > len(pool):
        raise UserError(
            f"training sizes {tuple(sizes)} with {test_subjects} test subjects need a cohort of at least "
            f"{max(sizes, default=0) + max(test_subjects, 1)} subjects and sizes >= 1; the cohort has {len(names)}"
        )
    folds, seen = [], set()
    for repeat in range(repeats):
        order = np.random.default_rng([seed, repeat]).permutation(len(pool))
        for n in sizes:
            chosen = tuple(sorted(pool[i] for i in order[:n]))
            if chosen not in seen:  # e.g. n = the whole pool: training is deterministic, so once is enough
                seen.add(chosen)
                folds.append(Fold(f"train{n:02d}-rep{repeat}", chosen, test))
    return folds


# ----------------------------------------------------------------------------- cohort


def cohort_location(config, results: Path) -> Path:
    """The subjects' folder in the training layout.

    The user's own data (config.cohort.data_dir); for a BIDS dataset, results/bids_view, a folder of
    links to its labelled sessions (`ensure_cohort` makes it afresh each run); otherwise the phantom in results/cohort.
    """
    data_dir = config.cohort.get("data_dir")
    if not data_dir:
        return results / "cohort"
    return results / "bids_view" if bids_layout.is_bids(data_dir) else Path(data_dir)


def link_folder(folder: Path, targets: dict[str, Path]) -> Path:
    """folder/<name> -> target for exactly these names: links to anything else removed, changed ones re-pointed.

    The folders of links the experiments train from must hold their split and nothing left over from an
    interrupted run with another one.
    """
    folder.mkdir(parents=True, exist_ok=True)
    for entry in folder.iterdir():
        if entry.name in targets and entry.is_symlink() and Path(os.readlink(entry)) == Path(targets[entry.name]):
            continue
        if not entry.is_symlink():
            raise UserError(f"{entry}: not a link the experiments made; move it out of {folder}")
        entry.unlink()
    for name, target in targets.items():
        link = folder / name
        if not link.is_symlink():
            link.symlink_to(target)
    return folder


def link_training_view(bids_root: Path, data_config, view: Path) -> list[str]:
    """results/bids_view/<sub-X_ses-Y>/<MODALITY><suffix> links to a BIDS dataset's labelled sessions.

    The folds and the scoring read the training layout; the links make a BIDS dataset one without copying
    it. Brought up to date each run, so a changed dataset is followed.
    """
    entries = [(found.name, found.inputs, found.truth) for found in find_subjects(bids_root, data_config, strict=True)]
    wanted = {name for name, _, _ in entries}
    for stale in [p for p in view.iterdir() if p.name not in wanted] if view.is_dir() else []:
        link_folder(stale, {})  # sessions gone from the dataset, or no longer labelled
        stale.rmdir()
    for name, inputs, lesion in entries:
        files = {**inputs, data_config.lesion: lesion}
        wrong = [f.name for f in files.values() if not f.name.endswith(data_config.suffix)]
        if wrong:
            raise UserError(f"{bids_root}: {name}: {', '.join(wrong)} do not end in {data_config.suffix}; "
                            f"set --config.cascade.data.suffix to their extension")
        link_folder(view / name, {f"{key}{data_config.suffix}": Path(target).resolve() for key, target in files.items()})
    return [name for name, _, _ in entries]


def ensure_cohort(cohort_config, modalities, cohort_dir: Path, log: Callable, data_config=None) -> list[str]:
    """The subject names of the cohort in cohort_dir.

    With cohort_config.data_dir that is the user's own data (the training layout; each subject needs
    every modality and the lesion mask of data_config); otherwise the phantom cohort is written once,
    and a later run checks it is the same cohort and reuses it.
    """
    modalities = tuple(modalities)
    data_dir = cohort_config.get("data_dir")
    if data_dir and bids_layout.is_bids(data_dir):
        names = link_training_view(Path(data_dir), data_config, cohort_dir)
        log(f"cohort: {len(names)} labelled sessions of the BIDS dataset {data_dir}, linked in {cohort_dir}")
        return names
    if data_dir:
        names = [found.name for found in find_subjects(cohort_dir, data_config, strict=True)]
        log(f"cohort: {len(names)} subjects of {cohort_dir}")
        return names
    record = {**config_lib.to_dict(cohort_config), "contrasts": list(modalities)}
    write_phantom_cohort(cohort_dir, record, log)
    return [phantom.subject_name(i) for i in range(cohort_config.subjects)]


def write_phantom_cohort(cohort_dir: Path, record: dict, log: Callable, scanner: str = "default") -> None:
    """Write the phantom cohort `record` describes (kind, size, subjects, seed, contrasts) once.

    Its manifest, cohort.json, is written last, so an interrupted write is redone; a later run checks
    that the folder holds the same cohort and reuses it.
    """
    manifest = cohort_dir / "cohort.json"
    kind, size, subjects, seed = record["kind"], record["size"], record["subjects"], record["seed"]
    if manifest.exists():
        changed = config_lib.differences(json.loads(manifest.read_text()), record)
        if changed:
            raise UserError(
                f"{manifest}: this results folder holds another cohort ({', '.join(changed)} differ); "
                "use a new --config.results_dir"
            )
        log(f"cohort: {subjects} subjects already in {cohort_dir}")
        return
    log(f"cohort: writing {subjects} {kind} {size} phantom subjects (scanner {scanner}) to {cohort_dir}")
    cohort_dir.mkdir(parents=True, exist_ok=True)
    contrasts = tuple(record["contrasts"])
    if kind == "procedural":
        if not set(contrasts) <= set(PROCEDURAL_CONTRASTS):
            raise UserError(f"the procedural phantom has only T1 and FLAIR, the cascade asks for {', '.join(contrasts)}; "
                            "use --config.cohort.kind=mni for T2 and PD")
        phantom.write_cohort(cohort_dir, subjects, seed, size, scanner=scanner)
    elif kind == "mni":
        from jaxcascade.phantom import mni as phantom_mni

        phantom_mni.write_cohort(cohort_dir, subjects, seed, size, contrasts, scanner=scanner)
    else:
        raise UserError(f"--config.cohort.kind={kind}: unknown phantom; use procedural or mni")
    write_json(record, manifest)


# ----------------------------------------------------------------------------- one fold


def stage1_alone_mask(stage1_probability, options: InferenceOptions, voxel_volume_ml: float) -> np.ndarray:
    """CNN1's probability post-processed as segment_volume post-processes CNN2's."""
    mask = postprocess.binarise(stage1_probability, options.threshold)
    mask = postprocess.remove_small_lesions(mask, options.min_lesion_voxels, options.connectivity)
    return postprocess.apply_min_volume(mask, options.min_volume_ml, voxel_volume_ml)


def load_subject(subject_dir: Path, data_config, modalities) -> tuple[list, np.ndarray]:
    """(images in `modalities` order on the FLAIR's grid, lesion mask) of one training-layout subject."""
    images = nifti.load_sequences({m: subject_dir / f"{m}{data_config.suffix}" for m in modalities},
                                  tuple(modalities), subject_dir.name, orientation=data_config.orientation,
                                  reference=data_config.flair)
    truth = nifti.load_lesion_mask(subject_dir / f"{data_config.lesion}{data_config.suffix}", images[0])
    return images, truth


def score_subject(model: Cascade, subject_dir: Path, segmentation_path: Path) -> dict:
    """{"cascade": metrics, "stage1": metrics} of one subject; writes the cascade's mask."""
    config = model.config
    images, truth = load_subject(subject_dir, config.data, model.modalities)
    result = segment_in_memory.segment_images(model, images)
    voxel_ml = images[0].voxel_volume_ml
    stage1_mask = stage1_alone_mask(result.stage1_probability, InferenceOptions.from_config(config), voxel_ml)
    nifti.save_like(result.mask, images[model.modalities.index(config.data.flair)], segmentation_path)
    return {"cascade": metrics.segmentation_metrics(result.mask, truth, voxel_ml),
            "stage1": metrics.segmentation_metrics(stage1_mask, truth, voxel_ml)}


def fold_finished(fold_dir: Path) -> bool:
    model = fold_dir / "model"
    return (fold_dir / "metrics.json").exists() and all(weights.stage_done(model, s) for s in (1, 2))


def _method_settings(config: dict) -> dict:
    # How a run is spread over processes does not change its results.
    return {key: value for key, value in config.items() if key != "distributed"}


def run_fold(fold: Fold, cohort_dir: Path, folds_dir: Path, cascade_config, log: Callable) -> dict:
    """Train (or resume) and score one fold; a finished fold is read back, never retrained."""
    fold_dir = folds_dir / fold.name
    stored_config = _method_settings(config_lib.to_dict(cascade_config))
    if fold_finished(fold_dir):
        metrics_path = fold_dir / "metrics.json"
        record = json.loads(metrics_path.read_text())
        # Settings added to jaxcascade since the fold ran take their defaults,
        # as model_dir.read_model_config does for a stored model.
        then = config_lib.to_dict(config_lib.from_dict(record["cascade_config"], str(metrics_path)))
        changed = config_lib.differences(_method_settings(then), stored_config)
        if changed or tuple(record["train"]) != fold.train or tuple(record["test"]) != fold.test:
            raise UserError(
                f"{fold_dir}: finished with another config or split ({', '.join(changed) or 'subjects'} differ); "
                "use a new --config.results_dir"
            )
        log(f"fold {fold.name}: finished earlier, skipping (metrics in {fold_dir / 'metrics.json'})")
        return record

    # train_cascade reads every subject folder of its data dir, so the fold
    # gets a folder of links to just its training subjects (relative, so the results folder can move).
    fold_dir.mkdir(parents=True, exist_ok=True)
    split = {"train": list(fold.train), "test": list(fold.test)}
    split_path = fold_dir / "split.json"
    if split_path.exists() and json.loads(split_path.read_text()) != split:
        raise UserError(f"{fold_dir}: an unfinished fold of another split (the cohort or --config.folds changed); "
                        "use a new --config.results_dir")
    write_json(split, split_path)
    train_dir = link_folder(fold_dir / "train", {name: Path(os.path.relpath(cohort_dir / name, fold_dir / "train"))
                                                 for name in fold.train})
    log(f"fold {fold.name}: training on {', '.join(fold.train)}; testing on {', '.join(fold.test)}")
    started = time.perf_counter()
    model = jaxcascade.train(train_dir, fold_dir / "model", config=cascade_config,
                             log=lambda message: log(f"  [{fold.name}] {message}"))
    trained = time.perf_counter()
    epochs = {stage: len(records) for stage, records in read_history(fold_dir / "model").items()}
    scores = {name: score_subject(model, cohort_dir / name, fold_dir / f"{name}_segmentation.nii.gz")
              for name in fold.test}
    record = {
        "fold": fold.name, "train": list(fold.train), "test": list(fold.test), "subjects": scores,
        "epochs": epochs, "train_seconds": trained - started,
        "score_seconds": time.perf_counter() - trained, "cascade_config": stored_config,
    }
    write_json(record, fold_dir / "metrics.json")
    dsc = ", ".join(f"{name} {s['cascade']['dsc']:.3f}" for name, s in scores.items())
    log(f"fold {fold.name}: DSC {dsc} ({record['train_seconds']:.0f} s training, "
        f"{record['score_seconds']:.0f} s scoring)")
    return record


def run_folds(folds: list[Fold], results_dir: Path, cohort_dir: Path, cascade_config, log: Callable) -> list[dict]:
    return [run_fold(fold, cohort_dir, results_dir / "folds", cascade_config, log) for fold in folds]


# ----------------------------------------------------------------------------- tables


def nan_mean(values) -> float:
    """Mean of the defined values (an undefined metric is None or nan); nan when none is."""
    defined = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    return sum(defined) / len(defined) if defined else math.nan


def summary_row(rows: list[dict], columns: list[str], label: str, *, totals=()) -> dict:
    """A last table row: the mean of each numeric column, or the sum for columns in totals."""
    row = {columns[0]: label}
    for column in columns[1:]:
        values = [r[column] for r in rows]
        row[column] = sum(values) if column in totals else nan_mean(values)
    return row


def _cell(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, (bool, str)):
        return str(value)
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    return f"{float(value):.{digits}f}"


def markdown_table(rows: list[dict], columns: list[str], headers: dict | None = None) -> str:
    """A GitHub Markdown table; undefined values are blank."""
    headers = headers or {}
    text = {c for c in columns if any(isinstance(row[c], str) for row in rows)}  # left-aligned, numbers right
    lines = ["| " + " | ".join(headers.get(c, c) for c in columns) + " |",
             "|" + "|".join(" --- " if c in text else " ---: " for c in columns) + "|"]
    lines += ["| " + " | ".join(_cell(row[c]) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_table(rows: list[dict], columns: list[str], stem: Path, headers: dict | None = None) -> str:
    """Write stem.csv and stem.md (atomically); return the Markdown."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows([[_cell(row[c], 6) for c in columns] for row in rows])
    write_text(buffer.getvalue(), stem.with_suffix(".csv"))
    table = markdown_table(rows, columns, headers)
    write_text(table, stem.with_suffix(".md"))
    return table
