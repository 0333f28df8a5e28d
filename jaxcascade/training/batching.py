"""Which subjects each process loads, and which rows each data shard puts in every batch.

Training subjects (sorted by folder name) are dealt round robin to S data
shards: subject i goes to shard i % S. S is `config.distributed.data_shards`,
or one shard per process when that is 0. Process p of P owns the contiguous
shards [p S/P, (p+1) S/P) and loads only their subjects, so no process holds
the whole training set.

A global batch of B rows is the concatenation, in shard order, of B/S rows of
each shard. The result of a run therefore depends on S, not on how many
processes or devices share the work: one process with `data_shards=4` trains
exactly what four hosts do (up to float summation order).

Within a shard: the training/validation split is stratified (stream 'split'
of `seeding`, keyed by stage and shard); every epoch the shard's training rows
are shuffled (stream 'epoch': stage, epoch, shard) and read in order, wrapping round when the
shard holds fewer rows than its part of the epoch and leaving the rest for
later epochs when it holds more. An epoch is floor(all training rows / B)
steps, at least one: with one shard, exactly one pass over the data.
Validation pads each shard's rows to a common number of batches with
zero-weight rows, so every validation row counts once.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import numpy as np

from jaxcascade.runtime import distributed, seeding
from jaxcascade.data import patches as patches_lib
from jaxcascade.errors import UserError


def shard_count(config) -> int:
    """S for this run: config.distributed.data_shards, or the number of processes."""
    shards = config.distributed.data_shards or jax.process_count()
    processes = jax.process_count()
    if shards < 1 or shards % processes:
        raise UserError(
            f"--config.distributed.data_shards={shards} must be a positive multiple of the {processes} processes"
        )
    return shards


@dataclasses.dataclass(frozen=True)
class Schedule:
    """This process's part of a stage's batches; the counts are global."""

    num_shards: int
    train_rows: dict[int, np.ndarray]  # shard -> rows (of the TrainingSet) for training
    validation_rows: dict[int, np.ndarray]
    steps: int  # optimiser steps per epoch
    validation_steps: int
    shard_batch: int  # rows per shard in one training batch (B / S)
    shard_validation_batch: int
    totals: dict  # training, validation and lesion rows over all shards

    def epoch(self, seed: int, stage: int, epoch: int) -> np.ndarray:
        """(steps, B/P) rows of this process's part of each training batch of the epoch."""
        parts = []
        for shard, rows in self.train_rows.items():
            order = seeding.stream(seed, "epoch", stage=stage, epoch=epoch, shard=shard).permutation(rows)
            parts.append(np.resize(order, self.steps * self.shard_batch).reshape(self.steps, self.shard_batch))
        return np.concatenate(parts, axis=1)

    def validation(self) -> tuple[np.ndarray, np.ndarray]:
        """(steps, E/P) rows and their weights (0 for padding) of this process's part of each validation batch."""
        size = self.validation_steps * self.shard_validation_batch
        rows, weights = [], []
        for shard_rows in self.validation_rows.values():
            rows.append(np.resize(shard_rows, size).reshape(self.validation_steps, -1))
            weight = np.zeros(size, np.float32)
            weight[: len(shard_rows)] = 1.0
            weights.append(weight.reshape(self.validation_steps, -1))
        return np.concatenate(rows, axis=1), np.concatenate(weights, axis=1)


