"""Every random stream of a training run, derived from its one seed: one stream per purpose.

numpy's SeedSequence ignores trailing zeros: [7, 1] and [7, 1, 0] seed the
same stream. Keying streams by position alone therefore made some coincide
(the validation split of shard 0 and the shuffle of epoch 0, for instance).
Each stream is instead keyed [seed, tag, *keys], with a distinct non-zero tag
per purpose and a fixed number of keys for it, so no two can coincide.
"""

from __future__ import annotations

import numpy as np

# purpose -> (tag, the keys it is drawn for)
PURPOSES = {
    "init": (1, ("stage",)),  # a stage's initial weights
    "sampling": (2, ("stage", "subject")),  # which negatives a subject contributes
    "split": (3, ("stage", "shard")),  # training / validation split of a data shard
    "epoch": (4, ("stage", "epoch", "shard")),  # a shard's shuffle in one epoch
}


def stream(seed: int, purpose: str, **keys: int) -> np.random.Generator:
    """The generator for one purpose, e.g. stream(seed, 'epoch', stage=1, epoch=3, shard=0)."""
    tag, names = PURPOSES[purpose]
    if set(keys) != set(names):
        raise TypeError(f"stream {purpose!r} is keyed by {', '.join(names)}, got {', '.join(keys)}")
    return np.random.default_rng([seed, tag, *(keys[name] for name in names)])


def init_seed(seed: int, stage: int) -> int:
    """An integer seed for a stage's network initialisation."""
    return int(stream(seed, "init", stage=stage).integers(2**31 - 1))
