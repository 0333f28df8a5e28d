"""The C++ kernels' variants per vector width (kernel_target.py, kernels/simd.h) and what a user is told about them.

test_cpu_kernel.py tests the variant this CPU loads through XLA (and, run with JAXCASCADE_CPU_KERNEL_ISA=avx2,
the AVX2 one: .ci/run does on AVX-512 CPUs). The variants no XLA here can load are tested by a C++ driver
against naive loops: the SSE one natively, the ARM one cross-compiled and run under qemu-aarch64 where the
Debian packages g++-aarch64-linux-gnu and qemu-user are installed (skipped elsewhere, e.g. in CI).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from jaxcascade.ops import kernel_target

ROOT = Path(__file__).resolve().parents[1]
DRIVER = ROOT / "tests" / "kernel_driver.cc"


def _compile_driver(compiler: str, flags, output: Path) -> None:
    # -O1: the driver checks results, not speed, and compiles in a few seconds.
    command = [compiler, "-O1", *flags, "-std=c++17", "-w", f"-I{jax.ffi.include_dir()}", str(DRIVER), "-o",
               str(output)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


def test_the_variant_follows_the_cpu_and_the_switches():
    assert kernel_target.native_isa("x86_64", {"avx2", "fma", "avx512f"}) == "avx512"
    assert kernel_target.native_isa("x86_64", {"avx2", "fma"}) == "avx2"
    assert kernel_target.native_isa("x86_64", {"avx2"}) == "generic"  # AVX2 without FMA: no 8-float FMA code
    assert kernel_target.native_isa("aarch64", {"asimd"}) == "neon"
    choice = kernel_target.choose("", "", "x86_64", {"avx2", "fma"})
    assert choice == kernel_target.KernelChoice("avx2", True, choice.reason) and "AVX2 CPU" in choice.reason
    assert "disabled by JAXCASCADE_CPU_KERNEL=0" in kernel_target.choose("0", "", "x86_64", {"avx2", "fma"}).reason
    refused = kernel_target.choose("", "avx512", "x86_64", {"avx2", "fma"})
    assert not refused.use and "cannot run it (it is AVX2)" in refused.reason
    arm = kernel_target.choose("", "", "aarch64", set())
    assert (arm.isa, arm.use) == ("neon", False) and "JAXCASCADE_CPU_KERNEL=1 forces them" in arm.reason
    # AVX2 code on an AVX-512 CPU must not be AVX-512 code: the flags turn it off after -march=native.
    assert kernel_target.compile_flags("avx2", "x86_64")[-3:] == ("-mno-avx512f", "-mavx2", "-mfma")


@pytest.mark.skipif(platform.machine() != "x86_64" or not shutil.which("c++"), reason="an x86-64 C++ compiler")
def test_the_sse_variant_matches_naive_loops(tmp_path):
    # 4-float vectors in groups: 16-64 output channels are 4-16 vectors, the most channel groups of any variant.
    _compile_driver("c++", kernel_target.compile_flags("generic", "x86_64"), tmp_path / "driver")
    result = subprocess.run([tmp_path / "driver"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok generic", result.stdout


@pytest.mark.skipif(not shutil.which("aarch64-linux-gnu-g++"),
                    reason="no aarch64 cross compiler (Debian: apt-get install g++-aarch64-linux-gnu qemu-user)")
def test_the_arm_variant_compiles_and_matches_naive_loops_under_qemu(tmp_path):
    _compile_driver("aarch64-linux-gnu-g++", ["-static"], tmp_path / "driver")
    if not shutil.which("qemu-aarch64"):
        pytest.skip("the ARM build compiled; qemu-aarch64 is not installed to run it")
    result = subprocess.run(["qemu-aarch64", tmp_path / "driver"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok neon", result.stdout


def _cli(*arguments, **env) -> subprocess.CompletedProcess:
    environ = {key: value for key, value in os.environ.items() if not key.startswith("JAXCASCADE_CPU_KERNEL")}
    return subprocess.run([sys.executable, "-m", "jaxcascade.cli", *arguments], capture_output=True, text=True,
                          timeout=300, env={**environ, **env}, cwd=ROOT)


def test_doctor_says_what_this_cpu_gets_and_why():
    native = kernel_target.native_isa(platform.machine(), kernel_target.cpu_flags())
    report = json.loads(_cli("doctor", "--json").stdout)
    assert report["variant"] == native and report["cpu_class"] == kernel_target.cpu_class(native)
    assert report["used"] == (native in kernel_target.DEFAULT_ON and bool(shutil.which("c++")))
    assert report["jax"] == jax.__version__ and report["devices"]
    text = _cli("doctor", JAXCASCADE_CPU_KERNEL="0")
    assert text.returncode == 0 and f"class {kernel_target.cpu_class(native)}" in text.stdout
    assert "used: no: disabled by JAXCASCADE_CPU_KERNEL=0" in text.stdout and "JAX " in text.stdout


def test_a_study_without_the_kernels_says_why_in_one_line(tmp_path):
    # The note comes before the work: here the study then stops on its missing model.
    result = _cli("segment", "--model", str(tmp_path / "no-model"), "--data", str(tmp_path), "--out-dir",
                  str(tmp_path / "out"), JAXCASCADE_CPU_KERNEL="0")
    notes = [line for line in result.stderr.splitlines() if line.startswith("jaxcascade: note:")]
    assert result.returncode == 2 and len(notes) == 1, result.stderr
    assert "disabled by JAXCASCADE_CPU_KERNEL=0" in notes[0] and "`jaxcascade doctor`" in notes[0]


def test_the_note_starts_no_jax_backend():
    # train's multi-host runs call jax.distributed.initialize after the note, which must come before any backend.
    code = ("from jaxcascade.ops.kernel_report import without_kernels_note\nfrom jax._src import xla_bridge\n"
            "print(without_kernels_note() is not None, xla_bridge.backends_are_initialized())")
    environ = {key: value for key, value in os.environ.items() if not key.startswith("JAXCASCADE_CPU_KERNEL")}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT,
                            env={**environ, "JAXCASCADE_CPU_KERNEL": "0", "JAX_PLATFORMS": "cpu"})
    assert result.stdout.split() == ["True", "False"], result.stderr


def test_doctor_with_a_wrong_argument_imports_nothing_heavy():
    wrapper = ("import json, sys\nfrom jaxcascade import cli\nstatus = cli.main(['doctor', '--bogus'])\n"
               "print(json.dumps({'status': status, 'jax': 'jax' in sys.modules}))\n")
    result = subprocess.run([sys.executable, "-c", wrapper], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert json.loads(result.stdout.strip().splitlines()[-1]) == {"status": 2, "jax": False}, result.stderr
