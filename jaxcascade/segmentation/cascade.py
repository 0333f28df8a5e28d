"""The two-stage cascade: `Cascade` (a model directory's two stages) and `segment_volume`.

Arrays in, arrays out; no file writing. A `Stage` (stage.py) is one trained
patch classifier: its graph definition, variables, patch size and dense halo.
Build one from a network in memory (`Stage.from_network(model, variables)`); a cascade from a model
directory read once (`Cascade.from_model(storage.model_directory.open_model(path))`, which `Cascade.load` does).
`segment_volume` chains two stages the way the seed code does; each stage
runs through an inference method (`inference.py`), both chosen before either runs.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable

import numpy as np

from jaxcascade.segmentation import inference, postprocess
from jaxcascade.storage import model_directory
from jaxcascade.data import normalisation
from jaxcascade.data.normalisation import candidate_mask
from jaxcascade.networks import models
from jaxcascade.runtime import distributed
from jaxcascade.segmentation.options import InferenceOptions
from jaxcascade.segmentation.stage import Stage
from jaxcascade.errors import UserError


@dataclasses.dataclass
class Cascade:
    """A trained cascade: the model's config (channels, thresholds) and its two stages."""

    config: object
    stage1: Stage
    stage2: Stage
    voxel_size_mm: tuple | None = None  # of its training data's FLAIR; None: unknown (never resample)
    modalities: tuple[str, ...] = dataclasses.field(init=False)  # its input channels, in order
    flair_channel: int = dataclasses.field(init=False)  # the FLAIR's index among them

    def __post_init__(self):
        self.modalities = tuple(self.config.data.modalities)
        self.flair_channel = self.modalities.index(self.config.data.flair)

    @classmethod
    def load(cls, model_dir, *, compute_dtype: str | None = None) -> "Cascade":
        """The cascade of a trained (or imported) model directory, computing in compute_dtype if given."""
        return cls.from_model(model_directory.open_model(model_dir), compute_dtype=compute_dtype)

    @classmethod
    def from_model(cls, model: model_directory.Model, *, compute_dtype: str | None = None) -> "Cascade":
        """The cascade of a model directory already read (`storage.model_directory.open_model`)."""
        config = model.config.copy_and_resolve_references()
        if compute_dtype is not None:
            config.compute_dtype = compute_dtype
        # Before any subject: a model that needs N4 fails once here, not once per subject of a study.
        normalisation.check_settings(config)
        placed = distributed.put_local_replicated(model.stage_weights)  # both stages' weights, copied once
        network = models.abstract_network(config)  # both stages' structure, traced once
        return cls(config, *(Stage.from_weights(config, placed[stage], network=network) for stage in (1, 2)),
                   model.voxel_size_mm)


@dataclasses.dataclass
class Segmentation:
    stage1_probability: np.ndarray
    stage2_probability: np.ndarray
    mask: np.ndarray
    candidate_count: int
    stage2_candidate_count: int
    stage2_std: np.ndarray | None = None  # with test-time augmentation: CNN2's spread over the flips
    # Wall seconds per phase ('stage1', 'stage2', 'postprocess'; callers add theirs), for reports and benchmarks.
    seconds: dict = dataclasses.field(default_factory=dict)
    thick_slices: bool = False  # made with the model's thick-slice decision settings (SegmentOptions.thick)


# Test-time augmentation: every combination of flips of the three axes (the identity first).
FLIPS = tuple(tuple(axis for axis in range(3) if code >> axis & 1) for code in range(8))


def classify_flipped(classify: Callable, stage: Stage, volume: np.ndarray, mask: np.ndarray,
                     options: InferenceOptions, progress: Callable | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation over FLIPS of the stage's probability on mask (0 elsewhere), each flip
    through `classify` (an inference method's classifier, `inference.classifier`).

    Each flip classifies the flipped volume and is flipped back, so every voxel is averaged over eight
    views of its neighbourhood; the networks are not flip-invariant, which is what makes the views differ.
    """
    views = []
    for axes in FLIPS:
        flipped = np.flip(volume, axes) if axes else volume
        probability = classify(stage, np.ascontiguousarray(flipped), np.flip(mask, axes) if axes else mask,
                               options, progress)
        views.append(np.flip(probability, axes) if axes else probability)
    stack = np.stack(views)
    return stack.mean(axis=0) * mask, stack.std(axis=0) * mask


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
    entirely below min_volume_ml, nicMSlesions' rule; 0 disables it). With
    options.tta both stages average their probabilities over the eight axis flips.
    """
    clock = PhaseClock()
    # Both methods resolved first: a method a stage cannot run is refused before any computing.
    classify1, classify2 = inference.classifier(stage1, options.method), inference.classifier(stage2, options.method)
    candidates = candidate_mask(volume[..., flair_channel], options.min_th)
    if not candidates.any():
        raise UserError(
            f"no candidate voxels: normalised FLAIR is nowhere above min_th={options.min_th}; "
            "check that the FLAIR image is the right one or lower --config.candidates.min_th"
        )
    wrap = (lambda it: progress(it, "stage 1")) if progress else None
    stage2_std = None
    if options.tta:
        stage1_probability, _ = classify_flipped(classify1, stage1, volume, candidates, options, wrap)
    else:
        stage1_probability = classify1(stage1, volume, candidates, options, wrap)
    clock.lap("stage1")
    stage2_candidates = stage1_probability > options.stage2_min_probability
    wrap = (lambda it: progress(it, "stage 2")) if progress else None
    if options.tta:
        stage2_probability, stage2_std = classify_flipped(classify2, stage2, volume, stage2_candidates, options, wrap)
    else:
        stage2_probability = classify2(stage2, volume, stage2_candidates, options, wrap)
    clock.lap("stage2")
    mask = postprocess.binarise(stage2_probability, options.threshold)
    mask = postprocess.remove_small_lesions(mask, options.min_lesion_voxels, options.connectivity)
    mask = postprocess.apply_min_volume(mask, options.min_volume_ml, voxel_volume_ml)
    clock.lap("postprocess")
    return Segmentation(
        stage1_probability=stage1_probability,
        stage2_probability=stage2_probability,
        mask=mask,
        candidate_count=int(candidates.sum()),
        stage2_candidate_count=int(stage2_candidates.sum()),
        stage2_std=stage2_std,
        seconds=clock.seconds,
    )


class PhaseClock:
    """Wall seconds between laps, by phase name."""

    def __init__(self):
        self.seconds, self._last = {}, time.perf_counter()

    def lap(self, phase: str | None) -> None:
        """Charge the time since the previous lap to phase (None: to nobody, e.g. measured elsewhere)."""
        now = time.perf_counter()
        if phase is not None:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + now - self._last
        self._last = now
