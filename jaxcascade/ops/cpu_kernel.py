"""jaxcascade's own CPU kernels (kernels/*.cc), built on first use and called through XLA's FFI.

Every GEMM formulation of a 3D convolution (convs.py) writes and reads a tap
buffer 27x its input, and that memory traffic kept XLA:CPU at 25-55 % of its
matmul rate and 2-4x behind PyTorch's oneDNN. The C++ convolution keeps a
block of outputs in registers and never builds the buffer (170-310 GFLOP/s,
121-201 % of a matmul of equal FLOPs on a 2-core AVX-512 Xeon:
`python -m benchmarks.convs`), with both gradients. For the dense form it
also runs the head (dense1 + ReLU + output layer, the hidden layer kept in
registers) and the dilated 2^3 max-pools in one pass each; for nicMSlesions'
network, its whole convolutional stack patch by patch (patch_features.py).

It is built and loaded by kernel_build.py, as the variant for the CPU's vector
width (kernel_target.py); it is used by default on x86-64 CPUs with AVX-512 or
AVX2 (see `kernel_target.choose`); JAXCASCADE_CPU_KERNEL=1 forces it
elsewhere, JAXCASCADE_CPU_KERNEL=0 turns it off (the results then are
bit-identical to jaxcascade before it; with it, they differ by float32
rounding, ~1e-6). Results do not depend on the thread count.

Each kernel is a JAX primitive (here the dense head and the dilated max-pool,
in conv_primitives.py the convolution and its two gradients): shapes by
abstract evaluation; derivatives (JVP, transposes) and batching rules written
in these primitives and jnp, so grad, jvp, vmap, hessian, jax.export...
compose to any order (tests/test_transformations.py). The kernel is picked
when the computation is lowered for CPU, where it is on, builds and supports
the shapes; a pure-JAX form otherwise and on every other platform. So
`available()`, which builds the kernel, runs only when lowering for CPU.
"""

from __future__ import annotations

import functools
import os
import platform

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

from jaxcascade.ops import kernel_target
from jaxcascade.ops.kernel_build import (  # noqa: F401  (re-exported: the loader's names callers use)
    GRADIENT_TARGET, HANDLERS, HEAD_TARGET, HEAD_WHERE_TARGET, ISA_ENV, KERNEL_ENV, POOL_TARGET, TARGET, TARGETS,
    WHERE_TARGET, available, build, kernel_dir, wanted)

OUT_CHANNELS = (16, 32, 48, 64)  # output blocks the kernel keeps in registers
CHUNK_FLOATS, MAX_CHUNKS = 2**17, 256  # the kernel gradient's chunks of cotangent: 512 KB each
HIGHEST = lax.Precision.HIGHEST  # the pure-JAX forms in true float32 (no TF32 on NVIDIA GPUs)
NOT_MAPPED = None  # how batching rules see an operand that vmap does not map (jax._src.interpreters.batching)


@functools.lru_cache(maxsize=None)
def _flags() -> frozenset[str]:
    return frozenset(kernel_target.cpu_flags())


def enabled() -> bool:
    """Whether jaxcascade uses its kernels (JAXCASCADE_CPU_KERNEL, JAXCASCADE_CPU_KERNEL_ISA, else the CPU
    class: kernel_target.choose), without building them.

    Read at every trace and every lowering, so the environment variables also
    switch them within a process (for functions traced and compiled afresh).
    """
    return wanted(os.environ.get(KERNEL_ENV, ""), platform.machine(), _flags(), os.environ.get(ISA_ENV, ""))


def runs_here() -> bool:
    """At lowering for CPU: whether the kernel is wanted and built (the first call builds it)."""
    return enabled() and available()


def supports(x_shape, kernel_shape, dtype, padding: int = 0, dilation: int = 1) -> bool:
    """Whether the kernel handles this convolution: float32, rank 5, a k^3 kernel (k > 1) over x's channels,
    16-64 output channels, at most `span` zeros of padding and a non-empty output."""
    if len(x_shape) != 5 or len(kernel_shape) != 5 or jnp.dtype(dtype) != jnp.float32:
        return False
    kernel_size, *rest, in_channels, out_channels = kernel_shape
    span = (kernel_size - 1) * dilation
    return (kernel_size > 1 and rest == [kernel_size, kernel_size] and in_channels == x_shape[-1]
            and out_channels in OUT_CHANNELS and 0 <= padding <= span
            and min(x_shape[1:4]) + 2 * padding - span > 0 and x_shape[0] > 0)


