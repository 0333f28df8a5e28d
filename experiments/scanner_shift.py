"""The new-scanner experiment (experiments/new_scanner.py): cohorts of two scanners, variants, one-shot, rows.

Scanner A's cohort trains every variant and tests it on held-out A subjects; scanner B's cohort (other
brains, imaged with B's acquisition) gives the one-shot subject(s) and the unseen-scanner test set. Models
live in results/models/<variant>; a model with both stages is reused, a scored subject is read back from
results/scores/<variant>.json, so a rerun costs only what changed.
"""

from __future__ import annotations

import json
import shlex
import time
from pathlib import Path
from typing import Callable

import numpy as np

from experiments import baselines, figures, protocol
from jaxcascade.storage import interop, model_directory, weights
from jaxcascade import config as config_lib, phantom
from jaxcascade.training import pipeline
from jaxcascade.segmentation.cascade import Cascade
from jaxcascade.errors import UserError
from jaxcascade.runtime.outputs import write_json

ROW_COLUMNS = ["variant", "a_dsc", "b_dsc", "b_ppv", "b_tpr", "b_lesion_f1", "b_volume_r", "b_volume_mad_ml",
               "train_seconds"]
ROW_HEADERS = {"variant": "variant", "a_dsc": "DSC scanner A", "b_dsc": "DSC scanner B", "b_ppv": "PPV B",
               "b_tpr": "TPR B", "b_lesion_f1": "lesion F1 B", "b_volume_r": "volume r B",
               "b_volume_mad_ml": "volume MAD B (ml)", "train_seconds": "training (s)"}


def write_scanner_cohorts(cohort, results: Path, modalities, log: Callable) -> dict[str, list[Path]]:
    """{"train", "test_a", "one_shot", "test_b"}: subject folders of results/cohort_{a,b} (written once)."""
    sizes = {"a": cohort.train_subjects + cohort.test_subjects_a, "b": cohort.one_shot_subjects + cohort.test_subjects_b}
    scanner = {"a": cohort.scanner_a, "b": cohort.scanner_b}
    folders = {}
    for key, seed in (("a", cohort.seed), ("b", cohort.seed + 1)):
        where = results / f"cohort_{key}"
        record = {"kind": cohort.kind, "size": cohort.size, "seed": seed, "subjects": sizes[key],
                  "scanner": scanner[key], "contrasts": list(modalities)}
        protocol.write_phantom_cohort(where, record, lambda message: log(f"{key.upper()} {message}"), scanner[key])
        folders[key] = [where / phantom.subject_name(i) for i in range(sizes[key])]
    split_a, split_b = cohort.train_subjects, cohort.one_shot_subjects
    return {"train": folders["a"][:split_a], "test_a": folders["a"][split_a:],
            "one_shot": folders["b"][:split_b], "test_b": folders["b"][split_b:]}


def variant_config(spec: str, budget):
    """A packaged method ("robust [--config.x=y ...]") with the budget's departures from default laid over it.

    Only departures count: a budget setting equal to default's leaves the method's own value (robust's
    t_bin 0.5 survives a demo budget); settings for one variant go in its spec.
    """
    try:
        name, *overrides = shlex.split(spec)
    except ValueError as error:  # an empty spec unpacks nothing; an open quote fails to split
        raise UserError(f"variant {spec!r}: expected 'PACKAGED_CONFIG [--config.key=value ...]' ({error})") from None
    config = config_lib.load_config(name)
    default, wanted = config_lib.to_dict(config_lib.load_config(None)), config_lib.to_dict(budget)
    for key in config_lib.differences(default, wanted):
        *parents, leaf = key.split(".")
        target, value = config, wanted
        for part in parents:
            target = target[part]
        for part in key.split("."):
            value = value[part]
        with target.ignore_type():
            target[leaf] = tuple(value) if isinstance(target[leaf], tuple) else value
    return config_lib.apply_overrides(config, overrides)


