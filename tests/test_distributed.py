"""Data parallelism equals single-device training; real multi-process runs join over Gloo.

Each configuration runs in its own process, with its CPU device count forced
by XLA_FLAGS, so the rest of the suite keeps its single device.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow  # see setup.cfg's markers

WORKER = Path(__file__).with_name("distributed_worker.py")


def _env(devices: int) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    return env


def _run(devices, *args):
    result = subprocess.run([sys.executable, str(WORKER), *map(str, args)], env=_env(devices),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


def _run_processes(devices, *args):
    """The worker as two processes joined by jax.distributed (Gloo collectives on CPU)."""
    address = f"127.0.0.1:{_free_port()}"
    workers = [subprocess.Popen([sys.executable, str(WORKER), *map(str, args), address, "2", str(index)],
                                env=_env(devices), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for index in (0, 1)]
    for worker in workers:
        _, stderr = worker.communicate(timeout=600)
        assert worker.returncode == 0, stderr[-3000:]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _assert_same_weights(a_path, b_path, tolerance=1e-5):
    a, b = np.load(a_path), np.load(b_path)
    keys = [k for k in a.files if k.startswith("[")]
    assert keys and sorted(keys) == sorted(k for k in b.files if k.startswith("["))
    worst = max(float(np.abs(a[k] - b[k]).max()) for k in keys)
    assert worst <= tolerance, worst
    return a, b


@pytest.fixture(scope="module")
def single_device(tmp_path_factory):
    root = tmp_path_factory.mktemp("one")
    _run(1, "fit", root / "w.npz", root / "wd")
    return root / "w.npz"


def test_four_devices_train_like_one(single_device, tmp_path):
    _run(4, "fit", tmp_path / "w.npz", tmp_path / "wd")
    one, four = _assert_same_weights(single_device, tmp_path / "w.npz")
    assert int(one["devices"]) == 1 and int(four["devices"]) == 4
    assert abs(float(one["val_loss"]) - float(four["val_loss"])) < 1e-5


def _weights(workdir):
    from jaxcascade.storage import weights

    return [weights.load(workdir, stage) for stage in (1, 2)]


@pytest.fixture(scope="module")
def two_subjects(tmp_path_factory):
    """Two tiny phantom subjects, written once for the module (tests that damage them work on a copy)."""
    from jaxcascade import phantom

    data = tmp_path_factory.mktemp("two_subjects") / "data"
    phantom.write_cohort(data, 2, seed=5, size="tiny")
    return data


@pytest.fixture(scope="module")
def two_hosts(tmp_path_factory, two_subjects):
    """Two processes x two devices train the cascade (one epoch a stage) on two tiny subjects."""
    root = tmp_path_factory.mktemp("hosts")
    shutil.copytree(two_subjects, root / "data")
    _run_processes(2, "cascade", root / "data", root / "hosts", root / "summary.json", 0)
    return root


def test_two_hosts_each_load_half_the_subjects_and_train_like_one_process(two_hosts, tmp_path):
    """The whole cascade, two processes x two devices, each loading only its data shard's subjects,
    equals one single-device process that loads all subjects into the same two data shards: the same CNN1,
    the same hard negatives mined with it, and CNN2 trained on them.

    CNN1's 10 Adadelta steps let float32 summation-order differences grow to 5.7e-7 in its weights (Intel
    Xeon), hence 5e-5; its BatchNorm variances differ by up to 7.8e-5 of 1.0 (AMD EPYC), hence 2e-4 of their size. CNN2's
    are compared by their inputs: its 10 steps on hard negatives near the decision boundary amplify the same
    last-bit differences into visibly different weights on some cohorts whichever convolution runs (measured
    on cohort seeds 5, 6 and 7: 1.6e-2, 1.3 and 0.22 with jaxcascade's CPU kernel; 2e-6, 0.17 and 2e-6 with
    XLA's GEMM formulations), so bitwise-level agreement of CNN2's weights would test luck.
    """
    from jaxcascade import phantom

    _run(1, "cascade", two_hosts / "data", tmp_path / "one", tmp_path / "one.json", 2)
    loaded = {}
    for index in (0, 1):
        summary = json.loads((two_hosts / f"summary.json.{index}").read_text())
        assert (summary["process"], summary["processes"], summary["devices"]) == (index, 2, 4)
        loaded[index] = summary["subjects"]
    assert loaded == {0: [phantom.subject_name(0)], 1: [phantom.subject_name(1)]}
    assert json.loads((tmp_path / "one.json.0").read_text())["subjects"] == [phantom.subject_name(i) for i in (0, 1)]

    records = [_history(two_hosts / "hosts"), _history(tmp_path / "one")]
    # orbax committed each stage's end-of-epoch checkpoint once, from both processes' shards.
    steps = [r["steps"] for r in records[0]]
    for stage, step in zip((1, 2), steps):
        assert (two_hosts / "hosts" / "checkpoints" / f"stage{stage}" / str(step)).is_dir()
    stage1_hosts, stage1_one = (jax_leaves(weights[0]) for weights in (_weights(two_hosts / "hosts"),
                                                                       _weights(tmp_path / "one")))
    assert stage1_hosts.keys() == stage1_one.keys()
    # Weights to 5e-5; BatchNorm's running statistics relative to their size, since a variance summed in
    # another order loses more (E[x^2] - E[x]^2): 7.8e-5 on a variance of 1.0 on an AMD EPYC.
    for key in stage1_one:
        scale = 1.0 if "batch_stats" not in key else max(1.0, float(np.abs(stage1_one[key]).max()))
        worst = float(np.abs(stage1_hosts[key] - stage1_one[key]).max())
        assert worst <= (5e-5 if "batch_stats" not in key else 2e-4) * scale, (key, worst)
    # Each host mined its own subject's hard negatives with its CNN1: exactly what the one process mined.
    one = np.load(tmp_path / "one.json.0.stage2.npz")
    for index in (0, 1):
        host = np.load(two_hosts / f"summary.json.{index}.stage2.npz")
        assert np.array_equal(host["arr_0"], one[f"arr_{index}"])  # centres
        assert np.array_equal(host["arr_1"], one[f"arr_{2 + index}"])  # labels
    assert [r["stage"] for r in records[0]] == [1, 2] == [r["stage"] for r in records[1]]
    for hosts, one in zip(*records):
        assert hosts["steps"] == one["steps"]
        if hosts["stage"] == 1:
            assert abs(hosts["train_loss"] - one["train_loss"]) < 1e-5
            assert abs(hosts["val_loss"] - one["val_loss"]) < 1e-5


def test_sigterm_to_one_host_stops_both_at_the_same_step_and_resumes_exactly(two_hosts, tmp_path):
    """A scheduler's SIGTERM reaching process 1 only: both processes agree to stop at the same step
    (the checkpoint is collective), exit 143, and rerunning finishes with the uninterrupted weights."""
    env = _env(2)
    env["JAX_COORDINATOR_ADDRESS"] = f"127.0.0.1:{_free_port()}"
    env["JAX_NUM_PROCESSES"] = "2"
    command = [sys.executable, "-m", "jaxcascade.cli", "train", "--data", str(two_hosts / "data"),
               "--workdir", str(tmp_path / "wd"), "--config.train.max_epochs=1"]

    def start():
        return [subprocess.Popen(command, env={**env, "JAX_PROCESS_ID": str(index)}, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True) for index in (0, 1)]

    workers = start()
    for line in workers[0].stdout:  # the epoch loop is about to start (compiling its first step takes seconds)
        if line.startswith("stage 1:") and "steps per epoch" in line:
            break
    time.sleep(1.0)
    workers[1].send_signal(signal.SIGTERM)
    for worker in workers:
        _, stderr = worker.communicate(timeout=300)
        assert worker.returncode == 128 + signal.SIGTERM, stderr[-3000:]
        assert stderr.strip().splitlines()[-1] == ("jaxcascade: SIGTERM: stopped in stage 1, epoch 1 after step "
                                                   "8/10; checkpoint saved, rerun the same command to resume")
    env["JAX_COORDINATOR_ADDRESS"] = f"127.0.0.1:{_free_port()}"
    workers = start()
    outputs = [worker.communicate(timeout=600) for worker in workers]
    for worker, (_, stderr) in zip(workers, outputs):
        assert worker.returncode == 0, stderr[-3000:]
    assert "stage 1: resuming after step 8 of epoch 1" in outputs[0][0]
    for resumed, uninterrupted in zip(_weights(tmp_path / "wd"), _weights(two_hosts / "hosts")):
        flat_resumed, flat_uninterrupted = jax_leaves(resumed), jax_leaves(uninterrupted)
        assert all(np.array_equal(flat_resumed[k], flat_uninterrupted[k]) for k in flat_uninterrupted)
    strip = lambda records: [{k: v for k, v in r.items() if k != "epoch_seconds"} for r in records]  # noqa: E731
    assert strip(_history(tmp_path / "wd")) == strip(_history(two_hosts / "hosts"))


def _history(workdir) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def jax_leaves(tree) -> dict:
    import jax

    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def test_batch_not_divisible_by_devices_is_a_clear_error(tmp_path):
    code = ("from jaxcascade.runtime import distributed\n"
            "from jaxcascade.errors import UserError\n"
            "try:\n    distributed.check_divisible(128, 'train.batch_size')\n"
            "except UserError as e:\n    print(e)\n")
    result = subprocess.run([sys.executable, "-c", code], env=_env(3), capture_output=True, text=True)
    assert result.stdout.strip() == ("--config.train.batch_size=128 is not divisible by the 3 devices; "
                                     "use a multiple of 3 (e.g. 126 or 129)")


def test_a_bad_file_on_one_host_stops_every_host_with_one_line(tmp_path, two_subjects):
    """Only process 1 reads sub-02, whose FLAIR is not NIfTI: both processes exit 2 at once instead of
    process 0 waiting for ever at the next collective, and no workdir is created."""
    from jaxcascade import phantom

    shutil.copytree(two_subjects, tmp_path / "data")
    bad = tmp_path / "data" / phantom.subject_name(1) / "FLAIR.nii.gz"
    bad.write_bytes(b"not an image")
    env = _env(1)
    env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{_free_port()}", JAX_NUM_PROCESSES="2")
    workers = [subprocess.Popen([sys.executable, "-m", "jaxcascade.cli", "train", "--data", str(tmp_path / "data"),
                                 "--workdir", str(tmp_path / "wd")], env={**env, "JAX_PROCESS_ID": str(index)},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for index in (0, 1)]
    errors = []
    for worker in workers:
        _, stderr = worker.communicate(timeout=300)
        assert worker.returncode == 2, stderr[-3000:]
        errors.append([line for line in stderr.splitlines() if line.startswith("jaxcascade: error: ")])
    assert errors[0] == ["jaxcascade: error: process 1 failed while loading its training subjects; "
                         "its message says why"]
    assert len(errors[1]) == 1 and str(bad) in errors[1][0]
    assert not (tmp_path / "wd").exists()


OVERLAPPING_COLLECTIVES = """
import jax, jax.numpy as jnp, numpy as np
from jaxcascade.runtime import distributed
assert jax.local_device_count() == 4
mesh = distributed.local_mesh()
weights = distributed.put_local_replicated(jnp.ones((64, 64), jnp.float32))
# the result gathered onto every device: an all-gather in each execution
step = jax.jit(lambda x, w: jnp.tanh(x @ w) @ w, out_shardings=distributed.replicated(mesh))
x = distributed.put_local_batch(np.ones((4096, 64), np.float32))
for _ in range(5):  # 64 executions dispatched back to back, as a training epoch's steps are
    outputs = [distributed.in_order(step(x, weights)) for _ in range(64)]
    jax.block_until_ready(outputs)
print("ok")
"""


def test_executions_over_forced_devices_wait_for_each_other_and_do_not_deadlock():
    """XLA:CPU (jaxlib 0.10.2) deadlocks when executions with a collective over forced host devices overlap:
    without `distributed.in_order` this script ended in XLA's abort in 3 of 3 runs. The training steps,
    validation and map_batches (inference, mining hard negatives) wait through it. XLA's timeouts are cut
    to 20 s so a deadlock fails the test instead of hanging it."""
    env = _env(4)
    env["XLA_FLAGS"] += (" --xla_cpu_collective_call_warn_stuck_timeout_seconds=10"
                         " --xla_cpu_collective_call_terminate_timeout_seconds=20")
    result = subprocess.run([sys.executable, "-c", OVERLAPPING_COLLECTIVES], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]
