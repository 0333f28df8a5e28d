"""jaxcascade's own CPU kernels (kernels/*.cc), built on first use and called through XLA's FFI.

Every GEMM formulation of a 3D convolution (convs.py) writes and reads a tap
buffer 27x its input, and that memory traffic kept XLA:CPU at 25-55 % of its
matmul rate and 2-4x behind PyTorch's oneDNN. The C++ convolution keeps a
block of outputs in registers and never builds the buffer (170-310 GFLOP/s,
121-201 % of a matmul of equal FLOPs on a 2-core AVX-512 Xeon:
`python -m benchmarks.convs`), with both gradients. For the dense form it
also runs the head (dense1 + ReLU + output layer, the hidden layer kept in
registers) and the dilated 2^3 max-pools in one pass each.

It is compiled once per machine with the system's C++ compiler (`c++`, or
$CXX) for this CPU's instruction set, against the FFI headers that ship inside
jaxlib, into the per-user cache beside JAX's compiled functions; nothing is
downloaded. Where it cannot be built (no compiler), jaxcascade says so once
and uses the GEMM formulations. It is used by default on x86-64 CPUs with
AVX-512 (see `wanted`); JAXCASCADE_CPU_KERNEL=1 forces it elsewhere,
JAXCASCADE_CPU_KERNEL=0 turns it off (the
results then are bit-identical to jaxcascade before it; with it, they differ
by float32 rounding, ~1e-6). Results do not depend on the thread count.
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
import jax.numpy as jnp
import numpy as np

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
OUT_CHANNELS = (16, 32, 48, 64)  # output blocks the kernel keeps in registers
CHUNK_FLOATS, MAX_CHUNKS = 2**17, 256  # the kernel gradient's chunks of cotangent: 512 KB each


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


def supports(x_shape, kernel_shape, dtype) -> bool:
    """Whether the kernel handles this convolution (float32, 3^3-style k^3 taps, 16-64 output channels)."""
    kernel_size, _, _, _, out_channels = kernel_shape
    return (jnp.dtype(dtype) == jnp.float32 and kernel_size > 1 and out_channels in OUT_CHANNELS
            and len(x_shape) == 5)


def _ffi_conv3d(x: jax.Array, kernel: jax.Array, dilation: int, padding: int = 0) -> jax.Array:
    """The kernel's convolution of x with `padding` zeros around each spatial axis (read, never stored)."""
    batch, depth, height, width, _ = x.shape
    span = (kernel.shape[0] - 1) * dilation - 2 * padding
    out = jax.ShapeDtypeStruct((batch, depth - span, height - span, width - span, kernel.shape[-1]), jnp.float32)
    # Under vmap, one call per example (the kernels take fixed ranks).
    call = jax.ffi.ffi_call(TARGET, out, vmap_method="sequential")
    return call(x, kernel, dilation=np.int64(dilation), padding=np.int64(padding))


def _ffi_kernel_gradient(x: jax.Array, cotangent: jax.Array, kernel_shape, dilation: int) -> jax.Array:
    kernel_size, _, _, in_channels, out_channels = kernel_shape
    positions = int(np.prod(cotangent.shape[:4]))
    # Partial sums per chunk of output positions, added in chunk order: fixed by the shapes alone (so results
    # do not depend on the thread count), each chunk's cotangent small enough to stay in cache while every
    # (tap, channel) row of the gradient passes over it.
    chunks = int(np.clip(-(-positions * out_channels // CHUNK_FLOATS), 1, MAX_CHUNKS))
    outputs = (jax.ShapeDtypeStruct(kernel_shape, jnp.float32),
               jax.ShapeDtypeStruct((chunks, kernel_size**3 * in_channels * out_channels), jnp.float32))
    call = jax.ffi.ffi_call(GRADIENT_TARGET, outputs, vmap_method="sequential")
    gradient, _ = call(x, cotangent, dilation=np.int64(dilation))
    return gradient


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv3d(x: jax.Array, kernel: jax.Array, dilation: int, gradient) -> jax.Array:
    """VALID cross-correlation of (N, D, H, W, C) with (k, k, k, C, O) by the C++ kernel.

    Its gradient is the kernel's too: the kernel's by a register-blocked
    reduction, the input's as the convolution of the padded cotangent with the
    flipped kernel. `gradient`, a pure-JAX formulation (x, kernel, dilation) ->
    y, serves the input's where the kernel has no registers for its channels.
    """
    return _ffi_conv3d(x, kernel, dilation)


def _conv3d_forward(x, kernel, dilation, gradient):
    return _ffi_conv3d(x, kernel, dilation), (x, kernel)


def _conv3d_backward(dilation, gradient, residuals, cotangent):
    x, kernel = residuals
    kernel_gradient = _ffi_kernel_gradient(x, cotangent, kernel.shape, dilation)
    span = (kernel.shape[0] - 1) * dilation
    if kernel.shape[3] in OUT_CHANNELS:
        # The transposed convolution: the cotangent read with `span` zeros around it (the kernel skips
        # taps that fall on them), the kernel flipped, its channels swapped.
        input_gradient = _ffi_conv3d(cotangent, jnp.flip(kernel, (0, 1, 2)).swapaxes(3, 4), dilation, padding=span)
    else:  # e.g. a 2-channel input layer, whose input (data) nothing differentiates: XLA drops this
        _, vjp = jax.vjp(lambda x: gradient(x, kernel, dilation), x)
        (input_gradient,) = vjp(cotangent)
    return input_gradient, kernel_gradient


conv3d.defvjp(_conv3d_forward, _conv3d_backward)


def head_supported(in_channels: int, hidden: int, outputs: int) -> bool:
    """Whether dense_head runs this head (hidden units in blocks of 64, up to 4 outputs)."""
    return hidden % 64 == 0 and 0 < outputs <= 4 and in_channels > 0


def dense_head(x: jax.Array, w1: jax.Array, b1: jax.Array, w2: jax.Array, b2: jax.Array) -> jax.Array:
    """relu(x @ w1 + b1) @ w2 + b2 over the last axis of x, the hidden layer kept in registers (inference only).

    The dense form's head: XLA would write the hidden layer of every voxel to memory and read it back.
    """
    *batch, channels = x.shape
    flat = x.reshape(-1, channels)
    out = jax.ShapeDtypeStruct((flat.shape[0], w2.shape[1]), jnp.float32)
    logits = jax.ffi.ffi_call(HEAD_TARGET, out, vmap_method="sequential")(flat, w1, b1, jnp.asarray(w2).T, b2)
    return logits.reshape(*batch, w2.shape[1])


def max_pool(x: jax.Array, dilation: int) -> jax.Array:
    """The 2^3 max over taps `dilation` apart at every position of (N, D, H, W, C), C a multiple of 16, in one pass."""
    batch, depth, height, width, channels = x.shape
    out = jax.ShapeDtypeStruct((batch, depth - dilation, height - dilation, width - dilation, channels), x.dtype)
    return jax.ffi.ffi_call(POOL_TARGET, out, vmap_method="sequential")(x, dilation=np.int64(dilation))
