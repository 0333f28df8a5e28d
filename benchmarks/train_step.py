"""Patches per second of one training step (forward, backward, Adadelta update): JAX vs PyTorch.

Run:
    pip install -e ".[bench]"
    python -m benchmarks.train_step [--networks valverde2017_valid] [--batch 128]
    python -m benchmarks.train_step --devices 1,2,4 --processes 1,2   # data-parallel scaling rows
Same network, same batch, same optimiser settings. The JAX step is
`jaxcascade.training.train_steps.make_train_step` (jitted, seed augmentation, dropout); the
PyTorch step is the equivalent module with torch.optim.Adadelta, in a process of its own with
jaxcascade's malloc settings, flush-to-zero and threads (`common.run_baseline`). With
--devices, the JAX step runs with its global batch split over N devices per
process (forced host devices on a CPU, each setting in its own processes;
real devices on GPU) and, with --processes P > 1, over P processes joined by
jax.distributed on this machine, each feeding its own rows of the batch;
scaling efficiency = throughput / (all devices * throughput of one device).
Prints a table, writes benchmarks/results/train_step.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import socket
import subprocess
import sys

import numpy as np

from benchmarks.common import markdown_table, run_baseline, time_call, write_results


def jax_step(network: str, batch_size: int, implementation: str, repeats: int, compute_dtype: str = "float32") -> dict:
    import jax

    from jaxcascade import config as config_lib
    from jaxcascade.runtime import distributed
    from jaxcascade.networks import models
    from jaxcascade.training import optimizer, train_steps

    config = config_lib.load_config("default")
    distributed.initialize(config.distributed)  # joins when JAX_COORDINATOR_ADDRESS etc. are set
    config.model.network = network
    config.model.conv_implementation = implementation
    graphdef, variables = models.split_model(models.build_network(config.model, 2, 0, compute_dtype))
    tx = optimizer.make_optimizer(optimizer.OptimizerSettings.from_config(config.train))
    step = train_steps.make_train_step(graphdef, config.train.augmentation)
    rows = batch_size // jax.process_count()  # this process's share of the global batch
    rng = np.random.default_rng(jax.process_index())
    batch = distributed.global_batch({"patches": rng.normal(size=(rows, 11, 11, 11, 2)).astype(np.float32),
                                      "labels": (np.arange(rows) % 2).astype(np.int32)})
    holder = {"state": distributed.put_replicated(train_steps.create_train_state(variables, tx))}
    key = jax.random.wrap_key_data(distributed.put_replicated(jax.random.key_data(jax.random.key(0))))

    def run():
        holder["state"], measurements = step(holder["state"], batch, key)
        measurements["loss"].block_until_ready()

    return time_call(run, warmup=3, repeats=repeats)


def torch_step(network: str, batch_size: int, repeats: int, device=None) -> dict:
    import torch

    from benchmarks.torch_reference import TorchValverde2017

    padding = "SAME" if network == "valverde2017" else "VALID"
    device = device or torch.device("cpu")
    model = TorchValverde2017(2, padding, 512 if padding == "SAME" else 64, 1e-4).train().to(device)
    dropout = torch.nn.Dropout(0.5)
    optimizer = torch.optim.Adadelta(model.parameters(), lr=1.0, rho=0.95, eps=1e-6)
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.normal(size=(batch_size, 2, 11, 11, 11)).astype(np.float32)).to(device)
    y = torch.from_numpy(np.arange(batch_size) % 2).to(device)

    def forward_logits(patches):
        h = torch.nn.functional.max_pool3d(torch.relu(model.bn1(model.conv1(patches))), 2)
        h = torch.nn.functional.max_pool3d(torch.relu(model.bn2(model.conv2(h))), 2)
        h = dropout(h).permute(0, 2, 3, 4, 1).reshape(patches.shape[0], -1)
        return model.out(torch.relu(model.dense1(h)))

    def run():
        half = torch.randperm(batch_size, device=device)[: batch_size // 2]
        patches = x.clone()
        patches[half] = torch.flip(patches[half], dims=(3,))
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(forward_logits(patches), y)
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()

    return time_call(run, warmup=3, repeats=repeats)


def scaling_rows(network: str, batch: int, repeats: int, device_counts: list[int],
                 process_counts: list[int]) -> list[dict]:
    """The JAX step with its batch split over P processes x N forced host devices."""
    rows = []
    for processes in process_counts:
        for devices in device_counts:
            env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
            if processes > 1:
                env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{_free_port()}", JAX_NUM_PROCESSES=str(processes))
            code = ("import json; from benchmarks import train_step; "
                    f"print(json.dumps(train_step.jax_step({network!r}, {batch}, 'auto', {repeats})))")
            workers = [subprocess.Popen([sys.executable, "-c", code], env=dict(env, JAX_PROCESS_ID=str(index)),
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                       for index in range(processes)]
            outputs = [worker.communicate() for worker in workers]
            for worker, (_, stderr) in zip(workers, outputs):
                if worker.returncode:
                    raise SystemExit(stderr[-2000:])
            timing = json.loads(outputs[0][0].strip().splitlines()[-1])  # process 0's clock
            rows.append({"network": network, "implementation": "jax (auto)", "processes": processes,
                         "devices": devices * processes, "batch": batch, "step_ms": timing["median_s"] * 1e3,
                         "min_ms": timing["min_s"] * 1e3, "max_ms": timing["max_s"] * 1e3,
                         "patches_per_s": batch / timing["median_s"], "faults_per_step": timing["minor_faults"]})
    for row in rows:
        row["scaling_efficiency"] = row["patches_per_s"] / (row["devices"] * rows[0]["patches_per_s"])
    return rows


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--networks", default="valverde2017_valid,valverde2017")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--devices", default="", help="comma list of devices per process for scaling rows, e.g. 1,2,4")
    parser.add_argument("--processes", default="1", help="comma list of process counts for scaling rows, e.g. 1,2")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    rows, baseline = [], None
    if args.devices:
        for network in args.networks.split(","):
            rows += scaling_rows(network, args.batch, args.repeats, [int(n) for n in args.devices.split(",")],
                                 [int(n) for n in args.processes.split(",")])
        print(markdown_table(rows, ["network", "implementation", "processes", "devices", "batch", "step_ms", "min_ms",
                                    "max_ms", "patches_per_s", "faults_per_step", "scaling_efficiency"]))
        print(f"\nwrote {write_results('train_step_devices', {'rows': rows}, args.out)}")
        return
    for network in args.networks.split(","):
        timings = {f"jax ({impl})": jax_step(network, args.batch, impl, args.repeats)
                   for impl in ("auto", "slices", "im2col", "lax")}
        timings["jax (auto, bfloat16)"] = jax_step(network, args.batch, "auto", args.repeats, "bfloat16")
        if importlib.util.find_spec("torch"):
            timings["torch"] = run_baseline("benchmarks.train_step:torch_step", network=network,
                                            batch_size=args.batch, repeats=args.repeats)
            baseline = timings["torch"].pop("baseline")
            # The same baseline without the allocator settings: what they are worth to PyTorch here.
            timings["torch (glibc malloc defaults)"] = run_baseline(
                "benchmarks.train_step:torch_step", malloc_defaults=True, network=network, batch_size=args.batch,
                repeats=args.repeats)
            timings["torch (glibc malloc defaults)"].pop("baseline")
        else:
            print("torch not installed: pip install -e '.[bench]' for the PyTorch rows")
        reference = timings.get("torch")
        for name, timing in timings.items():
            row = {"network": network, "implementation": name, "batch": args.batch,
                   "step_ms": timing["median_s"] * 1e3, "min_ms": timing["min_s"] * 1e3,
                   "max_ms": timing["max_s"] * 1e3, "patches_per_s": args.batch / timing["median_s"],
                   "faults_per_step": timing["minor_faults"], "sys_ms_per_step": timing["system_s"] * 1e3}
            if reference:
                row["speedup_vs_torch"] = reference["median_s"] / timing["median_s"]
            rows.append(row)
            print(f"{network} {name}: {row['patches_per_s']:.0f} patches/s", flush=True)
    print()
    print(markdown_table(rows, ["network", "implementation", "batch", "step_ms", "min_ms", "max_ms", "patches_per_s",
                                "faults_per_step", "sys_ms_per_step", "speedup_vs_torch"]))
    print(f"\nwrote {write_results('train_step', {'rows': rows, 'baseline': baseline}, args.out)}")


if __name__ == "__main__":
    main()
