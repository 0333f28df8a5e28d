"""Patches per second of whole training epochs (`fit_stage`) vs PyTorch's bare train step.

Run:
    python -m benchmarks.train_epoch [--subjects 4] [--epochs 3]
    python -m benchmarks.train_epoch --quick      # smoke run: one small subject, tiny timings
A stage-1 training set is built in memory from 1 mm phantom subjects (the
`full` procedural phantom, 197 x 233 x 189 voxels, T1 + FLAIR, normalised and
sampled exactly as `train_cascade` does) and trained with the demo config
(batch 128, `valverde2017_valid`). Whole epochs as users meet them are timed:
the training steps, validation, the per-epoch orbax checkpoint and the
history `train` keeps (metrics.jsonl and training_curves.png rewritten each
epoch), i.e. the time between consecutive `on_epoch` calls. The
first epoch (compilation) is excluded. Each phase's wall time (the calls of
`PHASES` below, found in whichever version of the code runs) is reported too.

PyTorch's pure step (`benchmarks.train_step.torch_step`: one pre-made batch,
seed augmentation, Adadelta) runs in a process of its own with jaxcascade's
malloc settings, flush-to-zero and threads (`common.run_baseline`): no data,
validation or checkpoint, so the ratio (epoch patches/s over its patches/s)
charges jaxcascade with everything an epoch does beyond the steps.
Prints a table, writes benchmarks/results/train_epoch.json.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import markdown_table, run_baseline, write_results

# phase -> (module, function) whose calls make up the phase; missing ones are skipped, so the same
# benchmark measures older versions of the loop.
PHASES = {
    "host batch assembly": [("jaxcascade.training.train_loop", "training_batch")],
    "validation": [("jaxcascade.training.train_loop", "evaluate")],
    "checkpoint": [("jaxcascade.storage.checkpoints", "save_epoch")],
    "history (metrics.jsonl, curves)": [("jaxcascade.training.history", "write_history")],
}


def build_training_set(subjects: int, size: str, seed: int, max_rows: int | None, config):
    """Stage 1's TrainingSet from `subjects` phantom subjects of `size`, sampled as `train_cascade` does."""
    from jaxcascade import phantom
    from jaxcascade.data.normalisation import candidate_mask, normalise_channels
    from jaxcascade.runtime import seeding
    from jaxcascade.training import sampling
    from jaxcascade.training.batching import TrainingSet

    volumes, centres, labels = [], [], []
    for number in range(subjects):
        subject = phantom.make_subject(phantom.subject_seed(seed, number), size)
        volume = normalise_channels([subject["T1"], subject["FLAIR"]], config.normalisation)
        rng = seeding.stream(config.seed, "sampling", stage=1, subject=number)
        c, l = sampling.stage1_centres(subject["lesion"] > 0, candidate_mask(volume[..., 1], config.candidates.min_th),
                                       rng)
        if max_rows is not None and len(l) > max_rows:
            keep = np.sort(np.random.default_rng(number).permutation(len(l))[:max_rows])
            c, l = c[keep], l[keep]
        volumes.append(volume)
        centres.append(c)
        labels.append(l)
    return TrainingSet.from_subjects(volumes, centres, labels, config.model.patch_size)


@contextlib.contextmanager
def phase_timers():
    """Wall seconds spent inside each PHASES function, per epoch: yields (totals, reset())."""
    import importlib

    totals = {phase: 0.0 for phase in PHASES}
    active = []  # a phase's calls inside another's (validation's batches) count for the outer one
    patched = []
    for phase, targets in PHASES.items():
        for module_name, name in targets:
            module = importlib.import_module(module_name)
            original = getattr(module, name, None)
            if original is None:
                continue

            def timed(*args, _original=original, _phase=phase, **kwargs):
                if active:
                    return _original(*args, **kwargs)
                active.append(_phase)
                started = time.perf_counter()
                try:
                    return _original(*args, **kwargs)
                finally:
                    totals[_phase] += time.perf_counter() - started
                    active.pop()

            setattr(module, name, timed)
            patched.append((module, name, original))
    try:
        yield totals
    finally:
        for module, name, original in patched:
            setattr(module, name, original)


