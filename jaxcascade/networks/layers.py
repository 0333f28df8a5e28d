"""Layers the networks share, and the receptive-field arithmetic of a layer stack.

`Conv3D` routes its arithmetic through `convs.conv3d` (GEMM formulations on
CPU, `lax.conv` elsewhere); `max_pool_2x2x2` is the training pool and
`dense_max_pool` its stride-1 ("a trous") form for dense inference; `PReLU`
is Keras' with a slope per element. A network that describes its layers as a
sequence of `Window`s gets its dense halo and per-layer dilations from
`receptive_halo` and `dilations`, instead of summing them by hand.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from jaxcascade.ops import convs, cpu_kernel, kept_outputs
from jaxcascade.ops.pooling import max_pool_2x2x2  # noqa: F401  (the networks' training pool)

# Lasagne's and Keras' default kernel initialiser, which the seed code and nicMSlesions used.
glorot = jax.nn.initializers.glorot_uniform()


COMPUTE_DTYPES = ("float32", "bfloat16")
# Dense layers' products in true float32 on every platform (NVIDIA GPUs would use TF32; see convs.conv3d).
FLOAT32 = jax.lax.Precision.HIGHEST


class Conv3D(nnx.Module):
    """A k^3 convolution whose arithmetic goes through `convs.conv3d`.

    Parameters are float32; with compute_dtype 'bfloat16' the products are
    bfloat16 and the sums float32 (activations between layers stay float32).
    """

    def __init__(self, in_features, out_features, *, kernel_size=3, padding="VALID", implementation="auto",
                 compute_dtype="float32", rngs):
        if compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"compute_dtype {compute_dtype!r}: use one of {', '.join(COMPUTE_DTYPES)}")
        shape = (kernel_size,) * 3 + (in_features, out_features)
        self.kernel = nnx.Param(glorot(rngs.params(), shape, jnp.float32))
        self.bias = nnx.Param(jnp.zeros((out_features,), jnp.float32))
        self.padding = padding
        self.implementation = implementation
        self.compute_dtype = compute_dtype

    def __call__(self, x, *, dilation: int = 1, gather_taps: bool = False, keep=None):
        return self.apply(x, self.kernel[...], dilation=dilation, gather_taps=gather_taps, keep=keep) + self.bias[...]

    def apply(self, x, kernel, *, dilation: int = 1, padding: str | None = None, gather_taps: bool = False,
              keep=None):
        """This layer's convolution arithmetic on any kernel (the dense form reuses it).

        gather_taps: see convs.conv3d (x is not differentiated, and its producer
        does not fuse into a gather). keep: the outputs the caller reads (see
        convs.conv3d; the others may be anything).
        """
        return convs.conv3d(x, kernel, padding=padding or self.padding, dilation=dilation,
                            implementation=self.implementation, gather_taps=gather_taps, keep=keep,
                            compute_dtype=None if self.compute_dtype == "float32" else self.compute_dtype)


class PReLU(nnx.Module):
    """max(0, x) + alpha * min(0, x) with alpha of any broadcastable shape (Keras' PReLU, zero-initialised)."""

    def __init__(self, shape: tuple[int, ...]):
        self.alpha = nnx.Param(jnp.zeros(shape, jnp.float32))

    def __call__(self, x):
        return jnp.maximum(x, 0) + self.alpha[...] * jnp.minimum(x, 0)


def dense_max_pool(x, dilation: int):
    """A 2^3 max-pool evaluated at every position (stride 1), taps `dilation` apart.

    One primitive (`cpu_kernel.max_pool`): when lowered for CPU with jaxcascade's
    kernels on (float32, channels a multiple of 16), one pass of the C++ kernel;
    otherwise one axis at a time (max is exact: the values equal one 2x2x2
    window's), 2.2x faster on XLA:CPU than one 3D window. Kept as reduce_window
    rather than jnp.maximum of slices: XLA would fuse that cheap elementwise form
    into the next convolution's tap gather and recompute it for every tap
    (convs.py). Its derivative selects the tangent of each window's maximum
    (reduce_window's own has no transpose with dilated windows), so grad and
    every other transformation apply with the kernel on or off.
    """
    return cpu_kernel.max_pool(x, dilation)


def fused_dense_head(x, w1, b1, w2, b2, keep=None):
    """relu(x @ w1 + b1) @ w2 + b2 over x's last axis in one primitive (`cpu_kernel.dense_head`), or None where
    jaxcascade's kernels are off or do not run this head (the caller then applies its own layers).

    When lowered for CPU the C++ kernel keeps the hidden layer in registers; elsewhere it is the same two
    matrix products in jnp. Differentiable and batchable like any JAX operation. keep: None, or a bool
    of x's shape but its last axis: the rows to compute (`kept_outputs.dense_head_where`; 0 elsewhere).
    """
    if not (x.dtype == jnp.float32 and cpu_kernel.enabled() and cpu_kernel.head_supported(x.shape[-1], *w2.shape)):
        return None
    if keep is not None:
        return kept_outputs.dense_head_where(x, w1, b1, w2, b2, keep)
    return cpu_kernel.dense_head(x, w1, b1, w2, b2)


def read_by_window(keep, size: int, dilation: int):
    """The inputs a dense layer with `size` taps per axis, `dilation` apart, reads for the outputs `keep` marks.

    keep: bool (N, D, H, W) -> bool (N, D + s, H + s, W + s), s = (size - 1) * dilation: position p is
    read when a kept output sits at p - t * dilation along each axis for some taps t. One axis at a time,
    as ORs of shifted slices, which XLA fuses (a boolean reduce_window cost as much as the masks saved).
    """
    span = (size - 1) * dilation
    for axis in (1, 2, 3):
        widths = [(0, 0)] * 4
        widths[axis] = (span, span)
        padded, length = jnp.pad(keep, widths), keep.shape[axis] + span
        keep = functools.reduce(jnp.logical_or, [jax.lax.slice_in_dim(padded, tap * dilation, tap * dilation + length,
                                                                      axis=axis) for tap in range(size)])
    return keep


@dataclasses.dataclass(frozen=True)
class Window:
    """One spatial layer of a patch network: `size` taps per axis, moving by `stride`."""

    size: int
    stride: int = 1


def dilations(windows: tuple[Window, ...]) -> tuple[int, ...]:
    """Tap spacing of each layer when the stack runs densely: the product of the strides before it."""
    spacing, out = 1, []
    for window in windows:
        out.append(spacing)
        spacing *= window.stride
    return tuple(out)


def receptive_halo(windows: tuple[Window, ...]) -> int:
    """Receptive field - 1: the extra input voxels per axis a dense block of outputs needs."""
    return sum((window.size - 1) * spacing for window, spacing in zip(windows, dilations(windows)))
