"""The inference, training-step and convolution benchmarks on one GPU: JAX (XLA, cuDNN) against PyTorch (cuDNN).

Run on a machine with an NVIDIA GPU, JAX's CUDA wheels and PyTorch with CUDA:
    python -m benchmarks.gpu [--model jaxcascade-demo/model] [--out DIR]
One process (the phantom is built once; JAX does not preallocate, so both
frameworks share the card), every figure after a warm-up and the median of
>= 3 repetitions with min-max; GPU work is timed to completion
(block_until_ready / torch.cuda.synchronize). Sections:
  inference  - whole 1 mm brain stage 1 (197x233x189 phantom, same weights, same candidates): the dense
               kernel at several tile sizes (float32, bfloat16), the vectorised patch path, PyTorch
               patch-wise (the seed's method) and PyTorch on the seed's SAME network; probabilities compared
  train_step - one jitted step (forward, backward, Adadelta, augmentation, dropout) vs PyTorch's, batch 128
               and 1024, both networks
  convs      - the convolution cases of benchmarks/convs.py: lax.conv (cuDNN) vs torch conv3d
Writes gpu.json (read by benchmarks/run_all.py for docs/benchmarks.md's GPU tables).
"""

from __future__ import annotations

import os

# Both frameworks allocate on the same card: JAX must not take 75 % of it up front.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from benchmarks.common import markdown_table, time_call, write_results  # noqa: E402

# (tile_size, tiles_per_batch) of the dense kernel; the CPU default is (12, 8).
DENSE_TILINGS = ((12, 8), (12, 64), (24, 16), (32, 8), (48, 4))


def _row(section: str, name: str, timing: dict, **extra) -> dict:
    return {"section": section, "name": name, "median_s": timing["median_s"], "min_s": timing["min_s"],
            "max_s": timing["max_s"], "repeats": timing["repeats"], **extra}


