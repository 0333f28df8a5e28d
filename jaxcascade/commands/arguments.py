"""The command line's argument types and NAME=PATH pairs: each mistake one line naming the option."""

from __future__ import annotations

import argparse

from jaxcascade.errors import UserError

def parse_inputs(pairs: list[str]) -> dict[str, str]:
    """['T1=a.nii.gz', 'FLAIR=b.nii.gz'] -> {'T1': 'a.nii.gz', 'FLAIR': 'b.nii.gz'}."""
    inputs: dict[str, str] = {}
    for pair in pairs:
        name, sep, path = pair.partition("=")
        if not sep or not name or not path:
            raise UserError(f"--input {pair!r}: expected NAME=PATH, e.g. --input FLAIR=flair.nii.gz")
        if name in inputs:
            raise UserError(f"--input {name}: modality given twice ({inputs[name]} and {path})")
        inputs[name] = path
    return inputs


class ScannerNames:
    """--scanner's choices, read from jaxcascade.phantom (numpy, scipy) only when argparse checks a value or
    writes help: a command line that fails on its arguments imports nothing heavy."""

    def _names(self):
        from jaxcascade.phantom import scanners

        return tuple(scanners.SCANNERS)

    def __contains__(self, name) -> bool:
        return name in self._names()

    def __iter__(self):
        return iter(self._names())


def probability(text: str) -> float:
    """An option's value from 0 to 1; argparse turns the error into its one line naming the option."""
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{text}: a probability, from 0 to 1")
    return value


def voxel_count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text}: a number of voxels, 0 or more")
    return value


def volume_mm3(text: str) -> float:
    value = float(text)
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text}: a volume in mm^3, 0 or more")
    return value


def percent(text: str) -> float:
    value = float(text)
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text}: a percentage, 0 or more")
    return value


def z_or_none(text: str) -> float | None:
    if text.lower() == "none":
        return None
    value = float(text)
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text}: a number of standard deviations, 0 or more, or none")
    return value


def named_pairs(flag: str, pairs: list[str] | None) -> dict[str, str]:
    try:
        return parse_inputs(pairs or [])
    except UserError as error:
        raise UserError(str(error).replace("--input", flag)) from None


def hint_input_pairs(inputs: list[str] | None, unknown: list[str]) -> None:
    """`--input T1 t1.nii.gz` leaves 't1.nii.gz' unrecognised: say how to write it rather than that."""
    bare = [value for value in inputs or [] if "=" not in value]
    if bare:
        raise UserError(f"--input {bare[0]} {unknown[0]}: use NAME=PATH, e.g. --input {bare[0]}={unknown[0]}")
