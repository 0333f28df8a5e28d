"""Orbax checkpoints: per-epoch training state, for resuming.

Where they lie in a model directory is `model_directory.py`: checkpoints/stage{1,2}/N/
holds the state after global step N (end of an epoch, or where SIGINT/SIGTERM
stopped it): train state, best weights, loop bookkeeping. Orbax writes to a
temporary directory and renames it on commit, so a killed run leaves either the
previous checkpoint or a temporary folder that is ignored and removed on the next
start. A stage's final weights are `weights.py`'s .npz; model directories written
before it hold them as orbax checkpoints, read here.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxcascade.runtime import distributed


def _abstract(tree):
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def _remove_orbax_temporaries(directory: Path) -> None:
    if directory.is_dir() and distributed.is_primary():
        for leftover in directory.glob("*.orbax-checkpoint-tmp*"):
            shutil.rmtree(leftover, ignore_errors=True)


def stage_manager(workdir: str | Path, stage: int) -> ocp.CheckpointManager:
    directory = Path(workdir).resolve() / "checkpoints" / f"stage{stage}"
    _remove_orbax_temporaries(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=2, enable_async_checkpointing=False, create=True)
    return ocp.CheckpointManager(directory, options=options, item_names=("state", "loop"))


def save_epoch(manager: ocp.CheckpointManager, step: int, state_tree: dict, loop: dict) -> None:
    """Checkpoint after global step `step`: arrays (train state, best weights, rng) and JSON bookkeeping.

    A mid-epoch save (on SIGTERM) and the end-of-epoch save can fall on the same
    step; the newer one replaces the older.
    """
    if step in manager.all_steps():
        manager.delete(step)
    manager.save(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardSave(state_tree), loop=ocp.args.JsonSave(loop)),
    )
    manager.wait_until_finished()


def restore_latest(manager: ocp.CheckpointManager, state_template: dict):
    """(state_tree, loop) of the newest epoch, or None when there is none."""
    epoch = manager.latest_step()
    if epoch is None:
        return None
    restored = manager.restore(
        epoch,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(_abstract(state_template)), loop=ocp.args.JsonRestore()
        ),
    )
    return restored["state"], restored["loop"]


def load_orbax_weights(directory: Path, template: dict | None = None) -> dict:
    """A stage's final weights as model directories before the .npz stored them (`weights.py`)."""
    with ocp.StandardCheckpointer() as checkpointer:
        restored = checkpointer.restore(directory, None if template is None else _abstract(template))
    return jax.tree.map(np.asarray, restored)
