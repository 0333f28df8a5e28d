import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcascade.ops import cpu_kernel
from jaxcascade.segmentation import inference
from jaxcascade.training import train_steps
from jaxcascade.configs import default
from conftest import train_setup


def _fixed_batch():
    rng = np.random.default_rng(0)
    labels = np.arange(64) % 2
    patches = rng.normal(size=(64, 11, 11, 11, 2)).astype(np.float32)
    patches[labels == 1, 3:8, 3:8, 3:8, 1] += 2.0  # a bright blob in the FLAIR channel
    return {"patches": jnp.asarray(patches), "labels": jnp.asarray(labels, jnp.int32)}


def _setup(augmentation="none"):
    graphdef, variables, tx, step = train_setup(augmentation=augmentation)
    return graphdef, train_steps.create_train_state(variables, tx), step


def test_one_train_step_lowers_the_loss_on_a_fixed_batch():
    graphdef, state, train_step = _setup()
    batch = _fixed_batch()
    eval_step = train_steps.make_eval_step(graphdef)
    weights = {"weights": jnp.ones(64)}
    before = float(eval_step(state.variables, {**batch, **weights})["loss"])
    state, measurements = train_step(state, batch, jax.random.key(0))
    after_train_mode = float(measurements["loss"])
    for step in range(1, 5):
        state, measurements = train_step(state, batch, jax.random.key(step))
    after = float(eval_step(state.variables, {**batch, **weights})["loss"])
    assert int(state.step) == 5
    assert np.isfinite(after_train_mode)
    assert float(measurements["loss"]) < after_train_mode
    assert after < before


def test_batch_statistics_update_in_train_mode_only():
    graphdef, state, train_step = _setup()
    mean_before = np.array(state.batch_stats["bn1"]["mean"])
    predict = jax.jit(lambda v, p: inference.lesion_probability(graphdef, v, p))
    probability = predict(state.variables, _fixed_batch()["patches"])
    assert probability.shape == (64,) and bool(((probability >= 0) & (probability <= 1)).all())
    state, _ = train_step(state, _fixed_batch(), jax.random.key(0))
    assert not np.allclose(np.asarray(state.batch_stats["bn1"]["mean"]), mean_before)


def test_same_key_same_step_different_key_different_dropout():
    _, state_a, train_step = _setup()
    _, state_b, _ = _setup()
    _, state_c, _ = _setup()
    batch = _fixed_batch()
    state_a, _ = train_step(state_a, batch, jax.random.key(1))
    state_b, _ = train_step(state_b, batch, jax.random.key(1))
    state_c, _ = train_step(state_c, batch, jax.random.key(2))
    a, b, c = (np.asarray(s.params["dense1"]["kernel"]) for s in (state_a, state_b, state_c))
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_augmentations_are_label_preserving_symmetries():
    patches = jax.random.normal(jax.random.key(0), (16, 5, 5, 5, 2))
    for kind in ("seed", "flips3d", "rot90"):
        out = train_steps.augment(patches, jax.random.key(3), kind)
        assert out.shape == patches.shape
        # Each sample is a permutation of its own voxels (centre voxel fixed).
        np.testing.assert_allclose(np.sort(out.reshape(16, -1), 1), np.sort(patches.reshape(16, -1), 1))
        np.testing.assert_array_equal(out[:, 2, 2, 2], patches[:, 2, 2, 2])
    seed = train_steps.augment(patches, jax.random.key(3), "seed")
    changed = np.any(np.asarray(seed != patches).reshape(16, -1), axis=1)
    assert changed.sum() == 8  # the seed flips exactly half of the batch
    np.testing.assert_array_equal(train_steps.augment(patches, jax.random.key(3), "none"), patches)


def _two_steps(implementation: str, batch) -> tuple[list, int]:
    """(parameters after two train steps, gathers in the lowered step) with config.model.conv_implementation."""
    config = default.get_config()
    config.model.conv_implementation = implementation
    _, variables, tx, step = train_setup(augmentation="seed", config=config)
    state = train_steps.create_train_state(variables, tx)
    gathers = step.lower(state, batch, jax.random.key(0)).as_text().count("gather")
    for i in range(2):
        state, _ = step(state, batch, jax.random.key(i))
    return jax.tree.leaves(state.params), gathers


def test_kernel_trained_weights_match_im2col():
    """'auto' trains with jaxcascade's CPU kernel (forward and both gradients): after two steps the weights
    equal XLA's im2col formulation's to float32 rounding."""
    batch = _fixed_batch()
    kernel, _ = _two_steps("auto", batch)
    im2col, _ = _two_steps("im2col", batch)
    for a, b in zip(kernel, im2col):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def test_gathered_conv1_trains_bit_for_bit_like_im2col(monkeypatch):
    """Without the CPU kernel (JAXCASCADE_CPU_KERNEL=0, or no compiler), 'auto' gathers conv1's taps in training
    (convs.conv3d): the weights after two steps equal im2col's exactly."""
    if jax.default_backend() != "cpu":
        pytest.skip("the GEMM formulations are chosen on CPU only (lax.conv elsewhere)")
    monkeypatch.setattr(cpu_kernel, "available", lambda: False)  # what the off switch makes it return
    batch = _fixed_batch()
    trained, gathers = {}, {}
    train_steps.make_train_step.cache_clear()  # steps traced with the kernel must not be reused here, nor these later
    try:
        for implementation in ("auto", "im2col"):
            trained[implementation], gathers[implementation] = _two_steps(implementation, batch)
    finally:
        train_steps.make_train_step.cache_clear()
    assert gathers["auto"] > gathers["im2col"]  # the step really gathers (in its CPU branch)
    for a, b in zip(trained["auto"], trained["im2col"]):
        assert np.array_equal(np.asarray(a), np.asarray(b))
