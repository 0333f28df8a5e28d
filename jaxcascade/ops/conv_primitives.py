"""The 3D convolution and its two gradients as JAX primitives, so every JAX transformation composes.

`conv3d_p(x, kernel)` is the cross-correlation of x, read with `padding`
zeros around each spatial axis, with a dilated (k, k, k, C, O) kernel;
`input_gradient_p(cotangent, kernel)` and `kernel_gradient_p(x, cotangent)`
are its gradients (the transposed convolution, and the gradient with respect
to the kernel). All three are bilinear and each one's transposes are the other
two, with the same parameters:

    conv3d_p(x, w)           wrt x: input_gradient_p(ct, w)     wrt w: kernel_gradient_p(x, ct)
    input_gradient_p(c, w)   wrt c: conv3d_p(ct, w)             wrt w: kernel_gradient_p(ct, c)
    kernel_gradient_p(x, c)  wrt x: input_gradient_p(c, ct)     wrt c: conv3d_p(x, ct)

so JVPs (by bilinearity), gradients and derivatives of gradients close, to
any order, and stay in the C++ kernel wherever it supports the shapes. The
lowering decides when a computation is lowered, not traced: for CPU the kernel
(cpu_kernel.py: the input gradient is the convolution of the cotangent, read
with span - p zeros around it, with the flipped, channel-swapped kernel) where
it is on, built and supports the shapes, else convs.py's GEMM formulation and
its transposes (the operations autodiff of that formulation gives, so a CPU
without the kernel computes what it did before these primitives); for every
other platform `lax.conv_general_dilated` and its transposes, so a computation
traced on a CPU machine and exported for a GPU or TPU has real convolutions.
vmap folds a vmapped operand into an axis the primitive already has (x into the
batch, kernels into channels) and loops (lax.map) only where both operands are
vmapped, as for per-example kernel gradients.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend.core import Primitive
from jax.interpreters import ad, batching

from jaxcascade.ops import cpu_kernel, formulations
from jaxcascade.ops.cpu_kernel import HIGHEST, NOT_MAPPED, map_examples, moved_axis, register_primitive

DIMENSIONS = ("NDHWC", "DHWIO", "NDHWC")


def _span(kernel_size: int, dilation: int) -> int:
    return (kernel_size - 1) * dilation


def _pad(x, padding: int):
    return x if padding == 0 else jnp.pad(x, ((0, 0),) + ((padding, padding),) * 3 + ((0, 0),))


def _flipped(kernel):
    """The kernel of the transposed convolution: taps reversed, input and output channels swapped."""
    return jnp.flip(kernel, (0, 1, 2)).swapaxes(3, 4)


# --- lowerings --------------------------------------------------------------------------------------------


def _lax_conv(x, kernel, dilation, padding):
    return lax.conv_general_dilated(x, kernel, (1, 1, 1), ((padding, padding),) * 3, rhs_dilation=(dilation,) * 3,
                                    dimension_numbers=DIMENSIONS, precision=HIGHEST)


def _gemm_conv(x, kernel, dilation, padding, gather_taps):
    """convs.py's GEMM formulation for these shapes, on x padded explicitly."""
    x = _pad(x, padding)
    implementation = formulations.default_implementation(x.shape, kernel.shape, dilation, x.dtype.itemsize,
                                                          gather_taps)
    return formulations.FORMULATIONS[implementation](x, kernel, dilation, precision=HIGHEST)


def _transpose(conv, wrt: int, shape, cotangent, operand, *args):
    """The transpose of conv(x, kernel, *args) with respect to argument `wrt` (0: x, 1: kernel) of this shape."""
    def linear(value):
        return conv(value, operand, *args) if wrt == 0 else conv(operand, value, *args)

    return jax.linear_transpose(linear, jax.ShapeDtypeStruct(shape, cotangent.dtype))(cotangent)[0]


def _x_shape(cotangent_shape, kernel_shape, dilation, padding):
    grow = _span(kernel_shape[0], dilation) - 2 * padding
    return (cotangent_shape[0], *(size + grow for size in cotangent_shape[1:4]), kernel_shape[3])


def _kernel_shape(x_shape, cotangent_shape, kernel_size):
    return (kernel_size,) * 3 + (x_shape[4], cotangent_shape[4])


def _conv_on_cpu(x, kernel, *, dilation, padding, gather_taps):
    if cpu_kernel.runs_here() and cpu_kernel.supports(x.shape, kernel.shape, x.dtype, padding, dilation):
        return cpu_kernel.ffi_conv3d(x, kernel, dilation, padding)
    return _gemm_conv(x, kernel, dilation, padding, gather_taps)


def _conv_elsewhere(x, kernel, *, dilation, padding, gather_taps):
    return _lax_conv(x, kernel, dilation, padding)


def _input_gradient_on_cpu(cotangent, kernel, *, dilation, padding, gather_taps):
    flipped, unpad = _flipped(kernel), _span(kernel.shape[0], dilation) - padding
    if cpu_kernel.runs_here() and cpu_kernel.supports(cotangent.shape, flipped.shape, cotangent.dtype, unpad, dilation):
        # The transposed convolution: the cotangent read with span - p zeros around it (the kernel skips taps
        # that fall on them), the kernel flipped, its channels swapped.
        return cpu_kernel.ffi_conv3d(cotangent, flipped, dilation, unpad)
    shape = _x_shape(cotangent.shape, kernel.shape, dilation, padding)
    return _transpose(_gemm_conv, 0, shape, cotangent, kernel, dilation, padding, gather_taps)


def _input_gradient_elsewhere(cotangent, kernel, *, dilation, padding, gather_taps):
    shape = _x_shape(cotangent.shape, kernel.shape, dilation, padding)
    return _transpose(_lax_conv, 0, shape, cotangent, kernel, dilation, padding)


