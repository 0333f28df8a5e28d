"""Training survives SIGTERM and SIGKILL, resumes bitwise, and runs are reproducible (CPU)."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import nibabel as nib
import numpy as np
import pytest

from jaxcascade.segmentation import cascade
from jaxcascade.storage import weights
from jaxcascade import cli, config as config_lib
from conftest import QUICK_OVERRIDES, held_out_inputs


def _train_command(cohort, workdir):
    return [sys.executable, "-m", "jaxcascade.cli", "train", "--data", str(cohort / "train"),
            "--workdir", str(workdir), "--config", "demo", *QUICK_OVERRIDES]


def _history(workdir):
    path = workdir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _run_until(command, condition, timeout=300):
    """Start command, wait until condition() holds, return the still-running process."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"finished before the condition held: {process.stderr.read()[-2000:]}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError("timed out")
        time.sleep(0.05)
    return process


def _same_weights(a_dir, b_dir, config):
    for stage in (1, 2):
        template = cascade.Stage.load(a_dir, stage, config).variables
        a = weights.load(a_dir, stage, template)
        b = weights.load(b_dir, stage, template)
        assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))), stage


def test_sigterm_and_sigkill_then_resume_gives_the_uninterrupted_weights(trained_model, cohort, tmp_path):
    workdir = tmp_path / "wd"
    command = _train_command(cohort, workdir)

    # SIGTERM while stage 1 is in its second epoch: a clean stop with a checkpoint.
    process = _run_until(command, lambda: len(_history(workdir)) >= 1)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, stderr
    lines = stderr.strip().splitlines()
    assert lines[-1].startswith("jaxcascade: SIGTERM: stopped in stage 1") and "Traceback" not in stderr
    assert not weights.stage_done(workdir, 1)

    # SIGKILL in stage 2, with no chance to save anything; a leftover temporary checkpoint too.
    process = _run_until(command, lambda: any(r["stage"] == 2 for r in _history(workdir)))
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    leftover = workdir / "checkpoints" / "stage2" / "99.orbax-checkpoint-tmp-1234"
    leftover.mkdir()

    finished = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert "stage 1: already trained" in finished.stdout and "stage 2: resuming" in finished.stdout
    assert not leftover.exists()

    config = config_lib.apply_overrides(config_lib.load_config("demo"), QUICK_OVERRIDES)
    _same_weights(trained_model, workdir, config)
    strip = lambda records: [{k: v for k, v in r.items() if k != "epoch_seconds"} for r in records]  # noqa: E731
    assert strip(_history(workdir)) == strip(_history(trained_model))


def test_same_seed_same_segmentation_bitwise(trained_model, cohort, tmp_path):
    outputs = []
    for i in range(2):
        out = tmp_path / f"seg{i}.nii.gz"
        assert cli.main(["segment", "--model", str(trained_model), *held_out_inputs(cohort), "--out", str(out),
                         "--probabilities", str(tmp_path / f"p{i}")]) == 0
        outputs.append([np.asarray(nib.load(p).dataobj) for p in
                        (out, tmp_path / f"p{i}" / "stage1.nii.gz", tmp_path / f"p{i}" / "stage2.nii.gz")])
    for first, second in zip(*outputs):
        assert np.array_equal(first, second)


def test_non_finite_training_stops_with_epoch_and_step(cohort, tmp_path, capsys):
    status = cli.main(["train", "--data", str(cohort / "train"), "--workdir", str(tmp_path / "wd"),
                       "--config", "demo", "--config.train.max_epochs=1", "--config.train.learning_rate=1e30"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1
    assert "non-finite loss or gradient at epoch 1, step" in err[0]
    assert not weights.stage_done(tmp_path / "wd", 1)


@pytest.mark.skipif(os.name != "posix", reason="signals")
def test_signal_handlers_are_restored_after_training():
    from jaxcascade.training.train_loop import StopOnSignals

    before = signal.getsignal(signal.SIGTERM)
    with StopOnSignals() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.signal == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) == before
