"""Each stage's final weights in a model directory: `weights/stage{1,2}.npz`, read with numpy alone.

A stage's final weights are a few hundred kB that every `segment` reads; orbax (with tensorstore) is
built for what training checkpoints are — large, sharded, written asynchronously while training goes
on — and importing it costs a CLI call about 0.3 s before anything is computed. So the weights a model
ships are a plain `.npz` (one array per variable, keys such as `params/conv1/kernel`), written atomically
by process 0, while the resumable training state stays in orbax (`checkpoints.py`). Model directories
written before hold `weights/stage{1,2}/` orbax checkpoints: they are still read (through orbax).
"""

from __future__ import annotations

import shutil
import zipfile
from pathlib import Path

import numpy as np

from jaxcascade.errors import UserError
from jaxcascade.runtime import distributed
from jaxcascade.runtime.outputs import atomic_path

SEPARATOR = "/"


def weights_file(model_dir, stage: int) -> Path:
    return Path(model_dir).resolve() / "weights" / f"stage{stage}.npz"


def _orbax_dir(model_dir, stage: int) -> Path:
    return Path(model_dir).resolve() / "weights" / f"stage{stage}"


def stage_done(model_dir, stage: int) -> bool:
    """Whether the stage has final weights (present = the stage finished training)."""
    return weights_file(model_dir, stage).is_file() or _orbax_dir(model_dir, stage).is_dir()


def flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    """{'params/conv1/kernel': array, ...} of a nested dict of arrays."""
    flat = {}
    for key, value in tree.items():
        if SEPARATOR in key:
            raise ValueError(f"variable name {key!r} contains {SEPARATOR!r}")
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + SEPARATOR))
        else:
            flat[name] = value
    return flat


def unflatten(flat: dict[str, object]) -> dict:
    tree: dict = {}
    for name, value in flat.items():
        *parents, leaf = name.split(SEPARATOR)
        node = tree
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = value
    return tree


def save(model_dir, stage: int, variables: dict) -> None:
    """Write the stage's weights (process 0; the others wait), replacing an older orbax folder."""
    path = weights_file(model_dir, stage)
    if distributed.is_primary():
        arrays = {name: np.asarray(value) for name, value in flatten(variables).items()}
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp, open(tmp, "wb") as file:
            np.savez(file, **arrays)
        legacy = _orbax_dir(model_dir, stage)
        if legacy.is_dir():
            shutil.rmtree(legacy)
    distributed.barrier(f"save weights {stage}")


def load(model_dir, stage: int, template: dict | None = None) -> dict:
    """The stage's weights as nested dicts of numpy arrays, checked against template's names and shapes."""
    path = weights_file(model_dir, stage)
    if not path.is_file() and _orbax_dir(model_dir, stage).is_dir():
        from jaxcascade.storage import checkpoints  # only for model directories written before the .npz

        restored = checkpoints.load_orbax_weights(_orbax_dir(model_dir, stage))
        if template is not None:
            _check_against(_orbax_dir(model_dir, stage), flatten(restored), flatten(template))
        return restored
    try:
        with np.load(path, allow_pickle=False) as stored:
            flat = {name: stored[name] for name in stored.files}
    except FileNotFoundError:
        raise UserError(f"{path}: not found; the model's stage {stage} is not trained (or the folder is incomplete)") \
            from None
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as error:
        raise UserError(f"{path}: unreadable weights ({error}); retrain the stage or restore the file") from None
    if template is not None:
        _check_against(path, flat, flatten(template))
    return unflatten(flat)


def require_stages(model_dir, problem: str) -> None:
    """UserError '<model_dir>: stage N <problem>' unless both stages have final weights."""
    for stage in (1, 2):
        if not stage_done(model_dir, stage):
            raise UserError(f"{model_dir}: stage {stage} {problem}")


def load_trained(model_dir, template: dict) -> dict[int, dict]:
    """Both stages' final weights {1: ..., 2: ...}, checked against template's names and shapes; a UserError
    naming the folder where a stage has none yet."""
    require_stages(model_dir, "is not trained yet; finish `jaxcascade train` first")
    return {stage: load(model_dir, stage, template) for stage in (1, 2)}


def _check_against(path: Path, stored: dict, expected: dict) -> None:
    missing = sorted(set(expected) - set(stored))
    extra = sorted(set(stored) - set(expected))
    if missing or extra:
        raise UserError(f"{path}: does not match the network of config.json "
                        f"(missing {', '.join(missing) or 'none'}; unexpected {', '.join(extra) or 'none'})")
    for name, like in expected.items():
        if tuple(stored[name].shape) != tuple(like.shape):
            raise UserError(f"{path}: {name} has shape {tuple(stored[name].shape)}, the network of config.json "
                            f"needs {tuple(like.shape)}")