def inference_rows(model_dir, repeats: int, log, size: str = "full") -> list[dict]:
    import torch

    from benchmarks.inference import dense_work, load_stages
    from benchmarks.torch_reference import classify_candidates, from_jax
    from jaxcascade.segmentation import inference
    from jaxcascade.networks import models
    from jaxcascade import phantom
    from jaxcascade.segmentation.cascade import Stage
    from jaxcascade.data.normalisation import candidate_mask, normalise_channels

    subject = phantom.make_subject(0, size)
    volume = normalise_channels([subject["T1"], subject["FLAIR"]], "nonzero")
    candidates = candidate_mask(volume[..., 1], 0.5)
    count = int(candidates.sum())
    try:
        config, stage1, _ = load_stages(model_dir, "valverde2017_valid")
    except Exception as error:  # e.g. a checkpoint this JAX/orbax cannot read: time random weights instead
        log(f"model {model_dir} not loaded ({type(error).__name__}: {error}); seeded random weights instead")
        model_dir = None
        config, stage1, _ = load_stages(model_dir, "valverde2017_valid")
    rows, maps = [], {}

    def jax_row(name, stage, options, extra=None):
        timing = time_call(lambda: inference.classify(stage, volume, candidates, options), repeats=repeats,
                           keep_result=True)
        maps[name] = timing["result"]
        work = dense_work(stage, candidates, options, timing["median_s"]) if options.method == "dense" else {}
        rows.append(_row("inference", name, timing, voxels_per_s=count / timing["median_s"], **work, **(extra or {})))
        log(f"{name}: {timing['median_s']:.3f} s")

    for tile_size, per_batch in DENSE_TILINGS:
        options = inference.InferenceOptions.from_config(config, method="dense", tile_size=tile_size,
                                                         tiles_per_batch=per_batch)
        jax_row(f"jax dense {tile_size}^3 x {per_batch}", stage1, options,
                {"tile_size": tile_size, "tiles_per_batch": per_batch})
    best = min((r for r in rows if "tile_size" in r), key=lambda r: r["median_s"])
    tile_size, per_batch = best["tile_size"], best["tiles_per_batch"]
    bf16 = Stage.from_network(models.build_network(config.model, 2, 0, "bfloat16"), stage1.variables)
    jax_row(f"jax dense bf16 {tile_size}^3 x {per_batch}", bf16,
            inference.InferenceOptions.from_config(config, method="dense", tile_size=tile_size,
                                                   tiles_per_batch=per_batch))
    for batch in (128, 4096):
        jax_row(f"jax patch, batch {batch}", stage1,
                inference.InferenceOptions.from_config(config, method="patch", batch_size=batch))
    default_options = inference.InferenceOptions.from_config(config, method="auto")
    jax_row(f"jax auto (defaults: dense {default_options.tile_size}^3 x {default_options.tiles_per_batch})",
            stage1, default_options)

    device = _torch_device()
    torch.backends.cudnn.benchmark = True
    for network, padding, batches in (("valverde2017_valid", "VALID", (256, 4096)), ("valverde2017", "SAME", (4096,))):
        _, torch_stage1, _ = load_stages(model_dir, network)
        model = from_jax(torch_stage1.variables, 2, padding, config.model.bn_epsilon).to(device)
        for batch in batches:
            timing = time_call(lambda: classify_candidates(model, volume, candidates, batch_size=batch, device=device),
                               repeats=repeats, keep_result=True)
            name = f"torch {'patch' if padding == 'VALID' else 'SAME'}, batch {batch}"
            maps[name] = timing["result"]
            rows.append(_row("inference", name, timing, voxels_per_s=count / timing["median_s"]))
            log(f"{name}: {timing['median_s']:.3f} s")
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    model = from_jax(stage1.variables, 2, "VALID", config.model.bn_epsilon).to(device)
    name = "torch patch, batch 4096, no TF32"
    timing = time_call(lambda: classify_candidates(model, volume, candidates, batch_size=4096, device=device),
                       repeats=repeats, keep_result=True)
    maps[name] = timing["result"]
    rows.append(_row("inference", name, timing, voxels_per_s=count / timing["median_s"]))
    log(f"{name}: {timing['median_s']:.3f} s")
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    # Speed against PyTorch's fastest patch-wise run (its default TF32 convolutions), probabilities against
    # true float32 PyTorch (jaxcascade's float32 is true float32 on every platform; convs.conv3d).
    reference = next(r for r in rows if r["name"] == "torch patch, batch 4096")
    exact = "torch patch, batch 4096, no TF32"
    same = min((r for r in rows if r["name"].startswith("torch SAME")), key=lambda r: r["median_s"])
    for row in rows:
        row["candidates"] = count
        row["weights"] = model_dir or "random"
        row["vs_torch_patch"] = reference["median_s"] / row["median_s"]
        row["vs_torch_same"] = same["median_s"] / row["median_s"]
        if not row["name"].startswith("torch SAME"):
            row["max_abs_diff_vs_float32_torch"] = float(np.abs(maps[row["name"]] - maps[exact]).max())
    return rows


def train_step_rows(repeats: int, log) -> list[dict]:
    from benchmarks import train_step

    rows = []
    for network in ("valverde2017_valid", "valverde2017"):
        for batch in (128, 1024):
            for dtype in ("float32", "bfloat16"):
                timing = train_step.jax_step(network, batch, "auto", repeats, dtype)
                rows.append({"section": "train_step", "name": f"{network} jax {dtype}", "batch": batch,
                             "median_s": timing["median_s"], "min_s": timing["min_s"], "max_s": timing["max_s"],
                             "repeats": repeats, "patches_per_s": batch / timing["median_s"]})
                log(f"train {network} jax {dtype} batch {batch}: {timing['median_s'] * 1e3:.2f} ms")
            timing = train_step.torch_step(network, batch, repeats, device=_torch_device())
            rows.append({"section": "train_step", "name": f"{network} torch float32", "batch": batch,
                         "median_s": timing["median_s"], "min_s": timing["min_s"], "max_s": timing["max_s"],
                         "repeats": repeats, "patches_per_s": batch / timing["median_s"]})
            log(f"train {network} torch batch {batch}: {timing['median_s'] * 1e3:.2f} ms")
    for row in rows:
        torch_row = next(r for r in rows if r["name"].split()[0] == row["name"].split()[0]
                         and r["batch"] == row["batch"] and "torch" in r["name"])
        row["vs_torch"] = torch_row["median_s"] / row["median_s"]
    return rows


