"""Inference methods: a stage's lesion probability at the voxels of a mask, all with one call signature.

A method's classifier is `classify(stage, volume, mask, options, progress=None) -> probability`:
stage a `stage.Stage`, volume a normalised (D, H, W, C) array, mask a bool
(D, H, W) array, options `InferenceOptions`; it returns float32 (D, H, W),
0 outside the mask. `classifier(stage, method)` picks one by name (`options.METHODS`):
    'patch'  `classify_patchwise` below: one 11^3 patch per voxel, any network;
    'dense'  `dense.classify_dense`: the whole volume at once, exact, only for
             networks with a dense form (`stage.dense_halo` is not None);
    'auto'   dense where exact, else patch.
A new method is a function of that signature added to CLASSIFIERS (and its name to `options.METHODS`).
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Callable

import jax
import numpy as np
from flax import nnx

from jaxcascade.segmentation import dense
from jaxcascade.runtime import distributed
from jaxcascade.data import patches as patches_lib
from jaxcascade.errors import UserError
from jaxcascade.segmentation.options import METHODS, InferenceOptions

if TYPE_CHECKING:
    from jaxcascade.segmentation.stage import Stage


def lesion_probability(graphdef, variables: dict, patches: jax.Array) -> jax.Array:
    """(B,) lesion probability of (B, p, p, p, C) patches, in inference mode."""
    model = nnx.merge(graphdef, variables["params"], variables["batch_stats"])
    return jax.nn.softmax(model(patches, train=False), axis=-1)[:, 1]


@functools.lru_cache(maxsize=None)
def make_centre_predictor(graphdef, patch_size: int) -> Callable:
    """jitted (variables, padded_volume, centres) -> probabilities; cached per graph."""

    def predict_at(variables, padded_volume, centres):
        patches = patches_lib.gather_patches(padded_volume[None], patches_lib.with_subject_index(centres), patch_size)
        return lesion_probability(graphdef, variables, patches)

    return jax.jit(predict_at)


def classify_patchwise(stage: Stage, volume: np.ndarray, mask: np.ndarray, options: InferenceOptions,
                       progress: Callable | None = None) -> np.ndarray:
    """Lesion probability at every voxel of `mask` (0 elsewhere), patch by patch.

    Centres go through one jitted function in fixed-size batches of
    options.batch_size (the last one padded), so memory is bounded and nothing
    recompiles; each batch is split over all devices. `progress`, if given,
    wraps the batch iterator (e.g. tqdm).
    """
    probability = np.zeros(mask.shape, np.float32)
    centres = np.argwhere(mask).astype(np.int32)
    if len(centres) == 0:
        return probability
    predict_at = make_centre_predictor(stage.graphdef, stage.patch_size)
    half = stage.patch_size // 2
    padded = patches_lib.put_padded(volume, [(half, half)] * 3)
    values = distributed.map_batches(lambda chunk: predict_at(stage.variables, padded, chunk), centres,
                                     options.batch_size, progress)
    probability[tuple(centres.T)] = values
    return probability


CLASSIFIERS: dict[str, Callable] = {"dense": dense.classify_dense, "patch": classify_patchwise}
assert set(METHODS) == {"auto", *CLASSIFIERS}


def resolve_method(stage: Stage, method: str) -> str:
    """The method `method` names for this stage ('auto' resolved); UserError where it cannot run."""
    if method not in METHODS:
        raise UserError(f"method={method!r}: unknown method; use one of {', '.join(map(repr, METHODS))}")
    if method == "auto":
        return "dense" if stage.dense_halo is not None else "patch"
    if method == "dense" and stage.dense_halo is None:
        raise UserError(
            "method='dense': this network has no exact dense form (SAME padding inside the patch or "
            "per-position parameters); use method='patch' or method='auto'"
        )
    return method


def classifier(stage: Stage, method: str) -> Callable:
    """The classifier of the method `method` resolves to for this stage (UserError where it cannot run)."""
    return CLASSIFIERS[resolve_method(stage, method)]


def classify(stage: Stage, volume: np.ndarray, mask: np.ndarray, options: InferenceOptions,
             progress: Callable | None = None) -> np.ndarray:
    """Lesion probability on mask (0 elsewhere) by the method options.method resolves to."""
    return classifier(stage, options.method)(stage, volume, mask, options, progress)
