"""The networks' 2^3 max-pool with stride 2 (here, below the networks, for the fused patch path too)."""

from __future__ import annotations


def max_pool_2x2x2(x):
    """A 2^3 max-pool with stride 2 over (B, D, H, W, C), odd trailing planes dropped (Lasagne's ignore_border).

    Written as crop + reshape + max rather than `reduce_window`: the same
    forward values, but its gradient is an elementwise mask, whereas
    reduce_window's select-and-scatter gradient is several times slower on
    XLA:CPU (benchmarks/train_step.py). Gradients differ only for tied maxima,
    which after a ReLU are zeros whose gradient the ReLU drops anyway.
    """
    batch, depth, height, width, channels = x.shape
    x = x[:, : depth // 2 * 2, : height // 2 * 2, : width // 2 * 2]
    x = x.reshape(batch, depth // 2, 2, height // 2, 2, width // 2, 2, channels)
    return x.max(axis=(2, 4, 6))
