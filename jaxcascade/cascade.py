"""The two-stage cascade: normalisation, candidates, batched voxel classification, segmentation.

Arrays in, arrays out; no file I/O. A `Stage` is one trained patch classifier
(its graph definition and variables); `segment_volume` chains two of them the
way the seed code does.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxcascade import distributed, postprocess
from jaxcascade import patches as patches_lib
from jaxcascade.errors import UserError
from jaxcascade.train import lesion_probability

NORMALISATIONS = ("nonzero", "nicms")


def normalise(image: np.ndarray, method: str = "nonzero") -> np.ndarray:
    """Standardise one image by the statistics of its nonzero voxels.

    'nonzero': (x - mean(nonzero)) / std(nonzero), the seed code's rule.
    'nicms': nicMSlesions subtracts the nonzero mean first and then divides by
    the std of the nonzero voxels of the *shifted* image, so background voxels
    (now at -mean) count in the std.
    """
    image = np.asarray(image, np.float32)
    nonzero = image[image != 0]
    if nonzero.size == 0:
        raise ValueError("image has no nonzero voxels")
    mean = nonzero.astype(np.float64).mean()
    if method == "nonzero":
        std = nonzero.astype(np.float64).std()
        out = (image - mean) / std
    elif method == "nicms":
        shifted = image - mean
        std = shifted[shifted != 0].astype(np.float64).std()
        out = shifted / std
    else:
        raise ValueError(f"unknown normalisation {method!r}; use one of {NORMALISATIONS}")
    return out.astype(np.float32)


def normalise_channels(channels: list[np.ndarray], method: str) -> np.ndarray:
    """Stack normalised images into a (D, H, W, C) float32 volume."""
    return np.stack([normalise(image, method) for image in channels], axis=-1)


def candidate_mask(flair_normalised: np.ndarray, min_th: float) -> np.ndarray:
    """Voxels worth classifying: normalised FLAIR above min_th."""
    return flair_normalised > min_th


INFERENCE_METHODS = ("auto", "dense", "patch")


@dataclasses.dataclass(frozen=True)
class Stage:
    """One trained patch classifier; dense_halo is None where it has no exact dense form."""

    graphdef: object
    variables: dict
    patch_size: int
    dense_halo: int | None = None

    @functools.cached_property
    def predict_at(self) -> Callable:
        return make_centre_predictor(self.graphdef, self.patch_size)


@functools.lru_cache(maxsize=None)
def make_centre_predictor(graphdef, patch_size: int) -> Callable:
    """jitted (variables, padded_volume, centres) -> probabilities; cached per graph."""

    def predict_at(variables, padded_volume, centres):
        index = jnp.concatenate([jnp.zeros((centres.shape[0], 1), jnp.int32), centres], axis=1)
        patches = patches_lib.gather_patches(padded_volume[None], index, patch_size)
        return lesion_probability(graphdef, variables, patches)

    return jax.jit(predict_at)


def classify_voxels(
    stage: Stage,
    volume: np.ndarray,
    mask: np.ndarray,
    *,
    batch_size: int,
    progress: Callable | None = None,
) -> np.ndarray:
    """Lesion probability at every voxel of `mask` (0 elsewhere), patch-wise.

    Centres go through one jitted function in fixed-size batches (the last one
    padded), so memory is bounded by batch_size patches and nothing recompiles;
    each batch is split over all devices. `progress`, if given, wraps the
    batch iterator (e.g. tqdm).
    """
    probability = np.zeros(mask.shape, np.float32)
    centres = np.argwhere(mask).astype(np.int32)
    if len(centres) == 0:
        return probability
    padded = distributed.put_local_replicated(patches_lib.pad_volume(volume, stage.patch_size))
    variables = distributed.put_local_replicated(stage.variables)
    values = distributed.map_batches(lambda chunk: stage.predict_at(variables, padded, chunk), centres,
                                     batch_size, progress)
    probability[tuple(centres.T)] = values
    return probability


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
    batch_size: int = 2048  # patches per call on the patch path
    tile_size: int = 12  # output block edge on the dense path
    tiles_per_batch: int = 16

    @classmethod
    def from_config(cls, config, **overrides) -> "InferenceOptions":
        inference = config.inference
        values = dict(
            min_th=config.candidates.min_th,
            stage2_min_probability=inference.stage2_min_probability,
            threshold=inference.threshold,
            min_lesion_voxels=inference.min_lesion_voxels,
            connectivity=inference.connectivity,
            min_volume_ml=inference.min_volume_ml,
            method=inference.method,
            batch_size=inference.batch_size,
            tile_size=inference.tile_size,
            tiles_per_batch=inference.tiles_per_batch,
        )
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


def resolve_method(stage: Stage, method: str) -> str:
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
    """Lesion probability on mask (0 elsewhere) by the dense kernel or patch by patch."""
    if resolve_method(stage, options.method) == "dense":
        from jaxcascade import dense

        return dense.classify_voxels_dense(
            stage.graphdef, stage.variables, volume, mask, halo=stage.dense_halo, patch_size=stage.patch_size,
            tile_size=options.tile_size, tiles_per_batch=options.tiles_per_batch, progress=progress,
        )
    return classify_voxels(stage, volume, mask, batch_size=options.batch_size, progress=progress)


@dataclasses.dataclass
class Segmentation:
    stage1_probability: np.ndarray
    stage2_probability: np.ndarray
    mask: np.ndarray
    candidate_count: int
    stage2_candidate_count: int


def segment_volume(
    stage1: Stage,
    stage2: Stage,
    volume: np.ndarray,
    flair_channel: int,
    options: InferenceOptions,
    *,
    voxel_volume_ml: float = 1e-3,
    progress: Callable | None = None,
) -> Segmentation:
    """Run the cascade on one normalised (D, H, W, C) volume.

    CNN1 classifies every candidate (normalised FLAIR > min_th); CNN2 classifies
    the voxels where CNN1 > stage2_min_probability; the mask is CNN2 >= threshold
    with connected components of at most min_lesion_voxels removed (and emptied
    entirely below min_volume_ml, nicMSlesions' rule; 0 disables it).
    """
    candidates = candidate_mask(volume[..., flair_channel], options.min_th)
    if not candidates.any():
        raise UserError(
            f"no candidate voxels: normalised FLAIR is nowhere above min_th={options.min_th}; "
            "check that the FLAIR image is the right one or lower --config.candidates.min_th"
        )
    wrap = (lambda it: progress(it, "stage 1")) if progress else None
    stage1_probability = classify(stage1, volume, candidates, options, wrap)
    stage2_candidates = stage1_probability > options.stage2_min_probability
    wrap = (lambda it: progress(it, "stage 2")) if progress else None
    stage2_probability = classify(stage2, volume, stage2_candidates, options, wrap)
    mask = postprocess.binarise(stage2_probability, options.threshold)
    mask = postprocess.remove_small_lesions(mask, options.min_lesion_voxels, options.connectivity)
    mask = postprocess.apply_min_volume(mask, options.min_volume_ml, voxel_volume_ml)
    return Segmentation(
        stage1_probability=stage1_probability,
        stage2_probability=stage2_probability,
        mask=mask,
        candidate_count=int(candidates.sum()),
        stage2_candidate_count=int(stage2_candidates.sum()),
    )
