"""The same patch networks in PyTorch, loaded with jaxcascade's weights (benchmarks only).

This is the seed's way of segmenting: classify every candidate's 11^3 patch
one batch at a time, here on PyTorch's oneDNN CPU kernels.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


class TorchValverde2017(nn.Module):
    def __init__(self, in_channels: int, padding: str, flat_size: int, bn_epsilon: float):
        super().__init__()
        pad = 1 if padding == "SAME" else 0
        self.conv1 = nn.Conv3d(in_channels, 32, 3, padding=pad)
        self.bn1 = nn.BatchNorm3d(32, eps=bn_epsilon)
        self.conv2 = nn.Conv3d(32, 64, 3, padding=pad)
        self.bn2 = nn.BatchNorm3d(64, eps=bn_epsilon)
        self.dense1 = nn.Linear(flat_size, 256)
        self.out = nn.Linear(256, 2)

    def forward(self, x):  # x: (B, C, D, H, W)
        x = nn.functional.max_pool3d(torch.relu(self.bn1(self.conv1(x))), 2)
        x = nn.functional.max_pool3d(torch.relu(self.bn2(self.conv2(x))), 2)
        # jaxcascade flattens channels-last (D, H, W, C): match its order.
        x = x.permute(0, 2, 3, 4, 1).reshape(x.shape[0], -1)
        return torch.softmax(self.out(torch.relu(self.dense1(x))), dim=-1)[:, 1]


def from_jax(variables: dict, in_channels: int, padding: str, bn_epsilon: float) -> nn.Module:
    """The PyTorch network with the same weights, in channels_last_3d memory format.

    channels_last_3d ran oneDNN's 3D convolutions about 1.5x faster than the
    default layout on this CPU (3.6 k vs 2.1-2.9 k patches/s), so the baseline
    gets its best layout.
    """
    params, stats = variables["params"], variables["batch_stats"]
    flat_size = np.asarray(params["dense1"]["kernel"]).shape[0]
    model = TorchValverde2017(in_channels, padding, flat_size, bn_epsilon).eval()

    def t(a):
        return torch.from_numpy(np.array(a, np.float32))  # a writable copy

    with torch.no_grad():
        for name in ("conv1", "conv2"):
            conv = getattr(model, name)
            conv.weight.copy_(t(np.asarray(params[name]["kernel"]).transpose(4, 3, 0, 1, 2)))
            conv.bias.copy_(t(params[name]["bias"]))
        for name in ("bn1", "bn2"):
            bn = getattr(model, name)
            bn.weight.copy_(t(params[name]["scale"]))
            bn.bias.copy_(t(params[name]["bias"]))
            bn.running_mean.copy_(t(stats[name]["mean"]))
            bn.running_var.copy_(t(stats[name]["var"]))
        for name in ("dense1", "out"):
            linear = getattr(model, name)
            linear.weight.copy_(t(np.asarray(params[name]["kernel"]).T))
            linear.bias.copy_(t(params[name]["bias"]))
    return model.to(memory_format=torch.channels_last_3d)


def classify_candidates(model: nn.Module, volume: np.ndarray, mask: np.ndarray, batch_size: int = 256,
                        patch_size: int = 11, device=None) -> np.ndarray:
    """Patch-wise probabilities at mask voxels (0 elsewhere), patches cut with torch indexing.

    Patches are gathered channels-last, which is already channels_last_3d
    memory once permuted (no copy); `fastest_batch` chooses batch_size for a machine.
    """
    half = patch_size // 2
    device = device or torch.device("cpu")
    padded = torch.from_numpy(np.pad(volume, ((half, half),) * 3 + ((0, 0),))).to(device)
    centres = torch.from_numpy(np.argwhere(mask)).to(device)
    offsets = torch.arange(patch_size, device=device)
    probability = np.zeros(mask.shape, np.float32)
    outputs = []
    with torch.no_grad():
        for start in range(0, len(centres), batch_size):
            c = centres[start : start + batch_size]
            z = (c[:, 0, None] + offsets)[:, :, None, None]
            y = (c[:, 1, None] + offsets)[:, None, :, None]
            x = (c[:, 2, None] + offsets)[:, None, None, :]
            patches = padded[z, y, x].permute(0, 4, 1, 2, 3)  # (B, C, p, p, p), channels_last_3d strides
            outputs.append(model(patches))
    probability[mask] = torch.cat(outputs).cpu().numpy() if outputs else []
    return probability


BATCHES = (256, 1024, 4096)


def fastest_batch(model: nn.Module, volume: np.ndarray, mask: np.ndarray, batches=BATCHES,
                  voxels: int = 16384) -> tuple[int, dict]:
    """PyTorch's fastest batch for classify_candidates here: each of batches timed (best of 2, after a warm-up)
    on about `voxels` of mask's voxels, spread through it; returns (batch, {batch: seconds}).

    The subset holds at least two of the largest batch, so that every batch size runs full batches.
    """
    import time

    voxels = max(voxels, 2 * max(batches))
    subset = np.zeros_like(mask)
    subset[tuple(np.argwhere(mask)[:: max(1, int(mask.sum()) // voxels)][:voxels].T)] = True
    trials = {}
    for batch in batches:
        classify_candidates(model, volume, subset, batch)
        seconds = []
        for _ in range(2):
            started = time.perf_counter()
            classify_candidates(model, volume, subset, batch)
            seconds.append(time.perf_counter() - started)
        trials[batch] = min(seconds)
    return min(trials, key=trials.get), trials
