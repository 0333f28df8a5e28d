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

import jax
import numpy as np

from jaxcascade import distributed, seeding
from jaxcascade import patches as patches_lib
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


def owned(num_shards: int) -> range:
    """The data shards this process trains on."""
    per_process = num_shards // jax.process_count()
    first = jax.process_index() * per_process
    return range(first, first + per_process)


def subject_shard(subject_number: int, num_shards: int) -> int:
    return subject_number % num_shards


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
    if sorted(shard_rows) != list(owned(num_shards)):
        raise ValueError(f"process {jax.process_index()} holds shards {sorted(shard_rows)}, "
                         f"expected {list(owned(num_shards))}")
    train_rows, validation_rows = {}, {}
    for shard, rows in shard_rows.items():
        rng = seeding.stream(seed, "split", stage=stage, shard=shard)
        train, validation = patches_lib.stratified_split(labels[rows], validation_fraction, rng)
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
