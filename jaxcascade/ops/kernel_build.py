"""Building, caching and loading jaxcascade's C++ CPU kernels (kernels/*.cc) for XLA's FFI.

The kernels are compiled once per machine with the system's C++ compiler
(`c++`, or $CXX) for this CPU's instruction set, against the FFI headers that
ship inside jaxlib, into the per-user cache beside JAX's compiled functions;
nothing is downloaded. Where they cannot be built (no compiler), jaxcascade
says so once and uses the GEMM formulations. cpu_kernel.py calls them.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import jax

from jaxcascade import runtime

KERNEL_ENV = "JAXCASCADE_CPU_KERNEL"
KERNELS = Path(__file__).with_name("kernels")
SOURCES = (KERNELS / "conv3d.cc", KERNELS / "dense_head.cc", KERNELS / "max_pool.cc")  # + parallel.h
TARGET = "jaxcascade_conv3d"
GRADIENT_TARGET = "jaxcascade_conv3d_kernel_gradient"
HEAD_TARGET = "jaxcascade_dense_head"
POOL_TARGET = "jaxcascade_max_pool"
# XLA custom-call target -> the handler symbol the library exports (XLA_FFI_DEFINE_HANDLER_SYMBOL).
HANDLERS = {TARGET: "JaxcascadeConv3d", GRADIENT_TARGET: "JaxcascadeConv3dKernelGradient",
            HEAD_TARGET: "JaxcascadeDenseHead", POOL_TARGET: "JaxcascadeMaxPool"}
TARGETS = tuple(HANDLERS)


def kernel_dir() -> Path:
    """Where this machine's build lives: beside the compilation cache, one folder per CPU and source."""
    source_hash = hashlib.sha256(b"".join(path.read_bytes() for path in sorted(KERNELS.iterdir())
                                          if path.suffix in (".cc", ".h"))).hexdigest()[:12]
    return runtime.cache_root() / "kernels" / runtime.machine_tag() / source_hash


def build(folder: Path) -> Path:
    """Compile the kernel into folder (atomically: concurrent builders each rename a complete file)."""
    library = folder / "libjaxcascade_conv3d.so"
    if library.exists():
        return library
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        raise RuntimeError("no C++ compiler (c++ or $CXX)")
    folder.mkdir(parents=True, exist_ok=True)
    partial = folder / f".{library.name}.{os.getpid()}"
    command = [compiler, "-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w",
               f"-I{jax.ffi.include_dir()}", *map(str, SOURCES), "-o", str(partial)]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        partial.unlink(missing_ok=True)
        raise RuntimeError(f"{Path(compiler).name} took over 10 minutes") from None
    if result.returncode != 0:
        partial.unlink(missing_ok=True)
        last = (result.stderr.strip().splitlines() or ["failed"])[-1]
        raise RuntimeError(f"{Path(compiler).name} failed: {last}")
    os.replace(partial, library)
    return library


def wanted(setting: str, machine: str, cpu_flags: set[str]) -> bool:
    """Whether to use the kernels: JAXCASCADE_CPU_KERNEL=0/1 decides; by default x86-64 CPUs with AVX-512.

    Its register blocking assumes AVX-512's 32 vector registers of 16 floats; elsewhere (AVX2, ARM) it
    would spill, and it has not been measured there, so the GEMM formulations stay unless asked.
    """
    setting = setting.strip().lower()
    if setting in ("0", "off", "false", "no"):
        return False
    if setting in ("1", "on", "true", "yes"):
        return True
    return machine in ("x86_64", "AMD64") and "avx512f" in cpu_flags


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


@functools.lru_cache(maxsize=None)
def available() -> bool:
    """Whether the kernel is built and registered with XLA (builds it the first time on a machine)."""
    if not wanted(os.environ.get(KERNEL_ENV, ""), platform.machine(), _cpu_flags()):
        return False
    try:
        library = ctypes.cdll.LoadLibrary(str(build(kernel_dir())))
        for target, symbol in HANDLERS.items():
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")
    except (OSError, RuntimeError, AttributeError) as error:
        print(f"jaxcascade: warning: the CPU convolution kernel is unavailable ({error}); using XLA's GEMM "
              f"formulations, about 2x slower ({KERNEL_ENV}=0 silences this)", file=sys.stderr)
        return False
    return True
