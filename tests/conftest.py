"""Shared fixtures: one tiny phantom cohort and one trained model for the whole session.

XLA compilation dominates test time on CPU, so the trained model is built once
(through the real CLI) and every test that needs a model reuses it.
"""

from __future__ import annotations

import os

# jaxcascade's C++ kernels are on by default only on CPUs with AVX-512 or AVX2 (kernel_target.choose); the tests
# run them on whatever CPU they land on (a test that needs them off says so), subprocesses included.
# JAXCASCADE_CPU_KERNEL_ISA=avx2 runs them as their AVX2 variant on an AVX-512 CPU (.ci/run does).
os.environ.setdefault("JAXCASCADE_CPU_KERNEL", "1")

import csv  # noqa: E402

import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

from jaxcascade import cli, phantom  # noqa: E402
from jaxcascade.configs import default  # noqa: E402

# Property-based tests explore new cases on every developer's run; CI replays a fixed sequence of them, so
# that a run of CI is reproducible (the same cases, the same verdict) and writes no example database.
settings.register_profile("ci", derandomize=True, database=None)
if os.environ.get("CI", "").lower() in ("1", "true"):
    settings.load_profile("ci")

TRAIN_SUBJECTS = 4
QUICK_OVERRIDES = ["--config.train.max_epochs=4", "--config.train.patience=4"]


@pytest.fixture(scope="session")
def cohort(tmp_path_factory):
    """tiny phantom: sub-01..sub-04 for training (train/), sub-05 held out (held_out/)."""
    root = tmp_path_factory.mktemp("cohort")
    phantom.write_cohort(root / "all", TRAIN_SUBJECTS + 1, seed=7, size="tiny")
    (root / "train").mkdir()
    for i in range(TRAIN_SUBJECTS):
        name = phantom.subject_name(i)
        (root / "all" / name).rename(root / "train" / name)
    (root / "all" / phantom.subject_name(TRAIN_SUBJECTS)).rename(root / "held_out")
    return root


@pytest.fixture(scope="session")
def trained_model(cohort, tmp_path_factory):
    """A model directory trained on the tiny cohort through `jaxcascade train`."""
    workdir = tmp_path_factory.mktemp("model") / "wd"
    status = cli.main(["train", "--data", str(cohort / "train"), "--workdir", str(workdir),
                       "--config", "demo", *QUICK_OVERRIDES])
    assert status == 0
    return workdir


def model_config(network: str = "valverde2017_valid", patch_size: int = 11):
    """The default config's model block for a registered network (and patch size)."""
    config = default.get_config().model
    config.network, config.patch_size = network, patch_size
    return config


def train_setup(channels: int = 2, augmentation: str = "none", config=None):
    """(graphdef, variables, optimiser, jitted train step) of an untrained default network."""
    from jaxcascade.networks import models
    from jaxcascade.training import optimizer, train_steps

    config = config or default.get_config()
    graphdef, variables = models.split_model(models.build_network(config.model, channels, 0))
    tx = optimizer.make_optimizer(optimizer.OptimizerSettings.from_config(config.train))
    return graphdef, variables, tx, train_steps.make_train_step(graphdef, augmentation)


def read_csv(path) -> list[dict]:
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


def held_out_inputs(cohort) -> list[str]:
    return ["--input", f"T1={cohort / 'held_out' / 'T1.nii.gz'}",
            "--input", f"FLAIR={cohort / 'held_out' / 'FLAIR.nii.gz'}"]


# CI must run every test: under CI=true a skipped test fails the run, so a
# missing extra (h5py, nilearn) or shared file cannot hide behind a green run.
_skipped: list[str] = []


def pytest_runtest_logreport(report):
    if report.skipped:
        _skipped.append(report.nodeid)


def pytest_sessionfinish(session, exitstatus):
    if os.environ.get("CI", "").lower() in ("1", "true") and _skipped and exitstatus == 0:
        session.exitstatus = 1
        print(f"\nCI runs every test, but {len(_skipped)} were skipped: {', '.join(_skipped[:5])}")