def _train(model: Path, data: Path, config, log: Callable) -> float:
    """Train (or resume) one model; seconds spent, also kept beside it so a rerun still reports them.

    A model trained earlier with other settings is refused, never reported as this run's; a resumed
    training reports nan seconds (only part of it was timed).
    """
    timing = model.parent / f"{model.name}_train_seconds.json"
    if (model / "config.json").exists():
        changed = config_lib.differences(model_directory.stored_config(model_directory.read_model_config(model)),
                                         model_directory.stored_config(config))
        if changed:
            raise UserError(f"{model}: trained with other settings ({', '.join(changed[:4])}); "
                            "use a new --config.results_dir")
        if all(weights.stage_done(model, stage) for stage in (1, 2)):
            return json.loads(timing.read_text())["seconds"] if timing.exists() else float("nan")
    resumed = model.exists()
    started = time.perf_counter()
    pipeline.train_cascade(data, model, config, log=lambda message: log(f"  [{model.name}] {message}"))
    seconds = float("nan") if resumed else time.perf_counter() - started
    write_json({"seconds": seconds}, timing)
    return seconds


def trained_models(config, split: dict, results: Path, log: Callable) -> dict[str, tuple[Path, float]]:
    """{variant: (model folder, training seconds)} for every variant and one-shot fine-tuning."""
    models, trained = results / "models", {}
    train_dir = protocol.link_folder(results / "train_a", {s.name: s.resolve() for s in split["train"]})
    for name, spec in config.variants.items():
        log(f"variant {name}: {spec}")
        trained[name] = (models / name, _train(models / name, train_dir, variant_config(spec, config.cascade), log))
    one_shot_dir = protocol.link_folder(results / "one_shot_b", {s.name: s.resolve() for s in split["one_shot"]})
    for name in [n.strip() for n in config.one_shot.variants.split(",") if n.strip()]:
        if name not in trained:
            raise UserError(f"--config.one_shot.variants: {name} is not a variant ({', '.join(trained)})")
        tuned = f"{name}+one-shot"
        overrides = [f"--config.train.trainable={config.one_shot.trainable}",
                     f"--config.train.max_epochs={config.one_shot.max_epochs}",
                     f"--config.train.patience={config.one_shot.patience}"]
        tuning = model_directory.fine_tuning_config(trained[name][0], overrides)
        trained[tuned] = (models / tuned, _train(models / tuned, one_shot_dir, tuning, log))
    if config.nicms_dir:
        source = Path(config.nicms_dir)
        files = [source / f"model_{stage}.hdf5" for stage in (1, 2)]
        if not all(f.is_file() for f in files):
            log(f"nicMSlesions: no model_1.hdf5 and model_2.hdf5 in {source}; its row is left out")
            return trained
        if not (models / "nicMSlesions").exists():
            interop.import_keras(*files, tuple(config.nicms_modalities.split(",")), models / "nicMSlesions")
        trained["nicMSlesions"] = (models / "nicMSlesions", float("nan"))
    return trained


def scores_of(name: str, model: Path, subjects: list[Path], results: Path, log: Callable) -> dict[str, dict]:
    """{subject key: cascade metrics} of one model, read back where scored before."""
    path = results / "scores" / f"{name}.json"
    # The model's settings beside its scores: scores of a model since replaced are dropped.
    settings_path = path.with_suffix(".config.json")
    settings = model_directory.stored_config(model_directory.read_model_config(model))
    fresh = not settings_path.exists() or json.loads(settings_path.read_text()) == settings
    scores = json.loads(path.read_text()) if path.exists() and fresh else {}
    missing = [s for s in subjects if _key(s) not in scores]
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(settings, settings_path)
    if missing:
        cascade = Cascade.load(model)
        for subject in missing:
            started = time.perf_counter()
            segmentation = results / "segmentations" / name / f"{_key(subject)}.nii.gz"
            segmentation.parent.mkdir(parents=True, exist_ok=True)
            scores[_key(subject)] = {**protocol.score_subject(cascade, subject, segmentation)["cascade"],
                                     "seconds": time.perf_counter() - started}
            log(f"  {name} on {_key(subject)}: DSC {scores[_key(subject)]['dsc']:.3f}")
            write_json(scores, path)
    return {_key(s): scores[_key(s)] for s in subjects}


