"""Inference kernels: a stage's lesion probability at the voxels of a mask, all with one call signature.

A kernel is `kernel(stage, volume, mask, options, progress=None) -> probability`:
stage a `stage.Stage`, volume a normalised (D, H, W, C) array, mask a bool
(D, H, W) array, options `InferenceOptions`; it returns float32 (D, H, W),
0 outside the mask. `classify` picks one by `options.method`:
    'patch'  `classify_patchwise` below: one 11^3 patch per voxel, any network;
    'dense'  `dense.classify_dense`: the whole volume at once, exact, only for
             networks with a dense form (`stage.dense_halo` is not None);
    'auto'   dense where exact, else patch.
A new kernel is a function of that signature added to KERNELS.
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
from jaxcascade.segmentation.inference_options import InferenceOptions  # noqa: F401 (its home for callers)

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
    variables = distributed.put_local_replicated(stage.variables)
    values = distributed.map_batches(lambda chunk: predict_at(variables, padded, chunk), centres,
                                     options.batch_size, progress)
    probability[tuple(centres.T)] = values
    return probability


KERNELS: dict[str, Callable] = {"dense": dense.classify_dense, "patch": classify_patchwise}
INFERENCE_METHODS = ("auto", *KERNELS)


def resolve_method(stage: Stage, method: str) -> str:
    """The kernel `method` names for this stage ('auto' resolved); UserError where it cannot run."""
    if method not in INFERENCE_METHODS:
        raise UserError(f"--inference {method}: unknown method; use one of {', '.join(INFERENCE_METHODS)}")
    if method == "auto":
        return "dense" if stage.dense_halo is not None else "patch"
    if method == "dense" and stage.dense_halo is None:
        raise UserError(
            "--inference dense: this network has no exact dense form (SAME padding inside the patch or "
            "per-position parameters); use --inference patch or auto"
        )
    return method


def classify(stage: Stage, volume: np.ndarray, mask: np.ndarray, options: InferenceOptions,
             progress: Callable | None = None) -> np.ndarray:
    """Lesion probability on mask (0 elsewhere) by the kernel options.method resolves to."""
    return KERNELS[resolve_method(stage, options.method)](stage, volume, mask, options, progress)
