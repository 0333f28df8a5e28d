"""Patches per second of one training step (forward, backward, Adadelta update): JAX vs PyTorch.

Run:
    pip install -e ".[bench]"
    python benchmarks/train_step.py [--network valverde2017_valid] [--batch 128]
Same network, same batch, same optimiser settings. The JAX step is
`jaxcascade.train.make_train_step` (jitted, seed augmentation, dropout); the
PyTorch step is the equivalent module with torch.optim.Adadelta. Prints a
table, writes benchmarks/results/train_step.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

from common import markdown_table, time_call, write_results  # noqa: E402


def jax_step(network: str, batch_size: int, implementation: str, repeats: int) -> dict:
    import jax
    import jax.numpy as jnp

    from jaxcascade import config as config_lib, models, train

    config = config_lib.load_config("default")
    config.model.network = network
    config.model.conv_implementation = implementation
    graphdef, variables = train.split_model(models.build_network(config.model, 2, 0))
    tx = train.make_optimizer(config.train)
    step = train.make_train_step(graphdef, tx, config.train.augmentation)
    rng = np.random.default_rng(0)
    batch = {"patches": jnp.asarray(rng.normal(size=(batch_size, 11, 11, 11, 2)).astype(np.float32)),
             "labels": jnp.asarray(np.arange(batch_size) % 2, jnp.int32)}
    holder = {"state": train.create_train_state(variables, tx), "i": 0}

    def run():
        holder["i"] += 1
        holder["state"], measurements = step(holder["state"], batch, jax.random.key(holder["i"]))
        measurements["loss"].block_until_ready()

    return time_call(run, warmup=3, repeats=repeats)


def torch_step(network: str, batch_size: int, repeats: int) -> dict:
    import torch

    from torch_reference import TorchValverde2017

    padding = "SAME" if network == "valverde2017" else "VALID"
    model = TorchValverde2017(2, padding, 512 if padding == "SAME" else 64, 1e-4).train()
    dropout = torch.nn.Dropout(0.5)
    optimizer = torch.optim.Adadelta(model.parameters(), lr=1.0, rho=0.95, eps=1e-6)
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.normal(size=(batch_size, 2, 11, 11, 11)).astype(np.float32))
    y = torch.from_numpy(np.arange(batch_size) % 2)

    def forward_logits(patches):
        h = torch.nn.functional.max_pool3d(torch.relu(model.bn1(model.conv1(patches))), 2)
        h = torch.nn.functional.max_pool3d(torch.relu(model.bn2(model.conv2(h))), 2)
        h = dropout(h).permute(0, 2, 3, 4, 1).reshape(patches.shape[0], -1)
        return model.out(torch.relu(model.dense1(h)))

    def run():
        half = torch.randperm(batch_size)[: batch_size // 2]
        patches = x.clone()
        patches[half] = torch.flip(patches[half], dims=(3,))
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(forward_logits(patches), y)
        loss.backward()
        optimizer.step()

    return time_call(run, warmup=3, repeats=repeats)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--networks", default="valverde2017_valid,valverde2017")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    rows = []
    for network in args.networks.split(","):
        timings = {f"jax ({impl})": jax_step(network, args.batch, impl, args.repeats) for impl in ("slices", "lax")}
        try:
            timings["torch"] = torch_step(network, args.batch, args.repeats)
        except ImportError:
            print("torch not installed: pip install -e '.[bench]' for the PyTorch rows")
        reference = timings.get("torch")
        for name, timing in timings.items():
            row = {"network": network, "implementation": name, "batch": args.batch,
                   "step_ms": timing["median_s"] * 1e3, "patches_per_s": args.batch / timing["median_s"]}
            if reference:
                row["speedup_vs_torch"] = reference["median_s"] / timing["median_s"]
            rows.append(row)
            print(f"{network} {name}: {row['patches_per_s']:.0f} patches/s", flush=True)
    print()
    print(markdown_table(rows, ["network", "implementation", "batch", "step_ms", "patches_per_s",
                                "speedup_vs_torch"]))
    print(f"\nwrote {write_results('train_step', {'rows': rows}, args.out)}")


if __name__ == "__main__":
    main()
