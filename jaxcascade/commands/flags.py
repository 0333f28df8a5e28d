"""The library's messages name parameters (`method='dense'`, `overwrite=True`, see `jaxcascade.errors`); the
command line shows them with its flags instead (`--inference dense`, `--overwrite`), through this one table."""

from __future__ import annotations

import ast
import re
import shlex

# {the Python API's parameter: the command line's flag for it}.
FLAGS = {
    "method": "--inference",
    "out": "--out",
    "out_dir": "--out-dir",
    "data_dir": "--data",
    "workdir": "--workdir",
    "config": "--config",
    "init_from": "--init-from",
    "probabilities": "--probabilities",
    "brain_mask": "--brain-mask",
    "resample": "--resample",
    "thick_slices": "--thick-slices",
    "overwrite": "--overwrite",
    "participants": "--participant-label",
    "bids_filters": "--bids-filter",
    "bids_suffixes": "--bids-suffix",
    "shard": "--shard",
    "modalities": "--modalities",
    "layout": "--layout",
    "threshold": "--threshold",
    "min_lesion_voxels": "--min-lesion-voxels",
    "min_lesion_volume_mm3": "--min-lesion-volume",
    "compute_dtype": "--compute-dtype",
}

_STRING = r"""'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*\""""
_LITERAL = (rf"{_STRING}|\[(?:{_STRING}|[^\]'\"])*\]|\((?:{_STRING}|[^)'\"])*\)|\{{(?:{_STRING}|[^}}'\"])*\}}"
            r"|True|\.\.\.|-?\d+(?:\.\d+)?")
# Not after a word character, '.' or '-': `--config.train.init_from=x` is a config override, not a parameter.
_FORM = re.compile(rf"(?<![\w.-])({'|'.join(sorted(FLAGS, key=len, reverse=True))})=({_LITERAL})(?!\w)")


def _words(flag: str, value) -> str | None:
    """The command line's form of `parameter=value`, or None where it has none (an unreadable literal)."""
    if value is True or value is Ellipsis:
        return flag
    if isinstance(value, dict) and value:  # NAME=SUFFIX pairs, one flag each
        return " ".join(f"{flag} {shlex.quote(f'{name}={item}')}" for name, item in value.items())
    if isinstance(value, list) and value:  # a repeatable option, one flag per item
        return " ".join(f"{flag} {shlex.quote(str(item))}" for item in value)
    if isinstance(value, tuple):  # one comma-separated value (--modalities T1,FLAIR)
        return f"{flag} {shlex.quote(','.join(map(str, value)))}"
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return f"{flag} {shlex.quote(str(value))}"
    return None


def to_flags(message: str) -> str:
    """`message` with each `parameter=VALUE` of FLAGS written as the command line's flag and value."""

    def replace(match: re.Match) -> str:
        try:
            value = ast.literal_eval(match[2])
        except (ValueError, SyntaxError):
            return match[0]
        words = _words(FLAGS[match[1]], value)
        return match[0] if words is None else words

    return _FORM.sub(replace, message)