def _kernel_gradient_on_cpu(x, cotangent, *, kernel_size, dilation, padding, gather_taps):
    shape = _kernel_shape(x.shape, cotangent.shape, kernel_size)
    if cpu_kernel.runs_here() and cpu_kernel.supports(x.shape, shape, x.dtype, padding, dilation):
        # The kernel's reduction reads no padding: zeros written once.
        return cpu_kernel.ffi_kernel_gradient(_pad(x, padding), cotangent, shape, dilation)
    return _transpose(_gemm_conv, 1, shape, cotangent, x, dilation, padding, gather_taps)


def _kernel_gradient_elsewhere(x, cotangent, *, kernel_size, dilation, padding, gather_taps):
    shape = _kernel_shape(x.shape, cotangent.shape, kernel_size)
    return _transpose(_lax_conv, 1, shape, cotangent, x, dilation, padding)


# --- the primitives ----------------------------------------------------------------------------------------

conv3d_p = Primitive("jaxcascade_conv3d")
input_gradient_p = Primitive("jaxcascade_conv3d_input_gradient")
kernel_gradient_p = Primitive("jaxcascade_conv3d_kernel_gradient")


def conv_aval(x, kernel, *, dilation, padding, gather_taps):
    shrink = _span(kernel.shape[0], dilation) - 2 * padding
    return jax.core.ShapedArray((x.shape[0], *(size - shrink for size in x.shape[1:4]), kernel.shape[4]), x.dtype)


conv3d_p.def_abstract_eval(conv_aval)
input_gradient_p.def_abstract_eval(lambda cotangent, kernel, *, dilation, padding, gather_taps: jax.core.ShapedArray(
    _x_shape(cotangent.shape, kernel.shape, dilation, padding), cotangent.dtype))
kernel_gradient_p.def_abstract_eval(lambda x, cotangent, *, kernel_size, **_: jax.core.ShapedArray(
    _kernel_shape(x.shape, cotangent.shape, kernel_size), x.dtype))
register_primitive(conv3d_p, _conv_on_cpu, _conv_elsewhere)
register_primitive(input_gradient_p, _input_gradient_on_cpu, _input_gradient_elsewhere)
register_primitive(kernel_gradient_p, _kernel_gradient_on_cpu, _kernel_gradient_elsewhere)


def conv3d(x: jax.Array, kernel: jax.Array, *, dilation: int = 1, padding: int = 0,
           gather_taps: bool = False) -> jax.Array:
    """The convolution primitive; gather_taps as in convs.conv3d (used only by the CPU GEMM fallback)."""
    return conv3d_p.bind(x, kernel, dilation=int(dilation), padding=int(padding), gather_taps=bool(gather_taps))


def _size(kernel) -> int:
    """The kernel's size, whether it is a value or the undefined operand a transpose solves for (its aval)."""
    return (kernel.aval if hasattr(kernel, "aval") and not hasattr(kernel, "shape") else kernel).shape[0]


def _gradient(x, cotangent, kernel_size, params):
    return kernel_gradient_p.bind(x, cotangent, kernel_size=kernel_size, **params)


# Transposes: bilinear_transpose(rule)(cotangent of the output, first operand, second operand, **params).
ad.defbilinear(conv3d_p,
               lambda ct, x, kernel, **params: input_gradient_p.bind(ct, kernel, **params),
               lambda ct, x, kernel, **params: _gradient(x, ct, _size(kernel), params))
ad.defbilinear(input_gradient_p,
               lambda ct, cotangent, kernel, **params: conv3d_p.bind(ct, kernel, **params),
               lambda ct, cotangent, kernel, **params: _gradient(ct, cotangent, _size(kernel), params))
ad.defbilinear(kernel_gradient_p,
               lambda ct, x, cotangent, *, kernel_size, **params: input_gradient_p.bind(cotangent, ct, **params),
               lambda ct, x, cotangent, *, kernel_size, **params: conv3d_p.bind(x, ct, **params))


# --- batching ----------------------------------------------------------------------------------------------


def _fold(primitive, args, dims, folds, **params):
    """vmap by folding: the vmapped operand's axis joins axis `folds[i]` of operand i (the other is unbatched),
    and leaves the output's axis folds[2] (whose size was multiplied) split again, the vmapped axis before it."""
    mapped = 0 if dims[1] is NOT_MAPPED else 1
    operand = moved_axis(args[mapped], dims[mapped], folds[mapped])
    size = operand.shape[folds[mapped]]
    operands = list(args)
    operands[mapped] = operand.reshape(*operand.shape[:folds[mapped]], -1, *operand.shape[folds[mapped] + 2:])
    out = primitive.bind(*operands, **params)
    axis = folds[2 + mapped]
    return out.reshape(*out.shape[:axis], size, -1, *out.shape[axis + 1:]), axis


# (the vmapped axis of operand 0 joins its axis ..., of operand 1 its axis ...; the output splits at axis ...
#  when operand 0 was vmapped, ... when operand 1 was)
FOLDS = {conv3d_p: (0, 4, 0, 4),          # x into the batch; kernels side by side as output channels
         input_gradient_p: (0, 3, 0, 4),  # cotangents into the batch; kernels as (input) channels
         kernel_gradient_p: (4, 4, 3, 4)}  # x as input channels; cotangents as output channels


def _batch(primitive, args, dims, **params):
    if NOT_MAPPED in dims:
        return _fold(primitive, args, dims, FOLDS[primitive], **params)
    # Both vmapped (per-example kernel gradients, a vmapped kernel on vmapped data): one call per example.
    return map_examples(functools.partial(primitive.bind, **params), args, dims)


for _primitive in FOLDS:
    batching.primitive_batchers[_primitive] = functools.partial(_batch, _primitive)
