"""nicMSlesions' convolutional stack as one kernel (ops/patch_features.py, kernels/nicms_features.cc).

Checked against numpy in float64 over the patch geometries the kernel handles, against the imported
network run layer by layer (the kernels off: the results before the fused kernel), and through every
JAX transformation. .ci/run runs this file again with the AVX2 variant; tests/kernel_driver.cc checks the
SSE and ARM ones.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxcascade.networks.nicms import NicMS
from jaxcascade.ops import cpu_kernel, patch_features
from jaxcascade.ops.kernel_build import NICMS_TARGET

pytestmark = pytest.mark.skipif(not cpu_kernel.runs_here(), reason="jaxcascade's CPU kernels are off here")


def random_layers(rng, size: int, channels: int):
    """Four layers of nicMSlesions' shapes with slopes of both signs and a scale and shift per channel."""
    layers = []
    for index, out in enumerate(patch_features.WIDTHS):
        kernel = rng.normal(size=(3, 3, 3, channels, out)) / np.sqrt(27 * channels)
        layers.append(tuple(a.astype(np.float32) for a in (
            kernel, rng.uniform(0.5, 1.5, out), rng.normal(size=out) * 0.1,
            rng.uniform(-0.5, 0.5, (size,) * 3 + (out,)))))
        channels, size = out, size // 2 if index in patch_features.POOLED_AFTER else size
    return layers


def numpy_stack(patches, layers):
    """The stack in float64: SAME convolutions as 27 shifted products, the per-position PReLU, 'valid' pools."""
    x = patches.astype(np.float64)
    for index, (kernel, scale, shift, slope) in enumerate(layers):
        size = x.shape[1]
        padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (1, 1), (0, 0)))
        y = sum(padded[:, a:a + size, b:b + size, c:c + size] @ kernel[a, b, c].astype(np.float64)
                for a in range(3) for b in range(3) for c in range(3))
        y = y * scale + shift
        x = np.where(y > 0, y, y * slope)
        if index in patch_features.POOLED_AFTER:
            half = size // 2
            x = x[:, :2 * half, :2 * half, :2 * half].reshape(
                x.shape[0], half, 2, half, 2, half, 2, x.shape[-1]).max(axis=(2, 4, 6))
    return x


@settings(max_examples=6, deadline=None)
@given(size=st.integers(4, 13), channels=st.integers(1, 4), count=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_every_patch_geometry_matches_float64(size, channels, count, seed):
    # Odd and even sizes: the outputs the pools drop (size odd), a pool of one (size 4..7), any channel count.
    rng = np.random.default_rng(seed)
    layers = random_layers(rng, size, channels)
    patches = rng.normal(size=(count, size, size, size, channels)).astype(np.float32)
    got = np.asarray(patch_features.features(patches, layers))
    want = numpy_stack(patches, layers)
    assert got.shape == want.shape == (count, size // 4, size // 4, size // 4, 64)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-5 * np.abs(want).max())


def _network(rng) -> NicMS:
    """nicMSlesions' network with every parameter and running statistic drawn (slopes of both signs)."""
    model = NicMS(2, rngs=nnx.Rngs(0))
    state = nnx.state(model)
    state = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape).astype(np.float32) * 0.3), state)
    nnx.update(model, state)
    for bn in (model.bn_1_1, model.bn_1_2, model.bn_2_1, model.bn_2_2):
        bn.var[...] = jnp.abs(bn.var[...]) + 0.5
    model.eval()
    return model


def test_the_network_at_inference_runs_the_kernel_and_gives_the_layer_by_layer_result(monkeypatch):
    rng = np.random.default_rng(1)
    model = _network(rng)
    patches = jnp.asarray(rng.normal(size=(9, 11, 11, 11, 2)).astype(np.float32))
    forward = nnx.jit(lambda m, x: m(x))
    assert NICMS_TARGET in jax.jit(lambda x: model(x)).lower(patches).as_text()
    fused = np.asarray(forward(model, patches))
    monkeypatch.setenv("JAXCASCADE_CPU_KERNEL", "0")  # read at every trace: the layers one by one, XLA's GEMMs
    layered_jit = jax.jit(lambda x: model(x))
    assert NICMS_TARGET not in layered_jit.lower(patches).as_text()
    layered = np.asarray(layered_jit(patches))
    np.testing.assert_allclose(fused, layered, rtol=1e-5, atol=1e-5 * np.abs(layered).max())


def test_every_transformation_composes_through_the_kernel():
    rng = np.random.default_rng(2)
    layers = random_layers(rng, 8, 2)
    flat = [jnp.asarray(a) for layer in layers for a in layer]
    patches = jnp.asarray(rng.normal(size=(3, 8, 8, 8, 2)).astype(np.float32))
    weights = jnp.asarray(rng.normal(size=(3, 2, 2, 2, 64)).astype(np.float32))

    def loss(function):
        return lambda x, slope: (function(x, *flat[:3], slope, *flat[4:]) * weights).sum()

    fused = jax.jit(jax.grad(loss(patch_features.features_p.bind), argnums=(0, 1)))(patches, flat[3])
    reference = jax.grad(loss(patch_features.reference), argnums=(0, 1))(patches, flat[3])
    for got, want in zip(fused, reference):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
    # vmap over patches folds into the kernel's batch; over a layer's slopes, one call per example.
    stacked = jnp.stack([patches, patches[::-1]])
    mapped = jax.vmap(lambda x: patch_features.features_p.bind(x, *flat))(stacked)
    np.testing.assert_array_equal(mapped[1], patch_features.features_p.bind(patches[::-1], *flat))
    slopes = jnp.stack([flat[3], -flat[3]])
    per_slope = jax.vmap(lambda s: patch_features.features_p.bind(patches, *flat[:3], s, *flat[4:]))(slopes)
    np.testing.assert_array_equal(per_slope[1], patch_features.features_p.bind(patches, *flat[:3], -flat[3],
                                                                                 *flat[4:]))
