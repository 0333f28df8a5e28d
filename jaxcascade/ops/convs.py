"""3x3x3 (and general k^3) convolutions behind one function.

`lax.conv_general_dilated` is the obvious choice and wins where cuDNN runs it,
but XLA's CPU backend reaches only a fraction of its matmul throughput on 3D
convolutions. On CPU, 'auto' runs float32 convolutions with 16-64 output
channels in jaxcascade's own C++ kernel ('direct', cpu_kernel.py: forward and
both gradients, no tap buffer, 2-4x faster). Elsewhere on CPU (bfloat16
products, other widths, or where the kernel cannot be built) the same
convolution is written as shifted slices concatenated along channels, which
turns into large GEMMs that XLA:CPU runs several times faster than its own
convolution: 'im2col' puts all k^3 taps side by side (one GEMM; best while the
buffer is small), 'slices' only the k^2 in-plane taps (one GEMM per depth tap;
9x less buffer for large volumes), 'gather' builds im2col's columns with one
gather. All are the same cross-correlation; `tests/test_models.py` and
`tests/test_cpu_kernel.py` check them against lax.conv. 'auto' picks per
platform when the computation is lowered: CPU kernel or GEMM formulation on
CPU, `lax.conv` everywhere else, so a step traced on a CPU machine and
exported or compiled for a GPU or TPU gets real convolutions
(`tests/test_export.py`). Where the kernel is on (cpu_kernel.enabled) that
choice is the lowering of a JAX primitive (conv_primitives.py) whose
derivatives and batching are again primitives, so every JAX transformation
composes through it (`tests/test_transformations.py`); where it is off, it is
`lax.platform_dependent` over the formulations, as before the kernel.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxcascade.ops import conv_primitives, cpu_kernel, kept_outputs

IMPLEMENTATIONS = ("auto", "lax", "slices", "im2col", "gather", "direct")

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


def same_padding(kernel_size: int, dilation: int = 1) -> tuple[int, int]:
    """Zero padding (before, after) that keeps the spatial size, as TF/Lasagne 'same' does."""
    total = (kernel_size - 1) * dilation
    return total // 2, total - total // 2


def conv3d(
    x: jax.Array,
    kernel: jax.Array,
    *,
    padding: str = "VALID",
    dilation: int = 1,
    implementation: str = "auto",
    compute_dtype=None,
    gather_taps: bool = False,
    keep: jax.Array | None = None,
) -> jax.Array:
    """Cross-correlate channels-last volumes with a (k, k, k, in, out) kernel.

    Args:
      x: (batch, depth, height, width, in_channels).
      kernel: (k, k, k, in_channels, out_channels).
      padding: 'VALID' or 'SAME' (zero padding, output size = input size).
      dilation: spacing between kernel taps (used by dense a-trous inference).
      implementation: 'auto', 'lax', 'slices', 'im2col', 'gather' or 'direct'
        (the C++ kernel; a ValueError where it cannot run).
      gather_taps: 'auto' may build im2col's columns with one gather (the
        fastest forward pass). The caller vouches that nothing differentiates
        x (the gather's gradient is a slow scatter-add) and that x's producer
        does not fuse into the gather: XLA fuses an elementwise producer (a
        normalisation, an activation, a pad) or another gather into it and
        recomputes it for every tap (nicMSlesions' PReLU layers: 4-10x slower).
      keep: None, or a bool (batch, depth', height', width') of the outputs the
        caller reads (the dense form's candidates): where the C++ kernel runs,
        only those are computed and the others are 0; elsewhere it is ignored.
      compute_dtype: multiply in this dtype (e.g. bfloat16, whose GEMMs run
        4-8x faster on CPUs with AMX and on GPUs/TPUs) and sum in x's dtype;
        None: x's dtype throughout.

    Returns:
      (batch, depth', height', width', out_channels) in x's dtype.
    """
    if padding not in ("VALID", "SAME"):
        raise ValueError(f"padding must be 'VALID' or 'SAME', got {padding!r}")
    kernel_size = kernel.shape[0]
    if padding == "SAME":
        pad = same_padding(kernel_size, dilation)
        x = jnp.pad(x, ((0, 0), pad, pad, pad, (0, 0)))
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"unknown convolution implementation {implementation!r}; use one of {IMPLEMENTATIONS}")
    accumulate = None
    if compute_dtype is not None and jnp.dtype(compute_dtype) != x.dtype:
        accumulate = x.dtype
        x, kernel = x.astype(compute_dtype), kernel.astype(compute_dtype)
    # float32 means float32: without this, NVIDIA GPUs run float32 convolutions in TF32 (a 10-bit
    # mantissa; dense vs patch-wise probabilities then differ by 1.4e-3 instead of 3e-7). It cost
    # nothing measurable on an H200 and leaves CPU results bit-identical (benchmarks/gpu.py).
    precision = lax.Precision.HIGHEST if accumulate is None else None
    if implementation == "direct" and not (cpu_kernel.supports(x.shape, kernel.shape, x.dtype)
                                           and cpu_kernel.available()):
        raise ValueError(f"the CPU kernel cannot run this convolution ({x.dtype}, kernel {kernel.shape}) here")
    if implementation == "direct" or (implementation == "auto" and accumulate is None and cpu_kernel.enabled()
                                      and cpu_kernel.supports(x.shape, kernel.shape, x.dtype)):
        # A JAX primitive (conv_primitives.py) whose lowering picks the C++ kernel on CPU, `lax.conv` elsewhere,
        # and whose derivatives and batching are again these primitives: every transformation composes.
        if keep is not None and padding == "VALID":
            return kept_outputs.conv3d_where(x, kernel, keep, dilation=dilation)
        return conv_primitives.conv3d(x, kernel, dilation=dilation, gather_taps=gather_taps)
    if implementation == "auto":
        # Chosen when the computation is lowered for a platform, not when it is
        # traced: an exported or cross-compiled step gets cuDNN/TPU convolutions
        # even when traced on a CPU machine.
        on_cpu = _FORMULATIONS[default_implementation(x.shape, kernel.shape, dilation, x.dtype.itemsize, gather_taps)]
        return lax.platform_dependent(
            x, kernel, cpu=functools.partial(on_cpu, dilation=dilation, accumulate=accumulate, precision=precision),
            default=functools.partial(_conv3d_lax, dilation=dilation, accumulate=accumulate, precision=precision))
    return _FORMULATIONS[implementation](x, kernel, dilation, accumulate=accumulate, precision=precision)


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


_FORMULATIONS = {"lax": _conv3d_lax, "im2col": _conv3d_im2col, "slices": _conv3d_slices, "gather": _conv3d_gather}
