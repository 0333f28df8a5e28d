"""Training history: metrics.jsonl (one JSON line per epoch, both stages) and training_curves.png."""

from __future__ import annotations

import json
from pathlib import Path

from jaxcascade.runtime import distributed
from jaxcascade.evaluation import plots
from jaxcascade.runtime.outputs import write_text


def write_history(workdir: Path, histories: dict) -> None:
    """Rewrite metrics.jsonl and the curves from {stage: [epoch records]} (process 0 only)."""
    if not distributed.is_primary():
        return
    records = [r for stage in sorted(histories) for r in histories[stage]]
    write_text("".join(json.dumps(r) + "\n" for r in records), workdir / "metrics.jsonl")
    plots.training_curves(records, workdir / "training_curves.png")


def read_history(workdir: Path) -> dict:
    """{1: [...], 2: [...]} epoch records of an earlier run in workdir (empty lists for a new one)."""
    histories: dict = {1: [], 2: []}
    path = workdir / "metrics.jsonl"
    if path.exists():
        for line in path.read_text().splitlines():
            record = json.loads(line)
            histories[record["stage"]].append(record)
    return histories
