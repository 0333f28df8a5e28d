import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax import nnx

from jaxcascade.ops import convs
from jaxcascade.networks import layers, models
from conftest import model_config


def _shape_only(network, channels=2):
    return nnx.eval_shape(lambda: models.build_network(model_config(network), channels, 0))


DENSE_NETWORKS = [name for name in models.NETWORKS if _shape_only(name).dense_halo is not None]


@pytest.mark.parametrize("network", sorted(models.NETWORKS))
def test_every_registered_network_has_its_documented_parameter_count(network):
    assert models.count_parameters(_shape_only(network)) == models.NETWORKS[network].parameters


@pytest.mark.parametrize("network", DENSE_NETWORKS)
def test_dense_halo_follows_the_layers(network):
    """The halo is the receptive field - 1, and zeroing everything outside it leaves the output unchanged."""
    model = models.build_network(model_config(network), 1, 0)
    halo = model.dense_halo
    assert halo == layers.receptive_halo(model.windows) < model.patch_size
    x = jax.random.normal(jax.random.key(0), (1,) + (model.patch_size,) * 3 + (1,))
    # The receptive field starts at the patch's first voxel (the pools drop trailing planes).
    inside = jnp.zeros_like(x).at[:, : halo + 1, : halo + 1, : halo + 1].set(1)
    np.testing.assert_allclose(model(x * inside), model(x), atol=1e-6)


def test_parameter_counts_of_both_networks():
    # conv1 27*2*32+32, bn1 2*32, conv2 27*32*64+64, bn2 2*64, then the dense layers:
    # SAME keeps 11 -> pool 5 -> pool 2, flatten 2^3*64 = 512; VALID 11 -> 9 -> 4 -> 2 -> 1, flatten 64.
    shared = (27 * 2 * 32 + 32) + 64 + (27 * 32 * 64 + 64) + 128 + (256 * 2 + 2)
    same = models.build_network(model_config("valverde2017"), 2, 0)
    valid = models.build_network(model_config("valverde2017_valid"), 2, 0)
    assert models.count_parameters(same) == shared + 512 * 256 + 256 == 189154
    assert models.count_parameters(valid) == shared + 64 * 256 + 256 == 74466


@pytest.mark.parametrize("network", sorted(models.NETWORKS))
def test_networks_map_patches_to_two_logits(network):
    model = models.build_network(model_config(network), 3, 0)
    logits = model(jnp.ones((4, 11, 11, 11, 3)))
    assert logits.shape == (4, 2) and bool(jnp.isfinite(logits).all())


def test_valid_network_ignores_the_last_plane_but_not_the_centre():
    """Receptive field -5..+4: what the dense kernel will rely on."""
    model = models.build_network(model_config("valverde2017_valid"), 1, 0)
    x = jax.random.normal(jax.random.key(0), (1, 11, 11, 11, 1))
    base = model(x)
    assert np.allclose(model(x.at[:, 10].set(7.0)), base)  # last depth plane unseen
    assert not np.allclose(model(x.at[:, 5, 5, 5].set(7.0)), base)
    assert not np.allclose(model(x.at[:, 0, 0, 0].set(7.0)), base)


def test_initial_weights_depend_only_on_the_seed():
    a = models.build_network(model_config("valverde2017_valid"), 2, 5)
    b = models.build_network(model_config("valverde2017_valid"), 2, 5)
    c = models.build_network(model_config("valverde2017_valid"), 2, 6)
    assert np.array_equal(a.conv1.kernel[...], b.conv1.kernel[...])
    assert not np.array_equal(a.conv1.kernel[...], c.conv1.kernel[...])


@pytest.mark.parametrize("implementation", ["slices", "im2col", "gather", "auto"])
@pytest.mark.parametrize("padding", ["VALID", "SAME"])
@pytest.mark.parametrize("dilation", [1, 2])
def test_gemm_convolutions_equal_lax(implementation, padding, dilation):
    x = jax.random.normal(jax.random.key(0), (2, 10, 9, 11, 3))
    kernel = jax.random.normal(jax.random.key(1), (3, 3, 3, 3, 8))
    ref = convs.conv3d(x, kernel, padding=padding, dilation=dilation, implementation="lax")
    got = convs.conv3d(x, kernel, padding=padding, dilation=dilation, implementation=implementation)
    assert got.shape == ref.shape
    # float32 sums of 81 products of unit normals: reassociation error ~1e-5.
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=1e-4, rtol=1e-5)


