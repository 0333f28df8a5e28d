"""The convolution and the dense head at the outputs a mask keeps, zeros elsewhere.

The dense form classifies whole blocks, but a study asks only for its
candidates: about a quarter of a 1 mm brain's block voxels, which read a third
of the second convolution's outputs. These primitives are

    conv3d_where(x, kernel, keep)               = where(keep, conv3d(x, kernel), 0)
    dense_head_where(x, w1, b1, w2, b2, keep)   = where(keep, dense_head(x, w1, b1, w2, b2), 0)

and, lowered for CPU with jaxcascade's kernels, the C++ kernels skip what
`keep` drops; a kept output is summed in the same order as without the mask,
so it is bit-identical to the unmasked kernel's. Elsewhere (other platforms,
kernels off, unsupported shapes) they are the unmasked primitives and a
`jnp.where`. Their derivatives go through that reference form (linear in the
tangents, so transposable to any order); vmap folds the vmapped axis into the
batch (or rows) while the weights are shared, and loops otherwise.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import Primitive
from jax.interpreters import ad, batching

from jaxcascade.ops import conv_primitives, cpu_kernel
from jaxcascade.ops.cpu_kernel import HEAD_WHERE_TARGET, NOT_MAPPED, WHERE_TARGET, map_examples, moved_axis, register_primitive


def _leading(operands, dims):
    """The operands with the vmapped axis first (broadcast where unmapped), and its size."""
    size = next(operand.shape[dim] for operand, dim in zip(operands, dims) if dim is not NOT_MAPPED)
    return [jnp.broadcast_to(operand, (size, *operand.shape)) if dim is NOT_MAPPED else moved_axis(operand, dim, 0)
            for operand, dim in zip(operands, dims)], size


def _folded(operands, dims):
    """The operands with the vmapped axis merged into their leading axis, and its size."""
    leading, size = _leading(operands, dims)
    return [operand.reshape(-1, *operand.shape[2:]) for operand in leading], size


# --- the convolution -----------------------------------------------------------------------------------------


def _conv_reference(x, kernel, keep, *, dilation, padding):
    y = conv_primitives.conv3d(x, kernel, dilation=dilation, padding=padding, gather_taps=True)
    return jnp.where(keep[..., None], y, jnp.zeros((), y.dtype))


def _conv_on_cpu(x, kernel, keep, *, dilation, padding):
    if not (cpu_kernel.runs_here() and cpu_kernel.supports(x.shape, kernel.shape, x.dtype, padding, dilation)):
        return _conv_reference(x, kernel, keep, dilation=dilation, padding=padding)
    out = jax.ShapeDtypeStruct((*keep.shape, kernel.shape[-1]), jnp.float32)
    return jax.ffi.ffi_call(WHERE_TARGET, out)(x, kernel, keep, dilation=np.int64(dilation),
                                                 padding=np.int64(padding))


def conv_aval(x, kernel, keep, *, dilation, padding):
    out = conv_primitives.conv_aval(x, kernel, dilation=dilation, padding=padding, gather_taps=True)
    if keep.shape != out.shape[:4]:
        raise ValueError(f"conv3d_where: keep has shape {keep.shape}, the output {out.shape[:4]}")
    return out


def _conv_jvp(primals, tangents, *, dilation, padding):
    x, kernel, keep = primals
    dx, dkernel = map(ad.instantiate_zeros, tangents[:2])
    out = conv3d_where_p.bind(x, kernel, keep, dilation=dilation, padding=padding)
    tangent = jax.jvp(lambda a, b: _conv_reference(a, b, keep, dilation=dilation, padding=padding),
                      (x, kernel), (dx, dkernel))[1]
    return out, tangent


def _conv_batch(args, dims, **params):
    x, kernel, keep = args
    if dims[1] is not NOT_MAPPED:  # vmapped kernels: one call per example
        return map_examples(lambda *operands: conv3d_where_p.bind(*operands, **params), args, dims)
    (x, keep), size = _folded((x, keep), (dims[0], dims[2]))
    out = conv3d_where_p.bind(x, kernel, keep, **params)
    return out.reshape(size, -1, *out.shape[1:]), 0


def _primitive(name: str, aval, on_cpu, reference, jvp, batch) -> Primitive:
    primitive = Primitive(name)
    primitive.def_abstract_eval(aval)
    register_primitive(primitive, on_cpu, reference)
    ad.primitive_jvps[primitive] = jvp
    batching.primitive_batchers[primitive] = batch
    return primitive


conv3d_where_p = _primitive("jaxcascade_conv3d_where", conv_aval, _conv_on_cpu, _conv_reference, _conv_jvp,
                            _conv_batch)


def conv3d_where(x: jax.Array, kernel: jax.Array, keep: jax.Array, *, dilation: int = 1,
                 padding: int = 0) -> jax.Array:
    """where(keep, conv3d(x, kernel), 0): keep is a bool (N, D', H', W') over the output's positions."""
    return conv3d_where_p.bind(x, kernel, jnp.asarray(keep, bool), dilation=int(dilation), padding=int(padding))


# --- the dense head ------------------------------------------------------------------------------------------


def _head_reference(x, w1, b1, w2, b2, keep):
    logits = cpu_kernel.head_reference(x, w1, b1, w2, b2)
    return jnp.where(keep[..., None], logits, jnp.zeros((), logits.dtype))


def _head_on_cpu(x, w1, b1, w2, b2, keep):
    *rows, channels = x.shape
    if not (cpu_kernel.runs_here() and x.dtype == jnp.float32 and cpu_kernel.head_supported(channels, *w2.shape)):
        return _head_reference(x, w1, b1, w2, b2, keep)
    flat = x.reshape(-1, channels)
    out = jax.ShapeDtypeStruct((flat.shape[0], w2.shape[1]), jnp.float32)
    logits = jax.ffi.ffi_call(HEAD_WHERE_TARGET, out)(flat, w1, b1, w2.T, b2, keep.reshape(-1))
    return logits.reshape(*rows, w2.shape[1])


def _head_aval(x, w1, b1, w2, b2, keep):
    if keep.shape != x.shape[:-1]:
        raise ValueError(f"dense_head_where: keep has shape {keep.shape}, the rows {x.shape[:-1]}")
    return jax.core.ShapedArray((*x.shape[:-1], w2.shape[1]), x.dtype)


def _head_jvp(primals, tangents):
    *arrays, keep = primals
    tangents = tuple(map(ad.instantiate_zeros, tangents[:-1]))
    return (dense_head_where_p.bind(*primals),
            jax.jvp(lambda *values: _head_reference(*values, keep), tuple(arrays), tangents)[1])


def _head_batch(args, dims):
    (x, *weights, keep), (x_dim, *weight_dims, keep_dim) = args, dims
    if any(dim is not NOT_MAPPED for dim in weight_dims):  # vmapped weights: one call per example
        return map_examples(dense_head_where_p.bind, args, dims)
    # Every leading axis is a row, so the vmapped one becomes the first row axis (x may be one row: no folding).
    (x, keep), _ = _leading((x, keep), (x_dim, keep_dim))
    return dense_head_where_p.bind(x, *weights, keep), 0


dense_head_where_p = _primitive("jaxcascade_dense_head_where", _head_aval, _head_on_cpu, _head_reference, _head_jvp,
                                _head_batch)


def dense_head_where(x: jax.Array, w1: jax.Array, b1: jax.Array, w2: jax.Array, b2: jax.Array,
                     keep: jax.Array) -> jax.Array:
    """where(keep, relu(x @ w1 + b1) @ w2 + b2, 0) over x's last axis; keep is bool, x's shape but the last axis."""
    return dense_head_where_p.bind(x, w1, b1, jnp.asarray(w2), b2, jnp.asarray(keep, bool))
