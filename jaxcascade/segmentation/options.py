"""How a segmentation runs, built once at the entry (the command line, `jaxcascade.segment`, a study) as
frozen dataclasses and handed down; checked when built, so nothing below re-checks a setting.

- `SegmentOptions`: what a user may change about one subject's segmentation (threshold, smallest lesion,
  method, test-time augmentation, resampling); None keeps the model's own setting.
- `StudyOptions`: a study's, around a `SegmentOptions`.
- `InferenceOptions`: the cascade's settings resolved against a model's config (what `segment_volume` and
  the inference methods take).

Its own module, below everything that takes them, so that none has to import another to name them. Errors
name the parameter as a Python caller writes it (`method='dense'`); the command line says its flags.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import jax

from jaxcascade.data.resolution import RESAMPLE_MODES
from jaxcascade.errors import UserError

# The inference methods (`inference.METHODS`): 'auto' is dense where exact, else patch.
METHODS = ("auto", "dense", "patch")
# When a model's thick-slice settings apply: 'auto' by the FLAIR's thickest voxel edge, or always, or never.
THICK_SLICE_MODES = ("auto", "on", "off")


@dataclasses.dataclass(frozen=True)
class SegmentOptions:
    """One subject's segmentation settings; None keeps the model config's."""

    threshold: float | None = None  # t_bin on CNN2's probability
    min_lesion_voxels: int | None = None  # smaller connected components are removed
    min_lesion_volume_mm3: float | None = None  # the same in mm^3 (on the grid the cascade runs on)
    method: str | None = None  # one of METHODS
    tta: bool | None = None  # average both stages over the eight axis flips
    resample: str = "auto"  # one of RESAMPLE_MODES
    thick_slices: str = "auto"  # one of THICK_SLICE_MODES

    def __post_init__(self):
        # A setting outside its range is refused in one line before any work: a threshold of 1.5 would keep
        # no voxel and say nothing.
        if self.threshold is not None and not 0 <= self.threshold <= 1:
            raise UserError(f"threshold={self.threshold}: a probability, from 0 to 1")
        if self.min_lesion_voxels is not None and not self.min_lesion_voxels >= 0:
            raise UserError(f"min_lesion_voxels={self.min_lesion_voxels}: a number of voxels, 0 or more")
        if self.min_lesion_volume_mm3 is not None and not 0 <= self.min_lesion_volume_mm3 < float("inf"):
            raise UserError(f"min_lesion_volume_mm3={self.min_lesion_volume_mm3}: a volume in mm^3, 0 or more")
        if self.method is not None and self.method not in METHODS:
            raise UserError(f"method={self.method!r}: unknown method; use one of {', '.join(map(repr, METHODS))}")
        if self.resample not in RESAMPLE_MODES:
            raise UserError(f"resample={self.resample!r}: use one of {', '.join(map(repr, RESAMPLE_MODES))}")
        if self.thick_slices not in THICK_SLICE_MODES:
            raise UserError(f"thick_slices={self.thick_slices!r}: use one of "
                            f"{', '.join(map(repr, THICK_SLICE_MODES))}")

    def thick(self, config, flair_voxel_mm) -> bool:
        """Whether the model's thick-slice settings apply to a FLAIR of this voxel size (mm per axis)."""
        from_mm = float(config.inference.thick_slices.from_mm)
        if self.thick_slices == "auto":
            return from_mm > 0 and max(flair_voxel_mm) >= from_mm
        if self.thick_slices == "on" and not from_mm > 0:
            raise UserError("thick_slices='on': the model has no thick-slice settings (its config's "
                            "inference.thick_slices.from_mm is 0); use a model calibrated for thick slices")
        return self.thick_slices == "on"

    def inference(self, config, voxel_volume_ml: float, platform: str | None = None, *,
                  thick: bool = False) -> "InferenceOptions":
        """The cascade's settings for a model's config, on a grid of voxel_volume_ml (for min_lesion_volume_mm3);
        with thick, the config's thick-slice settings where this object sets none of its own."""
        min_lesion_voxels = self.min_lesion_voxels
        if self.min_lesion_volume_mm3 is not None:
            min_lesion_voxels = int(self.min_lesion_volume_mm3 // (voxel_volume_ml * 1000))
        return InferenceOptions.from_config(config, platform, thick=thick, threshold=self.threshold,
                                            method=self.method, min_lesion_voxels=min_lesion_voxels, tta=self.tta)


@dataclasses.dataclass(frozen=True)
class StudyOptions:
    """A study's settings: each subject's segmentation, what is written, which subjects, which share."""

    segment: SegmentOptions = SegmentOptions()
    probabilities: bool = False  # also write both stages' probability maps
    overwrite: bool = False  # redo subjects already finished
    compute_dtype: str | None = None  # 'float32' or 'bfloat16' products; the model's own if None
    bids_suffixes: Mapping[str, str] | None = None  # {modality: BIDS suffix}; the defaults if None
    bids_filters: Sequence = ()  # `data.bids_layout.parse_filters`' output
    participants: Sequence[str] | None = None  # labels to keep (01 or sub-01); all if None
    shard: tuple[int, int] = (0, 1)  # (i, n): this process segments subjects i, i + n, ...

    def __post_init__(self):
        index, count = self.shard
        if not 0 <= index < count:
            raise UserError(f"shard={self.shard}: expected (i, n) with 0 <= i < n")

    def identity(self) -> dict:
        """What each subject's result is made from, beside the model and its files (a report recording
        anything else is stale); keys that are not set are left out, so that older reports stay valid."""
        segment = self.segment
        made_of = dict(tta=segment.tta, resample=segment.resample, min_lesion_volume_mm3=segment.min_lesion_volume_mm3,
                       probabilities=bool(self.probabilities), compute_dtype=self.compute_dtype)
        made_of.update({key: value for key, value in (("threshold", segment.threshold), ("method", segment.method),
                                                      ("min_lesion_voxels", segment.min_lesion_voxels))
                        if value is not None})
        if segment.thick_slices != "auto":
            made_of["thick_slices"] = segment.thick_slices
        return made_of


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
    def from_config(cls, config, platform: str | None = None, *, thick: bool = False,
                    **overrides) -> "InferenceOptions":
        """Options from config.inference (its thick_slices' decision settings with thick); call sizes for
        `platform` (default: JAX's backend)."""
        inference = config.inference
        decisions = inference.thick_slices if thick else inference
        values = dict(
            min_th=config.candidates.min_th,
            stage2_min_probability=decisions.stage2_min_probability,
            threshold=decisions.threshold,
            min_lesion_voxels=decisions.min_lesion_voxels,
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