def time_epochs(data, config, epochs: int) -> dict:
    """Whole-epoch wall times of fit_stage (the first, compiling, epoch excluded) and their phases."""
    from jaxcascade.networks import models
    from jaxcascade.runtime import seeding
    from jaxcascade.training import history as history_lib, train_loop

    config.train.max_epochs = epochs + 1
    config.train.patience = epochs + 1
    model = models.build_network(config.model, 2, seeding.init_seed(config.seed, 1), config.compute_dtype)
    marks, phases = [], []
    logged = []
    with tempfile.TemporaryDirectory() as workdir, phase_timers() as totals:
        def on_epoch(stage_history):
            history_lib.write_history(Path(workdir), {1: stage_history, 2: []})  # as `train` does
            marks.append(time.perf_counter())
            phases.append(dict(totals))
            for phase in totals:
                totals[phase] = 0.0

        started = time.perf_counter()
        _, history = train_loop.fit_stage(stage=1, model=model, data=data, config=config, workdir=workdir,
                                          log=logged.append, on_epoch=on_epoch)
        returned = time.perf_counter()
    seconds = np.diff(marks)
    # The time between the last on_epoch and fit_stage's return (closing the checkpoint manager, which
    # waits for any write still running) belongs to the last epoch.
    seconds[-1] += returned - marks[-1]
    steps = history[-1]["steps"] // len(history)
    return {"epoch_s": seconds.tolist(), "phases": phases[1:], "steps_per_epoch": steps,
            "validation_patches": _validation_patches(logged), "first_epoch_s": marks[0] - started,
            "log": logged}


def _validation_patches(logged: list[str]) -> int | None:
    for line in logged:
        if "validation patches" in line:
            return int(line.split(" / ")[1].split()[0])
    return None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", type=int, default=4, help="1 mm phantom subjects in the training set")
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs (after one warm-up epoch)")
    parser.add_argument("--torch-repeats", type=int, default=50)
    parser.add_argument("--quick", action="store_true", help="smoke run: one small subject, two timed epochs")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    from jaxcascade import config as config_lib

    config = config_lib.load_config("demo")
    size, subjects, max_rows, epochs, repeats = "full", args.subjects, None, args.epochs, args.torch_repeats
    if args.quick:
        size, subjects, max_rows, epochs, repeats = "small", 1, 1200, 2, 3
    built = time.perf_counter()
    data = build_training_set(subjects, size, 0, max_rows, config)
    print(f"training set: {subjects} {size} phantom subject(s), {len(data.labels)} patches "
          f"({time.perf_counter() - built:.1f} s to build)", flush=True)
    timing = time_epochs(data, config, epochs)
    torch_timing = run_baseline("benchmarks.train_step:torch_step", network=config.model.network,
                                batch_size=config.train.batch_size, repeats=repeats)
    baseline = torch_timing.pop("baseline")

    batch = config.train.batch_size
    train_patches = timing["steps_per_epoch"] * batch
    epoch_s = timing["epoch_s"]
    median_s = statistics.median(epoch_s)
    torch_rate = batch / torch_timing["median_s"]
    row = {
        "network": config.model.network, "batch": batch, "subjects": subjects, "phantom": size,
        "steps_per_epoch": timing["steps_per_epoch"], "validation_patches": timing["validation_patches"],
        "epochs_timed": len(epoch_s), "epoch_s": median_s, "min_s": min(epoch_s), "max_s": max(epoch_s),
        "patches_per_s": train_patches / median_s,
        "min_patches_per_s": train_patches / max(epoch_s), "max_patches_per_s": train_patches / min(epoch_s),
        "torch_step_ms": torch_timing["median_s"] * 1e3, "torch_min_ms": torch_timing["min_s"] * 1e3,
        "torch_max_ms": torch_timing["max_s"] * 1e3, "torch_patches_per_s": torch_rate,
    }
    row["ratio_vs_torch"] = row["patches_per_s"] / torch_rate
    row["ratio_min"] = row["min_patches_per_s"] / (batch / torch_timing["min_s"])
    row["ratio_max"] = row["max_patches_per_s"] / (batch / torch_timing["max_s"])
    phase_rows = []
    for phase in PHASES:
        values = [p[phase] for p in timing["phases"]]
        phase_rows.append({"phase": phase, "median_s": statistics.median(values), "min_s": min(values),
                           "max_s": max(values)})
    others = [s - sum(p.values()) for s, p in zip(epoch_s, timing["phases"])]
    phase_rows.insert(0, {"phase": "steps and the rest", "median_s": statistics.median(others), "min_s": min(others),
                          "max_s": max(others)})
    phase_rows.append({"phase": "whole epoch", "median_s": median_s, "min_s": min(epoch_s), "max_s": max(epoch_s)})
    print()
    print(markdown_table([row], ["network", "batch", "subjects", "steps_per_epoch", "validation_patches", "epoch_s",
                                 "min_s", "max_s", "patches_per_s", "torch_step_ms", "torch_patches_per_s",
                                 "ratio_vs_torch", "ratio_min", "ratio_max"]))
    print()
    print(markdown_table(phase_rows, ["phase", "median_s", "min_s", "max_s"]))
    payload = {"rows": [row], "phases": phase_rows, "epoch_s": epoch_s, "first_epoch_s": timing["first_epoch_s"],
               "torch": torch_timing, "quick": args.quick, "baseline": baseline}
    print(f"\nwrote {write_results('train_epoch', payload, args.out)}")
    return row


if __name__ == "__main__":
    main()
