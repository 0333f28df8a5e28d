"""3x3x3 (and general k^3) convolutions behind one function.

`lax.conv_general_dilated` is the obvious choice and wins where cuDNN runs it,
but XLA's CPU backend reaches only a fraction of its matmul throughput on 3D
convolutions. Writing the same convolution as shifted slices (the in-plane
taps concatenated along channels) plus one matmul per depth tap turns it into
large GEMMs, which XLA:CPU runs several times faster. Both formulations are
mathematically the same cross-correlation; `tests/test_convs.py` checks them
against each other.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

IMPLEMENTATIONS = ("auto", "lax", "slices")


def default_implementation() -> str:
    """'slices' on CPU (GEMM-bound), 'lax' elsewhere (cuDNN/TPU convolutions)."""
    return "slices" if jax.default_backend() == "cpu" else "lax"


def _resolve(implementation: str) -> str:
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"unknown convolution implementation {implementation!r}; use one of {IMPLEMENTATIONS}")
    return default_implementation() if implementation == "auto" else implementation


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
) -> jax.Array:
    """Cross-correlate channels-last volumes with a (k, k, k, in, out) kernel.

    Args:
      x: (batch, depth, height, width, in_channels).
      kernel: (k, k, k, in_channels, out_channels).
      padding: 'VALID' or 'SAME' (zero padding, output size = input size).
      dilation: spacing between kernel taps (used by dense a-trous inference).
      implementation: 'auto', 'lax' or 'slices'.

    Returns:
      (batch, depth', height', width', out_channels) in x's dtype.
    """
    if padding not in ("VALID", "SAME"):
        raise ValueError(f"padding must be 'VALID' or 'SAME', got {padding!r}")
    kernel_size = kernel.shape[0]
    if padding == "SAME":
        pad = same_padding(kernel_size, dilation)
        x = jnp.pad(x, ((0, 0), pad, pad, pad, (0, 0)))
    if _resolve(implementation) == "lax":
        return lax.conv_general_dilated(
            x,
            kernel,
            window_strides=(1, 1, 1),
            padding="VALID",
            rhs_dilation=(dilation,) * 3,
            dimension_numbers=("NDHWC", "DHWIO", "NDHWC"),
        )
    return _conv3d_slices(x, kernel, dilation)


def _conv3d_slices(x: jax.Array, kernel: jax.Array, dilation: int) -> jax.Array:
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
        term = jnp.einsum("ndhwk,ko->ndhwo", depth_slice, tap_kernel)
        out = term if out is None else out + term
    return out