def conv_rows(repeats: int, log) -> list[dict]:
    import jax
    import jax.numpy as jnp
    import torch

    from benchmarks.convs import CASES, conv_flops
    from jaxcascade.ops import convs

    rng = np.random.default_rng(0)
    rows = []
    for name, shape, out_channels, dilation in CASES:
        x = rng.normal(size=shape).astype(np.float32)
        k = rng.normal(size=(3, 3, 3, shape[-1], out_channels)).astype(np.float32)
        flops = conv_flops(shape, out_channels, dilation)
        jx, jk = jnp.asarray(x), jnp.asarray(k)
        for dtype in ("float32", "bfloat16"):
            fn = jax.jit(lambda a, b, d=dtype: convs.conv3d(a, b, dilation=dilation, implementation="lax",
                                                            compute_dtype=None if d == "float32" else d))
            timing = time_call(lambda: fn(jx, jk).block_until_ready(), warmup=3, repeats=repeats * 4)
            rows.append(_row("convs", f"{name} | jax lax.conv {dtype}", timing, tflops=flops / timing["median_s"] / 1e12))
        tx = torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, -1, 1))).to(_torch_device())
        tk = torch.from_numpy(np.ascontiguousarray(k.transpose(4, 3, 0, 1, 2))).to(_torch_device())

        def run():
            with torch.no_grad():
                torch.nn.functional.conv3d(tx, tk, dilation=dilation)
            if tx.is_cuda:
                torch.cuda.synchronize()

        torch.backends.cudnn.benchmark = True
        timing = time_call(run, warmup=3, repeats=repeats * 4)
        rows.append(_row("convs", f"{name} | torch conv3d float32", timing, tflops=flops / timing["median_s"] / 1e12))
        log(f"{name}: " + ", ".join(f"{r['name'].split(' | ')[1]} {r['tflops']:.2f} TFLOP/s" for r in rows[-3:]))
    return rows


def _torch_device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a trained model dir (default: seeded random weights)")
    parser.add_argument("--sections", default="convs,train_step,inference")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    # A smoke run of this script's logic on a CPU machine (tests, development): no figures to report.
    parser.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    import jax
    import torch

    if not args.smoke and (jax.default_backend() != "gpu" or not torch.cuda.is_available()):
        raise SystemExit(f"benchmarks.gpu needs a GPU for both JAX (backend: {jax.default_backend()}) "
                         f"and PyTorch (cuda available: {torch.cuda.is_available()})")
    started = time.perf_counter()

    def log(line):
        print(f"[{time.perf_counter() - started:6.1f} s] {line}", flush=True)

    builders = {"convs": lambda: conv_rows(args.repeats, log),
                "train_step": lambda: train_step_rows(args.repeats, log),
                "inference": lambda: inference_rows(args.model, args.repeats, log, "tiny" if args.smoke else "full")}
    rows, failures = [], {}
    for section in args.sections.split(","):
        try:
            rows += builders[section]()
        except Exception as error:  # one broken section must not lose the others' figures
            failures[section] = f"{type(error).__name__}: {error}"
            log(f"{section} FAILED: {failures[section]}")
        # Written after every section: a run cut short keeps what it measured.
        write_results("gpu", {"gpu": jax.devices()[0].device_kind, "smoke": args.smoke, "torch_cuda": torch.version.cuda,
                              "model": args.model or "random weights", "failures": failures, "rows": rows}, args.out)
    for section in ("convs", "train_step", "inference"):
        section_rows = [r for r in rows if r["section"] == section]
        if section_rows:
            print(markdown_table(section_rows, [c for c in section_rows[0] if c != "section"]))
    if failures:
        raise SystemExit(f"failed sections: {failures}")


if __name__ == "__main__":
    main()
