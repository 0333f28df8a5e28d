"""Kept outputs (kept_outputs.py): the convolution and the dense head computed only where a mask keeps them
are the unmasked results there, bit for bit, and 0 elsewhere, for every mask; the dense form restricted to
its candidates skips nothing they read; every JAX transformation still applies."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import example, given, settings, strategies as st
from hypothesis.extra.numpy import arrays

from jaxcascade.configs import default
from jaxcascade.networks import models
from jaxcascade.ops import conv_primitives, cpu_kernel, kept_outputs


def _random(shape, seed):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape).astype(np.float32))


# (x shape, output channels, dilation, padding): the dense form's conv2 (dilation 2, 64 channels; rows of 9
# outputs: Winograd tiles, cut by the output's end), the same with rows of 7 (the direct form), and a padded one
# whose edge outputs read zeros.
CASES = {"dilated": ((2, 9, 8, 13, 32), 64, 2, 0), "short rows": ((2, 9, 8, 11, 32), 64, 2, 0),
         "padded": ((1, 5, 4, 11, 8), 32, 1, 1)}


@functools.lru_cache(maxsize=None)
def _case(name):
    shape, channels, dilation, padding = CASES[name]
    x, kernel = _random(shape, 1), _random((3, 3, 3, shape[-1], channels), 2)
    masked = jax.jit(functools.partial(kept_outputs.conv3d_where, dilation=dilation, padding=padding))
    full = jax.jit(functools.partial(conv_primitives.conv3d, dilation=dilation, padding=padding))
    return x, kernel, masked, np.asarray(full(x, kernel))


def _output_shape(name):
    shape, _, dilation, padding = CASES[name]
    return (shape[0], *(size - 2 * dilation + 2 * padding for size in shape[1:4]))


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(sorted(CASES)), st.data())
def test_a_masked_convolution_is_the_convolution_where_kept_and_zero_elsewhere(name, data):
    # Any pattern of kept outputs: runs shorter and longer than the kernel's register block, isolated
    # outputs at a row's ends, empty and full rows.
    keep = data.draw(arrays(np.bool_, _output_shape(name)), label="keep")
    assert cpu_kernel.available()
    x, kernel, masked, full = _case(name)
    np.testing.assert_array_equal(np.asarray(masked(x, kernel, keep)), np.where(keep[..., None], full, 0))


@pytest.fixture(scope="module")
def head():
    x = _random((3, 37, 64), 3)  # rows not a multiple of the kernel's 4-voxel blocks
    weights = (_random((64, 256), 4) * 0.1, _random((256,), 5), _random((256, 2), 6) * 0.1, _random((2,), 7))
    full = np.asarray(jax.jit(cpu_kernel.dense_head)(x, *weights))
    return x, weights, jax.jit(kept_outputs.dense_head_where), full


@settings(max_examples=40, deadline=None)
@example(keep=np.zeros((3, 37), bool))
@example(keep=np.ones((3, 37), bool))
@given(keep=arrays(np.bool_, (3, 37)))
def test_a_masked_head_is_the_head_where_kept_and_zero_elsewhere(head, keep):
    x, weights, masked, full = head
    np.testing.assert_array_equal(np.asarray(masked(x, *weights, keep)), np.where(keep[..., None], full, 0))


@pytest.fixture(scope="module")
def network():
    config = default.get_config()
    graphdef, variables = models.split_model(models.build_network(config.model, 2, 0))
    tiles = _random((2, 13, 13, 13, 2), 8)  # 4^3 output blocks (halo 9)

    def dense(variables, tiles, where=None):
        model = nnx.merge(graphdef, variables["params"], variables["batch_stats"])
        return model.dense(tiles, where=where)

    return variables, tiles, jax.jit(dense), np.asarray(jax.jit(dense)(variables, tiles))


@settings(max_examples=30, deadline=None)
@given(where=arrays(np.bool_, (2, 4, 4, 4)))
def test_the_dense_form_at_its_candidates_skips_nothing_they_read(network, where):
    # The class of mistakes: an output of conv1 or conv2 that a kept voxel reads left out (read_by_window).
    variables, tiles, dense, full = network
    got = np.asarray(dense(variables, tiles, where))
    np.testing.assert_array_equal(got, np.where(where[..., None], full, 0))


def test_without_the_kernels_the_dense_form_masks_its_logits(network, monkeypatch):
    variables, tiles, _, full = network
    monkeypatch.setenv(cpu_kernel.KERNEL_ENV, "0")
    graphdef = nnx.graphdef(models.build_network(default.get_config().model, 2, 0))
    where = np.random.default_rng(9).random((2, 4, 4, 4)) < 0.3
    run = jax.jit(lambda v, t, w: nnx.merge(graphdef, v["params"], v["batch_stats"]).dense(t, where=w))
    text = run.lower(variables, tiles, where).as_text()
    assert "jaxcascade_" not in text  # the GEMM formulations, then jnp.where
    np.testing.assert_allclose(np.asarray(run(variables, tiles, where)), np.where(where[..., None], full, 0),
                               rtol=1e-5, atol=1e-5)


def test_masked_primitives_differentiate_and_vmap_like_their_reference():
    x, kernel = _random((2, 7, 6, 8, 16), 10), _random((3, 3, 3, 16, 32), 11) * 0.2
    keep = np.random.default_rng(12).random((2, 3, 2, 4)) < 0.5

    def reference(x, kernel, keep):
        y = jax.lax.conv_general_dilated(x, kernel, (1, 1, 1), "VALID", rhs_dilation=(2, 2, 2),
                                         dimension_numbers=("NDHWC", "DHWIO", "NDHWC"),
                                         precision=jax.lax.Precision.HIGHEST)
        return jnp.where(keep[..., None], y, 0)

    def masked(x, kernel, keep):
        return kept_outputs.conv3d_where(x, kernel, keep, dilation=2)

    def loss(conv):
        return lambda x, kernel: jnp.sum(jnp.sin(conv(x, kernel, keep)))

    for got, want in zip(jax.jit(jax.grad(loss(masked), (0, 1)))(x, kernel), jax.grad(loss(reference), (0, 1))(x, kernel)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    tangent = jax.jvp(lambda k: masked(x, k, keep), (kernel,), (jnp.cos(kernel),))[1]
    np.testing.assert_allclose(tangent, jax.jvp(lambda k: reference(x, k, keep), (kernel,), (jnp.cos(kernel),))[1],
                               rtol=1e-4, atol=1e-4)
    # vmap over examples and masks (shared kernel: one call), and over kernels (one call per kernel).
    stacked_x, stacked_keep = jnp.stack([x, -x]), np.stack([keep, ~keep])
    by_example = jax.jit(jax.vmap(masked, (0, None, 0)))
    assert by_example.lower(stacked_x, kernel, stacked_keep).as_text().count(f"@{cpu_kernel.WHERE_TARGET}(") == 1
    np.testing.assert_allclose(by_example(stacked_x, kernel, stacked_keep),
                               jnp.stack([reference(x, kernel, keep), reference(-x, kernel, ~keep)]), rtol=1e-5, atol=1e-5)
    by_kernel = jax.vmap(masked, (None, 0, None))(x, jnp.stack([kernel, 2 * kernel]), keep)
    np.testing.assert_allclose(by_kernel[1], reference(x, 2 * kernel, keep), rtol=1e-5, atol=1e-5)
    # The head: gradient with respect to its input and weights, and vmap over rows.
    rows, weights = _random((5, 9, 64), 13), (_random((64, 128), 14) * 0.1, _random((128,), 15),
                                              _random((128, 2), 16), _random((2,), 17))
    kept = np.random.default_rng(18).random((5, 9)) < 0.5

    def head_reference(x, w1, b1, w2, b2, keep):
        return jnp.where(keep[..., None], cpu_kernel.head_reference(x, w1, b1, w2, b2), 0)

    def head_loss(function):
        return lambda *arrays: jnp.sum(jnp.tanh(function(*arrays, kept)))

    got = jax.jit(jax.grad(head_loss(kept_outputs.dense_head_where), tuple(range(5))))(rows, *weights)
    want = jax.grad(head_loss(head_reference), tuple(range(5)))(rows, *weights)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4)
    vmapped = jax.vmap(kept_outputs.dense_head_where, (1, None, None, None, None, 1), 1)(rows, *weights, kept)
    np.testing.assert_allclose(vmapped, head_reference(rows, *weights, kept), rtol=1e-5, atol=1e-5)
    # vmap down to single rows (x of shape (64,), keep a scalar), and over masks alone with one shared row.
    one_row = jax.vmap(jax.vmap(kept_outputs.dense_head_where, (0, None, None, None, None, 0)),
                       (0, None, None, None, None, 0))(rows, *weights, kept)
    np.testing.assert_allclose(one_row, head_reference(rows, *weights, kept), rtol=1e-5, atol=1e-5)
    masks_only = jax.vmap(kept_outputs.dense_head_where, (None, None, None, None, None, 0))(rows[0, 0], *weights,
                                                                                              kept[:, 0])
    np.testing.assert_allclose(masks_only, head_reference(jnp.broadcast_to(rows[0, 0], (5, 64)), *weights,
                                                          kept[:, 0]), rtol=1e-5, atol=1e-5)
