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



def test_without_memory_files_a_private_copy_of_the_checked_library_is_loaded(marked_libraries, tmp_path):
    """Where memfd is missing or may not be executed (vm.memfd_noexec), the checked bytes are copied."""
    env, library = _cache(tmp_path, marked_libraries["A"])
    swap = tmp_path / "swap.so"
    shutil.copy(marked_libraries["B"], swap)
    result = _run("import os; del os.memfd_create\n" + SWAPPING_PROBE, SWAP=str(swap), **env)
    assert result.returncode == 0 and not swap.exists(), result.stderr
    assert (tmp_path / "ran").read_text() == "A", result.stderr

def _reoriented(source: Path, target: Path, axes: tuple[str, str, str]) -> Path:
    """source's image stored in another voxel order (same anatomy, same world coordinates)."""
    import nibabel as nib

    image = nib.load(source)
    transform = nib.orientations.ornt_transform(nib.orientations.io_orientation(image.affine),
                                                nib.orientations.axcodes2ornt(axes))
    nib.save(image.as_reoriented(transform), target)
    return target


@pytest.mark.parametrize("axes", [("L", "P", "S"), ("A", "S", "L")])
def test_segment_returns_on_the_flairs_own_grid_the_arrays_it_wrote(trained_model, cohort, tmp_path, axes):
    """An LPS (or axis-permuted) subject: the returned mask was in the model's RAS order, so scoring it
    against the subject's own truth array read DSC 0.04 while the written file was right."""
    import nibabel as nib
    import numpy as np

    import jaxcascade

    files = {name: _reoriented(cohort / "held_out" / f"{name}.nii.gz", tmp_path / f"{name}.nii.gz", axes)
             for name in ("T1", "FLAIR", "lesion")}
    assert nib.aff2axcodes(nib.load(files["FLAIR"]).affine) == axes
    result = jaxcascade.segment(trained_model, {"T1": files["T1"], "FLAIR": files["FLAIR"]},
                                out=tmp_path / "seg.nii.gz", probabilities=tmp_path / "maps")
    written = np.asarray(nib.load(tmp_path / "seg.nii.gz").dataobj)
    assert result.mask.dtype == bool and result.mask.shape == written.shape == nib.load(files["FLAIR"]).shape
    assert written.any() and np.array_equal(result.mask, written)
    for name in ("stage1", "stage2"):
        on_file = np.asarray(nib.load(tmp_path / "maps" / f"{name}.nii.gz").dataobj)
        assert np.array_equal(getattr(result, f"{name}_probability"), on_file), name
    truth = np.asarray(nib.load(files["lesion"]).dataobj) > 0
    from_arrays = jaxcascade.evaluate(result.mask, truth)["dsc"]
    assert from_arrays == jaxcascade.evaluate(tmp_path / "seg.nii.gz", files["lesion"])["dsc"] and from_arrays > 0.3


COMMANDS = ("phantom", "train", "segment", "models", "evaluate", "import-keras", "build-kernels", "demo")


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_says_what_it_does_in_its_help(command, capsys):
    from jaxcascade import cli

    description = cli.build_parser()._subparsers._group_actions[0].choices[command].description
    assert description and description.endswith(".") and description.count(". ") <= 1, description
    with pytest.raises(SystemExit) as exit_:
        cli.main([command, "--help"])
    assert exit_.value.code == 0 and " ".join(description.split()[:6]) in " ".join(capsys.readouterr().out.split())


def test_an_input_given_as_name_space_path_gets_the_form_to_use(tmp_path, capsys):
    from jaxcascade import cli

    argv = ["segment", "--input", "T1", "t1.nii.gz", "--input", "FLAIR=flair.nii.gz",
            "--out", str(tmp_path / "s.nii.gz")]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [
        "jaxcascade: error: --input T1 t1.nii.gz: use NAME=PATH, e.g. --input T1=t1.nii.gz"]


def _exhausted():
    import jax

    return jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1.20GiB.")


@pytest.mark.parametrize("fault", [MemoryError, _exhausted])
def test_a_subject_that_runs_out_of_memory_ends_in_one_line_and_exit_3(trained_model, cohort, tmp_path, capsys,
                                                                      monkeypatch, fault):
    """Single-subject segment: a MemoryError or XLA's RESOURCE_EXHAUSTED was a traceback (a study already
    stopped with one line)."""
    from jaxcascade import cli
    from jaxcascade.segmentation import nifti_files

    def exhausted(*args, **kwargs):
        raise fault()

    monkeypatch.setattr(nifti_files, "segment_images", exhausted)
    out = tmp_path / "seg.nii.gz"
    argv = ["segment", "--model", str(trained_model), "--input", f"T1={cohort / 'held_out' / 'T1.nii.gz'}",
            "--input", f"FLAIR={cohort / 'held_out' / 'FLAIR.nii.gz'}", "--out", str(out)]
    assert cli.main(argv) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("jaxcascade: error: out of memory") and "more memory" in err[0], err
    assert not out.exists()