def _key(subject: Path) -> str:
    return f"{subject.parent.name.removeprefix('cohort_').upper()}/{subject.name}"


def variant_row(name: str, scores: dict, seconds: float) -> dict:
    a = [s for k, s in scores.items() if k.startswith("A/")]
    b = [s for k, s in scores.items() if k.startswith("B/")]
    predicted = np.array([s["pred_volume_ml"] for s in b])
    true = np.array([s["truth_volume_ml"] for s in b])
    defined = len(b) > 1 and predicted.std() > 0 and true.std() > 0
    return {"variant": name, "a_dsc": protocol.nan_mean([s["dsc"] for s in a]),
            **{f"b_{key}": protocol.nan_mean([s[key] for s in b]) for key in ("dsc", "ppv", "tpr", "lesion_f1")},
            "b_volume_r": float(np.corrcoef(predicted, true)[0, 1]) if defined else float("nan"),
            "b_volume_mad_ml": float(np.mean(np.abs(predicted - true))) if b else float("nan"),
            "train_seconds": seconds}


def new_scanner(config, log: Callable = print) -> dict:
    started = time.perf_counter()
    results = Path(config.results_dir)
    results.mkdir(parents=True, exist_ok=True)
    split = write_scanner_cohorts(config.cohort, results, config.cascade.data.modalities, log)
    trained = trained_models(config, split, results, log)
    tests = split["test_a"] + split["test_b"]
    per_model = {name: scores_of(name, model, tests, results, log) for name, (model, _) in trained.items()}
    threshold, fit_seconds = baselines.fit_threshold(split["train"], config.cascade, log)
    per_model["FLAIR threshold"] = baselines.threshold_scores(tests, threshold, config.cascade, _key)
    trained["FLAIR threshold"] = (None, fit_seconds)
    rows = [variant_row(name, scores, trained[name][1]) for name, scores in per_model.items()]
    table = protocol.write_table(rows, ROW_COLUMNS, results / "new_scanner", ROW_HEADERS)
    subject_rows = [{"variant": name, "subject": key, **{m: s[m] for m in ("dsc", "ppv", "tpr", "lesion_f1",
                                                                         "pred_volume_ml", "truth_volume_ml")}}
                    for name, scores in per_model.items() for key, s in scores.items()]
    protocol.write_table(subject_rows, ["variant", "subject", "dsc", "ppv", "tpr", "lesion_f1", "pred_volume_ml",
                                        "truth_volume_ml"], results / "new_scanner_subjects")
    figures.new_scanner(rows, subject_rows, results / "new_scanner.png",
                        f"trained on scanner {config.cohort.scanner_a}, tested on {config.cohort.scanner_b}")
    log(table)
    by_name = {row["variant"]: row for row in rows}
    nan_row = {"a_dsc": float("nan"), "b_dsc": float("nan")}
    faithful = by_name.get("faithful", nan_row)
    robust = by_name.get("robust", faithful)
    unseen = robust["b_dsc"]
    one_shot = max((row["b_dsc"] for row in rows if row["variant"].endswith("+one-shot")), default=float("nan"))
    summary = {"experiment": "new_scanner", "results_dir": str(results), "rows": rows,
               "flair_threshold": threshold, "wall_seconds_this_run": time.perf_counter() - started,
               "targets": {"unseen_scanner_dsc": unseen, "unseen_scanner_met": bool(unseen >= 0.70),
                           "one_shot_dsc": one_shot, "one_shot_met": bool(one_shot >= 0.80),
                           "robust_minus_faithful_on_a": robust["a_dsc"] - faithful["a_dsc"]}}
    write_json(summary, results / "new_scanner_summary.json")
    log(f"new_scanner: results in {results}")
    return summary
