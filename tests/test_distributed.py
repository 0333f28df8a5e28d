"""Data parallelism equals single-device training; real multi-process runs join over Gloo.

Each configuration runs in its own process, with its CPU device count forced
by XLA_FLAGS, so the rest of the suite keeps its single device.
"""

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

WORKER = Path(__file__).with_name("distributed_worker.py")


def _env(devices: int) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    return env


def _run(out, workdir, devices, *extra):
    result = subprocess.run([sys.executable, str(WORKER), str(out), str(workdir), *extra], env=_env(devices),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


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
    _run(root / "w.npz", root / "wd", 1)
    return root / "w.npz"


def test_four_devices_train_like_one(single_device, tmp_path):
    _run(tmp_path / "w.npz", tmp_path / "wd", 4)
    one, four = _assert_same_weights(single_device, tmp_path / "w.npz")
    assert int(one["devices"]) == 1 and int(four["devices"]) == 4
    assert abs(float(one["val_loss"]) - float(four["val_loss"])) < 1e-5


def test_two_processes_with_two_devices_each_train_like_one(single_device, tmp_path):
    address = f"127.0.0.1:{_free_port()}"
    workers = [
        subprocess.Popen([sys.executable, str(WORKER), str(tmp_path / "w.npz"), str(tmp_path / "wd"),
                          address, "2", str(index)], env=_env(2), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
        for index in (0, 1)
    ]
    for worker in workers:
        _, stderr = worker.communicate(timeout=600)
        assert worker.returncode == 0, stderr[-3000:]
    _, two_by_two = _assert_same_weights(single_device, tmp_path / "w.npz")
    assert int(two_by_two["devices"]) == 4 and int(two_by_two["processes"]) == 2
    # orbax committed the end-of-epoch checkpoint (global step 3) once, from both processes' shards.
    assert (tmp_path / "wd" / "checkpoints" / "stage1" / "3").is_dir()


def test_batch_not_divisible_by_devices_is_a_clear_error(tmp_path):
    code = ("from jaxcascade import distributed\n"
            "from jaxcascade.errors import UserError\n"
            "try:\n    distributed.check_divisible(128, 'train.batch_size')\n"
            "except UserError as e:\n    print(e)\n")
    result = subprocess.run([sys.executable, "-c", code], env=_env(3), capture_output=True, text=True)
    assert result.stdout.strip() == ("--config.train.batch_size=128 is not divisible by the 3 devices; "
                                     "use a multiple of 3 (e.g. 126 or 129)")
