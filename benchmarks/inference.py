"""Whole-cascade segmentation time on a 1 mm (197x233x189) two-channel phantom.

Run:
    pip install -e ".[bench]"
    python -m benchmarks.inference [--model WD]       # ~12 minutes on a 2-core CPU
Compares, on the same candidates with the same weights:
  jax dense   - jaxcascade's exact dense kernel (tiles with candidate voxels only; 12^3 blocks, 8 per call),
                its convolutions in jaxcascade's C++ CPU kernel (jaxcascade/ops/cpu_kernel.py)
  jax dense 16^3 x 4, 24^3 x 2 - the same with larger blocks (less halo recomputed, more empty space)
  jax dense bf16 - the same with bfloat16 products and float32 sums (config.compute_dtype)
  jax patch   - jaxcascade's vectorised patch path
  ... (XLA GEMMs) - the same with JAXCASCADE_CPU_KERNEL=0: XLA's GEMM formulations (convs.py)
  torch patch - PyTorch classifying each candidate's patch (the seed's method), at its fastest batch
  torch SAME  - PyTorch running the seed's own SAME-padded network patch-wise (stage 1)
Each method runs in its own process so its peak RSS is its own, every one started with jaxcascade's
malloc settings (GLIBC_TUNABLES); the PyTorch ones also get flush-to-zero and the same threads
(`common.configure_torch`). Without --model
the networks get seeded random weights (timing does not depend on them; stage
2 then runs on whatever CNN1 calls confident). Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import (add_isa_option, baseline_environment, force_isa, markdown_table, measure_once, peak_rss_mb,
                               write_results)
from jaxcascade.ops import cpu_kernel

METHODS = ("jax dense", "jax dense 16^3 x 4", "jax dense 24^3 x 2", "jax dense bf16", "jax dense (XLA GEMMs)",
           "jax patch", "jax patch (XLA GEMMs)", "torch patch", "torch SAME")
# Methods run with jaxcascade's C++ convolution kernel turned off (cpu_kernel.py): XLA's GEMM formulations.
WITHOUT_KERNEL = "(XLA GEMMs)"


def load_stages(model_dir, network: str):
    """(config, stage1, stage2) from a model dir, or seeded random weights for `network`."""
    from jaxcascade import config as config_lib
    from jaxcascade.networks import models
    from jaxcascade.segmentation.cascade import Cascade, Stage

    if model_dir and network == "valverde2017_valid":
        model = Cascade.load(model_dir)
        return model.config, model.stage1, model.stage2
    config = config_lib.load_config("default")
    config.model.network = network
    stages = [Stage.from_network(models.build_network(config.model, 2, seed)) for seed in (1, 2)]
    return config, stages[0], stages[1]


def dense_work(stage, candidates, options, seconds: float) -> dict:
    """Blocks the dense kernel evaluates, and the rate of a pass of every block voxel through the network.

    A voxel's output costs one multiply-add per weight of the dense form (each kernel is applied once
    per output position), so a pass over the blocks is 2 x block voxels x kernel weights (`useful_tflop`,
    the table's "block GFLOP/s" divided by the time). The kernels compute only the outputs the candidates
    read (kept_outputs.py), so on CPU the rate can exceed the machine's FMA peak: it measures speed, not
    arithmetic done.
    """
    import jax

    from jaxcascade.segmentation import dense

    _, origins = dense.tile_geometry(candidates.shape, options.tile_size, stage.dense_halo, stage.patch_size)
    blocks = len(dense.occupied_tiles(candidates, origins, options.tile_size))
    weights = sum(int(np.size(leaf)) for path, leaf in jax.tree_util.tree_flatten_with_path(stage.variables["params"])[0]
                  if jax.tree_util.keystr(path).endswith("['kernel']"))
    flops = 2.0 * blocks * options.tile_size**3 * weights
    return {"dense_blocks": blocks, "useful_tflop": flops / 1e12, "useful_gflops_per_s": flops / seconds / 1e9}


def run_one(method: str, model_dir, out_dir: Path, subject_seed: int, repeats: int = 3) -> dict:
    """Segment the phantom with one method (stage 1 `repeats` times); save probability maps; return timings."""
    from jaxcascade.segmentation import inference
    from jaxcascade.networks import models
    from jaxcascade import phantom
    from jaxcascade.segmentation.stage import Stage
    from jaxcascade.data.normalisation import candidate_mask, normalise_channels

    subject = phantom.make_subject(subject_seed, "full")
    volume = normalise_channels([subject["T1"], subject["FLAIR"]], "nonzero")
    candidates = candidate_mask(volume[..., 1], 0.5)
    network = "valverde2017" if method == "torch SAME" else "valverde2017_valid"
    config, stage1, stage2 = load_stages(model_dir, network)
    options = inference.InferenceOptions.from_config(config, method="dense" if "dense" in method else "patch")
    if "^3 x " in method:  # another block size: "jax dense 16^3 x 4" (edge, blocks per call)
        edge, per_call = method.split()[2].removesuffix("^3"), method.split()[-1]
        options = inference.InferenceOptions.from_config(config, method="dense", tile_size=int(edge),
                                                         tiles_per_batch=int(per_call))
    if method.endswith("bf16"):
        stage1, stage2 = (Stage.from_network(models.build_network(config.model, 2, 0, "bfloat16"), s.variables)
                          for s in (stage1, stage2))

    if method.startswith("jax"):
        def classify(stage, mask):
            return inference.classify(stage, volume, mask, options)

        # Warm-up: compile on a few voxels (and, for dense, one full batch of tiles).
        warm = np.zeros_like(candidates)
        warm[tuple(np.argwhere(candidates)[:: max(1, candidates.sum() // 64)].T)] = True
        classify(stage1, warm)
    else:
        from benchmarks.common import configure_torch
        from benchmarks.torch_reference import classify_candidates, fastest_batch, from_jax

        _, baseline = configure_torch()  # flush-to-zero and threads; malloc settings checked

        torch_models = [from_jax(s.variables, 2, "SAME" if method == "torch SAME" else "VALID",
                                 config.model.bn_epsilon) for s in (stage1, stage2)]
        batch, trials = fastest_batch(torch_models[0], volume, candidates)  # also the warm-up
        baseline = {**baseline, "batch": batch, "batch_trials_s": {str(b): t for b, t in trials.items()}}

        def classify(stage, mask):
            return classify_candidates(torch_models[0 if stage is stage1 else 1], volume, mask, batch)

    runs = [measure_once(lambda: classify(stage1, candidates)) for _ in range(repeats)]
    stage1_probability = runs[-1][0]
    seconds = [timing["s"] for _, timing in runs]
    stage1_seconds = statistics.median(seconds)
    result = {"method": method, "candidates": int(candidates.sum()), "stage1_s": stage1_seconds,
              **(dense_work(stage1, candidates, options, stage1_seconds) if "dense" in method else {}),
              "stage1_min_s": min(seconds), "stage1_max_s": max(seconds), "repeats": repeats,
              "stage1_minor_faults": statistics.median(t["minor_faults"] for _, t in runs),
              "stage1_system_s": statistics.median(t["system_s"] for _, t in runs),
              "patches_per_s": int(candidates.sum()) / stage1_seconds}
    if method.startswith("torch"):
        result["baseline"] = baseline
    np.save(out_dir / f"{method.replace(' ', '_')}_stage1.npy", stage1_probability)
    if method != "torch SAME":  # the seed's network is timed on stage 1 only
        stage2_mask = stage1_probability > options.stage2_min_probability
        started = time.perf_counter()
        classify(stage2, stage2_mask)
        result["stage2_candidates"] = int(stage2_mask.sum())
        result["stage2_s"] = time.perf_counter() - started
        result["cascade_s"] = stage1_seconds + result["stage2_s"]
    result["peak_rss_mb"] = peak_rss_mb()
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a trained model dir (default: seeded random weights)")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma list of {METHODS}")
    parser.add_argument("--seed", type=int, default=0, help="phantom subject seed")
    parser.add_argument("--repeats", type=int, default=3, help="stage-1 runs per method after the warm-up")
    parser.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    parser.add_argument("--only", help=argparse.SUPPRESS)
    parser.add_argument("--scratch", help=argparse.SUPPRESS)
    add_isa_option(parser)
    args = parser.parse_args(argv)
    force_isa(args.isa)  # the methods' processes inherit it

    if args.only:  # child process: one method
        print(json.dumps(run_one(args.only, args.model, Path(args.scratch), args.seed, args.repeats)))
        return

    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for method in args.methods.split(","):
            command = [sys.executable, "-m", "benchmarks.inference", "--only", method, "--scratch", scratch, "--seed", str(args.seed),
                       "--repeats", str(args.repeats)]
            if args.model:
                command += ["--model", args.model]
            # Every method, jaxcascade's and the baselines', starts with jaxcascade's malloc settings.
            env = baseline_environment(os.environ | ({cpu_kernel.KERNEL_ENV: "0"} if WITHOUT_KERNEL in method else {}))
            output = subprocess.run(command, check=True, capture_output=True, text=True, env=env).stdout
            row = json.loads(output.strip().splitlines()[-1])
            rows.append(row)
            print(f"{method}: stage 1 {row['stage1_s']:.1f} s ({row['patches_per_s']:.0f} voxels/s), "
                  f"cascade {row.get('cascade_s', float('nan')):.1f} s, peak RSS {row['peak_rss_mb']:.0f} MB",
                  flush=True)
        maps = {m: np.load(Path(scratch) / f"{m.replace(' ', '_')}_stage1.npy") for m in
                (r["method"] for r in rows)}
    reference = next((r for r in rows if r["method"] == "torch patch"), None)
    for row in rows:
        if reference and row["method"] != "torch SAME":
            row["max_abs_diff_vs_torch"] = float(np.abs(maps[row["method"]] - maps["torch patch"]).max())
        if reference:
            row["stage1_speedup_vs_torch"] = reference["stage1_s"] / row["stage1_s"]
            if "cascade_s" in row:
                row["cascade_speedup_vs_torch"] = reference["cascade_s"] / row["cascade_s"]
        same = next((r for r in rows if r["method"] == "torch SAME"), None)
        if same:
            row["stage1_speedup_vs_torch_SAME"] = same["stage1_s"] / row["stage1_s"]
    columns = ["method", "candidates", "stage1_s", "stage1_min_s", "stage1_max_s", "stage1_minor_faults",
               "stage1_system_s", "patches_per_s", "stage2_candidates", "cascade_s", "peak_rss_mb", "stage1_speedup_vs_torch", "stage1_speedup_vs_torch_SAME", "max_abs_diff_vs_torch"]
    print()
    print(markdown_table(rows, columns))
    baselines = {row["method"]: row.pop("baseline") for row in rows if "baseline" in row}
    baseline = next(iter(baselines.values()), None)
    for method, settings in baselines.items():  # each PyTorch method at its own fastest batch
        next(row for row in rows if row["method"] == method)["batch"] = settings["batch"]
    payload = {"isa": args.isa, "model": args.model or "random weights", "rows": rows, "baseline": baseline}
    path = write_results("inference" + ("" if args.isa == "native" else f"_{args.isa}"), payload, args.out)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
