"""The models that ship inside the package, and how a model argument names one.

`jaxcascade/models/<name>/` is an ordinary model directory (config.json, training_data.json,
weights/) plus `model_card.json`: what it was trained on, under which licence, and what it
measured on real scans. A model argument (`--model`, `--init-from`, `load_model`) is a directory
path or, where no such directory exists, a shipped model's name; `--model` left out means
DEFAULT_MODEL.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from jaxcascade.errors import UserError

SHIPPED_ROOT = Path(__file__).resolve().parents[1] / "models"
DEFAULT_MODEL = "default"
MODEL_CARD = "model_card.json"


def names() -> list[str]:
    """The shipped models' names, sorted."""
    if not SHIPPED_ROOT.is_dir():
        return []
    return sorted(p.name for p in SHIPPED_ROOT.iterdir() if (p / MODEL_CARD).is_file())


def card(name: str) -> dict:
    """A shipped model's card (its training data, licence, measured accuracy)."""
    path = SHIPPED_ROOT / name / MODEL_CARD
    if not path.is_file():
        raise UserError(f"no shipped model {name!r}; shipped: {', '.join(names()) or 'none'}")
    return json.loads(path.read_text(encoding="utf-8"))


def locate(model: str | os.PathLike | None) -> Path:
    """The model directory that `model` names: an existing path, else a shipped model; None is the default.

    A path that exists wins over a shipped name, so a folder called `default` in the working
    directory is still used as given.
    """
    if model is None:
        model = DEFAULT_MODEL
    path = Path(model)
    if path.exists():
        return path
    text = os.fspath(model)
    if os.sep not in text and (SHIPPED_ROOT / text / MODEL_CARD).is_file():
        return SHIPPED_ROOT / text
    shipped = ", ".join(names()) or "none"
    raise UserError(f"{text}: model directory not found (and no shipped model of that name; shipped: {shipped}; "
                    "`jaxcascade models` lists them)")
