"""nicMSlesions' convolutional stack, patch by patch, as one JAX primitive (kernels/nicms_features.cc on CPU).

nicMSlesions' network (networks/nicms.py) runs patch-wise only: SAME padding and a PReLU slope per
position leave it no dense form. Layer by layer, each of its four convolutions writes a batch's
activations (13^3 x 32 floats a patch) to memory for XLA's batch-norm, PReLU, pad and pool passes to read
back. The C++ kernel takes one patch at a time through all four layers in a thread's cache, and computes
only the convolution outputs the 'valid' pools read (10^3 of 11^3, 4^3 of 5^3: a quarter fewer
multiply-adds). Its inference layers are given as a kernel, a per-channel scale and shift (the
convolution's bias and the batch norm with its running statistics) and per-position slopes.

`features` is a primitive: the kernel where it is lowered for a CPU with jaxcascade's kernels on, the same
layers in jnp elsewhere (GPU, TPU, kernels off); derivatives in jnp and batching folded into the patches,
so grad, vmap and jit compose (tests/test_patch_features.py). Its results differ from the layer-by-layer
network by float32 rounding (the batch norm is one multiply-add here).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.extend.core import Primitive
from jax.interpreters import ad, batching

from jaxcascade.ops import convs, cpu_kernel
from jaxcascade.ops.kernel_build import NICMS_TARGET
from jaxcascade.ops.pooling import max_pool_2x2x2

WIDTHS = (32, 32, 64, 64)  # output channels of the four convolutions
POOLED_AFTER = (1, 3)  # a 2^3 max-pool follows these layers


def supported(patch_shape, layers) -> bool:
    """Whether the kernel runs this stack: float32 (N, P, P, P, C) patches with P // 4 >= 1 and the layers'
    shapes of nicMSlesions' network (3^3 kernels, 32, 32, 64, 64 channels)."""
    if len(patch_shape) != 5 or len(layers) != 4 or patch_shape[1] // 4 < 1:
        return False
    size, channels = patch_shape[1], patch_shape[-1]
    if patch_shape[2:4] != (size, size):
        return False
    for index, (kernel, scale, shift, slope) in enumerate(layers):
        out = WIDTHS[index]
        if tuple(kernel.shape) != (3, 3, 3, channels, out) or scale.shape != (out,) or shift.shape != (out,):
            return False
        if tuple(slope.shape) != (size, size, size, out):
            return False
        channels, size = out, size // 2 if index in POOLED_AFTER else size
    return True


def reference(patches, *flat):
    """The stack in jnp (convs.conv3d, so the C++ convolutions where they are on): the kernel's result up
    to float32 rounding, and its derivatives."""
    x = patches
    for index in range(4):
        kernel, scale, shift, slope = flat[4 * index: 4 * index + 4]
        x = convs.conv3d(x, kernel, padding="SAME") * scale + shift
        x = jnp.maximum(x, 0) + slope * jnp.minimum(x, 0)
        if index in POOLED_AFTER:
            x = max_pool_2x2x2(x)
    return x


def _layers(flat):
    return [flat[4 * i: 4 * i + 4] for i in range(4)]


def _on_cpu(patches, *flat):
    if not (cpu_kernel.runs_here() and patches.dtype == jnp.float32
            and all(a.dtype == jnp.float32 for a in flat) and supported(patches.shape, _layers(flat))):
        return reference(patches, *flat)
    out = jax.ShapeDtypeStruct(_shape(patches.shape), jnp.float32)
    return jax.ffi.ffi_call(NICMS_TARGET, out)(patches, *flat)


def _shape(patch_shape) -> tuple[int, ...]:
    pooled = patch_shape[1] // 4
    return (patch_shape[0], pooled, pooled, pooled, WIDTHS[-1])


features_p = Primitive("jaxcascade_nicms_features")
features_p.def_abstract_eval(lambda patches, *flat: jax.core.ShapedArray(_shape(patches.shape), patches.dtype))
cpu_kernel.register_primitive(features_p, _on_cpu, reference)


def _jvp(primals, tangents):
    # The primal from the kernel; the tangent in jnp (linear in the tangents: transposable to any order).
    tangents = tuple(map(ad.instantiate_zeros, tangents))
    return features_p.bind(*primals), jax.jvp(reference, primals, tangents)[1]


def _batch(args, dims):
    (patches, *flat), axis = args, dims[0]
    if axis is not cpu_kernel.NOT_MAPPED and all(d is cpu_kernel.NOT_MAPPED for d in dims[1:]):
        patches = cpu_kernel.moved_axis(patches, axis, 0)  # the vmapped axis folded into the patches
        out = features_p.bind(patches.reshape(-1, *patches.shape[2:]), *flat)
        return out.reshape(patches.shape[0], patches.shape[1], *out.shape[1:]), 0
    return cpu_kernel.map_examples(features_p.bind, args, dims)


ad.primitive_jvps[features_p] = _jvp
batching.primitive_batchers[features_p] = _batch


def features(patches: jax.Array, layers) -> jax.Array:
    """(N, P, P, P, C) patches -> (N, P//4, P//4, P//4, 64): nicMSlesions' four convolutions, each followed by
    x * scale + shift and a per-position PReLU, with a 2^3 max-pool after the second and the fourth.

    layers: four (kernel (3, 3, 3, in, out), scale (out,), shift (out,), slopes (S, S, S, out)).
    """
    flat = [jnp.asarray(a) for layer in layers for a in layer]
    return features_p.bind(patches, *flat)
