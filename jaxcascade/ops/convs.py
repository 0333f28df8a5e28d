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
from jax import lax

from jaxcascade.ops import conv_primitives, cpu_kernel, kept_outputs
from jaxcascade.ops.formulations import FORMULATIONS, default_implementation

IMPLEMENTATIONS = ("auto", "lax", "slices", "im2col", "gather", "direct")

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
    x = _padded(x, kernel.shape[0], padding, dilation)
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"unknown convolution implementation {implementation!r}; use one of {IMPLEMENTATIONS}")
    x, kernel, accumulate = _in_compute_dtype(x, kernel, compute_dtype)
    # float32 means float32: without this, NVIDIA GPUs run float32 convolutions in TF32 (a 10-bit
    # mantissa; dense vs patch-wise probabilities then differ by 1.4e-3 instead of 3e-7). It cost
    # nothing measurable on an H200 and leaves CPU results bit-identical (benchmarks/gpu.py).
    precision = lax.Precision.HIGHEST if accumulate is None else None
    if _runs_primitive(implementation, x, kernel, accumulate):
        # A JAX primitive (conv_primitives.py) whose lowering picks the C++ kernel on CPU, `lax.conv` elsewhere,
        # and whose derivatives and batching are again these primitives: every transformation composes.
        if keep is not None and padding == "VALID":
            return kept_outputs.conv3d_where(x, kernel, keep, dilation=dilation)
        return conv_primitives.conv3d(x, kernel, dilation=dilation, gather_taps=gather_taps)
    return _formulation(x, kernel, implementation, dilation=dilation, accumulate=accumulate, precision=precision,
                        gather_taps=gather_taps)


def _runs_primitive(implementation: str, x: jax.Array, kernel: jax.Array, accumulate) -> bool:
    """Whether the convolution is conv_primitives' primitive (the C++ kernel on CPU); ValueError for a
    'direct' that cannot run here."""
    if implementation == "direct" and not (cpu_kernel.supports(x.shape, kernel.shape, x.dtype)
                                           and cpu_kernel.available()):
        raise ValueError(f"the CPU kernel cannot run this convolution ({x.dtype}, kernel {kernel.shape}) here")
    return implementation == "direct" or (implementation == "auto" and accumulate is None and cpu_kernel.enabled()
                                          and cpu_kernel.supports(x.shape, kernel.shape, x.dtype))


def _formulation(x: jax.Array, kernel: jax.Array, implementation: str, *, dilation: int, accumulate, precision,
                 gather_taps: bool) -> jax.Array:
    """The convolution as one of `FORMULATIONS` ('auto': the CPU's best where lowered for a CPU, else `lax`)."""
    if implementation == "auto":
        # Chosen when the computation is lowered for a platform, not when it is
        # traced: an exported or cross-compiled step gets cuDNN/TPU convolutions
        # even when traced on a CPU machine.
        on_cpu = FORMULATIONS[default_implementation(x.shape, kernel.shape, dilation, x.dtype.itemsize, gather_taps)]
        return lax.platform_dependent(
            x, kernel, cpu=functools.partial(on_cpu, dilation=dilation, accumulate=accumulate, precision=precision),
            default=functools.partial(FORMULATIONS["lax"], dilation=dilation, accumulate=accumulate,
                                      precision=precision))
    return FORMULATIONS[implementation](x, kernel, dilation, accumulate=accumulate, precision=precision)


def _padded(x: jax.Array, kernel_size: int, padding: str, dilation: int) -> jax.Array:
    if padding not in ("VALID", "SAME"):
        raise ValueError(f"padding must be 'VALID' or 'SAME', got {padding!r}")
    if padding == "SAME":
        pad = same_padding(kernel_size, dilation)
        x = jnp.pad(x, ((0, 0), pad, pad, pad, (0, 0)))
    return x


def _in_compute_dtype(x: jax.Array, kernel: jax.Array, compute_dtype) -> tuple[jax.Array, jax.Array, object]:
    """(x, kernel) cast to compute_dtype, and the dtype to accumulate in (x's; None: no cast, x's dtype throughout)."""
    if compute_dtype is not None and jnp.dtype(compute_dtype) != x.dtype:
        return x.astype(compute_dtype), kernel.astype(compute_dtype), x.dtype
    return x, kernel, None
