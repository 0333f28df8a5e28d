"""How data walks through the code: one parameter followed from an entry point through every call it reaches.

A walk starts with one value (the model directory, the data folder) given to an entry function. A call into
a jaxcascade function joins the walk when one of its arguments is on the walk (the value itself, a value that
an earlier call on the walk returned, or such a value one level inside a list, tuple, dict or dataclass), and
what it returns joins the walk. The calls of the walk, in the order they start, are grouped into *stays*:
runs of consecutive calls in one module. A walk that leaves a module and comes back to it *returns* to it:

    returns = stays - modules visited

An architecture where a value is read once and handed downward visits each module once (returns 0); one
that shuttles back and forth between two modules returns to them at every hop. Measured, not estimated:

    python -m benchmarks.walks                 # the table, on a tiny phantom and a model trained for it
    python -m benchmarks.walks --show segment_files   # also the stays of that walk, in order
    PYTHONPATH=OTHER_TREE python -m benchmarks.walks  # the same walks through another checkout's code

Identity, not equality, decides what is on the walk (a path string rebuilt from scratch is a new value);
functions of the standard library and of other packages are not counted, nor are generated dataclass
methods and the module-level code run by imports.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
from pathlib import Path

PACKAGE = "jaxcascade"


@dataclasses.dataclass(frozen=True)
class Walk:
    entry: str
    calls: tuple[tuple[str, str], ...]  # (module, function) in the order the calls started

    @property
    def stays(self) -> list[tuple[str, list[str]]]:
        """(module, its functions called in that stay) for each run of consecutive calls in one module."""
        stays: list[tuple[str, list[str]]] = []
        for module, function in self.calls:
            if stays and stays[-1][0] == module:
                stays[-1][1].append(function)
            else:
                stays.append((module, [function]))
        return stays

    @property
    def modules(self) -> int:
        return len({module for module, _ in self.calls})

    @property
    def returns(self) -> int:
        return len(self.stays) - self.modules


def _members(value) -> list:
    """value's direct parts: a container's items, a dataclass's fields (one level; no recursion)."""
    if isinstance(value, (list, tuple, set, frozenset)):
        return list(value)
    if isinstance(value, dict):
        return list(value.values())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return [getattr(value, field.name, None) for field in dataclasses.fields(value)]
    return []


class _Tracer:
    def __init__(self, start):
        self.keep = [start]  # alive, so that no id on the walk is reused by another object
        self.on_walk = {id(start)}
        self.calls: list[tuple[str, str]] = []
        self.recorded = set()  # frames whose calls are on the walk (their return values join it)

    def _tainted(self, value) -> bool:
        return id(value) in self.on_walk or any(id(part) in self.on_walk for part in _members(value))

    def _add(self, value) -> None:
        for item in (value, *_members(value)):
            if item is not None and not isinstance(item, (bool, int, float)) and id(item) not in self.on_walk:
                self.on_walk.add(id(item))
                self.keep.append(item)

    def __call__(self, frame, event, arg):
        if event == "call":
            module = frame.f_globals.get("__name__", "")
            code = frame.f_code
            if (not module.startswith(PACKAGE) or code.co_name.startswith("<") or code.co_filename.startswith("<")
                    or frame in self.recorded):
                return
            count = code.co_argcount + code.co_kwonlyargcount
            count += bool(code.co_flags & 0x04) + bool(code.co_flags & 0x08)  # *args, **kwargs
            arguments = [frame.f_locals.get(name) for name in code.co_varnames[:count]]
            if any(self._tainted(value) for value in arguments):
                self.recorded.add(frame)
                self.calls.append((module, code.co_qualname))
        elif event == "return" and frame in self.recorded:
            self.recorded.discard(frame)
            self._add(arg)


def trace(entry: str, function, start, *args, **kwargs) -> Walk:
    """Call function(*args, **kwargs) (start among them) and return the walk of start through it."""
    tracer = _Tracer(start)
    previous = sys.getprofile()
    sys.setprofile(tracer)
    try:
        function(*args, **kwargs)
    finally:
        sys.setprofile(previous)
    return Walk(entry, tuple(tracer.calls))


def measure(folder: Path) -> list[Walk]:
    """The three walks of issue 31 on tiny phantoms in folder: segmenting one subject's files with a model
    trained for one epoch on two subjects, a study of that one subject, and that training itself (each
    subject more or epoch more repeats the same stays)."""
    from jaxcascade import api, phantom
    from jaxcascade import config as config_lib
    from jaxcascade.training import pipeline

    try:
        from jaxcascade.segmentation.nifti_files import segment_files
    except ImportError:  # a tree from before segmentation/files.py was split (for before/after tables)
        from jaxcascade.segmentation.files import segment_files

    phantom.write_cohort(folder / "data", 3, seed=7, size="tiny")
    (folder / "study").mkdir()
    (folder / "data" / phantom.subject_name(2)).rename(folder / "study" / phantom.subject_name(2))
    settings = config_lib.apply_overrides(config_lib.load_config("demo"),
                                          ["--config.train.max_epochs=1", "--config.train.patience=1"])
    data_dir, model = str(folder / "data"), str(folder / "model")
    training = trace("train_cascade, the data folder", pipeline.train_cascade, data_dir, data_dir, model, settings,
                     log=lambda line: None)
    subject = folder / "study" / phantom.subject_name(2)
    inputs = {name: str(subject / f"{name}.nii.gz") for name in ("T1", "FLAIR")}
    model = str(folder / "model")  # a new string: each walk starts from a value of its own
    one = trace("segment_files, the model directory", segment_files, model, model, inputs, str(folder / "seg.nii.gz"))
    model = str(folder / "model")
    study = trace("api.segment_study, the model", api.segment_study, model, model, str(folder / "study"),
                  str(folder / "study-out"))
    return [one, study, training]


def table(walks: list[Walk]) -> str:
    lines = ["| entry | stays | modules | returns |", "|---|---|---|---|"]
    lines += [f"| `{walk.entry}` | {len(walk.stays)} | {walk.modules} | {walk.returns} |" for walk in walks]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--show", default="", help="print the stays of the walks whose entry starts with this")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="jaxcascade-walks-") as folder:
        walks = measure(Path(folder))
    print(table(walks))
    for walk in walks:
        if args.show and walk.entry.startswith(args.show):
            print(f"\n{walk.entry}:")
            for module, functions in walk.stays:
                print(f"  {module}: {', '.join(functions)}")


if __name__ == "__main__":
    main()
