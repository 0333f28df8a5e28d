"""`InferenceOptions`: how the cascade runs (thresholds, method, call sizes).

Its own module, below the inference methods (`inference.py`, `dense.py`) that all take it, so that none
of them has to import another to name it.
"""

from __future__ import annotations

import dataclasses

import jax


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
