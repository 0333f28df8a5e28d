"""Where the dense kernel's time goes: stage 1 of a whole 1 mm brain under JAX's profiler, time per XLA op.

Run (after `jaxcascade demo`, or with seeded random weights):
    python -m benchmarks.profile_dense [--model jaxcascade-demo/model] [--top 15] [--brain mni] [--isa avx2]
                                       [--repeats 5]
Prints stage 1's time untraced (the median and min-max of --repeats runs), then each compiled op's
total time over one traced stage-1 run (after a warm-up), the share of the kernel's op time, and what
the op is (its JAX source name). The trace itself slows the run a little; the shares are what to read.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import re
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.common import add_isa_option, force_isa


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a trained model dir (default: seeded random weights)")
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--brain", choices=("phantom", "mni"), default="phantom",
                        help="phantom: the whole-cascade table's brain; mni: the 1 mm study's (needs nilearn)")
    parser.add_argument("--repeats", type=int, default=1, help="untraced stage-1 runs to time")
    add_isa_option(parser)
    args = parser.parse_args(argv)
    force_isa(args.isa)

    import jax
    import numpy as np

    from benchmarks.inference import load_stages
    from jaxcascade.segmentation import dense, inference
    from jaxcascade import phantom
    from jaxcascade.phantom import mni
    from jaxcascade.phantom.core import subject_seed  # the 1 mm study's first subject (benchmarks.study_1mm)
    from jaxcascade.data.normalisation import candidate_mask, normalise_channels

    if args.brain == "mni":
        subject = mni.make_subject(subject_seed(3, 0), "full")
    else:
        subject = phantom.make_subject(0, "full")
    volume = normalise_channels([subject["T1"], subject["FLAIR"]], "nonzero")
    candidates = candidate_mask(volume[..., 1], 0.5)
    config, stage1, _ = load_stages(args.model, "valverde2017_valid")
    options = inference.InferenceOptions.from_config(config, method="dense")
    for _ in range(2):  # compile, then a run that settles the heap (jaxcascade.runtime's malloc settings)
        inference.classify(stage1, volume, candidates, options)
    runs = []
    for _ in range(max(1, args.repeats)):
        started = time.perf_counter()
        inference.classify(stage1, volume, candidates, options)
        runs.append(time.perf_counter() - started)
    plain = f"{statistics.median(runs):.2f} s"
    if len(runs) > 1:
        plain += f" ({min(runs):.2f}-{max(runs):.2f}, median of {len(runs)} runs)"
    with tempfile.TemporaryDirectory() as trace_dir:
        jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
        started = time.perf_counter()
        inference.classify(stage1, volume, candidates, options)
        traced = time.perf_counter() - started
        jax.profiler.stop_trace()
        trace = json.loads(gzip.decompress(next(Path(trace_dir).rglob("*.trace.json.gz")).read_bytes()))
    totals, names = collections.Counter(), {}
    for event in trace["traceEvents"]:
        # XLA ops are the complete events without a Python frame ("$file:line") or runtime prefix.
        name = event.get("name", "")
        if event.get("ph") != "X" or name.startswith(("$", "Pjit", "Thunk", "Common", "ExecuteHelper")):
            continue
        totals[name] += event["dur"]
        names.setdefault(name, event.get("args", {}).get("long_name", ""))
    sources = _op_sources(stage1, volume.shape, options)
    total = sum(totals.values())
    _, origins = dense.tile_geometry(candidates.shape, options.tile_size, stage1.dense_halo, stage1.patch_size)
    groups = dense.group_blocks(dense.occupied_tiles(candidates, origins, options.tile_size), options.tile_size)
    in_groups = ", ".join(f"{len(starts) * np.prod(group)} in {'x'.join(map(str, group))} groups"
                          for group, starts in groups)
    print(f"stage 1 ({int(candidates.sum()):,} candidates, blocks of {options.tile_size}^3: {in_groups}): "
          f"{plain}, {traced:.2f} s while traced; {total / 1e6:.2f} s in XLA ops (summed over threads)")
    for name, micros in totals.most_common(args.top):
        print(f"{micros / 1e3:9.1f} ms  {micros / total:6.1%}  {name:28s} {sources.get(name, '')}")


def _op_sources(stage, shape, options) -> dict[str, str]:
    """XLA op name -> the JAX operation it came from, read from the compiled tile predictor."""
    import jax
    import numpy as np

    from jaxcascade.segmentation import dense
    from jaxcascade.runtime import distributed
    from jaxcascade.data import patches

    pad, _ = dense.tile_geometry(shape[:3], options.tile_size, stage.dense_halo, stage.patch_size)
    widths = patches.bucketed_widths(shape, pad)
    padded = jax.ShapeDtypeStruct(tuple(s + a + b for s, (a, b) in zip(shape, widths)), np.float32)
    padded_mask = jax.ShapeDtypeStruct((*padded.shape[:3], 1), np.bool_)
    sources = {}
    # The largest groups do most of the work; their ops name first where the modules share names.
    for group in ((2, 2, 2), (1, 1, 2), (1, 1, 1)):
        per_call = max(1, options.tiles_per_batch // int(np.prod(group)))
        origins = jax.ShapeDtypeStruct((distributed.round_up_to_devices(per_call), 3), np.int32)
        predict = dense.make_tile_predictor(stage.graphdef, options.tile_size, stage.dense_halo,
                                            stage.patch_size // 2, group)
        text = predict.lower(stage.variables, padded, padded_mask, origins).compile().as_text()
        for line in text.splitlines():
            found = re.search(r'%([\w.-]+) = (\S+) .*?op_name="([^"]+)"', line)
            if not found:
                continue
            name, shape, source = found.groups()
            source = "/".join(part for part in source.split("/")[-2:] if "branch" not in part)
            target = re.search(r'custom_call_target="([^"]+)"', line)  # the C++ kernels: which one, on what
            sources.setdefault(name, f"{target.group(1)} -> {shape.split('{')[0]}" if target else source)
    return sources


if __name__ == "__main__":
    main()
