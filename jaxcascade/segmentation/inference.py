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

import dataclasses
import functools
from typing import TYPE_CHECKING, Callable

import jax
import numpy as np
from flax import nnx

from jaxcascade.segmentation import dense
from jaxcascade.runtime import distributed
from jaxcascade.data import patches as patches_lib
from jaxcascade.errors import UserError

if TYPE_CHECKING:
    from jaxcascade.segmentation.stage import Stage


@dataclasses.dataclass(frozen=True)
class InferenceOptions:
    """How to run the cascade (defaults: the seed's thresholds)."""

    min_th: float = 0.5
    stage2_min_probability: float = 0.8
    threshold: float = 0.8
    min_lesion_voxels: int = 20
    connectivity: int = 6
    min_volume_ml: float = 0.0
    method: str = "auto"  # 'dense' where exact, else 'patch'
    batch_size: int = 128  # patches per call on the patch path
    tile_size: int = 12  # output block edge on the dense path
    tiles_per_batch: int = 8
    tta: bool = False  # average both stages over the eight axis flips (cascade.classify_flipped)

    @classmethod
    def from_config(cls, config, platform: str | None = None, **overrides) -> "InferenceOptions":
        """Options from config.inference; call sizes for `platform` (default: JAX's backend)."""
        inference = config.inference
        values = dict(
            min_th=config.candidates.min_th,
            stage2_min_probability=inference.stage2_min_probability,
            threshold=inference.threshold,
            min_lesion_voxels=inference.min_lesion_voxels,
            connectivity=inference.connectivity,
            min_volume_ml=inference.min_volume_ml,
            method=inference.method,
            tta=inference.tta,
        )
        # Call sizes are tuned per platform: CPU caches want small calls, accelerators large ones.
        prefix = "" if (platform or jax.default_backend()) == "cpu" else "accelerator_"
        for name in ("batch_size", "tile_size", "tiles_per_batch"):
            values[name] = inference[prefix + name]
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


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
