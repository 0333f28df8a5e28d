"""Config files (`get_config()` modules), `--config.a.b=value` overrides, JSON round trip."""

from __future__ import annotations

import ast
import importlib.util
import json
from pathlib import Path

import ml_collections

from jaxcascade.errors import UserError

PACKAGED_CONFIGS = Path(__file__).resolve().parent / "configs"


def _config_module(path: str | None):
    """The module of a config file (a bare name such as 'demo' finds the packaged `configs/demo.py`)."""
    if path is None:
        path = str(PACKAGED_CONFIGS / "default.py")
    elif not path.endswith(".py") and (PACKAGED_CONFIGS / f"{path}.py").exists():
        path = str(PACKAGED_CONFIGS / f"{path}.py")
    file = Path(path)
    if not file.is_file():
        raise UserError(f"{path}: config file not found")
    spec = importlib.util.spec_from_file_location(f"jaxcascade_config_{file.stem}", file)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as error:  # a user's Python file can fail in any way
        raise UserError(f"{path}: config file failed to load ({type(error).__name__}: {error})") from None
    return module


def load_config(path: str | None = None) -> ml_collections.ConfigDict:
    """The config of a `get_config()` file; the packaged default when path is None.

    A bare name such as 'demo' finds the packaged `configs/demo.py`.
    """
    module = _config_module(path)
    if not hasattr(module, "get_config"):
        raise UserError(f"{path}: config file has no get_config() function")
    config = module.get_config()
    if not isinstance(config, ml_collections.ConfigDict):
        raise UserError(f"{path}: get_config() must return an ml_collections.ConfigDict")
    return config


def load_fine_tuning_recipe(path: str) -> list[str]:
    """The `--config.KEY=VALUE` overrides of a fine-tuning recipe file (its `fine_tuning_overrides()`).

    A recipe changes how an existing model is trained further (epochs, learning rate, thresholds),
    never the model itself, so it is a list of overrides applied to the model's own config.
    """
    module = _config_module(path)
    if not hasattr(module, "fine_tuning_overrides"):
        raise UserError(f"{path}: with init_from=..., config=... takes a fine-tuning recipe (a file with "
                        "fine_tuning_overrides(), e.g. the packaged 'oneshot'); give --config.KEY=VALUE overrides "
                        "for anything else")
    return list(module.fine_tuning_overrides())


def _parse_value(raw: str, current, key: str):
    kind = type(current)
    try:
        if kind is bool:
            lowered = raw.strip().lower()
            if lowered not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return lowered in ("true", "1", "yes")
        if kind is int:
            return int(raw)
        if kind is float:
            return float(raw)
        if kind is str:
            return raw
        if kind in (tuple, list):
            text = raw.strip()
            if text.startswith(("(", "[")):
                value = ast.literal_eval(text)
            else:
                value = [part.strip() for part in text.split(",") if part.strip()]
            return kind(value)
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        raise UserError(
            f"--config.{key}={raw}: expected a value of type {kind.__name__} (current value {current!r})"
        ) from None


def apply_overrides(config: ml_collections.ConfigDict, overrides: list[str]) -> ml_collections.ConfigDict:
    """Apply ['--config.train.max_epochs=5', ...]; unknown keys and wrong types are UserErrors."""
    for item in overrides:
        if not item.startswith("--config.") or "=" not in item:
            raise UserError(f"{item}: expected --config.KEY=VALUE, e.g. --config.train.max_epochs=50")
        key, _, raw = item[len("--config.") :].partition("=")
        node = config
        parts = key.split(".")
        for depth, part in enumerate(parts):
            if not isinstance(node, ml_collections.ConfigDict) or part not in node:
                where = ".".join(parts[:depth]) or "the config"
                known = ", ".join(sorted(node.keys())) if isinstance(node, ml_collections.ConfigDict) else ""
                raise UserError(f"--config.{key}: unknown config key {part!r} in {where} (known: {known})")
            if depth < len(parts) - 1:
                node = node[part]
        current = node[parts[-1]]
        if isinstance(current, ml_collections.ConfigDict):
            raise UserError(f"--config.{key}: is a group of settings; set one of {', '.join(sorted(current.keys()))}")
        with node.ignore_type():
            node[parts[-1]] = _parse_value(raw, current, key)
    return config


def to_dict(config: ml_collections.ConfigDict) -> dict:
    """Plain JSON-able dict (tuples become lists)."""
    return json.loads(config.to_json())


def from_dict(data: dict, source: str = "config") -> ml_collections.ConfigDict:
    """A stored config laid over today's defaults, so settings added since it was written get defaults.

    A stored key that today's defaults lack means an incompatible writer: UserError.
    """
    config = load_config(None)

    def overlay(node: ml_collections.ConfigDict, values: dict, prefix: str) -> None:
        for key, value in values.items():
            if key not in node:
                raise UserError(f"{source}: unknown setting {prefix}{key}; written by an incompatible jaxcascade?")
            if isinstance(node[key], ml_collections.ConfigDict) and isinstance(value, dict):
                overlay(node[key], value, f"{prefix}{key}.")
            else:
                with node.ignore_type():
                    node[key] = tuple(value) if isinstance(node[key], tuple) else value

    overlay(config, data, "")
    return config


def differences(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two config dicts."""
    keys = sorted(set(a) | set(b))
    out = []
    for key in keys:
        name = f"{prefix}{key}"
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            out.extend(differences(va, vb, f"{name}."))
        elif va != vb:
            out.append(name)
    return out
