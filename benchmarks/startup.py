"""What a user waits for: a whole `jaxcascade segment` command, with and without the compilation cache.

Run (after `jaxcascade demo`, whose model and held-out subject it uses):
    python -m benchmarks.startup [--model jaxcascade-demo/model] [--subject jaxcascade-demo/cohort/held_out/sub-06]
Each call is a fresh process. 'no cache' runs with JAXCASCADE_COMPILATION_CACHE=0 (everything compiles
every time); 'cold' is the first call into an empty cache folder (compiles and writes); 'warm' the calls
after it (reads). Prints a table, writes benchmarks/results/startup.json.
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


def segment_seconds(model: str, subject: Path, out: Path, cache: str) -> float:
    command = [sys.executable, "-m", "jaxcascade.cli", "segment", "--model", model, "--out", str(out), "--overwrite",
               "--input", f"T1={subject / 'T1.nii.gz'}", "--input", f"FLAIR={subject / 'FLAIR.nii.gz'}"]
    started = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, env={**os.environ, "JAXCASCADE_COMPILATION_CACHE": cache})
    return time.perf_counter() - started


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="jaxcascade-demo/model")
    parser.add_argument("--subject", type=Path, default=Path("jaxcascade-demo/cohort/held_out/sub-06"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        out, cache = Path(scratch) / "seg.nii.gz", Path(scratch) / "cache"
        runs = {"no cache": [segment_seconds(args.model, args.subject, out, "0") for _ in range(args.repeats)],
                "cold cache": [segment_seconds(args.model, args.subject, out, str(cache))],
                "warm cache": [segment_seconds(args.model, args.subject, out, str(cache)) for _ in range(args.repeats)]}
    for name, seconds in runs.items():
        rows.append({"run": name, "calls": len(seconds), "median_s": statistics.median(seconds),
                     "min_s": min(seconds), "max_s": max(seconds)})
    baseline = rows[0]["median_s"]
    for row in rows:
        row["speedup_vs_no_cache"] = baseline / row["median_s"]
    print(markdown_table(rows, ["run", "calls", "median_s", "min_s", "max_s", "speedup_vs_no_cache"]))
    print(f"\nwrote {write_results('startup', {'rows': rows, 'subject': str(args.subject)}, args.out)}")


if __name__ == "__main__":
    main()
