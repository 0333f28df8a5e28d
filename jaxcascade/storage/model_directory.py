"""The model directory: what `train --workdir` writes and `segment --model` reads, and its format stamp.

    config.json               the full config (channel names and order included) and a
                              {"jaxcascade": {"format_version", "version"}} stamp
    metrics.jsonl             one line per epoch (`history.py`), training_curves.png
    checkpoints/stage{1,2}/N/ training state after global step N, for resuming (`checkpoints.py`)
    weights/stage{1,2}.npz    each stage's final weights (`weights.py`); present = stage done
    provenance.json           imported models only: the source files and their hashes

A directory written in another format version is refused with a message
naming both versions. `open_model` reads a whole model directory once and checks it in one place (the
weights against the network its config describes); building networks around its weights is
`segmentation.stage.Stage.from_weights`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from jaxcascade.version import __version__
from jaxcascade.storage import weights
from jaxcascade import config as config_lib
from jaxcascade.runtime import distributed
from jaxcascade.networks import models
from jaxcascade.errors import UserError
from jaxcascade.data.nifti import NATIVE
from jaxcascade.runtime.outputs import write_json

FORMAT_VERSION = 1
# What the model learnt from, beside its config: the FLAIR voxel size (mm) of its training data.
TRAINING_DATA = "training_data.json"
# Settings a fine-tuned model must share with the model it starts from.
FIXED_WHEN_FINE_TUNING = ("model", "data.modalities", "data.orientation", "normalisation", "bias_correction")


def stored_config(config) -> dict:
    """The config as the model directory records it: how a run is spread over processes is not part of the model."""
    stored = config_lib.to_dict(config)
    stored.pop("distributed", None)
    return stored


def prepare_workdir(workdir: Path, config) -> None:
    """Create the directory and its config.json, or check that a resumed run uses the same config."""
    if not distributed.is_primary():
        return
    workdir.mkdir(parents=True, exist_ok=True)
    record = {"jaxcascade": {"format_version": FORMAT_VERSION, "version": __version__}, **stored_config(config)}
    path = workdir / "config.json"
    if path.exists():
        # Read as a model is read: settings added since it was written take their defaults.
        previous = stored_config(read_model_config(workdir))
        changed = config_lib.differences(previous, stored_config(config))
        if changed:
            raise UserError(
                f"{path}: this workdir was trained with a different config ({', '.join(changed)} differ); "
                "use a new workdir=... or the same config to resume"
            )
    write_json(record, path)


def read_model_config(model_dir) -> object:
    """The config of a model directory, checked for its format stamp."""
    model_dir = Path(model_dir)
    path = model_dir / "config.json"
    if not model_dir.is_dir():
        raise UserError(f"{model_dir}: model directory not found")
    if not path.exists():
        raise UserError(f"{model_dir}: not a jaxcascade model directory (no config.json); give a training run's "
                        "workdir")
    try:
        record = json.loads(path.read_text())
        stamp = record.pop("jaxcascade")
    except (json.JSONDecodeError, KeyError, AttributeError):
        raise UserError(f"{path}: not a jaxcascade model config (unreadable or no 'jaxcascade' stamp)") from None
    if stamp.get("format_version") != FORMAT_VERSION:
        raise UserError(
            f"{path}: written by jaxcascade {stamp.get('version', '?')} in model format "
            f"{stamp.get('format_version')}, this jaxcascade {__version__} reads format {FORMAT_VERSION}"
        )
    # Models saved before data.orientation existed saw images as stored.
    record.setdefault("data", {}).setdefault("orientation", NATIVE)
    return config_lib.from_dict(record, str(path))


def record_voxel_size(workdir: Path, voxel_size_mm) -> None:
    """Write the training data's FLAIR voxel size into the model directory (process 0)."""
    if distributed.is_primary():
        write_json({"flair_voxel_size_mm": [round(float(v), 4) for v in voxel_size_mm]}, Path(workdir) / TRAINING_DATA)


def recorded_voxel_size(model_dir):
    """The model's training voxel size (mm, 3 values), or None for models saved before it was recorded."""
    path = Path(model_dir) / TRAINING_DATA
    if not path.exists():
        return None
    try:
        return tuple(float(v) for v in json.loads(path.read_text())["flair_voxel_size_mm"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        raise UserError(f"{path}: unreadable; rewrite it as {{\"flair_voxel_size_mm\": [x, y, z]}} or remove it") from None


def fine_tuning_config(model_dir, overrides: list[str]):
    """The config of an existing model, set to start from its weights; overrides then apply.

    The network, channels and normalisation must stay those of the model, so
    the starting point is the model's own config rather than a config file.
    """
    config = read_model_config(model_dir)
    weights.require_stages(model_dir, "has no trained weights to start from")
    config.train.init_from = str(Path(model_dir).resolve())
    config = config_lib.apply_overrides(config, overrides)
    changed = [key for key in config_lib.differences(stored_config(read_model_config(model_dir)),
                                                     stored_config(config))
               if any(key == f or key.startswith(f + ".") for f in FIXED_WHEN_FINE_TUNING)]
    if changed:
        raise UserError(f"init_from={str(model_dir)!r}: {', '.join(changed)} cannot change when fine-tuning a model")
    return config


@dataclasses.dataclass(frozen=True)
class Model:
    """A model directory read once: its config, both stages' weights (nested dicts of arrays) and the voxel
    size of its training data (None where it was not recorded)."""

    path: Path
    config: object
    stage_weights: dict  # stage number -> {'params': ..., 'batch_stats': ...}
    voxel_size_mm: tuple | None

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(self.config.data.modalities)


def open_model(model_dir) -> Model:
    """Read and check a trained (or imported) model directory: config and format stamp, both stages' final
    weights, the training voxel size; a UserError naming the folder for anything missing or unreadable."""
    config = read_model_config(model_dir)
    voxel_size_mm = recorded_voxel_size(model_dir)
    # Checked here, against the network config.json describes: a mismatch is one line naming the weights file.
    stage_weights = weights.load_trained(model_dir, models.variables_template(config))
    return Model(Path(model_dir), config, stage_weights, voxel_size_mm)
