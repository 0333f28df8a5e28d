"""The imported nicMSlesions network, patch-wise: jaxcascade vs PyTorch, same weights, same candidates.

Run:
    pip install -e ".[bench,interop]"
    python -m benchmarks.nicms_inference [--voxels 20000] [--all]
nicMSlesions' network has per-position PReLU slopes, so it can only run
patch-wise (about 60 M multiply-adds per patch). On a 1 mm (197x233x189)
two-channel phantom with the nicMS normalisation, both frameworks classify the
same stage-1 candidates; by default a seeded random subset (--voxels) and the
whole-brain time is extrapolated from the measured rate (say so when quoting);
--all classifies every candidate. Needs ../shared/interop/nicmslesions_baseline_2ch.
PyTorch runs in a process of its own with jaxcascade's malloc settings, flush-to-zero and threads
(`common.run_baseline`), at the fastest of its layouts (contiguous, channels_last_3d), batches (64, 256,
1024) and of the network as written or computing only the outputs the pools read (as jaxcascade's kernel
does), tried first on 2,048 patches. Prints a table, writes benchmarks/results/nicms_inference.json.
"""

from __future__ import annotations

import argparse
import pickle
import sys
import tempfile
from pathlib import Path

import numpy as np

from benchmarks.common import markdown_table, run_baseline, time_call, torch_or_exit, write_results

SHARED = Path(__file__).resolve().parents[2] / "shared" / "interop" / "nicmslesions_baseline_2ch"


def torch_nicms(variables: dict, pooled_only: bool = False, channels_last: bool = False):
    """nicMSlesions' network in PyTorch (channels-first, as Keras computed it) with the given weights.

    pooled_only: the two convolutions before a pool compute only the outputs the pool reads (what
    jaxcascade's kernel does; the same result), as a SAME-padded input cropped to them and a VALID
    convolution. channels_last: the model in channels_last_3d memory format.
    """
    torch = torch_or_exit()
    from torch import nn

    params, stats = variables["params"], variables["batch_stats"]

    def t(a, *perm):
        a = np.asarray(a, np.float32)
        return torch.from_numpy(np.array(a.transpose(*perm) if perm else a))

    class NicMS(nn.Module):
        def __init__(self):
            super().__init__()
            self.convs, self.bns, self.alphas = nn.ModuleList(), nn.ModuleList(), []
            for conv, bn, prelu in (("conv1_1", "bn_1_1", "prelu_conv1_1"), ("conv1_2", "bn_1_2", "prelu_conv1_2"),
                                    ("conv2_1", "bn_2_1", "prelu_conv2_1"), ("conv2_2", "bn_2_2", "prelu_conv2_2")):
                kernel = np.asarray(params[conv]["kernel"])
                layer = nn.Conv3d(kernel.shape[3], kernel.shape[4], 3, padding=1)
                layer.weight.data = t(kernel, 4, 3, 0, 1, 2)
                layer.bias.data = t(params[conv]["bias"])
                norm = nn.BatchNorm3d(kernel.shape[4], eps=1e-3)
                norm.weight.data, norm.bias.data = t(params[bn]["scale"]), t(params[bn]["bias"])
                norm.running_mean.data, norm.running_var.data = t(stats[bn]["mean"]), t(stats[bn]["var"])
                self.convs.append(layer)
                self.bns.append(norm)
                self.alphas.append(t(params[prelu]["alpha"], 3, 0, 1, 2))  # (D, H, W, C) -> (C, D, H, W)
            self.dense, self.dense_alphas = nn.ModuleList(), []
            for dense, prelu in (("d1", "prelu_d1"), ("d2", "prelu_d2"), ("d3", "prelu_d3"), ("out", None)):
                kernel = np.asarray(params[dense]["kernel"])
                layer = nn.Linear(*kernel.shape)
                layer.weight.data, layer.bias.data = t(kernel.T), t(params[dense]["bias"])
                self.dense.append(layer)
                self.dense_alphas.append(t(params[prelu]["alpha"]) if prelu else None)

        def forward(self, x):
            for i, (conv, bn, alpha) in enumerate(zip(self.convs, self.bns, self.alphas)):
                if pooled_only and i in (1, 3):
                    kept = x.shape[-1] // 2 * 2  # the outputs the pool reads, and the slopes at them
                    padded = nn.functional.pad(x, (1,) * 6)[..., : kept + 2, : kept + 2, : kept + 2]
                    x = bn(nn.functional.conv3d(padded, conv.weight, conv.bias))
                    alpha = alpha[:, :kept, :kept, :kept]
                else:
                    x = bn(conv(x))
                x = torch.clamp(x, min=0) + alpha * torch.clamp(x, max=0)
                if i in (1, 3):
                    x = nn.functional.max_pool3d(x, 2)
            x = x.reshape(x.shape[0], -1)  # channels-first C order, as Keras' Flatten
            for layer, alpha in zip(self.dense, self.dense_alphas):
                x = layer(x)
                if alpha is not None:
                    x = torch.clamp(x, min=0) + alpha * torch.clamp(x, max=0)
            return torch.softmax(x, dim=-1)[:, 1]

    model = NicMS().eval()
    return model.to(memory_format=torch.channels_last_3d) if channels_last else model