def test_auto_picks_by_buffer_size_on_cpu():
    if jax.default_backend() != "cpu":
        pytest.skip("the GEMM formulations are chosen on CPU only")
    assert convs.default_implementation((128, 11, 11, 11, 2), (3, 3, 3, 2, 32)) == "im2col"
    assert convs.default_implementation((4, 40, 40, 40, 32), (3, 3, 3, 32, 64), dilation=2) == "slices"
    # nicMSlesions' 11^3 32-channel layer: the full tap buffer for few patches, the 9-tap one for more.
    assert convs.default_implementation((16, 13, 13, 13, 32), (3, 3, 3, 32, 32)) == "im2col"
    assert convs.default_implementation((128, 13, 13, 13, 32), (3, 3, 3, 32, 32)) == "slices"
    assert convs.default_implementation((128, 4, 4, 4, 32), (3, 3, 3, 32, 64)) == "im2col"
    # The SAME network's padded conv2 on a training batch: 5^3 outputs are too few for lax.conv.
    assert convs.default_implementation((128, 7, 7, 7, 32), (3, 3, 3, 32, 64)) == "im2col"
    # Where the caller allows it (no gradient wrt x, no fusible producer), the taps are gathered.
    assert convs.default_implementation((128, 7, 7, 7, 32), (3, 3, 3, 32, 64), gather_taps=True) == "gather"
    assert convs.default_implementation((8, 18, 18, 18, 32), (3, 3, 3, 32, 64), 2, gather_taps=True) == "gather"
    assert convs.default_implementation((4, 40, 40, 40, 32), (3, 3, 3, 32, 64), 2, gather_taps=True) == "slices"
    assert convs.default_implementation((8, 1, 1, 1, 64), (1, 1, 1, 64, 256), gather_taps=True) == "im2col"


@pytest.mark.parametrize("dilation", [1, 2])
def test_gathered_columns_equal_im2col_bit_for_bit(dilation):
    """The gather builds im2col's columns exactly: same products, same sums, identical outputs and gradients."""
    x = jax.random.normal(jax.random.key(2), (2, 12, 11, 13, 16))
    kernel = jax.random.normal(jax.random.key(3), (3, 3, 3, 16, 8))
    outputs = {i: jax.jit(lambda x, k, i=i: convs.conv3d(x, k, dilation=dilation, implementation=i))(x, kernel)
               for i in ("im2col", "gather")}
    assert np.array_equal(np.asarray(outputs["im2col"]), np.asarray(outputs["gather"]))
    grads = {i: jax.jit(jax.grad(lambda x, k, i=i: (convs.conv3d(x, k, dilation=dilation, implementation=i) ** 2).sum(),
                                 argnums=(0, 1)))(x, kernel) for i in ("im2col", "gather")}
    for a, b in zip(grads["im2col"], grads["gather"]):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-4)


def test_dense_pool_equals_one_2x2x2_window():
    x = jax.random.normal(jax.random.key(4), (2, 9, 8, 10, 3))
    for dilation in (1, 2):
        window = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 2, 1), (1,) * 5, "VALID",
                                       window_dilation=(1, dilation, dilation, dilation, 1))
        assert np.array_equal(np.asarray(layers.dense_max_pool(x, dilation)), np.asarray(window))


@pytest.mark.parametrize("shape", [(3, 9, 9, 9, 4), (2, 11, 10, 5, 3), (1, 2, 2, 2, 1)])
def test_reshape_max_pool_matches_reduce_window_values_and_gradients(shape):
    """The training pool (crop + reshape + max) against flax's reduce_window pool, odd sizes included."""
    from flax import nnx

    x = jnp.asarray(np.random.default_rng(0).normal(size=shape).astype(np.float32))
    reference = lambda v: nnx.max_pool(v, window_shape=(2, 2, 2), strides=(2, 2, 2), padding="VALID")  # noqa: E731
    np.testing.assert_array_equal(layers.max_pool_2x2x2(x), reference(x))
    weights = jnp.asarray(np.random.default_rng(1).normal(size=reference(x).shape).astype(np.float32))
    grad = jax.grad(lambda v: (layers.max_pool_2x2x2(v) * weights).sum())(x)
    grad_reference = jax.grad(lambda v: (reference(v) * weights).sum())(x)
    np.testing.assert_array_equal(grad, grad_reference)  # no ties in random data: the same subgradient
