"""The GEMM formulations of a k^3 convolution on CPU, and which one 'auto' picks for given shapes.

All four compute `lax.conv_general_dilated`'s VALID cross-correlation (NDHWC x DHWIO): 'lax' is that
call itself; 'im2col' puts all k^3 taps side by side (one GEMM; best while the buffer is small); 'slices'
only the k^2 in-plane taps (one GEMM per depth tap; 9x less buffer for large volumes); 'gather' builds
im2col's columns with one gather. Their own module, below `convs.py` (which chooses between them and the
C++ kernel) and `conv_primitives.py` (whose CPU fallback they are), so that neither imports the other.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

# Below this many bytes the full im2col buffer (all k^3 taps side by side) is
# cheap to build and its single GEMM beats three thinner ones; above it the
# buffer's memory traffic costs more than it saves. Re-measured with the malloc
# settings of runtime.py (Intel Xeon, 2 cores): the SAME network's conv2 on a
# training batch (55 MB) is 15-20 % faster as im2col, the dense kernel's conv2
# (152 MB per 16 tiles) 15 % faster as slices.
IM2COL_MAX_BYTES = 128 * 2**20


def default_implementation(x_shape, kernel_shape, dilation: int = 1, itemsize: int = 4,
                           gather_taps: bool = False) -> str:
    """The formulation 'auto' uses on CPU for these shapes (off CPU it is always 'lax': cuDNN, TPU).

    XLA:CPU's own convolution (Eigen) never wins once the GEMM buffers stay
    moderate: its gradients are 2-6x slower, and its one forward win
    (nicMSlesions' 11^3 32-channel layer on 256-patch batches) turns into a
    1.5x loss on 32-patch batches, which are faster overall (benchmarks/nicms_inference.py).
    """
    kernel_size, *rest, in_channels, _ = kernel_shape
    if rest != [kernel_size, kernel_size]:  # the formulations below take k^3 kernels
        return "lax"
    if kernel_size == 1:  # a plain matrix product: no taps to gather
        return "im2col"
    span = (kernel_size - 1) * dilation
    out_voxels = x_shape[0] * max(0, x_shape[1] - span) * max(0, x_shape[2] - span) * max(0, x_shape[3] - span)
    im2col_bytes = out_voxels * kernel_size**3 * in_channels * itemsize
    if im2col_bytes > IM2COL_MAX_BYTES:
        return "slices"
    return "gather" if gather_taps else "im2col"


def _conv3d_lax(x: jax.Array, kernel: jax.Array, dilation: int, accumulate=None, precision=None) -> jax.Array:
    return lax.conv_general_dilated(
        x,
        kernel,
        window_strides=(1, 1, 1),
        padding="VALID",
        rhs_dilation=(dilation,) * 3,
        dimension_numbers=("NDHWC", "DHWIO", "NDHWC"),
        preferred_element_type=accumulate,
        precision=precision,
    )


def _conv3d_im2col(x: jax.Array, kernel: jax.Array, dilation: int, accumulate=None, precision=None) -> jax.Array:
    kernel_size, _, _, in_channels, out_channels = kernel.shape
    span = (kernel_size - 1) * dilation
    out_d, out_h, out_w = (size - span for size in x.shape[1:4])
    columns = jnp.concatenate(
        [
            x[:, a * dilation : a * dilation + out_d, b * dilation : b * dilation + out_h,
              c * dilation : c * dilation + out_w, :]
            for a in range(kernel_size)
            for b in range(kernel_size)
            for c in range(kernel_size)
        ],
        axis=-1,
    )
    return jnp.einsum("ndhwk,ko->ndhwo", columns, kernel.reshape(kernel_size**3 * in_channels, out_channels),
                      preferred_element_type=accumulate, precision=precision)


def _conv3d_slices(x: jax.Array, kernel: jax.Array, dilation: int, accumulate=None, precision=None) -> jax.Array:
    kernel_size, _, _, in_channels, out_channels = kernel.shape
    span = (kernel_size - 1) * dilation
    out_d, out_h, out_w = (size - span for size in x.shape[1:4])
    # All k*k in-plane taps side by side along channels: one (k*k*C -> O) GEMM
    # per depth tap instead of k^3 skinny ones.
    in_plane = jnp.concatenate(
        [
            x[:, :, b * dilation : b * dilation + out_h, c * dilation : c * dilation + out_w, :]
            for b in range(kernel_size)
            for c in range(kernel_size)
        ],
        axis=-1,
    )
    out = None
    for a in range(kernel_size):
        depth_slice = in_plane[:, a * dilation : a * dilation + out_d]
        tap_kernel = kernel[a].reshape(kernel_size * kernel_size * in_channels, out_channels)
        term = jnp.einsum("ndhwk,ko->ndhwo", depth_slice, tap_kernel, preferred_element_type=accumulate,
                          precision=precision)
        out = term if out is None else out + term
    return out


def _tap_index(spatial: tuple[int, int, int], kernel_size: int, dilation: int) -> np.ndarray:
    """Flat (D*H*W) input positions of every output's taps, output-major then tap (a, b, c) as in im2col."""
    depth, height, width = spatial
    span = (kernel_size - 1) * dilation
    out = [np.arange(size - span) for size in spatial]
    taps = np.arange(kernel_size) * dilation
    z = out[0][:, None, None, None, None, None] + taps[None, None, None, :, None, None]
    y = out[1][None, :, None, None, None, None] + taps[None, None, None, None, :, None]
    x = out[2][None, None, :, None, None, None] + taps[None, None, None, None, None, :]
    return ((z * height + y) * width + x).reshape(-1).astype(np.int32)


def _conv3d_gather(x: jax.Array, kernel: jax.Array, dilation: int, accumulate=None, precision=None) -> jax.Array:
    """im2col's columns, bit for bit, built by one gather instead of k^3 slices and a concatenation.

    XLA:CPU materialises each slice of the im2col form as its own buffer before
    concatenating them (the tap buffer is written twice); a gather with
    constant indices is one loop fusion. Dense stage 1 of a 1 mm brain: 4.02 ->
    3.28 s (Intel Xeon, 2 cores). Its gradient is a scatter-add, slow on CPU
    (a training step was 1.3-1.5x slower), so 'auto' gathers only where the
    caller says x is not differentiated (conv3d's `gather_taps`).
    """
    kernel_size, _, _, in_channels, out_channels = kernel.shape
    batch, depth, height, width, channels = x.shape
    span = (kernel_size - 1) * dilation
    index = _tap_index((depth, height, width), kernel_size, dilation)
    # x's producer must not fuse into this gather (conv3d's gather_taps): XLA would recompute it for each
    # of the k^3 taps that read a voxel (a separable max-pool there made the dense kernel 4x slower).
    flat = x.reshape(batch, depth * height * width, channels)
    columns = flat.at[:, index].get(mode="promise_in_bounds")  # indices in bounds by construction
    columns = columns.reshape(batch, depth - span, height - span, width - span, kernel_size**3 * in_channels)
    return jnp.einsum("ndhwk,ko->ndhwo", columns, kernel.reshape(kernel_size**3 * in_channels, out_channels),
                      preferred_element_type=accumulate, precision=precision)


FORMULATIONS = {"lax": _conv3d_lax, "im2col": _conv3d_im2col, "slices": _conv3d_slices, "gather": _conv3d_gather}
