"""What a user waits for: a whole `jaxcascade segment` command, and how long before it starts computing.

Run (the shipped default model on the real patient in ../shared, or any model and subject folder):
    python -m benchmarks.startup [--model default] [--subject ../shared/data/ljubljana-ms/cross-sectional/patient26]
                                 [--baseline-tree DIR]
Each call is a fresh process (`benchmarks/startup_probe.py` runs the CLI and notes when stage 1 is first
called). 'no cache' runs with JAXCASCADE_COMPILATION_CACHE=0 (everything compiles every time); 'cold' is the
first call into an empty cache folder (compiles and writes); 'warm' the calls after it (reads).
--baseline-tree: a checkout of another commit (e.g. `git worktree add --detach ../before HEAD~3`) whose
warm-cache calls run interleaved with this tree's, so that the before/after ratio comes from one run on
the same machine state. Prints a table, writes benchmarks/results/startup.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import markdown_table, write_results

REPO = Path(__file__).resolve().parents[1]
PATIENT = REPO.parent / "shared" / "data" / "ljubljana-ms" / "cross-sectional" / "patient26"


def segment_seconds(model: str, subject: Path, scratch: Path, cache: str, tree: Path = REPO) -> tuple[float, float]:
    """(seconds until stage 1 is first called, seconds of the whole command) of one fresh process."""
    stamp = scratch / "stamp"
    stamp.unlink(missing_ok=True)
    command = [sys.executable, str(REPO / "benchmarks" / "startup_probe.py"), str(stamp), "--model", model, "-q",
               "--out", str(scratch / "seg.nii.gz"), "--overwrite",
               "--input", f"T1={subject / 'T1.nii.gz'}", "--input", f"FLAIR={subject / 'FLAIR.nii.gz'}"]
    # The probe comes from this tree; jaxcascade from `tree` (this one, or the baseline checkout).
    environ = {**os.environ, "JAXCASCADE_COMPILATION_CACHE": cache,
               "PYTHONPATH": os.pathsep.join([str(tree), os.environ.get("PYTHONPATH", "")])}
    # An installed package carries its compiled bytecode (pip compiles it): a shell that forbids writing
    # it would have every call compile jaxcascade's modules from source, which no user's install does.
    environ.pop("PYTHONDONTWRITEBYTECODE", None)
    started = time.time()
    done = subprocess.run(command, capture_output=True, text=True, env=environ, cwd=scratch)
    if done.returncode:
        raise SystemExit(f"{tree}: segment failed (exit {done.returncode}): {done.stderr.strip()[-500:]}")
    finished = time.time()
    return float(stamp.read_text()) - started, finished - started


def _commit(tree: Path) -> str:
    """The baseline checkout's commit, as the results name it."""
    done = subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return f"commit {done.stdout.strip()}" if done.returncode == 0 else str(tree)


def _row(name: str, runs: list[tuple[float, float]]) -> dict:
    first, total = [r[0] for r in runs], [r[1] for r in runs]
    return {"run": name, "calls": len(runs),
            "to_first_computation_median_s": statistics.median(first), "to_first_computation_min_s": min(first),
            "to_first_computation_max_s": max(first),
            "median_s": statistics.median(total), "min_s": min(total), "max_s": max(total)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--subject", type=Path, default=PATIENT)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--baseline-tree", type=Path, default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    subject = args.subject.resolve()
    with tempfile.TemporaryDirectory() as scratch:
        scratch, cache = Path(scratch), str(Path(scratch) / "cache")
        runs = {"no cache": [segment_seconds(args.model, subject, scratch, "0") for _ in range(args.repeats)],
                "cold cache": [segment_seconds(args.model, subject, scratch, cache)],
                "warm cache": []}
        if args.baseline_tree is not None:
            baseline_cache = str(scratch / "baseline-cache")
            segment_seconds(args.model, subject, scratch, baseline_cache, args.baseline_tree.resolve())  # fills it
            runs["warm cache, baseline tree"] = []
        for _ in range(args.repeats):
            runs["warm cache"].append(segment_seconds(args.model, subject, scratch, cache))
            if args.baseline_tree is not None:
                runs["warm cache, baseline tree"].append(
                    segment_seconds(args.model, subject, scratch, baseline_cache, args.baseline_tree.resolve()))
    rows = [_row(name, seconds) for name, seconds in runs.items()]
    columns = ["run", "calls", "to_first_computation_median_s", "to_first_computation_min_s",
               "to_first_computation_max_s", "median_s", "min_s", "max_s"]
    print(markdown_table(rows, columns))
    payload = {"rows": rows, "subject": str(args.subject), "model": args.model,
               "baseline_tree": _commit(args.baseline_tree) if args.baseline_tree else None}
    print(f"\nwrote {write_results('startup', payload, args.out)}")


if __name__ == "__main__":
    main()
