"""The training state and the pure, jitted steps: `train_step(state, batch, rng)`, `eval_step(variables, batch)`.

Everything here is a function of arrays. The NNX module is split once into a
static graph definition and pure-dict variables (`models.split_model`), so the
state is a plain pytree that jit, orbax and sharding all understand; it
carries its optimiser (`optimizer.make_optimizer`) as static data. The epoch
loop that calls these steps is `train_loop.py`; the augmentations they apply
are `augment` below (geometric) and `intensity_augmentation.augment_intensity`.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxcascade.training import intensity_augmentation
from jaxcascade.training.intensity_augmentation import IntensityAugmentation, augment_intensity

AUGMENTATIONS = ("none", "seed", "flips3d", "rot90")
# fold_in data of the step key's intensity-augmentation key. Not 0 or 1: with JAX's partitionable
# threefry (the default), split(k, 2)[i] == fold_in(k, i), so those are the geometric and dropout keys.
INTENSITY_STREAM = 2


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: dict
    batch_stats: dict
    opt_state: Any
    tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)

    @property
    def variables(self) -> dict:
        return {"params": self.params, "batch_stats": self.batch_stats}


def create_train_state(variables: dict, tx: optax.GradientTransformation) -> TrainState:
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=variables["params"],
        batch_stats=variables["batch_stats"],
        opt_state=tx.init(variables["params"]),
        tx=tx,
    )


def augment(patches: jax.Array, rng: jax.Array, kind: str) -> jax.Array:
    """Random flips/rotations of (B, p, p, p, C) patches; labels are unchanged by design."""
    if kind == "none":
        return patches
    if kind == "seed":
        # The seed flips a random half of each batch with one of three flips of
        # the last two spatial axes (height, width, or both).
        choose_rng, half_rng = jax.random.split(rng)
        flips = [
            lambda p: jnp.flip(p, axis=2),
            lambda p: jnp.flip(p, axis=3),
            lambda p: jnp.flip(p, axis=(2, 3)),
        ]
        flipped = jax.lax.switch(jax.random.randint(choose_rng, (), 0, 3), flips, patches)
        selected = jax.random.permutation(half_rng, patches.shape[0]) < patches.shape[0] // 2
        return jnp.where(selected[:, None, None, None, None], flipped, patches)
    if kind in ("flips3d", "rot90"):
        perm_rng, flip_rng = jax.random.split(rng)
        if kind == "rot90":
            # Axis permutations and flips together give every 90-degree rotation
            # (and reflection) of the cube, per sample.
            orders = [(0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0)]
            choice = jax.random.randint(perm_rng, (patches.shape[0],), 0, len(orders))
            permuted = [jnp.transpose(patches, (0, *(a + 1 for a in order), 4)) for order in orders]
            patches = jnp.select([choice[:, None, None, None, None] == i for i in range(len(orders))], permuted)
        flip = jax.random.bernoulli(flip_rng, 0.5, (3, patches.shape[0]))
        for axis in range(3):
            patches = jnp.where(flip[axis][:, None, None, None, None], jnp.flip(patches, axis=axis + 1), patches)
        return patches
    raise ValueError(f"unknown augmentation {kind!r}; use one of {AUGMENTATIONS}")


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


# One compilation per network and settings, shared by both stages and by every
# fit in a process (tests, experiment launchers).
@functools.lru_cache(maxsize=None)
def make_train_step(graphdef, augmentation: str, trainable: tuple[str, ...] = (),
                    per_sample_loss: Callable = cross_entropy,
                    intensity: IntensityAugmentation = intensity_augmentation.OFF):
    """A jitted `train_step(state, batch, rng) -> (state, measurements)`.

    batch = {'patches': (B, p, p, p, C) float32, 'labels': (B,) int32}. The rng
    is the run's key: the step's own key is fold_in(rng, state.step), so no
    key is threaded through the loop and a resumed run draws the same keys.
    `per_sample_loss(logits, labels)` gives the losses that are averaged over the batch.
    With `trainable` set, frozen modules also keep their BatchNorm statistics.
    `intensity` (off by default) randomises intensities after the geometric `augmentation`.
    """

    def train_step(state: TrainState, batch: dict, rng: jax.Array):
        step_rng = jax.random.fold_in(rng, state.step)
        augment_rng, dropout_rng = jax.random.split(step_rng)
        patches = augment(batch["patches"], augment_rng, augmentation)
        if intensity.enabled:
            # A key of its own beside the split, so the geometric and dropout
            # keys are those of a run without intensity augmentation.
            patches = augment_intensity(patches, jax.random.fold_in(step_rng, INTENSITY_STREAM), intensity)

        def loss_fn(params):
            model = nnx.merge(graphdef, params, state.batch_stats)
            logits = model(patches, train=True, rngs=nnx.Rngs(dropout=dropout_rng))
            batch_stats = nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))
            return per_sample_loss(logits, batch["labels"]).mean(), (logits, batch_stats)

        (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        if trainable:
            batch_stats = {name: stats if name in trainable else state.batch_stats[name]
                           for name, stats in batch_stats.items()}
        updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        measurements = {
            "loss": loss,
            "accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["labels"]),
            "grad_norm": optax.tree.norm(grads),
            "update_norm": optax.tree.norm(updates),
        }
        new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state)
        return new_state, measurements

    return jax.jit(train_step, donate_argnums=0)


@functools.lru_cache(maxsize=None)
def make_eval_step(graphdef):
    """A jitted `eval_step(variables, batch) -> sums` with batch['weights'] masking padded rows.

    Returns sums (loss, correct, count) so a dataset's metrics are summed over
    batches and divided once.
    """

    def eval_step(variables: dict, batch: dict):
        model = nnx.merge(graphdef, variables["params"], variables["batch_stats"])
        logits = model(batch["patches"], train=False)
        weights = batch["weights"]
        return {
            "loss": jnp.sum(cross_entropy(logits, batch["labels"]) * weights),
            "correct": jnp.sum((jnp.argmax(logits, -1) == batch["labels"]) * weights),
            "count": jnp.sum(weights),
        }

    return jax.jit(eval_step)
