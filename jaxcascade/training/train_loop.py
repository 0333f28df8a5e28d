"""The epoch loop of one stage: epochs, validation, early stopping, checkpoints, resume, stop on signals.

It calls the pure steps of `train_steps.py` on batches from `batching.py`,
with the optimiser of `optimizer.py`. Randomness is derived, never threaded:
each data shard's epoch shuffle comes from
`seeding.stream(seed, 'epoch', stage, epoch, shard)` (see `batching`) and
each step's key is fold_in(fold_in(key(seed), stage), step) (inside the jitted
step). A run resumed from the checkpoint of epoch N therefore replays epochs
N+1... exactly as an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import signal
import threading
import time
from typing import Callable

import jax
import numpy as np

from jaxcascade.training import batching, train_steps
from jaxcascade.storage import checkpoints
from jaxcascade.runtime import distributed
from jaxcascade.networks import models
from jaxcascade.training.batching import TrainingSet, training_batch
from jaxcascade.errors import TrainingInterrupted, UserError
from jaxcascade.training.intensity_augmentation import IntensityAugmentation
from jaxcascade.training.optimizer import OptimizerSettings, make_optimizer, trainable_modules


@dataclasses.dataclass(frozen=True)
class LoopState:
    """Where a stage's training stands: what its checkpoints record beside the arrays (as JSON).

    `partial`, set only by a checkpoint taken mid-epoch (a signal), holds that epoch and its steps'
    measurements so far, so that the resumed run finishes the epoch bitwise as an uninterrupted one.
    """

    epoch: int = -1  # the last finished epoch (0-based)
    best_val_loss: float = float("inf")
    best_epoch: int = -1
    bad_epochs: int = 0
    history: tuple = ()
    partial: dict | None = None

    def to_json(self) -> dict:
        return {**dataclasses.asdict(self), "history": list(self.history)}

    @classmethod
    def from_json(cls, record: dict) -> "LoopState":
        names = {field.name for field in dataclasses.fields(cls)}
        values = {key: value for key, value in record.items() if key in names}
        return cls(**{**values, "history": tuple(values.get("history", ()))})


def evaluate(eval_step, variables, data: TrainingSet, schedule: batching.Schedule) -> dict:
    totals = {"loss": 0.0, "correct": 0.0, "count": 0.0}
    rows, weights = schedule.validation()
    for chunk, chunk_weights in zip(rows, weights):
        sums = eval_step(variables, training_batch(data, chunk, chunk_weights))
        for key in totals:  # to_host waits for the batch before the next is dispatched (distributed.in_order)
            totals[key] += float(distributed.to_host(sums[key]))
    count = max(totals["count"], 1.0)
    return {"loss": totals["loss"] / count, "accuracy": totals["correct"] / count}


def fit_stage(
    *,
    stage: int,
    model,
    data: TrainingSet,
    config,
    workdir,
    log: Callable[[str], None] = print,
    on_epoch: Callable[[list[dict]], None] | None = None,
    progress: Callable | None = None,
    initial_variables: dict | None = None,
    intensity: IntensityAugmentation | None = None,
) -> tuple[dict, list[dict]]:
    """Train one stage to early stopping (resuming from workdir) and return (best variables, history).

    initial_variables (e.g. a pretrained model's) replace the network's fresh initialisation; intensity,
    the patches' intensity augmentation, is built from config.train when not given.
    """
    if intensity is None:
        intensity = IntensityAugmentation.from_config(config.train.get("intensity_augmentation"))
    run, snapshot = _prepare_stage(stage=stage, model=model, data=data, config=config, progress=progress,
                                   initial_variables=initial_variables, intensity=intensity)
    manager = checkpoints.stage_manager(workdir, stage)
    # Closed however the loop ends (a SIGTERM's TrainingInterrupted, a non-finite loss): its threads and files
    # must not outlive the stage.
    try:
        snapshot = _resume(manager, run, snapshot, log)
        totals = run.schedule.totals
        shards_note = f", {data.num_shards} data shards" if data.num_shards > 1 else ""
        log(f"stage {stage}: {totals['training']} training / {totals['validation']} validation patches "
            f"({totals['lesion']} lesion{shards_note}), {run.schedule.steps} steps per epoch")
        with StopOnSignals() as stop:
            for epoch in range(snapshot.loop.epoch + 1, config.train.max_epochs):
                if snapshot.loop.bad_epochs >= config.train.patience:
                    break
                snapshot = _run_epoch(run, snapshot, epoch, manager=manager, stop=stop, log=log, on_epoch=on_epoch)
    finally:
        manager.close()
    return snapshot.best, list(snapshot.loop.history)


@dataclasses.dataclass(frozen=True)
class _StageRun:
    """What every epoch of one stage uses unchanged: its data, schedule, jitted steps and keys."""

    stage: int
    seed: int
    data: TrainingSet
    schedule: batching.Schedule
    train_step: Callable
    eval_step: Callable
    run_key: jax.Array
    rng_data: np.ndarray  # the stage's base key, checkpointed beside the arrays
    progress: Callable | None


@dataclasses.dataclass(frozen=True)
class _Snapshot:
    """What a checkpoint holds: the train state, the best variables so far (on the host) and the bookkeeping."""

    train_state: train_steps.TrainState
    best: dict
    loop: LoopState


def _prepare_stage(*, stage: int, model, data: TrainingSet, config, progress: Callable | None,
                   initial_variables: dict | None, intensity: IntensityAugmentation) -> tuple[_StageRun, _Snapshot]:
    """The stage's schedule, steps and keys, and the untrained snapshot a run without checkpoints starts from."""
    train_config = config.train
    schedule = batching.schedule(
        data.shard_rows, data.labels, num_shards=data.num_shards, seed=config.seed, stage=stage,
        validation_fraction=train_config.validation_fraction, batch_size=train_config.batch_size,
        validation_batch_size=train_config.eval_batch_size,
    )

    graphdef, variables = models.split_model(model)
    if initial_variables is not None:
        variables = initial_variables
    trainable = trainable_modules(train_config.trainable, variables["params"])
    tx = make_optimizer(OptimizerSettings.from_config(train_config, trainable))
    train_step = train_steps.make_train_step(graphdef, train_config.augmentation, trainable, intensity=intensity)
    eval_step = train_steps.make_eval_step(graphdef)
    base_key = jax.random.fold_in(jax.random.key(config.seed), stage)
    run_key = jax.random.wrap_key_data(distributed.put_replicated(jax.random.key_data(base_key)))

    state = distributed.put_replicated(train_steps.create_train_state(variables, tx))
    fresh = _Snapshot(train_state=state, best=jax.tree.map(np.array, variables), loop=LoopState())
    run = _StageRun(stage=stage, seed=config.seed, data=data, schedule=schedule, train_step=train_step,
                    eval_step=eval_step, run_key=run_key, rng_data=np.asarray(jax.random.key_data(base_key)),
                    progress=progress)
    return run, fresh


def _checkpoint_tree(snapshot: _Snapshot, rng_data: np.ndarray) -> dict:
    return {"train_state": snapshot.train_state, "best": snapshot.best, "rng": rng_data}


def _save(manager, snapshot: _Snapshot, rng_data: np.ndarray) -> None:
    checkpoints.save_epoch(manager, int(distributed.to_host(snapshot.train_state.step)),
                           _checkpoint_tree(snapshot, rng_data), snapshot.loop.to_json())


def _resume(manager, run: _StageRun, fresh: _Snapshot, log: Callable[[str], None]) -> _Snapshot:
    """The newest checkpoint's snapshot (logged), else `fresh`."""
    restored = checkpoints.restore_latest(manager, _checkpoint_tree(fresh, run.rng_data))
    if restored is None:
        return fresh
    tree, record = restored
    loop = LoopState.from_json(record)
    where = f"epoch {loop.epoch + 1}"
    if loop.partial:
        where = f"step {loop.partial['steps_done']} of epoch {loop.partial['epoch'] + 1}"
    log(f"stage {run.stage}: resuming after {where} (best validation loss {loop.best_val_loss:.4f})")
    return _Snapshot(train_state=tree["train_state"], best=tree["best"], loop=loop)


def _run_epoch(run: _StageRun, snapshot: _Snapshot, epoch: int, *, manager, stop: "StopOnSignals",
               log: Callable[[str], None], on_epoch: Callable[[list[dict]], None] | None) -> _Snapshot:
    """Train, validate, checkpoint and log one epoch; raise TrainingInterrupted on a signal."""
    started = time.perf_counter()
    train_state, rows, num_batches = _train_epoch(run, snapshot, epoch, manager=manager, stop=stop)
    measured = {key: np.array([row[key] for row in rows]) for key in rows[0]}
    _check_finite(measured, run.stage, epoch, snapshot.loop)
    validation = evaluate(run.eval_step, train_state.variables, run.data, run.schedule)
    snapshot, improved = _early_stopping(dataclasses.replace(snapshot, train_state=train_state),
                                         validation["loss"], epoch)
    record = _epoch_record(run.stage, epoch, measured, validation, train_state, started, improved)
    loop = dataclasses.replace(snapshot.loop, epoch=epoch, partial=None, history=(*snapshot.loop.history, record))
    snapshot = dataclasses.replace(snapshot, loop=loop)
    _save(manager, snapshot, run.rng_data)
    log(
        f"stage {run.stage} epoch {epoch + 1:3d}: train loss {record['train_loss']:.4f} "
        f"acc {record['train_accuracy']:.3f} | val loss {record['val_loss']:.4f} "
        f"acc {record['val_accuracy']:.3f}{' *' if improved else ''} ({record['epoch_seconds']:.1f} s)"
    )
    if on_epoch:
        on_epoch(list(loop.history))
    signum = stop.requested()
    if signum is not None:  # arrived during validation or saving: this epoch is safe
        raise TrainingInterrupted(signum, run.stage, epoch, num_batches, num_batches)
    return snapshot


def _train_epoch(run: _StageRun, snapshot: _Snapshot, epoch: int, *, manager,
                 stop: "StopOnSignals") -> tuple[train_steps.TrainState, list[dict], int]:
    """The epoch's train steps: (train state after them, every step's measurements, the epoch's batch count).

    A signal checkpoints the steps done so far and raises TrainingInterrupted.
    """
    batches = run.schedule.epoch(run.seed, run.stage, epoch)
    loop = snapshot.loop
    # A run stopped mid-epoch resumes at its next batch with the same
    # shuffle, so the result is bitwise that of an uninterrupted run.
    partial = loop.partial if (loop.partial or {}).get("epoch") == epoch else None
    done_steps = partial["measurements"] if partial else []
    step_measurements = []
    remaining = batches[len(done_steps):]
    iterator = run.progress(remaining, f"stage {run.stage} epoch {epoch + 1}") if run.progress else remaining
    state = snapshot.train_state
    for chunk in iterator:
        state, measurements = distributed.in_order(run.train_step(state, training_batch(run.data, chunk), run.run_key))
        step_measurements.append(measurements)
        signum = stop.requested(len(done_steps) + len(step_measurements))
        if signum is not None:
            done = done_steps + _host_rows(step_measurements)
            partial_loop = dataclasses.replace(
                loop, partial={"epoch": epoch, "steps_done": len(done), "measurements": done})
            _save(manager, dataclasses.replace(snapshot, train_state=state, loop=partial_loop), run.rng_data)
            raise TrainingInterrupted(signum, run.stage, epoch, len(done), len(batches))
    return state, done_steps + _host_rows(step_measurements), len(batches)


def _early_stopping(snapshot: _Snapshot, val_loss: float, epoch: int) -> tuple[_Snapshot, bool]:
    """(snapshot with the best variables and the patience count updated, whether this epoch improved)."""
    loop = snapshot.loop
    if val_loss < loop.best_val_loss:
        best = jax.tree.map(lambda x: np.array(distributed.to_host(x)), snapshot.train_state.variables)
        loop = dataclasses.replace(loop, best_val_loss=val_loss, best_epoch=epoch, bad_epochs=0)
        return dataclasses.replace(snapshot, best=best, loop=loop), True
    return dataclasses.replace(snapshot, loop=dataclasses.replace(loop, bad_epochs=loop.bad_epochs + 1)), False


def _epoch_record(stage: int, epoch: int, measured: dict[str, np.ndarray], validation: dict[str, float],
                  train_state: train_steps.TrainState, started: float, improved: bool) -> dict:
    """The epoch's line of metrics.jsonl (and of the checkpointed history)."""
    return {
        "stage": stage,
        "epoch": epoch + 1,
        "train_loss": float(measured["loss"].mean()),
        "train_accuracy": float(measured["accuracy"].mean()),
        "val_loss": validation["loss"],
        "val_accuracy": validation["accuracy"],
        "grad_norm": float(measured["grad_norm"].mean()),
        "update_norm": float(measured["update_norm"].mean()),
        "steps": int(distributed.to_host(train_state.step)),
        "epoch_seconds": round(time.perf_counter() - started, 3),
        "best": improved,
    }


def _host_rows(step_measurements: list[dict]) -> list[dict]:
    return [{key: float(distributed.to_host(value)) for key, value in m.items()} for m in step_measurements]


def _check_finite(measured: dict, stage: int, epoch: int, loop: LoopState) -> None:
    bad_steps = np.flatnonzero(~np.isfinite(measured["loss"]) | ~np.isfinite(measured["grad_norm"]))
    if bad_steps.size:
        raise UserError(
            f"stage {stage}: non-finite loss or gradient at epoch {epoch + 1}, step {int(bad_steps[0]) + 1}; "
            f"training stopped (the last good checkpoint is epoch {loop.epoch + 1}); "
            "check the inputs for extreme values or lower --config.train.learning_rate"
        )


class StopOnSignals:
    """Turn SIGINT/SIGTERM into a flag the loop checks after each step (main thread only).

    With several processes a signal may reach only some of them, or reach them
    at different steps, yet all must stop at the same step: the checkpoint saved
    then is collective. So they agree, with one tiny all-gather, every
    AGREE_EVERY steps (not every step: it waits for the devices) and at the end
    of each epoch.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)
    AGREE_EVERY = 8

    def __init__(self):
        self.signal = None
        self._previous = {}

    def _handle(self, signum, _frame):
        self.signal = signum

    def requested(self, steps_done: int | None = None) -> int | None:
        """The signal to stop for, once every process knows of it; steps_done None: an epoch's end."""
        if jax.process_count() == 1:
            return self.signal
        if steps_done is not None and steps_done % self.AGREE_EVERY:
            return None
        return int(distributed.allgather(np.array(self.signal or 0)).max()) or None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        return False
