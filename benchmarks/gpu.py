"""The inference, training-step and convolution benchmarks on one GPU: JAX (XLA, cuDNN) against PyTorch (cuDNN).

Run on a machine with an NVIDIA GPU, JAX's CUDA wheels and PyTorch with CUDA:
    python -m benchmarks.gpu [--model jaxcascade-demo/model] [--out DIR]
JAX runs in this process; every PyTorch figure comes from a baseline process of its own
(`common.run_baseline`: jaxcascade's malloc settings, flush-to-zero and threads, cuDNN autotuning on),
which gets the card to itself while it runs and hands its probabilities back through a scratch folder.
Every figure after a warm-up and the median of >= 3 repetitions with min-max; GPU work is timed to
completion (block_until_ready / torch.cuda.synchronize). Sections:
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

# The PyTorch baselines run while this process holds its arrays: JAX must not take 75 % of the card up front.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse  # noqa: E402
import pickle  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from benchmarks.common import markdown_table, run_baseline, time_call, write_results  # noqa: E402

# (tile_size, tiles_per_batch) of the dense kernel; the CPU default is (12, 8).
DENSE_TILINGS = ((12, 8), (12, 64), (24, 16), (32, 8), (48, 4))


def _row(section: str, name: str, timing: dict, **extra) -> dict:
    return {"section": section, "name": name, "median_s": timing["median_s"], "min_s": timing["min_s"],
            "max_s": timing["max_s"], "repeats": timing["repeats"], **extra}


def inference_rows(model_dir, repeats: int, log, size: str = "full") -> list[dict]:
    import jax

    from benchmarks.inference import dense_work, load_stages
    from jaxcascade.segmentation import inference
    from jaxcascade.networks import models
    from jaxcascade import phantom
    from jaxcascade.segmentation.stage import Stage
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

    with tempfile.TemporaryDirectory() as scratch:
        stages = {network: jax.device_get(load_stages(model_dir, network)[1].variables)
                  for network in ("valverde2017_valid", "valverde2017")}
        with open(Path(scratch) / "inputs.pkl", "wb") as file:
            pickle.dump({"volume": volume, "candidates": candidates, "variables": stages,
                         "bn_epsilon": config.model.bn_epsilon}, file)
        baseline = run_baseline("benchmarks.gpu:torch_inference", scratch=scratch, repeats=repeats)
        for name, timing in baseline["timings"].items():
            maps[name] = np.load(Path(scratch) / f"{baseline['files'][name]}")
            rows.append(_row("inference", name, timing, voxels_per_s=count / timing["median_s"],
                             baseline=baseline["baseline"]))
            log(f"{name}: {timing['median_s']:.3f} s")
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


def torch_inference(scratch: str, repeats: int) -> dict:
    """PyTorch's inference rows on the saved volume and candidates; run in a baseline process
    (common.run_baseline). Probabilities go to scratch as .npy files."""
    import torch

    from benchmarks.torch_reference import classify_candidates, from_jax

    with open(Path(scratch) / "inputs.pkl", "rb") as file:
        saved = pickle.load(file)
    volume, candidates, device = saved["volume"], saved["candidates"], _torch_device()
    torch.backends.cudnn.benchmark = True
    timings, files = {}, {}

    def measure(name, model, batch):
        timing = time_call(lambda: classify_candidates(model, volume, candidates, batch_size=batch, device=device),
                           repeats=repeats, keep_result=True)
        files[name] = f"torch-{len(files)}.npy"
        np.save(Path(scratch) / files[name], timing.pop("result"))
        timings[name] = timing

    for network, padding, batches in (("valverde2017_valid", "VALID", (256, 4096)), ("valverde2017", "SAME", (4096,))):
        model = from_jax(saved["variables"][network], 2, padding, saved["bn_epsilon"]).to(device)
        for batch in batches:
            measure(f"torch {'patch' if padding == 'VALID' else 'SAME'}, batch {batch}", model, batch)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    model = from_jax(saved["variables"]["valverde2017_valid"], 2, "VALID", saved["bn_epsilon"]).to(device)
    measure("torch patch, batch 4096, no TF32", model, 4096)
    return {"timings": timings, "files": files}


def torch_train_step(network: str, batch_size: int, repeats: int) -> dict:
    """PyTorch's training step on the GPU (train_step.torch_step); run in a baseline process."""
    from benchmarks import train_step

    return train_step.torch_step(network, batch_size, repeats, device=_torch_device())


