"""Every benchmark, each in its own process, and the documentation's benchmark tables rewritten from their results.

Run from the repository root (after `pip install -e ".[bench,interop]"`):
    python -m benchmarks.run_all                        # about 30 minutes on a 2-core CPU
    python -m benchmarks.run_all --only convs,train_step  # some steps; the other tables stay as they are
    python -m benchmarks.run_all --only gpu --render-only # tables from a gpu.json already in --out
    python -m benchmarks.run_all --emulate-avx2 --only demo,inference  # an AVX2 CPU, on an AVX-512 one
Steps: `demo` (trains the model the inference benchmark uses, resuming if present; skipped with --model),
`convs`, `train_step`, `train_epoch` (whole training epochs against PyTorch's bare step), `scaling` (train step over forced host devices and local processes), `inference`
(whole 1 mm brain), `startup` (a whole `segment` command, with and without the compilation cache),
`study` (a BIDS cohort in one `segment --data` command against one call per session), `study_1mm` (a study
of 1 mm brains: seconds per subject and per phase against PyTorch's stage 1), `nicms` (needs
../shared/interop), `gpu` (benchmarks/gpu.py; skipped without a GPU for JAX and PyTorch). Each benchmark warms up,
repeats (>= 3) and reports
medians with min-max, page faults and system time; its JSON goes to --out. In docs/benchmarks.md the text
between `<!-- bench:NAME -->` and `<!-- /bench:NAME -->` is replaced by the table, under a line naming the
machine and the jaxcascade version and commit that measured it.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import cpu_model, force_isa

REPO = Path(__file__).resolve().parents[1]
STEPS = ("demo", "convs", "train_step", "train_epoch", "scaling", "inference", "startup", "study", "study_1mm",
         "nicms", "gpu")


def _command(step: str, args) -> list[str] | None:
    python, out = [sys.executable, "-m"], ["--out", str(args.out)]
    model = args.model or str(args.out / "demo" / "model")
    return {
        "demo": None if args.model else [sys.executable, "-m", "jaxcascade.cli", "demo", "--workdir",
                                         str(args.out / "demo")],
        "convs": python + ["benchmarks.convs", *out],
        "train_step": python + ["benchmarks.train_step", *out],
        "train_epoch": python + ["benchmarks.train_epoch", *out],
        "scaling": python + ["benchmarks.train_step", "--networks", "valverde2017_valid", "--devices", "1,2,4",
                             "--processes", "1,2", *out],
        "inference": python + ["benchmarks.inference", "--model", model, "--repeats", str(args.repeats), *out],
        "startup": python + ["benchmarks.startup", "--model", model, "--subject",
                             str(args.out / "demo" / "cohort" / "held_out" / "sub-06"), *out],
        "study": python + ["benchmarks.study", "--model", model, "--repeats", str(args.repeats), *out],
        "study_1mm": python + ["benchmarks.study_1mm", "--model", model, "--repeats", str(args.repeats), *out],
        "nicms": python + ["benchmarks.nicms_inference", *out],
        "gpu": python + ["benchmarks.gpu", "--model", model, *out],
    }[step]


def _has_gpu() -> bool:
    """A CUDA GPU for both frameworks, asked in a child process (this one must not start a JAX backend)."""
    code = "import jax, torch; raise SystemExit(0 if jax.default_backend() == 'gpu' and torch.cuda.is_available() else 1)"
    return subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0


def _number(value, digits: int = 3) -> str:
    if isinstance(value, str):
        return value
    if value is None or value != value:
        return "-"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.{digits}g}"


def _span(row: dict, median: str, low: str, high: str, scale: float = 1.0) -> str:
    return f"{_number(row[median] * scale)} ({_number(row[low] * scale)}-{_number(row[high] * scale)})"


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(_number(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def render_inference(payload: dict) -> str:
    rows = []
    for r in payload["rows"]:
        method = f"{r['method']} (batch {r['batch']})" if "batch" in r else r["method"]
        rows.append([method, _span(r, "stage1_s", "stage1_min_s", "stage1_max_s"), r["patches_per_s"],
                     r.get("cascade_s"), r["peak_rss_mb"], r.get("stage1_speedup_vs_torch"),
                     r.get("stage1_speedup_vs_torch_SAME"), r.get("max_abs_diff_vs_torch"),
                     r["stage1_minor_faults"], r["stage1_system_s"], r.get("useful_gflops_per_s")])
    return _table(["method", "stage 1 (s), median (min-max)", "voxels/s", "cascade (s)", "peak RSS (MB)",
                   "stage 1 vs torch", "vs torch SAME", "max abs diff vs torch", "page faults / run",
                   "system (s) / run", "block GFLOP/s"], rows)


def render_train_step(payload: dict) -> str:
    rows = [[r["network"], r["implementation"], _span(r, "step_ms", "min_ms", "max_ms"), r["patches_per_s"],
             r.get("speedup_vs_torch"), r["faults_per_step"], r["sys_ms_per_step"]] for r in payload["rows"]]
    return _table(["network", "implementation", "step (ms), median (min-max)", "patches/s", "vs torch",
                   "page faults / step", "system ms / step"], rows)


def render_train_epoch(payload: dict) -> str:
    r = payload["rows"][0]
    rows = [["jaxcascade, whole epochs", r["epochs_timed"], _span(r, "epoch_s", "min_s", "max_s"),
             f"{_number(r['patches_per_s'])} ({_number(r['min_patches_per_s'])}-{_number(r['max_patches_per_s'])})",
             f"{_number(r['ratio_vs_torch'])} ({_number(r['ratio_min'])}-{_number(r['ratio_max'])})"],
            ["PyTorch, bare train step", payload["torch"]["repeats"], _span(r, "torch_step_ms", "torch_min_ms",
                                                                         "torch_max_ms", 1e-3),
             r["torch_patches_per_s"], "1"]]
    table = _table(["", "n", "seconds (epoch or step), median (min-max)", "training patches/s", "vs PyTorch"], rows)
    phases = [[row["phase"], _span(row, "median_s", "min_s", "max_s")] for row in payload["phases"]]
    return (table + f"\n\nAn epoch: {r['steps_per_epoch']} steps of {r['batch']} patches from {r['subjects']} phantom "
            f"subjects at 1 mm, then {r['validation_patches']:,} validation patches, a checkpoint and the history. "
            "Where an epoch's time goes:\n\n" + _table(["phase", "seconds, median (min-max)"], phases))


def render_scaling(payload: dict) -> str:
    rows = [[r["processes"], r["devices"], _span(r, "step_ms", "min_ms", "max_ms"), r["patches_per_s"],
             r["scaling_efficiency"], r["faults_per_step"]] for r in payload["rows"]]
    return _table(["processes", "devices in all", "step (ms), median (min-max)", "patches/s", "scaling efficiency",
                   "page faults / step"], rows)


def render_convs(payload: dict) -> str:
    rows = [[r["case"], r["formulation"], r["GFLOP/s"], r["of GEMM ceiling"],
             f"{_number(r['median ms'])} ({_number(r['min ms'])}-{_number(r['max ms'])})", r["faults/call"]]
            for r in payload["rows"]]
    return _table(["case", "formulation", "GFLOP/s", "of GEMM ceiling", "ms, median (min-max)", "page faults / call"],
                  rows)


def render_nicms(payload: dict) -> str:
    rows = [[r["method"], r["voxels"], _span(r, "seconds", "min_s", "max_s"), r["patches_per_s"], r["speedup_vs_torch"]]
            for r in payload["rows"]]
    table = _table(["method", "voxels", "seconds, median (min-max)", "patches/s", "vs torch"], rows)
    return table + f"\n\nBrain candidates {payload['brain_candidates']:,}; max |jax - torch| {payload['max_abs_diff']:.1e}."


def render_startup(payload: dict) -> str:
    rows = [[r["run"], r["calls"],
             _span(r, "to_first_computation_median_s", "to_first_computation_min_s", "to_first_computation_max_s"),
             _span(r, "median_s", "min_s", "max_s")] for r in payload["rows"]]
    table = _table(["`jaxcascade segment`", "calls", "until stage 1 starts, s: median (min-max)",
                    "whole command, s: median (min-max)"], rows)
    where = f"model {payload.get('model', '?')}, subject {Path(payload.get('subject', '?')).name}"
    baseline = f"; the baseline tree is {payload['baseline_tree']}" if payload.get("baseline_tree") else ""
    # (its rows are the same command run from that commit's code, interleaved with this one's)
    return table + f"\n\n{where}{baseline}."


def render_study(payload: dict) -> str:
    rows = [[r["run"], r["repeats"], _span(r, "median_s", "min_s", "max_s"), r["per_session_s"]] for r in payload["rows"]]
    table = _table(["`jaxcascade segment`", "repeats", "seconds, median (min-max)", "per session"], rows)
    return table + f"\n\nThe study command is {payload['speedup']:.2f}x faster than one call per session."


def render_study_1mm(payload: dict) -> str:
    rows = [[r["what"], r["n"], _span(r, "median_s", "min_s", "max_s"),
             f"{_number(r['vs_torch_stage1'])} ({_number(r['vs_torch_min'])}-{_number(r['vs_torch_max'])})"
             if "vs_torch_stage1" in r else "1"] for r in payload["rows"]]
    table = _table(["per subject", "n", "seconds, median (min-max)", "vs PyTorch stage 1 (min-max)"], rows)
    phases = [[r["phase"], _span(r, "median_s", "min_s", "max_s") if "min_s" in r else _number(r["median_s"]),
               f"{r['share']:.0%}" if "share" in r else "-"] for r in payload["phases"]]
    subject = payload["rows"][0]["median_s"]
    return (table + f"\n\n{payload['candidates']:,} stage-1 candidates a subject. A subject takes {_number(subject)} s "
            f"against the {_number(payload['target_s'])} s target. A subject's own work by phase (each subject's "
            "report; load and writing overlap the neighbours' computing):\n\n"
            + _table(["phase", "seconds, median (min-max)", "of a subject's time in the study"], phases))


def _gpu_rows(payload: dict, section: str) -> list[dict]:
    return [r for r in payload["rows"] if r["section"] == section]


def render_gpu_inference(payload: dict) -> str:
    rows = [[r["name"], _span(r, "median_s", "min_s", "max_s"), r["voxels_per_s"], r["vs_torch_patch"],
             r["vs_torch_same"], r.get("max_abs_diff_vs_float32_torch"), r.get("useful_gflops_per_s")]
            for r in _gpu_rows(payload, "inference")]
    return _table(["method", "stage 1 (s), median (min-max)", "voxels/s", "vs torch patch, batch 4096",
                   "vs torch SAME", "max abs diff vs float32 torch", "block GFLOP/s"], rows)


def render_gpu_train_step(payload: dict) -> str:
    rows = [[r["name"], r["batch"], _span(r, "median_s", "min_s", "max_s", 1e3), r["patches_per_s"], r["vs_torch"]]
            for r in _gpu_rows(payload, "train_step")]
    return _table(["network, framework, dtype", "batch", "step (ms), median (min-max)", "patches/s", "vs torch"], rows)


def render_gpu_convs(payload: dict) -> str:
    rows = [[*r["name"].split(" | "), _span(r, "median_s", "min_s", "max_s", 1e3), r["tflops"]]
            for r in _gpu_rows(payload, "convs")]
    return _table(["case", "implementation", "ms, median (min-max)", "TFLOP/s"], rows)


# Page block name -> (results JSON, renderer); a step's blocks are those named after it.
RENDER = {"inference": ("inference", render_inference), "train_step": ("train_step", render_train_step),
          "train_epoch": ("train_epoch", render_train_epoch),
          "scaling": ("train_step_devices", render_scaling), "convs": ("convs", render_convs),
          "nicms": ("nicms_inference", render_nicms),
          "startup": ("startup", render_startup), "study": ("study", render_study),
          "study_1mm": ("study_1mm", render_study_1mm),
          "gpu_inference": ("gpu", render_gpu_inference), "gpu_train_step": ("gpu", render_gpu_train_step),
          "gpu_convs": ("gpu", render_gpu_convs)}
BLOCKS = {"gpu": ("gpu_inference", "gpu_train_step", "gpu_convs")}


def recorded_commit(path: Path) -> str | None:
    """'jaxcascade V, commit C': the commit that last changed a results file in git, and the version there.

    None outside a repository or for an uncommitted file. For results whose JSON predates the
    machine record's own "commit" field.
    """
    def git(*args: str) -> str:
        try:
            done = subprocess.run(["git", *args], cwd=path.parent, capture_output=True, text=True, check=False)
        except OSError:
            return ""
        return done.stdout.strip() if done.returncode == 0 else ""

    commit = git("log", "-1", "--format=%h", "--", path.name)
    if not commit:
        return None
    version = re.search(r'__version__ = "([^"]+)"', git("show", f"{commit}:jaxcascade/__init__.py"))
    return f"jaxcascade {version.group(1) if version else '?'}, commit {commit}"


def provenance(payload: dict, recorded: str | None = None) -> str:
    """Which jaxcascade measured a result: as the JSON records it, else the commit that recorded the JSON."""
    info = payload["machine"]
    if info.get("commit"):
        return f"jaxcascade {info.get('jaxcascade', '?')} at commit {info['commit']}"
    if recorded:
        return f"results recorded with {recorded}"
    return "jaxcascade commit not recorded"


def machine_line(payload: dict, recorded: str | None = None) -> str:
    info = payload["machine"]
    source = provenance(payload, recorded)
    if "gpu" in payload:
        return (f"*{payload['gpu']} (host: {info.get('cpu_model', '?')}, {info['cpus']} cores), JAX {info['jax']} "
                f"({info['jax_backend']}), PyTorch {info.get('torch')} (CUDA {payload.get('torch_cuda')}); {source}.*")
    runtime = info.get("jaxcascade_runtime", {})
    cpu_class = f" ({info['cpu_class']})" if info.get("cpu_class") else ""
    return (f"*{info.get('cpu_model', '?')}{cpu_class}, {info['cpus']} cores, JAX {info['jax']} ({info['jax_backend']}); "
            f"malloc settings {runtime.get('malloc', '?')}; CPU convolution kernel {info.get('cpu_kernel', 'off')}"
            f"{baseline_clause(payload)}; {source}.*")


def baseline_clause(payload: dict) -> str:
    """How the PyTorch baseline ran, as its own process recorded it ('' for a table without one)."""
    baseline = payload.get("baseline")
    if not baseline:
        return ""
    same = "jaxcascade's malloc settings (GLIBC_TUNABLES)" if baseline.get("glibc_tunables") else "default malloc"
    ftz = "flush-to-zero" if baseline.get("flush_to_zero") else "no flush-to-zero"
    return (f"; baseline PyTorch {baseline['torch']} in its own process with {same}, {ftz}, "
            f"{baseline['threads']} threads, as jaxcascade")


def rewrite_tables(page: Path, out: Path, steps) -> list[str]:
    """Replace each finished step's marked block in page (docs/benchmarks.md); returns the names rewritten."""
    text, done = page.read_text(), []
    for step in [block for step in steps for block in BLOCKS.get(step, (step,))]:
        if step not in RENDER:
            continue
        result, render = RENDER[step]
        path = out / f"{result}.json"
        start, end = f"<!-- bench:{step} -->", f"<!-- /bench:{step} -->"
        if not path.exists() or start not in text:
            continue
        payload = json.loads(path.read_text())
        block = f"{start}\n{machine_line(payload, recorded_commit(path))}\n\n{render(payload)}\n{end}"
        before, rest = text.split(start, 1)
        text = before + block + rest.split(end, 1)[1]
        done.append(step)
    temporary = page.with_suffix(".md.tmp")
    temporary.write_text(text)
    temporary.replace(page)
    return done


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help=f"comma list of {', '.join(STEPS)} (default: all, gpu where there is one)")
    parser.add_argument("--model", help="a trained model dir for the inference benchmark (default: train the demo)")
    parser.add_argument("--repeats", type=int, default=3, help="inference repetitions per method")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results)")
    parser.add_argument("--page", type=Path, default=None,
                        help="the page whose marked tables are rewritten (default docs/benchmarks.md)")
    parser.add_argument("--no-page", action="store_true", help="leave the tables' page alone")
    parser.add_argument("--emulate-avx2", action="store_true",
                        help="on an AVX-512 CPU, cap jaxcascade, XLA and PyTorch at AVX2 alike; results go to "
                             "benchmarks/results/avx2 and docs/benchmarks-avx2.md unless --out/--page say otherwise")
    parser.add_argument("--render-only", action="store_true",
                        help="run nothing: rewrite the tables from the JSON results already in --out "
                             "(e.g. a gpu.json brought back from a GPU machine)")
    args = parser.parse_args(argv)
    emulated = "avx2" if args.emulate_avx2 else ""
    args.out = args.out or REPO / "benchmarks" / "results" / emulated
    args.page = args.page or REPO / "docs" / ("benchmarks-avx2.md" if emulated else "benchmarks.md")
    if emulated:
        force_isa("avx2")  # every step's process, and the PyTorch baselines they start, inherit the caps
    steps = [step.strip() for step in (args.only or ",".join(STEPS)).split(",") if step.strip()]
    unknown = [step for step in steps if step not in STEPS]
    if unknown:
        parser.error(f"unknown steps {', '.join(unknown)}; use some of {', '.join(STEPS)}")
    if args.render_only:
        print(f"rewrote the tables in {args.page}: {', '.join(rewrite_tables(args.page, args.out, steps)) or 'none'}")
        return 0
    if "nicms" in steps and not (REPO.parent / "shared" / "interop" / "nicmslesions_baseline_2ch").is_dir():
        print("nicms: skipped (../shared/interop/nicmslesions_baseline_2ch not found)")
        steps.remove("nicms")
    if "gpu" in steps and not _has_gpu():
        print("gpu: skipped (no GPU for both JAX and PyTorch here)")
        steps.remove("gpu")
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"{cpu_model()}: running {', '.join(steps)}", flush=True)
    for step in steps:
        command = _command(step, args)
        if command is None:
            continue
        started = time.perf_counter()
        finished = subprocess.run(command, cwd=REPO, check=False)
        if finished.returncode:
            print(f"{step}: failed with status {finished.returncode}: {' '.join(command)}", file=sys.stderr)
            return 1
        print(f"{step}: {time.perf_counter() - started:.0f} s", flush=True)
    if not args.no_page:
        print(f"rewrote the tables in {args.page}: {', '.join(rewrite_tables(args.page, args.out, steps)) or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