def torch_timing(scratch: str, repeats: int) -> dict:
    """PyTorch's patch-wise classification of the saved candidates; run in a baseline process."""
    from benchmarks.torch_reference import classify_candidates, fastest_batch

    with open(Path(scratch) / "inputs.pkl", "rb") as file:
        inputs = pickle.load(file)
    # nicMSlesions' network costs ~60 M multiply-adds a patch and holds 13^3 x 32 activations per patch:
    # smaller batches are tried, on 2,048 patches, for each layout and with only the pooled outputs computed.
    trials, fastest = {}, None
    for pooled_only in (False, True):
        for channels_last in (False, True):
            model = torch_nicms(inputs["variables"], pooled_only, channels_last)
            batch, times = fastest_batch(model, inputs["volume"], inputs["mask"], batches=(64, 256, 1024),
                                         voxels=2048)
            name = ("pooled outputs only" if pooled_only else "every output") + (
                ", channels_last_3d" if channels_last else ", contiguous")
            trials[name] = {str(b): t for b, t in times.items()}
            if fastest is None or times[batch] < fastest[0]:
                fastest = (times[batch], model, batch, name)
    _, model, batch, variant = fastest
    timing = time_call(lambda: classify_candidates(model, inputs["volume"], inputs["mask"], batch), warmup=0,
                       repeats=repeats, keep_result=True)
    np.save(Path(scratch) / "torch_probability.npy", timing.pop("result"))
    return {**timing, "batch": batch, "variant": variant, "batch_trials_s": trials}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--voxels", type=int, default=20000, help="candidates to classify (default subset)")
    parser.add_argument("--all", action="store_true", help="classify every candidate of the brain")
    parser.add_argument("--seed", type=int, default=0, help="phantom subject seed")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    torch_or_exit()
    if not SHARED.is_dir():
        sys.exit(f"{SHARED}: nicMSlesions' models not found")

    import jax

    from jaxcascade.segmentation import cascade
    from jaxcascade.storage import interop
    from jaxcascade import phantom
    from jaxcascade.segmentation.inference import InferenceOptions, classify
    from jaxcascade.data.normalisation import candidate_mask, normalise_channels

    with tempfile.TemporaryDirectory() as scratch:
        model_dir = Path(scratch) / "nicms"
        interop.import_keras(SHARED / "model_1.hdf5", SHARED / "model_2.hdf5", ("T1", "FLAIR"), model_dir)
        stage1 = cascade.Cascade.load(model_dir).stage1
    subject = phantom.make_subject(args.seed, "full")
    volume = normalise_channels([subject["T1"], subject["FLAIR"]], "nicms")
    candidates = candidate_mask(volume[..., 1], 0.5)
    mask = candidates
    if not args.all:
        chosen = np.random.default_rng(0).permutation(np.argwhere(candidates))[: args.voxels]
        mask = np.zeros_like(candidates)
        mask[tuple(chosen.T)] = True

    warm = np.zeros_like(mask)
    warm[tuple(np.argwhere(mask)[:512].T)] = True
    options = InferenceOptions(method="patch", batch_size=interop.network_config().inference.batch_size)
    classify(stage1, volume, warm, options)  # warm-up: compiles the one batch shape
    jax_timing = time_call(lambda: classify(stage1, volume, mask, options), warmup=0, repeats=args.repeats,
                           keep_result=True)
    with tempfile.TemporaryDirectory() as scratch:
        with open(Path(scratch) / "inputs.pkl", "wb") as file:
            pickle.dump({"variables": jax.tree.map(np.asarray, stage1.variables), "volume": volume, "mask": mask,
                         "warm": warm}, file)
        torch_timing = run_baseline("benchmarks.nicms_inference:torch_timing", scratch=scratch, repeats=args.repeats)
        torch_probability = np.load(Path(scratch) / "torch_probability.npy")
    baseline = torch_timing.pop("baseline")
    jax_probability = jax_timing.pop("result")

    n, total = int(mask.sum()), int(candidates.sum())
    rows = []
    torch_name = f"torch patch ({torch_timing['variant']}, batch {torch_timing['batch']})"
    for name, timing in (("jaxcascade patch", jax_timing), (torch_name,
                                                            torch_timing)):
        seconds = timing["median_s"]
        rows.append({"method": name, "voxels": n, "seconds": seconds, "min_s": timing["min_s"],
                     "max_s": timing["max_s"], "repeats": timing["repeats"], "patches_per_s": n / seconds,
                     "whole_brain_s" + ("" if args.all else " (extrapolated)"): seconds * total / n,
                     "speedup_vs_torch": torch_timing["median_s"] / seconds})
    difference = float(np.abs(jax_probability - torch_probability).max())
    print(markdown_table(rows, list(rows[0])))
    print(f"\nbrain candidates: {total}; max |jax - torch| probability: {difference:.2e}; torch threads "
          f"{baseline['threads']}")
    path = write_results("nicms_inference", {"rows": rows, "brain_candidates": total,
                                             "max_abs_diff": difference, "baseline": baseline}, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