def schedule(shard_rows: dict[int, np.ndarray], labels: np.ndarray, *, num_shards: int, seed: int, stage: int,
             validation_fraction: float, batch_size: int, validation_batch_size: int) -> Schedule:
    """Split each of this process's shards and agree with the other processes on the epoch's length.

    shard_rows maps each shard this process owns to its rows of `labels`.
    Collective: every process calls it with its own shards.
    """
    distributed.check_divisible(batch_size, "train.batch_size", num_shards)
    distributed.check_divisible(validation_batch_size, "train.eval_batch_size", num_shards)
    if sorted(shard_rows) != list(distributed.owned_shards(num_shards)):
        raise ValueError(f"process {jax.process_index()} holds shards {sorted(shard_rows)}, "
                         f"expected {list(distributed.owned_shards(num_shards))}")
    train_rows, validation_rows = {}, {}
    for shard, rows in shard_rows.items():
        rng = seeding.stream(seed, "split", stage=stage, shard=shard)
        train, validation = stratified_split(labels[rows], validation_fraction, rng)
        if len(validation) == 0:
            validation = train  # too few samples to hold any out; validate on training data
        train_rows[shard], validation_rows[shard] = rows[train], rows[validation]
    local_counts = [[len(train_rows[s]), len(validation_rows[s]), int(labels[shard_rows[s]].sum())]
                    for s in shard_rows]
    counts = distributed.allgather(np.array(local_counts, np.int64)).reshape(num_shards, 3)
    empty = [str(s) for s in range(num_shards) if counts[s, 2] == 0]
    if empty:
        raise UserError(
            f"stage {stage}: data shard {', '.join(empty)} of {num_shards} has no lesion voxels to train on; "
            "use fewer data shards (--config.distributed.data_shards) or spread the lesion subjects"
        )
    shard_batch = batch_size // num_shards
    shard_validation_batch = validation_batch_size // num_shards
    return Schedule(
        num_shards=num_shards,
        train_rows=train_rows,
        validation_rows=validation_rows,
        steps=max(1, int(counts[:, 0].sum()) // batch_size),
        validation_steps=int(max(-(-counts[:, 1] // shard_validation_batch))),
        shard_batch=shard_batch,
        shard_validation_batch=shard_validation_batch,
        totals={"training": int(counts[:, 0].sum()), "validation": int(counts[:, 1].sum()),
                "lesion": int(counts[:, 2].sum())},
    )


@dataclasses.dataclass
class TrainingSet:
    """This process's share of a stage's training patches: its subjects' volumes and the patch centres.

    Rows are grouped by data shard (see above); with one process and one
    shard (the default) this is the whole training set.
    """

    padded_volumes: jax.Array  # (local subjects, D + 2h, H + 2h, W + 2h, C), a copy on each of this process's devices
    index: np.ndarray  # (N, 4) int32: local subject, z, y, x
    labels: np.ndarray  # (N,) int32
    shard_rows: dict[int, np.ndarray]  # data shard -> its rows of index/labels
    num_shards: int
    patch_size: int

    @classmethod
    def from_subjects(cls, volumes: list[np.ndarray], centres: list[np.ndarray], labels: list[np.ndarray], patch_size,
                      *, subject_shards: list[int] | None = None, num_shards: int | None = None):
        """subject_shards[i] is volume i's data shard, of num_shards (default: one shard per process,
        every volume in this process's)."""
        num_shards = num_shards or jax.process_count()
        mine = distributed.owned_shards(num_shards)
        if subject_shards is None:
            subject_shards = [mine[0]] * len(volumes)
        shape = np.max([v.shape for v in volumes], axis=0)
        half = patch_size // 2
        stack = np.zeros((len(volumes), *(shape[:3] + 2 * half), shape[3]), np.float32)
        for s, volume in enumerate(volumes):
            d, h, w, _ = volume.shape
            stack[s, half : half + d, half : half + h, half : half + w] = volume
        index = np.concatenate(
            [np.column_stack([np.full(len(c), s, np.int32), c]) for s, c in enumerate(centres)]
        ).astype(np.int32).reshape(-1, 4)
        row_shard = np.concatenate([np.full(len(c), shard) for c, shard in zip(centres, subject_shards)])
        shard_rows = {shard: np.flatnonzero(row_shard == shard) for shard in mine}
        return cls(distributed.put_local_replicated(stack), index, np.concatenate(labels).astype(np.int32),
                   shard_rows, num_shards, patch_size)


@functools.lru_cache(maxsize=None)
def _local_gather(patch_size: int, mesh):
    # Each device gathers only its rows of the batch from its copy of the volumes.
    return jax.jit(functools.partial(patches_lib.gather_patches, patch_size=patch_size),
                   out_shardings=distributed.batch_sharded(mesh))


def training_batch(data: TrainingSet, rows: np.ndarray, weights: np.ndarray | None = None) -> dict:
    """The global batch whose rows on this process's devices are `rows`: patches, labels (and weights)."""
    index = distributed.put_local_batch(data.index[rows])
    patches = _local_gather(data.patch_size, distributed.local_mesh())(data.padded_volumes, index)
    local = {"patches": distributed.in_order(patches),
             "labels": data.labels[rows]}
    if weights is not None:
        local["weights"] = weights
    return distributed.global_batch(local)


def stratified_split(labels: np.ndarray, validation_fraction: float, rng: np.random.Generator):
    """Indices (train, validation) with each class split in the same proportion."""
    train, validation = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        n_val = int(round(len(members) * validation_fraction))
        validation.append(members[:n_val])
        train.append(members[n_val:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(validation))
