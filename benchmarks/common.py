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


ISA_CHOICES = ("native", "avx2")


def force_isa(isa: str) -> None:
    """Measure as an AVX2 CPU would run (isa "avx2"), on an AVX-512 one: XLA's generated code capped at AVX2
    (--xla_cpu_max_isa=AVX2), jaxcascade's kernels built as their AVX2 variant (JAXCASCADE_CPU_KERNEL_ISA),
    PyTorch's baselines capped too (ONEDNN_MAX_CPU_ISA for oneDNN, ATEN_CPU_CAPABILITY for ATen's own kernels).

    Call it before the first JAX computation (XLA reads its flags when the CPU backend starts); the
    processes a benchmark starts inherit it. XLA's matrix products go to YNNPACK, which picks its kernels
    from CPUID and ignores the cap, so the emulated XLA GEMM path keeps AVX-512 products (on AMD Zen 4,
    which executes AVX-512 as two 256-bit halves, about AVX2's FMA rate): a bound in XLA's favour.
    """
    if isa == "native":
        return
    os.environ["XLA_FLAGS"] = " ".join(filter(None, [os.environ.get("XLA_FLAGS", ""), "--xla_cpu_max_isa=AVX2"]))
    os.environ["JAXCASCADE_CPU_KERNEL_ISA"] = isa
    os.environ.update(ONEDNN_MAX_CPU_ISA="AVX2", ATEN_CPU_CAPABILITY="avx2")


def add_isa_option(parser) -> None:
    parser.add_argument("--isa", choices=ISA_CHOICES, default="native",
                        help="avx2: run as an AVX2 CPU would, on an AVX-512 one (XLA capped at AVX2, the kernels' "
                             "AVX2 variant; see common.force_isa)")


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
        # The results and the page run_all rewrites do not make the code that measures them dirty.
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":!benchmarks/results", ":!docs/benchmarks.md", ":!docs/benchmarks-avx2.md"],
                               cwd=repo, capture_output=True, text=True)
    except OSError:
        return None
    if head.returncode:
        return None
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def emulating_avx2(environ=None) -> bool:
    """Whether force_isa("avx2") capped this process (and so the ones it starts)."""
    environ = os.environ if environ is None else environ
    return (environ.get("JAXCASCADE_CPU_KERNEL_ISA") == "avx2"
            and "--xla_cpu_max_isa=AVX2" in environ.get("XLA_FLAGS", "").split())


def cpu_class() -> str:
    """The CPU's class as the docs name it (AVX-512, AVX2, ARM), from its own flags; an emulated AVX2 says so."""
    from jaxcascade.ops import kernel_target

    native = kernel_target.cpu_class(kernel_target.native_isa(platform.machine(), kernel_target.cpu_flags()))
    if native == "AVX-512" and emulating_avx2():
        return ("AVX2, emulated on an AVX-512 CPU: jaxcascade's AVX2 kernels, XLA and PyTorch (ATen, oneDNN) "
                "capped at AVX2")
    return native


def machine() -> dict:
    import jax

    import jaxcascade
    import jaxcascade.ops.cpu_kernel

    info = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu_model": cpu_model(),
        "cpu_class": cpu_class(),
        "cpus": os.cpu_count(),
        "jaxcascade_runtime": dict(jaxcascade.runtime.STATUS),
        "cpu_kernel": "on" if jaxcascade.ops.cpu_kernel.available() else "off",
        "cpu_kernel_variant": jaxcascade.ops.kernel_build.target_isa() if jaxcascade.ops.cpu_kernel.available() else None,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "jaxcascade": jaxcascade.__version__,
        "commit": source_commit(),
        "jax": jax.__version__,
        "jax_backend": jax.default_backend(),
        "jax_devices": [str(d) for d in jax.devices()],
    }
    if "torch" in sys.modules:  # a benchmark that ran PyTorch in this process (the GPU one)
        info["torch"] = sys.modules["torch"].__version__
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


# Every advantage jaxcascade has, given to the PyTorch baselines too. jaxcascade's malloc settings
# (jaxcascade/runtime) through the environment glibc reads at a process's start; flush-to-zero, which
# XLA:CPU uses (denormals cost ~100x on x86); as many threads as the cores this process may use, as
# XLA:CPU takes. Each baseline runs in a process of its own (`run_baseline`), so no JAX thread pool
# or allocator state of the JAX side shares it.
def baseline_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def baseline_environment(environ=None, *, malloc_defaults: bool = False) -> dict:
    """environ (default os.environ) with jaxcascade's malloc settings for glibc and the thread count;
    malloc_defaults: glibc's own malloc settings instead (to show what the settings are worth)."""
    from jaxcascade import runtime

    threads = str(baseline_threads())
    environ = {**(os.environ if environ is None else environ), "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    if malloc_defaults:
        environ.pop("GLIBC_TUNABLES", None)
        return {**environ, runtime.MALLOC_ENV: "0", "JAXCASCADE_BASELINE_MALLOC": "default"}
    return {**environ, "GLIBC_TUNABLES": runtime.GLIBC_TUNABLES}


def configure_torch():
    """In a baseline process: check the allocator settings arrived, set flush-to-zero and threads.

    Returns (torch, the settings as tables state them).
    """
    from jaxcascade import runtime

    torch = torch_or_exit()
    defaults = os.environ.get("JAXCASCADE_BASELINE_MALLOC") == "default"  # a row showing glibc's defaults
    if not defaults and os.environ.get("GLIBC_TUNABLES") != runtime.GLIBC_TUNABLES:
        sys.exit("a PyTorch baseline must start with jaxcascade's malloc settings: run it through "
                 "benchmarks.common.run_baseline (or set GLIBC_TUNABLES as jaxcascade/runtime says)")
    flush_to_zero = bool(torch.set_flush_denormal(True))  # False where the CPU cannot
    torch.set_num_threads(baseline_threads())
    settings = {"torch": torch.__version__, "own_process": True, "glibc_tunables": os.environ.get("GLIBC_TUNABLES"),
                "flush_to_zero": flush_to_zero, "threads": torch.get_num_threads()}
    return torch, settings


def run_baseline(target: str, *, malloc_defaults: bool = False, **kwargs) -> dict:
    """Call 'module:function'(**kwargs) in a fresh PyTorch baseline process; its JSON result, with the
    settings it ran under in result['baseline'] (see configure_torch)."""
    import subprocess

    command = [sys.executable, "-m", "benchmarks.baseline", target, json.dumps(kwargs)]
    finished = subprocess.run(command, env=baseline_environment(malloc_defaults=malloc_defaults),
                              capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parents[1])
    if finished.returncode:
        sys.exit(f"baseline {target} failed:\n{finished.stderr.strip()[-3000:]}")
    return json.loads(finished.stdout.strip().splitlines()[-1])


def torch_or_exit():
    try:
        import torch
    except ImportError:
        sys.exit("this benchmark compares against PyTorch: pip install -e '.[bench]'")
    return torch