def ffi_conv3d(x: jax.Array, kernel: jax.Array, dilation: int, padding: int = 0) -> jax.Array:
    """The kernel's convolution of x with `padding` zeros around each spatial axis (read, never stored)."""
    batch, depth, height, width, _ = x.shape
    span = (kernel.shape[0] - 1) * dilation - 2 * padding
    out = jax.ShapeDtypeStruct((batch, depth - span, height - span, width - span, kernel.shape[-1]), jnp.float32)
    return jax.ffi.ffi_call(TARGET, out)(x, kernel, dilation=np.int64(dilation), padding=np.int64(padding))


def ffi_kernel_gradient(x: jax.Array, cotangent: jax.Array, kernel_shape, dilation: int) -> jax.Array:
    """The gradient of the VALID convolution of x with respect to its (kernel_shape) kernel."""
    kernel_size, _, _, in_channels, out_channels = kernel_shape
    positions = int(np.prod(cotangent.shape[:4]))
    # Partial sums per chunk of output positions, added in chunk order: fixed by the shapes alone (so results
    # do not depend on the thread count), each chunk's cotangent small enough to stay in cache while every
    # (tap, channel) row of the gradient passes over it.
    chunks = int(np.clip(-(-positions * out_channels // CHUNK_FLOATS), 1, MAX_CHUNKS))
    outputs = (jax.ShapeDtypeStruct(tuple(kernel_shape), jnp.float32),
               jax.ShapeDtypeStruct((chunks, kernel_size**3 * in_channels * out_channels), jnp.float32))
    gradient, _ = jax.ffi.ffi_call(GRADIENT_TARGET, outputs)(x, cotangent, dilation=np.int64(dilation))
    return gradient


@functools.lru_cache(maxsize=None)
def _compiled(primitive: Primitive, params: tuple):
    return jax.jit(functools.partial(primitive.bind, **dict(params)))


def register_primitive(primitive: Primitive, on_cpu, reference, multiple_results: bool = False) -> None:
    """Eager calls (compiled once per primitive and parameters), and the lowerings: `on_cpu` for CPU,
    `reference` (pure JAX) for every other platform."""
    primitive.def_impl(lambda *args, **params: _compiled(primitive, tuple(sorted(params.items())))(*args))
    mlir.register_lowering(primitive, mlir.lower_fun(reference, multiple_results))
    mlir.register_lowering(primitive, mlir.lower_fun(on_cpu, multiple_results), platform="cpu")


def moved_axis(x, axis, to):
    return x if axis == to else jnp.moveaxis(x, axis, to)


def map_examples(bind, args, dims):
    """Batching's last resort: one call per example (lax.map), unbatched operands shared."""
    index = [i for i, d in enumerate(dims) if d is not NOT_MAPPED]
    batched = [moved_axis(args[i], dims[i], 0) for i in index]

    def one(example):
        operands = list(args)
        for i, value in zip(index, example):
            operands[i] = value
        return bind(*operands)

    return lax.map(one, batched), 0


# --- the dense form's head: relu(x @ w1 + b1) @ w2 + b2 over the last axis --------------------------------


def head_supported(in_channels: int, hidden: int, outputs: int) -> bool:
    """Whether dense_head runs this head (hidden units in blocks of 64, up to 4 outputs)."""
    return hidden % 64 == 0 and 0 < outputs <= 4 and in_channels > 0


def head_reference(x, w1, b1, w2, b2):
    """The head in jnp: the kernel's result up to float32 rounding, and its derivatives."""
    hidden = jax.nn.relu(jnp.dot(x, w1, precision=HIGHEST) + b1)
    return jnp.dot(hidden, w2, precision=HIGHEST) + b2


def _head_on_cpu(x, w1, b1, w2, b2):
    *batch, channels = x.shape
    if not (runs_here() and x.dtype == jnp.float32 and head_supported(channels, *w2.shape)):
        return head_reference(x, w1, b1, w2, b2)
    flat = x.reshape(-1, channels)
    out = jax.ShapeDtypeStruct((flat.shape[0], w2.shape[1]), jnp.float32)
    logits = jax.ffi.ffi_call(HEAD_TARGET, out)(flat, w1, b1, w2.T, b2)
    return logits.reshape(*batch, w2.shape[1])


dense_head_p = Primitive("jaxcascade_dense_head")
dense_head_p.def_abstract_eval(lambda x, w1, b1, w2, b2: jax.core.ShapedArray((*x.shape[:-1], w2.shape[1]), x.dtype))
register_primitive(dense_head_p, _head_on_cpu, head_reference)


def _head_jvp(primals, tangents):
    # The primal from the kernel; the tangent in jnp (linear in the tangents, so transposable to any order).
    tangents = tuple(map(ad.instantiate_zeros, tangents))
    return dense_head_p.bind(*primals), jax.jvp(head_reference, primals, tangents)[1]


def _head_batch(args, dims):
    (x, *weights), axis = args, dims[0]
    if all(d is NOT_MAPPED for d in dims[1:]):  # any leading axes are rows: the vmapped one too
        if axis == x.ndim - 1:
            x, axis = jnp.moveaxis(x, axis, 0), 0
        return dense_head_p.bind(x, *weights), axis
    return map_examples(dense_head_p.bind, args, dims)


ad.primitive_jvps[dense_head_p] = _head_jvp
batching.primitive_batchers[dense_head_p] = _head_batch


def dense_head(x: jax.Array, w1: jax.Array, b1: jax.Array, w2: jax.Array, b2: jax.Array) -> jax.Array:
    """relu(x @ w1 + b1) @ w2 + b2 over the last axis of x, the hidden layer kept in registers on CPU.

    The dense form's head: XLA would write the hidden layer of every voxel to memory and read it back.
    """
    return dense_head_p.bind(x, w1, b1, jnp.asarray(w2), b2)


# --- the dense form's max-pool: the 2^3 max over taps `dilation` apart at every position -----------------


def max_pool_reference(x: jax.Array, dilation: int) -> jax.Array:
    """The pool one axis at a time with reduce_window (exact: the values equal one 2x2x2 window's)."""
    for axis in (1, 2, 3):
        window, spacing = [1] * 5, [1] * 5
        window[axis], spacing[axis] = 2, dilation
        x = lax.reduce_window(x, -jnp.inf, lax.max, tuple(window), (1,) * 5, "VALID",
                              window_dilation=tuple(spacing))
    return x


def _pool_on_cpu(x, *, dilation):
    if not (runs_here() and x.dtype == jnp.float32 and x.shape[-1] % 16 == 0):
        return max_pool_reference(x, dilation)
    batch, depth, height, width, channels = x.shape
    out = jax.ShapeDtypeStruct((batch, depth - dilation, height - dilation, width - dilation, channels), x.dtype)
    return jax.ffi.ffi_call(POOL_TARGET, out)(x, dilation=np.int64(dilation))


max_pool_p = Primitive("jaxcascade_max_pool")
max_pool_p.def_abstract_eval(lambda x, *, dilation: jax.core.ShapedArray(
    (x.shape[0], *(size - dilation for size in x.shape[1:4]), x.shape[4]), x.dtype))
register_primitive(max_pool_p, _pool_on_cpu, lambda x, *, dilation: max_pool_reference(x, dilation))


def _taps(x, dilation: int):
    """The 8 corners of each window as slices of x, in (a, b, c) order."""
    out = [size - dilation for size in x.shape[1:4]]
    return [x[:, a:a + out[0], b:b + out[1], c:c + out[2]]
            for a in (0, dilation) for b in (0, dilation) for c in (0, dilation)]


def _pool_jvp(primals, tangents, *, dilation):
    # The tangent of the first tap that holds the maximum: a selection, linear in the tangents, so it
    # transposes to the usual scatter of the cotangent (reduce_window's own derivative has no transpose
    # with window dilation).
    (x,), (dx,) = primals, tangents
    pooled = max_pool_p.bind(x, dilation=dilation)
    winner = jnp.argmax(jnp.stack([tap == pooled for tap in _taps(x, dilation)]), axis=0)
    taps = _taps(ad.instantiate_zeros(dx), dilation)
    tangent = functools.reduce(jnp.add, [jnp.where(winner == i, tap, 0) for i, tap in enumerate(taps)])
    return pooled, tangent


def _pool_batch(args, dims, *, dilation):
    (x,), (axis,) = args, dims
    x = moved_axis(x, axis, 0)  # the vmapped axis folded into the batch
    pooled = max_pool_p.bind(x.reshape(-1, *x.shape[2:]), dilation=dilation)
    return pooled.reshape(x.shape[0], x.shape[1], *pooled.shape[1:]), 0


ad.primitive_jvps[max_pool_p] = _pool_jvp
batching.primitive_batchers[max_pool_p] = _pool_batch


def max_pool(x: jax.Array, dilation: int) -> jax.Array:
    """The 2^3 max over taps `dilation` apart at every position of (N, D, H, W, C), C a multiple of 16, in one pass."""
    return max_pool_p.bind(x, dilation=int(dilation))