def torch_convs(repeats: int) -> dict:
    """PyTorch's conv3d (cuDNN, autotuned) on every case of benchmarks/convs.py; run in a baseline process."""
    import torch

    from benchmarks.convs import CASES, case_arrays

    device = _torch_device()
    torch.backends.cudnn.benchmark = True
    timings = {}
    for index, (name, _, _, dilation) in enumerate(CASES):
        x, k = case_arrays(index)
        tx = torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, -1, 1))).to(device)
        tk = torch.from_numpy(np.ascontiguousarray(k.transpose(4, 3, 0, 1, 2))).to(device)

        def run():
            with torch.no_grad():
                torch.nn.functional.conv3d(tx, tk, dilation=dilation)
            if tx.is_cuda:
                torch.cuda.synchronize()

        timings[name] = time_call(run, warmup=3, repeats=repeats * 4)
    return {"timings": timings}


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
            timing = run_baseline("benchmarks.gpu:torch_train_step", network=network, batch_size=batch,
                                  repeats=repeats)
            rows.append({"section": "train_step", "name": f"{network} torch float32", "batch": batch,
                         "median_s": timing["median_s"], "min_s": timing["min_s"], "max_s": timing["max_s"],
                         "repeats": repeats, "patches_per_s": batch / timing["median_s"],
                         "baseline": timing["baseline"]})
            log(f"train {network} torch batch {batch}: {timing['median_s'] * 1e3:.2f} ms")
    for row in rows:
        torch_row = next(r for r in rows if r["name"].split()[0] == row["name"].split()[0]
                         and r["batch"] == row["batch"] and "torch" in r["name"])
        row["vs_torch"] = torch_row["median_s"] / row["median_s"]
    return rows


def conv_rows(repeats: int, log) -> list[dict]:
    import jax
    import jax.numpy as jnp

    from benchmarks.convs import CASES, case_arrays, conv_flops
    from jaxcascade.ops import convs

    baseline = run_baseline("benchmarks.gpu:torch_convs", repeats=repeats)
    rows = []
    for index, (name, shape, out_channels, dilation) in enumerate(CASES):
        x, k = case_arrays(index)
        flops = conv_flops(shape, out_channels, dilation)
        jx, jk = jnp.asarray(x), jnp.asarray(k)
        for dtype in ("float32", "bfloat16"):
            fn = jax.jit(lambda a, b, d=dtype: convs.conv3d(a, b, dilation=dilation, implementation="lax",
                                                            compute_dtype=None if d == "float32" else d))
            timing = time_call(lambda: fn(jx, jk).block_until_ready(), warmup=3, repeats=repeats * 4)
            rows.append(_row("convs", f"{name} | jax lax.conv {dtype}", timing, tflops=flops / timing["median_s"] / 1e12))
        timing = baseline["timings"][name]
        rows.append(_row("convs", f"{name} | torch conv3d float32", timing, tflops=flops / timing["median_s"] / 1e12,
                         baseline=baseline["baseline"]))
        log(f"{name}: " + ", ".join(f"{r['name'].split(' | ')[1]} {r['tflops']:.2f} TFLOP/s" for r in rows[-3:]))
    return rows


def torch_cuda() -> dict:
    """Whether PyTorch sees a GPU, and its CUDA version; asked in a baseline process."""
    import torch

    return {"available": torch.cuda.is_available(), "cuda": torch.version.cuda}


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

    torch_gpu = run_baseline("benchmarks.gpu:torch_cuda")
    if not args.smoke and (jax.default_backend() != "gpu" or not torch_gpu["available"]):
        raise SystemExit(f"benchmarks.gpu needs a GPU for both JAX (backend: {jax.default_backend()}) "
                         f"and PyTorch (cuda available: {torch_gpu['available']})")
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
        except (Exception, SystemExit) as error:  # one broken section (or baseline) must not lose the others
            failures[section] = f"{type(error).__name__}: {error}"
            log(f"{section} FAILED: {failures[section]}")
        # Written after every section: a run cut short keeps what it measured.
        write_results("gpu", {"gpu": jax.devices()[0].device_kind, "smoke": args.smoke, "torch_cuda": torch_gpu["cuda"],
                              "model": args.model or "random weights", "failures": failures, "rows": rows}, args.out)
    for section in ("convs", "train_step", "inference"):
        section_rows = [r for r in rows if r["section"] == section]
        if section_rows:
            print(markdown_table(section_rows, [c for c in section_rows[0] if c != "section"]))
    if failures:
        raise SystemExit(f"failed sections: {failures}")


if __name__ == "__main__":
    main()
