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
from pathlib import Path  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

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


def _start(tmp_path_factory, name: str, command: list[str], **popen) -> tuple[subprocess.Popen, Path]:
    """command started as a process whose output goes to files in a fresh folder: (process, folder). Not pipes:
    nobody reads them before the process ends, and a full one would stall it."""
    logs = tmp_path_factory.mktemp(f"{name}_output")
    with open(logs / "stdout", "w") as stdout, open(logs / "stderr", "w") as stderr:
        return subprocess.Popen(command, stdout=stdout, stderr=stderr, text=True, **popen), logs


def wait_for(process: subprocess.Popen, logs: Path, timeout: float) -> subprocess.CompletedProcess:
    """Wait for a process _start started; what subprocess.run would have returned."""
    process.wait(timeout=timeout)
    return subprocess.CompletedProcess(process.args, process.returncode, (logs / "stdout").read_text(),
                                       (logs / "stderr").read_text())


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:  # the session ended (or failed) before a test waited for it
        process.kill()
        process.wait()


@pytest.fixture(scope="session")
def kernel_build_in_background(tmp_path_factory):
    """The C++ kernels being built by the real compiler, in a fresh process, into an empty user cache
    (XDG_CACHE_HOME): (process, its output folder, the cache folder)."""
    home = tmp_path_factory.mktemp("fresh_kernel_cache")
    code = "from jaxcascade.ops import cpu_kernel\nprint(cpu_kernel.available(), cpu_kernel.kernel_dir())\n"
    process, logs = _start(tmp_path_factory, "fresh_kernel_build", [sys.executable, "-c", code],
                           cwd=Path(__file__).resolve().parents[1], env=os.environ | {"XDG_CACHE_HOME": str(home)})
    yield process, logs, home
    _stop(process)


@pytest.fixture(scope="session")
def fresh_kernel_build(kernel_build_in_background) -> tuple[subprocess.CompletedProcess, Path]:
    """The process above, finished: (its result, the cache folder). test_cpu_kernel checks what the build left
    there; test_kernel_build's stand-in compiler copies the library, so the suite runs the real compiler once."""
    process, logs, home = kernel_build_in_background
    return wait_for(process, logs, timeout=300), home


@pytest.fixture(scope="session")
def demo_in_background(tmp_path_factory):
    """`jaxcascade demo`, from an empty folder, being run: (process, its output folder, the folder it runs in).
    tests/test_docs.py's finished_demo waits for it and checks its exit status."""
    folder = tmp_path_factory.mktemp("finished_demo")
    process, logs = _start(tmp_path_factory, "finished_demo", [sys.executable, "-m", "jaxcascade.cli", "demo", "-q"],
                           cwd=folder)
    yield process, logs, folder
    _stop(process)


@pytest.fixture(scope="session", autouse=True)
def _start_subprocess_fixtures_early(request):
    """The demo's training (a minute or more) and the kernels' real build (g++, single-threaded) are processes
    that pytest would otherwise sit waiting for. Started at the session's first test when a selected test needs
    them, they run beside the in-process tests, on the core those leave idle; the fixtures that use them wait."""
    items = request.session.items
    if any(item.get_closest_marker("needs_finished_demo") for item in items):
        request.getfixturevalue("demo_in_background")
    if any("fresh_kernel_build" in item.fixturenames for item in items):
        request.getfixturevalue("kernel_build_in_background")


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
