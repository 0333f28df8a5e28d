"""jaxcascade's own CPU kernels (kernels/*.cc), built on first use and called through XLA's FFI.

Every GEMM formulation of a 3D convolution (convs.py) writes and reads a tap
buffer 27x its input, and that memory traffic kept XLA:CPU at 25-55 % of its
matmul rate and 2-4x behind PyTorch's oneDNN. The C++ convolution keeps a
block of outputs in registers and never builds the buffer (170-310 GFLOP/s,
121-201 % of a matmul of equal FLOPs on a 2-core AVX-512 Xeon:
`python -m benchmarks.convs`), with both gradients. For the dense form it
also runs the head (dense1 + ReLU + output layer, the hidden layer kept in
registers) and the dilated 2^3 max-pools in one pass each.

It is built and loaded by kernel_build.py; it is used by default on x86-64 CPUs
with AVX-512 (see `kernel_build.wanted`); JAXCASCADE_CPU_KERNEL=1 forces it
elsewhere, JAXCASCADE_CPU_KERNEL=0 turns it off (the results then are
bit-identical to jaxcascade before it; with it, they differ by float32
rounding, ~1e-6). Results do not depend on the thread count.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxcascade.ops.kernel_build import (  # noqa: F401  (re-exported: the loader's names callers use)
    GRADIENT_TARGET, HANDLERS, HEAD_TARGET, KERNEL_ENV, POOL_TARGET, TARGET, TARGETS, available, build,
    kernel_dir, wanted)

OUT_CHANNELS = (16, 32, 48, 64)  # output blocks the kernel keeps in registers
CHUNK_FLOATS, MAX_CHUNKS = 2**17, 256  # the kernel gradient's chunks of cotangent: 512 KB each


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