def test_any_other_error_still_shows_its_traceback(trained_model, cohort, tmp_path, monkeypatch):
    from jaxcascade import cli
    from jaxcascade.segmentation import nifti_files

    def bug(*args, **kwargs):
        raise RuntimeError("INTERNAL: a bug")

    monkeypatch.setattr(nifti_files, "segment_images", bug)
    with pytest.raises(RuntimeError, match="a bug"):
        cli.main(["segment", "--model", str(trained_model), "--input", f"T1={cohort / 'held_out' / 'T1.nii.gz'}",
                  "--input", f"FLAIR={cohort / 'held_out' / 'FLAIR.nii.gz'}", "--out", str(tmp_path / "s.nii.gz")])


def test_a_study_of_sessions_counts_sessions_and_participants(trained_model, tmp_path, capsys):
    """Two participants scanned twice were '4 subjects'."""
    from jaxcascade import cli, phantom
    from jaxcascade.segmentation import study

    phantom.write_cohort(tmp_path / "bids", 2, seed=3, size="tiny", layout="bids", sessions=2)
    assert cli.main(["segment", "--model", str(trained_model), "--data", str(tmp_path / "bids"),
                     "--out-dir", str(tmp_path / "out")]) == 0
    assert f"{tmp_path / 'out'}: 4 sessions of 2 participants: 4 segmented, 0 already done, 0 failed" \
        in capsys.readouterr().out
    assert study.subject_count([{"participant_id": "sub-01", "session_id": "ses-1"}]) == "1 session of 1 participant"
    assert study.subject_count([{"participant_id": "a", "session_id": ""}] * 3) == "3 subjects"


def test_a_resampled_t1_is_named_by_its_own_path(trained_model, cohort, tmp_path, capsys):
    """The warning about a T1 resampled onto the FLAIR's grid began with the FLAIR's path."""
    import nibabel as nib
    import numpy as np

    from jaxcascade import cli

    t1 = nib.load(cohort / "held_out" / "T1.nii.gz")
    shifted = t1.affine.copy()
    shifted[:3, 3] += shifted[:3, :3] @ np.array([2.0, 0.0, 0.0])  # another grid of the same space
    nib.save(nib.Nifti1Image(np.asarray(t1.dataobj)[2:], shifted, header=t1.header), tmp_path / "T1.nii.gz")
    flair = cohort / "held_out" / "FLAIR.nii.gz"
    assert cli.main(["segment", "--model", str(trained_model), "--input", f"T1={tmp_path / 'T1.nii.gz'}",
                     "--input", f"FLAIR={flair}", "--out", str(tmp_path / "s.nii.gz")]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(f"jaxcascade: warning: {tmp_path / 'T1.nii.gz'}: T1 resampled from "), err
    assert str(flair) not in err[0].split(": T1 resampled")[0]


# --- An address-space limit too small for JAX: one line before anything starts, not a C++ abort ---------------


@pytest.mark.parametrize("limit_mb", [600, 800])
def test_a_small_address_space_limit_is_one_line_not_an_abort(trained_model, cohort, tmp_path, limit_mb):
    # Before this check, under `ulimit -v` 600-800 MB, whichever allocation failed first decided: XLA's threads
    # could not be created and C++ aborted the process (exit 134, "terminate called ... std::system_error"),
    # or tensorstore failed to load or decompress the weights with a traceback (exit 1).
    import shlex

    from conftest import held_out_inputs

    out = tmp_path / "seg.nii.gz"
    command = [sys.executable, "-m", "jaxcascade.cli", "segment", "--model", str(trained_model),
               *held_out_inputs(cohort), "--out", str(out)]
    # The limit is set by the shell, not in a forked copy of this (multithreaded) test process.
    result = subprocess.run(["bash", "-c", f"ulimit -v {limit_mb * 1024} && exec {shlex.join(command)}"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 3, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "address-space limit (ulimit -v)" in lines[0] and f"{limit_mb} MiB" in lines[0]
    assert not out.exists()


def test_the_address_space_rule():
    import resource

    from jaxcascade.runtime import MIN_ADDRESS_SPACE_BYTES, address_space_problem

    assert address_space_problem((resource.RLIM_INFINITY, resource.RLIM_INFINITY)) is None
    assert address_space_problem((MIN_ADDRESS_SPACE_BYTES, resource.RLIM_INFINITY)) is None
    assert "512 MiB" in address_space_problem((512 << 20, resource.RLIM_INFINITY))
