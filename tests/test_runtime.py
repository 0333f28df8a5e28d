"""Process-wide settings made at import (runtime.py), each checked in a fresh process.

The malloc settings must stop XLA:CPU's large temporaries from being
page-faulted afresh on every call; the control (opt-out) shows the faults the
test would otherwise see. The compilation cache must be reused by a second
process.
"""

import json
import os
import subprocess
import sys

import pytest

from jaxcascade.runtime import COLLECTIVE_FLAGS

# A jitted convolution whose GEMM formulation needs a ~50 MB temporary per call
# (the dense kernel's conv2 on one 34^3 block); minor page faults of each of the
# last 12 of 36 calls. With the settings the heap settles: while other processes
# compete for the cores, XLA's threads free and allocate in varying order, so the
# one heap can still grow (fragment) on some of the first calls (seen up to ~20),
# and then stops; without them every call faults, forever.
FAULTS_PER_CALL = """
import json, resource, statistics
import jaxcascade
import jax, jax.numpy as jnp, numpy as np
from jaxcascade.ops import convs
x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 34, 34, 34, 32)).astype(np.float32))
k = jnp.asarray(np.random.default_rng(1).normal(size=(3, 3, 3, 32, 64)).astype(np.float32))
f = jax.jit(lambda x, k: convs.conv3d(x, k, implementation="slices").sum())
f(x, k).block_until_ready()
faults = []
for _ in range(36):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    f(x, k).block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
settled = faults[24:]
print(json.dumps({"malloc": jaxcascade.runtime.STATUS["malloc"], "median_faults": statistics.median(settled)}))
"""


def _run(code, **env):
    environment = {**os.environ, "JAXCASCADE_COMPILATION_CACHE": "0", **env}
    environment.pop("GLIBC_TUNABLES", None)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environment, check=False)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc")
def test_large_temporaries_do_not_page_fault_on_every_call():
    fixed = json.loads(_run(FAULTS_PER_CALL).stdout)
    control = json.loads(_run(FAULTS_PER_CALL, JAXCASCADE_MALLOC="0").stdout)
    assert fixed["malloc"] == "applied" and control["malloc"] == "disabled"
    # A 50 MB buffer faulted in afresh is ~12,000 pages; reused, none (the
    # median ignores the odd call during which the heap still grows).
    assert control["median_faults"] > 5_000, control
    assert fixed["median_faults"] < 100, fixed


def test_settings_made_after_the_backend_started_warn():
    """A library user gets a Python warning of jaxcascade's category (filterable, and an error under -W error)."""
    result = _run("import jax; jax.devices(); import jaxcascade; print(jaxcascade.runtime.STATUS['malloc'])")
    assert result.returncode == 0 and result.stdout.strip() == "too late"
    assert "JaxcascadeWarning: the JAX backend started before jaxcascade was imported" in result.stderr
    assert "GLIBC_TUNABLES" in result.stderr
    strict = _run("import warnings, jax; jax.devices(); warnings.simplefilter('error'); import jaxcascade")
    assert strict.returncode != 0 and "JaxcascadeWarning" in strict.stderr


def test_a_second_process_reads_its_compilations_from_the_cache(tmp_path):
    code = """
import json
import jaxcascade
import jax, jax.numpy as jnp
from jax import monitoring
hits = []
monitoring.register_event_listener(lambda event, **kw: hits.append(event) if event.endswith("cache_hits") else None)
from jaxcascade.ops import convs
f = jax.jit(lambda x, k: convs.conv3d(x, k, implementation="im2col", dilation=2).sum())
f(jnp.ones((2, 16, 16, 16, 8)), jnp.ones((3, 3, 3, 8, 16))).block_until_ready()
print(json.dumps({"cache": jaxcascade.runtime.STATUS["compilation_cache"], "hits": len(hits)}))
"""
    folder = tmp_path / "xla"
    every_compilation = {"JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAXCASCADE_COMPILATION_CACHE": str(folder)}
    first = _run(code, **every_compilation)
    second = _run(code, **every_compilation)
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout) == {"cache": str(folder), "hits": 0}
    assert any(folder.iterdir())
    assert json.loads(second.stdout)["hits"] >= 1, second.stderr
    disabled = _run(code, JAXCASCADE_COMPILATION_CACHE="0")
    assert json.loads(disabled.stdout) == {"cache": "disabled", "hits": 0}


def test_forced_host_devices_get_the_collective_timeouts_a_loaded_machine_needs():
    # XLA:CPU would end a run whose forced devices gather a collective after 40 s (seen on 2 busy cores).
    code = ("import os, jax, jaxcascade\nimport jax.numpy as jnp\n"
            "total = jax.pmap(lambda x: jax.lax.psum(x, 'i'), axis_name='i')(jnp.ones(2))\n"
            "print(os.environ.get('XLA_FLAGS', '')); print(float(total[0]))")
    forced = "--xla_force_host_platform_device_count=2"
    for given, flags in ((forced, f"{forced} {' '.join(COLLECTIVE_FLAGS)}"),
                         (f"{forced} --xla_cpu_collective_call_terminate_timeout_seconds=50",
                          f"{forced} --xla_cpu_collective_call_terminate_timeout_seconds=50")):
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                                env={**os.environ, "XLA_FLAGS": given})
        assert result.returncode == 0, result.stderr[-2000:]
        assert result.stdout.splitlines() == [flags, "2.0"]  # XLA accepts them; a user's own value stays
    alone = subprocess.run([sys.executable, "-c", "import os, jaxcascade; print(os.environ.get('XLA_FLAGS'))"],
                           capture_output=True, text=True, timeout=120,
                           env={k: v for k, v in os.environ.items() if k != "XLA_FLAGS"})
    assert alone.stdout.strip() == "None"  # one device: XLA's own settings, untouched
