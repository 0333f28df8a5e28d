"""What a user trusts without looking: the kernel cache loads only what no one else could have changed,
`jaxcascade.segment` returns what it wrote, and the command line explains itself in one line.

The kernel-cache tests load small stand-in libraries whose constructor writes a marker file: whether the
marker appears says whether a library's code ran, which is what a refusal must prevent.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from jaxcascade.ops import kernel_build

PROBE = ("import warnings; warnings.simplefilter('always');"
         "from jaxcascade.ops import kernel_build as k; print('available', k.available())")
# The probe with both ways of calling dlopen from ctypes made to rename another library over the cache's just
# before they load: what a process that could write the cache would race to do after the checks.
SWAPPING_PROBE = """
import ctypes, os, warnings
warnings.simplefilter('always')
from jaxcascade.ops import kernel_build as k
real = ctypes.CDLL
def swap_then_load(name, *args, **kwargs):
    library = k.kernel_dir() / k.LIBRARY
    if os.path.exists(os.environ['SWAP']):
        os.replace(os.environ['SWAP'], library)
    return real(name, *args, **kwargs)
ctypes.CDLL = swap_then_load
ctypes.cdll.LoadLibrary = swap_then_load
print('available', k.available())
"""
CONSTRUCTOR = """
#include <cstdio>
#include <cstdlib>
__attribute__((constructor)) static void ran() {
    if (const char* path = std::getenv("JAXCASCADE_TEST_MARKER")) {
        std::FILE* file = std::fopen(path, "a");
        std::fputs("%s", file);
        std::fclose(file);
    }
}
"""


def _env(**extra) -> dict:
    env = {key: value for key, value in os.environ.items() if key not in ("CXX", "XDG_CACHE_HOME")}
    env.update({"JAXCASCADE_CPU_KERNEL": "1", "JAXCASCADE_COMPILATION_CACHE": "0"}, **extra)
    return env


def _run(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=_env(**env))


@pytest.fixture(scope="module")
def marked_libraries(tmp_path_factory) -> dict[str, Path]:
    """Two shared libraries whose constructors append 'A' or 'B' to $JAXCASCADE_TEST_MARKER when loaded."""
    folder = tmp_path_factory.mktemp("marked")
    libraries = {}
    for name in "AB":
        source = folder / f"{name}.cc"
        source.write_text(CONSTRUCTOR % name)
        libraries[name] = folder / f"lib{name}.so"
        subprocess.run([shutil.which("c++") or "g++", "-shared", "-fPIC", str(source), "-o", str(libraries[name])],
                       check=True, timeout=120)
    return libraries


def _compiler(tmp_path: Path, library: Path) -> Path:
    """A stand-in C++ compiler that 'builds' by copying library."""
    script = tmp_path / "fake-c++"
    script.write_text('#!/bin/sh\nif [ "$1" = "--version" ]; then echo "fake c++ 1.0"; exit 0; fi\n'
                      f'while [ "$1" != "-o" ]; do shift; done; cp {library} "$2"\n')
    script.chmod(0o755)
    return script


def _cache(tmp_path: Path, library: Path) -> tuple[dict, Path]:
    """A kernel cache holding library as its build (the first load runs its constructor once)."""
    marker = tmp_path / "ran"
    env = {"JAXCASCADE_KERNEL_DIR": str(tmp_path / "kernels"), "CXX": str(_compiler(tmp_path, library)),
           "JAXCASCADE_TEST_MARKER": str(marker)}
    first = _run(PROBE, **env)
    # The stand-in exports no handler: loaded, then refused for its missing symbols, with one warning.
    assert first.returncode == 0 and "available False" in first.stdout, first.stderr
    assert marker.read_text() == "A", first.stderr
    marker.unlink()
    return env, next((tmp_path / "kernels").rglob(kernel_build.LIBRARY))


@pytest.mark.parametrize("folder,change,reason", [
    ("root", "mode 777", "is writable by other users"),
    ("cpu", "mode 777", "is writable by other users"),
    ("cpu", "mode 775", "is writable by other users"),
    ("cpu", "owner 12345", "belongs to user 12345"),
    ("build", "owner 12345", "belongs to user 12345"),
])
def test_a_folder_others_could_write_on_the_way_to_the_library_is_refused_before_it_runs(
        marked_libraries, tmp_path, folder, change, reason):
    """Whoever may write a folder between the cache's root and the library may swap the library: the
    checks stopped at the library's own folder, and the library's constructor ran."""
    env, library = _cache(tmp_path, marked_libraries["A"])
    path = {"root": tmp_path / "kernels", "cpu": library.parent.parent, "build": library.parent}[folder]
    if change.startswith("mode"):
        path.chmod(int(change.split()[1], 8))
    else:
        os.chown(path, 12345, 12345)  # the tests run as root, here and in CI
    result = _run(PROBE, **env)
    assert result.returncode == 0 and "available False" in result.stdout, result.stderr
    warning = [line for line in result.stderr.splitlines() if "JaxcascadeWarning" in line]
    assert len(warning) == 1 and f"{path} {reason}" in warning[0] and "GEMM" in warning[0], result.stderr
    assert not (tmp_path / "ran").exists(), "the refused library's code ran"


def test_a_sticky_shared_root_is_accepted(marked_libraries, tmp_path):
    """A root like /tmp (1777): others may add entries but not rename ours, and each entry below is checked."""
    env, library = _cache(tmp_path, marked_libraries["A"])
    (tmp_path / "kernels").chmod(0o1777)
    result = _run(PROBE, **env)
    assert "writable by other users" not in result.stderr and (tmp_path / "ran").read_text() == "A", result.stderr


def test_a_symbolic_link_below_the_root_is_refused(marked_libraries, tmp_path):
    env, library = _cache(tmp_path, marked_libraries["A"])
    build = library.parent
    moved = build.with_name("elsewhere")
    build.rename(moved)
    build.symlink_to(moved)
    result = _run(PROBE, **env)
    assert "available False" in result.stdout and f"{build} is a symbolic link" in result.stderr, result.stderr
    assert not (tmp_path / "ran").exists()


def test_what_is_loaded_is_the_library_that_was_checked(marked_libraries, tmp_path):
    """A library renamed over the checked one between the check and dlopen is not what runs."""
    env, library = _cache(tmp_path, marked_libraries["A"])
    swap = tmp_path / "swap.so"
    shutil.copy(marked_libraries["B"], swap)
    result = _run(SWAPPING_PROBE, SWAP=str(swap), **env)
    assert result.returncode == 0, result.stderr
    assert not swap.exists() and library.read_bytes() == marked_libraries["B"].read_bytes()  # the swap happened
    assert (tmp_path / "ran").read_text() == "A", result.stderr
