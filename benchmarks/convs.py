"""GFLOP/s of each 3D convolution formulation, and its fraction of a matmul of equal FLOPs (the ceiling).

Run:
    python -m benchmarks.convs            # prints a table, writes benchmarks/results/convs.json
Shapes are the ones the cascade runs: the training step's convolutions on a
batch of 11^3 patches and the dense kernel's dilated convolutions on a tile.
PyTorch (oneDNN) rows appear when torch is installed (pip install -e '.[bench]'), each case in a
process of its own with jaxcascade's malloc settings, flush-to-zero and threads (`common.run_baseline`).
"""

from __future__ import annotations

import argparse
import importlib.util

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import add_isa_option, force_isa, markdown_table, run_baseline, time_call, write_results
from jaxcascade.ops import convs, cpu_kernel

# (name, input shape NDHWC, out channels, dilation)
CASES = [
    ("train conv1: 128 x 11^3 x 2 -> 32", (128, 11, 11, 11, 2), 32, 1),
    ("train conv2: 128 x 4^3 x 32 -> 64", (128, 4, 4, 4, 32), 64, 1),
    ("dense conv1: 41^3 x 2 -> 32", (1, 41, 41, 41, 2), 32, 1),
    ("dense conv2: 38^3 x 32 -> 64, dilation 2", (1, 38, 38, 38, 32), 64, 2),
    ("nicMS conv1_2: 32 x 13^3 x 32 -> 32", (32, 13, 13, 13, 32), 32, 1),
]


def conv_flops(shape, out_channels, dilation, kernel=3):
    n, d, h, w, c = shape
    span = (kernel - 1) * dilation
    return 2 * n * (d - span) * (h - span) * (w - span) * kernel**3 * c * out_channels


def case_arrays(index: int) -> tuple[np.ndarray, np.ndarray]:
    """CASES[index]'s input (NDHWC) and kernel (DHWIO), the same in every process."""
    _, shape, out_channels, _ = CASES[index]
    rng = np.random.default_rng(index)
    return (rng.normal(size=shape).astype(np.float32),
            rng.normal(size=(3, 3, 3, shape[-1], out_channels)).astype(np.float32))


def torch_conv(index: int, repeats: int) -> dict:
    """PyTorch's conv3d (oneDNN, NCDHW) on CASES[index]; run in a baseline process (common.run_baseline)."""
    import torch

    x, k = case_arrays(index)
    tx = torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, -1, 1)))
    tk = torch.from_numpy(np.ascontiguousarray(k.transpose(4, 3, 0, 1, 2)))
    with torch.no_grad():
        return time_call(lambda: torch.nn.functional.conv3d(tx, tk, dilation=CASES[index][3]), repeats=repeats)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    add_isa_option(parser)
    args = parser.parse_args(argv)
    force_isa(args.isa)
    rng = np.random.default_rng(len(CASES))
    rows, baseline = [], None
    for index, (name, shape, out_channels, dilation) in enumerate(CASES):
        x, k = (jnp.asarray(a) for a in case_arrays(index))
        flops = conv_flops(shape, out_channels, dilation)
        results = {}
        # 'direct' is jaxcascade's C++ kernel (cpu_kernel.py), what inference runs on CPU.
        implementations = ("lax", "slices", "im2col", "gather") + (("direct",) if cpu_kernel.available() else ())
        for implementation in implementations:
            fn = jax.jit(lambda x, k, i=implementation: convs.conv3d(x, k, dilation=dilation, implementation=i))
            results[f"jax {implementation}"] = time_call(lambda: fn(x, k).block_until_ready(), repeats=args.repeats)
        # The practical ceiling: one matmul with the same number of FLOPs.
        m = flops // (2 * 27 * shape[-1] * out_channels)
        a = jnp.asarray(rng.normal(size=(m, 27 * shape[-1])).astype(np.float32))
        b = jnp.asarray(rng.normal(size=(27 * shape[-1], out_channels)).astype(np.float32))
        matmul = jax.jit(jnp.dot)
        results["jax matmul (same FLOPs)"] = time_call(lambda: matmul(a, b).block_until_ready(), repeats=args.repeats)
        # The same product in bfloat16 with float32 sums (config.compute_dtype): matrix units, where a CPU has them.
        a16, b16 = a.astype(jnp.bfloat16), b.astype(jnp.bfloat16)
        matmul16 = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
        results["jax matmul bf16 (same FLOPs)"] = time_call(lambda: matmul16(a16, b16).block_until_ready(),
                                                            repeats=args.repeats)
        if importlib.util.find_spec("torch"):
            results["torch conv3d"] = run_baseline("benchmarks.convs:torch_conv", index=index, repeats=args.repeats)
            baseline = results["torch conv3d"].pop("baseline")
        ceiling = results["jax matmul (same FLOPs)"]["median_s"]
        for formulation, timing in results.items():
            rows.append({"case": name, "formulation": formulation, "GFLOP/s": flops / timing["median_s"] / 1e9,
                         "of GEMM ceiling": ceiling / timing["median_s"], "median ms": timing["median_s"] * 1e3,
                         "min ms": timing["min_s"] * 1e3, "max ms": timing["max_s"] * 1e3,
                         "faults/call": timing["minor_faults"], "sys ms/call": timing["system_s"] * 1e3})
        print(f"{name}: " + ", ".join(f"{f} {flops / t['median_s'] / 1e9:.1f}" for f, t in results.items()),
              flush=True)
    print()
    print(markdown_table(rows, ["case", "formulation", "GFLOP/s", "of GEMM ceiling", "median ms", "min ms", "max ms",
                                "faults/call", "sys ms/call"]))
    path = write_results("convs" + ("" if args.isa == "native" else f"_{args.isa}"),
                         {"isa": args.isa, "rows": rows, "baseline": baseline}, args.out)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
