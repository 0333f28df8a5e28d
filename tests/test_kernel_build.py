"""The C++ kernels' cache as clusters meet it: truncated and corrupt libraries, concurrent builds, failing
compilers, read-only caches, libraries others could have written, relative cache paths, build-kernels.

One real build is made for the module; the tests then compile with a stand-in compiler that copies it
(and logs each call), so that what is tested is the cache's logic, in real processes, in seconds.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from jaxcascade import runtime
from jaxcascade.ops import kernel_build

PROBE = ("import warnings; warnings.simplefilter('always');"
         "from jaxcascade.ops import kernel_build as k; print('available', k.available(), k.kernel_dir())")


def _env(**extra) -> dict:
    env = {key: value for key, value in os.environ.items() if key not in ("CXX", "XDG_CACHE_HOME")}
    env.update({"JAXCASCADE_CPU_KERNEL": "1", "JAXCASCADE_COMPILATION_CACHE": "0"}, **extra)
    return env


def _run(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                          env=_env(**env))


@pytest.fixture(scope="module")
def real_library(fresh_kernel_build, tmp_path_factory) -> Path:
    """A library built by the real compiler (the session's one real build, conftest's fresh_kernel_build),
    put into a JAXCASCADE_KERNEL_DIR through the build path, which honours that folder."""
    build, cache_home = fresh_kernel_build
    assert build.returncode == 0 and build.stdout.startswith("True"), build.stderr
    built = next(cache_home.rglob(kernel_build.LIBRARY))
    root, copier = tmp_path_factory.mktemp("kernels"), tmp_path_factory.mktemp("kernels_compiler")
    result = _run(PROBE, JAXCASCADE_KERNEL_DIR=str(root), CXX=str(_compiler(copier, built)))
    assert result.returncode == 0 and "available True" in result.stdout, result.stderr
    library = next(root.rglob(kernel_build.LIBRARY))
    # A JAXCASCADE_KERNEL_DIR is shared on purpose: readable by all, writable by its owner only.
    assert library.parent.parent.parent == root and stat.S_IMODE(library.parent.stat().st_mode) == 0o755
    return library


def _compiler(tmp_path: Path, library: Path, *, fail: bool = False, pause: float = 0.0) -> Path:
    """A stand-in C++ compiler: logs each compile, then copies the real library (or fails like gcc)."""
    script = tmp_path / "fake-c++"
    log = tmp_path / "compiles.log"
    body = ('echo "x.cc:12:5: warning: unused"; echo "x.cc:40:1: error: expected ; before }" >&2; '
            'echo "collect2: error: ld returned 1 exit status" >&2; exit 1') if fail else \
        f'sleep {pause}; while [ "$1" != "-o" ]; do shift; done; cp {library} "$2"'
    script.write_text(f'#!/bin/sh\nif [ "$1" = "--version" ]; then echo "fake c++ 1.0"; exit 0; fi\n'
                      f'echo compile >> {log}\n{body}\n')
    script.chmod(0o755)
    return script


def _compiles(tmp_path: Path) -> int:
    log = tmp_path / "compiles.log"
    return len(log.read_text().splitlines()) if log.exists() else 0


@pytest.mark.parametrize("damage", ["truncated", "corrupt"])
def test_a_damaged_library_is_rebuilt_never_loaded(real_library, tmp_path, damage):
    """A build killed mid-write or a full disk left a broken .so: loading it was a bus error (exit 135)."""
    cxx = _compiler(tmp_path, real_library)
    root = tmp_path / "kernels"
    assert "available True" in _run(PROBE, JAXCASCADE_KERNEL_DIR=str(root), CXX=str(cxx)).stdout
    library = next(root.rglob(kernel_build.LIBRARY))
    data = library.read_bytes()
    if damage == "truncated":
        library.write_bytes(data[: len(data) // 2])
    else:
        library.write_bytes(data[:4096] + bytes(b ^ 0xFF for b in data[4096:8192]) + data[8192:])
    stale = library.parent / f".{kernel_build.LIBRARY}.killed.tmp"  # what a build killed mid-write leaves
    stale.write_bytes(data[:100])
    result = _run(PROBE, JAXCASCADE_KERNEL_DIR=str(root), CXX=str(cxx))
    assert result.returncode == 0 and "available True" in result.stdout, (result.returncode, result.stderr)
    assert _compiles(tmp_path) == 2 and library.read_bytes() == data and not stale.exists()
    assert (library.parent / kernel_build.CHECKSUM).read_text().strip() == kernel_build._sha256(library)


def test_concurrent_processes_build_once(real_library, tmp_path):
    cxx = _compiler(tmp_path, real_library, pause=2.0)
    env = _env(JAXCASCADE_KERNEL_DIR=str(tmp_path / "kernels"), CXX=str(cxx))
    processes = [subprocess.Popen([sys.executable, "-c", PROBE], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, env=env) for _ in range(2)]
    outputs = [process.communicate(timeout=300) for process in processes]
    assert all("available True" in out for out, _ in outputs), outputs
    assert _compiles(tmp_path) == 1
    assert not [p for p in (tmp_path / "kernels").rglob("*") if p.name.endswith(".tmp")]


def test_a_failed_build_warns_once_with_the_compilers_error_and_is_not_retried(real_library, tmp_path):
    cxx = _compiler(tmp_path, real_library, fail=True)
    env = {"JAXCASCADE_KERNEL_DIR": str(tmp_path / "kernels"), "CXX": str(cxx)}
    first = _run(PROBE, **env)
    assert first.returncode == 0 and "available False" in first.stdout
    warning = [line for line in first.stderr.splitlines() if "JaxcascadeWarning" in line]
    assert len(warning) == 1 and "error: expected ; before }" in warning[0] and "build.log" in warning[0]
    log = next((tmp_path / "kernels").rglob(kernel_build.LOG))
    assert "collect2: error: ld returned 1 exit status" in log.read_text()
    second = _run(PROBE, **env)
    assert "available False" in second.stdout and "jaxcascade build-kernels" in second.stderr
    assert _compiles(tmp_path) == 1  # the marker stopped the retry
    retry = subprocess.run([sys.executable, "-m", "jaxcascade.cli", "build-kernels"], capture_output=True,
                           text=True, timeout=300, env=_env(**env))
    assert retry.returncode == 2 and _compiles(tmp_path) == 2
    assert retry.stderr.count("\n") == 1 and "error: expected ; before }" in retry.stderr


def test_build_kernels_says_where_and_with_what(real_library, tmp_path):
    cxx = _compiler(tmp_path, real_library)
    result = subprocess.run([sys.executable, "-m", "jaxcascade.cli", "build-kernels"], capture_output=True,
                            text=True, timeout=300, env=_env(JAXCASCADE_KERNEL_DIR=str(tmp_path / "k"),
                                                             CXX=str(cxx)))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"built {tmp_path / 'k'}") and "with " + str(cxx) + " (fake c++ 1.0)" in result.stdout
    assert "-march=native" in result.stdout


def test_a_library_others_could_have_written_is_refused(real_library, tmp_path):
    cxx = _compiler(tmp_path, real_library)
    root = tmp_path / "kernels"
    assert "available True" in _run(PROBE, JAXCASCADE_KERNEL_DIR=str(root), CXX=str(cxx)).stdout
    library = next(root.rglob(kernel_build.LIBRARY))
    library.chmod(0o775)
    result = _run(PROBE, JAXCASCADE_KERNEL_DIR=str(root), CXX=str(cxx))
    assert "available False" in result.stdout and "is writable by other users" in result.stderr
    library.chmod(0o700)
    os.chown(library, 12345, 12345)  # we run as root here and in CI
    result = _run(PROBE, JAXCASCADE_KERNEL_DIR=str(root), CXX=str(cxx))
    assert "available False" in result.stdout and "belongs to user 12345" in result.stderr


def test_a_read_only_cache_falls_back_with_one_warning(real_library, tmp_path):
    root = tmp_path / "kernels"
    root.mkdir()
    cxx = _compiler(tmp_path, real_library)
    script = (f"mount --bind {root} {root} && mount -o remount,bind,ro {root} && "
              f"JAXCASCADE_KERNEL_DIR={root} CXX={cxx} {sys.executable} -c \"{PROBE}\"")
    result = subprocess.run(["unshare", "-r", "-m", "sh", "-c", script], capture_output=True, text=True,
                            timeout=300, env=_env())
    assert result.returncode == 0 and "available False" in result.stdout, result.stderr
    warning = [line for line in result.stderr.splitlines() if "JaxcascadeWarning" in line]
    assert len(warning) == 1 and "cannot build in" in warning[0] and "Read-only file system" in warning[0]
    assert _compiles(tmp_path) == 0 and list(root.iterdir()) == []


def test_relative_cache_paths_are_ignored(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", "relative-cache")
    assert runtime.cache_root() == Path.home() / ".cache" / "jaxcascade"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "abs"))
    monkeypatch.setenv(kernel_build.KERNEL_DIR_ENV, "relative-kernels")
    assert kernel_build.kernels_root() == tmp_path / "abs" / "jaxcascade" / "kernels"
    monkeypatch.setenv(kernel_build.KERNEL_DIR_ENV, str(tmp_path / "shared"))
    assert kernel_build.kernels_root() == tmp_path / "shared"


def test_the_key_changes_with_the_compiler(real_library, tmp_path, monkeypatch):
    """Another compiler (or version, or flags) builds into its own folder instead of reusing a library."""
    monkeypatch.setenv(kernel_build.KERNEL_DIR_ENV, str(tmp_path))
    real = kernel_build.kernel_dir()
    monkeypatch.setenv("CXX", str(_compiler(tmp_path, real_library)))
    fake = kernel_build.kernel_dir()
    assert real != fake and real.parent == fake.parent
    shutil.rmtree(tmp_path / "kernels", ignore_errors=True)


def test_a_node_without_a_compiler_loads_the_shared_build_for_its_cpu(real_library, tmp_path):
    """`jaxcascade build-kernels` on a login node fills a shared JAXCASCADE_KERNEL_DIR; compute nodes
    without a compiler load the build for their CPU, from a read-only mount too."""
    shared = tmp_path / "shared"
    cxx = _compiler(tmp_path, real_library)
    built = subprocess.run([sys.executable, "-m", "jaxcascade.cli", "build-kernels"], capture_output=True,
                           text=True, timeout=300, env=_env(JAXCASCADE_KERNEL_DIR=str(shared), CXX=str(cxx)))
    assert built.returncode == 0, built.stderr
    assert stat.S_IMODE(next(shared.rglob(kernel_build.LIBRARY)).parent.stat().st_mode) == 0o755
    script = (f"mount --bind {shared} {shared} && mount -o remount,bind,ro {shared} && "
              f"JAXCASCADE_KERNEL_DIR={shared} CXX=/no/compiler {sys.executable} -c \"{PROBE}\"")
    result = subprocess.run(["unshare", "-r", "-m", "sh", "-c", script], capture_output=True, text=True,
                            timeout=300, env=_env())
    assert result.returncode == 0 and "available True" in result.stdout, result.stderr
    assert "JaxcascadeWarning" not in result.stderr
    nothing = _run(PROBE.split(", k.kernel_dir()")[0] + ")", JAXCASCADE_KERNEL_DIR=str(tmp_path / "empty"),
                   CXX="/no/compiler")
    assert "available False" in nothing.stdout and "no build for this CPU in" in nothing.stderr


def test_the_warning_quotes_what_went_wrong_not_collect2s_summary():
    full_disk = ("/usr/bin/ld: final link failed: No space left on device\n"
                 "collect2: error: ld returned 1 exit status\n")
    assert kernel_build.first_error(full_disk) == "/usr/bin/ld: final link failed: No space left on device"
    assert kernel_build.first_error("a.cc:3: warning: x\na.cc:9:2: error: expected ';'\ncollect2: error: ld") \
        == "a.cc:9:2: error: expected ';'"
    assert kernel_build.first_error("") == "failed without output"


def test_build_kernels_without_a_compiler_is_one_line(real_library, tmp_path):
    result = subprocess.run([sys.executable, "-m", "jaxcascade.cli", "build-kernels"], capture_output=True, text=True,
                            timeout=300, env=_env(JAXCASCADE_KERNEL_DIR=str(real_library.parents[2]),
                                                  CXX="/no/compiler"))
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "no C++ compiler" in result.stderr
