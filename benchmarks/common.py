"""Timing and reporting helpers shared by the benchmarks (warm-up, repetitions, median, JSON)."""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Callable


def time_call(fn: Callable[[], object], *, warmup: int = 1, repeats: int = 5, keep_result: bool = False) -> dict:
    """Median (min, max) wall time of fn() after warm-up calls (fn must block until its result is ready).

    Beside the time, each call's minor page faults and system CPU time (medians):
    a run hit by the allocator (XLA:CPU temporaries faulted in afresh every call,
    see jaxcascade/runtime/__init__.py) shows thousands of faults and tens of ms of system
    time per call, so such a row is visible in the table.
    """
    for _ in range(warmup):
        fn()
    measured = [measure_once(fn) for _ in range(repeats)]
    runs = [run for _, run in measured]
    times = [run["s"] for run in runs]
    timing = {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "repeats": repeats,
              "minor_faults": statistics.median(run["minor_faults"] for run in runs),
              "system_s": statistics.median(run["system_s"] for run in runs)}
    if keep_result:  # the last call's output, for the caller to compare (not JSON)
        timing["result"] = measured[-1][0]
    return timing


def measure_once(fn: Callable[[], object]) -> tuple[object, dict]:
    """fn()'s result and its wall time, minor page faults and system CPU time (one long call)."""
    before = resource.getrusage(resource.RUSAGE_SELF)
    started = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_SELF)
    return result, {"s": seconds, "minor_faults": after.ru_minflt - before.ru_minflt,
                    "system_s": after.ru_stime - before.ru_stime}


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def source_commit() -> str | None:
    """The repository's commit (short hash, '-dirty' with uncommitted changes), so each result names its code."""
    import subprocess

    repo = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                               capture_output=True, text=True)
    except OSError:
        return None
    if head.returncode:
        return None
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def machine() -> dict:
    import jax

    import jaxcascade
    import jaxcascade.ops.cpu_kernel

    info = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu_model": cpu_model(),
        "cpus": os.cpu_count(),
        "jaxcascade_runtime": dict(jaxcascade.runtime.STATUS),
        "cpu_kernel": "on" if jaxcascade.ops.cpu_kernel.available() else "off",
        "jaxcascade": jaxcascade.__version__,
        "commit": source_commit(),
        "jax": jax.__version__,
        "jax_backend": jax.default_backend(),
        "jax_devices": [str(d) for d in jax.devices()],
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
    except ImportError:
        info["torch"] = None
    return info


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "| " + " | ".join("---" for _ in columns) + " |"]
    for row in rows:
        cells = []
        for column in columns:
            value = row.get(column, "")
            cells.append(f"{value:.3g}" if isinstance(value, float) else str(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_results(name: str, payload: dict, out_dir: str | None) -> Path:
    out = Path(out_dir or "benchmarks/results")
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"machine": machine(), **payload}, indent=2) + "\n")
    tmp.replace(path)
    return path


def torch_or_exit():
    try:
        import torch
    except ImportError:
        sys.exit("this benchmark compares against PyTorch: pip install -e '.[bench]'")
    return torch
