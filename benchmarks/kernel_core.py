"""The convolution kernel's own rate on one core, without XLA: the current source against another revision's.

Run:
    python -m benchmarks.kernel_core [--isa avx2] [--baseline REV] [--rounds 5] [--repeats 20]

`benchmarks/kernel_core.cc` calls conv3d.cc's `run_rows` directly, on one thread, for the cascade's
convolution shapes; it is compiled with the flags jaxcascade's build uses for the ISA (`--isa avx2` on an
AVX-512 CPU builds the AVX2 variant, as `JAXCASCADE_CPU_KERNEL_ISA=avx2` does). With --baseline, the same
harness is also built from that git revision's kernel sources, and the two run alternately, case by case,
for --rounds rounds: a machine whose speed drifts (a shared VM) drifts for both. Each round keeps the
fastest of --repeats calls; the table gives the median and min-max of those over the rounds, and the
ratio of the medians. GFLOP/s counts 2 x the multiply-adds of every output, kept or not.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import tempfile
from pathlib import Path

from benchmarks.common import markdown_table, write_results

REPO = Path(__file__).resolve().parents[1]
KERNELS = REPO / "jaxcascade" / "ops" / "kernels"
HEADERS = ("conv3d.cc", "simd.h", "parallel.h", "winograd.h")  # older revisions lack winograd.h
# (name, N, D, H, W, C, K, O, dilation, padding, sparse): the shapes the cascade's convolutions run at.
CASES = [
    ("dense conv1: 41^3 x 2 -> 32", 1, 41, 41, 41, 2, 3, 32, 1, 0, 0),
    ("dense conv2: 38^3 x 32 -> 64, dilation 2", 1, 38, 38, 38, 32, 3, 64, 2, 0, 0),
    ("the same, outputs in a ball (the dense form's candidates)", 1, 38, 38, 38, 32, 3, 64, 2, 0, 1),
    ("train conv2: 128 x 4^3 x 32 -> 64", 128, 4, 4, 4, 32, 3, 64, 1, 0, 0),
    ("SAME conv: 32 x 11^3 x 32 -> 32, padding 1", 32, 11, 11, 11, 32, 3, 32, 1, 1, 0),
]


def build(sources: Path, isa: str, out: Path) -> Path:
    """The harness compiled against the kernel sources in `sources`, for `isa`, as the kernels' build does."""
    import jax

    from jaxcascade.ops import kernel_build, kernel_target

    compiler, _ = kernel_build.compiler()
    command = [compiler, "-O3", *kernel_target.compile_flags(isa, platform.machine()), "-std=c++17", "-w",
               f"-I{jax.ffi.include_dir()}", f"-I{sources}", f'-DCONV_SOURCE="{sources / "conv3d.cc"}"',
               str(REPO / "benchmarks" / "kernel_core.cc"), "-o", str(out), "-lpthread"]
    subprocess.run(command, check=True)
    return out


def revision_sources(revision: str, folder: Path) -> Path:
    """The kernel sources of a git revision, written into folder."""
    folder.mkdir(parents=True)
    for name in HEADERS:
        shown = subprocess.run(["git", "show", f"{revision}:jaxcascade/ops/kernels/{name}"], cwd=REPO,
                               capture_output=True, text=True)
        if shown.returncode != 0 and name != "conv3d.cc":  # a header the revision did not have yet
            continue
        shown.check_returncode()
        (folder / name).write_text(shown.stdout)
    return folder


def flops(case) -> float:
    _, n, d, h, w, c, k, o, dilation, pad, _ = case
    span = (k - 1) * dilation
    outputs = n * (d + 2 * pad - span) * (h + 2 * pad - span) * (w + 2 * pad - span)
    return 2.0 * outputs * o * k ** 3 * c


def run(harness: Path, case, repeats: int) -> float:
    """The fastest of `repeats` calls, in ms."""
    arguments = [str(value) for value in case[1:]] + [str(repeats)]
    line = subprocess.run([str(harness), *arguments], check=True, capture_output=True, text=True).stdout
    return float(line.split()[0])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--isa", default="native", help="native (this CPU's variant), avx2, avx512, generic")
    parser.add_argument("--baseline", help="a git revision whose kernel sources to compare with")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    args = parser.parse_args(argv)
    from jaxcascade.ops import kernel_target

    isa = kernel_target.native_isa(platform.machine(), kernel_target.cpu_flags()) if args.isa == "native" else args.isa
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        harnesses = {"current": build(KERNELS, isa, scratch / "current")}
        if args.baseline:
            harnesses[args.baseline] = build(revision_sources(args.baseline, scratch / "baseline"), isa,
                                             scratch / "baseline-harness")
        times = {(case[0], name): [] for case in CASES for name in harnesses}
        for _ in range(args.rounds):
            for case in CASES:
                for name, harness in harnesses.items():
                    times[(case[0], name)].append(run(harness, case, args.repeats))
    rows = []
    for case in CASES:
        for name in harnesses:
            ms = times[(case[0], name)]
            row = {"case": case[0], "kernel": name, "ms_median": statistics.median(ms), "ms_min": min(ms),
                   "ms_max": max(ms), "gflops": flops(case) / statistics.median(ms) / 1e6}
            if args.baseline:
                row["vs_baseline"] = statistics.median(times[(case[0], args.baseline)]) / row["ms_median"]
            rows.append(row)
    columns = ["case", "kernel", "ms_median", "ms_min", "ms_max", "gflops"] + (["vs_baseline"] if args.baseline else [])
    print(f"one core, {isa} variant, {args.rounds} rounds of the fastest of {args.repeats} calls")
    print(markdown_table(rows, columns))
    path = write_results(f"kernel_core_{isa}", {"isa": isa, "baseline": args.baseline, "rounds": args.rounds,
                                                "repeats": args.repeats, "rows": rows}, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
