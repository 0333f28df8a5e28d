"""A cohort in one command against one command per session: `segment --data` vs repeated `segment --input`.

Run (after `jaxcascade demo`, whose model it uses):
    python -m benchmarks.study [--model jaxcascade-demo/model] [--subjects 2 --sessions 2]
Writes a BIDS phantom (2 mm, seed 5: the example of docs/studies.md) to a scratch folder, warms
the compilation cache with one study run, then times, in fresh processes, the study command and one
`segment` call per session, `--repeats` times each. Prints a table, writes benchmarks/results/study.json.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import markdown_table, write_results
from jaxcascade import phantom

CLI = [sys.executable, "-m", "jaxcascade.cli", "segment"]


def _timed(command: list[str]) -> float:
    started = time.perf_counter()
    finished = subprocess.run(command, capture_output=True, text=True)
    if finished.returncode:
        sys.exit(f"study benchmark: {' '.join(command)} failed:\n{finished.stderr.strip()}")
    return time.perf_counter() - started


def study_seconds(model: str, data: Path, out: Path) -> tuple[float, list[float]]:
    """Wall seconds of the whole study command, and the per-session seconds of its report."""
    seconds = _timed([*CLI, "--model", model, "--data", str(data), "--out-dir", str(out), "--overwrite"])
    with open(out / "lesions.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    failed = [row["participant_id"] + " " + row["session_id"] + ": " + row["status"] for row in rows if row["status"] != "ok"]
    if failed:
        sys.exit(f"study benchmark: sessions failed: {'; '.join(failed)}")
    return seconds, [float(row["seconds"]) for row in rows]


def separate_seconds(model: str, data: Path, out: Path) -> float:
    """Wall seconds of one `segment` call per session, all sessions."""
    total = 0.0
    for flair in sorted(data.glob("sub-*/ses-*/anat/*_FLAIR.nii.gz")):
        stem = flair.name.removesuffix("_FLAIR.nii.gz")
        total += _timed([*CLI, "--model", model, "--input", f"T1={flair.parent / f'{stem}_T1w.nii.gz'}",
                         "--input", f"FLAIR={flair}", "--out", str(out / f"{stem}.nii.gz"), "--overwrite"])
    return total


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="jaxcascade-demo/model")
    parser.add_argument("--subjects", type=int, default=2)
    parser.add_argument("--sessions", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if not (Path(args.model) / "config.json").is_file():
        sys.exit(f"{args.model}: not a model directory; run `jaxcascade demo` first or give --model")
    with tempfile.TemporaryDirectory() as scratch:
        data, out = Path(scratch) / "study-bids", Path(scratch) / "out"
        phantom.write_cohort(data, args.subjects, seed=5, size="small", layout="bids", sessions=args.sessions)
        out.mkdir()
        study_seconds(args.model, data, out / "warm-up")
        study = [study_seconds(args.model, data, out / f"study{k}") for k in range(args.repeats)]
        separate = [separate_seconds(args.model, data, out) for _ in range(args.repeats)]
    sessions = args.subjects * args.sessions
    inside = [s for _, per_session in study for s in per_session]
    rows = [{"run": f"one study command, {sessions} sessions", "repeats": args.repeats,
             "median_s": statistics.median(s for s, _ in study), "min_s": min(s for s, _ in study),
             "max_s": max(s for s, _ in study)},
            {"run": f"{sessions} separate segment calls", "repeats": args.repeats,
             "median_s": statistics.median(separate), "min_s": min(separate), "max_s": max(separate)}]
    for row in rows:
        row["per_session_s"] = row["median_s"] / sessions
    rows.append({"run": "inside the study (its seconds column)", "repeats": len(inside),
                 "median_s": statistics.median(inside), "min_s": min(inside), "max_s": max(inside),
                 "per_session_s": statistics.median(inside)})
    speedup = rows[1]["median_s"] / rows[0]["median_s"]
    print(markdown_table(rows, ["run", "repeats", "median_s", "min_s", "max_s", "per_session_s"]))
    print(f"study command {speedup:.2f}x faster than separate calls")
    print(f"\nwrote {write_results('study', {'rows': rows, 'sessions': sessions, 'speedup': speedup}, args.out)}")


if __name__ == "__main__":
    main()
